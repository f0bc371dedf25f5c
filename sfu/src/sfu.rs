//! The SFU state machine: sessions, rooms and the forwarding between them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

// Every datagram and forwarded frame looks sessions up by id: foldhash is
// several times cheaper than SipHash on them and still seeded per map.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use str0m::change::SdpOffer;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid, Rid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpWrite, SeqNo, Vp8Descriptor};
use str0m::{Candidate, IceConnectionState, RtcConfig};
use weir_protocol::{RoomId, SessionId};

use crate::frame::MediaFrame;
use crate::gop::GopLimits;
use crate::layers::{LayerKey, Layers};
use crate::packetize::{Packetized, Packetizer};
use crate::session::{MAX_CHANNELS, Session};

/// Settings of one SFU (one shard).
#[derive(Debug, Clone)]
pub struct SfuConfig {
    /// Addresses of the shard's UDP socket, offered as ICE host candidates.
    pub local_addrs: Vec<SocketAddr>,
    /// Keyframe requests to a publisher are coalesced to at most one per
    /// interval, however many viewers ask.
    pub keyframe_request_interval: Duration,
    /// Bounds of each room's GOP cache (`max_frames: 0` disables it).
    pub gop: GopLimits,
}

impl Default for SfuConfig {
    fn default() -> Self {
        Self {
            local_addrs: Vec::new(),
            keyframe_request_interval: Duration::from_millis(500),
            gop: GopLimits::default(),
        }
    }
}

/// How often each viewer's stats are reported.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// Video packets kept per viewer for retransmission (NACK/RTX). str0m keeps
/// 1,000, over 6 s of a 1.5 Mbit/s stream and 1.2 MB per viewer, copied per
/// viewer; a NACK older than a second is useless to a live player. 512 is
/// 3 s at 1.5 Mbit/s, 0.7 s at 6 Mbit/s.
const VIEWER_VIDEO_RTX_PACKETS: usize = 512;

/// Bandwidth estimate a new viewer starts with, kbit/s.
const INITIAL_ESTIMATE_KBPS: u64 = 2_000;

/// Datagrams the SFU lets pile up before it stops polling sessions and
/// leaves the rest to [`Sfu::poll_output`]. A frame for hundreds of viewers
/// is then sent as it is encrypted, viewer by viewer, instead of only after
/// the last viewer's copy is ready (which had made every viewer wait for
/// the whole fan-out).
const OUT_CHUNK: usize = 64;

/// Whether a session publishes or plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Sends the room's media (WHIP).
    Publisher,
    /// Receives the room's media (WHEP).
    Subscriber,
    /// Publishes media that arrives another way than WebRTC (SRT ingest).
    Source,
}

impl Role {
    /// Lower-case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Publisher => "publisher",
            Role::Subscriber => "subscriber",
            Role::Source => "source",
        }
    }
}

/// Input to the SFU.
#[derive(Debug)]
pub enum Input<'a> {
    /// A datagram arrived on the shard's socket.
    Receive {
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        contents: &'a [u8],
    },
    /// Time passed.
    Timeout(Instant),
}

/// A datagram to send.
#[derive(Debug)]
pub struct Transmit {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub contents: Vec<u8>,
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client asked (WHIP/WHEP `DELETE`).
    Requested,
    /// ICE consent was lost (the peer went away).
    Disconnected,
    /// The same publisher reconnected and took over the room.
    Replaced,
    /// The WebRTC stack failed on this session.
    Failed(String),
    /// The node sent the viewer to play elsewhere ([`Sfu::move_viewers`]:
    /// the node is being drained).
    Moved,
}

/// Something that happened, for the caller's logs and metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// ICE and DTLS are up.
    SessionConnected {
        session: SessionId,
        room: RoomId,
        role: Role,
    },
    /// A session is gone.
    SessionClosed {
        session: SessionId,
        room: RoomId,
        role: Role,
        reason: CloseReason,
    },
    /// A subscriber got its first video keyframe, `after` the answer.
    FirstFrame {
        session: SessionId,
        room: RoomId,
        after: Duration,
    },
    /// A viewer of a room whose publisher is a source (a relay from another
    /// shard or node) needs a keyframe: ask upstream.
    KeyframeWanted { room: RoomId, rid: Option<String> },
    /// The peer opened a data channel (the first [`MAX_CHANNELS`] of a
    /// session count). `owner` is the token subject of the session.
    ChannelOpened {
        session: SessionId,
        room: RoomId,
        role: Role,
        owner: String,
        label: String,
    },
    /// A message arrived on one of the session's data channels.
    ChannelMessage {
        session: SessionId,
        label: String,
        binary: bool,
        data: Vec<u8>,
    },
    /// A data channel closed (also before `SessionClosed` ends a session
    /// with channels open).
    ChannelClosed { session: SessionId, label: String },
    /// Once a second per viewer: how its video fares.
    SubscriberStats {
        session: SessionId,
        room: RoomId,
        /// Simulcast layer (`None` without simulcast or before video starts).
        layer: Option<String>,
        /// Fraction of packets the viewer reports lost (RTCP receiver reports).
        loss: Option<f32>,
        /// NACKs and PLIs the viewer sent since the last report.
        nacks: u64,
        plis: u64,
        /// Video bit rate sent to the viewer over the last report interval.
        bitrate_bps: u64,
        /// Bandwidth estimate towards the viewer.
        estimate_bps: Option<u64>,
    },
}

/// Output of the SFU; drain until `Timeout`.
#[derive(Debug)]
pub enum Output {
    Transmit(Transmit),
    Event(Event),
    /// A frame of a tapped room, for the caller to hand to other shards or
    /// nodes that carry viewers of the room ([`Sfu::set_tap`]). `generation`
    /// changes when the room's publisher changes.
    Relay {
        room: RoomId,
        generation: u64,
        frame: MediaFrame,
    },
    /// Nothing more until this time (or new input).
    Timeout(Instant),
}

/// A WHIP/WHEP offer that was accepted.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub session: SessionId,
    pub answer_sdp: String,
    /// The session this one replaced (a publisher taking over its own room).
    pub replaced: Option<SessionId>,
}

