//! SRT ingest: one SRT listener per node; each admitted caller's MPEG-TS is
//! demultiplexed and turned into frames for the room's WebRTC viewers —
//! H.264 as is (no re-encoding), AAC transcoded to Opus on a thread of its
//! own, Opus as is — and handed to the room's media services (HLS packager,
//! transcoder ladder, snapshots; see `crate::transcode`), which never make
//! ingest wait.
//!
//! Admission, in order: the streamid must parse (either form of
//! `weir_protocol::streamid`), ask to publish, carry a valid publish token
//! for its room; encryption must match the node's (a passphrase on both
//! sides or on neither); the room's origin must be claimable and the room
//! free (or published by the same token subject, who then takes over its
//! own stale session, as with WHIP). Every refusal is an SRT reject with a
//! reason code, a log line saying why, and `weir_srt_rejected_total{reason}`.

pub mod audio;
pub mod h264;
pub mod ts;
pub mod video;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use srt_protocol::packet::{CoreRejectReason, RejectReason, ServerRejectReason};
use srt_tokio::options::{ByteCount, KeySize, ListenerOptions, Passphrase, SocketOptions};
use srt_tokio::{ConnectionRequest, SrtListener};
use tokio::sync::{oneshot, watch};
use weir_protocol::{
    Mode, RoomId, SessionId, StreamId, StreamIdError, StreamMode, TokenError, TokenVerifier,
};
use weir_sfu::{Codec, MediaFrame, MediaKind, MediaTime, SfuError};

use crate::agent::{Agent, ClaimError};
use crate::shard::ShardHandle;
use crate::transcode::{MediaHub, RoomMedia};

use self::audio::{AacJob, AudioTranscoder};
use self::h264::H264Stream;
use self::ts::{Pes, StreamKind, TsDemuxer};
use self::video::{VideoJob, VideoTranscoder};

/// Settings of the SRT listener.
#[derive(Debug, Clone)]
pub struct SrtConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Passphrase callers must encrypt with (10 to 79 characters); `None`
    /// for unencrypted SRT.
    pub passphrase: Option<String>,
    /// Receive latency (SRT's buffer for retransmissions); the larger of the
    /// caller's and this one applies.
    pub latency: Duration,
}

impl SrtConfig {
    /// Defaults for `listen`: no passphrase, 120 ms latency (libsrt's default).
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            passphrase: None,
            latency: Duration::from_millis(120),
        }
    }

    /// Checks what SRT itself would refuse, before anything is bound.
    pub fn validate(&self) -> Result<(), IngestConfigError> {
        if let Some(p) = &self.passphrase
            && !(10..=79).contains(&p.len())
        {
            return Err(IngestConfigError::PassphraseLength(p.len()));
        }
        Ok(())
    }
}

/// Invalid SRT settings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestConfigError {
    /// SRT passphrases are 10 to 79 characters.
    #[error("--srt-passphrase must be 10 to 79 characters, not {0}")]
    PassphraseLength(usize),
}

/// Why an SRT caller was refused: the metric label and SRT reject code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Streamid,
    Mode,
    Token,
    Forbidden,
    Busy,
    Encryption,
    Unavailable,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::Streamid => "streamid",
            Refusal::Mode => "mode",
            Refusal::Token => "token",
            Refusal::Forbidden => "forbidden",
            Refusal::Busy => "busy",
            Refusal::Encryption => "encryption",
            Refusal::Unavailable => "unavailable",
        }
    }

    fn reason(self) -> RejectReason {
        match self {
            Refusal::Streamid => RejectReason::Server(ServerRejectReason::BadRequest),
            Refusal::Mode => RejectReason::Server(ServerRejectReason::BadMode),
            Refusal::Token => RejectReason::Server(ServerRejectReason::Unauthorized),
            Refusal::Forbidden => RejectReason::Server(ServerRejectReason::Forbidden),
            Refusal::Busy => RejectReason::Server(ServerRejectReason::Conflict),
            Refusal::Encryption => RejectReason::Core(CoreRejectReason::BadSecret),
            Refusal::Unavailable => RejectReason::Server(ServerRejectReason::Down),
        }
    }
}

