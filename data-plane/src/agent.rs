//! The node's agent: registers the node under a lease, reports its load every
//! second, and claims room origins. The data plane never waits on it for
//! media: when the coordinator is unreachable the node keeps serving and says
//! so in its metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use weir_protocol::coordinator::{
    CoordError, Coordinator, LeaseId, NODE_TTL, NodeInfo, NodeLoad, RoomLoad,
};
use weir_protocol::{NodeId, RoomId};

use crate::shard::ShardHandle;

/// Registration and placement on behalf of one node.
pub struct Agent {
    coordinator: Arc<dyn Coordinator>,
    info: Mutex<NodeInfo>,
    /// The node's lease (shared with the relay, which binds its edge
    /// records to it).
    lease: Arc<Mutex<Option<LeaseId>>>,
    /// Whether an operator drains this node (`weir ctl nodes drain`).
    draining: watch::Sender<bool>,
    /// The node's relay: a room claimed here is no longer pulled from elsewhere.
    relay: std::sync::OnceLock<Arc<crate::relay::Relay>>,
    /// Rooms whose origin the coordinator gave this node, with when each
    /// was last claimed. A claim or release holds this lock through its
    /// coordinator call, so a release never undoes a claim made meanwhile.
    origins: tokio::sync::Mutex<HashMap<RoomId, Instant>>,
    /// Rooms live here whose origin another node holds (both admitted a
    /// publisher while the coordinator was unreachable): said once, then
    /// claimed again each tick until one of them ends.
    conflicts: Mutex<std::collections::HashSet<RoomId>>,
}

/// How long a claimed room stays this node's while nobody publishes it yet:
/// a publisher admitted but not connected (an encoder taking over its own
/// session) keeps its room's origin, and edges keep pulling it.
const CLAIM_GRACE: Duration = Duration::from_secs(10);

/// Whether a claim made at `at` is older than [`CLAIM_GRACE`] at `now` (a
/// claim made after `now` is not).
fn past_grace(at: Instant, now: Instant) -> bool {
    now.saturating_duration_since(at) > CLAIM_GRACE
}

/// What the agent changes each tick: origins to claim (rooms live here that
/// it does not hold, as after a coordinator outage) and origins to give up
/// (held rooms that are not live and were not claimed within
/// [`CLAIM_GRACE`]).
fn origin_changes(
    held: &HashMap<RoomId, Instant>,
    live: &[RoomId],
    now: Instant,
) -> (Vec<RoomId>, Vec<RoomId>) {
    let claim = live
        .iter()
        .filter(|r| !held.contains_key(*r))
        .cloned()
        .collect();
    let mut release: Vec<RoomId> = held
        .iter()
        .filter(|(r, at)| !live.contains(r) && past_grace(**at, now))
        .map(|(r, _)| r.clone())
        .collect();
    release.sort();
    (claim, release)
}

