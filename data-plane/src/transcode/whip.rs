//! HLS, snapshots and the ladder for rooms published over WebRTC (WHIP):
//! the room's frames, tapped from its home shard, are put on one timeline
//! and handed to the room's [`RoomMedia`] like an SRT publisher's. H.264
//! goes as it is (WebRTC carries no B-frames); VP8 is re-encoded to H.264
//! (HLS players have no VP8); Opus is transcoded to AAC. All of it on a
//! thread of its own behind a bounded queue: the shard never waits for it,
//! and drops (counted) what it cannot take.
//!
//! A simulcast publisher's layers are all tapped; HLS takes the largest
//! picture among the layers whose keyframes arrive in the first seconds.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant, SystemTime};

use ffmpeg_next as ffmpeg;
use str0m::format::Codec;
use str0m::media::{MediaKind, Rid};
use weir_protocol::RoomId;
use weir_sfu::MediaFrame;

use super::RoomMedia;
use crate::ingest::video::H264Reencoder;

/// Frames queued for the bridge before the shard drops new ones (about a
/// second of audio and video).
const QUEUE: usize = 128;
/// The room's timeline starts this far in (90 kHz), so that a track that
/// started a little earlier than the other never goes negative.
const HEADROOM: i64 = 90_000;
/// How long the bridge may still move HLS to a bigger simulcast layer.
const LAYER_CHOICE: Duration = Duration::from_secs(3);

/// The shard's side: hands frames over without ever waiting.
#[derive(Debug)]
pub struct MediaTap {
    tx: SyncSender<MediaFrame>,
    /// A video frame was dropped: video waits for the next keyframe (the
    /// decoder could not use what follows).
    skipping: bool,
}