/// What ingest needs from the node.
#[derive(Clone)]
pub(crate) struct IngestContext {
    pub shard: ShardHandle,
    pub verifier: Arc<TokenVerifier>,
    pub agent: Arc<Agent>,
    pub media: MediaHub,
}

/// A bound SRT listener, not yet serving.
pub(crate) struct SrtIngest {
    listener: SrtListener,
    incoming: srt_tokio::SrtIncoming,
    local_addr: SocketAddr,
    config: SrtConfig,
}

fn socket_options(config: &SrtConfig) -> SocketOptions {
    let mut o = SocketOptions::default();
    o.receiver.latency = config.latency;
    o.sender.peer_latency = config.latency;
    // Many publishers share the one socket: give the kernel room to queue.
    o.connect.udp_recv_buffer_size = ByteCount(8 * 1024 * 1024);
    o.connect.udp_send_buffer_size = ByteCount(1024 * 1024);
    o
}

impl SrtIngest {
    /// Binds the listener's UDP socket.
    pub async fn bind(config: SrtConfig) -> anyhow::Result<Self> {
        config.validate()?;
        // Bound first, then validated with the port it got: the library
        // refuses port 0 (which tests and `--srt HOST:0` use).
        let mut socket_opts = socket_options(&config);
        socket_opts.connect.local = config.listen;
        let socket = srt_tokio::bind_socket(&socket_opts).await?;
        let local_addr = socket.local_addr()?;
        let options = ListenerOptions::with(local_addr, socket_opts)
            .map_err(|e| anyhow::anyhow!("SRT listener options: {e}"))?;
        let (listener, incoming) = SrtListener::bind_with_socket(options, socket).await?;
        Ok(Self {
            listener,
            incoming,
            local_addr,
            config,
        })
    }

    /// Where SRT callers connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Admits callers until `shutdown`. If the SRT library's listener task
    /// dies (it panics on some malformed handshakes), the listener is bound
    /// again so the node keeps taking publishers.
    pub async fn serve(self, ctx: IngestContext, mut shutdown: watch::Receiver<bool>) {
        let Self {
            listener,
            mut incoming,
            local_addr,
            config,
        } = self;
        let mut listener = Some(listener);
        let registry = Arc::new(Registry::default());
        tracing::info!(srt = %local_addr, encrypted = config.passphrase.is_some(), "SRT listener running");
        loop {
            tokio::select! {
                request = incoming.incoming().next() => match request {
                    Some(request) => {
                        let ctx = ctx.clone();
                        let registry = registry.clone();
                        let passphrase = config.passphrase.clone();
                        let shutdown = shutdown.clone();
                        tokio::spawn(async move {
                            handle_request(ctx, registry, passphrase, request, shutdown).await;
                        });
                    }
                    None => {
                        tracing::error!(srt = %local_addr, "SRT listener stopped; binding it again");
                        metrics::counter!("weir_srt_listener_restarts_total").increment(1);
                        drop(listener.take());
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        let mut again = config.clone();
                        again.listen = local_addr;
                        match SrtIngest::bind(again).await {
                            Ok(new) => {
                                listener = Some(new.listener);
                                incoming = new.incoming;
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "cannot bind the SRT listener again; SRT ingest is down");
                                return;
                            }
                        }
                    }
                },
                _ = shutdown.changed() => break,
            }
        }
        if let Some(mut l) = listener {
            // The library's close waits for its task; bound it.
            let _ = tokio::time::timeout(Duration::from_secs(2), l.close()).await;
        }
    }
}

/// Live SRT connections by source session, so a takeover stops the old one.
#[derive(Default)]
struct Registry {
    stops: Mutex<HashMap<SessionId, oneshot::Sender<()>>>,
}

