//! A shard: one UDP socket and one sans-IO [`Sfu`], driven by a plain loop
//! on a thread of its own (forwarding never shares threads with HTTP or
//! control work), over the batched I/O of [`crate::udp`]. Everything else
//! talks to it through [`ShardHandle`]: a bounded command queue plus the
//! waker that interrupts the loop's wait.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::udp::{self, Backend, Io, IoChoice, Waker};
use weir_protocol::{RoomId, SessionId};
use weir_sfu::{
    Accepted, Counters, Event, Input, MediaFrame, Output, Role, RoomSummary, Sfu, SfuConfig,
    SfuError,
};

/// Commands queued per shard before callers are told the shard is busy.
const COMMAND_QUEUE: usize = 4096;

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
    /// Relay a room's frames to a source on another shard.
    Tap {
        room: RoomId,
        edge: usize,
        source: SessionId,
    },
    /// A frame relayed from the room's home shard; `generation` changes when
    /// the room's publisher changes.
    Relayed {
        source: SessionId,
        generation: u64,
        frame: MediaFrame,
    },
    /// Viewers on another shard need a keyframe of this room.
    RoomKeyframe { room: RoomId, rid: Option<String> },
    /// Hand the room's frames (its WHIP publisher's) to HLS and snapshots
    /// until the publisher leaves.
    MediaTap {
        room: RoomId,
        publisher: SessionId,
        tap: crate::transcode::whip::MediaTap,
    },
    /// Relay a room's frames to an edge node (a QUIC relay connection).
    TapRemote { room: RoomId, tap: RemoteTap },
    /// Cap the video layer a viewer gets (`None` lifts it).
    SetMaxLayer {
        session: SessionId,
        layer: Option<String>,
        reply: oneshot::Sender<Result<(), SfuError>>,
    },
    /// Write to a session's data channel; the reply says how many fit.
    ChannelSend {
        session: SessionId,
        label: String,
        binary: bool,
        messages: Vec<bytes::Bytes>,
        reply: oneshot::Sender<Result<usize, SfuError>>,
    },
    /// End up to `max` viewers, sparing those of rooms in `keep` (drain).
    MoveViewers {
        max: usize,
        keep: Arc<HashSet<RoomId>>,
        /// The ended viewers, and how many the shard still has.
        reply: oneshot::Sender<(Vec<SessionId>, usize)>,
    },
}

/// Where shards hand the data channels their peers open (the room events
/// over WebRTC, `crate::bus::dc`). Called on the shard's thread: must not
/// block.
pub(crate) trait ChannelSink: Send + Sync {
    /// A peer opened channel `label`; `shard` is where to write to it.
    fn opened(&self, shard: Shard, opened: ChannelOpened);
    /// A message arrived on an open channel.
    fn message(&self, session: &SessionId, label: &str, binary: bool, data: Vec<u8>);
    /// The channel closed (or its session ended).
    fn closed(&self, session: &SessionId, label: &str);
}

/// A data channel a peer opened.
#[derive(Debug, Clone)]
pub(crate) struct ChannelOpened {
    pub session: SessionId,
    pub room: RoomId,
    pub role: Role,
    /// Token subject of the session.
    pub owner: String,
    pub label: String,
}

/// The node's [`ChannelSink`], set once the room events hub exists.
pub(crate) type ChannelSinkSlot = Arc<std::sync::OnceLock<Arc<dyn ChannelSink>>>;

/// Owner of the relay sources a room's home shard feeds on other shards.
const RELAY_OWNER: &str = "weir:shard-relay";

/// Owner of the relay source through which an edge node plays a room
/// published on another node.
const NODE_RELAY_OWNER: &str = "weir:node-relay";

/// A frame of a tapped room on its way to an edge node, with the room's
/// publisher generation.
pub(crate) type TappedFrame = (u64, MediaFrame);

/// Where a home shard hands a room's frames for one edge node. The shard
/// never waits on it: a full queue drops the frame and counts it in
/// `dropped` (the relay connection then asks for a keyframe).
#[derive(Clone)]
pub(crate) struct RemoteTap {
    pub frames: tokio::sync::mpsc::Sender<TappedFrame>,
    pub dropped: Arc<std::sync::atomic::AtomicU64>,
}

/// A receiver of a room's frames on behalf of viewers elsewhere.
enum TapTarget {
    /// A relay source on another shard of this node.
    Shard(usize, SessionId),
    /// An edge node.
    Remote(RemoteTap),
}

/// Where a shard sends keyframe requests for rooms this node pulls from
/// another node (the relay connection of each room).
pub(crate) type Upstream = Arc<Mutex<HashMap<RoomId, tokio::sync::mpsc::Sender<Option<String>>>>>;

