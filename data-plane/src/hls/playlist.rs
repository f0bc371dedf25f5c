//! HLS playlists (RFC 8216, version 7 for fMP4): a live media playlist per
//! rendition over a sliding window, and the master playlist of a room.

use std::collections::VecDeque;
use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// One segment listed in a media playlist.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Media sequence number.
    pub seq: u64,
    /// Duration in seconds.
    pub duration: f64,
    /// Preceded by `#EXT-X-DISCONTINUITY`.
    pub discontinuity: bool,
    /// Which init segment (`EXT-X-MAP`) it needs.
    pub init: u32,
    /// Size in bytes (for the variant's measured bandwidth).
    pub bytes: u64,
    /// Wall clock of its first frame (`EXT-X-PROGRAM-DATE-TIME`).
    pub wall: SystemTime,
}

/// A live media playlist over a window of the latest segments.
#[derive(Debug, Clone)]
pub struct MediaPlaylist {
    /// Segments listed, oldest first.
    pub entries: VecDeque<Entry>,
    /// How many segments are listed at most.
    pub window: usize,
    /// Configured target duration, seconds.
    pub target: f64,
    /// `EXT-X-DISCONTINUITY-SEQUENCE`: discontinuities that left the window.
    pub discontinuity_seq: u64,
    /// Longest segment so far, rounded (the target duration never shrinks).
    longest: u32,
    /// `#EXT-X-ENDLIST` (the publisher is gone for good).
    pub ended: bool,
    /// Prefix of segment file names (unique per packaging run, so CDN
    /// caches never mix two runs' segments).
    pub prefix: String,
}

impl MediaPlaylist {
    /// An empty playlist.
    pub fn new(prefix: String, window: usize, target: f64) -> Self {
        Self {
            entries: VecDeque::new(),
            window: window.max(3),
            target,
            discontinuity_seq: 0,
            longest: 0,
            ended: false,
            prefix,
        }
    }

    /// Adds a segment; returns the one that left the window, if any.
    pub fn push(&mut self, entry: Entry) -> Option<Entry> {
        self.longest = self.longest.max(entry.duration.round() as u32);
        self.entries.push_back(entry);
        if self.entries.len() > self.window {
            let old = self.entries.pop_front()?;
            // The tags of segments that left the window are counted, so
            // every remaining segment keeps its discontinuity number.
            if old.discontinuity {
                self.discontinuity_seq += 1;
            }
            return Some(old);
        }
        None
    }

    /// `EXT-X-TARGETDURATION`: the configured target, or more when a
    /// segment was longer (a publisher with a longer GOP).
    pub fn target_duration(&self) -> u32 {
        (self.target.ceil() as u32).max(self.longest).max(1)
    }

    /// File name of a segment.
    pub fn segment_name(&self, seq: u64) -> String {
        format!("{}-{seq}.m4s", self.prefix)
    }

    /// File name of an init segment.
    pub fn init_name(&self, init: u32) -> String {
        format!("{}-init{init}.mp4", self.prefix)
    }

    /// Peak bit rate over the listed segments.
    pub fn peak_bps(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.duration > 0.1)
            .map(|e| (e.bytes as f64 * 8.0 / e.duration) as u64)
            .max()
            .unwrap_or(0)
    }

    /// Average bit rate over the listed segments.
    pub fn average_bps(&self) -> u64 {
        let secs: f64 = self.entries.iter().map(|e| e.duration).sum();
        let bytes: u64 = self.entries.iter().map(|e| e.bytes).sum();
        if secs > 0.1 {
            (bytes as f64 * 8.0 / secs) as u64
        } else {
            0
        }
    }

    /// The playlist text.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(256 + self.entries.len() * 96);
        let _ = write!(
            s,
            "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:{}\n",
            self.target_duration()
        );
        let first = self.entries.front().map(|e| e.seq).unwrap_or(0);
        let _ = writeln!(s, "#EXT-X-MEDIA-SEQUENCE:{first}");
        if self.discontinuity_seq > 0 {
            let _ = writeln!(
                s,
                "#EXT-X-DISCONTINUITY-SEQUENCE:{}",
                self.discontinuity_seq
            );
        }
        s.push_str("#EXT-X-INDEPENDENT-SEGMENTS\n");
        let mut map = None;
        for (i, e) in self.entries.iter().enumerate() {
            if e.discontinuity {
                s.push_str("#EXT-X-DISCONTINUITY\n");
            }
            if map != Some(e.init) {
                let _ = writeln!(s, "#EXT-X-MAP:URI=\"{}\"", self.init_name(e.init));
                map = Some(e.init);
            }
            if i == 0 || e.discontinuity {
                let _ = writeln!(s, "#EXT-X-PROGRAM-DATE-TIME:{}", rfc3339(e.wall));
            }
            let _ = write!(
                s,
                "#EXTINF:{:.3},\n{}\n",
                e.duration,
                self.segment_name(e.seq)
            );
        }
        if self.ended {
            s.push_str("#EXT-X-ENDLIST\n");
        }
        s
    }
}