/// Why a node may not take a room.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("room {room} is live on node {origin}")]
    ElsewhereLive { room: RoomId, origin: NodeId },
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Agent {
    pub fn new(coordinator: Arc<dyn Coordinator>, info: NodeInfo) -> Self {
        Self {
            coordinator,
            info: Mutex::new(info),
            lease: Arc::new(Mutex::new(None)),
            draining: watch::channel(false).0,
            relay: std::sync::OnceLock::new(),
            origins: tokio::sync::Mutex::default(),
            conflicts: Mutex::default(),
        }
    }

    /// Hands the agent the node's relay (set once, at start).
    pub(crate) fn set_relay(&self, relay: Arc<crate::relay::Relay>) {
        relay.set_lease(Arc::clone(&self.lease));
        let _ = self.relay.set(relay);
    }

    /// Whether the node is being drained: it takes no new sessions and its
    /// room-event clients are sent elsewhere.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Reads the operator's flags for this node (kept when the coordinator
    /// does not answer).
    async fn read_flags(&self) {
        let Some(id) = self.node_id() else { return };
        let Ok(Ok(flags)) =
            tokio::time::timeout(Duration::from_secs(2), self.coordinator.node_flags()).await
        else {
            return;
        };
        let draining = flags.get(&id).is_some_and(|f| f.draining);
        if let Ok(mut info) = self.info.lock() {
            info.draining = draining;
        }
        if *self.draining.borrow() != draining {
            tracing::warn!(draining, "node drain flag changed");
            metrics::gauge!("weir_node_draining").set(if draining { 1.0 } else { 0.0 });
            self.draining.send_replace(draining);
        }
    }

    fn node_id(&self) -> Option<NodeId> {
        self.info.lock().ok().map(|i| i.id.clone())
    }

    fn lease(&self) -> Option<LeaseId> {
        self.lease.lock().ok().and_then(|l| *l)
    }

    /// Makes this node the origin of `room`. Allowed when the coordinator
    /// cannot be reached (a node keeps admitting valid tokens on its own;
    /// the claim is made once it answers again). A room this node pulled
    /// from another node stops being pulled: its publisher is here now.
    pub async fn claim_room(&self, room: &RoomId) -> Result<(), ClaimError> {
        let claimed = {
            let mut held = self.origins.lock().await;
            self.claim(room, &mut held).await
        };
        if claimed.is_ok()
            && let Some(relay) = self.relay.get()
        {
            relay
                .stop_pull(room, "a publisher of the room arrived here")
                .await;
        }
        claimed
    }

    async fn claim(
        &self,
        room: &RoomId,
        held: &mut HashMap<RoomId, Instant>,
    ) -> Result<(), ClaimError> {
        let (Some(node), Some(lease)) = (self.node_id(), self.lease()) else {
            tracing::warn!(%room, "not registered with the coordinator; admitting publisher anyway");
            return Ok(());
        };
        match self.coordinator.claim_room(room, &node, lease).await {
            Ok(origin) if origin == node => {
                held.insert(room.clone(), Instant::now());
                Ok(())
            }
            Ok(origin) => {
                held.remove(room);
                Err(ClaimError::ElsewhereLive {
                    room: room.clone(),
                    origin,
                })
            }
            Err(e) => {
                tracing::warn!(%room, error = %e, "coordinator unavailable for placement; admitting publisher");
                metrics::counter!("weir_coordinator_errors_total", "op" => "claim_room")
                    .increment(1);
                Ok(())
            }
        }
    }

    /// Brings the coordinator's origins in line with the rooms live here:
    /// claims the live ones it does not hold, gives up those nobody
    /// publishes any more (see [`origin_changes`]).
    async fn settle_origins(&self, live: &[RoomId]) {
        let Some(node) = self.node_id() else { return };
        let now = Instant::now();
        let (claim, release) = origin_changes(&*self.origins.lock().await, live, now);
        // The lock is taken per room, so a publisher's claim waits for one
        // coordinator call at most; a claim made meanwhile keeps its room.
        for room in release {
            let mut held = self.origins.lock().await;
            if !held.get(&room).is_some_and(|at| past_grace(*at, now)) {
                continue;
            }
            match self.coordinator.release_room(&room, &node).await {
                Ok(()) => {
                    held.remove(&room);
                    tracing::info!(%room, "gave up the room's origin: nobody publishes it here");
                }
                Err(e) => {
                    tracing::debug!(%room, error = %e, "could not give up the room's origin; will retry");
                    metrics::counter!("weir_coordinator_errors_total", "op" => "release_room")
                        .increment(1);
                }
            }
        }
        if let Ok(mut conflicts) = self.conflicts.lock() {
            conflicts.retain(|r| live.contains(r));
        }
        for room in claim {
            let mut held = self.origins.lock().await;
            if held.contains_key(&room) {
                continue;
            }
            let claimed = self.claim(&room, &mut held).await;
            drop(held);
            let Ok(mut conflicts) = self.conflicts.lock() else {
                continue;
            };
            match claimed {
                Ok(()) => {
                    conflicts.remove(&room);
                }
                Err(e) if conflicts.insert(room.clone()) => {
                    tracing::warn!(%room, error = %e, "room is live here and placed elsewhere; claiming it once the other ends");
                }
                Err(_) => {}
            }
        }
    }

    /// Registers, then reports load every second until `shutdown`; revokes
    /// the lease on the way out so the node leaves answers at once.
    pub async fn run(self: Arc<Self>, shard: ShardHandle, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            self.read_flags().await;
            let stats = shard.stats();
            let load = NodeLoad {
                reported_at_ms: unix_ms(),
                sessions: stats.publishers + stats.subscribers,
                egress_bps: stats.egress_bps,
                rooms: stats
                    .rooms
                    .iter()
                    .map(|r| RoomLoad {
                        room: r.room.clone(),
                        live: r.live,
                        subscribers: r.subscribers,
                    })
                    .collect(),
            };
            let info = match self.info.lock() {
                Ok(mut i) => {
                    i.load = load;
                    i.clone()
                }
                Err(_) => return,
            };
            let ok = self.report(info).await;
            metrics::gauge!("weir_coordinator_connected").set(if ok { 1.0 } else { 0.0 });
            if ok {
                let live: Vec<RoomId> = stats
                    .rooms
                    .iter()
                    .filter(|r| r.live)
                    .map(|r| r.room.clone())
                    .collect();
                self.settle_origins(&live).await;
            }
        }
        if let Some(lease) = self.lease()
            && let Err(e) = self.coordinator.revoke(lease).await
        {
            tracing::warn!(error = %e, "could not revoke the node lease");
        }
    }

    /// Refreshes the lease; registers anew only when the lease is gone (a
    /// short coordinator outage keeps the lease and the room claims bound to
    /// it). After registering anew, forgets the claims of the old lease:
    /// `settle_origins` claims the live rooms again in the same tick.
    async fn report(&self, info: NodeInfo) -> bool {
        if let Some(lease) = self.lease() {
            match self.coordinator.keep_alive(lease, info.clone()).await {
                Ok(()) => return true,
                Err(CoordError::LeaseExpired(_)) => {
                    tracing::warn!(lease = lease.0, "node lease expired; registering again");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "coordinator unreachable; serving what we have");
                    return false;
                }
            }
        }
        match self.coordinator.register_node(info, NODE_TTL).await {
            Ok(lease) => {
                tracing::info!(lease = lease.0, "registered with the coordinator");
                // Claims made under an old lease went with it; the live
                // rooms are claimed again right after (`settle_origins`).
                let mut held = self.origins.lock().await;
                held.clear();
                if let Ok(mut l) = self.lease.lock() {
                    *l = Some(lease);
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "coordinator unreachable; serving what we have");
                false
            }
        }
    }
}

