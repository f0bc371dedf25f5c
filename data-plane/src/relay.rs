//! The media relay between nodes, over QUIC (quinn): a room's origin node
//! sends its frames to the edge nodes that carry viewers of the room.
//!
//! **Origin side.** An edge connects, opens one bidirectional control
//! stream and names the room ([`RelayMessage::Subscribe`]). A room not
//! published here is refused. Otherwise the room's home shard taps it: every
//! frame goes into a bounded queue per edge ([`RemoteTap`]); the shard never
//! waits on it — a full queue drops the frame and counts it, and the
//! connection then skips video until the next keyframe, which it asks the
//! publisher for. Audio frames go in QUIC datagrams (lost ones are
//! concealed by the decoder); video frames go one per unidirectional stream:
//! most exceed a datagram anyway, and a lost or reordered video frame breaks
//! decoding until the next keyframe, so they are delivered whole and in
//! order (the edge reads the streams in the order they were opened).
//! Keyframe requests from the edge go to the publisher; when the room stops
//! being published here the edge is told ([`RelayMessage::RoomEnded`]).
//!
//! **Edge side.** When a viewer arrives for a room live on another node
//! (`rooms/{room}/origin` in the coordinator, the origin's relay address in
//! its node info), the node opens a relay source on the room's home shard
//! and pulls the room: frames become the source's frames, and a change of
//! the origin's publisher generation makes viewers resync at the new
//! publisher's first keyframe (`Sfu::renew_source`). Keyframe requests of
//! the edge's viewers (already coalesced by the SFU) go upstream. A lost
//! connection is retried with backoff while viewers remain; the pull stops
//! when the room has had no viewer here for the idle grace, when the room's
//! origin changes or vanishes, or when a publisher of the room claims this
//! node.
//!
//! **Trust.** Each node makes a self-signed certificate at start and edges
//! do not verify it: the relay port belongs on a private network between
//! nodes (as etcd's does); nothing it carries is secret beyond the media
//! the viewers get anyway. Bad input — garbage datagrams or streams, an
//! unknown room, a first message that is not a subscription — is refused
//! and counted (`weir_relay_refused_total`, `weir_relay_bad_input_total`).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use quinn::rustls;
use str0m::format::Codec;
use str0m::media::{Frequency, MediaKind, MediaTime, Rid};
use str0m::rtp::AbsCaptureTime;
use tokio::sync::{mpsc, watch};
use weir_protocol::coordinator::{Coordinator, LeaseId};
use weir_protocol::relay::{
    ControlReader, FrameCodec, FrameHeader, FrameKind, MAX_FRAME_HEADER, MAX_PAYLOAD, RefuseReason,
    RelayError, RelayMessage, write_control,
};
use weir_protocol::{NodeId, RoomId, SessionId};
use weir_sfu::MediaFrame;

use crate::shard::{RemoteTap, ShardHandle, TappedFrame};

/// ALPN of the relay protocol.
const ALPN: &[u8] = b"weir-relay/1";
/// Server name edges ask for (certificates are not verified, see above).
const SERVER_NAME: &str = "weir-relay";
/// Frames queued per edge before the origin drops (about 6 s of 30 fps
/// video with its audio).
const EDGE_QUEUE: usize = 512;
/// Edge connections an origin serves at most.
const MAX_EDGES: u64 = 4096;
/// How long an edge may take to connect and subscribe.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a room may be unpublished at the origin before edges are told
/// it ended (a publisher reconnecting comes back within it).
const ENDED_GRACE: Duration = Duration::from_secs(3);
/// Longest wait between reconnection attempts of an edge.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Keyframe requests an edge queues for its origin (more are coalesced).
const KEYFRAME_QUEUE: usize = 64;

/// Settings of a node's relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Where the relay listens (UDP, QUIC).
    pub listen: SocketAddr,
    /// The address other nodes reach it at; `None`: the bound one (which
    /// must then not be a wildcard).
    pub advertise: Option<std::net::IpAddr>,
    /// How long an edge keeps pulling a room after its last viewer left.
    pub idle_grace: Duration,
    /// The cluster's node secret: edges prove it when they subscribe, and
    /// an origin that has it refuses subscriptions that do not. Without it
    /// any host that reaches the relay port may pull any live room (keep
    /// the port on a private network).
    pub secret: Option<weir_protocol::stats::NodeSecret>,
}

