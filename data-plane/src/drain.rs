//! Draining a node: when an operator drains it (`weir ctl nodes drain`),
//! its WebRTC viewers are ended in paced batches so that they ask the
//! control plane again and move to another node, without all of them
//! hitting the scheduler in the same instant. Undraining stops it.
//!
//! Viewers of rooms published on this node move too: the nodes they land on
//! pull the room from this one over the relay (`crate::relay`). Publishers
//! are never ended by a drain: an encoder has one URL and reconnects to it,
//! and a streamer who moves (the publish page asks the control plane again)
//! becomes the origin elsewhere; the edges follow.

use std::time::Duration;

use tokio::sync::watch;

use crate::shard::ShardHandle;

/// How fast a drained node sends its viewers away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainPace {
    /// Viewers ended per interval (at least 1).
    pub batch: usize,
    /// Time between batches.
    pub interval: Duration,
    /// Wait after the drain begins before the first batch (lets load
    /// balancers and the scheduler notice the node is draining first).
    pub grace: Duration,
}

impl Default for DrainPace {
    fn default() -> Self {
        Self {
            batch: 50,
            interval: Duration::from_millis(500),
            grace: Duration::from_secs(2),
        }
    }
}

/// Moves viewers away while `draining` says so, until `shutdown`.
pub(crate) async fn run(
    shard: ShardHandle,
    mut draining: watch::Receiver<bool>,
    pace: DrainPace,
    mut shutdown: watch::Receiver<bool>,
) {
    let batch = pace.batch.max(1);
    let interval = pace.interval.max(Duration::from_millis(1));
    loop {
        // Wait for a drain to begin.
        tokio::select! {
            r = draining.wait_for(|d| *d) => {
                if r.is_err() {
                    return;
                }
            }
            _ = shutdown.changed() => return,
        }
        tracing::info!(
            viewers = shard.live_viewers(),
            batch,
            interval_ms = interval.as_millis() as u64,
            grace_ms = pace.grace.as_millis() as u64,
            "drain: viewers will be sent to other nodes"
        );
        let graced = tokio::select! {
            _ = tokio::time::sleep(pace.grace) => true,
            r = draining.wait_for(|d| !*d) => {
                if r.is_err() {
                    return;
                }
                false
            }
            _ = shutdown.changed() => return,
        };
        if graced
            && !move_while_draining(&shard, &mut draining, batch, interval, &mut shutdown).await
        {
            return;
        }
        tracing::info!(
            viewers = shard.live_viewers(),
            "drain: undrained; viewers are no longer moved"
        );
    }
}

/// Ends a batch of viewers every `interval` until the drain is lifted
/// (returns true) or the node stops (false).
async fn move_while_draining(
    shard: &ShardHandle,
    draining: &mut watch::Receiver<bool>,
    batch: usize,
    interval: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut said_staying = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = draining.wait_for(|d| !*d) => return r.is_ok(),
            _ = shutdown.changed() => return false,
        }
        let Ok(crate::shard::MovedBatch { moved, left }) = shard.move_viewers(batch).await else {
            return false;
        };
        if moved > 0 {
            metrics::counter!("weir_drain_viewers_moved_total").increment(moved as u64);
            tracing::info!(moved, left, "drain: viewers sent to other nodes");
            said_staying = false;
        } else if left > 0 && !said_staying {
            // Said once per lull, not every interval.
            tracing::info!(
                left,
                "drain: viewers are left but none moved this time (they arrived while the batch ran); next interval"
            );
            said_staying = true;
        }
    }
}