/// Longest single wait for a config change before asking again.
const CONFIG_WAIT: Duration = Duration::from_secs(30);

impl Agent {
    /// Watches the config center and applies the `chat.*` keys to the
    /// node's rooms, at once and without dropping anyone, until `shutdown`.
    /// A value that does not parse keeps its key's default (with a warning);
    /// while the coordinator is unreachable the applied limits stay.
    pub async fn watch_config(
        self: Arc<Self>,
        hub: Arc<crate::bus::Hub>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut revision = 0u64;
        let mut need_read = true;
        let mut failures = 0u32;
        loop {
            let next = async {
                if need_read {
                    tokio::time::timeout(CONFIG_WAIT, self.coordinator.config()).await
                } else {
                    tokio::time::timeout(CONFIG_WAIT, self.coordinator.next_config(revision)).await
                }
            };
            let next = tokio::select! {
                next = next => next,
                _ = shutdown.changed() => return,
            };
            match next {
                Ok(Ok(snapshot)) => {
                    failures = 0;
                    need_read = false;
                    if snapshot.revision < revision {
                        continue;
                    }
                    revision = snapshot.revision;
                    let values = snapshot
                        .values
                        .iter()
                        .map(|(k, v)| (k.clone(), v.value.clone()))
                        .collect();
                    let (limits, problems) = weir_protocol::chat::ChatLimits::from_values(&values);
                    for p in &problems {
                        tracing::warn!(revision, problem = %p, "stored chat config ignored; the key keeps its default");
                    }
                    if *hub.limits() != limits {
                        tracing::info!(revision, ?limits, "chat limits applied");
                        hub.set_limits(limits);
                    }
                    metrics::gauge!("weir_config_revision").set(revision as f64);
                }
                Err(_) => need_read = false,
                Ok(Err(CoordError::Unsupported(what))) => {
                    tracing::info!(
                        what,
                        "the coordinator has no config center; chat limits stay at their defaults"
                    );
                    return;
                }
                Ok(Err(e)) => {
                    failures += 1;
                    need_read = true;
                    if failures == 1 || failures.is_multiple_of(60) {
                        tracing::warn!(error = %e, "cannot read the config; keeping the limits applied");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(s: &str) -> RoomId {
        RoomId::parse(s).expect("a valid room id")
    }

    #[test]
    fn a_room_whose_publisher_is_reconnecting_keeps_its_origin() {
        let claimed = Instant::now();
        // Claimed a moment ago for a publisher taking over its session:
        // nobody publishes the room yet, and the claim holds.
        let held = HashMap::from([(room("show"), claimed)]);
        let now = claimed + Duration::from_secs(1);
        assert_eq!(origin_changes(&held, &[], now), (vec![], vec![]));
        // Nobody connected within the grace: the origin is given up.
        let later = now + CLAIM_GRACE;
        assert_eq!(
            origin_changes(&held, &[], later),
            (vec![], vec![room("show")])
        );
        // Live again: kept, however old the claim.
        assert_eq!(
            origin_changes(&held, &[room("show")], later),
            (vec![], vec![])
        );
    }

    #[test]
    fn live_rooms_not_held_are_claimed_and_others_left_alone() {
        let long_ago = Instant::now();
        let now = long_ago + CLAIM_GRACE * 3;
        let held = HashMap::from([(room("kept"), long_ago), (room("ended"), long_ago)]);
        let (claim, release) = origin_changes(&held, &[room("kept"), room("admitted")], now);
        assert_eq!(claim, vec![room("admitted")]);
        assert_eq!(release, vec![room("ended")]);
    }
}