impl RelayConfig {
    /// Default idle grace of a pulled room.
    pub const IDLE_GRACE: Duration = Duration::from_secs(5);
}

/// A room this node pulls from another node.
struct Pull {
    origin: NodeId,
    source: SessionId,
    stop: watch::Sender<bool>,
    /// When the room last had viewers here (or the pull began).
    last_viewers: Instant,
    /// The lease this node's `rooms/{room}/edges/{node}` record is bound to
    /// (`None`: not written yet).
    edge_lease: Option<LeaseId>,
}

/// The node's relay: origin and edge sides on one QUIC endpoint.
pub(crate) struct Relay {
    endpoint: quinn::Endpoint,
    advertised: SocketAddr,
    shard: ShardHandle,
    coordinator: Arc<dyn Coordinator>,
    node: NodeId,
    idle_grace: Duration,
    secret: Option<weir_protocol::stats::NodeSecret>,
    pulls: Mutex<HashMap<RoomId, Pull>>,
    /// Serializes starting pulls (two viewers arriving together start one).
    starting: tokio::sync::Mutex<()>,
    /// Edge connections served now.
    edges: AtomicU64,
    /// The node's lease, from its agent.
    lease: std::sync::OnceLock<Arc<Mutex<Option<LeaseId>>>>,
}