impl MediaTap {
    /// Queues a frame; false once the bridge has stopped.
    pub fn offer(&mut self, frame: MediaFrame) -> bool {
        let video = frame.kind == MediaKind::Video;
        if video && self.skipping && !frame.keyframe {
            metrics::counter!("weir_whip_media_dropped_total").increment(1);
            return true;
        }
        match self.tx.try_send(frame) {
            Ok(()) => {
                if video {
                    self.skipping = false;
                }
                true
            }
            Err(TrySendError::Full(_)) => {
                metrics::counter!("weir_whip_media_dropped_total").increment(1);
                self.skipping |= video;
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// Starts the bridge of one WHIP publisher of `room`; it ends (and with it
/// the publisher's HLS epoch) when the tap is dropped.
pub fn spawn(room: RoomId, media: RoomMedia) -> std::io::Result<MediaTap> {
    let (tx, rx) = sync_channel(QUEUE);
    std::thread::Builder::new()
        .name(format!("weir-whip-{room}"))
        .spawn(move || Bridge::new(room, media).run(rx))?;
    Ok(MediaTap {
        tx,
        skipping: false,
    })
}

/// One track's anchor: its first media time (in its clock) and the wall
/// clock that frame arrived at.
#[derive(Clone, Copy)]
struct Anchor {
    first: u64,
    rate: u32,
    at: Instant,
}

/// Maps each track's RTP clock onto one 90 kHz timeline, anchored at the
/// arrival of each track's first frame (WebRTC tracks have unrelated RTP
/// offsets; later frames follow their own clock, so jitter stays out).
#[derive(Default)]
struct Timeline {
    origin: Option<Instant>,
    tracks: [Option<Anchor>; 2],
}

impl Timeline {
    fn pts90(&mut self, track: usize, time: u64, rate: u32, at: Instant) -> i64 {
        let origin = *self.origin.get_or_insert(at);
        let a = *self.tracks[track].get_or_insert(Anchor {
            first: time,
            rate: rate.max(1),
            at,
        });
        let start = a.at.saturating_duration_since(origin);
        let start90 = (start.as_micros() as i64) * 9 / 100;
        let delta = time as i64 - a.first as i64;
        HEADROOM + start90 + delta * 90_000 / i64::from(a.rate)
    }
}

struct Bridge {
    room: RoomId,
    media: RoomMedia,
    timeline: Timeline,
    /// The layer HLS takes, and its picture area.
    layer: Option<(Option<Rid>, u32)>,
    started: Instant,
    vp8: Option<H264Reencoder>,
    vp8_failed: bool,
    errors: u64,
}

impl Bridge {
    fn new(room: RoomId, media: RoomMedia) -> Self {
        Self {
            room,
            media,
            timeline: Timeline::default(),
            layer: None,
            started: Instant::now(),
            vp8: None,
            vp8_failed: false,
            errors: 0,
        }
    }

    fn run(mut self, rx: Receiver<MediaFrame>) {
        tracing::info!(room = %self.room, "WHIP room into HLS");
        while let Ok(frame) = rx.recv() {
            match frame.kind {
                MediaKind::Video => self.video(&frame),
                MediaKind::Audio => self.audio(&frame),
            }
        }
        tracing::info!(room = %self.room, "WHIP room out of HLS");
    }

    /// Whether HLS takes this video frame's layer (choosing the biggest
    /// picture among the layers seen early on, at their keyframes).
    fn wanted(&mut self, frame: &MediaFrame) -> bool {
        if frame.keyframe
            && let Some(area) = picture_area(frame)
        {
            let bigger = self.layer.is_none_or(|(_, a)| area > a);
            let may_move = self.layer.is_none() || self.started.elapsed() < LAYER_CHOICE;
            if bigger && may_move {
                if self.layer.is_some_and(|(rid, _)| rid != frame.rid) {
                    tracing::info!(room = %self.room, layer = ?frame.rid, "HLS takes a bigger simulcast layer");
                }
                self.layer = Some((frame.rid, area));
            }
        }
        self.layer.is_some_and(|(rid, _)| rid == frame.rid)
    }

    fn video(&mut self, frame: &MediaFrame) {
        if !self.wanted(frame) {
            return;
        }
        let pts = self.timeline.pts90(
            0,
            frame.time.numer(),
            frame.time.denom(),
            frame.network_time,
        );
        let capture = frame.capture_time.map(|c| c.capture_time);
        match frame.codec {
            Codec::H264 => {
                self.media.video(
                    &frame.data,
                    frame.keyframe,
                    (pts, pts),
                    frame.network_time,
                    capture,
                );
            }
            Codec::Vp8 => self.vp8(frame, pts, capture),
            _ => {}
        }
    }

    fn vp8(&mut self, frame: &MediaFrame, pts: i64, capture: Option<SystemTime>) {
        if self.vp8.is_none() && !self.vp8_failed {
            match H264Reencoder::from(ffmpeg::codec::Id::VP8) {
                Ok(r) => self.vp8 = Some(r),
                Err(e) => {
                    self.vp8_failed = true;
                    tracing::error!(room = %self.room, error = %e, "cannot re-encode VP8 for HLS; the room's HLS has no video");
                }
            }
        }
        let Some(reencoder) = self.vp8.as_mut() else {
            return;
        };
        let mut out = Vec::new();
        if let Err(e) = reencoder.push(&frame.data, pts, &mut out) {
            self.error("VP8 frame could not be re-encoded", &e);
        }
        for unit in out {
            self.media.video(
                &unit.au.data,
                unit.au.keyframe,
                (unit.time, unit.time),
                frame.network_time,
                capture,
            );
        }
    }

    fn audio(&mut self, frame: &MediaFrame) {
        if frame.codec != Codec::Opus {
            return;
        }
        let pts = self.timeline.pts90(
            1,
            frame.time.numer(),
            frame.time.denom(),
            frame.network_time,
        );
        self.media.opus(&frame.data, pts * 48_000 / 90_000);
    }

    fn error(&mut self, what: &str, e: &dyn std::fmt::Display) {
        self.errors += 1;
        metrics::counter!("weir_transcode_errors_total", "kind" => "whip").increment(1);
        if self.errors.is_power_of_two() {
            tracing::warn!(room = %self.room, error = %e, errors = self.errors, "{what}");
        }
    }
}

/// Width × height of a keyframe's picture: from the SPS of an H.264 access
/// unit, or the frame header of a VP8 keyframe (RFC 6386 section 9.1).
fn picture_area(frame: &MediaFrame) -> Option<u32> {
    match frame.codec {
        Codec::H264 => {
            let sps = nal_units(&frame.data).find(|n| n.first().is_some_and(|b| b & 0x1f == 7))?;
            let info = crate::hls::sps::parse(sps).ok()?;
            Some(info.width * info.height)
        }
        Codec::Vp8 => {
            let d = &frame.data;
            if d.len() < 10 || d[0] & 1 != 0 || d[3..6] != [0x9d, 0x01, 0x2a] {
                return None;
            }
            let w = u32::from(u16::from_le_bytes([d[6], d[7]]) & 0x3fff);
            let h = u32::from(u16::from_le_bytes([d[8], d[9]]) & 0x3fff);
            Some(w * h)
        }
        _ => None,
    }
}

/// The NAL units of an Annex-B access unit (start codes removed).
fn nal_units(au: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= au.len() {
        if au[i] == 0 && au[i + 1] == 0 && au[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    let ends: Vec<usize> = starts
        .iter()
        .skip(1)
        .map(|s| {
            let mut e = s - 3;
            while e > 0 && au[e - 1] == 0 {
                e -= 1;
            }
            e
        })
        .chain(std::iter::once(au.len()))
        .collect();
    starts
        .into_iter()
        .zip(ends)
        .filter(|(s, e)| s < e)
        .map(move |(s, e)| &au[s..e])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tracks_share_one_timeline_anchored_at_their_first_arrival() {
        let mut t = Timeline::default();
        let t0 = Instant::now();
        // Video at 90 kHz from a random RTP offset, audio at 48 kHz from
        // another, arriving 100 ms later.
        assert_eq!(t.pts90(0, 1_000_000, 90_000, t0), HEADROOM);
        assert_eq!(t.pts90(0, 1_003_000, 90_000, t0), HEADROOM + 3000);
        let a0 = t0 + Duration::from_millis(100);
        assert_eq!(t.pts90(1, 77, 48_000, a0), HEADROOM + 9000);
        // Later frames follow their own clock, not their (jittery) arrival.
        let late = a0 + Duration::from_millis(500);
        assert_eq!(t.pts90(1, 77 + 960, 48_000, late), HEADROOM + 9000 + 1800);
    }

    #[test]
    fn picture_sizes_come_from_sps_or_vp8_headers() {
        let vp8 = |w: u16, h: u16| {
            let mut d = vec![0x10, 0, 0, 0x9d, 0x01, 0x2a];
            d.extend_from_slice(&w.to_le_bytes());
            d.extend_from_slice(&h.to_le_bytes());
            d.extend_from_slice(&[0; 20]);
            MediaFrame {
                kind: MediaKind::Video,
                codec: Codec::Vp8,
                params: None,
                time: str0m::media::MediaTime::from_90khz(0),
                network_time: Instant::now(),
                keyframe: true,
                rid: None,
                capture_time: None,
                data: d.into(),
            }
        };
        assert_eq!(picture_area(&vp8(640, 360)), Some(640 * 360));
        let mut garbage = vp8(640, 360);
        garbage.data = vec![1, 2, 3].into();
        assert_eq!(picture_area(&garbage), None);
        let nals: Vec<_> = nal_units(&[0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3]).collect();
        assert_eq!(nals, vec![&[0x67, 1, 2][..], &[0x68, 3][..]]);
    }
}
