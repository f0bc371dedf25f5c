//! The transcoder of SRT-published rooms: an ABR ladder (renditions of the
//! source at smaller sizes, encoded with NVENC when a usable NVIDIA GPU is
//! there, otherwise libx264 with low-latency settings) that becomes HLS
//! variants, and snapshots (a JPEG of the latest keyframe every few
//! seconds). One thread per publisher with a bounded queue: when it falls
//! behind it drops its own frames (up to the next keyframe) and counts them;
//! ingest and forwarding never wait for it.
//!
//! [`MediaHub`] is what the node holds: configuration, the HLS store, the
//! snapshots. Ingest opens a [`RoomMedia`] per publisher and hands it every
//! access unit and AAC frame.

pub mod encoder;
pub mod ladder;
pub mod snapshot;
pub mod whip;
mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use weir_protocol::RoomId;

use crate::hls::fmp4::AudioTrack;
use crate::hls::segmenter::{AudioIn, VideoIn};
use crate::hls::{HlsConfig, HlsFeed, HlsStore, Planned, SOURCE};
use crate::ingest::FrameSink;
pub use encoder::{EncoderChoice, EncoderKind};
pub use ladder::LadderEncoder;
pub use snapshot::{Snapshot, SnapshotStore};

/// One rung of the ladder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendition {
    /// Name and URL path segment (`720p`).
    pub name: String,
    /// Picture height; the width keeps the source's aspect ratio.
    pub height: u32,
    /// Target bit rate, kbit/s.
    pub kbps: u32,
}

/// The renditions of a room besides the source (which HLS always carries
/// as it is). Empty: transcoding is off for the room.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ladder {
    /// Renditions, largest first.
    pub renditions: Vec<Rendition>,
}

/// A ladder that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LadderError {
    /// A rung is neither `source` nor `HEIGHTp` nor `HEIGHTp@KBPS`.
    #[error(
        "bad rendition {0:?}: use source, HEIGHTp or HEIGHTp@KBPS (e.g. 720p, 540p@1800), or off"
    )]
    Rendition(String),
    /// A height or bit rate out of range.
    #[error("rendition {0:?} is out of range (height 96..=2160, 100..=50000 kbit/s)")]
    Range(String),
    /// `ROOM=LADDER` expected.
    #[error("bad per-room ladder {0:?}: use ROOM=LADDER, e.g. show=source,480p")]
    RoomLadder(String),
}

/// Default bit rate for a height, kbit/s (roughly what streaming services
/// use for 30 fps H.264).
fn default_kbps(height: u32) -> u32 {
    match height {
        0..=240 => 400,
        241..=360 => 800,
        361..=480 => 1200,
        481..=540 => 1800,
        541..=720 => 2800,
        721..=1080 => 5000,
        _ => 12_000,
    }
}

impl Ladder {
    /// The default: `source,480p,360p` — two renditions, light enough for
    /// a 2-core machine to run beside ingest (see bench/RESULTS.md).
    pub fn default_ladder() -> Self {
        Self::parse("source,480p,360p").unwrap_or_default()
    }

    /// Parses `source,720p,480p@1000,360p`; `off` (or `source` alone)
    /// switches transcoding off. `source` may be left out: HLS always
    /// carries the source.
    pub fn parse(s: &str) -> Result<Self, LadderError> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") || s.eq_ignore_ascii_case("none") || s.is_empty() {
            return Ok(Self::default());
        }
        let mut renditions = Vec::new();
        for part in s.split(',').map(str::trim) {
            if part.eq_ignore_ascii_case(SOURCE) {
                continue;
            }
            let (h, kbps) = match part.split_once('@') {
                Some((h, k)) => (
                    h,
                    Some(
                        k.trim_end_matches("k")
                            .parse::<u32>()
                            .map_err(|_| LadderError::Rendition(part.into()))?,
                    ),
                ),
                None => (part, None),
            };
            let height: u32 = h
                .strip_suffix('p')
                .and_then(|h| h.parse().ok())
                .ok_or_else(|| LadderError::Rendition(part.into()))?;
            let kbps = kbps.unwrap_or_else(|| default_kbps(height));
            if !(96..=2160).contains(&height) || !(100..=50_000).contains(&kbps) {
                return Err(LadderError::Range(part.into()));
            }
            let name = format!("{height}p");
            if renditions.iter().any(|r: &Rendition| r.name == name) {
                continue;
            }
            renditions.push(Rendition { name, height, kbps });
        }
        renditions.sort_by_key(|r| std::cmp::Reverse(r.height));
        Ok(Self { renditions })
    }

    /// Parses `ROOM=LADDER`.
    pub fn parse_room(s: &str) -> Result<(RoomId, Self), LadderError> {
        let (room, ladder) = s
            .split_once('=')
            .ok_or_else(|| LadderError::RoomLadder(s.into()))?;
        let room = RoomId::parse(room.trim()).map_err(|_| LadderError::RoomLadder(s.into()))?;
        Ok((room, Self::parse(ladder)?))
    }

    /// Whether the room is transcoded at all.
    pub fn is_off(&self) -> bool {
        self.renditions.is_empty()
    }
}