/// Why a command was refused. Nothing changed in the SFU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SfuError {
    #[error("invalid SDP offer: {0}")]
    InvalidOffer(String),
    #[error("the offer has no {0}")]
    NoUsableMedia(&'static str),
    #[error("room {0} already has a publisher")]
    RoomBusy(RoomId),
    #[error("no such session in this room")]
    UnknownSession,
    #[error("invalid ICE candidate: {0}")]
    InvalidCandidate(String),
    #[error("ICE restart is not supported; start a new session")]
    IceRestartUnsupported,
    #[error("the session has no open data channel {0:?}")]
    NoChannel(String),
    #[error("bad layer name {0:?}: 1 to 8 letters, digits, '-' or '_'")]
    BadLayer(String),
}

/// A layer name as a rid (what RFC 8851 allows, in str0m's 8 bytes).
fn parse_rid(name: &str) -> Result<Rid, SfuError> {
    if name.is_empty()
        || name.len() > 8
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(SfuError::BadLayer(name.to_owned()));
    }
    Ok(Rid::from(name))
}

/// Monotonic counters of the SFU's work.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub datagrams_in: u64,
    pub bytes_in: u64,
    /// Datagrams that no session accepted, or that did not parse.
    pub datagrams_dropped: u64,
    pub datagrams_out: u64,
    pub bytes_out: u64,
    /// Media frames received from publishers.
    pub frames_in: u64,
    /// Media frames written to subscribers, and their payload bytes.
    pub frames_forwarded: u64,
    pub bytes_forwarded: u64,
    /// Frames a subscriber could not take (its codecs do not match).
    pub codec_mismatches: u64,
    /// Keyframe requests sent to publishers (after coalescing).
    pub keyframe_requests: u64,
    /// Viewers started from the GOP cache, without asking the publisher.
    pub gop_cache_starts: u64,
    /// Simulcast layer changes of viewers.
    pub layer_switches: u64,
    /// NACKs and PLIs received from viewers.
    pub nacks_received: u64,
    pub plis_received: u64,
}

/// A room as seen by this SFU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomSummary {
    pub room: RoomId,
    /// A publisher is connected.
    pub live: bool,
    pub subscribers: u32,
}

#[derive(Default)]
struct Room {
    publisher: Option<SessionId>,
    subscribers: Vec<SessionId>,
    /// Bumped when the publisher changes; subscribers rebase timestamps on it.
    generation: u64,
    /// When each layer was last asked for a keyframe (coalescing).
    keyframe_requests: HashMap<LayerKey, Instant>,
    /// The publisher's video layers, with their GOP caches.
    layers: Layers,
    /// The publisher sends simulcast (its offer had `a=simulcast`).
    simulcast: bool,
    /// Packetizes the room's audio (video is packetized per layer).
    audio: Option<Packetizer>,
    /// Frames fanned out so far, audio and video: where the next fan-out
    /// starts in `subscribers`, so that no viewer is always served last.
    turns: [usize; 2],
}

/// A publisher that is not a WebRTC peer: its frames are pushed in.
struct Source {
    room: RoomId,
    owner: String,
}

/// The forwarding core of one shard. See the crate docs for the drain rule.
pub struct Sfu {
    config: SfuConfig,
    rtc_config: RtcConfig,
    /// Largest RTP payload: what fits a datagram of the configured MTU once
    /// SRTP adds its tag, in whole cipher blocks (as str0m sizes its own).
    payload_mtu: usize,
    sessions: HashMap<SessionId, Session>,
    sources: HashMap<SessionId, Source>,
    rooms: HashMap<RoomId, Room>,
    /// 5-tuple demultiplexing: which session a remote address belongs to.
    by_addr: HashMap<SocketAddr, SessionId>,
    out: VecDeque<Output>,
    /// Sessions that need polling.
    dirty: Vec<SessionId>,
    counters: Counters,
    next_generation: u64,
    /// Latest time seen in any input.
    last_now: Instant,
    /// Sessions' next timeouts, earliest first. Entries go stale when a
    /// session's timeout moves or the session ends; they are checked
    /// against the session when popped, and the heap is rebuilt when stale
    /// entries outnumber live ones.
    timers: BinaryHeap<Reverse<(Instant, SessionId)>>,
    /// Rooms whose frames are also output as [`Output::Relay`].
    taps: HashSet<RoomId>,
}

impl std::fmt::Debug for Sfu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sfu")
            .field("sessions", &self.sessions.len())
            .field("rooms", &self.rooms.len())
            .finish_non_exhaustive()
    }
}