/// What a shard knows about the node's other shards, set once they all run.
pub(crate) type Peers = Arc<std::sync::OnceLock<Arc<[Shard]>>>;

/// Stable home shard of a room among `n`.
fn home_index(room: &RoomId, n: usize) -> usize {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same room maps to the same shard in
    // every process of the same build.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    room.hash(&mut h);
    (h.finish() % n.max(1) as u64) as usize
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

/// The shard cannot take the command: it is stopping, or its queue is full.
#[derive(Debug, thiserror::Error)]
#[error("the media shard is not available (stopping or overloaded)")]
pub struct ShardGone;

/// A cheap handle to one running shard.
#[derive(Clone)]
pub struct Shard {
    index: usize,
    commands: SyncSender<Command>,
    waker: Waker,
    stats: Arc<Mutex<ShardStats>>,
    local_addr: SocketAddr,
    backend: Backend,
    /// Viewers placed here and not yet gone (kept by the shard's loop).
    viewers: Arc<std::sync::atomic::AtomicUsize>,
}

impl Shard {
    /// Viewers on this shard now.
    pub fn live_viewers(&self) -> usize {
        self.viewers.load(Ordering::Relaxed)
    }

    /// The shard's UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Which I/O backend the shard runs.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The shard's number within its node.
    pub fn index(&self) -> usize {
        self.index
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

    /// Ends up to `max` of this shard's viewers so that they play elsewhere,
    /// sparing those of rooms in `keep`; returns the ended sessions and
    /// how many viewers the shard still has.
    pub async fn move_viewers(
        &self,
        max: usize,
        keep: Arc<HashSet<RoomId>>,
    ) -> Result<(Vec<SessionId>, usize), ShardGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::MoveViewers { max, keep, reply }, rx)
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

    pub async fn set_max_layer(
        &self,
        session: SessionId,
        layer: Option<String>,
    ) -> Result<Result<(), SfuError>, ShardGone> {
        let (reply, rx) = oneshot::channel();
        self.send(
            Command::SetMaxLayer {
                session,
                layer,
                reply,
            },
            rx,
        )
        .await
    }

    /// Writes `messages` to the session's data channel `label`, in order,
    /// as many as fit its send buffer now; returns how many did.
    pub(crate) async fn channel_send(
        &self,
        session: SessionId,
        label: String,
        binary: bool,
        messages: Vec<bytes::Bytes>,
    ) -> Result<Result<usize, SfuError>, ShardGone> {
        let (reply, rx) = oneshot::channel();
        self.send(
            Command::ChannelSend {
                session,
                label,
                binary,
                messages,
                reply,
            },
            rx,
        )
        .await
    }

    fn post(&self, cmd: Command) {
        match self.commands.try_send(cmd) {
            Ok(()) => self.waker.wake(),
            Err(_) => metrics::counter!("weir_shard_relay_dropped_total").increment(1),
        }
    }

    /// Hands a source's frame to the shard without waiting. When the shard's
    /// queue is full the frame is dropped and counted: ingest never blocks
    /// on forwarding, and forwarding never waits for ingest.
    pub fn push_frame(&self, source: SessionId, frame: MediaFrame) -> Result<(), ShardGone> {
        match self.commands.try_send(Command::PushFrame { source, frame }) {
            Ok(()) => {
                self.waker.wake();
                Ok(())
            }
            Err(TrySendError::Full(_)) => {
                metrics::counter!("weir_source_frames_dropped_total").increment(1);
                Ok(())
            }
            Err(TrySendError::Disconnected(_)) => Err(ShardGone),
        }
    }

    async fn send<T>(&self, cmd: Command, rx: oneshot::Receiver<T>) -> Result<T, ShardGone> {
        self.commands.try_send(cmd).map_err(|_| ShardGone)?;
        self.waker.wake();
        rx.await.map_err(|_| ShardGone)
    }
}

/// The node's shards, as one handle: each room lives on one shard (its home,
/// chosen by a stable hash of the room id), so its publisher and viewers
/// share one SFU; commands are routed there.
#[derive(Clone)]
pub struct ShardHandle {
    shards: Arc<[Shard]>,
    /// Which shard each open source (SRT publisher) lives on.
    sources: Arc<Mutex<HashMap<SessionId, usize>>>,
    /// Which shard each viewer lives on, when not the room's home.
    viewers: Arc<Mutex<HashMap<SessionId, usize>>>,
    /// Relay sources feeding a room's viewers on other shards.
    relays: Arc<tokio::sync::Mutex<HashMap<(RoomId, usize), SessionId>>>,
    /// Viewers a home shard takes before new viewers of its rooms go to the
    /// least loaded shard (0: never).
    spill: usize,
    /// Serializes viewer placement with its reservation.
    placing: Arc<Mutex<()>>,
    /// Viewers recently moved away (drain), so that their session URL says
    /// so rather than "no such session".
    moved: Arc<Mutex<MovedViewers>>,
    /// Rooms this node plays through a relay from another node: their relay
    /// source is not a publisher of this node.
    pulled: Arc<Mutex<HashSet<RoomId>>>,
    /// Keyframe requests of pulled rooms, by room.
    upstream: Upstream,
}

/// What one [`ShardHandle::move_viewers`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MovedBatch {
    /// Viewers ended.
    pub moved: usize,
    /// Viewers the node still has.
    pub left: usize,
}

