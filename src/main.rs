//! `weir`: the one binary users run. `weir dev` runs everything on one
//! machine; `weir node` and `weir control` run the planes apart; `weir ctl`
//! is the operator CLI; `weir loadtest` generates load.

mod observability;
mod profile;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use weir_control_plane::{ControlConfig, ControlState, LocalCoordinator, TokenIssuer};
use weir_data_plane::{Node, NodeConfig, RelayConfig};
use weir_protocol::bus::{Retention, RoomBus};
use weir_protocol::coordinator::Coordinator;
use weir_protocol::stats::NodeSecret;
use weir_protocol::{NodeId, TokenVerifier};

use crate::observability::LogFormat;

// Forwarding allocates and frees a buffer or two per datagram (str0m's
// packets, its NACK history): mimalloc's per-thread free lists keep that off
// glibc's chunk coalescing, which a shard profile put at ~10 % of its time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for invalid configuration or usage (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// How long `weir control` and `weir dev` wait for the business store at start.
const STORE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(name = "weir", version, about = "Weir: live streaming over WebRTC (WHIP/WHEP)", long_about = None)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "WEIR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane and one media node in one process, on embedded
    /// defaults (in-process coordinator, keys under --data-dir).
    Dev(DevArgs),
    /// Run a standalone media node (WHIP/WHEP over WebRTC).
    Node(Box<NodeArgs>),
    /// Run a standalone control plane (gRPC and its JSON gateway).
    Control(ControlArgs),
    /// Operator CLI: talk to a control plane over gRPC.
    Ctl(weir_control_plane::ctl::CtlArgs),
    /// Generate load against a node: WHEP viewers measuring join time,
    /// time to first frame and received media; `weir loadtest events`:
    /// room events WebSocket subscribers and chatters; `weir loadtest
    /// gifts`: concurrent gift senders against a control plane.
    Loadtest(weir_loadtest::LoadtestCommand),
}

/// How a node runs its media shards.
#[derive(Args, Clone, Copy)]
struct ShardArgs {
    /// Media shards (one thread and one UDP port each, ports consecutive
    /// from --udp); 0 means one per core.
    #[arg(long, env = "WEIR_SHARDS", default_value_t = 0)]
    shards: usize,
    /// UDP I/O backend: io_uring, epoll (recvmmsg/sendmmsg), or auto
    /// (io_uring unless the kernel refuses it; the choice is logged).
    #[arg(long, env = "WEIR_IO", default_value = "auto")]
    io: weir_data_plane::IoChoice,
    /// Send consecutive datagrams to one peer (a video frame's packets) as
    /// one GSO message (UDP_SEGMENT); turns itself off where the kernel
    /// refuses it. `false` sends every datagram on its own.
    #[arg(long, env = "WEIR_UDP_GSO", default_value_t = true, action = clap::ArgAction::Set)]
    udp_gso: bool,
    /// Viewers a room's home shard takes before further viewers go to the
    /// least loaded shard, fed from the home shard in memory (0: never).
    #[arg(long, env = "WEIR_SHARD_SPILL", default_value_t = 500)]
    shard_spill: usize,
}

/// How a drained node (`weir ctl nodes drain`) sends its WebRTC viewers
/// to other nodes.
#[derive(Args, Clone, Copy)]
struct DrainArgs {
    /// Viewers a drained node ends per --drain-interval-ms; each asks the
    /// control plane again and moves to another node. Viewers of rooms
    /// published on the node move too: their new node pulls the room from
    /// this one over the relay (--relay); publishers stay.
    #[arg(long, env = "WEIR_DRAIN_BATCH", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    drain_batch: u64,
    /// Milliseconds between two batches of viewers of a drained node.
    #[arg(long, env = "WEIR_DRAIN_INTERVAL_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    drain_interval_ms: u64,
    /// Milliseconds a drained node waits before its first batch (load
    /// balancers and the scheduler notice the drain meanwhile).
    #[arg(long, env = "WEIR_DRAIN_GRACE_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    drain_grace_ms: u64,
}