impl Sfu {
    /// A new SFU. [`crate::install_crypto_provider`] must have run.
    pub fn new(config: SfuConfig, now: Instant) -> Self {
        let mut rtc_config = RtcConfig::new()
            .set_ice_lite(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .enable_h264(true)
            // Capture times pass through to viewers (end-to-end delay).
            .set_extension(7, str0m::rtp::Extension::AbsoluteCaptureTime);
        // One DTLS certificate for all sessions of the shard: generating one
        // per session costs a key generation on the accept path.
        if let Some(cert) = str0m::crypto::from_feature_flags()
            .dtls_provider
            .generate_certificate()
        {
            rtc_config = rtc_config.set_dtls_cert(cert);
        }
        let srtp_tag = 16;
        let payload_mtu = rtc_config.mtu().saturating_sub(srtp_tag) / 16 * 16;
        Self {
            config,
            rtc_config,
            payload_mtu,
            sessions: HashMap::new(),
            sources: HashMap::new(),
            rooms: HashMap::new(),
            by_addr: HashMap::new(),
            out: VecDeque::new(),
            dirty: Vec::new(),
            counters: Counters::default(),
            next_generation: 1,
            last_now: now,
            timers: BinaryHeap::new(),
            taps: HashSet::new(),
        }
    }

    /// Counters since start.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Number of sessions (WebRTC peers and sources).
    pub fn session_count(&self) -> usize {
        self.sessions.len() + self.sources.len()
    }

    /// The room and role of a session.
    pub fn session(&self, id: &SessionId) -> Option<(&RoomId, Role)> {
        self.sessions
            .get(id)
            .map(|s| (&s.room, s.role))
            .or_else(|| self.sources.get(id).map(|s| (&s.room, Role::Source)))
    }

    /// Rooms with their publisher state and subscriber count.
    pub fn rooms(&self) -> Vec<RoomSummary> {
        self.rooms
            .iter()
            .map(|(id, r)| RoomSummary {
                room: id.clone(),
                live: r.publisher.as_ref().is_some_and(|p| {
                    self.sources.contains_key(p)
                        || self.sessions.get(p).is_some_and(|s| s.connected)
                }),
                subscribers: r.subscribers.len() as u32,
            })
            .collect()
    }

    /// Who publishes `room` now, if anyone: checked before a new publisher
    /// is admitted. The same owner may take over; anyone else is refused.
    fn takeover_check(&self, room: &RoomId, owner: &str) -> Result<Option<SessionId>, SfuError> {
        let Some(p) = self.rooms.get(room).and_then(|r| r.publisher.clone()) else {
            return Ok(None);
        };
        let current = self
            .sessions
            .get(&p)
            .map(|s| s.owner.as_str())
            .or_else(|| self.sources.get(&p).map(|s| s.owner.as_str()));
        match current {
            Some(o) if o == owner => Ok(Some(p)),
            Some(_) => Err(SfuError::RoomBusy(room.clone())),
            None => Ok(None),
        }
    }

    /// Makes `id` the room's publisher, replacing `replaced`.
    fn install_publisher(&mut self, room: RoomId, id: &SessionId, replaced: Option<&SessionId>) {
        if let Some(old) = replaced {
            self.close(old, CloseReason::Replaced);
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let r = self.rooms.entry(room).or_default();
        r.publisher = Some(id.clone());
        r.generation = generation;
        r.keyframe_requests.clear();
        r.layers.clear();
        r.simulcast = false;
        // Viewers stay attached and resume at the new publisher's first keyframe.
        for sub in &r.subscribers {
            if let Some(s) = self.sessions.get_mut(sub) {
                s.layer = None;
                s.pending_layer = None;
            }
        }
    }

    /// Accepts a WHIP offer. If the room has a publisher with the same
    /// `owner`, the new session takes over (an encoder reconnecting);
    /// another owner is refused.
    pub fn accept_publisher(
        &mut self,
        now: Instant,
        room: RoomId,
        owner: &str,
        offer_sdp: &str,
    ) -> Result<Accepted, SfuError> {
        let replaced = self.takeover_check(&room, owner)?;
        let id = self.accept(now, room.clone(), Role::Publisher, owner, offer_sdp)?;
        self.install_publisher(room.clone(), &id, replaced.as_ref());
        if let Some(r) = self.rooms.get_mut(&room) {
            r.simulcast = offer_sdp
                .lines()
                .any(|l| l.trim().starts_with("a=simulcast:"));
        }
        self.run(now);
        Ok(self.accepted(id, replaced))
    }

    /// Opens a publisher that is not a WebRTC peer (SRT ingest): its frames
    /// come in through [`Sfu::push_frame`]. Same takeover rule as WHIP.
    /// Returns the new session and the one it replaced.
    pub fn accept_source(
        &mut self,
        room: RoomId,
        owner: &str,
    ) -> Result<(SessionId, Option<SessionId>), SfuError> {
        let replaced = self.takeover_check(&room, owner)?;
        let id = SessionId::random();
        self.sources.insert(
            id.clone(),
            Source {
                room: room.clone(),
                owner: owner.to_owned(),
            },
        );
        self.install_publisher(room, &id, replaced.as_ref());
        Ok((id, replaced))
    }

    /// Also outputs every frame of `room` as [`Output::Relay`] (for viewers
    /// on other shards or nodes), or stops doing so.
    pub fn set_tap(&mut self, room: &RoomId, on: bool) {
        if on {
            self.taps.insert(room.clone());
        } else {
            self.taps.remove(room);
        }
    }

    /// Asks `room`'s publisher for a keyframe on behalf of viewers elsewhere
    /// (coalesced like any other request).
    pub fn request_room_keyframe(&mut self, now: Instant, room: &RoomId, rid: Option<&str>) {
        self.request_keyframe(now, room, rid.map(Rid::from));
        self.run(now);
    }

    /// Treats a source's next frames as a new publisher's (the publisher
    /// behind a relay changed): viewers resync at its first keyframe.
    pub fn renew_source(&mut self, source: &SessionId) -> Result<(), SfuError> {
        let room = self
            .sources
            .get(source)
            .map(|s| s.room.clone())
            .ok_or(SfuError::UnknownSession)?;
        self.install_publisher(room, source, None);
        Ok(())
    }

    /// Forwards a frame of a source opened with [`Sfu::accept_source`].
    pub fn push_frame(
        &mut self,
        now: Instant,
        source: &SessionId,
        frame: MediaFrame,
    ) -> Result<(), SfuError> {
        let room = self
            .sources
            .get(source)
            .map(|s| s.room.clone())
            .ok_or(SfuError::UnknownSession)?;
        self.last_now = self.last_now.max(now);
        self.counters.frames_in += 1;
        if frame.kind == MediaKind::Video
            && frame.rid.is_some()
            && let Some(r) = self.rooms.get_mut(&room)
        {
            // Layers (a transcoder's renditions, or a relayed simulcast
            // publisher): viewers from now on get a bandwidth estimate to
            // choose by.
            r.simulcast = true;
        }
        self.forward(now, &room, &frame);
        self.run(now);
        Ok(())
    }

    /// Caps the video layer a viewer gets at `layer` (a rid, or a
    /// transcoder's rendition name such as `360p`) where the room has it;
    /// `None` lifts the cap. Takes effect at the next keyframe.
    pub fn set_max_layer(
        &mut self,
        now: Instant,
        id: &SessionId,
        layer: Option<&str>,
    ) -> Result<(), SfuError> {
        let key = match layer {
            Some(l) => Some(parse_rid(l)?),
            None => None,
        };
        let s = self.sessions.get_mut(id).ok_or(SfuError::UnknownSession)?;
        if s.role != Role::Subscriber {
            return Err(SfuError::UnknownSession);
        }
        s.max_layer = key.map(Some);
        let room = s.room.clone();
        if s.layer.is_some() {
            self.reconsider_layer(now, &room, id);
        }
        Ok(())
    }

    /// Accepts a WHEP offer. The room need not be live yet: the viewer waits
    /// for its publisher.
    pub fn accept_subscriber(
        &mut self,
        now: Instant,
        room: RoomId,
        owner: &str,
        offer_sdp: &str,
    ) -> Result<Accepted, SfuError> {
        let id = self.accept(now, room.clone(), Role::Subscriber, owner, offer_sdp)?;
        self.rooms
            .entry(room)
            .or_default()
            .subscribers
            .push(id.clone());
        self.run(now);
        Ok(self.accepted(id, None))
    }

    fn accepted(&mut self, id: SessionId, replaced: Option<SessionId>) -> Accepted {
        let answer_sdp = self
            .sessions
            .get_mut(&id)
            .and_then(|s| s.answer.take())
            .unwrap_or_default();
        Accepted {
            session: id,
            answer_sdp,
            replaced,
        }
    }

    fn accept(
        &mut self,
        now: Instant,
        room: RoomId,
        role: Role,
        owner: &str,
        offer_sdp: &str,
    ) -> Result<SessionId, SfuError> {
        let offer = SdpOffer::from_sdp_string(offer_sdp)
            .map_err(|e| SfuError::InvalidOffer(e.to_string()))?;
        let mut config = self.rtc_config.clone();
        if role == Role::Subscriber {
            // Frames are packetized once for all viewers (`packetize`) and
            // written to each as RTP.
            config = config
                .set_rtp_mode(true)
                .set_stats_interval(Some(STATS_INTERVAL))
                .set_send_buffer_video(VIEWER_VIDEO_RTX_PACKETS);
            // The estimate towards each viewer picks its simulcast layer. Only
            // where there are layers to pick: str0m's estimator paces sends
            // at 1.1x its estimate, which only adds delay to a single stream.
            if self.rooms.get(&room).is_some_and(|r| r.simulcast) {
                config = config.enable_bwe(Some(str0m::bwe::Bitrate::kbps(INITIAL_ESTIMATE_KBPS)));
            }
        }
        let mut rtc = config.build(now);
        for addr in &self.config.local_addrs {
            if let Ok(c) = Candidate::host(*addr, "udp") {
                rtc.add_local_candidate(c);
            }
        }
        let answer = rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| SfuError::InvalidOffer(e.to_string()))?;
        let id = SessionId::random();
        let ufrag = offer_sdp
            .lines()
            .find_map(|l| l.trim().strip_prefix("a=ice-ufrag:"))
            .map(str::to_owned);
        let mut session = Session::new(id.clone(), room, role, owner.to_owned(), rtc, now, ufrag);
        session.answer = Some(answer.to_sdp_string());
        // The negotiated media: what a publisher sends us, what we send a viewer.
        for mid in offer_sdp
            .lines()
            .filter_map(|l| l.trim().strip_prefix("a=mid:"))
        {
            let Some(media) = session.rtc.media(Mid::from(mid)) else {
                continue;
            };
            let (kind, dir) = (media.kind(), media.direction());
            match role {
                Role::Publisher if matches!(dir, Direction::RecvOnly | Direction::SendRecv) => {
                    session.incoming.insert(media.mid(), kind);
                }
                Role::Subscriber if matches!(dir, Direction::SendOnly | Direction::SendRecv) => {
                    session.outgoing.push((media.mid(), kind));
                }
                _ => {}
            }
        }
        let usable = match role {
            Role::Publisher => !session.incoming.is_empty(),
            Role::Subscriber => !session.outgoing.is_empty(),
            Role::Source => false,
        };
        if !usable {
            return Err(SfuError::NoUsableMedia(match role {
                Role::Publisher => "audio or video to publish (need sendonly Opus, VP8 or H.264)",
                Role::Subscriber | Role::Source => {
                    "audio or video to receive (need recvonly Opus, VP8 or H.264)"
                }
            }));
        }
        self.sessions.insert(id.clone(), session);
        self.dirty.push(id.clone());
        self.run(now);
        Ok(id)
    }

    /// Ends a session at the client's request (`DELETE`). The session must
    /// belong to `room`.
    pub fn close_session(&mut self, room: &RoomId, id: &SessionId) -> Result<Role, SfuError> {
        let role = match self.session(id) {
            Some((r, role)) if r == room => role,
            _ => return Err(SfuError::UnknownSession),
        };
        self.close(id, CloseReason::Requested);
        Ok(role)
    }

    /// Writes messages to the session's open data channel `label`, in
    /// order, until one does not fit the channel's send buffer. Returns how
    /// many were written: the caller retries the rest later (or gives up on
    /// a peer that does not read).
    pub fn send_channel(
        &mut self,
        now: Instant,
        id: &SessionId,
        label: &str,
        binary: bool,
        messages: &[&[u8]],
    ) -> Result<usize, SfuError> {
        let s = self.sessions.get_mut(id).ok_or(SfuError::UnknownSession)?;
        let channel = s
            .channels
            .iter()
            .find(|(_, l)| l == label)
            .map(|(c, _)| *c)
            .ok_or_else(|| SfuError::NoChannel(label.to_owned()))?;
        let mut written = 0;
        if let Some(mut ch) = s.rtc.channel(channel) {
            for m in messages {
                match ch.write(binary, m) {
                    Ok(true) => written += 1,
                    Ok(false) => break,
                    Err(e) => {
                        tracing::debug!(session = %id, error = %e, "data channel write failed");
                        break;
                    }
                }
            }
        }
        self.dirty.push(id.clone());
        self.run(now);
        Ok(written)
    }

    /// Ends up to `max` viewers so that they play elsewhere (the node is
    /// being drained), oldest first (ties by session id, so the order is
    /// the same on every run); viewers of rooms for which `keep` answers
    /// true are left alone. Publishers and sources are never touched, and
    /// forwarding to the viewers that stay goes on as before. Each ended
    /// viewer is told in-band (RTCP BYE and a DTLS close_notify, queued as
    /// transmits) and reported as [`Event::SessionClosed`] with
    /// [`CloseReason::Moved`]. Returns the ended sessions; then drain
    /// [`Sfu::poll_output`].
    pub fn move_viewers(&mut self, max: usize, keep: impl Fn(&RoomId) -> bool) -> Vec<SessionId> {
        let mut viewers: Vec<(Instant, SessionId)> = self
            .sessions
            .values()
            .filter(|s| s.role == Role::Subscriber && !keep(&s.room))
            .map(|s| (s.created, s.id.clone()))
            .collect();
        viewers.sort_unstable();
        viewers.truncate(max);
        let moved: Vec<SessionId> = viewers.into_iter().map(|(_, id)| id).collect();
        for id in &moved {
            self.close(id, CloseReason::Moved);
        }
        moved
    }

    /// Viewers (WHEP sessions) of this SFU, connected or not.
    pub fn viewer_count(&self) -> usize {
        self.sessions
            .values()
            .filter(|s| s.role == Role::Subscriber)
            .count()
    }

    /// Adds trickled ICE candidates (a WHIP/WHEP `PATCH` body of type
    /// `application/trickle-ice-sdpfrag`). Returns how many were added.
    pub fn add_remote_candidates(
        &mut self,
        room: &RoomId,
        id: &SessionId,
        sdpfrag: &str,
    ) -> Result<usize, SfuError> {
        let session = match self.sessions.get_mut(id) {
            Some(s) if &s.room == room => s,
            _ => return Err(SfuError::UnknownSession),
        };
        let mut candidates = Vec::new();
        for line in sdpfrag.lines().map(str::trim) {
            if let Some(ufrag) = line.strip_prefix("a=ice-ufrag:") {
                if session.remote_ufrag.as_deref().is_some_and(|u| u != ufrag) {
                    return Err(SfuError::IceRestartUnsupported);
                }
            } else if let Some(c) = line.strip_prefix("a=")
                && c.starts_with("candidate:")
            {
                let c = Candidate::from_sdp_string(c)
                    .map_err(|e| SfuError::InvalidCandidate(e.to_string()))?;
                candidates.push(c);
            }
        }
        let n = candidates.len();
        for c in candidates {
            session.rtc.add_remote_candidate(c);
        }
        self.dirty.push(id.clone());
        Ok(n)
    }

    /// Feeds input; then drain [`Sfu::poll_output`].
    pub fn handle_input(&mut self, input: Input<'_>) {
        match input {
            Input::Receive {
                now,
                source,
                destination,
                contents,
            } => self.receive(now, source, destination, contents),
            Input::Timeout(now) => {
                let mut due: Vec<SessionId> = Vec::new();
                while let Some(Reverse((at, _))) = self.timers.peek() {
                    if *at > now {
                        break;
                    }
                    let Some(Reverse((at, id))) = self.timers.pop() else {
                        break;
                    };
                    // Only the entry matching the session's current timeout counts.
                    if let Some(s) = self.sessions.get_mut(&id)
                        && s.next_timeout == at
                        && s.timer_armed
                    {
                        s.timer_armed = false;
                        due.push(id);
                    }
                }
                if self.timers.len() > 4 * self.sessions.len() + 64 {
                    self.timers = self
                        .sessions
                        .values()
                        .filter(|s| s.timer_armed)
                        .map(|s| Reverse((s.next_timeout, s.id.clone())))
                        .collect();
                }
                due.sort();
                due.dedup();
                for id in due {
                    if let Some(s) = self.sessions.get_mut(&id)
                        && let Err(e) = s.rtc.handle_input(str0m::Input::Timeout(now))
                    {
                        let reason = CloseReason::Failed(e.to_string());
                        self.close(&id, reason);
                        continue;
                    }
                    self.dirty.push(id);
                }
                self.run(now);
            }
        }
    }

    /// Next output. Returns `Timeout` when there is nothing more to do.
    pub fn poll_output(&mut self) -> Output {
        loop {
            if let Some(o) = self.out.pop_front() {
                return o;
            }
            if self.dirty.is_empty() {
                break;
            }
            // The rest of a fan-out, a chunk at a time.
            self.run(self.last_now);
        }
        // Drop stale entries from the top so the answer is a live timeout.
        while let Some(Reverse((at, id))) = self.timers.peek() {
            if self
                .sessions
                .get(id)
                .is_some_and(|s| s.timer_armed && s.next_timeout == *at)
            {
                return Output::Timeout(*at);
            }
            self.timers.pop();
        }
        // With no sessions, nothing is due; a second is as good as forever.
        Output::Timeout(self.idle_deadline())
    }

    fn idle_deadline(&self) -> Instant {
        self.last_now + Duration::from_secs(1)
    }

    fn receive(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        contents: &[u8],
    ) {
        self.last_now = now;
        self.counters.datagrams_in += 1;
        self.counters.bytes_in += contents.len() as u64;
        let Ok(contents) = contents.try_into() else {
            self.counters.datagrams_dropped += 1;
            return;
        };
        let input = str0m::Input::Receive(
            now,
            Receive {
                proto: Protocol::Udp,
                source,
                destination,
                contents,
            },
        );
        let known = self
            .by_addr
            .get(&source)
            .filter(|id| {
                self.sessions
                    .get(*id)
                    .is_some_and(|s| s.rtc.accepts(&input))
            })
            .cloned();
        let id = match known {
            Some(id) => id,
            None => {
                let Some(s) = self.sessions.values().find(|s| s.rtc.accepts(&input)) else {
                    self.counters.datagrams_dropped += 1;
                    return;
                };
                let id = s.id.clone();
                self.by_addr.insert(source, id.clone());
                id
            }
        };
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if let Err(e) = s.rtc.handle_input(input) {
            // A bad packet from the peer ends only its own session.
            tracing::debug!(session = %id, error = %e, "session input failed");
            self.close(&id, CloseReason::Failed(e.to_string()));
            return;
        }
        self.dirty.push(id);
        self.run(now);
    }

    /// Polls dirty sessions until none is left or [`OUT_CHUNK`] datagrams
    /// wait to be taken; [`Sfu::poll_output`] goes on from there.
    fn run(&mut self, now: Instant) {
        self.last_now = self.last_now.max(now);
        let now = self.last_now;
        while self.out.len() < OUT_CHUNK
            && let Some(id) = self.dirty.pop()
        {
            self.stamp(now, &id);
            let events = self.poll_session(&id);
            for event in events {
                self.handle_rtc_event(now, &id, event);
            }
            let dead = self.sessions.get(&id).is_some_and(|s| !s.rtc.is_alive());
            if dead {
                self.close(&id, CloseReason::Disconnected);
            }
        }
    }

    /// Writes the frames queued for a viewer, then gives a viewer that was
    /// written packets since it was last polled a timeout: str0m only sends
    /// written packets once time has passed over them. Done right before the
    /// session's packets are taken, so a frame is written, encrypted and
    /// sent in one go while the session's state is in the cache.
    fn stamp(&mut self, now: Instant, id: &SessionId) {
        let Some(s) = self.sessions.get_mut(id) else {
            return;
        };
        let mut queued = std::mem::take(&mut s.queued);
        for (packets, generation) in queued.drain(..) {
            write_frame(
                s,
                now,
                generation,
                &packets,
                &mut self.counters,
                &mut self.out,
            );
        }
        s.queued = queued;
        if std::mem::take(&mut s.written)
            && let Err(e) = s.rtc.handle_input(str0m::Input::Timeout(now))
        {
            let reason = CloseReason::Failed(e.to_string());
            self.close(id, reason);
        }
    }

    /// Drains one session's output: transmits go out, events are returned.
    fn poll_session(&mut self, id: &SessionId) -> Vec<str0m::Event> {
        let mut events = Vec::new();
        let Some(s) = self.sessions.get_mut(id) else {
            return events;
        };
        loop {
            if !s.rtc.is_alive() {
                break;
            }
            match s.rtc.poll_output() {
                Ok(str0m::Output::Transmit(t)) => {
                    self.counters.datagrams_out += 1;
                    self.counters.bytes_out += t.contents.len() as u64;
                    self.out.push_back(Output::Transmit(Transmit {
                        source: t.source,
                        destination: t.destination,
                        contents: t.contents.into(),
                    }));
                }
                Ok(str0m::Output::Timeout(at)) => {
                    if s.next_timeout != at || !s.timer_armed {
                        s.next_timeout = at;
                        s.timer_armed = true;
                        self.timers.push(Reverse((at, id.clone())));
                    }
                    break;
                }
                Ok(str0m::Output::Event(e)) => events.push(e),
                Err(e) => {
                    tracing::debug!(session = %id, error = %e, "session poll failed");
                    s.rtc.disconnect();
                    break;
                }
            }
        }
        events
    }

    fn handle_rtc_event(&mut self, now: Instant, id: &SessionId, event: str0m::Event) {
        let Some(s) = self.sessions.get_mut(id) else {
            return;
        };
        match event {
            str0m::Event::Connected => {
                s.connected = true;
                let (room, role) = (s.room.clone(), s.role);
                self.out.push_back(Output::Event(Event::SessionConnected {
                    session: id.clone(),
                    room: room.clone(),
                    role,
                }));
                if role == Role::Subscriber && !self.start_from_cache(now, &room, id) {
                    let cap = self.sessions.get(id).and_then(|s| s.max_layer);
                    let key = self
                        .rooms
                        .get(&room)
                        .and_then(|r| r.layers.choose(None, None, cap));
                    self.request_keyframe(now, &room, key.flatten());
                }
            }
            str0m::Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                s.rtc.disconnect();
            }
            str0m::Event::MediaData(data) => {
                if s.role != Role::Publisher {
                    return;
                }
                let Some(kind) = s.incoming.get(&data.mid).copied() else {
                    return;
                };
                let room = s.room.clone();
                self.counters.frames_in += 1;
                if kind == MediaKind::Video && !data.contiguous {
                    self.request_keyframe(now, &room, data.rid);
                }
                self.forward(now, &room, &MediaFrame::from_media_data(kind, &data));
            }
            str0m::Event::KeyframeRequest(_) => {
                let room = s.room.clone();
                if s.role == Role::Subscriber {
                    let key = s.layer.flatten();
                    self.request_keyframe(now, &room, key);
                }
            }
            str0m::Event::MediaEgressStats(st)
                if s.role == Role::Subscriber && s.out_mid(MediaKind::Video) == Some(st.mid) =>
            {
                let (nacks, plis, bytes) = s.reported;
                s.reported = (st.nacks, st.plis, st.bytes);
                let (nacks, plis) = (st.nacks.saturating_sub(nacks), st.plis.saturating_sub(plis));
                self.counters.nacks_received += nacks;
                self.counters.plis_received += plis;
                let bitrate_bps =
                    st.bytes.saturating_sub(bytes) * 8 / STATS_INTERVAL.as_secs().max(1);
                self.out.push_back(Output::Event(Event::SubscriberStats {
                    session: id.clone(),
                    room: s.room.clone(),
                    layer: s.layer.flatten().map(|r| r.to_string()),
                    loss: st.loss,
                    nacks,
                    plis,
                    bitrate_bps,
                    estimate_bps: s.estimate_bps,
                }));
            }
            str0m::Event::ChannelOpen(channel, label) => {
                if s.channels.len() >= MAX_CHANNELS {
                    return;
                }
                s.channels.push((channel, label.clone()));
                self.out.push_back(Output::Event(Event::ChannelOpened {
                    session: id.clone(),
                    room: s.room.clone(),
                    role: s.role,
                    owner: s.owner.clone(),
                    label,
                }));
            }
            str0m::Event::ChannelData(d) => {
                if let Some(label) = s.channel_label(d.id) {
                    self.out.push_back(Output::Event(Event::ChannelMessage {
                        session: id.clone(),
                        label: label.to_owned(),
                        binary: d.binary,
                        data: d.data,
                    }));
                }
            }
            str0m::Event::ChannelClose(channel) => {
                if let Some(i) = s.channels.iter().position(|(c, _)| *c == channel) {
                    let (_, label) = s.channels.remove(i);
                    self.out.push_back(Output::Event(Event::ChannelClosed {
                        session: id.clone(),
                        label,
                    }));
                }
            }
            str0m::Event::EgressBitrateEstimate(str0m::bwe::BweKind::Twcc { estimate, .. })
                if s.role == Role::Subscriber =>
            {
                s.estimate_bps = Some(estimate.as_u64());
                let room = s.room.clone();
                self.reconsider_layer(now, &room, id);
            }
            _ => {}
        }
    }

