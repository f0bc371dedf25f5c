//! Weir's media node: the UDP shard running the sans-IO SFU, the HTTP
//! surface (WHIP, WHEP, pages, metrics, health) and the agent that keeps the
//! node registered with the coordinator.

mod agent;
mod http;
mod pages;
mod shard;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;
use weir_protocol::NodeId;
use weir_protocol::TokenVerifier;
use weir_protocol::coordinator::{Coordinator, NodeInfo, NodeLoad};

pub use http::{MAX_SDP_BYTES, RenderMetrics};
pub use shard::{ShardGone, ShardHandle, ShardStats};
pub use weir_sfu::install_crypto_provider;

/// Settings of one media node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: NodeId,
    pub region: String,
    pub zone: String,
    /// HTTP listen address (WHIP, WHEP, pages, metrics).
    pub http: SocketAddr,
    /// WebRTC UDP listen address.
    pub udp: SocketAddr,
    /// Address offered to peers in ICE; needed when `udp` binds a wildcard.
    pub public_ip: Option<IpAddr>,
    /// Base URL others use to reach the HTTP surface; defaults to `http://{http}`.
    pub public_url: Option<String>,
    /// Control-plane URL the pages call for assignments and tokens.
    pub control_url: String,
    /// Most sessions the node should carry (scheduling hint).
    pub capacity: u32,
}

/// A node whose sockets are bound, ready to serve.
pub struct Node {
    http_listener: tokio::net::TcpListener,
    http_addr: SocketAddr,
    shard: shard::ShardHandle,
    shard_thread: std::thread::JoinHandle<()>,
    agent: Arc<agent::Agent>,
    state: http::AppState,
    shutdown_tx: watch::Sender<bool>,
    public_url: String,
}

impl Node {
    /// Binds the HTTP and UDP sockets and starts the shard.
    pub async fn bind(
        config: NodeConfig,
        coordinator: Arc<dyn Coordinator>,
        verifier: TokenVerifier,
        render_metrics: RenderMetrics,
    ) -> anyhow::Result<Self> {
        let http_listener = tokio::net::TcpListener::bind(config.http)
            .await
            .with_context(|| format!("cannot listen for HTTP on {}", config.http))?;
        let http_addr = http_listener.local_addr()?;
        let udp = std::net::UdpSocket::bind(config.udp)
            .with_context(|| format!("cannot bind WebRTC UDP on {}", config.udp))?;
        let udp_addr = udp.local_addr()?;
        let candidate_ip = match (config.public_ip, udp_addr.ip()) {
            (Some(ip), _) => ip,
            (None, ip) if ip.is_unspecified() => anyhow::bail!(
                "--udp binds {udp_addr}, a wildcard address: give --public-ip, the address peers reach this node at"
            ),
            (None, ip) => ip,
        };
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (shard, shard_thread) = shard::spawn(
            udp,
            SocketAddr::new(candidate_ip, udp_addr.port()),
            shutdown_rx,
        )
        .context("cannot start the media shard")?;
        let public_url = config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{http_addr}"));
        let info = NodeInfo {
            id: config.node_id.clone(),
            region: config.region.clone(),
            zone: config.zone.clone(),
            http_url: public_url.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            capacity: config.capacity,
            draining: false,
            load: NodeLoad::default(),
        };
        let agent = Arc::new(agent::Agent::new(coordinator, info));
        let page_config = format!(
            "window.WEIR_CONFIG = {};\n",
            serde_json::json!({ "control_url": config.control_url })
        );
        let state = http::AppState {
            shard: shard.clone(),
            verifier: Arc::new(verifier),
            agent: agent.clone(),
            render_metrics,
            page_config: page_config.into(),
        };
        Ok(Self {
            http_listener,
            http_addr,
            shard,
            shard_thread,
            agent,
            state,
            shutdown_tx,
            public_url,
        })
    }

    /// Where HTTP is served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The URL others reach the node at.
    pub fn public_url(&self) -> &str {
        &self.public_url
    }

    /// Where WebRTC UDP is served.
    pub fn udp_addr(&self) -> SocketAddr {
        self.shard.local_addr()
    }

    /// Serves until `shutdown` resolves, then stops the shard and leaves the
    /// cluster.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Node {
            http_listener,
            shard,
            shard_thread,
            agent,
            state,
            shutdown_tx,
            ..
        } = self;
        let agent_task = tokio::spawn(agent.run(shard, shutdown_tx.subscribe()));
        let app = http::router(state);
        let result = axum::serve(http_listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .context("HTTP server failed");
        let _ = shutdown_tx.send(true);
        let _ = agent_task.await;
        let _ = tokio::task::spawn_blocking(move || shard_thread.join()).await;
        result
    }
}