/// Viewer sessions the node moved away, newest kept: a bounded memory.
#[derive(Default)]
struct MovedViewers {
    set: HashSet<SessionId>,
    order: VecDeque<SessionId>,
}

impl MovedViewers {
    /// Sessions remembered; older ones are forgotten (their clients have
    /// long moved).
    const CAPACITY: usize = 100_000;

    fn insert(&mut self, id: SessionId) {
        if self.set.insert(id.clone()) {
            self.order.push_back(id);
        }
        while self.order.len() > Self::CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

impl ShardHandle {
    /// Routes over `shards` (at least one); see [`ShardHandle::spill`] for
    /// `spill`. `peers` is what [`spawn`] handed out, filled here.
    pub(crate) fn new(
        shards: Vec<Shard>,
        spill: usize,
        peers: &Peers,
        upstream: &Upstream,
    ) -> Self {
        let shards: Arc<[Shard]> = shards.into();
        let _ = peers.set(shards.clone());
        Self {
            pulled: Arc::default(),
            upstream: upstream.clone(),
            shards,
            sources: Arc::default(),
            viewers: Arc::default(),
            relays: Arc::default(),
            spill,
            placing: Arc::default(),
            moved: Arc::default(),
        }
    }

    /// Ends up to `max` WebRTC viewers of the node so that they play
    /// elsewhere (the node is being drained), shard by shard, oldest first
    /// on each. Viewers of rooms published on this node move too: the
    /// scheduler sends them to other nodes, which pull the room from this
    /// one over the relay while its publisher stays here.
    pub async fn move_viewers(&self, max: usize) -> Result<MovedBatch, ShardGone> {
        let keep = Arc::new(HashSet::new());
        let mut batch = MovedBatch::default();
        for shard in self.shards.iter() {
            if shard.live_viewers() == 0 {
                continue;
            }
            let budget = max.saturating_sub(batch.moved);
            let (ended, left) = if budget == 0 {
                (Vec::new(), shard.live_viewers())
            } else {
                shard.move_viewers(budget, keep.clone()).await?
            };
            batch.moved += ended.len();
            batch.left += left;
            if let Ok(mut v) = self.viewers.lock() {
                for id in &ended {
                    v.remove(id);
                }
            }
            if let Ok(mut m) = self.moved.lock() {
                for id in ended {
                    m.insert(id);
                }
            }
        }
        Ok(batch)
    }

    /// Whether `session` is a viewer this node moved away.
    pub fn was_moved(&self, session: &SessionId) -> bool {
        self.moved.lock().is_ok_and(|m| m.set.contains(session))
    }

    /// WebRTC viewers on the node now.
    pub fn live_viewers(&self) -> usize {
        self.shards.iter().map(Shard::live_viewers).sum()
    }

    /// Every shard.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The home shard of `room`.
    pub fn for_room(&self, room: &RoomId) -> &Shard {
        &self.shards[home_index(room, self.shards.len())]
    }

    /// The shard a session lives on (viewers placed off their room's home).
    fn for_session(&self, room: &RoomId, session: &SessionId) -> &Shard {
        let placed = self
            .viewers
            .lock()
            .ok()
            .and_then(|v| v.get(session).copied());
        match placed.and_then(|i| self.shards.get(i)) {
            Some(s) => s,
            None => self.for_room(room),
        }
    }

    /// The shard a new viewer of `room` goes to: the room's home until it
    /// carries `spill` viewers, then the shard with the fewest viewers.
    fn place_viewer(&self, room: &RoomId) -> usize {
        let home = home_index(room, self.shards.len());
        if self.spill == 0 || self.shards[home].live_viewers() < self.spill {
            return home;
        }
        (0..self.shards.len())
            .min_by_key(|i| self.shards[*i].live_viewers())
            .unwrap_or(home)
    }

    /// Makes sure `edge` gets `room`'s frames from the home shard.
    async fn ensure_relay(&self, room: &RoomId, home: usize, edge: usize) -> Result<(), ShardGone> {
        let mut relays = self.relays.lock().await;
        if relays.contains_key(&(room.clone(), edge)) {
            return Ok(());
        }
        let (source, _) = match self.shards[edge]
            .open_source(room.clone(), RELAY_OWNER.to_owned())
            .await?
        {
            Ok(opened) => opened,
            // The edge shard has its own publisher for the room (cannot
            // happen while WHIP and SRT go to the home shard): leave it be.
            Err(_) => return Ok(()),
        };
        self.shards[home].post(Command::Tap {
            room: room.clone(),
            edge,
            source: source.clone(),
        });
        relays.insert((room.clone(), edge), source);
        tracing::info!(%room, home, edge, "room fans out to another shard");
        Ok(())
    }

    /// Whether a publisher of `room` is live on this node (by the shards'
    /// latest stats, at most a second old; rooms pulled from other nodes do
    /// not count).
    pub(crate) fn publishes(&self, room: &RoomId) -> bool {
        if self.pulled.lock().is_ok_and(|p| p.contains(room)) {
            return false;
        }
        self.for_room(room)
            .stats()
            .rooms
            .iter()
            .any(|r| &r.room == room && r.live)
    }

    /// Viewers of each room on this node, by the shards' latest stats.
    pub(crate) fn viewers_by_room(&self) -> HashMap<RoomId, u32> {
        let mut out: HashMap<RoomId, u32> = HashMap::new();
        for shard in self.shards.iter() {
            for r in shard.stats().rooms {
                *out.entry(r.room).or_default() += r.subscribers;
            }
        }
        out
    }

    /// Sends `room`'s frames from its home shard to an edge node.
    pub(crate) fn tap_remote(&self, room: RoomId, tap: RemoteTap) {
        self.for_room(&room).post(Command::TapRemote { room, tap });
    }

    /// Asks `room`'s publisher for a keyframe (an edge's viewers need one).
    pub(crate) fn room_keyframe(&self, room: RoomId, rid: Option<String>) {
        self.for_room(&room)
            .post(Command::RoomKeyframe { room, rid });
    }

    /// Opens the relay source through which this node plays `room` from
    /// another node, on the room's home shard; keyframe requests of its
    /// viewers go to `keyframes`. Fails when the room has a publisher here.
    pub(crate) async fn open_pull(
        &self,
        room: &RoomId,
        keyframes: tokio::sync::mpsc::Sender<Option<String>>,
    ) -> Result<Result<SessionId, SfuError>, ShardGone> {
        let shard = self.for_room(room).clone();
        // Marked first, so the source never counts as a publisher here.
        if let Ok(mut p) = self.pulled.lock() {
            p.insert(room.clone());
        }
        let opened = shard
            .open_source(room.clone(), NODE_RELAY_OWNER.to_owned())
            .await;
        match &opened {
            Ok(Ok(_)) => {
                if let Ok(mut u) = self.upstream.lock() {
                    u.insert(room.clone(), keyframes);
                }
            }
            _ => {
                if let Ok(mut p) = self.pulled.lock() {
                    p.remove(room);
                }
            }
        }
        Ok(opened?.map(|(id, _)| id))
    }

    /// Closes a relay source opened with [`ShardHandle::open_pull`].
    pub(crate) async fn close_pull(&self, room: &RoomId, source: SessionId) {
        if let Ok(mut u) = self.upstream.lock() {
            u.remove(room);
        }
        let _ = self
            .for_room(room)
            .clone()
            .close(room.clone(), source)
            .await;
        if let Ok(mut p) = self.pulled.lock() {
            p.remove(room);
        }
    }

    /// Hands a frame relayed from another node to `room`'s relay source
    /// without waiting (a full queue drops it and counts it).
    pub(crate) fn relayed(
        &self,
        room: &RoomId,
        source: SessionId,
        generation: u64,
        frame: MediaFrame,
    ) {
        self.for_room(room).post(Command::Relayed {
            source,
            generation,
            frame,
        });
    }

    /// The first shard's UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.shards[0].local_addr()
    }

    /// The I/O backend the shards run.
    pub fn backend(&self) -> Backend {
        self.shards[0].backend()
    }

    /// Stats of all shards together; `updated` is the stalest shard's.
    pub fn stats(&self) -> ShardStats {
        let mut total = ShardStats::default();
        let pulled = self.pulled.lock().map(|p| p.clone()).unwrap_or_default();
        let n = self.shards.len();
        for (i, shard) in self.shards.iter().enumerate() {
            let s = shard.stats();
            total.publishers += s.publishers;
            total.subscribers += s.subscribers;
            // A room is published here only by its home shard's publisher:
            // relay sources (from the home shard, or from another node)
            // make other rooms look live.
            total.rooms.extend(s.rooms.into_iter().map(|mut r| {
                r.live &= home_index(&r.room, n) == i && !pulled.contains(&r.room);
                r
            }));
            total.egress_bps += s.egress_bps;
            total.counters.datagrams_in += s.counters.datagrams_in;
            total.counters.datagrams_out += s.counters.datagrams_out;
            total.counters.bytes_out += s.counters.bytes_out;
            total.counters.frames_forwarded += s.counters.frames_forwarded;
            total.updated = match (i, total.updated, s.updated) {
                (0, _, u) => u,
                (_, Some(a), Some(b)) => Some(a.min(b)),
                _ => None,
            };
        }
        total
    }

    pub async fn publish(
        &self,
        room: RoomId,
        owner: String,
        offer: String,
    ) -> Result<Result<Accepted, SfuError>, ShardGone> {
        self.for_room(&room)
            .clone()
            .publish(room, owner, offer)
            .await
    }

    pub async fn play(
        &self,
        room: RoomId,
        owner: String,
        offer: String,
    ) -> Result<Result<Accepted, SfuError>, ShardGone> {
        let home = home_index(&room, self.shards.len());
        // Place and reserve in one step, so viewers arriving together do not
        // all see the same count (the reservation is returned on failure).
        let target = {
            let _placing = self.placing.lock();
            let target = self.place_viewer(&room);
            self.shards[target].viewers.fetch_add(1, Ordering::Relaxed);
            target
        };
        let shard = &self.shards[target];
        let release = || {
            let _ = shard
                .viewers
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        };
        if target != home
            && let Err(e) = self.ensure_relay(&room, home, target).await
        {
            release();
            return Err(e);
        }
        let result = match shard.clone().play(room, owner, offer).await {
            Ok(r) => r,
            Err(e) => {
                release();
                return Err(e);
            }
        };
        match &result {
            Ok(accepted) => {
                if target != home
                    && let Ok(mut v) = self.viewers.lock()
                {
                    v.insert(accepted.session.clone(), target);
                }
            }
            Err(_) => release(),
        }
        Ok(result)
    }

    pub async fn close(
        &self,
        room: RoomId,
        session: SessionId,
    ) -> Result<Result<Role, SfuError>, ShardGone> {
        if let Ok(mut s) = self.sources.lock() {
            s.remove(&session);
        }
        let shard = self.for_session(&room, &session).clone();
        if let Ok(mut v) = self.viewers.lock() {
            v.remove(&session);
        }
        shard.close(room, session).await
    }

    pub async fn trickle(
        &self,
        room: RoomId,
        session: SessionId,
        sdpfrag: String,
    ) -> Result<Result<usize, SfuError>, ShardGone> {
        self.for_session(&room, &session)
            .clone()
            .trickle(room, session, sdpfrag)
            .await
    }

    /// Hands `room`'s frames (those of its WHIP publisher `publisher`, from
    /// now until it leaves) to `tap`.
    pub fn media_tap(
        &self,
        room: RoomId,
        publisher: SessionId,
        tap: crate::transcode::whip::MediaTap,
    ) {
        self.for_room(&room).post(Command::MediaTap {
            room,
            publisher,
            tap,
        });
    }

    /// Caps the video layer viewer `session` of `room` gets at `layer` (a
    /// simulcast rid or a rendition name, `360p`); `None` lifts the cap.
    pub async fn set_max_layer(
        &self,
        room: RoomId,
        session: SessionId,
        layer: Option<String>,
    ) -> Result<Result<(), SfuError>, ShardGone> {
        self.for_session(&room, &session)
            .clone()
            .set_max_layer(session, layer)
            .await
    }

    /// Opens a non-WebRTC publisher (SRT ingest) for `room`; same takeover
    /// rule as WHIP. Returns the source's session and the one it replaced.
    pub async fn open_source(
        &self,
        room: RoomId,
        owner: String,
    ) -> Result<Result<(SessionId, Option<SessionId>), SfuError>, ShardGone> {
        let shard = self.for_room(&room).clone();
        let result = shard.open_source(room, owner).await?;
        if let (Ok((id, replaced)), Ok(mut s)) = (&result, self.sources.lock()) {
            s.insert(id.clone(), shard.index());
            if let Some(old) = replaced {
                s.remove(old);
            }
        }
        Ok(result)
    }

    /// Hands a source's frame to its shard without waiting; see
    /// [`Shard::push_frame`]. Frames of unknown sources are dropped.
    pub fn push_frame(&self, source: SessionId, frame: MediaFrame) -> Result<(), ShardGone> {
        let index = self
            .sources
            .lock()
            .ok()
            .and_then(|s| s.get(&source).copied());
        match index.and_then(|i| self.shards.get(i)) {
            Some(shard) => shard.push_frame(source, frame),
            None => {
                metrics::counter!("weir_source_frames_dropped_total").increment(1);
                Ok(())
            }
        }
    }
}

/// Stops every shard of a node.
#[derive(Clone, Default)]
pub struct ShardStop {
    stop: Arc<AtomicBool>,
    wakers: Arc<Mutex<Vec<Waker>>>,
}

impl ShardStop {
    /// Asks every shard to stop; they finish their current loop turn.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Ok(w) = self.wakers.lock() {
            for w in w.iter() {
                w.wake();
            }
        }
    }
}

