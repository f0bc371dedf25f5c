//! Cuts one rendition's frames into fMP4 segments: a segment starts at a
//! video keyframe once the one before it lasts the target duration (2 s by
//! default); audio goes into the segment whose video it plays with (up to
//! the cut's presentation time), and a cut waits briefly for audio to catch
//! up. A publisher whose keyframes are too far apart gets a forced cut at
//! the hard limit, so memory stays bounded. A change of SPS/PPS or of the
//! audio format starts a new init segment and a discontinuity. Pure logic:
//! no files, no clocks of its own.

use std::collections::VecDeque;
use std::time::SystemTime;

use bytes::Bytes;

use super::fmp4::{self, AUDIO_TRACK, AudioTrack, Run, Sample, VIDEO_TRACK, VideoTrack};
use super::sps;
use crate::ingest::h264::nal_units;

/// A cut may come this much before the target (frame timing jitter).
const TOLERANCE: i64 = 4_500;
/// How long a cut waits for audio to reach it, in video time.
const AUDIO_WAIT: i64 = 45_000;
/// Audio more than this before a segment's video is dropped.
const AUDIO_LEAD: i64 = 45_000;

/// A video access unit on the packager's timeline (90 kHz).
#[derive(Debug, Clone)]
pub struct VideoIn {
    /// Annex-B access unit.
    pub annexb: Bytes,
    /// Presentation time.
    pub pts: i64,
    /// Decode time.
    pub dts: i64,
    /// An IDR with its parameter sets.
    pub keyframe: bool,
    /// When it arrived.
    pub wall: SystemTime,
}

/// An AAC frame (raw, no ADTS header) on the packager's timeline, in the
/// track's own sample rate.
#[derive(Debug, Clone)]
pub struct AudioIn {
    /// The raw AAC frame.
    pub raw: Bytes,
    /// Presentation time in samples.
    pub time: i64,
    /// Its format (from the ADTS header).
    pub track: AudioTrack,
}

/// What the segmenter produced.
#[derive(Debug)]
pub enum Output {
    /// A new init segment (before the first segment that uses it).
    Init {
        /// Its number.
        id: u32,
        /// The bytes.
        bytes: Vec<u8>,
        /// Video track, if any.
        video: Option<VideoTrack>,
        /// Audio track, if any.
        audio: Option<AudioTrack>,
    },
    /// A finished media segment.
    Segment(Segment),
}

/// A finished media segment.
#[derive(Debug)]
pub struct Segment {
    /// Media sequence number.
    pub seq: u64,
    /// The bytes (`styp` `moof` `mdat`).
    pub bytes: Vec<u8>,
    /// Seconds.
    pub duration: f64,
    /// A discontinuity precedes it.
    pub discontinuity: bool,
    /// The init segment it needs.
    pub init: u32,
    /// Wall clock of its first frame.
    pub wall: SystemTime,
    /// Cut without a keyframe (the publisher's keyframes are too rare).
    pub forced: bool,
}

#[derive(Debug, Clone)]
struct Frame {
    data: Bytes,
    pts: i64,
    dts: i64,
    keyframe: bool,
    track: Option<VideoTrack>,
    wall: SystemTime,
}

#[derive(Debug, Clone, Copy)]
struct Cut {
    dts: i64,
    pts: i64,
    forced: bool,
}

#[derive(Debug)]
struct Building {
    frames: Vec<Frame>,
    track: Option<VideoTrack>,
    forced: bool,
}

/// Segments one rendition.
#[derive(Debug)]
pub struct Segmenter {
    target: i64,
    max: i64,
    seq: u64,
    next_init: u32,
    init: Option<(Option<VideoTrack>, Option<AudioTrack>, u32)>,
    video_track: Option<VideoTrack>,
    cur: Option<Building>,
    next: Vec<Frame>,
    cut: Option<Cut>,
    audio: VecDeque<AudioIn>,
    audio_track: Option<AudioTrack>,
    video_seen: bool,
    discontinuity: bool,
    last_duration: i64,
    out: Vec<Output>,
    /// Frames dropped while waiting for a first keyframe.
    pub waiting_for_keyframe: u64,
    /// Frames per second of the latest segment.
    pub frame_rate: Option<f64>,
    /// Whether a stream without video gets audio-only segments (the
    /// source does; a rendition is video by definition).
    pub audio_only: bool,
}