    /// Asks the room's publisher for a keyframe of one layer, at most once
    /// per interval however many viewers ask.
    fn request_keyframe(&mut self, now: Instant, room: &RoomId, rid: Option<Rid>) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if r.keyframe_requests.get(&rid).is_some_and(|t| {
            now.saturating_duration_since(*t) < self.config.keyframe_request_interval
        }) {
            return;
        }
        if r.publisher
            .as_ref()
            .is_some_and(|p| self.sources.contains_key(p))
        {
            r.keyframe_requests.insert(rid, now);
            self.out.push_back(Output::Event(Event::KeyframeWanted {
                room: room.clone(),
                rid: rid.map(|r| r.to_string()),
            }));
            return;
        }
        let Some(p) = r.publisher.as_ref().and_then(|p| self.sessions.get_mut(p)) else {
            return;
        };
        if !p.connected {
            return;
        }
        let mids: Vec<_> = p
            .incoming
            .iter()
            .filter(|(_, k)| **k == MediaKind::Video)
            .map(|(m, _)| *m)
            .collect();
        let mut sent = false;
        for mid in mids {
            if let Some(mut w) = p.rtc.writer(mid) {
                sent |= w.request_keyframe(rid, KeyframeRequestKind::Pli).is_ok();
            }
        }
        if sent {
            r.keyframe_requests.insert(rid, now);
            self.counters.keyframe_requests += 1;
            self.dirty.push(p.id.clone());
        }
    }

    fn forward(&mut self, now: Instant, room: &RoomId, frame: &MediaFrame) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let (layer_index, new_layer, packets) = match frame.kind {
            MediaKind::Video => r
                .layers
                .record(now, frame, self.config.gop, self.payload_mtu),
            MediaKind::Audio => {
                let packets = Packetizer::run(&mut r.audio, frame, self.payload_mtu);
                (0, false, packets)
            }
        };
        let packets = Arc::new(packets);
        if new_layer {
            // Viewers capped at a layer that did not exist yet may now
            // move to it.
            let capped: Vec<SessionId> = r
                .subscribers
                .iter()
                .filter(|id| {
                    self.sessions
                        .get(*id)
                        .is_some_and(|s| s.max_layer.is_some())
                })
                .cloned()
                .collect();
            for id in capped {
                self.reconsider_layer(now, room, &id);
            }
        }
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if self.taps.contains(room) {
            self.out.push_back(Output::Relay {
                room: room.clone(),
                generation: r.generation,
                frame: frame.clone(),
            });
        }
        let mut wanted: Vec<LayerKey> = Vec::new();
        // Sessions are polled last-marked first: the fan-out's order turns
        // by one viewer per frame.
        let turn = &mut r.turns[usize::from(frame.kind == MediaKind::Video)];
        let start = *turn % r.subscribers.len().max(1);
        *turn = turn.wrapping_add(1);
        let (first, rest) = r.subscribers.split_at(start);
        for sub in rest.iter().chain(first) {
            let Some(s) = self.sessions.get_mut(sub) else {
                continue;
            };
            if !s.connected {
                continue;
            }
            if frame.kind == MediaKind::Video {
                if s.layer.is_none() && s.pending_layer.is_none() {
                    s.pending_layer = r.layers.choose(s.estimate_bps, None, s.max_layer);
                } else if s.pending_layer.is_none()
                    && let Some(current) = s.layer
                    && r.layers.is_behind(current)
                {
                    // Its layer fell behind (a transcoder that cannot keep
                    // up): move to the best layer that keeps pace.
                    let best = r.layers.choose(s.estimate_bps, None, s.max_layer);
                    if let Some(b) = best.filter(|b| *b != current) {
                        tracing::debug!(session = %s.id, from = ?current, to = ?b, "layer behind, moving off it");
                        s.pending_layer = Some(b);
                        wanted.push(b);
                    }
                }
                if s.pending_layer == Some(frame.rid) && frame.keyframe {
                    // Switch (or start) at this layer's keyframe: no freeze,
                    // the picture changes resolution at once.
                    if s.layer.is_some() {
                        self.counters.layer_switches += 1;
                    }
                    s.layer = Some(frame.rid);
                    s.pending_layer = None;
                } else if s.layer != Some(frame.rid) {
                    if let Some(p) = s.pending_layer
                        && p == frame.rid
                    {
                        wanted.push(p);
                    }
                    continue;
                }
            }
            // Each layer has its own timeline: a switch rebases like a new publisher.
            let generation = r.generation * 16 + layer_index as u64;
            s.queued.push((packets.clone(), generation));
            self.dirty.push(s.id.clone());
        }
        wanted.dedup();
        for key in wanted {
            self.request_keyframe(now, room, key);
        }
    }

    /// Moves a viewer towards the layer its new estimate allows, at that
    /// layer's next keyframe, and tells its bandwidth estimator what to probe
    /// for.
    fn reconsider_layer(&mut self, now: Instant, room: &RoomId, id: &SessionId) {
        let Some(r) = self.rooms.get(room) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(id) else {
            return;
        };
        let Some(current) = s.layer else {
            return;
        };
        let Some(best) = r.layers.choose(s.estimate_bps, Some(current), s.max_layer) else {
            return;
        };
        let top = r.layers.top_bps();
        if top > 0 {
            let floor = str0m::bwe::Bitrate::bps(r.layers.bps(current));
            let desired = str0m::bwe::Bitrate::bps(top + top / 5);
            s.rtc.bwe().set_bitrate(floor, desired);
        }
        if best == current {
            s.pending_layer = None;
            return;
        }
        if s.pending_layer != Some(best) {
            tracing::debug!(session = %id, from = ?current, to = ?best, estimate = ?s.estimate_bps, "layer switch");
            s.pending_layer = Some(best);
            self.request_keyframe(now, room, best);
        }
    }

    /// The video layer a viewer gets (`Some(None)` without simulcast), if its
    /// video has started.
    pub fn subscriber_layer(&self, id: &SessionId) -> Option<Option<String>> {
        let s = self.sessions.get(id)?;
        s.layer.map(|k| k.map(|rid| rid.to_string()))
    }

    /// Starts a new viewer's video from the GOP cache of the layer its
    /// estimate allows. Returns false when nothing is cached (the caller then
    /// asks the publisher).
    fn start_from_cache(&mut self, now: Instant, room: &RoomId, id: &SessionId) -> bool {
        let Some(r) = self.rooms.get(room) else {
            return false;
        };
        let Some(s) = self.sessions.get_mut(id) else {
            return false;
        };
        let Some(key) = r.layers.choose(s.estimate_bps, None, s.max_layer) else {
            return false;
        };
        let (Some(layer), Some(index)) = (r.layers.get(key), r.layers.index(key)) else {
            return false;
        };
        let frames = layer.gop.frames();
        if frames.is_empty() {
            return false;
        }
        s.layer = Some(key);
        s.pending_layer = None;
        let generation = r.generation * 16 + index as u64;
        for packets in frames {
            write_frame(
                s,
                now,
                generation,
                packets,
                &mut self.counters,
                &mut self.out,
            );
        }
        self.counters.gop_cache_starts += 1;
        self.dirty.push(id.clone());
        true
    }

    fn close(&mut self, id: &SessionId, reason: CloseReason) {
        let (room, role) = if let Some(mut s) = self.sessions.remove(id) {
            if reason == CloseReason::Moved {
                self.say_goodbye(&mut s);
            }
            s.rtc.disconnect();
            self.by_addr.retain(|_, v| v != id);
            for (_, label) in s.channels {
                self.out.push_back(Output::Event(Event::ChannelClosed {
                    session: id.clone(),
                    label,
                }));
            }
            (s.room, s.role)
        } else if let Some(s) = self.sources.remove(id) {
            (s.room, Role::Source)
        } else {
            return;
        };
        if let Some(r) = self.rooms.get_mut(&room) {
            if r.publisher.as_ref() == Some(id) {
                r.publisher = None;
            }
            r.subscribers.retain(|x| x != id);
            if r.publisher.is_none() {
                r.layers.clear();
                if r.subscribers.is_empty() {
                    self.rooms.remove(&room);
                }
            }
        }
        self.out.push_back(Output::Event(Event::SessionClosed {
            session: id.clone(),
            room,
            role,
            reason,
        }));
    }
}

