//! The transcoder thread of one publisher: decodes the source once, scales
//! it to every rendition of the ladder and encodes each (keyframes where
//! the source has them), and takes snapshots of keyframes. Fed through a
//! bounded queue that never blocks the sender.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use ffmpeg_next as ffmpeg;
use weir_protocol::RoomId;

use super::Rendition;
use super::encoder::EncoderKind;
use super::ladder::LadderEncoder;
use super::snapshot::{JpegEncoder, SnapshotStore};
use crate::hls::RenditionFeed;
use crate::hls::segmenter::VideoIn;
use crate::ingest::FrameSink;
use crate::ingest::audio::{TranscodeError, init_ffmpeg};
use str0m::format::Codec;
use str0m::media::{MediaKind, MediaTime, Rid};
use weir_sfu::MediaFrame;

/// Access units queued before the transcoder drops (about half a second at
/// 30 fps: a transcoder that far behind is not keeping up).
const QUEUE: usize = 16;

/// What the thread needs.
pub(crate) struct Settings {
    pub room: RoomId,
    /// Renditions to encode; empty for snapshots only.
    pub ladder: Vec<Rendition>,
    pub encoder: Option<EncoderKind>,
    pub feed: Option<RenditionFeed>,
    pub snapshots: Option<(Duration, SnapshotStore)>,
    /// Where renditions go as video layers of the room's WebRTC viewers.
    pub layers: Option<FrameSink>,
    /// Test only: sleep per access unit.
    pub delay: Duration,
}

/// One source access unit.
pub(crate) struct Job {
    pub au: Bytes,
    pub pts: i64,
    pub dts: i64,
    pub keyframe: bool,
    pub queued: Instant,
    /// The source frame's wall-clock mapping and capture time, given to
    /// its renditions (the same instant of the stream).
    pub network_time: Instant,
    pub capture: Option<SystemTime>,
}

/// Source frames remembered to time their renditions (the encoder's delay
/// is a few frames).
const TIMES_KEPT: usize = 128;

/// The sending side; every call returns at once.
pub(crate) struct Transcoder {
    jobs: SyncSender<Job>,
    /// Every access unit is needed (a ladder); otherwise only a keyframe
    /// now and then, for a snapshot.
    all_frames: bool,
    skipping: bool,
    snapshot_every: Option<Duration>,
    next_snapshot: Instant,
}

impl Transcoder {
    /// Starts the thread.
    pub fn spawn(settings: Settings) -> Result<Self, TranscodeError> {
        init_ffmpeg()?;
        let (jobs, rx) = sync_channel(QUEUE);
        let all_frames = !settings.ladder.is_empty();
        let snapshot_every = settings.snapshots.as_ref().map(|(d, _)| *d);
        std::thread::Builder::new()
            .name(format!("weir-tx-{}", settings.room))
            .spawn(move || run(settings, rx))
            .map_err(|_| TranscodeError::Missing("a thread for the transcoder"))?;
        Ok(Self {
            jobs,
            all_frames,
            skipping: false,
            snapshot_every,
            next_snapshot: Instant::now(),
        })
    }

    /// Queues an access unit. With a ladder, a full queue drops it and
    /// everything up to the next keyframe (the decoder could not use it),
    /// counted in `weir_transcode_dropped_total{kind="ladder"}`.
    pub fn push(&mut self, job: Job) {
        if !self.all_frames {
            let Some(every) = self.snapshot_every else {
                return;
            };
            if !job.keyframe || job.queued < self.next_snapshot {
                return;
            }
            if self.jobs.try_send(job).is_ok() {
                self.next_snapshot = Instant::now() + every;
            }
            return;
        }
        if self.skipping && !job.keyframe {
            metrics::counter!("weir_transcode_dropped_total", "kind" => "ladder").increment(1);
            return;
        }
        match self.jobs.try_send(job) {
            Ok(()) => self.skipping = false,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.skipping = true;
                metrics::counter!("weir_transcode_dropped_total", "kind" => "ladder").increment(1);
            }
        }
    }
}