impl Relay {
    /// Binds the relay's UDP socket with a fresh self-signed certificate.
    pub(crate) fn bind(
        config: &RelayConfig,
        shard: ShardHandle,
        coordinator: Arc<dyn Coordinator>,
        node: NodeId,
    ) -> anyhow::Result<Arc<Self>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])
            .context("cannot make the relay's certificate")?;
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key.into())?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        client.alpn_protocols = vec![ALPN.to_vec()];
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(Duration::from_secs(1)))
            .max_idle_timeout(Some(Duration::from_secs(5).try_into()?))
            .datagram_receive_buffer_size(Some(1 << 20))
            .max_concurrent_uni_streams(256u32.into());
        let transport = Arc::new(transport);
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server)?,
        ));
        server_config.transport_config(transport.clone());
        let mut client_config = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client)?,
        ));
        client_config.transport_config(transport);
        if config.secret.is_none() {
            tracing::warn!(
                "the relay serves any node that reaches it: give --node-secret (the same on every node) so that only nodes of this cluster may pull rooms"
            );
        }
        let mut endpoint = quinn::Endpoint::server(server_config, config.listen)
            .with_context(|| format!("cannot listen for the relay on {}", config.listen))?;
        endpoint.set_default_client_config(client_config);
        let bound = endpoint.local_addr()?;
        let advertised = match (config.advertise, bound.ip()) {
            (Some(ip), _) => SocketAddr::new(ip, bound.port()),
            (None, ip) if ip.is_unspecified() => anyhow::bail!(
                "--relay binds {bound}, a wildcard address: give --public-ip, the address other nodes reach this node at"
            ),
            (None, _) => bound,
        };
        Ok(Arc::new(Self {
            endpoint,
            advertised,
            shard,
            coordinator,
            node,
            idle_grace: config.idle_grace,
            secret: config.secret.clone(),
            pulls: Mutex::default(),
            starting: tokio::sync::Mutex::default(),
            edges: AtomicU64::new(0),
            lease: std::sync::OnceLock::new(),
        }))
    }

    /// Where other nodes reach the relay.
    pub(crate) fn advertised(&self) -> SocketAddr {
        self.advertised
    }

    /// Serves edges and keeps this node's pulls in line with its viewers
    /// until `shutdown`.
    pub(crate) async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    tokio::spawn(Arc::clone(&self).serve_edge(incoming));
                }
                _ = tick.tick() => self.reconcile().await,
                _ = shutdown.changed() => break,
            }
        }
        let rooms: Vec<RoomId> = self
            .pulls
            .lock()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        for room in rooms {
            self.stop_pull(&room, "node stopping").await;
        }
        self.endpoint.close(0u32.into(), b"node stopping");
    }

    // ---- origin side ----

    async fn serve_edge(self: Arc<Self>, incoming: quinn::Incoming) {
        let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "relay handshake failed");
                refused("handshake");
                return;
            }
            Err(_) => {
                refused("handshake");
                return;
            }
        };
        let Ok(Ok((mut send, mut recv))) =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await
        else {
            refused("no_control_stream");
            conn.close(1u32.into(), b"no control stream");
            return;
        };
        let mut reader = ControlReader::default();
        let first =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, next_control(&mut recv, &mut reader)).await;
        let room = match first {
            Ok(Ok(Some(RelayMessage::Subscribe { room, proof }))) => {
                if let Some(secret) = &self.secret
                    && !proof.is_some_and(|p| weir_protocol::relay::check_proof(secret, &room, &p))
                {
                    tracing::warn!(%room, edge = %conn.remote_address(), "relay: refused a subscription without the node secret's proof");
                    refuse(&conn, &mut send, RefuseReason::Unauthorized).await;
                    return;
                }
                room
            }
            Ok(Err(ControlError::Bad(e))) => {
                tracing::debug!(error = %e, "relay: bad first control message");
                bad_input("control");
                refuse(&conn, &mut send, RefuseReason::Protocol).await;
                return;
            }
            _ => {
                refuse(&conn, &mut send, RefuseReason::Protocol).await;
                return;
            }
        };
        if !self.shard.publishes(&room) {
            tracing::info!(%room, edge = %conn.remote_address(), "relay: refused a room not published here");
            refuse(&conn, &mut send, RefuseReason::UnknownRoom).await;
            return;
        }
        if self.edges.fetch_add(1, Ordering::Relaxed) >= MAX_EDGES {
            self.edges.fetch_sub(1, Ordering::Relaxed);
            refuse(&conn, &mut send, RefuseReason::Overloaded).await;
            return;
        }
        metrics::gauge!("weir_relay_edges").increment(1.0);
        tracing::info!(%room, edge = %conn.remote_address(), "relaying a room to an edge");
        let (frames, rx) = mpsc::channel(EDGE_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        self.shard.tap_remote(
            room.clone(),
            RemoteTap {
                frames,
                dropped: dropped.clone(),
            },
        );
        let sender = send_frames(&conn, rx, &dropped, &self.shard, &room);
        let control = async {
            loop {
                match next_control(&mut recv, &mut reader).await {
                    Ok(Some(RelayMessage::KeyframeRequest { rid })) => {
                        self.shard.room_keyframe(room.clone(), rid);
                    }
                    Ok(Some(_)) => bad_input("control"),
                    Ok(None) => return,
                    Err(ControlError::Bad(_)) => {
                        bad_input("control");
                        return;
                    }
                    Err(ControlError::Io) => return,
                }
            }
        };
        let watch_room = async {
            let mut since: Option<Instant> = None;
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if self.shard.publishes(&room) {
                    since = None;
                    continue;
                }
                let gone = *since.get_or_insert_with(Instant::now);
                if gone.elapsed() >= ENDED_GRACE {
                    let mut buf = Vec::new();
                    if write_control(&RelayMessage::RoomEnded, &mut buf).is_ok() {
                        let _ = send.write_all(&buf).await;
                    }
                    // Let the message reach the edge before closing.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    return;
                }
            }
        };
        tokio::select! {
            _ = sender => {}
            _ = control => {}
            _ = watch_room => {
                tracing::info!(%room, "relay: the room is no longer published here; edge told");
            }
            _ = conn.closed() => {}
        }
        conn.close(0u32.into(), b"bye");
        self.edges.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("weir_relay_edges").decrement(1.0);
        tracing::info!(%room, edge = %conn.remote_address(), "relay to an edge ended");
    }

    // ---- edge side ----

    /// Starts pulling `room` from its origin unless it is published here,
    /// already pulled, or not live anywhere.
    pub(crate) async fn ensure_pull(self: &Arc<Self>, room: &RoomId) {
        let _starting = self.starting.lock().await;
        if self.pulls.lock().is_ok_and(|p| p.contains_key(room)) || self.shard.publishes(room) {
            return;
        }
        let view =
            match tokio::time::timeout(Duration::from_secs(2), self.coordinator.cluster_view())
                .await
            {
                Ok(Ok(v)) => v,
                _ => {
                    metrics::counter!("weir_coordinator_errors_total", "op" => "relay_origin")
                        .increment(1);
                    return;
                }
            };
        let Some((_, origin)) = view.origins.iter().find(|(r, _)| r == room) else {
            return;
        };
        if origin == &self.node {
            return;
        }
        let Some(addr) = view
            .nodes
            .iter()
            .find(|n| &n.id == origin)
            .and_then(|n| n.relay_addr.as_deref())
            .and_then(|a| a.parse::<SocketAddr>().ok())
        else {
            tracing::warn!(%room, %origin, "the room's origin has no usable relay address");
            return;
        };
        let (keyframes, keyframes_rx) = mpsc::channel(KEYFRAME_QUEUE);
        let source = match self.shard.open_pull(room, keyframes).await {
            Ok(Ok(source)) => source,
            Ok(Err(e)) => {
                tracing::debug!(%room, error = %e, "not pulling: the room has a publisher here");
                return;
            }
            Err(_) => return,
        };
        let (stop, stop_rx) = watch::channel(false);
        if let Ok(mut p) = self.pulls.lock() {
            p.insert(
                room.clone(),
                Pull {
                    origin: origin.clone(),
                    source: source.clone(),
                    stop,
                    last_viewers: Instant::now(),
                    edge_lease: None,
                },
            );
        }
        metrics::gauge!("weir_relay_pulls").increment(1.0);
        tracing::info!(%room, %origin, %addr, "pulling a room from its origin");
        tokio::spawn(Arc::clone(self).pull(room.clone(), addr, source, stop_rx, keyframes_rx));
    }

    /// Where the node's lease is kept (set once by the agent).
    pub(crate) fn set_lease(&self, lease: Arc<Mutex<Option<LeaseId>>>) {
        let _ = self.lease.set(lease);
    }

    fn current_lease(&self) -> Option<LeaseId> {
        self.lease
            .get()
            .and_then(|l| l.lock().ok().and_then(|l| *l))
    }

    /// Writes the edge records of pulls that have none under the node's
    /// current lease (new pulls, or a lease renewed after an outage).
    async fn record_edges(&self) {
        let Some(lease) = self.current_lease() else {
            return;
        };
        let missing: Vec<RoomId> = self
            .pulls
            .lock()
            .map(|p| {
                p.iter()
                    .filter(|(_, pull)| pull.edge_lease != Some(lease))
                    .map(|(room, _)| room.clone())
                    .collect()
            })
            .unwrap_or_default();
        for room in missing {
            let written = tokio::time::timeout(
                Duration::from_secs(2),
                self.coordinator.register_edge(&room, &self.node, lease),
            )
            .await;
            match written {
                Ok(Ok(())) => {
                    if let Ok(mut p) = self.pulls.lock()
                        && let Some(pull) = p.get_mut(&room)
                    {
                        pull.edge_lease = Some(lease);
                    }
                }
                _ => {
                    metrics::counter!("weir_coordinator_errors_total", "op" => "register_edge")
                        .increment(1);
                }
            }
        }
    }

    /// Stops pulling `room` (a publisher of it claims this node, or nobody
    /// watches it here any more).
    pub(crate) async fn stop_pull(&self, room: &RoomId, why: &str) {
        let Some(pull) = self.pulls.lock().ok().and_then(|mut p| p.remove(room)) else {
            return;
        };
        let _ = pull.stop.send(true);
        self.shard.close_pull(room, pull.source).await;
        if pull.edge_lease.is_some() {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                self.coordinator.release_edge(room, &self.node),
            )
            .await;
        }
        metrics::gauge!("weir_relay_pulls").decrement(1.0);
        tracing::info!(%room, origin = %pull.origin, why, "stopped pulling a room");
    }

    /// Once a second: stops idle pulls and pulls whose origin changed, and
    /// starts pulls for rooms with viewers here and a publisher elsewhere
    /// (viewers who arrived before the room went live, or whose origin
    /// moved).
    async fn reconcile(self: &Arc<Self>) {
        let viewers = self.shard.viewers_by_room();
        let view =
            tokio::time::timeout(Duration::from_secs(2), self.coordinator.cluster_view()).await;
        let origins: Option<HashMap<RoomId, NodeId>> = match view {
            Ok(Ok(v)) => Some(v.origins.iter().cloned().collect()),
            _ => None,
        };
        let now = Instant::now();
        let mut stop = Vec::new();
        if let Ok(mut pulls) = self.pulls.lock() {
            for (room, pull) in pulls.iter_mut() {
                if viewers.get(room).is_some_and(|n| *n > 0) {
                    pull.last_viewers = now;
                }
                // While the coordinator does not answer, pulls go on.
                let moved = origins
                    .as_ref()
                    .is_some_and(|o| o.get(room) != Some(&pull.origin));
                if moved {
                    stop.push((room.clone(), "the room's origin changed"));
                } else if now.duration_since(pull.last_viewers) > self.idle_grace {
                    stop.push((room.clone(), "no viewers"));
                }
            }
        }
        for (room, why) in stop {
            self.stop_pull(&room, why).await;
        }
        self.record_edges().await;
        let Some(origins) = origins else { return };
        for (room, n) in viewers {
            if n > 0
                && origins.get(&room).is_some_and(|o| o != &self.node)
                && !self.pulls.lock().is_ok_and(|p| p.contains_key(&room))
            {
                self.ensure_pull(&room).await;
            }
        }
    }

    /// Pulls `room` from `addr` into `source` until stopped, reconnecting
    /// with backoff.
    async fn pull(
        self: Arc<Self>,
        room: RoomId,
        addr: SocketAddr,
        source: SessionId,
        mut stop: watch::Receiver<bool>,
        mut keyframes: mpsc::Receiver<Option<String>>,
    ) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let end = self
                .pull_once(&room, addr, &source, &mut stop, &mut keyframes)
                .await;
            match &end {
                PullEnd::Stopped => return,
                PullEnd::Failed { connected, why } => {
                    if *connected {
                        backoff = Duration::from_millis(250);
                        tracing::warn!(%room, %addr, why, "relay connection lost; reconnecting");
                    } else {
                        tracing::debug!(%room, %addr, why, "relay connection failed; retrying");
                    }
                    metrics::counter!("weir_relay_reconnects_total").increment(1);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn pull_once(
        &self,
        room: &RoomId,
        addr: SocketAddr,
        source: &SessionId,
        stop: &mut watch::Receiver<bool>,
        keyframes: &mut mpsc::Receiver<Option<String>>,
    ) -> PullEnd {
        let failed = |connected: bool, why: String| PullEnd::Failed { connected, why };
        if *stop.borrow() {
            return PullEnd::Stopped;
        }
        let connecting = match self.endpoint.connect(addr, SERVER_NAME) {
            Ok(c) => c,
            Err(e) => return failed(false, e.to_string()),
        };
        let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return failed(false, e.to_string()),
            Err(_) => return failed(false, "connect timed out".into()),
        };
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return failed(false, e.to_string()),
        };
        let mut buf = Vec::new();
        let proof = self
            .secret
            .as_ref()
            .map(|s| weir_protocol::relay::subscribe_proof(s, room));
        if write_control(
            &RelayMessage::Subscribe {
                room: room.clone(),
                proof,
            },
            &mut buf,
        )
        .is_err()
            || send.write_all(&buf).await.is_err()
        {
            return failed(false, "cannot subscribe".into());
        }
        tracing::debug!(%room, %addr, "relay connected");
        let datagrams = async {
            loop {
                match conn.read_datagram().await {
                    Ok(d) => self.on_frame(room, source, &d),
                    Err(e) => return e.to_string(),
                }
            }
        };
        // Streams are read whole, one after the other in the order the
        // origin opened them: video frames stay in order.
        let streams = async {
            loop {
                let mut s = match conn.accept_uni().await {
                    Ok(s) => s,
                    Err(e) => return e.to_string(),
                };
                match s.read_to_end(MAX_FRAME_HEADER + MAX_PAYLOAD).await {
                    Ok(d) => self.on_frame(room, source, &d),
                    Err(quinn::ReadToEndError::TooLong) => {
                        bad_input("too_long");
                        return "a frame stream was too long".to_owned();
                    }
                    Err(e) => return e.to_string(),
                }
            }
        };
        let control = async {
            let mut reader = ControlReader::default();
            loop {
                match next_control(&mut recv, &mut reader).await {
                    Ok(Some(RelayMessage::RoomEnded)) => {
                        return "the origin says the room ended".to_owned();
                    }
                    Ok(Some(RelayMessage::Refused(why))) => {
                        return format!("the origin refused: {}", why.as_str());
                    }
                    Ok(Some(_)) => bad_input("control"),
                    Ok(None) | Err(ControlError::Io) => {
                        return "the control stream closed".to_owned();
                    }
                    Err(ControlError::Bad(e)) => {
                        bad_input("control");
                        return e.to_string();
                    }
                }
            }
        };
        let upstream = async {
            while let Some(rid) = keyframes.recv().await {
                let mut rids = HashSet::from([rid]);
                while let Ok(r) = keyframes.try_recv() {
                    rids.insert(r);
                }
                let mut buf = Vec::new();
                for rid in rids {
                    let _ = write_control(&RelayMessage::KeyframeRequest { rid }, &mut buf);
                }
                if send.write_all(&buf).await.is_err() {
                    break;
                }
                metrics::counter!("weir_relay_keyframe_requests_total").increment(1);
            }
            std::future::pending::<()>().await;
        };
        let end = tokio::select! {
            why = datagrams => failed(true, why),
            why = streams => failed(true, why),
            why = control => failed(true, why),
            () = upstream => failed(true, String::new()),
            _ = stop.changed() => PullEnd::Stopped,
        };
        conn.close(0u32.into(), b"done");
        end
    }

    /// A frame (datagram or stream) from the origin.
    fn on_frame(&self, room: &RoomId, source: &SessionId, bytes: &[u8]) {
        match RelayMessage::decode(bytes) {
            Ok(RelayMessage::Frame { header, payload }) => {
                let len = payload.len() as u64;
                match media_frame(header, payload) {
                    Some((generation, frame)) => {
                        metrics::counter!("weir_relay_frames_in_total").increment(1);
                        metrics::counter!("weir_relay_bytes_in_total").increment(len);
                        self.shard.relayed(room, source.clone(), generation, frame);
                    }
                    None => bad_input("frame"),
                }
            }
            Ok(_) => bad_input("unexpected"),
            Err(e) => {
                tracing::debug!(%room, error = %e, "relay: undecodable frame");
                bad_input("frame");
            }
        }
    }
}

