//! The video layers of a room (one without simulcast, two or three with it):
//! each with its GOP cache and its measured bit rate, and the choice of the
//! layer a viewer's bandwidth estimate allows.

use std::time::{Duration, Instant};

use str0m::media::Rid;

use crate::frame::MediaFrame;
use crate::gop::{GopCache, GopLimits};
use crate::packetize::{Packetized, Packetizer};

/// A layer is named by its rid; `None` when the publisher sends one stream.
pub(crate) type LayerKey = Option<Rid>;

/// Share of an estimate a layer may use, so that audio, retransmissions and
/// estimate noise fit beside it.
const HEADROOM: f64 = 0.85;

/// A layer whose newest frame is this much older (on the frames' wall
/// clock) than the freshest layer's is behind: a transcoder that cannot
/// keep up. It is not chosen, and its viewers move off it.
const BEHIND: Duration = Duration::from_millis(500);

pub(crate) struct Layer {
    pub(crate) key: LayerKey,
    pub(crate) gop: GopCache,
    packetizer: Option<Packetizer>,
    /// Measured over the last full second.
    pub(crate) bps: u64,
    window_bytes: u64,
    window_start: Option<Instant>,
    /// Wall-clock time (`network_time`) of its newest frame.
    last_at: Option<Instant>,
}

#[derive(Default)]
pub(crate) struct Layers {
    list: Vec<Layer>,
}

impl Layers {
    /// Records a video frame of `frame.rid`'s layer and packetizes it (RTP
    /// payloads of at most `mtu` bytes); returns the layer's index (stable:
    /// layers are only added), whether the layer is new, and the packets.
    pub(crate) fn record(
        &mut self,
        now: Instant,
        frame: &MediaFrame,
        gop: GopLimits,
        mtu: usize,
    ) -> (usize, bool, Packetized) {
        let mut new = false;
        let i = match self.list.iter().position(|l| l.key == frame.rid) {
            Some(i) => i,
            None => {
                new = true;
                self.list.push(Layer {
                    key: frame.rid,
                    gop: GopCache::default(),
                    packetizer: None,
                    bps: 0,
                    window_bytes: 0,
                    window_start: None,
                    last_at: None,
                });
                self.list.len() - 1
            }
        };
        let l = &mut self.list[i];
        l.last_at = Some(
            l.last_at
                .map_or(frame.network_time, |t| t.max(frame.network_time)),
        );
        let start = *l.window_start.get_or_insert(now);
        l.window_bytes += frame.data.len() as u64;
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= Duration::from_secs(1) {
            l.bps = (l.window_bytes as f64 * 8.0 / elapsed.as_secs_f64()) as u64;
            l.window_bytes = 0;
            l.window_start = Some(now);
        }
        let packets = Packetizer::run(&mut l.packetizer, frame, mtu);
        if gop.max_frames > 0 {
            l.gop.push(&packets, gop);
        }
        (i, new, packets)
    }

    /// Whether the layer lags the freshest layer by more than [`BEHIND`].
    pub(crate) fn is_behind(&self, key: LayerKey) -> bool {
        let Some(at) = self.get(key).and_then(|l| l.last_at) else {
            return false;
        };
        self.list
            .iter()
            .filter_map(|l| l.last_at)
            .max()
            .is_some_and(|fresh| fresh.saturating_duration_since(at) > BEHIND)
    }

    pub(crate) fn index(&self, key: LayerKey) -> Option<usize> {
        self.list.iter().position(|l| l.key == key)
    }

    pub(crate) fn get(&self, key: LayerKey) -> Option<&Layer> {
        self.list.iter().find(|l| l.key == key)
    }

    pub(crate) fn bps(&self, key: LayerKey) -> u64 {
        self.get(key).map_or(0, |l| l.bps)
    }

    /// The highest bit rate of any layer.
    pub(crate) fn top_bps(&self) -> u64 {
        self.list.iter().map(|l| l.bps).max().unwrap_or(0)
    }

    /// The layer for a viewer whose estimate is `estimate` and who now gets
    /// `current`: the best layer that fits with headroom; a viewer keeps its
    /// layer while the layer still fits without headroom (no flapping at the
    /// boundary). Without an estimate, the best layer. With `cap` (a layer
    /// the viewer asked for at most, when the room has it), nothing above
    /// that layer's rate. `None` when no layer has been seen.
    pub(crate) fn choose(
        &self,
        estimate: Option<u64>,
        current: Option<LayerKey>,
        cap: Option<LayerKey>,
    ) -> Option<LayerKey> {
        let mut by_rate: Vec<&Layer> = self
            .list
            .iter()
            .filter(|l| !self.is_behind(l.key))
            .collect();
        if let Some(c) = cap.and_then(|k| self.get(k)) {
            // The capping layer itself always stays (its rate may not be
            // measured yet).
            let capped: Vec<&Layer> = by_rate
                .iter()
                .copied()
                .filter(|l| l.key == c.key || l.bps < c.bps)
                .collect();
            if !capped.is_empty() {
                by_rate = capped;
            }
        }
        by_rate.sort_by_key(|l| l.bps);
        let lowest = by_rate.first()?;
        let Some(estimate) = estimate else {
            return by_rate.last().map(|l| l.key);
        };
        let best = by_rate
            .iter()
            .rev()
            .find(|l| (l.bps as f64) <= estimate as f64 * HEADROOM)
            .unwrap_or(lowest)
            .key;
        if let Some(cur) = current
            && let Some(c) = by_rate.iter().find(|l| l.key == cur)
            && c.bps <= estimate
            && self.bps(best) <= c.bps
        {
            return Some(cur);
        }
        Some(best)
    }

    pub(crate) fn clear(&mut self) {
        self.list.clear();
    }
}