impl Registry {
    fn insert(&self, session: SessionId) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut m) = self.stops.lock() {
            m.insert(session, tx);
        }
        rx
    }

    fn stop(&self, session: &SessionId) {
        if let Some(tx) = self.stops.lock().ok().and_then(|mut m| m.remove(session)) {
            let _ = tx.send(());
        }
    }

    fn remove(&self, session: &SessionId) {
        if let Ok(mut m) = self.stops.lock() {
            m.remove(session);
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

struct Admitted {
    room: RoomId,
    session: SessionId,
    replaced: Option<SessionId>,
}

/// The admission checks, in order; the error says why and how to answer.
async fn admit(
    ctx: &IngestContext,
    streamid: Option<&str>,
    encrypted: bool,
    passphrase: bool,
) -> Result<Admitted, (Refusal, String)> {
    let raw = streamid.unwrap_or("");
    let id = StreamId::parse(raw).map_err(|e| match e {
        StreamIdError::UnknownMode(_) => (Refusal::Mode, e.to_string()),
        e => (Refusal::Streamid, e.to_string()),
    })?;
    if id.mode != StreamMode::Publish {
        return Err((
            Refusal::Mode,
            format!(
                "mode {} is not served over SRT here: publish with m=publish, play over WHEP or HLS",
                id.mode.as_str()
            ),
        ));
    }
    let Some(token) = id.token.as_deref() else {
        return Err((
            Refusal::Token,
            "no token: add t=TOKEN (a publish token for this room)".into(),
        ));
    };
    let claims = ctx
        .verifier
        .authorize(token, &id.room, Mode::Publish, unix_now())
        .map_err(|e| match e {
            TokenError::WrongRoom { .. } | TokenError::WrongMode { .. } => {
                (Refusal::Forbidden, e.to_string())
            }
            e => (Refusal::Token, e.to_string()),
        })?;
    match (encrypted, passphrase) {
        (true, false) => {
            return Err((
                Refusal::Encryption,
                "the caller encrypts but this node has no SRT passphrase".into(),
            ));
        }
        (false, true) => {
            return Err((
                Refusal::Encryption,
                "this node requires SRT encryption (passphrase)".into(),
            ));
        }
        _ => {}
    }
    ctx.agent.claim_room(&id.room).await.map_err(|e| match e {
        ClaimError::ElsewhereLive { .. } => (Refusal::Busy, e.to_string()),
    })?;
    let (session, replaced) = match ctx.shard.open_source(id.room.clone(), claims.sub).await {
        Err(_) => return Err((Refusal::Unavailable, "the node is shutting down".into())),
        Ok(Err(e @ SfuError::RoomBusy(_))) => return Err((Refusal::Busy, e.to_string())),
        Ok(Err(e)) => return Err((Refusal::Unavailable, e.to_string())),
        Ok(Ok(v)) => v,
    };
    Ok(Admitted {
        room: id.room,
        session,
        replaced,
    })
}

/// Keeps logs safe and short: the token is a credential.
fn redact(streamid: Option<&str>) -> String {
    let Some(s) = streamid else {
        return "<none>".into();
    };
    let mut out = String::new();
    for (i, part) in s.split([',', '&', '?']).enumerate() {
        if i > 0 {
            out.push('|');
        }
        match part.split_once('=') {
            Some((k, _)) if matches!(k.trim(), "t" | "token") => {
                out.push_str(k);
                out.push_str("=…");
            }
            _ => out.push_str(part),
        }
    }
    out.chars().take(160).collect()
}

async fn handle_request(
    ctx: IngestContext,
    registry: Arc<Registry>,
    passphrase: Option<String>,
    request: ConnectionRequest,
    shutdown: watch::Receiver<bool>,
) {
    let remote = request.remote();
    let streamid = request.stream_id().map(|s| s.to_string());
    let key_size = request.key_size();
    let encrypted = key_size != KeySize::Unspecified;
    let admitted = admit(&ctx, streamid.as_deref(), encrypted, passphrase.is_some()).await;
    let Admitted {
        room,
        session,
        replaced,
    } = match admitted {
        Ok(a) => a,
        Err((refusal, why)) => {
            tracing::warn!(
                peer = %remote,
                streamid = %redact(streamid.as_deref()),
                reason = refusal.label(),
                error = %why,
                "SRT publisher refused"
            );
            metrics::counter!("weir_srt_rejected_total", "reason" => refusal.label()).increment(1);
            let _ = request.reject(refusal.reason()).await;
            return;
        }
    };
    if let Some(old) = &replaced {
        tracing::info!(%room, replaced = %old, "SRT publisher reconnected and took over its session");
        registry.stop(old);
    }
    let keys = match passphrase.map(Passphrase::try_from) {
        Some(Ok(p)) => Some(srt_protocol_keys(key_size, p)),
        Some(Err(_)) | None => None,
    };
    let socket = match request.accept(keys).await {
        Ok(s) => s,
        Err(e) => {
            // Typically a wrong passphrase: the library refuses the
            // handshake after our admission.
            tracing::warn!(%room, peer = %remote, error = %e, "SRT handshake failed");
            metrics::counter!("weir_srt_rejected_total", "reason" => "handshake").increment(1);
            let _ = ctx.shard.close(room, session).await;
            return;
        }
    };
    let stop = registry.insert(session.clone());
    tracing::info!(%room, %session, peer = %remote, "SRT publisher connected");
    metrics::counter!("weir_srt_connections_total").increment(1);
    metrics::gauge!("weir_srt_connections").increment(1.0);
    let span = tracing::info_span!("srt", %room, %session);
    let ended = {
        let _enter = span.enter();
        drop(_enter);
        run_connection(&ctx, &room, &session, socket, stop, shutdown).await
    };
    metrics::gauge!("weir_srt_connections").decrement(1.0);
    registry.remove(&session);
    let _ = ctx.shard.close(room.clone(), session.clone()).await;
    tracing::info!(%room, %session, reason = ended, "SRT publisher ended");
}

/// `KeySettings` lives in srt-protocol's settings module, which srt-tokio
/// does not re-export; the two crates are released together.
fn srt_protocol_keys(
    key_size: KeySize,
    passphrase: Passphrase,
) -> srt_protocol::settings::KeySettings {
    srt_protocol::settings::KeySettings {
        key_size,
        passphrase,
    }
}

async fn run_connection(
    ctx: &IngestContext,
    room: &RoomId,
    session: &SessionId,
    mut socket: srt_tokio::SrtSocket,
    mut stop: oneshot::Receiver<()>,
    mut shutdown: watch::Receiver<bool>,
) -> &'static str {
    let shard = ctx.shard.clone();
    let source = session.clone();
    let sink: FrameSink = Arc::new(move |frame| {
        let _ = shard.push_frame(source.clone(), frame);
    });
    let mut bridge = Bridge::new(room.clone(), sink.clone());
    bridge.media = ctx.media.open(room, Some(sink));
    let mut demux = TsDemuxer::new();
    let mut pes = Vec::new();
    let mut reported = ts::DemuxStats::default();
    let mut origins: std::collections::VecDeque<(u64, Instant)> = Default::default();
    let mut pushes = 0u64;
    let ended = loop {
        let item = tokio::select! {
            item = socket.next() => item,
            _ = &mut stop => break "replaced",
            _ = shutdown.changed() => break "shutdown",
        };
        let (origin, bytes) = match item {
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                tracing::debug!(%room, error = %e, "SRT receive error");
                break "error";
            }
            None => break "closed",
        };
        metrics::counter!("weir_srt_bytes_received_total").increment(bytes.len() as u64);
        demux.push(&bytes, &mut pes);
        let now = Instant::now();
        // When the publisher sent each recent message (SRT's origin time on
        // our clock), by the demuxer's push count: a frame's send time is
        // that of the message that carried its start.
        pushes += 1;
        origins.push_back((pushes, origin));
        if origins.len() > 1024 {
            origins.pop_front();
        }
        for p in pes.drain(..) {
            let sent = origins
                .iter()
                .find(|(n, _)| *n == p.started)
                .map(|(_, t)| *t)
                .unwrap_or(origin);
            bridge.pes(p, now, sent);
        }
        let stats = demux.stats();
        if stats != reported {
            export_demux_stats(&reported, &stats);
            reported = stats;
        }
    };
    let _ = futures::SinkExt::close(&mut socket).await;
    ended
}

