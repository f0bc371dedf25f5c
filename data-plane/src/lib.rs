//! Weir's media node: the UDP shard running the sans-IO SFU, the HTTP
//! surface (WHIP, WHEP, HLS, pages, metrics, health), SRT ingest with its
//! HLS packager, transcoder and snapshots, the room bus (danmaku, likes,
//! gifts over WebSocket), and the agent that keeps the node registered with
//! the coordinator.

mod agent;
pub mod bus;
mod drain;
pub mod hls;
mod http;
pub mod ingest;
mod pages;
mod qoe;
mod relay;
mod shard;
pub mod transcode;
pub mod udp;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;

/// Pending connections the HTTP listener queues before the kernel drops
/// SYNs. `TcpListener::bind` asks for 128 (libc's SOMAXCONN constant): a
/// mass reconnect of room events clients overflowed it (bench/RESULTS.md,
/// issue 8), and every dropped SYN costs its client a 1 s retransmission.
/// The kernel caps it at `net.core.somaxconn`.
pub const HTTP_BACKLOG: u32 = 4096;

/// The node's HTTP listener, with [`HTTP_BACKLOG`].
fn bind_http(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(HTTP_BACKLOG)
}
use tokio::sync::watch;
use weir_protocol::NodeId;
use weir_protocol::TokenVerifier;
use weir_protocol::bus::{Retention, RoomBus};
use weir_protocol::coordinator::{Coordinator, NodeInfo, NodeLoad};

pub use drain::DrainPace;
pub use http::{MAX_SDP_BYTES, RenderMetrics};
pub use ingest::SrtConfig;
pub use relay::RelayConfig;
pub use shard::{MovedBatch, Shard, ShardGone, ShardHandle, ShardStats};
pub use transcode::{EncoderChoice, Ladder, MediaConfig};
pub use udp::{Backend as IoBackend, IoChoice};
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
    /// The version the node reports for rollout weights; `None`: the
    /// crate's version.
    pub version: Option<String>,
    /// Number of shards (one thread and UDP port each); 0 = one per core.
    pub shards: usize,
    /// UDP I/O backend of the shards.
    pub io: IoChoice,
    /// Consecutive datagrams to one peer leave as one GSO message.
    pub udp_gso: bool,
    /// Viewers a room's home shard takes before further viewers of its rooms
    /// go to the least loaded shard, fed over in-memory queues (0: never).
    pub shard_spill: usize,
    /// SRT ingest listener; `None` runs the node without one.
    pub srt: Option<SrtConfig>,
    /// HLS, transcoding ladder and snapshots of SRT-published rooms.
    pub media: MediaConfig,
    /// The room bus (JetStream in clusters); `None`: an in-process one.
    pub room_bus: Option<Arc<dyn RoomBus>>,
    /// Settings of the node's room feeds.
    pub hub: bus::HubConfig,
    /// How fast a drained node sends its WebRTC viewers elsewhere.
    pub drain: DrainPace,
    /// The cluster's node secret: with it the node persists its rooms' like
    /// totals through the control plane (`POST /v1/room-stats/likes`);
    /// without it totals live on the bus only (up to its retention).
    pub node_secret: Option<weir_protocol::stats::NodeSecret>,
    /// The QUIC media relay between nodes; `None`: the node neither pulls
    /// rooms published elsewhere nor serves its own to other nodes (a
    /// single-node setup).
    pub relay: Option<RelayConfig>,
}

/// A node whose sockets are bound, ready to serve.
pub struct Node {
    http_listener: tokio::net::TcpListener,
    http_addr: SocketAddr,
    shard: shard::ShardHandle,
    shard_threads: Vec<std::thread::JoinHandle<()>>,
    shard_stop: shard::ShardStop,
    srt: Option<ingest::SrtIngest>,
    agent: Arc<agent::Agent>,
    state: http::AppState,
    shutdown_tx: watch::Sender<bool>,
    public_url: String,
    hub: Arc<bus::Hub>,
    /// The control plane (asked who follows a streamer that went live).
    control_url: String,
    node_secret: Option<weir_protocol::stats::NodeSecret>,
    /// Tells WebSocket clients to leave (axum's graceful shutdown does not
    /// wait for upgraded connections).
    events_stop: watch::Sender<bool>,
    drain: DrainPace,
    relay: Option<Arc<relay::Relay>>,
    /// Routes the binary adds (the process's profiler).
    extra_routes: Option<axum::Router>,
}