/// Why one relay connection of an edge ended.
enum PullEnd {
    Stopped,
    Failed { connected: bool, why: String },
}

/// Sends a tapped room's frames to one edge until the queue closes or the
/// connection fails.
async fn send_frames(
    conn: &quinn::Connection,
    mut rx: mpsc::Receiver<TappedFrame>,
    dropped: &AtomicU64,
    shard: &ShardHandle,
    room: &RoomId,
) {
    let mut seq = 0u32;
    let mut seen_drops = 0;
    let mut video_rids: HashSet<Option<String>> = HashSet::new();
    // Layers whose deltas are skipped until their next keyframe (frames
    // were dropped: the edge could not decode them).
    let mut waiting: HashSet<Option<String>> = HashSet::new();
    while let Some((generation, frame)) = rx.recv().await {
        let drops = dropped.load(Ordering::Relaxed);
        if drops != seen_drops {
            seen_drops = drops;
            waiting.clone_from(&video_rids);
            for rid in &waiting {
                shard.room_keyframe(room.clone(), rid.clone());
            }
            tracing::debug!(%room, drops, "relay: the edge lags; resyncing at the next keyframe");
        }
        let Some(header) = frame_header(&frame, generation, seq) else {
            bad_input("codec");
            continue;
        };
        if header.kind == FrameKind::Video {
            video_rids.insert(header.rid.clone());
            if waiting.contains(&header.rid) {
                if header.keyframe {
                    waiting.remove(&header.rid);
                } else {
                    metrics::counter!("weir_relay_frames_dropped_total", "side" => "origin")
                        .increment(1);
                    continue;
                }
            }
        }
        seq = seq.wrapping_add(1);
        let Ok(bytes) = header.encode(&frame.data) else {
            bad_input("encode");
            continue;
        };
        let len = bytes.len() as u64;
        let datagram = header.kind == FrameKind::Audio
            && conn
                .max_datagram_size()
                .is_some_and(|max| bytes.len() <= max);
        if datagram {
            if conn.send_datagram(bytes.into()).is_err() {
                return;
            }
        } else {
            let Ok(mut stream) = conn.open_uni().await else {
                return;
            };
            if stream.write_all(&bytes).await.is_err() {
                return;
            }
            let _ = stream.finish();
        }
        metrics::counter!("weir_relay_frames_out_total").increment(1);
        metrics::counter!("weir_relay_bytes_out_total").increment(len);
    }
}