/// Starts shard number `index` on `socket` with the I/O backend `io` (and
/// GSO sends when `gso`).
/// `candidate` is the address offered to peers (the bound one unless the
/// node is behind a public IP). `peers`, `channels` and `upstream` are the
/// node-wide slots every shard shares.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    index: usize,
    socket: std::net::UdpSocket,
    candidate: SocketAddr,
    io: IoChoice,
    gso: bool,
    stop: &ShardStop,
    peers: &Peers,
    channels: &ChannelSinkSlot,
    upstream: &Upstream,
) -> std::io::Result<(Shard, std::thread::JoinHandle<()>)> {
    let local_addr = socket.local_addr()?;
    let (io, waker) = udp::open(socket, io, gso)?;
    let backend = io.backend();
    let (tx, rx) = mpsc::sync_channel(COMMAND_QUEUE);
    let stats = Arc::new(Mutex::new(ShardStats::default()));
    if let Ok(mut w) = stop.wakers.lock() {
        w.push(waker.clone());
    }
    let viewers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handle = Shard {
        index,
        commands: tx,
        waker,
        stats: stats.clone(),
        local_addr,
        backend,
        viewers: viewers.clone(),
    };
    let stop = stop.stop.clone();
    let peers = peers.clone();
    let channels = channels.clone();
    let upstream = upstream.clone();
    let thread = std::thread::Builder::new()
        .name(format!("weir-shard-{index}"))
        .spawn(move || {
            let config = SfuConfig {
                local_addrs: vec![candidate],
                ..SfuConfig::default()
            };
            let sfu = Sfu::new(config, Instant::now());
            tracing::info!(shard = index, udp = %local_addr, io = backend.as_str(), "shard running");
            let mut ctx = Ctx {
                index,
                peers,
                viewers,
                taps: HashMap::new(),
                upstream,
                generations: HashMap::new(),
                channels,
                media_taps: HashMap::new(),
            };
            if let Err(e) = run(&mut ctx, io, local_addr, sfu, rx, &stats, &stop) {
                tracing::error!(shard = index, error = %e, "shard I/O failed; shard stopped");
            }
            tracing::info!(shard = index, "shard stopped");
        })?;
    Ok((handle, thread))
}