impl DrainArgs {
    fn pace(&self) -> weir_data_plane::DrainPace {
        weir_data_plane::DrainPace {
            batch: usize::try_from(self.drain_batch).unwrap_or(usize::MAX),
            interval: Duration::from_millis(self.drain_interval_ms),
            grace: Duration::from_millis(self.drain_grace_ms),
        }
    }
}

/// HLS, transcoding and snapshots of SRT-published rooms.
#[derive(Args, Clone)]
struct MediaArgs {
    /// HLS target segment duration in seconds (segments are cut on
    /// keyframes); 0 switches HLS off. Segments live under --data-dir/hls.
    #[arg(long, env = "WEIR_HLS_SEGMENT", default_value_t = 2.0)]
    hls_segment: f64,
    /// Default transcoding ladder of SRT rooms: `source,720p,480p@1000,360p`
    /// (HEIGHTp, optionally @KBPS); `off` switches transcoding off.
    #[arg(long, env = "WEIR_LADDER", default_value = "source,480p,360p")]
    ladder: String,
    /// A room's own ladder, `ROOM=LADDER` (e.g. `show=source,720p,360p`,
    /// `quiet=off`); may be repeated.
    #[arg(long = "room-ladder", value_name = "ROOM=LADDER")]
    room_ladders: Vec<String>,
    /// Seconds between snapshots (`/rooms/{room}/snapshot.jpg`); 0 switches them off.
    #[arg(long, env = "WEIR_SNAPSHOT_INTERVAL", default_value_t = 5.0)]
    snapshot_interval: f64,
    /// Ladder encoder: auto (NVENC when a usable NVIDIA GPU is there, else
    /// libx264), nvenc, or x264.
    #[arg(long, env = "WEIR_ENCODER", default_value = "auto")]
    encoder: weir_data_plane::EncoderChoice,
    /// SRT receive latency in milliseconds (the larger of the caller's and
    /// this one applies).
    #[arg(long, env = "WEIR_SRT_LATENCY_MS", default_value_t = 120)]
    srt_latency_ms: u64,
    /// Test only: the transcoder sleeps this long per frame.
    #[arg(long, hide = true, default_value_t = 0)]
    transcode_test_delay_ms: u64,
}

/// Room events (danmaku, likes, gifts) on the room bus.
#[derive(Args)]
struct RoomBusArgs {
    /// Events kept per room: the bus's retention and what a node holds for
    /// clients that reconnect (`since=`); older ones cannot be recovered.
    #[arg(long, env = "WEIR_ROOM_HISTORY", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    room_history: u64,
    /// Age in seconds after which a room event is no longer kept.
    #[arg(long, env = "WEIR_ROOM_HISTORY_AGE", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    room_history_age: u64,
    /// Seconds between the node's batches of like totals to the control
    /// plane (one call for all its rooms; needs --node-secret on `weir node`).
    /// Likes on the bus but not yet in a batch are what a room loses when
    /// every node carrying it dies and nobody reopens it within retention.
    #[arg(long, env = "WEIR_LIKES_PERSIST_EVERY", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    likes_persist_every: u64,
}

impl RoomBusArgs {
    fn retention(&self) -> Retention {
        Retention {
            max_per_room: self.room_history,
            max_age_s: self.room_history_age,
            ..Retention::default()
        }
    }

    fn hub(&self) -> weir_data_plane::bus::HubConfig {
        weir_data_plane::bus::HubConfig {
            history: usize::try_from(self.room_history).unwrap_or(usize::MAX),
            likes_persist_every: Duration::from_secs(self.likes_persist_every),
            ..Default::default()
        }
    }
}