async fn refuse(conn: &quinn::Connection, send: &mut quinn::SendStream, why: RefuseReason) {
    refused(why.as_str());
    let mut buf = Vec::new();
    if write_control(&RelayMessage::Refused(why), &mut buf).is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), send.write_all(&buf)).await;
        let _ = send.finish();
        // Give the message a moment to leave before the close overtakes it.
        let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
    }
    conn.close(2u32.into(), why.as_str().as_bytes());
}

fn refused(reason: &'static str) {
    metrics::counter!("weir_relay_refused_total", "reason" => reason).increment(1);
}

fn bad_input(what: &'static str) {
    metrics::counter!("weir_relay_bad_input_total", "what" => what).increment(1);
}

enum ControlError {
    Bad(RelayError),
    Io,
}

/// The next control message; `Ok(None)` when the stream ended.
async fn next_control(
    recv: &mut quinn::RecvStream,
    reader: &mut ControlReader,
) -> Result<Option<RelayMessage>, ControlError> {
    let mut buf = [0u8; 512];
    loop {
        if let Some(m) = reader.next_message().map_err(ControlError::Bad)? {
            return Ok(Some(m));
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => reader.push(&buf[..n]),
            Ok(None) => return Ok(None),
            Err(_) => return Err(ControlError::Io),
        }
    }
}

