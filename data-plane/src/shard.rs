//! A shard: one UDP socket and one sans-IO [`Sfu`], driven by a loop on a
//! thread of its own (forwarding never shares threads with HTTP or control
//! work). Everything else talks to it through [`ShardHandle`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use weir_protocol::{RoomId, SessionId};
use weir_sfu::{
    Accepted, Counters, Event, Input, MediaFrame, Output, Role, RoomSummary, Sfu, SfuConfig,
    SfuError,
};

/// Largest datagram read; WebRTC stays under the path MTU, so 2 KiB is ample.
const RECV_BUF: usize = 2048;

/// What the HTTP surface asks of a shard.
enum Command {
    Publish {
        room: RoomId,
        owner: String,
        offer: String,
        reply: oneshot::Sender<Result<Accepted, SfuError>>,
    },
    Play {
        room: RoomId,
        owner: String,
        offer: String,
        reply: oneshot::Sender<Result<Accepted, SfuError>>,
    },
    Close {
        room: RoomId,
        session: SessionId,
        reply: oneshot::Sender<Result<Role, SfuError>>,
    },
    Trickle {
        room: RoomId,
        session: SessionId,
        sdpfrag: String,
        reply: oneshot::Sender<Result<usize, SfuError>>,
    },
    OpenSource {
        room: RoomId,
        owner: String,
        reply: oneshot::Sender<Result<(SessionId, Option<SessionId>), SfuError>>,
    },
    PushFrame {
        source: SessionId,
        frame: MediaFrame,
    },
}

/// What a shard carries, refreshed every second.
#[derive(Debug, Clone, Default)]
pub struct ShardStats {
    pub publishers: u32,
    pub subscribers: u32,
    pub rooms: Vec<RoomSummary>,
    pub counters: Counters,
    /// Egress in bits per second over the last interval.
    pub egress_bps: u64,
    /// When the loop last published these stats.
    pub updated: Option<Instant>,
}

/// The shard went away (the node is stopping).
#[derive(Debug, thiserror::Error)]
#[error("the media shard is not running")]
pub struct ShardGone;

/// A cheap handle to a running shard.
#[derive(Clone)]
pub struct ShardHandle {
    commands: mpsc::Sender<Command>,
    stats: Arc<Mutex<ShardStats>>,
    local_addr: SocketAddr,
}

impl ShardHandle {
    /// The shard's UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Latest stats.
    pub fn stats(&self) -> ShardStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub async fn publish(
        &self,
        room: RoomId,
        owner: String,
        offer: String,
    ) -> Result<Result<Accepted, SfuError>, ShardGone> {
        let (reply, rx) = oneshot::channel();
        self.send(
            Command::Publish {
                room,
                owner,
                offer,
                reply,
            },
            rx,
        )
        .await
    }

    pub async fn play(
        &self,
        room: RoomId,
        owner: String,
        offer: String,
    ) -> Result<Result<Accepted, SfuError>, ShardGone> {
        let (reply, rx) = oneshot::channel();
        self.send(
            Command::Play {
                room,
                owner,
                offer,
                reply,
            },
            rx,
        )
        .await
    }

    pub async fn close(
        &self,
        room: RoomId,
        session: SessionId,
    ) -> Result<Result<Role, SfuError>, ShardGone> {
        let (reply, rx) = oneshot::channel();
        self.send(
            Command::Close {
                room,
                session,
                reply,
            },
            rx,
        )
        .await
    }

    pub async fn trickle(
        &self,
        room: RoomId,
        session: SessionId,
        sdpfrag: String,
    ) -> Result<Result<usize, SfuError>, ShardGone> {
        let (reply, rx) = oneshot::channel();
        self.send(
            Command::Trickle {
                room,
                session,
                sdpfrag,
                reply,
            },
            rx,
        )
        .await
    }

