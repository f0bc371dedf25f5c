//! The GOP cache: the last keyframe of a room's video and every frame since,
//! so a viewer who joins gets a picture at once, without asking the
//! publisher for a keyframe (and without making every viewer wait for the
//! next one).

use crate::packetize::Packetized;

/// Bounds of the cache; past either, it is dropped until the next keyframe
/// (a publisher with very long GOPs then gets keyframe requests instead).
#[derive(Debug, Clone, Copy)]
pub struct GopLimits {
    /// Most frames kept; 0 disables the cache.
    pub max_frames: usize,
    pub max_bytes: usize,
}

impl Default for GopLimits {
    fn default() -> Self {
        Self {
            // 20 s at 30 fps, and a generous byte bound for high bitrates.
            max_frames: 600,
            max_bytes: 16 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct GopCache {
    frames: Vec<Packetized>,
    bytes: usize,
}

impl GopCache {
    /// Records a video frame of the forwarded layer.
    pub(crate) fn push(&mut self, packets: &Packetized, limits: GopLimits) {
        let frame = &packets.frame;
        if frame.keyframe {
            self.clear();
        } else if self.frames.is_empty() {
            // Nothing decodable to append to.
            return;
        }
        if self.frames.len() >= limits.max_frames
            || self.bytes + frame.data.len() > limits.max_bytes
        {
            self.clear();
            return;
        }
        self.bytes += frame.data.len();
        self.frames.push(packets.clone());
    }

    /// The keyframe and what follows it, if a keyframe is cached.
    pub(crate) fn frames(&self) -> &[Packetized] {
        &self.frames
    }

    pub(crate) fn clear(&mut self) {
        self.frames.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use str0m::format::Codec;
    use str0m::media::{MediaKind, MediaTime};

    use super::*;
    use crate::frame::MediaFrame;

    fn frame(keyframe: bool, len: usize) -> Packetized {
        #[allow(clippy::disallowed_methods)] // a timestamp no test reads
        let now = Instant::now();
        let frame = MediaFrame {
            kind: MediaKind::Video,
            codec: Codec::Vp8,
            params: None,
            time: MediaTime::from_90khz(0),
            network_time: now,
            keyframe,
            rid: None,
            capture_time: None,
            data: Arc::from(vec![0u8; len]),
        };
        Packetized {
            frame,
            payloads: Arc::from([]),
            picture_id: None,
        }
    }

    #[test]
    fn keeps_from_the_last_keyframe_within_bounds() {
        let limits = GopLimits {
            max_frames: 4,
            max_bytes: 1000,
        };
        let mut g = GopCache::default();
        g.push(&frame(false, 10), limits);
        assert!(
            g.frames().is_empty(),
            "deltas before any keyframe are useless"
        );
        g.push(&frame(true, 10), limits);
        g.push(&frame(false, 10), limits);
        assert_eq!(g.frames().len(), 2);
        g.push(&frame(true, 10), limits);
        assert_eq!(g.frames().len(), 1, "a keyframe starts over");
        for _ in 0..3 {
            g.push(&frame(false, 10), limits);
        }
        assert_eq!(g.frames().len(), 4);
        g.push(&frame(false, 10), limits);
        assert!(g.frames().is_empty(), "past the bound the cache is dropped");
        g.push(&frame(true, 2000), limits);
        assert!(
            g.frames().is_empty(),
            "a keyframe over the byte bound is not kept"
        );
    }
}