/// Accepts any certificate: relay certificates are self-signed and the
/// relay port lives on a private network (see the module docs). Signatures
/// are still checked, so the handshake itself is sound.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

// ---- frames to and from the wire ----

/// Seconds from the NTP epoch (1900) to the Unix epoch (1970).
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

fn ntp_of(t: SystemTime) -> Option<u64> {
    let d = t.duration_since(UNIX_EPOCH).ok()?;
    let secs = d.as_secs().checked_add(NTP_UNIX_OFFSET)?;
    if secs > u64::from(u32::MAX) {
        return None;
    }
    let frac = (u64::from(d.subsec_nanos()) << 32) / 1_000_000_000;
    Some((secs << 32) | frac)
}

fn system_time_of(ntp: u64) -> Option<SystemTime> {
    let secs = (ntp >> 32).checked_sub(NTP_UNIX_OFFSET)?;
    let nanos = ((ntp & 0xFFFF_FFFF) * 1_000_000_000) >> 32;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos as u32))
}

fn wire_codec(c: Codec) -> Option<FrameCodec> {
    Some(match c {
        Codec::Opus => FrameCodec::Opus,
        Codec::PCMU => FrameCodec::Pcmu,
        Codec::PCMA => FrameCodec::Pcma,
        Codec::Vp8 => FrameCodec::Vp8,
        Codec::Vp9 => FrameCodec::Vp9,
        Codec::H264 => FrameCodec::H264,
        Codec::H265 => FrameCodec::H265,
        Codec::Av1 => FrameCodec::Av1,
        _ => return None,
    })
}