    /// Opens a non-WebRTC publisher (SRT ingest) for `room`; same takeover
    /// rule as WHIP. Returns the source's session and the one it replaced.
    pub async fn open_source(
        &self,
        room: RoomId,
        owner: String,
    ) -> Result<Result<(SessionId, Option<SessionId>), SfuError>, ShardGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::OpenSource { room, owner, reply }, rx)
            .await
    }

    /// Hands a source's frame to the shard without waiting. When the shard's
    /// queue is full the frame is dropped and counted: ingest never blocks
    /// on forwarding, and forwarding never waits for ingest.
    pub fn push_frame(&self, source: SessionId, frame: MediaFrame) -> Result<(), ShardGone> {
        match self.commands.try_send(Command::PushFrame { source, frame }) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("weir_source_frames_dropped_total").increment(1);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(ShardGone),
        }
    }

    async fn send<T>(&self, cmd: Command, rx: oneshot::Receiver<T>) -> Result<T, ShardGone> {
        self.commands.send(cmd).await.map_err(|_| ShardGone)?;
        rx.await.map_err(|_| ShardGone)
    }
}

/// Binds the shard's socket and starts its thread. `candidate` is the address
/// offered to peers (the bound one unless the node is behind a public IP).
pub fn spawn(
    socket: std::net::UdpSocket,
    candidate: SocketAddr,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<(ShardHandle, std::thread::JoinHandle<()>)> {
    socket.set_nonblocking(true)?;
    let local_addr = socket.local_addr()?;
    let (tx, rx) = mpsc::channel(1024);
    let stats = Arc::new(Mutex::new(ShardStats::default()));
    let handle = ShardHandle {
        commands: tx,
        stats: stats.clone(),
        local_addr,
    };
    let thread = std::thread::Builder::new()
        .name("weir-shard-0".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the shard runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let socket = match UdpSocket::from_std(socket) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot register the shard socket");
                        return;
                    }
                };
                let config = SfuConfig {
                    local_addrs: vec![candidate],
                    ..SfuConfig::default()
                };
                let sfu = Sfu::new(config, Instant::now());
                run(socket, local_addr, sfu, rx, stats, shutdown).await;
            });
        })?;
    Ok((handle, thread))
}

async fn run(
    socket: UdpSocket,
    local_addr: SocketAddr,
    mut sfu: Sfu,
    mut commands: mpsc::Receiver<Command>,
    stats: Arc<Mutex<ShardStats>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; RECV_BUF];
    let mut report = tokio::time::interval(Duration::from_secs(1));
    let mut last = Counters::default();
    let mut last_report = Instant::now();
    tracing::info!(udp = %local_addr, "shard running (tokio UDP)");
    loop {
        let deadline = drain(&mut sfu, &socket).await;
        let deadline = deadline.min(Instant::now() + Duration::from_secs(1));
        tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, source)) => sfu.handle_input(Input::Receive {
                    now: Instant::now(),
                    source,
                    destination: local_addr,
                    contents: &buf[..n],
                }),
                // ICMP errors from peers that went away surface here; they
                // concern one peer, never the shard.
                Err(e) => tracing::trace!(error = %e, "udp receive error"),
            },
            cmd = commands.recv() => match cmd {
                Some(cmd) => handle_command(&mut sfu, cmd),
                None => break,
            },
            _ = tokio::time::sleep_until(deadline.into()) => {
                sfu.handle_input(Input::Timeout(Instant::now()));
            }
            _ = report.tick() => {
                let now = Instant::now();
                publish_stats(&sfu, &stats, &mut last, now.duration_since(last_report));
                last_report = now;
            }
            _ = shutdown.changed() => break,
        }
    }
    tracing::info!(udp = %local_addr, "shard stopped");
}

/// Sends what the SFU has queued and returns when it next needs time.
async fn drain(sfu: &mut Sfu, socket: &UdpSocket) -> Instant {
    loop {
        match sfu.poll_output() {
            Output::Transmit(t) => {
                if let Err(e) = socket.send_to(&t.contents, t.destination).await {
                    metrics::counter!("weir_udp_send_errors_total").increment(1);
                    tracing::trace!(error = %e, "udp send failed");
                }
            }
            Output::Event(e) => record_event(e),
            Output::Timeout(at) => return at,
        }
    }
}