impl Segmenter {
    /// Segments of `target` seconds; a segment is cut without a keyframe
    /// past `max` seconds. `first_seq` numbers the first segment.
    pub fn new(target: f64, max: f64, first_seq: u64, first_init: u32) -> Self {
        Self {
            target: (target * 90_000.0) as i64,
            max: (max.max(target) * 90_000.0) as i64,
            seq: first_seq,
            next_init: first_init,
            init: None,
            video_track: None,
            cur: None,
            next: Vec::new(),
            cut: None,
            audio: VecDeque::new(),
            audio_track: None,
            video_seen: false,
            discontinuity: false,
            last_duration: 3_000,
            out: Vec::new(),
            waiting_for_keyframe: 0,
            frame_rate: None,
            audio_only: false,
        }
    }

    /// The next segment starts with a discontinuity (a new publisher).
    pub fn mark_discontinuity(&mut self) {
        self.discontinuity = true;
    }

    /// Sequence number the next segment gets.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// Number the next init segment gets.
    pub fn next_init(&self) -> u32 {
        self.next_init
    }

    /// Takes what was produced.
    pub fn drain(&mut self) -> std::vec::Drain<'_, Output> {
        self.out.drain(..)
    }

    /// Adds a video access unit.
    pub fn push_video(&mut self, v: VideoIn) {
        self.video_seen = true;
        let frame = prepare(v);
        if let Some(t) = &frame.track {
            self.video_track = Some(t.clone());
        }
        if self.cut.is_some() {
            self.next.push(frame);
            self.try_close();
            return;
        }
        let (target, max) = (self.target, self.max);
        match self.cur.as_mut() {
            None => {
                if !frame.keyframe || self.video_track.is_none() {
                    self.waiting_for_keyframe += 1;
                    return;
                }
                let track = frame.track.clone().or_else(|| self.video_track.clone());
                self.cur = Some(Building {
                    frames: vec![frame],
                    track,
                    forced: false,
                });
            }
            Some(b) => {
                let start = b.frames.first().map(|f| f.dts).unwrap_or(frame.dts);
                let elapsed = frame.dts - start;
                let new_params = frame.track.is_some() && frame.track != b.track;
                if frame.keyframe && (elapsed >= target - TOLERANCE || new_params || elapsed < 0) {
                    self.cut = Some(Cut {
                        dts: frame.dts,
                        pts: frame.pts,
                        forced: false,
                    });
                    self.next.push(frame);
                } else if elapsed >= max || elapsed < 0 {
                    self.cut = Some(Cut {
                        dts: frame.dts,
                        pts: frame.pts,
                        forced: true,
                    });
                    self.next.push(frame);
                } else {
                    b.frames.push(frame);
                }
            }
        }
        self.try_close();
    }

    /// Adds an AAC frame.
    pub fn push_audio(&mut self, a: AudioIn) {
        if self.audio_track.as_ref() != Some(&a.track) {
            self.audio_track = Some(a.track.clone());
        }
        self.audio.push_back(a);
        // Bounded: never more than the hard limit of audio waiting.
        let rate = self.audio_track.as_ref().map(|t| t.rate).unwrap_or(48_000);
        while let (Some(f), Some(b)) = (self.audio.front(), self.audio.back()) {
            if to90(b.time - f.time, rate) > self.max * 2 {
                self.audio.pop_front();
            } else {
                break;
            }
        }
        self.try_close();
    }

    /// Closes what is open (the publisher is gone).
    pub fn flush(&mut self) {
        if let Some(cut) = self.cut {
            self.close(Some(cut));
        }
        if self.cur.is_some() {
            self.close(None);
        } else if self.audio_only && !self.video_seen && !self.audio.is_empty() {
            self.close_audio_only(i64::MAX);
        }
        self.audio.clear();
    }

    fn try_close(&mut self) {
        let Some(cut) = self.cut else {
            if self.audio_only
                && !self.video_seen
                && let (Some(f), Some(b), Some(t)) =
                    (self.audio.front(), self.audio.back(), &self.audio_track)
                && to90(b.time - f.time, t.rate) >= self.target
            {
                let end = f.time + self.target * i64::from(t.rate) / 90_000;
                self.close_audio_only(end);
            }
            return;
        };
        let audio_caught_up = match (&self.audio_track, self.audio.back()) {
            (None, _) => true,
            (Some(t), Some(a)) => to90(a.time, t.rate) >= cut.pts,
            (Some(_), None) => false,
        };
        let waited = match (self.next.first(), self.next.last()) {
            (Some(f), Some(l)) => l.dts - f.dts >= AUDIO_WAIT,
            _ => false,
        };
        if audio_caught_up || waited {
            self.close(Some(cut));
        }
    }

    fn tracks(&mut self, video: Option<VideoTrack>, with_audio: bool) -> u32 {
        let audio = if with_audio {
            self.audio_track.clone()
        } else {
            None
        };
        if let Some((v, a, id)) = &self.init
            && *v == video
            && *a == audio
        {
            return *id;
        }
        let id = self.next_init;
        self.next_init += 1;
        if self.init.is_some() {
            // New parameters or tracks: players must reset their decoder.
            self.discontinuity = true;
        }
        let bytes = fmp4::init_segment(video.as_ref(), audio.as_ref());
        self.out.push(Output::Init {
            id,
            bytes,
            video: video.clone(),
            audio: audio.clone(),
        });
        self.init = Some((video, audio, id));
        id
    }

    fn close(&mut self, cut: Option<Cut>) {
        let Some(b) = self.cur.take() else {
            return;
        };
        let Some(first) = b.frames.first() else {
            return;
        };
        let (start_dts, start_pts, wall) = (first.dts, first.pts, first.wall);
        let end_dts = match cut {
            Some(c) => c.dts,
            None => b.frames.last().map(|f| f.dts).unwrap_or(start_dts) + self.last_duration,
        };
        let mut video = Vec::with_capacity(b.frames.len());
        for (i, f) in b.frames.iter().enumerate() {
            let next = b.frames.get(i + 1).map(|n| n.dts).unwrap_or(end_dts);
            let mut duration = next - f.dts;
            if !(1..=90_000 * 10).contains(&duration) {
                duration = self.last_duration;
            } else if i + 1 < b.frames.len() {
                self.last_duration = duration;
            }
            video.push(Sample {
                data: f.data.clone(),
                duration: duration as u32,
                cto: (f.pts - f.dts).clamp(0, i64::from(i32::MAX)) as i32,
                keyframe: f.keyframe,
            });
        }
        let video_duration: i64 = video.iter().map(|s| i64::from(s.duration)).sum();
        if video_duration > 0 {
            self.frame_rate = Some(video.len() as f64 * 90_000.0 / video_duration as f64);
        }
        // Audio up to the cut's presentation time; older than the
        // segment's start by more than a little is dropped.
        let rate = self.audio_track.as_ref().map(|t| t.rate).unwrap_or(48_000);
        let until = cut.map(|c| c.pts).unwrap_or(i64::MAX);
        let mut audio_frames = Vec::new();
        while let Some(a) = self.audio.front() {
            let t = to90(a.time, rate);
            if t >= until {
                break;
            }
            if let Some(a) = self.audio.pop_front()
                && t >= start_pts - AUDIO_LEAD
                && Some(&a.track) == self.audio_track.as_ref()
            {
                audio_frames.push(a);
            }
        }
        let init = self.tracks(b.track.clone(), self.audio_track.is_some());
        let with_audio = self.init.as_ref().is_some_and(|(_, a, _)| a.is_some());
        let audio = if with_audio {
            audio_samples(&audio_frames)
        } else {
            Vec::new()
        };
        let mut runs = vec![Run {
            track: VIDEO_TRACK,
            base_time: start_dts.max(0) as u64,
            samples: &video,
        }];
        if let Some(a) = audio_frames.first().filter(|_| !audio.is_empty()) {
            runs.push(Run {
                track: AUDIO_TRACK,
                base_time: a.time.max(0) as u64,
                samples: &audio,
            });
        }
        let bytes = fmp4::media_segment((self.seq + 1) as u32, &runs);
        let duration = (end_dts - start_dts).max(1) as f64 / 90_000.0;
        self.out.push(Output::Segment(Segment {
            seq: self.seq,
            bytes,
            duration,
            discontinuity: std::mem::take(&mut self.discontinuity),
            init,
            wall,
            forced: b.forced,
        }));
        self.seq += 1;
        if let Some(c) = cut {
            self.cut = None;
            let frames = std::mem::take(&mut self.next);
            let track = frames
                .first()
                .and_then(|f| f.track.clone())
                .or_else(|| self.video_track.clone());
            if !frames.is_empty() {
                self.cur = Some(Building {
                    frames,
                    track,
                    forced: c.forced,
                });
            }
        }
    }

    fn close_audio_only(&mut self, end: i64) {
        let mut frames = Vec::new();
        while let Some(a) = self.audio.front() {
            if a.time >= end {
                break;
            }
            if let Some(a) = self.audio.pop_front() {
                frames.push(a);
            }
        }
        let Some(first) = frames.first() else {
            return;
        };
        let base = first.time.max(0) as u64;
        let rate = first.track.rate;
        let init = self.tracks(None, true);
        let samples = audio_samples(&frames);
        let total: i64 = samples.iter().map(|s| i64::from(s.duration)).sum();
        let bytes = fmp4::media_segment(
            (self.seq + 1) as u32,
            &[Run {
                track: AUDIO_TRACK,
                base_time: base,
                samples: &samples,
            }],
        );
        self.out.push(Output::Segment(Segment {
            seq: self.seq,
            bytes,
            duration: total.max(1) as f64 / f64::from(rate),
            discontinuity: std::mem::take(&mut self.discontinuity),
            init,
            wall: SystemTime::now(),
            forced: false,
        }));
        self.seq += 1;
    }
}