fn local_codec(c: FrameCodec) -> Option<Codec> {
    Some(match c {
        FrameCodec::Opus => Codec::Opus,
        FrameCodec::Pcmu => Codec::PCMU,
        FrameCodec::Pcma => Codec::PCMA,
        FrameCodec::Vp8 => Codec::Vp8,
        FrameCodec::Vp9 => Codec::Vp9,
        FrameCodec::H264 => Codec::H264,
        FrameCodec::H265 => Codec::H265,
        FrameCodec::Av1 => Codec::Av1,
        _ => return None,
    })
}

/// The wire header of a tapped frame; `None` for a codec the relay does not carry.
fn frame_header(frame: &MediaFrame, generation: u64, seq: u32) -> Option<FrameHeader> {
    Some(FrameHeader {
        kind: match frame.kind {
            MediaKind::Audio => FrameKind::Audio,
            MediaKind::Video => FrameKind::Video,
        },
        codec: wire_codec(frame.codec)?,
        time: frame.time.numer(),
        clock_rate: frame.time.denom(),
        keyframe: frame.keyframe,
        rid: frame.rid.map(|r| r.to_string()),
        capture_ntp: frame.capture_time.and_then(|c| ntp_of(c.capture_time)),
        clock_offset: frame.capture_time.and_then(|c| c.clock_offset),
        generation,
        seq,
    })
}