#[derive(Args)]
struct DevArgs {
    #[command(flatten)]
    media: ShardArgs,
    #[command(flatten)]
    drain: DrainArgs,
    #[command(flatten)]
    av: MediaArgs,
    #[command(flatten)]
    room_bus: RoomBusArgs,
    /// Node HTTP listen address (WHIP, WHEP, pages, metrics).
    #[arg(long, env = "WEIR_HTTP", default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Control-plane listen address (gRPC and JSON gateway).
    #[arg(long, env = "WEIR_GRPC", default_value = "127.0.0.1:7000")]
    grpc: SocketAddr,
    /// WebRTC UDP listen address (also the ICE candidate offered).
    #[arg(long, env = "WEIR_UDP", default_value = "127.0.0.1:7100")]
    udp: SocketAddr,
    /// Where keys, the SQLite business store (`weir.db`) and HLS segments live.
    #[arg(long, env = "WEIR_DATA_DIR", default_value = "weir-data")]
    data_dir: PathBuf,
    /// Room used in the printed page URLs.
    #[arg(long, env = "WEIR_ROOM", default_value = "demo")]
    room: String,
    /// SRT listen address (MPEG-TS publishers: OBS, ffmpeg).
    #[arg(long, env = "WEIR_SRT", default_value = "127.0.0.1:9000")]
    srt: SocketAddr,
    /// SRT passphrase callers must encrypt with (10 to 79 characters); none by default.
    #[arg(long, env = "WEIR_SRT_PASSPHRASE")]
    srt_passphrase: Option<String>,
}

#[derive(Args)]
struct NodeArgs {
    #[command(flatten)]
    media: ShardArgs,
    #[command(flatten)]
    drain: DrainArgs,
    #[command(flatten)]
    av: MediaArgs,
    #[command(flatten)]
    room_bus: RoomBusArgs,
    /// NATS server URLs (`nats://HOST:PORT[,...]`) of the JetStream room bus
    /// every node and control plane of the cluster shares. Without it the
    /// node's rooms run on an in-process bus of its own (clients on other
    /// nodes do not see them).
    #[arg(long, env = "WEIR_NATS", value_name = "URL[,URL...]")]
    nats: Option<String>,
    /// Where HLS segments live (`DIR/hls`, cleared at start).
    #[arg(long, env = "WEIR_DATA_DIR", default_value = "weir-data")]
    data_dir: PathBuf,
    /// HTTP listen address.
    #[arg(long, env = "WEIR_HTTP", default_value = "0.0.0.0:8080")]
    http: SocketAddr,
    /// WebRTC UDP listen address.
    #[arg(long, env = "WEIR_UDP", default_value = "0.0.0.0:7100")]
    udp: SocketAddr,
    /// Address peers reach this node's UDP port at (required when --udp binds a wildcard).
    #[arg(long, env = "WEIR_PUBLIC_IP")]
    public_ip: Option<IpAddr>,
    /// QUIC media relay listen address (UDP). Other nodes pull the rooms
    /// published here from it, and this node pulls from theirs when its
    /// viewers watch a room published elsewhere. Advertised to the cluster
    /// as --public-ip (or the bound address) with this port. Keep it on a
    /// private network: certificates are self-signed and not verified
    /// (with --node-secret only nodes of the cluster may pull). Default:
    /// the address --udp binds, port 7400.
    #[arg(long, env = "WEIR_RELAY")]
    relay: Option<SocketAddr>,
    /// How long this node keeps pulling a room from its origin after the
    /// room's last viewer here left (milliseconds).
    #[arg(long, env = "WEIR_RELAY_IDLE_GRACE_MS", default_value_t = 5000)]
    relay_idle_grace_ms: u64,
    /// Base URL of this node's HTTP surface as clients see it.
    #[arg(long, env = "WEIR_PUBLIC_URL")]
    public_url: Option<String>,
    /// Node id (letters, digits, '-', '_', '.').
    #[arg(long, env = "WEIR_NODE_ID", default_value = "node-1")]
    node_id: String,
    #[arg(long, env = "WEIR_REGION", default_value = "local")]
    region: String,
    #[arg(long, env = "WEIR_ZONE", default_value = "local-a")]
    zone: String,
    /// Most sessions this node should carry.
    #[arg(long, env = "WEIR_CAPACITY", default_value_t = 1000)]
    capacity: u32,
    /// The version this node reports for rollout weights (`weir ctl
    /// rollout`), e.g. `green` or `1.4.0-rc1`; default: the binary's version.
    #[arg(long, env = "WEIR_NODE_VERSION", value_name = "VERSION")]
    node_version: Option<String>,
    /// Control-plane URL the web pages use.
    #[arg(
        long,
        env = "WEIR_CONTROL_URL",
        default_value = "http://127.0.0.1:7000"
    )]
    control_url: String,
    /// Public key that verifies tokens (base64url, as `weir control` prints it).
    /// (A key may start with '-'; it is still taken as the value.)
    #[arg(long, env = "WEIR_TOKEN_PUBLIC_KEY", allow_hyphen_values = true)]
    token_public_key: String,
    /// The cluster's node secret (16 to 256 visible ASCII characters; the
    /// same as `weir control --node-secret`): with it the node persists its
    /// rooms' like totals through the control plane at --control-url every
    /// --likes-persist-every seconds. Without it they live on the bus only.
    #[arg(
        long,
        env = "WEIR_NODE_SECRET",
        allow_hyphen_values = true,
        hide_env_values = true
    )]
    node_secret: Option<String>,
    /// SRT listen address (MPEG-TS publishers: OBS, ffmpeg).
    #[arg(long, env = "WEIR_SRT", default_value = "0.0.0.0:9000")]
    srt: SocketAddr,
    /// SRT passphrase callers must encrypt with (10 to 79 characters); none by default.
    #[arg(long, env = "WEIR_SRT_PASSPHRASE")]
    srt_passphrase: Option<String>,
    /// etcd client URLs (`URL[,URL...]`, e.g. http://10.0.0.1:2379,http://10.0.0.2:2379):
    /// the node registers there under a 5 s lease, reports its load every
    /// second and claims room origins, so `weir control` processes using the
    /// same etcd schedule onto it. Without it the node keeps a registry of
    /// its own and forms no cluster.
    #[arg(long, env = "WEIR_ETCD", value_name = "URL[,URL...]")]
    etcd: Option<String>,
}