fn export_demux_stats(before: &ts::DemuxStats, now: &ts::DemuxStats) {
    metrics::counter!("weir_ts_corrupt_packets_total")
        .increment(now.corrupt_packets - before.corrupt_packets);
    metrics::counter!("weir_ts_continuity_errors_total")
        .increment(now.continuity_errors - before.continuity_errors);
    metrics::counter!("weir_ts_discontinuities_total")
        .increment(now.discontinuities - before.discontinuities);
    metrics::counter!("weir_ts_bad_sections_total")
        .increment(now.bad_sections - before.bad_sections);
}

/// Where finished frames go (the shard, in production).
pub(crate) type FrameSink = Arc<dyn Fn(MediaFrame) + Send + Sync>;

/// One connection's mapping from TS time to the room's media timeline.
///
/// Output time starts at 1 s (headroom for audio slightly ahead of video)
/// and follows the TS clock; at a discontinuity (a new epoch from the
/// demuxer) it continues from the last output time advanced by the wall
/// clock, so viewers see neither a jump back nor a leap.
struct Timeline {
    anchor: Option<Instant>,
    offset: i64,
    epoch: u32,
    last: Option<(i64, Instant)>,
}

const HEADROOM: i64 = 90_000;

impl Timeline {
    fn new() -> Self {
        Self {
            anchor: None,
            offset: 0,
            epoch: 0,
            last: None,
        }
    }