/// A shard loop's view of its node.
struct Ctx {
    index: usize,
    peers: Peers,
    viewers: Arc<std::sync::atomic::AtomicUsize>,
    /// Rooms whose frames go to relay sources on other shards or to edge
    /// nodes.
    taps: HashMap<RoomId, Vec<TapTarget>>,
    /// Keyframe requests of rooms pulled from other nodes.
    upstream: Upstream,
    /// Last publisher generation seen per relay source here.
    generations: HashMap<SessionId, u64>,
    channels: ChannelSinkSlot,
    /// Rooms whose frames go to HLS (WHIP publishers).
    media_taps: HashMap<RoomId, (SessionId, crate::transcode::whip::MediaTap)>,
}

impl Ctx {
    fn peer(&self, i: usize) -> Option<&Shard> {
        self.peers.get().and_then(|p| p.get(i))
    }
}

fn run(
    ctx: &mut Ctx,
    mut io: Box<dyn Io>,
    local_addr: SocketAddr,
    mut sfu: Sfu,
    commands: Receiver<Command>,
    stats: &Mutex<ShardStats>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let mut last = Counters::default();
    let mut last_report = Instant::now();
    let mut last_drops = 0;
    let shard = ctx.index.to_string();
    loop {
        while let Ok(cmd) = commands.try_recv() {
            handle_command(&mut sfu, cmd, ctx);
        }
        let deadline = drain(&mut sfu, io.as_mut(), ctx);
        io.flush()?;
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let now = Instant::now();
        if now.duration_since(last_report) >= Duration::from_secs(1) {
            publish_stats(
                &sfu,
                stats,
                &mut last,
                now.duration_since(last_report),
                &shard,
            );
            let drops = io.send_drops();
            metrics::counter!("weir_udp_send_dropped_total", "shard" => shard.clone())
                .increment(drops - last_drops);
            last_drops = drops;
            last_report = now;
        }
        let wake = deadline.min(last_report + Duration::from_secs(1));
        io.poll(wake, &mut |source, contents| {
            sfu.handle_input(Input::Receive {
                now: Instant::now(),
                source,
                destination: local_addr,
                contents,
            });
        })?;
        let now = Instant::now();
        if now >= deadline {
            sfu.handle_input(Input::Timeout(now));
        }
    }
}