/// A frame from the wire as the SFU takes it, with its publisher generation.
fn media_frame(h: FrameHeader, payload: Vec<u8>) -> Option<(u64, MediaFrame)> {
    let rid = match h.rid.as_deref() {
        // str0m's rids are at most 8 characters.
        Some(r) if r.len() > 8 => return None,
        Some(r) => Some(Rid::from(r)),
        None => None,
    };
    let frame = MediaFrame {
        kind: match h.kind {
            FrameKind::Audio => MediaKind::Audio,
            FrameKind::Video => MediaKind::Video,
        },
        codec: local_codec(h.codec)?,
        params: None,
        time: MediaTime::new(h.time, Frequency::new(h.clock_rate)?),
        network_time: Instant::now(),
        keyframe: h.keyframe,
        rid,
        capture_time: h
            .capture_ntp
            .and_then(system_time_of)
            .map(|capture_time| AbsCaptureTime {
                capture_time,
                clock_offset: h.clock_offset,
            }),
        data: payload.into(),
    };
    Some((h.generation, frame))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_the_wire() {
        let capture = UNIX_EPOCH + Duration::new(1_800_000_000, 500_000_000);
        let frame = MediaFrame {
            kind: MediaKind::Video,
            codec: Codec::H264,
            params: None,
            time: MediaTime::new(123_456, Frequency::NINETY_KHZ),
            network_time: Instant::now(),
            keyframe: true,
            rid: Some(Rid::from("h")),
            capture_time: Some(AbsCaptureTime {
                capture_time: capture,
                clock_offset: Some(-3),
            }),
            data: vec![0, 0, 0, 1, 0x65].into(),
        };
        let header = frame_header(&frame, 4, 9).unwrap();
        let bytes = header.encode(&frame.data).unwrap();
        let Ok(RelayMessage::Frame { header, payload }) = RelayMessage::decode(&bytes) else {
            panic!("not a frame");
        };
        let (generation, back) = media_frame(header, payload).unwrap();
        assert_eq!(generation, 4);
        assert_eq!(back.kind, MediaKind::Video);
        assert_eq!(back.codec, Codec::H264);
        assert_eq!(back.time, frame.time);
        assert!(back.keyframe);
        assert_eq!(back.rid, frame.rid);
        assert_eq!(&*back.data, &*frame.data);
        let got = back.capture_time.unwrap();
        let diff = got
            .capture_time
            .duration_since(capture)
            .unwrap_or_else(|e| e.duration());
        assert!(diff < Duration::from_micros(1), "{diff:?}");
        assert_eq!(got.clock_offset, Some(-3));
    }

    #[test]
    fn odd_headers_are_refused_not_trusted() {
        let h = FrameHeader {
            kind: FrameKind::Audio,
            codec: FrameCodec::Opus,
            time: 0,
            clock_rate: 48_000,
            keyframe: false,
            rid: Some("much-too-long-rid".into()),
            capture_ntp: Some(0),
            clock_offset: None,
            generation: 0,
            seq: 0,
        };
        assert!(media_frame(h.clone(), Vec::new()).is_none());
        // A capture time before 1970 is dropped, the frame kept.
        let (_, f) = media_frame(FrameHeader { rid: None, ..h }, Vec::new()).unwrap();
        assert!(f.capture_time.is_none());
    }
}