    /// Maps a 90 kHz TS time to (output 90 kHz time, its wall clock).
    fn map(&mut self, ts: i64, epoch: u32, now: Instant) -> (i64, Instant) {
        let anchor = *self.anchor.get_or_insert_with(|| {
            self.offset = ts - HEADROOM;
            self.epoch = epoch;
            now.checked_sub(Duration::from_secs(1)).unwrap_or(now)
        });
        if epoch != self.epoch {
            self.epoch = epoch;
            let target = match self.last {
                Some((last, at)) => {
                    last + (now.saturating_duration_since(at).as_micros() as i64 * 9 / 100).max(1)
                }
                None => HEADROOM,
            };
            self.offset = ts - target;
        }
        let out = (ts - self.offset).max(0);
        if self.last.is_none_or(|(l, _)| out > l) {
            self.last = Some((out, now));
        }
        (out, anchor + Duration::from_micros(out as u64 * 100 / 9))
    }
}

/// Turns demuxed PES into frames for the SFU.
struct Bridge {
    room: RoomId,
    sink: FrameSink,
    timeline: Timeline,
    h264: H264Stream,
    /// The first video PID followed; other video streams are ignored.
    video_pid: Option<u16>,
    audio_pid: Option<u16>,
    aac: Option<AudioTranscoder>,
    aac_failed: bool,
    /// Set once the stream shows B-frames: video then goes through the
    /// re-encoder (see `video.rs` for why).
    reencode: Option<VideoTranscoder>,
    reencode_failed: bool,
    warned_h265: bool,
    /// HLS, ladder and snapshots of this publisher.
    media: RoomMedia,
}

impl Bridge {
    fn new(room: RoomId, sink: FrameSink) -> Self {
        Self {
            room,
            sink,
            timeline: Timeline::new(),
            h264: H264Stream::new(),
            video_pid: None,
            audio_pid: None,
            aac: None,
            aac_failed: false,
            reencode: None,
            reencode_failed: false,
            warned_h265: false,
            media: RoomMedia::none(),
        }
    }

    fn pes(&mut self, p: Pes, now: Instant, sent: Instant) {
        match p.kind {
            StreamKind::H264 => self.h264(p, now, sent),
            StreamKind::H265 => {
                if !self.warned_h265 {
                    self.warned_h265 = true;
                    tracing::warn!(room = %self.room, "H.265 over SRT: WebRTC viewers get no video (browsers have no H.265 in WebRTC)");
                }
                metrics::counter!("weir_srt_unsupported_frames_total", "codec" => "h265")
                    .increment(1);
            }
            StreamKind::Aac => self.aac(p, now),
            StreamKind::Opus => self.opus(p, now),
        }
    }