fn to90(samples: i64, rate: u32) -> i64 {
    samples.saturating_mul(90_000) / i64::from(rate.max(1))
}

fn audio_samples(frames: &[AudioIn]) -> Vec<Sample> {
    frames
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let d = frames
                .get(i + 1)
                .map(|n| n.time - a.time)
                .filter(|d| (1..=4096).contains(d))
                .unwrap_or(1024);
            Sample {
                data: a.raw.clone(),
                duration: d as u32,
                cto: 0,
                keyframe: true,
            }
        })
        .collect()
}

fn prepare(v: VideoIn) -> Frame {
    let mut sps_nal = None;
    let mut pps_nal = None;
    for nal in nal_units(&v.annexb) {
        match nal[0] & 0x1f {
            7 => sps_nal = Some(nal),
            8 => pps_nal = Some(nal),
            _ => {}
        }
    }
    let track = match (sps_nal, pps_nal) {
        (Some(s), Some(p)) => sps::parse(s).ok().map(|info| VideoTrack {
            sps: s.to_vec(),
            pps: p.to_vec(),
            info,
        }),
        _ => None,
    };
    Frame {
        data: fmp4::avcc_sample(nal_units(&v.annexb)).into(),
        pts: v.pts,
        dts: v.dts,
        keyframe: v.keyframe,
        track,
        wall: v.wall,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SPS: [u8; 26] = [
        0x67, 0x64, 0x00, 0x1e, 0xac, 0xd9, 0x40, 0xa0, 0x2f, 0xf9, 0x70, 0x11, 0x00, 0x00, 0x03,
        0x00, 0x01, 0x00, 0x00, 0x03, 0x00, 0x3c, 0x0f, 0x16, 0x2d, 0x96,
    ];

    fn au(keyframe: bool) -> Bytes {
        let mut v = Vec::new();
        if keyframe {
            v.extend_from_slice(&[0, 0, 0, 1]);
            v.extend_from_slice(&SPS);
            v.extend_from_slice(&[0, 0, 0, 1, 0x68, 0xeb, 0xe3, 0xcb]);
            v.extend_from_slice(&[0, 0, 0, 1, 0x65, 0x88, 0x84]);
        } else {
            v.extend_from_slice(&[0, 0, 0, 1, 0x41, 0x9a, 0x02]);
        }
        v.into()
    }

    fn adts_track() -> AudioTrack {
        AudioTrack::from_adts(&[0xff, 0xf1, 0x4c, 0x80, 0x2e, 0x7f, 0xfc]).unwrap()
    }

    /// 30 fps video with a keyframe every `gop` frames and 48 kHz AAC,
    /// for `frames` frames; returns the segments' durations.
    fn run(s: &mut Segmenter, start: i64, frames: i64, gop: i64) -> Vec<(f64, bool, u32)> {
        let wall = SystemTime::now();
        let mut audio_time = start * 48_000 / 90_000;
        for i in 0..frames {
            let pts = start + i * 3000;
            s.push_video(VideoIn {
                annexb: au(i % gop == 0),
                pts,
                dts: pts,
                keyframe: i % gop == 0,
                wall,
            });
            while audio_time * 90_000 / 48_000 < pts + 3000 {
                s.push_audio(AudioIn {
                    raw: Bytes::from_static(&[1, 2, 3]),
                    time: audio_time,
                    track: adts_track(),
                });
                audio_time += 1024;
            }
        }
        s.drain()
            .filter_map(|o| match o {
                Output::Segment(seg) => Some((seg.duration, seg.discontinuity, seg.init)),
                Output::Init { .. } => None,
            })
            .collect()
    }

    #[test]
    fn cuts_on_keyframes_at_the_target() {
        let mut s = Segmenter::new(2.0, 8.0, 0, 0);
        // 1 s GOPs: segments of two GOPs.
        let segs = run(&mut s, 90_000, 300, 30);
        assert_eq!(segs.len(), 4, "{segs:?}");
        for (d, disc, init) in &segs {
            assert!((d - 2.0).abs() < 0.01, "{segs:?}");
            assert!(!disc);
            assert_eq!(*init, 0);
        }
        s.flush();
        let last: Vec<_> = s.drain().collect();
        assert_eq!(last.len(), 1);
    }

    #[test]
    fn long_gops_are_cut_at_the_hard_limit() {
        let mut s = Segmenter::new(2.0, 4.0, 0, 0);
        let segs = run(&mut s, 0, 400, 1000);
        assert!(segs.len() >= 2, "{segs:?}");
        assert!(segs.iter().all(|(d, _, _)| *d <= 4.01), "{segs:?}");
    }

    #[test]
    fn reconnect_marks_a_discontinuity() {
        let mut s = Segmenter::new(2.0, 8.0, 0, 0);
        run(&mut s, 0, 120, 60);
        s.flush();
        s.drain().count();
        s.mark_discontinuity();
        let segs = run(&mut s, 200_000, 130, 60);
        assert!(segs[0].1, "{segs:?}");
        assert!(segs[1..].iter().all(|(_, d, _)| !d));
    }

    #[test]
    fn frames_before_the_first_keyframe_are_dropped() {
        let mut s = Segmenter::new(2.0, 8.0, 0, 0);
        s.push_video(VideoIn {
            annexb: au(false),
            pts: 0,
            dts: 0,
            keyframe: false,
            wall: SystemTime::now(),
        });
        assert_eq!(s.waiting_for_keyframe, 1);
    }
}