/// Media settings of a node beyond forwarding.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// HLS for SRT-published rooms; `None` switches it off.
    pub hls: Option<HlsConfig>,
    /// The ladder of rooms without one of their own.
    pub ladder: Ladder,
    /// Per-room ladders (an empty one switches transcoding off there).
    pub room_ladders: HashMap<RoomId, Ladder>,
    /// Seconds between snapshots; `None` switches them off.
    pub snapshot_interval: Option<Duration>,
    /// Which H.264 encoder the ladder uses.
    pub encoder: EncoderChoice,
    /// Test only: the transcoder sleeps this long per access unit (to show
    /// that a slow transcoder never delays forwarding).
    pub test_delay: Duration,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            hls: None,
            ladder: Ladder::default_ladder(),
            room_ladders: HashMap::new(),
            snapshot_interval: Some(Duration::from_secs(5)),
            encoder: EncoderChoice::Auto,
            test_delay: Duration::ZERO,
        }
    }
}

/// The node's media services: HLS, transcoder, snapshots.
#[derive(Clone)]
pub struct MediaHub {
    config: Arc<MediaConfig>,
    hls: Option<HlsStore>,
    snapshots: SnapshotStore,
    encoder: Arc<std::sync::OnceLock<EncoderKind>>,
}

impl std::fmt::Debug for MediaHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaHub").finish_non_exhaustive()
    }
}

impl MediaHub {
    /// Prepares the HLS directory (cleared) when HLS is on, and chooses the
    /// ladder's encoder at once when some room may be transcoded (so the
    /// choice is in the log and the metrics from the start).
    pub fn new(config: MediaConfig) -> Result<Self, crate::hls::HlsError> {
        let hls = config.hls.clone().map(HlsStore::new).transpose()?;
        let transcodes = hls.is_some()
            && (!config.ladder.is_off() || config.room_ladders.values().any(|l| !l.is_off()));
        let hub = Self {
            config: Arc::new(config),
            hls,
            snapshots: SnapshotStore::default(),
            encoder: Arc::default(),
        };
        if transcodes {
            hub.encoder();
        }
        Ok(hub)
    }

    /// The HLS store, when HLS is on.
    pub fn hls(&self) -> Option<&HlsStore> {
        self.hls.as_ref()
    }

    /// Whether snapshots are taken.
    pub fn snapshots_on(&self) -> bool {
        self.config.snapshot_interval.is_some()
    }

    /// The latest snapshots.
    pub fn snapshots(&self) -> &SnapshotStore {
        &self.snapshots
    }

    /// The ladder `room` gets.
    pub fn ladder(&self, room: &RoomId) -> &Ladder {
        self.config
            .room_ladders
            .get(room)
            .unwrap_or(&self.config.ladder)
    }

    /// The encoder the ladder uses, probed once (opening NVENC tells
    /// whether a usable GPU is there); logged and exported as
    /// `weir_transcoder_encoder{name}`.
    pub fn encoder(&self) -> EncoderKind {
        *self
            .encoder
            .get_or_init(|| encoder::choose(self.config.encoder))
    }

    /// A publisher of `room` starts: its HLS epoch and its transcoder,
    /// whose renditions also go to `layers` (the room's WebRTC viewers, as
    /// simulcast layers named after the renditions). Nothing here fails
    /// the publisher: a part that cannot start is logged and left out.
    pub(crate) fn open(&self, room: &RoomId, layers: Option<FrameSink>) -> RoomMedia {
        let ladder = self.ladder(room).clone();
        let hls = self.hls.as_ref().and_then(|store| {
            let mut plan = vec![Planned {
                name: Arc::from(SOURCE),
                bitrate: 0,
                height: u32::MAX,
            }];
            plan.extend(ladder.renditions.iter().map(|r| Planned {
                name: Arc::from(r.name.as_str()),
                bitrate: u64::from(r.kbps) * 1000 * 11 / 10,
                height: r.height,
            }));
            match store.open(room, plan) {
                Ok(feed) => Some(feed),
                Err(e) => {
                    tracing::error!(%room, error = %e, "HLS cannot start for this room");
                    None
                }
            }
        });
        let wants_ladder = !ladder.is_off() && (hls.is_some() || layers.is_some());
        let snapshots = self.config.snapshot_interval;
        let transcoder = if wants_ladder || snapshots.is_some() {
            let encoder = if wants_ladder {
                Some(self.encoder())
            } else {
                None
            };
            let spawned = worker::Transcoder::spawn(worker::Settings {
                room: room.clone(),
                ladder: if wants_ladder {
                    ladder.renditions.clone()
                } else {
                    Vec::new()
                },
                encoder,
                feed: hls
                    .as_ref()
                    .filter(|_| wants_ladder)
                    .map(HlsFeed::renditions),
                snapshots: snapshots.map(|every| (every, self.snapshots.clone())),
                layers: layers.filter(|_| wants_ladder),
                delay: self.config.test_delay,
            });
            match spawned {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!(%room, error = %e, "transcoder cannot start: no renditions or snapshots for this room");
                    None
                }
            }
        } else {
            None
        };
        if wants_ladder {
            tracing::info!(%room, renditions = ?ladder.renditions.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), encoder = self.encoder().name(), "transcoding the room");
        }
        RoomMedia {
            hls,
            transcoder,
            audio_track: None,
            opus: None,
        }
    }
}