/// One variant of the master playlist.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// Rendition name, also its directory (`source`, `720p`, …).
    pub name: String,
    /// Peak bit rate, bits/s.
    pub bandwidth: u64,
    /// Average bit rate, bits/s.
    pub average: u64,
    /// `CODECS`, e.g. `avc1.64001f,mp4a.40.2`.
    pub codecs: String,
    /// Picture size, when there is video.
    pub resolution: Option<(u32, u32)>,
    /// Frames per second, when known.
    pub frame_rate: Option<f64>,
}

/// The master playlist.
pub fn master(variants: &[Variant]) -> String {
    let mut s = String::from("#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-INDEPENDENT-SEGMENTS\n");
    for v in variants {
        let _ = write!(
            s,
            "#EXT-X-STREAM-INF:BANDWIDTH={},AVERAGE-BANDWIDTH={},CODECS=\"{}\"",
            v.bandwidth.max(1),
            v.average.max(1).min(v.bandwidth.max(1)),
            v.codecs
        );
        if let Some((w, h)) = v.resolution {
            let _ = write!(s, ",RESOLUTION={w}x{h}");
        }
        if let Some(f) = v.frame_rate {
            let _ = write!(s, ",FRAME-RATE={f:.3}");
        }
        let _ = write!(s, ",NAME=\"{}\"\n{}/index.m3u8\n", v.name, v.name);
    }
    s
}

/// `YYYY-MM-DDThh:mm:ss.sssZ` without a date crate.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, sec) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{sec:02}.{:03}Z",
        d.subsec_millis()
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(seq: u64, discontinuity: bool, init: u32) -> Entry {
        Entry {
            seq,
            duration: 2.0,
            discontinuity,
            init,
            bytes: 250_000,
            wall: UNIX_EPOCH + Duration::from_secs(1_700_000_000 + seq * 2),
        }
    }

    #[test]
    fn window_slides_and_counts_discontinuities_that_leave_it() {
        let mut p = MediaPlaylist::new("abc".into(), 3, 2.0);
        for seq in 0..3 {
            assert!(p.push(entry(seq, false, 0)).is_none());
        }
        assert!(p.push(entry(3, true, 1)).is_some());
        let text = p.render();
        assert!(text.contains("#EXT-X-MEDIA-SEQUENCE:1\n"), "{text}");
        assert!(text.contains("#EXT-X-DISCONTINUITY\n#EXT-X-MAP:URI=\"abc-init1.mp4\"\n"));
        assert!(text.contains("#EXTINF:2.000,\nabc-3.m4s\n"));
        for seq in 4..7 {
            p.push(entry(seq, false, 1));
        }
        let text = p.render();
        assert!(text.contains("#EXT-X-DISCONTINUITY-SEQUENCE:1\n"), "{text}");
        assert!(!text.contains("#EXT-X-DISCONTINUITY\n"), "{text}");
        assert_eq!(p.peak_bps(), 1_000_000);
        p.ended = true;
        assert!(p.render().ends_with("#EXT-X-ENDLIST\n"));
    }

    #[test]
    fn target_duration_covers_long_segments() {
        let mut p = MediaPlaylist::new("x".into(), 6, 2.0);
        p.push(Entry {
            duration: 4.4,
            ..entry(0, false, 0)
        });
        assert_eq!(p.target_duration(), 4);
        p.push(Entry {
            duration: 4.6,
            ..entry(1, false, 0)
        });
        assert_eq!(p.target_duration(), 5);
    }

    #[test]
    fn dates_are_rfc3339() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn master_lists_variants() {
        let m = master(&[Variant {
            name: "source".into(),
            bandwidth: 2_000_000,
            average: 1_500_000,
            codecs: "avc1.64001e,mp4a.40.2".into(),
            resolution: Some((640, 360)),
            frame_rate: Some(30.0),
        }]);
        assert!(m.contains("BANDWIDTH=2000000,AVERAGE-BANDWIDTH=1500000,CODECS=\"avc1.64001e,mp4a.40.2\",RESOLUTION=640x360,FRAME-RATE=30.000,NAME=\"source\"\nsource/index.m3u8\n"), "{m}");
    }
}