fn handle_command(sfu: &mut Sfu, cmd: Command) {
    let now = Instant::now();
    // A caller that gave up (client went away) simply misses the reply.
    match cmd {
        Command::Publish {
            room,
            owner,
            offer,
            reply,
        } => {
            let _ = reply.send(sfu.accept_publisher(now, room, &owner, &offer));
        }
        Command::Play {
            room,
            owner,
            offer,
            reply,
        } => {
            let _ = reply.send(sfu.accept_subscriber(now, room, &owner, &offer));
        }
        Command::Close {
            room,
            session,
            reply,
        } => {
            let _ = reply.send(sfu.close_session(&room, &session));
        }
        Command::Trickle {
            room,
            session,
            sdpfrag,
            reply,
        } => {
            let _ = reply.send(sfu.add_remote_candidates(&room, &session, &sdpfrag));
        }
        Command::OpenSource { room, owner, reply } => {
            let _ = reply.send(sfu.accept_source(room, &owner));
        }
        Command::PushFrame { source, frame } => {
            // A source that was replaced or closed may still have frames in flight.
            let _ = sfu.push_frame(now, &source, frame);
        }
    }
}

fn record_event(e: Event) {
    match e {
        Event::SessionConnected {
            session,
            room,
            role,
        } => {
            tracing::info!(%room, %session, role = role.as_str(), "session connected");
            metrics::counter!("weir_sessions_connected_total", "role" => role.as_str())
                .increment(1);
        }
        Event::SessionClosed {
            session,
            room,
            role,
            reason,
        } => {
            let reason = match reason {
                weir_sfu::CloseReason::Requested => "requested".to_owned(),
                weir_sfu::CloseReason::Disconnected => "disconnected".to_owned(),
                weir_sfu::CloseReason::Replaced => "replaced".to_owned(),
                weir_sfu::CloseReason::Failed(why) => {
                    tracing::warn!(%room, %session, error = %why, "session failed");
                    "failed".to_owned()
                }
            };
            tracing::info!(%room, %session, role = role.as_str(), %reason, "session closed");
            metrics::counter!("weir_sessions_closed_total", "role" => role.as_str(), "reason" => reason)
                .increment(1);
        }
        Event::FirstFrame {
            session,
            room,
            after,
        } => {
            tracing::debug!(%room, %session, ms = after.as_millis() as u64, "first frame sent");
            metrics::histogram!("weir_time_to_first_frame_seconds", "side" => "server")
                .record(after.as_secs_f64());
        }
    }
}

fn publish_stats(sfu: &Sfu, stats: &Mutex<ShardStats>, last: &mut Counters, elapsed: Duration) {
    let c = sfu.counters().clone();
    let rooms = sfu.rooms();
    let subscribers: u32 = rooms.iter().map(|r| r.subscribers).sum();
    let publishers = sfu.session_count() as u32 - subscribers.min(sfu.session_count() as u32);
    let egress_bps = if elapsed.is_zero() {
        0
    } else {
        ((c.bytes_out - last.bytes_out) as f64 * 8.0 / elapsed.as_secs_f64()) as u64
    };
    macro_rules! delta {
        ($name:literal, $field:ident) => {
            metrics::counter!($name).increment(c.$field - last.$field);
        };
    }
    delta!("weir_udp_datagrams_received_total", datagrams_in);
    delta!("weir_udp_bytes_received_total", bytes_in);
    delta!("weir_udp_datagrams_dropped_total", datagrams_dropped);
    delta!("weir_udp_datagrams_sent_total", datagrams_out);
    delta!("weir_udp_bytes_sent_total", bytes_out);
    delta!("weir_frames_received_total", frames_in);
    delta!("weir_frames_forwarded_total", frames_forwarded);
    delta!("weir_forwarded_bytes_total", bytes_forwarded);
    delta!("weir_codec_mismatches_total", codec_mismatches);
    delta!("weir_keyframe_requests_total", keyframe_requests);
    delta!("weir_gop_cache_starts_total", gop_cache_starts);
    metrics::gauge!("weir_sessions", "role" => "publisher").set(publishers as f64);
    metrics::gauge!("weir_sessions", "role" => "subscriber").set(subscribers as f64);
    metrics::gauge!("weir_rooms").set(rooms.len() as f64);
    metrics::gauge!("weir_egress_bits_per_second").set(egress_bps as f64);
    *last = c.clone();
    if let Ok(mut s) = stats.lock() {
        *s = ShardStats {
            publishers,
            subscribers,
            rooms,
            counters: c,
            egress_bps,
            updated: Some(Instant::now()),
        };
    }
}