/// Queues what the SFU has to send and returns when it next needs time.
fn drain(sfu: &mut Sfu, io: &mut dyn Io, ctx: &mut Ctx) -> Instant {
    loop {
        match sfu.poll_output() {
            Output::Transmit(t) => io.queue(t.destination, &t.contents),
            Output::Event(Event::KeyframeWanted { room, rid }) => {
                // Viewers here of a room relayed from its home shard.
                let n = ctx.peers.get().map_or(1, |p| p.len());
                if let Some(home) = ctx.peer(home_index(&room, n))
                    && home.index() != ctx.index
                {
                    home.post(Command::RoomKeyframe { room, rid });
                } else if let Some(up) =
                    ctx.upstream.lock().ok().and_then(|u| u.get(&room).cloned())
                {
                    // A room pulled from another node: its relay connection
                    // asks the origin (the SFU already coalesced requests).
                    let _ = up.try_send(rid);
                }
            }
            Output::Event(Event::ChannelOpened {
                session,
                room,
                role,
                owner,
                label,
            }) => {
                if let (Some(sink), Some(me)) = (ctx.channels.get(), ctx.peer(ctx.index)) {
                    sink.opened(
                        me.clone(),
                        ChannelOpened {
                            session,
                            room,
                            role,
                            owner,
                            label,
                        },
                    );
                }
            }
            Output::Event(Event::ChannelMessage {
                session,
                label,
                binary,
                data,
            }) => {
                if let Some(sink) = ctx.channels.get() {
                    sink.message(&session, &label, binary, data);
                }
            }
            Output::Event(Event::ChannelClosed { session, label }) => {
                if let Some(sink) = ctx.channels.get() {
                    sink.closed(&session, &label);
                }
            }
            Output::Event(e) => {
                if let Event::SessionClosed {
                    role: Role::Subscriber,
                    ..
                } = &e
                {
                    let _ = ctx
                        .viewers
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
                }
                if let Event::SessionClosed {
                    role: Role::Publisher,
                    room,
                    session,
                    ..
                } = &e
                    && ctx.media_taps.get(room).is_some_and(|(p, _)| p == session)
                {
                    // The publisher's HLS epoch ends with it (a publisher
                    // that took over has a tap of its own).
                    ctx.media_taps.remove(room);
                    if !ctx.taps.contains_key(room) {
                        sfu.set_tap(room, false);
                    }
                }
                record_event(e);
            }
            Output::Relay {
                room,
                generation,
                frame,
            } => {
                if let Some((_, tap)) = ctx.media_taps.get_mut(&room)
                    && !tap.offer(frame.clone())
                {
                    ctx.media_taps.remove(&room);
                }
                if let Some(taps) = ctx.taps.get_mut(&room) {
                    let peers = ctx.peers.get();
                    taps.retain(|tap| match tap {
                        TapTarget::Shard(edge, source) => {
                            if let Some(shard) = peers.and_then(|p| p.get(*edge)) {
                                shard.post(Command::Relayed {
                                    source: source.clone(),
                                    generation,
                                    frame: frame.clone(),
                                });
                            }
                            true
                        }
                        TapTarget::Remote(tap) => {
                            match tap.frames.try_send((generation, frame.clone())) {
                                Ok(()) => true,
                                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                                    tap.dropped.fetch_add(1, Ordering::Relaxed);
                                    metrics::counter!("weir_relay_frames_dropped_total", "side" => "origin")
                                        .increment(1);
                                    true
                                }
                                // The edge's connection is gone.
                                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
                            }
                        }
                    });
                    if taps.is_empty() {
                        ctx.taps.remove(&room);
                        if !ctx.media_taps.contains_key(&room) {
                            sfu.set_tap(&room, false);
                        }
                    }
                }
            }
            Output::Timeout(at) => return at,
        }
    }
}