impl Node {
    /// Binds the HTTP and UDP sockets and starts the shard.
    pub async fn bind(
        config: NodeConfig,
        coordinator: Arc<dyn Coordinator>,
        verifier: TokenVerifier,
        render_metrics: RenderMetrics,
    ) -> anyhow::Result<Self> {
        let http_listener = bind_http(config.http)
            .with_context(|| format!("cannot listen for HTTP on {}", config.http))?;
        let http_addr = http_listener.local_addr()?;
        let srt = match config.srt.clone() {
            Some(c) => {
                let listen = c.listen;
                Some(
                    ingest::SrtIngest::bind(c)
                        .await
                        .with_context(|| format!("cannot listen for SRT on {listen}"))?,
                )
            }
            None => None,
        };
        let count = match config.shards {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        };
        let (shutdown_tx, _) = watch::channel(false);
        let shard_stop = shard::ShardStop::default();
        let peers = shard::Peers::default();
        let channels = shard::ChannelSinkSlot::default();
        let upstream = shard::Upstream::default();
        let mut shards = Vec::with_capacity(count);
        let mut shard_threads = Vec::with_capacity(count);
        for i in 0..count {
            // One UDP port per shard: consecutive from --udp, or any free one
            // each when --udp names port 0.
            let mut addr = config.udp;
            if addr.port() != 0 {
                let port = u16::try_from(usize::from(addr.port()) + i).map_err(|_| {
                    anyhow::anyhow!("--udp port range for {count} shards passes 65535")
                })?;
                addr.set_port(port);
            }
            let udp = std::net::UdpSocket::bind(addr)
                .with_context(|| format!("cannot bind WebRTC UDP on {addr}"))?;
            let udp_addr = udp.local_addr()?;
            let candidate_ip = match (config.public_ip, udp_addr.ip()) {
                (Some(ip), _) => ip,
                (None, ip) if ip.is_unspecified() => anyhow::bail!(
                    "--udp binds {udp_addr}, a wildcard address: give --public-ip, the address peers reach this node at"
                ),
                (None, ip) => ip,
            };
            let (handle, thread) = shard::spawn(
                i,
                udp,
                SocketAddr::new(candidate_ip, udp_addr.port()),
                config.io,
                config.udp_gso,
                &shard_stop,
                &peers,
                &channels,
                &upstream,
            )
            .with_context(|| format!("cannot start media shard {i} ({:?} I/O)", config.io))?;
            shards.push(handle);
            shard_threads.push(thread);
        }
        let shard = shard::ShardHandle::new(shards, config.shard_spill, &peers, &upstream);
        tracing::info!(
            shards = count,
            io = shard.backend().as_str(),
            "media shards started"
        );
        let public_url = config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{http_addr}"));
        let relay = match &config.relay {
            Some(c) => {
                let mut c = c.clone();
                c.advertise = c.advertise.or(config.public_ip);
                let relay = relay::Relay::bind(
                    &c,
                    shard.clone(),
                    coordinator.clone(),
                    config.node_id.clone(),
                )?;
                tracing::info!(relay = %relay.advertised(), "media relay listening");
                Some(relay)
            }
            None => None,
        };
        let info = NodeInfo {
            id: config.node_id.clone(),
            region: config.region.clone(),
            zone: config.zone.clone(),
            http_url: public_url.clone(),
            relay_addr: relay.as_ref().map(|r| r.advertised().to_string()),
            version: config
                .version
                .clone()
                .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned()),
            capacity: config.capacity,
            draining: false,
            load: NodeLoad::default(),
        };
        let agent = Arc::new(agent::Agent::new(coordinator, info));
        if let Some(r) = &relay {
            agent.set_relay(r.clone());
        }
        let page_config = format!(
            "window.WEIR_CONFIG = {};\n",
            serde_json::json!({ "control_url": config.control_url })
        );
        let media = transcode::MediaHub::new(config.media.clone())
            .context("cannot prepare HLS under the data directory")?;
        let room_bus = config
            .room_bus
            .clone()
            .unwrap_or_else(|| Arc::new(bus::LocalBus::new(Retention::default())));
        let hub = bus::Hub::new(room_bus, config.node_id.to_string(), config.hub.clone());
        let (events_stop, events_stop_rx) = watch::channel(false);
        let verifier = Arc::new(verifier);
        let events = bus::ws::EventsState {
            hub: Arc::clone(&hub),
            verifier: Arc::clone(&verifier),
            stop: events_stop_rx,
            draining: agent.draining(),
        };
        let _ = channels.set(bus::dc::DataChannels::new(
            tokio::runtime::Handle::current(),
            Arc::clone(&hub),
            events.stop.clone(),
            events.draining.clone(),
        ));
        let state = http::AppState {
            shard: shard.clone(),
            verifier,
            events,
            agent: agent.clone(),
            render_metrics,
            page_config: page_config.into(),
            media,
            relay: relay.clone(),
        };
        Ok(Self {
            http_listener,
            http_addr,
            shard,
            shard_threads,
            shard_stop,
            srt,
            agent,
            state,
            shutdown_tx,
            public_url,
            hub,
            control_url: config.control_url.clone(),
            node_secret: config.node_secret.clone(),
            events_stop,
            drain: config.drain,
            relay,
            extra_routes: None,
        })
    }

    /// Serves `routes` beside the node's own (what belongs to the whole
    /// process rather than to the node, such as the CPU profiler).
    pub fn with_routes(mut self, routes: axum::Router) -> Self {
        self.extra_routes = Some(routes);
        self
    }

    /// The node's room feeds.
    pub fn hub(&self) -> &Arc<bus::Hub> {
        &self.hub
    }

    /// Where HTTP is served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The URL others reach the node at.
    pub fn public_url(&self) -> &str {
        &self.public_url
    }

    /// Where WebRTC UDP is served (the first shard's port).
    pub fn udp_addr(&self) -> SocketAddr {
        self.shard.local_addr()
    }

    /// Every shard's UDP address.
    pub fn udp_addrs(&self) -> Vec<SocketAddr> {
        self.shard.shards().iter().map(Shard::local_addr).collect()
    }

    /// The I/O backend the shards run.
    pub fn io_backend(&self) -> IoBackend {
        self.shard.backend()
    }

    /// Where other nodes reach the media relay, when the node runs one.
    pub fn relay_addr(&self) -> Option<SocketAddr> {
        self.relay.as_ref().map(|r| r.advertised())
    }

    /// Where SRT publishers connect, when the node listens for them.
    pub fn srt_addr(&self) -> Option<SocketAddr> {
        self.srt.as_ref().map(ingest::SrtIngest::local_addr)
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
            shard_threads,
            shard_stop,
            srt,
            agent,
            state,
            shutdown_tx,
            events_stop,
            hub,
            control_url,
            drain,
            node_secret,
            relay,
            extra_routes,
            ..
        } = self;
        let shutdown = async move {
            shutdown.await;
            let _ = events_stop.send(true);
        };
        let srt_task = srt.map(|srt| {
            let ctx = ingest::IngestContext {
                shard: shard.clone(),
                verifier: state.verifier.clone(),
                agent: agent.clone(),
                media: state.media.clone(),
            };
            tokio::spawn(srt.serve(ctx, shutdown_tx.subscribe()))
        });
        hub.set_follow_checker(Arc::new(bus::HttpFollowChecker::new(
            &control_url,
            node_secret.clone(),
        )));
        let notices_task = tokio::spawn(bus::notices::run(Arc::clone(&hub)));
        let likes_task = match node_secret {
            Some(secret) => Some(tokio::spawn(Arc::clone(&hub).persist_likes(
                Arc::new(bus::HttpLikeTotals::new(&control_url, secret)),
                shutdown_tx.subscribe(),
            ))),
            None => {
                tracing::warn!(
                    "no --node-secret: like totals are not persisted (they live on the bus, up to its retention)"
                );
                None
            }
        };
        let config_task = tokio::spawn(
            Arc::clone(&agent).watch_config(Arc::clone(&hub), shutdown_tx.subscribe()),
        );
        let drain_task = tokio::spawn(drain::run(
            shard.clone(),
            agent.draining(),
            drain,
            shutdown_tx.subscribe(),
        ));
        let relay_task = relay.map(|r| tokio::spawn(r.run(shutdown_tx.subscribe())));
        let agent_task = tokio::spawn(agent.run(shard, shutdown_tx.subscribe()));
        let mut app = http::router(state);
        if let Some(routes) = extra_routes {
            app = app.merge(routes);
        }
        let result = axum::serve(http_listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .context("HTTP server failed");
        let _ = shutdown_tx.send(true);
        if let Some(t) = likes_task {
            // The last batch, for the rooms the leaving clients closed.
            let _ = tokio::time::timeout(bus::likes::PERSIST_TIMEOUT * 2, t).await;
        }
        let _ = agent_task.await;
        let _ = config_task.await;
        let _ = drain_task.await;
        if let Some(t) = relay_task {
            let _ = t.await;
        }
        notices_task.abort();
        if let Some(t) = srt_task {
            let _ = t.await;
        }
        shard_stop.stop();
        let _ = tokio::task::spawn_blocking(move || {
            for t in shard_threads {
                let _ = t.join();
            }
        })
        .await;
        result
    }
}