#[derive(Args)]
struct ControlArgs {
    /// gRPC and JSON gateway listen address.
    #[arg(long, env = "WEIR_GRPC", default_value = "0.0.0.0:7000")]
    grpc: SocketAddr,
    /// Where the token signing key lives (created on first start), and the
    /// SQLite business store when --database is not given.
    #[arg(long, env = "WEIR_DATA_DIR", default_value = "weir-data")]
    data_dir: PathBuf,
    /// Hand out arbitrary tokens through MintToken (for testing only).
    #[arg(long, env = "WEIR_ALLOW_TOKEN_MINTING")]
    allow_token_minting: bool,
    /// The user who owns the rooms the store does not know (subject of their
    /// publish tokens); a stored room's publish tokens carry its owner.
    #[arg(long, env = "WEIR_DEFAULT_OWNER", default_value = "owner")]
    default_owner: String,
    /// Business store (users, rooms, follows, wallets, gifts): `postgres://USER:PASSWORD@HOST:PORT/DB`
    /// for clusters (every replica uses the same one), or `sqlite://PATH`.
    /// Default: the SQLite file `weir.db` under --data-dir.
    #[arg(long, env = "WEIR_DATABASE", value_name = "URL")]
    database: Option<String>,
    /// etcd client URLs (`URL[,URL...]`, e.g. http://10.0.0.1:2379,http://10.0.0.2:2379):
    /// the nodes and rooms to schedule are read from there (the nodes
    /// register with the same `--etcd`); several control planes may share it.
    /// Without it this control plane sees only an empty registry of its own.
    #[arg(long, env = "WEIR_ETCD", value_name = "URL[,URL...]")]
    etcd: Option<String>,
    /// Room bus: NATS JetStream client URLs (`URL[,URL...]`, e.g.
    /// nats://10.0.0.1:4222,nats://10.0.0.2:4222), the servers the nodes use.
    /// The elected replica's outbox relay publishes paid gifts' events there.
    /// Without it gifts are still paid, and their events wait in the outbox.
    #[arg(long, env = "WEIR_NATS", value_name = "URL[,URL...]")]
    nats: Option<String>,
    /// Allow Wallet.Grant, which credits users from the mint (for operators
    /// and testing; anyone who reaches the gRPC port can call it).
    #[arg(long, env = "WEIR_ALLOW_GRANTS")]
    allow_grants: bool,
    /// The cluster's node secret (16 to 256 visible ASCII characters): nodes
    /// started with the same `--node-secret` persist rooms' like totals here
    /// (`POST /v1/room-stats/likes`). Without it that call is refused.
    #[arg(
        long,
        env = "WEIR_NODE_SECRET",
        allow_hyphen_values = true,
        hide_env_values = true
    )]
    node_secret: Option<String>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; bad usage exits 64.
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    observability::init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weir: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Dev(a) => dev(a).await.map(|()| 0),
            Command::Node(a) => node(*a).await.map(|()| 0),
            Command::Control(a) => control(a).await.map(|()| 0),
            Command::Ctl(a) => weir_control_plane::ctl::run(a).await,
            Command::Loadtest(a) => weir_loadtest::run_command(a).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "weir failed");
            eprintln!("weir: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Invalid configuration: reported before any port is bound, exit 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ConfigError(String);

fn config_error(e: impl std::fmt::Display) -> anyhow::Error {
    ConfigError(e.to_string()).into()
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

async fn dev(a: DevArgs) -> anyhow::Result<()> {
    let room =
        weir_protocol::RoomId::parse(&a.room).map_err(|e| config_error(format!("--room: {e}")))?;
    weir_data_plane::install_crypto_provider();
    let render = observability::init_metrics()?;
    let issuer = TokenIssuer::load_or_create(&weir_control_plane::tokens::key_path(&a.data_dir))
        .with_context(|| {
            format!(
                "cannot prepare the token key under {}",
                a.data_dir.display()
            )
        })?;
    let verifier = issuer.verifier();
    let local = Arc::new(LocalCoordinator::new());
    let coordinator: Arc<dyn Coordinator> = local.clone();
    // One in-process room bus for the node (room events) and the control
    // plane (gift events from its outbox relay).
    let room_bus: Arc<dyn RoomBus> =
        Arc::new(weir_data_plane::bus::LocalBus::new(a.room_bus.retention()));
    // The node persists like totals through the control plane beside it.
    let node_secret = NodeSecret::generate();
    let control = ControlState::new(
        coordinator.clone(),
        issuer,
        ControlConfig {
            default_owner: "dev".into(),
            allow_token_minting: true,
            allow_grants: true,
            node_secret: Some(node_secret.clone()),
            ..ControlConfig::default()
        },
    )
    .map_err(config_error)?
    .with_store(
        weir_control_plane::store::Store::connect(
            &weir_control_plane::store::sqlite_url(
                &a.data_dir.join(weir_control_plane::store::SQLITE_FILE),
            ),
            STORE_CONNECT_TIMEOUT,
        )
        .await
        .context("cannot open the business store")?,
    )
    .with_bus(room_bus.clone());
    let grpc = tokio::net::TcpListener::bind(a.grpc)
        .await
        .with_context(|| format!("cannot listen for the control plane on {}", a.grpc))?;
    let control_addr = grpc.local_addr()?;
    let node = Node::bind(
        NodeConfig {
            node_id: NodeId::parse("dev").map_err(config_error)?,
            region: "local".into(),
            zone: "local-a".into(),
            http: a.http,
            udp: a.udp,
            public_ip: None,
            public_url: None,
            control_url: format!("http://{control_addr}"),
            capacity: 1000,
            version: None,
            shards: a.media.shards,
            io: a.media.io,
            udp_gso: a.media.udp_gso,
            shard_spill: a.media.shard_spill,
            srt: Some(srt_config(a.srt, a.srt_passphrase.clone(), &a.av)?),
            media: media_config(&a.av, &a.data_dir)?,
            room_bus: Some(room_bus),
            hub: a.room_bus.hub(),
            drain: a.drain.pace(),
            node_secret: Some(node_secret),
            // One node: nobody to relay to or from.
            relay: None,
        },
        coordinator,
        verifier,
        render.clone(),
    )
    .await?;
    let node = node.with_routes(profile::routes());
    let http = node.public_url().to_owned();
    println!("Weir dev is running: control plane and one media node in this process.");
    println!("publish page  {http}/publish/{room}");
    println!("play page     {http}/play/{room}");
    println!("WHIP          {http}/whip/{{room}}");
    println!("WHEP          {http}/whep/{{room}}");
    if a.av.hls_segment > 0.0 {
        println!("HLS           {http}/hls/{{room}}/master.m3u8");
    }
    println!("snapshot      {http}/rooms/{{room}}/snapshot.jpg");
    println!("room events   {http}/rooms/{{room}}/events?token={{token}}  (WebSocket)");
    println!("control API   http://{control_addr}  (gRPC; JSON under /v1/)");
    println!("metrics       {http}/metrics");
    println!("control stats http://{control_addr}/metrics");
    println!("WebRTC UDP    {}", node.udp_addr());
    println!(
        "media shards  {} on {} I/O, UDP {}",
        node.udp_addrs().len(),
        node.io_backend().as_str(),
        node.udp_addrs()
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let Some(srt) = node.srt_addr() {
        println!("SRT publish   srt://{srt}?streamid=#!::r={room},m=publish,t={{token}}");
    }
    println!("Press Ctrl-C to stop.");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    // The singleton workers (live sync, CDN prober) run here too: the only
    // candidate leads at once.
    let control = Arc::new(control);
    let leadership = weir_control_plane::election::campaign(
        local,
        weir_control_plane::election::CONTROL_ELECTION,
        "dev",
        weir_control_plane::election::DEFAULT_TTL,
    );
    let workers = tokio::spawn(weir_control_plane::workers::run(
        Arc::clone(&control),
        leadership.changes(),
    ));
    let control_task = tokio::spawn(weir_control_plane::serve_with(
        grpc,
        control,
        render,
        profile::routes(),
        wait(stop_rx.clone()),
    ));
    let node_task = tokio::spawn(node.serve(wait(stop_rx)));
    shutdown_signal().await;
    let _ = stop_tx.send(true);
    let stopped = tokio::time::timeout(Duration::from_secs(10), async {
        let n = node_task.await;
        let c = control_task.await;
        (n, c)
    })
    .await;
    match stopped {
        Ok((Ok(n), Ok(c))) => {
            n?;
            c?;
        }
        Ok(_) => anyhow::bail!("a server task panicked"),
        Err(_) => anyhow::bail!("did not stop within 10 s"),
    }
    workers.abort();
    leadership.resign().await;
    println!("Weir dev stopped.");
    Ok(())
}

async fn node(a: NodeArgs) -> anyhow::Result<()> {
    let node_id = NodeId::parse(&a.node_id).map_err(|e| config_error(format!("--node-id: {e}")))?;
    let verifier = TokenVerifier::from_base64(&a.token_public_key)
        .map_err(|e| config_error(format!("--token-public-key: {e}")))?;
    let node_secret = a
        .node_secret
        .as_deref()
        .map(NodeSecret::parse)
        .transpose()
        .map_err(|e| config_error(format!("--node-secret: {e}")))?;
    if let Some(v) = a.node_version.as_deref()
        && !weir_control_plane::rollout::valid_version(v)
    {
        return Err(config_error(format!(
            "--node-version {v:?}: 1 to 64 of A-Z a-z 0-9 . _ + -"
        )));
    }
    // etcd when --etcd is given (connected lazily: an etcd that is down now
    // is no reason not to serve; the agent keeps trying), else a registry of
    // the node's own.
    let coordinator = weir_control_plane::coordinator::from_flag(a.etcd.as_deref())
        .map_err(|e| config_error(format!("--etcd: {e}")))?;
    // JetStream when --nats is given (the client keeps trying while no
    // server answers; rooms run degraded meanwhile), else in-process.
    let room_bus: Option<Arc<dyn RoomBus>> = match a.nats.as_deref() {
        Some(urls) => Some(Arc::new(
            weir_data_plane::bus::NatsBus::connect(urls, a.room_bus.retention())
                .await
                .map_err(|e| config_error(format!("--nats: {e}")))?,
        )),
        None => None,
    };
    weir_data_plane::install_crypto_provider();
    let render = observability::init_metrics()?;
    let node = Node::bind(
        NodeConfig {
            node_id,
            region: a.region,
            zone: a.zone,
            http: a.http,
            udp: a.udp,
            public_ip: a.public_ip,
            public_url: a.public_url,
            control_url: a.control_url,
            capacity: a.capacity,
            version: a.node_version,
            shards: a.media.shards,
            io: a.media.io,
            udp_gso: a.media.udp_gso,
            shard_spill: a.media.shard_spill,
            srt: Some(srt_config(a.srt, a.srt_passphrase.clone(), &a.av)?),
            media: media_config(&a.av, &a.data_dir)?,
            room_bus,
            hub: a.room_bus.hub(),
            drain: a.drain.pace(),
            node_secret: node_secret.clone(),
            relay: Some(RelayConfig {
                listen: a.relay.unwrap_or(SocketAddr::new(a.udp.ip(), 7400)),
                advertise: None,
                idle_grace: Duration::from_millis(a.relay_idle_grace_ms),
                secret: node_secret,
            }),
        },
        coordinator,
        verifier,
        render,
    )
    .await?;
    let node = node.with_routes(profile::routes());
    println!("{}/whip/{{room}}", node.public_url());
    println!("{}/whep/{{room}}", node.public_url());
    if a.av.hls_segment > 0.0 {
        println!("{}/hls/{{room}}/master.m3u8", node.public_url());
    }
    println!("{}/rooms/{{room}}/snapshot.jpg", node.public_url());
    println!("{}/rooms/{{room}}/events", node.public_url());
    println!("{}/metrics", node.public_url());
    if let Some(srt) = node.srt_addr() {
        println!("srt://{srt}?streamid=#!::r={{room}},m=publish,t={{token}}");
    }
    if let Some(relay) = node.relay_addr() {
        // The media relay between nodes (QUIC).
        println!("quic://{relay}");
    }
    node.serve(shutdown_signal()).await
}

async fn control(a: ControlArgs) -> anyhow::Result<()> {
    // etcd when --etcd is given (connected lazily: while etcd is unreachable
    // assignments are answered from the last view), else an empty registry.
    let (coordinator, elections) =
        weir_control_plane::coordinator::with_election_from_flag(a.etcd.as_deref())
            .map_err(|e| config_error(format!("--etcd: {e}")))?;
    if let Some(url) = a.database.as_deref() {
        weir_control_plane::store::database_url(Some(url), &a.data_dir)
            .map_err(|e| config_error(format!("--database: {e}")))?;
    }
    if let Some(urls) = a.nats.as_deref() {
        weir_control_plane::bus::parse_urls(urls)
            .map_err(|e| config_error(format!("--nats: {e}")))?;
    }
    let render = observability::init_metrics()?;
    let issuer = TokenIssuer::load_or_create(&weir_control_plane::tokens::key_path(&a.data_dir))
        .with_context(|| {
            format!(
                "cannot prepare the token key under {}",
                a.data_dir.display()
            )
        })?;
    let public_key = issuer.verifier().to_base64();
    let state = ControlState::new(
        coordinator,
        issuer,
        ControlConfig {
            default_owner: a.default_owner,
            allow_token_minting: a.allow_token_minting,
            allow_grants: a.allow_grants,
            node_secret: a
                .node_secret
                .as_deref()
                .map(NodeSecret::parse)
                .transpose()
                .map_err(|e| config_error(format!("--node-secret: {e}")))?,
            ..ControlConfig::default()
        },
    )
    .map_err(config_error)?;
    let database = weir_control_plane::store::database_url(a.database.as_deref(), &a.data_dir)
        .map_err(|e| config_error(format!("--database: {e}")))?;
    if a.etcd.is_some() && a.database.is_none() {
        tracing::warn!(
            "--etcd without --database: this replica keeps users, rooms and follows in its own \
             SQLite file; give every replica the same --database postgres://… to share them"
        );
    }
    let store = weir_control_plane::store::Store::connect(&database, STORE_CONNECT_TIMEOUT)
        .await
        .context("cannot open the business store")?;
    let mut state = state.with_store(store);
    if let Some(urls) = a.nats.as_deref() {
        // Connects in the background: the broker may come up after us.
        let bus = weir_control_plane::bus::NatsPublisher::connect(
            urls,
            weir_protocol::bus::Retention::default(),
        )
        .await
        .context("cannot start the room bus client")?;
        state = state.with_bus(Arc::new(bus));
    }
    let listener = tokio::net::TcpListener::bind(a.grpc)
        .await
        .with_context(|| format!("cannot listen on {}", a.grpc))?;
    let addr = listener.local_addr()?;
    println!("http://{addr}");
    println!("token public key (give it to nodes as --token-public-key): {public_key}");
    // One replica of all leads the singleton workers (`weir_election_leader`).
    let candidate = format!(
        "{}@{addr}",
        weir_control_plane::election::default_candidate_id()
    );
    let leadership = weir_control_plane::election::campaign(
        elections,
        weir_control_plane::election::CONTROL_ELECTION,
        &candidate,
        weir_control_plane::election::DEFAULT_TTL,
    );
    let state = Arc::new(state);
    let workers = tokio::spawn(weir_control_plane::workers::run(
        Arc::clone(&state),
        leadership.changes(),
    ));
    let served = weir_control_plane::serve_with(
        listener,
        state,
        render,
        profile::routes(),
        shutdown_signal(),
    )
    .await;
    workers.abort();
    leadership.resign().await;
    served
}

/// The SRT listener's settings, checked before anything is bound.
fn srt_config(
    listen: SocketAddr,
    passphrase: Option<String>,
    media: &MediaArgs,
) -> anyhow::Result<weir_data_plane::SrtConfig> {
    let mut c = weir_data_plane::SrtConfig::new(listen);
    c.passphrase = passphrase;
    if !(10..=10_000).contains(&media.srt_latency_ms) {
        return Err(config_error("--srt-latency-ms must be 10 to 10000"));
    }
    c.latency = Duration::from_millis(media.srt_latency_ms);
    c.validate().map_err(config_error)?;
    Ok(c)
}

/// HLS, ladder and snapshot settings, checked before anything is bound.
fn media_config(
    a: &MediaArgs,
    data_dir: &std::path::Path,
) -> anyhow::Result<weir_data_plane::MediaConfig> {
    use weir_data_plane::Ladder;
    let hls = match a.hls_segment {
        0.0 => None,
        s if (1.0..=10.0).contains(&s) => {
            let mut c = weir_data_plane::hls::HlsConfig::new(data_dir.join("hls"));
            c.segment = s;
            c.max_segment = (s * 4.0).max(8.0);
            Some(c)
        }
        s => {
            return Err(config_error(format!(
                "--hls-segment {s}: 1 to 10 seconds, or 0 for no HLS"
            )));
        }
    };
    let ladder = Ladder::parse(&a.ladder).map_err(|e| config_error(format!("--ladder: {e}")))?;
    let mut room_ladders = std::collections::HashMap::new();
    for r in &a.room_ladders {
        let (room, l) =
            Ladder::parse_room(r).map_err(|e| config_error(format!("--room-ladder: {e}")))?;
        room_ladders.insert(room, l);
    }
    let snapshot_interval = match a.snapshot_interval {
        0.0 => None,
        s if (0.5..=3600.0).contains(&s) => Some(Duration::from_secs_f64(s)),
        s => {
            return Err(config_error(format!(
                "--snapshot-interval {s}: 0.5 to 3600 seconds, or 0 for none"
            )));
        }
    };
    Ok(weir_data_plane::MediaConfig {
        hls,
        ladder,
        room_ladders,
        snapshot_interval,
        encoder: a.encoder,
        test_delay: Duration::from_millis(a.transcode_test_delay_ms),
    })
}