    fn h264(&mut self, p: Pes, now: Instant, sent: Instant) {
        if *self.video_pid.get_or_insert(p.pid) != p.pid {
            return;
        }
        let Some(pts) = p.pts else {
            metrics::counter!("weir_srt_untimed_frames_total").increment(1);
            return;
        };
        // A DTS apart from the PTS means reordering: B-frames.
        if p.dts.is_some() && self.reencode.is_none() && !self.reencode_failed {
            self.start_reencoder();
        }
        let Some(au) = self.h264.access_unit(&p.data) else {
            return;
        };
        let (out, network_time) = self.timeline.map(pts, p.epoch, now);
        // HLS and the ladder take the stream as sent (B-frames and all),
        // decode time on the same timeline.
        let dts = out - (pts - p.dts.unwrap_or(pts)).clamp(0, 90_000);
        self.media.video(
            &au.data,
            au.keyframe,
            (out, dts),
            network_time,
            Some(wall_clock(sent)),
        );
        if let Some(reencoder) = self.reencode.as_mut() {
            let capture = Some(wall_clock(sent));
            reencoder.push(VideoJob {
                capture,
                au: au.data,
                keyframe: au.keyframe,
                pts: out,
                network_time,
            });
            return;
        }
        metrics::counter!("weir_srt_frames_total", "kind" => "video").increment(1);
        (self.sink)(video_frame(out, network_time, au, Some(wall_clock(sent))));
    }

    fn start_reencoder(&mut self) {
        let sink = self.sink.clone();
        let spawned = VideoTranscoder::spawn(
            format!("weir-h264-{}", self.room),
            move |unit, network_time, capture| {
                metrics::counter!("weir_srt_frames_total", "kind" => "video").increment(1);
                sink(video_frame(unit.time, network_time, unit.au, capture));
            },
        );
        match spawned {
            Ok(t) => {
                tracing::warn!(
                    room = %self.room,
                    "H.264 with B-frames over SRT: WebRTC players cannot decode B-frames, re-encoding video for them (set bframes=0 in the encoder to pass it through untouched)"
                );
                metrics::counter!("weir_srt_reencoded_streams_total").increment(1);
                self.reencode = Some(t);
            }
            Err(e) => {
                self.reencode_failed = true;
                tracing::error!(room = %self.room, error = %e, "cannot re-encode H.264 with B-frames; passing it through");
            }
        }
    }

    fn audio_pid_ok(&mut self, pid: u16) -> bool {
        *self.audio_pid.get_or_insert(pid) == pid
    }

    fn aac(&mut self, p: Pes, now: Instant) {
        if !self.audio_pid_ok(p.pid) {
            return;
        }
        let Some(pts) = p.pts else {
            metrics::counter!("weir_srt_untimed_frames_total").increment(1);
            return;
        };
        let frames = audio::adts_frames(&p.data);
        let (out, network_time) = self.timeline.map(pts, p.epoch, now);
        // HLS carries the AAC as it is.
        for (i, f) in frames.iter().enumerate() {
            let offset90 = i as i64 * 1024 * 90_000 / i64::from(f.rate);
            self.media.aac(f.data, out + offset90);
        }
        if self.aac_failed {
            return;
        }
        if self.aac.is_none() {
            let sink = self.sink.clone();
            let spawned = AudioTranscoder::spawn(
                format!("weir-aac-{}", self.room),
                move |packet, network_time| {
                    metrics::counter!("weir_srt_frames_total", "kind" => "audio").increment(1);
                    sink(opus_frame(packet.time, network_time, packet.data.into()));
                },
            );
            match spawned {
                Ok(t) => self.aac = Some(t),
                Err(e) => {
                    self.aac_failed = true;
                    tracing::error!(room = %self.room, error = %e, "cannot transcode AAC: viewers get no audio");
                    return;
                }
            }
        }
        let base48 = out * 48_000 / 90_000;
        let Some(aac) = &self.aac else {
            return;
        };
        for (i, f) in frames.into_iter().enumerate() {
            let offset = i as i64 * 1024 * 48_000 / i64::from(f.rate);
            aac.push(AacJob {
                adts: f.data.to_vec(),
                time: base48 + offset,
                network_time: network_time
                    + Duration::from_micros(offset as u64 * 1_000_000 / 48_000),
            });
        }
    }

