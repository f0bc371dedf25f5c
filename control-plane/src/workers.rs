//! Singleton workers: work that exactly one control-plane replica must do,
//! run by the leader of the [`crate::election::CONTROL_ELECTION`] election
//! and stopped as soon as it loses the lead.
//!
//! Two run today. **Live sync**, which marks a stored room `live` once
//! a node reports a publisher live in it (the streamer went live by
//! publishing; nobody has to call `GoLive`). Rooms the store does not know,
//! and rooms already live or ended, are left alone; ending stays an explicit
//! call.
//!
//! The **CDN prober** ([`crate::cdn::run_prober`]) probes the configured CDNs
//! and drives their circuit breakers; it runs as a task of its own while
//! this replica leads.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use weir_protocol::RoomId;

use crate::election::LeaderState;
use crate::service::{ApiError, ControlState};
use crate::store::RoomStatus;

/// How often the leader looks for rooms that went live.
pub const LIVE_SYNC_EVERY: Duration = Duration::from_secs(1);

/// Runs the singleton workers whenever `leadership` says this replica
/// leads, forever (spawn it).
pub async fn run(state: Arc<ControlState>, mut leadership: watch::Receiver<LeaderState>) {
    loop {
        if leadership.wait_for(|s| s.is_leader).await.is_err() {
            return;
        }
        tracing::info!("leading: singleton workers start");
        let prober = AbortOnDrop(tokio::spawn(crate::cdn::run_prober(Arc::clone(&state))));
        let mut tick = tokio::time::interval(LIVE_SYNC_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = leadership.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            if !leadership.borrow().is_leader {
                tracing::info!("no longer leading: singleton workers stop");
                drop(prober);
                break;
            }
            match sync_live_rooms(&state).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(rooms = n, "live sync: stored rooms marked live"),
                Err(e) => tracing::debug!(error = %e, "live sync skipped"),
            }
        }
    }
}

/// Marks live every stored `scheduled` room that some node reports live;
/// returns how many changed.
pub async fn sync_live_rooms(state: &ControlState) -> Result<usize, ApiError> {
    let Some(store) = state.store() else {
        return Ok(0);
    };
    let cluster = state.coordinator().cluster_view().await?;
    let live: BTreeSet<&RoomId> = cluster
        .nodes
        .iter()
        .flat_map(|n| n.load.rooms.iter())
        .filter(|r| r.live)
        .map(|r| &r.room)
        .collect();
    let mut changed = 0;
    for room in live {
        if let Some(stored) = store.find_room(room).await?
            && stored.status == RoomStatus::Scheduled
        {
            store.go_live(room).await?;
            metrics::counter!("weir_rooms_went_live_total").increment(1);
            changed += 1;
        }
    }
    Ok(changed)
}

/// A task aborted when its handle is dropped (also when `run` itself is
/// aborted), so a worker never outlives the lead.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