/// One publisher's media beyond forwarding: its HLS feed and transcoder.
/// Every call returns at once; dropping it ends the publisher's epoch.
pub struct RoomMedia {
    hls: Option<HlsFeed>,
    transcoder: Option<worker::Transcoder>,
    audio_track: Option<(u8, u8, u8, AudioTrack)>,
    /// Opus audio (SRT's Opus in TS) made AAC for HLS; `Err` once it
    /// could not start.
    opus: Option<Result<crate::ingest::audio::OpusToAac, ()>>,
}

impl std::fmt::Debug for RoomMedia {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomMedia").finish_non_exhaustive()
    }
}

impl RoomMedia {
    /// Nothing at all (HLS, transcoding and snapshots off).
    pub fn none() -> Self {
        Self {
            hls: None,
            transcoder: None,
            audio_track: None,
            opus: None,
        }
    }

    /// A source access unit (Annex-B, SPS/PPS before each IDR) with its
    /// presentation and decode times (90 kHz, the room's timeline), the
    /// instant its presentation time maps to and when it was captured.
    pub(crate) fn video(
        &mut self,
        au: &[u8],
        keyframe: bool,
        (pts, dts): (i64, i64),
        network_time: Instant,
        capture: Option<SystemTime>,
    ) {
        if self.hls.is_none() && self.transcoder.is_none() {
            return;
        }
        let au = Bytes::copy_from_slice(au);
        if let Some(t) = self.transcoder.as_mut() {
            t.push(worker::Job {
                au: au.clone(),
                pts,
                dts,
                keyframe,
                queued: Instant::now(),
                network_time,
                capture,
            });
        }
        if let Some(hls) = self.hls.as_mut() {
            hls.video(VideoIn {
                annexb: au,
                pts,
                dts,
                keyframe,
                wall: SystemTime::now(),
            });
        }
    }

    /// An Opus packet whose first sample plays at `time48` (48 kHz, the
    /// room's timeline): transcoded to AAC for HLS (cheap enough to run
    /// inline: one decode and at most one AAC frame per 20 ms packet).
    pub(crate) fn opus(&mut self, packet: &[u8], time48: i64) {
        if self.hls.is_none() {
            return;
        }
        let conv = self.opus.get_or_insert_with(|| {
            crate::ingest::audio::OpusToAac::new().map_err(|e| {
                tracing::error!(error = %e, "cannot transcode Opus to AAC: HLS without audio");
            })
        });
        let Ok(conv) = conv else {
            return;
        };
        let mut out = Vec::new();
        if conv.push(packet, time48, &mut out).is_err() {
            metrics::counter!("weir_transcode_errors_total", "kind" => "opus_aac").increment(1);
        }
        for p in out {
            self.aac(&p.adts, p.time * 90_000 / 48_000);
        }
    }

    /// An ADTS frame (header included) whose first sample plays at
    /// `time90` (90 kHz, the room's timeline).
    pub fn aac(&mut self, adts: &[u8], time90: i64) {
        let Some(hls) = self.hls.as_mut() else {
            return;
        };
        if adts.len() < 7 {
            return;
        }
        let key = (adts[2], adts[3] & 0xc0, adts[1] & 0x01);
        let track = match &self.audio_track {
            Some((a, b, c, t)) if (*a, *b, *c) == key => t.clone(),
            _ => {
                let Some(t) = AudioTrack::from_adts(adts) else {
                    return;
                };
                self.audio_track = Some((key.0, key.1, key.2, t.clone()));
                t
            }
        };
        let header = if adts[1] & 0x01 == 0 { 9 } else { 7 };
        let Some(raw) = adts.get(header..) else {
            return;
        };
        let rate = i64::from(track.rate);
        hls.audio(AudioIn {
            raw: Bytes::copy_from_slice(raw),
            time: time90 * rate / 90_000,
            track,
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ladders_parse() {
        let l = Ladder::parse("source, 360p, 720p, 480p@1000").unwrap();
        let names: Vec<_> = l.renditions.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["720p", "480p", "360p"]);
        assert_eq!(l.renditions[1].kbps, 1000);
        assert_eq!(l.renditions[0].kbps, 2800);
        assert!(Ladder::parse("off").unwrap().is_off());
        assert!(Ladder::parse("source").unwrap().is_off());
        assert!(Ladder::parse("720").is_err());
        assert!(Ladder::parse("5000p").is_err());
        assert!(Ladder::parse("360p@x").is_err());
        let (room, l) = Ladder::parse_room("show=source,240p").unwrap();
        assert_eq!(room.as_str(), "show");
        assert_eq!(l.renditions[0].height, 240);
        assert!(Ladder::parse_room("show").is_err());
        assert!(Ladder::parse_room("a/b=360p").is_err());
        assert_eq!(Ladder::default_ladder().renditions.len(), 2);
    }
}