fn run(s: Settings, rx: Receiver<Job>) {
    let kind = s.encoder.unwrap_or(EncoderKind::X264);
    let mut jpeg = JpegEncoder::new();
    let mut snapshot_errors = 0u64;
    if s.ladder.is_empty() {
        // Snapshots only: each keyframe handed over is decoded alone.
        while let Ok(job) = rx.recv() {
            if let Err(e) = snapshot_of(&s, &mut jpeg, &job) {
                snapshot_errors += 1;
                if snapshot_errors.is_power_of_two() {
                    tracing::warn!(room = %s.room, error = %e, errors = snapshot_errors, "snapshot failed");
                }
            }
        }
        return;
    }
    let mut ladder = match LadderEncoder::new(s.room.to_string(), s.ladder.clone(), kind) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(room = %s.room, error = %e, "transcoder: no H.264 decoder");
            return;
        }
    };
    let Settings {
        room,
        mut feed,
        snapshots,
        layers,
        delay,
        ..
    } = s;
    let mut times: VecDeque<(i64, Instant, Option<SystemTime>)> = VecDeque::new();
    let mut next_snapshot = Instant::now();
    let mut errors = 0u64;
    let mut out = Vec::new();
    while let Ok(job) = rx.recv() {
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        times.push_back((job.pts, job.network_time, job.capture));
        if times.len() > TIMES_KEPT {
            times.pop_front();
        }
        let snapshot = |picture: &ffmpeg::frame::Video, key: bool| {
            let Some((every, store)) = &snapshots else {
                return;
            };
            if !key || Instant::now() < next_snapshot {
                return;
            }
            match jpeg.encode(picture) {
                Ok(snap) => {
                    store.put(&room, snap);
                    next_snapshot = Instant::now() + *every;
                }
                Err(e) => {
                    snapshot_errors += 1;
                    if snapshot_errors.is_power_of_two() {
                        tracing::warn!(%room, error = %e, errors = snapshot_errors, "snapshot failed");
                    }
                }
            }
        };
        if let Err(e) = ladder.push(&job.au, job.pts, job.dts, job.keyframe, snapshot, &mut out) {
            errors += 1;
            metrics::counter!("weir_transcode_errors_total", "kind" => "ladder").increment(1);
            if errors.is_power_of_two() {
                tracing::warn!(%room, error = %e, errors, "transcoder: access unit not decodable");
            }
        }
        if let Some(sink) = &layers {
            for (name, unit) in &out {
                let (network_time, capture) = times
                    .iter()
                    .find(|(pts, ..)| *pts == unit.pts)
                    .map_or((Instant::now(), None), |(_, n, c)| (*n, *c));
                sink(layer_frame(name, unit, network_time, capture));
            }
        }
        let Some(feed) = feed.as_mut() else {
            out.clear();
            continue;
        };
        for name in ladder.take_left_out() {
            feed.gone(&name);
        }
        for (name, unit) in out.drain(..) {
            feed.video(&name, unit);
        }
    }
    if let Some(feed) = &feed {
        for name in ladder.rendition_names() {
            feed.gone(&name);
        }
    }
}

/// A rendition's access unit as a video layer (rid = rendition name) of
/// the room's WebRTC viewers, on the source's timeline.
fn layer_frame(
    name: &str,
    unit: &VideoIn,
    network_time: Instant,
    capture: Option<SystemTime>,
) -> MediaFrame {
    MediaFrame {
        kind: MediaKind::Video,
        codec: Codec::H264,
        params: None,
        time: MediaTime::from_90khz(unit.pts.max(0) as u64),
        network_time,
        keyframe: unit.keyframe,
        rid: Some(Rid::from(name)),
        capture_time: capture.map(|capture_time| str0m::rtp::AbsCaptureTime {
            capture_time,
            clock_offset: None,
        }),
        data: unit.annexb.to_vec().into(),
    }
}

/// Decodes one keyframe alone and stores its JPEG.
fn snapshot_of(s: &Settings, jpeg: &mut JpegEncoder, job: &Job) -> Result<(), TranscodeError> {
    let Some((_, store)) = &s.snapshots else {
        return Ok(());
    };
    let h264 = ffmpeg::decoder::find(ffmpeg::codec::Id::H264)
        .ok_or(TranscodeError::Missing("H.264 decoder"))?;
    let mut decoder = ffmpeg::codec::context::Context::new_with_codec(h264)
        .decoder()
        .video()?;
    let mut packet = ffmpeg::Packet::copy(&job.au);
    packet.set_pts(Some(job.pts));
    packet.set_flags(ffmpeg::codec::packet::Flags::KEY);
    decoder.send_packet(&packet)?;
    decoder.send_eof()?;
    let mut picture = ffmpeg::frame::Video::empty();
    decoder.receive_frame(&mut picture)?;
    store.put(&s.room, jpeg.encode(&picture)?);
    Ok(())
}