    fn opus(&mut self, p: Pes, now: Instant) {
        if !self.audio_pid_ok(p.pid) {
            return;
        }
        let Some(pts) = p.pts else {
            return;
        };
        let (out, network_time) = self.timeline.map(pts, p.epoch, now);
        let mut time = out * 48_000 / 90_000;
        let mut wall = network_time;
        for packet in audio::opus_packets(&p.data) {
            let Some(duration) = audio::opus_duration(packet) else {
                continue;
            };
            metrics::counter!("weir_srt_frames_total", "kind" => "audio").increment(1);
            self.media.opus(packet, time);
            (self.sink)(opus_frame(time, wall, packet.into()));
            time += i64::from(duration);
            wall += Duration::from_micros(u64::from(duration) * 1_000_000 / 48_000);
        }
    }
}

/// `at` on the wall clock.
fn wall_clock(at: Instant) -> SystemTime {
    let now = Instant::now();
    let sys = SystemTime::now();
    if at <= now {
        sys.checked_sub(now - at).unwrap_or(sys)
    } else {
        sys + (at - now)
    }
}

/// A video frame for the SFU; `capture` (when the publisher sent it)
/// travels to viewers as abs-capture-time, so delay can be measured.
fn video_frame(
    time90: i64,
    network_time: Instant,
    au: h264::AccessUnit,
    capture: Option<SystemTime>,
) -> MediaFrame {
    MediaFrame {
        kind: MediaKind::Video,
        codec: Codec::H264,
        params: None,
        time: MediaTime::from_90khz(time90.max(0) as u64),
        network_time,
        keyframe: au.keyframe,
        rid: None,
        capture_time: capture.map(|capture_time| str0m::rtp::AbsCaptureTime {
            capture_time,
            clock_offset: None,
        }),
        data: au.data.into(),
    }
}

fn opus_frame(time48: i64, network_time: Instant, data: Arc<[u8]>) -> MediaFrame {
    MediaFrame {
        kind: MediaKind::Audio,
        codec: Codec::Opus,
        params: None,
        time: MediaTime::new(time48.max(0) as u64, str0m_frequency_48k()),
        network_time,
        keyframe: true,
        rid: None,
        capture_time: None,
        data,
    }
}

fn str0m_frequency_48k() -> str0m::media::Frequency {
    str0m::media::Frequency::FORTY_EIGHT_KHZ
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn timeline_starts_at_headroom_and_bridges_discontinuities() {
        let t0 = Instant::now();
        let mut t = Timeline::new();
        assert_eq!(t.map(5_000_000, 0, t0).0, HEADROOM);
        assert_eq!(t.map(5_003_000, 0, t0).0, HEADROOM + 3000);
        // The encoder restarted: its clock went back; output keeps rising
        // by the wall-clock gap (100 ms = 9000 ticks).
        let (out, _) = t.map(10, 1, t0 + Duration::from_millis(100));
        assert_eq!(out, HEADROOM + 3000 + 9000);
        assert_eq!(t.map(3010, 1, t0).0, HEADROOM + 3000 + 9000 + 3000);
        // Audio a little ahead of the first video time stays positive.
        let mut t = Timeline::new();
        t.map(1_000_000, 0, t0);
        assert_eq!(t.map(1_000_000 - 4500, 0, t0).0, HEADROOM - 4500);
    }

    #[test]
    fn network_time_follows_media_time() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let mut t = Timeline::new();
        let (_, w0) = t.map(0, 0, t0);
        let (_, w1) = t.map(90_000, 0, t0);
        assert_eq!(w1 - w0, Duration::from_secs(1));
        assert_eq!(w0, t0);
    }

    #[test]
    fn streamids_are_redacted_in_logs() {
        assert_eq!(
            redact(Some("#!::r=a,m=publish,t=secret")),
            "#!::r=a|m=publish|t=…"
        );
        assert_eq!(redact(Some("room?token=secret")), "room|token=…");
        assert_eq!(redact(None), "<none>");
    }

    #[test]
    fn short_passphrases_are_refused_before_binding() {
        let mut c = SrtConfig::new("127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")));
        assert!(c.validate().is_ok());
        c.passphrase = Some("short".into());
        assert!(c.validate().is_err());
    }
}
