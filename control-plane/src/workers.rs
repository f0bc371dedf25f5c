//! Singleton workers: work that exactly one control-plane replica must do,
//! run by the leader of the [`crate::election::CONTROL_ELECTION`] election
//! and stopped as soon as it loses the lead.
//!
//! Three run today:
//! - **live sync**, which marks a stored room `live` once a node reports a
//!   publisher live in it (the streamer went live by publishing; nobody has
//!   to call `GoLive`). Rooms the store does not know, and rooms already live
//!   or ended, are left alone; ending stays an explicit call.
//! - **the outbox relay** ([`crate::outbox`]), which publishes paid gifts'
//!   events to the room bus ([`ControlState::with_bus`]) until the broker
//!   acknowledges them.
//! - **the CDN prober** ([`crate::cdn::run_prober`]), which probes the
//!   configured CDNs and drives their circuit breakers.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use weir_protocol::RoomId;
use weir_protocol::bus::{EventBody, GO_LIVE_ANNOUNCE_S, NOTICES_ROOM, RoomEvent};

use crate::election::LeaderState;
use crate::service::{ApiError, ControlState};
use crate::store::{PageRequest, RoomFilter, RoomStatus};

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
        // All run until leadership is lost; dropping them stops them
        // mid-call, which is safe: an outbox row stays pending until marked,
        // a repeated publish is dropped by the broker, and the next leader
        // probes the CDNs again.
        let _prober = AbortOnDrop(tokio::spawn(crate::cdn::run_prober(Arc::clone(&state))));
        let work = async { tokio::join!(live_sync(&state), outbox_relay(&state)) };
        let lost = tokio::select! {
            _ = work => Ok(()),
            lost = leadership.wait_for(|s| !s.is_leader) => lost.map(drop),
        };
        if lost.is_err() {
            return;
        }
        tracing::info!("no longer leading: singleton workers stop");
    }
}

/// Runs the singleton workers forever without campaigning: for a process
/// that is the only control plane there is (`weir dev`), which would elect
/// itself anyway. `weir control` uses [`run`] with its candidacy.
pub async fn run_unelected(state: Arc<ControlState>) {
    let (leading, leadership) = watch::channel(LeaderState {
        leader: None,
        is_leader: true,
    });
    run(state, leadership).await;
    // Kept alive until here: a dropped sender would read as a lost lead.
    drop(leading);
}

/// Live sync every [`LIVE_SYNC_EVERY`], forever.
async fn live_sync(state: &ControlState) {
    let mut tick = tokio::time::interval(LIVE_SYNC_EVERY);
    loop {
        tick.tick().await;
        match sync_live_rooms(state).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rooms = n, "live sync: stored rooms marked live"),
            Err(e) => tracing::debug!(error = %e, "live sync skipped"),
        }
        if let Err(e) = announce_go_live(state).await {
            tracing::debug!(error = %e, "go-live notices wait");
        }
    }
}

/// The outbox relay over the state's store and bus, forever.
async fn outbox_relay(state: &ControlState) {
    match state.store() {
        Some(store) => {
            crate::outbox::relay(
                store.clone(),
                state.bus().cloned(),
                Arc::clone(state.outbox_wake()),
            )
            .await
        }
        // No store, no gifts.
        None => std::future::pending().await,
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

/// Announces on the notices room every room that went live in the last
/// [`GO_LIVE_ANNOUNCE_S`] seconds, with the message id
/// `golive-{room}-{started_ms}`: the broker keeps one per go-live, however
/// many leaders announce it, and nodes tell the streamer's followers who are
/// connected to them. Returns how many notices were new.
pub async fn announce_go_live(state: &ControlState) -> Result<usize, String> {
    let (Some(store), Some(bus)) = (state.store(), state.bus()) else {
        return Ok(0);
    };
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
        .saturating_sub(GO_LIVE_ANNOUNCE_S * 1000);
    let notices = RoomId::parse(NOTICES_ROOM).map_err(|e| e.to_string())?;
    let filter = RoomFilter {
        owner: None,
        status: Some(RoomStatus::Live),
    };
    let mut request = PageRequest {
        after: String::new(),
        limit: 500,
    };
    let mut new = 0;
    loop {
        let page = store
            .list_rooms(&filter, &request)
            .await
            .map_err(|e| e.to_string())?;
        for room in &page.items {
            let Some(started) = room.started_ms.filter(|s| *s >= since) else {
                continue;
            };
            let event = RoomEvent {
                at_ms: started,
                body: EventBody::GoLive {
                    streamer: room.owner.to_string(),
                    room: room.id.to_string(),
                    title: room.title.clone(),
                },
            };
            let id = format!("golive-{}-{started}", room.id);
            match bus.publish(&notices, &event, Some(&id)).await {
                Ok(p) if !p.duplicate => {
                    new += 1;
                    metrics::counter!("weir_go_live_notices_total").increment(1);
                    tracing::info!(room = %room.id, streamer = %room.owner, "go-live notice published");
                }
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        match page.next {
            Some(next) => request.after = next,
            None => return Ok(new),
        }
    }
}