fn handle_command(sfu: &mut Sfu, cmd: Command, ctx: &mut Ctx) {
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
        Command::Tap { room, edge, source } => {
            sfu.set_tap(&room, true);
            ctx.taps
                .entry(room)
                .or_default()
                .push(TapTarget::Shard(edge, source));
        }
        Command::TapRemote { room, tap } => {
            sfu.set_tap(&room, true);
            ctx.taps
                .entry(room)
                .or_default()
                .push(TapTarget::Remote(tap));
        }
        Command::Relayed {
            source,
            generation,
            frame,
        } => {
            let last = ctx.generations.insert(source.clone(), generation);
            if last.is_some_and(|g| g != generation) {
                // The home shard's publisher changed: viewers here resync at
                // its first keyframe, on a continuous timeline.
                let _ = sfu.renew_source(&source);
            }
            let _ = sfu.push_frame(now, &source, frame);
        }
        Command::RoomKeyframe { room, rid } => {
            sfu.request_room_keyframe(now, &room, rid.as_deref());
        }
        Command::MediaTap {
            room,
            publisher,
            tap,
        } => {
            // Only while that publisher is still the room's.
            if sfu.session(&publisher).is_some() {
                sfu.set_tap(&room, true);
                ctx.media_taps.insert(room, (publisher, tap));
            }
        }
        Command::SetMaxLayer {
            session,
            layer,
            reply,
        } => {
            let _ = reply.send(sfu.set_max_layer(now, &session, layer.as_deref()));
        }
        Command::ChannelSend {
            session,
            label,
            binary,
            messages,
            reply,
        } => {
            let refs: Vec<&[u8]> = messages.iter().map(|m| m.as_ref()).collect();
            let _ = reply.send(sfu.send_channel(now, &session, &label, binary, &refs));
        }
        Command::MoveViewers { max, keep, reply } => {
            let moved = sfu.move_viewers(max, |room| keep.contains(room));
            let _ = reply.send((moved, sfu.viewer_count()));
        }
    }
}