impl Sfu {
    /// Closes a session's WebRTC gracefully and queues what that sends (RTCP
    /// BYE, DTLS close_notify): the peer learns at once that the session is
    /// over instead of after its ICE consent runs out.
    fn say_goodbye(&mut self, s: &mut Session) {
        if !s.connected || s.rtc.close().is_err() {
            return;
        }
        // Bounded: a close queues a handful of datagrams.
        for _ in 0..64 {
            if !s.rtc.is_alive() {
                break;
            }
            match s.rtc.poll_output() {
                Ok(str0m::Output::Transmit(t)) => {
                    self.counters.datagrams_out += 1;
                    self.counters.bytes_out += t.contents.len() as u64;
                    self.out.push_back(Output::Transmit(Transmit {
                        source: t.source,
                        destination: t.destination,
                        contents: t.contents.into(),
                    }));
                }
                Ok(str0m::Output::Event(_)) => {}
                Ok(str0m::Output::Timeout(_)) | Err(_) => break,
            }
        }
    }
}

/// Writes one frame's packets to one viewer (nothing when it takes no
/// media of that kind or codec).
fn write_frame(
    s: &mut Session,
    now: Instant,
    generation: u64,
    packets: &Packetized,
    counters: &mut Counters,
    out: &mut VecDeque<Output>,
) {
    let frame = &packets.frame;
    let Some(last) = packets.payloads.len().checked_sub(1) else {
        return;
    };
    let Some(mid) = s.out_mid(frame.kind) else {
        return;
    };
    let Some((pt, clock)) = s.pt_for(mid, frame) else {
        counters.codec_mismatches += 1;
        return;
    };
    let video = frame.kind == MediaKind::Video;
    let rebase = if video {
        &mut s.rebase_video
    } else {
        &mut s.rebase_audio
    };
    let time = rebase
        .map(generation, frame.time, now)
        .rebase(clock)
        .numer() as u32;
    let picture_id = packets
        .picture_id
        .map(|id| (id, s.vp8.map(generation, id)))
        .and_then(|(theirs, ours)| (theirs != ours).then_some(ours));
    let mut api = s.rtc.direct_api();
    let Some(stream) = api.stream_tx_by_mid(mid, None) else {
        return;
    };
    let seq = &mut s.next_seq[usize::from(video)];
    for (i, payload) in packets.payloads.iter().enumerate() {
        let mut w = RtpWrite::new(
            pt,
            SeqNo::from(*seq),
            time,
            frame.network_time,
            payload.clone(),
        )
        .marker(video && i == last)
        .nackable(video);
        *seq += 1;
        // On every packet of the frame, not only its first: the frame's
        // packets then have headers of one length, and a viewer's copy of
        // it leaves in one GSO send (equal segments), not two.
        if let Some(t) = frame.capture_time {
            w = w.ext_vals(ExtensionValues {
                abs_capture_time: Some(t),
                ..Default::default()
            });
        }
        if let Some(id) = picture_id {
            // The payloads carry the layer's picture id in the 15-bit form
            // (`packetize`), so this viewer's own always fits in place.
            match Vp8Descriptor::parse(payload).map(|d| d.patch().picture_id(id).build()) {
                Ok(Ok(patch)) => w = w.vp8_patch(patch),
                e => tracing::debug!(session = %s.id, error = ?e, "VP8 picture id not rewritten"),
            }
        }
        stream.write_rtp(w);
    }
    s.written = true;
    counters.frames_forwarded += 1;
    counters.bytes_forwarded += frame.data.len() as u64;
    if video && !s.first_frame_sent {
        s.first_frame_sent = true;
        out.push_back(Output::Event(Event::FirstFrame {
            session: s.id.clone(),
            room: s.room.clone(),
            after: now.saturating_duration_since(s.created),
        }));
    }
}