fn record_event(e: Event) {
    match e {
        Event::ChannelOpened { .. }
        | Event::ChannelMessage { .. }
        | Event::ChannelClosed { .. } => {}
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
                weir_sfu::CloseReason::Moved => "moved".to_owned(),
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
        Event::KeyframeWanted { room, .. } => {
            // Handled by the loop (sent to the room's home shard); here only
            // when the room's source is not a relay (SRT ingest keyframes
            // come when the encoder sends them).
            tracing::trace!(%room, "keyframe wanted from a source");
        }
        Event::SubscriberStats {
            session,
            room,
            layer,
            loss,
            nacks,
            plis,
            bitrate_bps,
            estimate_bps,
        } => {
            // Distributions over viewers, not a series per viewer: the
            // per-viewer detail is in the debug log.
            tracing::debug!(%room, %session, ?layer, ?loss, nacks, plis, bitrate_bps, ?estimate_bps, "viewer stats");
            if let Some(loss) = loss {
                metrics::histogram!("weir_subscriber_loss_ratio").record(f64::from(loss));
            }
            metrics::histogram!("weir_subscriber_bitrate_bps").record(bitrate_bps as f64);
            if let Some(e) = estimate_bps {
                metrics::histogram!("weir_subscriber_estimate_bps").record(e as f64);
            }
            metrics::counter!("weir_subscriber_layer_reports_total", "layer" => layer.unwrap_or_else(|| "single".into()))
                .increment(1);
        }
    }
}

fn publish_stats(
    sfu: &Sfu,
    stats: &Mutex<ShardStats>,
    last: &mut Counters,
    elapsed: Duration,
    shard: &str,
) {
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
            metrics::counter!($name, "shard" => shard.to_owned()).increment(c.$field - last.$field);
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
    delta!("weir_layer_switches_total", layer_switches);
    delta!("weir_subscriber_nacks_total", nacks_received);
    delta!("weir_subscriber_plis_total", plis_received);
    let shard = shard.to_owned();
    metrics::gauge!("weir_sessions", "role" => "publisher", "shard" => shard.clone())
        .set(publishers as f64);
    metrics::gauge!("weir_sessions", "role" => "subscriber", "shard" => shard.clone())
        .set(subscribers as f64);
    metrics::gauge!("weir_rooms", "shard" => shard.clone()).set(rooms.len() as f64);
    metrics::gauge!("weir_egress_bits_per_second", "shard" => shard).set(egress_bps as f64);
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
