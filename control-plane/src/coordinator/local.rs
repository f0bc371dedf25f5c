//! The in-process [`Coordinator`]: membership under leases, load reports and
//! room placement held in this process's memory. It is the embedded default of
//! `weir dev` (one machine, one process), with the same semantics as the etcd
//! implementation: keys bound to a lease vanish when the lease expires, and a
//! room's origin is claimed by compare-and-set.
//!
//! It also keeps the operator's node flags and the config center's values,
//! versions and history; a config change wakes every `next_config` waiter.
//!
//! Expiry is lazy: every call first prunes the leases whose time to live has
//! run out, with everything bound to them. The logic lives in a private `State`, whose
//! methods take `now` as an argument, so the tests step a virtual clock instead
//! of sleeping.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::election::ElectionBackend;
use weir_protocol::coordinator::{
    CONFIG_HISTORY_KEPT, CdnHealth, ClusterState, ConfigSnapshot, ConfigValue, ConfigWrite,
    CoordError, Coordinator, LeaseId, NodeFlags, NodeInfo,
};
use weir_protocol::{NodeId, RoomId};

/// The in-process coordinator (see the module docs).
#[derive(Debug)]
pub struct LocalCoordinator {
    state: Mutex<State>,
    /// The config revision, for `next_config` waiters.
    config_rev: watch::Sender<u64>,
}

impl Default for LocalCoordinator {
    fn default() -> Self {
        Self {
            state: Mutex::new(State::default()),
            config_rev: watch::Sender::new(0),
        }
    }
}

impl LocalCoordinator {
    /// An empty coordinator: no nodes, no leases, no rooms, no config.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation of `State` is a handful of map operations that cannot
        // panic halfway, so a poisoned lock still guards consistent data.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl Coordinator for LocalCoordinator {
    async fn register_node(&self, info: NodeInfo, ttl: Duration) -> Result<LeaseId, CoordError> {
        Ok(self.lock().register_node(info, ttl, Instant::now()))
    }

    async fn keep_alive(&self, lease: LeaseId, info: NodeInfo) -> Result<(), CoordError> {
        self.lock().keep_alive(lease, info, Instant::now())
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), CoordError> {
        self.lock().revoke(lease, Instant::now())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, CoordError> {
        Ok(self.lock().nodes(Instant::now()))
    }

    async fn claim_room(
        &self,
        room: &RoomId,
        node: &NodeId,
        lease: LeaseId,
    ) -> Result<NodeId, CoordError> {
        self.lock().claim_room(room, node, lease, Instant::now())
    }

    async fn release_room(&self, room: &RoomId, node: &NodeId) -> Result<(), CoordError> {
        self.lock().release_room(room, node, Instant::now());
        Ok(())
    }

    async fn room_origins(&self) -> Result<Vec<(RoomId, NodeId)>, CoordError> {
        Ok(self.lock().room_origins(Instant::now()))
    }

    async fn register_edge(
        &self,
        room: &RoomId,
        node: &NodeId,
        lease: LeaseId,
    ) -> Result<(), CoordError> {
        let mut s = self.lock();
        s.live_lease(lease, Instant::now())?;
        s.edges.insert((room.clone(), node.clone()), lease);
        Ok(())
    }

    async fn release_edge(&self, room: &RoomId, node: &NodeId) -> Result<(), CoordError> {
        self.lock().edges.remove(&(room.clone(), node.clone()));
        Ok(())
    }

    async fn room_edges(&self) -> Result<Vec<(RoomId, NodeId)>, CoordError> {
        let mut s = self.lock();
        s.prune(Instant::now());
        Ok(s.edges.keys().cloned().collect())
    }

    async fn cluster(&self) -> Result<ClusterState, CoordError> {
        let now = Instant::now();
        let mut s = self.lock();
        Ok(ClusterState {
            nodes: s.nodes(now),
            origins: s.room_origins(now),
            flags: s.flags.clone(),
        })
    }

    async fn set_node_flags(&self, node: &NodeId, flags: NodeFlags) -> Result<(), CoordError> {
        let mut s = self.lock();
        if !flags.excludes() {
            s.flags.remove(node);
        } else {
            s.flags.insert(node.clone(), flags);
        }
        Ok(())
    }

    async fn node_flags(&self) -> Result<BTreeMap<NodeId, NodeFlags>, CoordError> {
        Ok(self.lock().flags.clone())
    }

    async fn config(&self) -> Result<ConfigSnapshot, CoordError> {
        Ok(self.lock().config.clone())
    }

    async fn set_config(
        &self,
        writes: &[ConfigWrite],
        updated_by: &str,
    ) -> Result<ConfigSnapshot, CoordError> {
        let snapshot = self.lock().set_config(writes, updated_by, unix_ms())?;
        self.config_rev.send_replace(snapshot.revision);
        Ok(snapshot)
    }

    async fn config_history(
        &self,
        key: &str,
        limit: usize,
    ) -> Result<Vec<ConfigValue>, CoordError> {
        Ok(self
            .lock()
            .history
            .get(key)
            .map(|h| h.iter().rev().take(limit).cloned().collect())
            .unwrap_or_default())
    }

    async fn put_cdn_health(&self, health: &CdnHealth) -> Result<(), CoordError> {
        self.lock()
            .cdn_health
            .insert(health.name.clone(), health.clone());
        Ok(())
    }

    async fn cdn_health(&self) -> Result<Vec<CdnHealth>, CoordError> {
        Ok(self.lock().cdn_health.values().cloned().collect())
    }

    async fn next_config(&self, after_revision: u64) -> Result<ConfigSnapshot, CoordError> {
        let mut rx = self.config_rev.subscribe();
        // Subscribed first, then checked: no change can slip in between.
        rx.wait_for(|rev| *rev > after_revision)
            .await
            .map_err(|_| CoordError::Unavailable("coordinator dropped".into()))?;
        Ok(self.lock().config.clone())
    }
}

#[async_trait]
impl ElectionBackend for LocalCoordinator {
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, CoordError> {
        Ok(self.lock().grant(ttl, Instant::now()))
    }

    async fn refresh_lease(&self, lease: LeaseId) -> Result<(), CoordError> {
        let now = Instant::now();
        let mut s = self.lock();
        let entry = s.live_lease(lease, now)?;
        entry.expires_at = now + entry.ttl;
        Ok(())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), CoordError> {
        self.lock().revoke(lease, Instant::now())
    }

    async fn try_lead(
        &self,
        name: &str,
        candidate: &str,
        lease: LeaseId,
    ) -> Result<String, CoordError> {
        let mut s = self.lock();
        s.live_lease(lease, Instant::now())?;
        let (leader, _) = s
            .elections
            .entry(name.to_owned())
            .or_insert_with(|| (candidate.to_owned(), lease));
        Ok(leader.clone())
    }

    async fn leader(&self, name: &str) -> Result<Option<String>, CoordError> {
        let mut s = self.lock();
        s.prune(Instant::now());
        Ok(s.elections.get(name).map(|(leader, _)| leader.clone()))
    }

    async fn resign(&self, name: &str, candidate: &str) -> Result<(), CoordError> {
        let mut s = self.lock();
        if s.elections.get(name).is_some_and(|(l, _)| l == candidate) {
            s.elections.remove(name);
        }
        Ok(())
    }
}

fn unix_ms() -> u64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    /// The lease is alive strictly before this instant.
    expires_at: Instant,
}

/// The coordinator's data; every method takes the current time.
#[derive(Debug)]
struct State {
    next_lease: i64,
    leases: HashMap<LeaseId, Lease>,
    /// Node info keyed by node id, with the lease it is bound to.
    nodes: BTreeMap<NodeId, (LeaseId, NodeInfo)>,
    /// Room origins, with the lease the claim is bound to.
    origins: BTreeMap<RoomId, (NodeId, LeaseId)>,
    /// Edges relaying rooms, with the edge node's lease.
    edges: BTreeMap<(RoomId, NodeId), LeaseId>,
    /// Operator flags by node (not bound to leases).
    flags: BTreeMap<NodeId, NodeFlags>,
    /// Election leaders by name, with the lease each is bound to.
    elections: BTreeMap<String, (String, LeaseId)>,
    /// Config values now.
    config: ConfigSnapshot,
    /// Past and present values per config key, oldest first.
    history: BTreeMap<String, VecDeque<ConfigValue>>,
    /// CDN health by CDN name.
    cdn_health: BTreeMap<String, CdnHealth>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            next_lease: 1,
            leases: HashMap::new(),
            nodes: BTreeMap::new(),
            origins: BTreeMap::new(),
            edges: BTreeMap::new(),
            flags: BTreeMap::new(),
            elections: BTreeMap::new(),
            config: ConfigSnapshot::default(),
            history: BTreeMap::new(),
            cdn_health: BTreeMap::new(),
        }
    }
}

impl State {
    /// Drops expired leases and everything bound to them.
    fn prune(&mut self, now: Instant) {
        let before = self.leases.len();
        self.leases.retain(|_, lease| now < lease.expires_at);
        if self.leases.len() == before {
            return;
        }
        let leases = &self.leases;
        self.nodes
            .retain(|_, (lease, _)| leases.contains_key(lease));
        self.origins
            .retain(|_, (_, lease)| leases.contains_key(lease));
        self.edges.retain(|_, lease| leases.contains_key(lease));
        self.elections
            .retain(|_, (_, lease)| leases.contains_key(lease));
    }

    fn live_lease(&mut self, lease: LeaseId, now: Instant) -> Result<&mut Lease, CoordError> {
        self.prune(now);
        self.leases
            .get_mut(&lease)
            .ok_or(CoordError::LeaseExpired(lease))
    }

    fn register_node(&mut self, info: NodeInfo, ttl: Duration, now: Instant) -> LeaseId {
        self.prune(now);
        let lease = LeaseId(self.next_lease);
        self.next_lease += 1;
        self.leases.insert(
            lease,
            Lease {
                ttl,
                expires_at: now + ttl,
            },
        );
        // Like a put in etcd: a node that registers again (after a restart)
        // rebinds its key to the new lease; claims made under the old lease
        // stay bound to that one until it expires or is revoked.
        self.nodes.insert(info.id.clone(), (lease, info));
        lease
    }

    fn keep_alive(
        &mut self,
        lease: LeaseId,
        info: NodeInfo,
        now: Instant,
    ) -> Result<(), CoordError> {
        let entry = self.live_lease(lease, now)?;
        entry.expires_at = now + entry.ttl;
        self.nodes.insert(info.id.clone(), (lease, info));
        Ok(())
    }

    fn revoke(&mut self, lease: LeaseId, now: Instant) -> Result<(), CoordError> {
        self.live_lease(lease, now)?;
        self.leases.remove(&lease);
        self.nodes.retain(|_, (l, _)| *l != lease);
        self.origins.retain(|_, (_, l)| *l != lease);
        self.edges.retain(|_, l| *l != lease);
        self.elections.retain(|_, (_, l)| *l != lease);
        Ok(())
    }

    fn grant(&mut self, ttl: Duration, now: Instant) -> LeaseId {
        self.prune(now);
        let lease = LeaseId(self.next_lease);
        self.next_lease += 1;
        self.leases.insert(
            lease,
            Lease {
                ttl,
                expires_at: now + ttl,
            },
        );
        lease
    }

    fn nodes(&mut self, now: Instant) -> Vec<NodeInfo> {
        self.prune(now);
        self.nodes.values().map(|(_, info)| info.clone()).collect()
    }

    fn claim_room(
        &mut self,
        room: &RoomId,
        node: &NodeId,
        lease: LeaseId,
        now: Instant,
    ) -> Result<NodeId, CoordError> {
        self.live_lease(lease, now)?;
        let (origin, _) = self
            .origins
            .entry(room.clone())
            .or_insert_with(|| (node.clone(), lease));
        Ok(origin.clone())
    }

    fn release_room(&mut self, room: &RoomId, node: &NodeId, now: Instant) {
        self.prune(now);
        if self
            .origins
            .get(room)
            .is_some_and(|(holder, _)| holder == node)
        {
            self.origins.remove(room);
        }
    }

    /// All of `writes` if every key is at its expected version, else none.
    fn set_config(
        &mut self,
        writes: &[ConfigWrite],
        updated_by: &str,
        now_ms: u64,
    ) -> Result<ConfigSnapshot, CoordError> {
        for w in writes {
            let current = self.config.values.get(&w.key).map_or(0, |v| v.version);
            if current != w.expected_version {
                return Err(CoordError::Conflict(format!(
                    "config key {} is at version {current}, not {}",
                    w.key, w.expected_version
                )));
            }
        }
        if writes.is_empty() {
            return Ok(self.config.clone());
        }
        self.config.revision += 1;
        for w in writes {
            let value = ConfigValue {
                value: w.value.clone(),
                version: w.expected_version + 1,
                updated_ms: now_ms,
                updated_by: updated_by.to_owned(),
            };
            let history = self.history.entry(w.key.clone()).or_default();
            history.push_back(value.clone());
            while history.len() as u64 > CONFIG_HISTORY_KEPT {
                history.pop_front();
            }
            self.config.values.insert(w.key.clone(), value);
        }
        Ok(self.config.clone())
    }

    fn room_origins(&mut self, now: Instant) -> Vec<(RoomId, NodeId)> {
        self.prune(now);
        self.origins
            .iter()
            .map(|(room, (node, _))| (room.clone(), node.clone()))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use weir_protocol::coordinator::NodeLoad;

    const TTL: Duration = Duration::from_secs(5);

    fn node(id: &str) -> NodeInfo {
        NodeInfo {
            id: NodeId::parse(id).unwrap(),
            region: "local".into(),
            zone: "a".into(),
            http_url: format!("http://{id}:8080"),
            relay_addr: None,
            version: "test".into(),
            capacity: 100,
            draining: false,
            load: NodeLoad::default(),
        }
    }

    fn room(id: &str) -> RoomId {
        RoomId::parse(id).unwrap()
    }

    fn ids(nodes: &[NodeInfo]) -> Vec<&str> {
        nodes.iter().map(|n| n.id.as_str()).collect()
    }

    #[test]
    fn leases_expire_with_their_nodes_and_claims() {
        let t0 = Instant::now();
        let mut s = State::default();
        let a = s.register_node(node("a"), TTL, t0);
        let b = s.register_node(node("b"), TTL * 2, t0);
        assert_ne!(a, b);
        assert_eq!(
            s.claim_room(&room("r"), &node("a").id, a, t0).unwrap(),
            node("a").id
        );
        assert_eq!(
            ids(&s.nodes(t0 + TTL - Duration::from_millis(1))),
            ["a", "b"]
        );

        // At exactly the TTL the lease is gone, and with it the node and its claim.
        assert_eq!(ids(&s.nodes(t0 + TTL)), ["b"]);
        assert!(s.room_origins(t0 + TTL).is_empty());
        assert_eq!(
            s.keep_alive(a, node("a"), t0 + TTL),
            Err(CoordError::LeaseExpired(a))
        );
        assert_eq!(
            s.claim_room(&room("r"), &node("a").id, a, t0 + TTL),
            Err(CoordError::LeaseExpired(a))
        );
        // The freed room can be claimed by a live node.
        let b_id = node("b").id;
        assert_eq!(s.claim_room(&room("r"), &b_id, b, t0 + TTL).unwrap(), b_id);
    }

    #[test]
    fn keep_alive_extends_the_lease_and_replaces_the_info() {
        let t0 = Instant::now();
        let mut s = State::default();
        let a = s.register_node(node("a"), TTL, t0);
        let mut info = node("a");
        info.draining = true;
        info.load.sessions = 7;
        s.keep_alive(a, info.clone(), t0 + Duration::from_secs(4))
            .unwrap();
        // Alive past the first TTL because the keep-alive restarted it.
        assert_eq!(s.nodes(t0 + Duration::from_secs(8)), vec![info]);
        assert!(s.nodes(t0 + Duration::from_secs(9)).is_empty());
    }

    #[test]
    fn claim_is_compare_and_set() {
        let t0 = Instant::now();
        let mut s = State::default();
        let a = s.register_node(node("a"), TTL, t0);
        let b = s.register_node(node("b"), TTL, t0);
        let (na, nb) = (node("a").id, node("b").id);
        assert_eq!(s.claim_room(&room("r"), &na, a, t0).unwrap(), na);
        // b loses the race and learns who the origin is.
        assert_eq!(s.claim_room(&room("r"), &nb, b, t0).unwrap(), na);
        // Claiming again is idempotent for the holder.
        assert_eq!(s.claim_room(&room("r"), &na, a, t0).unwrap(), na);
        assert_eq!(s.claim_room(&room("q"), &nb, b, t0).unwrap(), nb);
        assert_eq!(
            s.room_origins(t0),
            vec![(room("q"), nb.clone()), (room("r"), na.clone())]
        );
    }

    #[test]
    fn only_the_holder_releases_a_room() {
        let t0 = Instant::now();
        let mut s = State::default();
        let a = s.register_node(node("a"), TTL, t0);
        let (na, nb) = (node("a").id, node("b").id);
        s.claim_room(&room("r"), &na, a, t0).unwrap();
        s.release_room(&room("r"), &nb, t0);
        assert_eq!(s.room_origins(t0), vec![(room("r"), na.clone())]);
        s.release_room(&room("r"), &na, t0);
        assert!(s.room_origins(t0).is_empty());
        // Releasing a room nobody holds is harmless.
        s.release_room(&room("r"), &na, t0);
    }

    #[test]
    fn revoke_removes_everything_bound_to_the_lease() {
        let t0 = Instant::now();
        let mut s = State::default();
        let a = s.register_node(node("a"), TTL, t0);
        let b = s.register_node(node("b"), TTL, t0);
        let (na, nb) = (node("a").id, node("b").id);
        s.claim_room(&room("r1"), &na, a, t0).unwrap();
        s.claim_room(&room("r2"), &na, a, t0).unwrap();
        s.claim_room(&room("r3"), &nb, b, t0).unwrap();
        s.revoke(a, t0).unwrap();
        assert_eq!(ids(&s.nodes(t0)), ["b"]);
        assert_eq!(s.room_origins(t0), vec![(room("r3"), nb)]);
        assert_eq!(s.revoke(a, t0), Err(CoordError::LeaseExpired(a)));
        assert_eq!(
            s.keep_alive(a, node("a"), t0),
            Err(CoordError::LeaseExpired(a))
        );
    }

    #[test]
    fn re_registering_rebinds_the_node_key() {
        let t0 = Instant::now();
        let mut s = State::default();
        let old = s.register_node(node("a"), TTL, t0);
        let new = s.register_node(node("a"), TTL * 3, t0 + Duration::from_secs(1));
        // The old lease expiring no longer removes the node...
        assert_eq!(ids(&s.nodes(t0 + TTL)), ["a"]);
        assert_eq!(
            s.keep_alive(old, node("a"), t0 + TTL),
            Err(CoordError::LeaseExpired(old))
        );
        // ...revoking the new one does.
        s.revoke(new, t0 + TTL).unwrap();
        assert!(s.nodes(t0 + TTL).is_empty());
    }

    #[tokio::test]
    async fn the_trait_works_on_the_real_clock() {
        let c = LocalCoordinator::new();
        let lease = c
            .register_node(node("a"), Duration::from_millis(40))
            .await
            .unwrap();
        let na = node("a").id;
        assert_eq!(c.claim_room(&room("r"), &na, lease).await.unwrap(), na);
        assert_eq!(c.nodes().await.unwrap().len(), 1);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(c.nodes().await.unwrap().is_empty());
        assert!(c.room_origins().await.unwrap().is_empty());
        assert_eq!(
            c.keep_alive(lease, node("a")).await,
            Err(CoordError::LeaseExpired(lease))
        );

        let lease = c.register_node(node("b"), TTL).await.unwrap();
        c.revoke(lease).await.unwrap();
        assert!(c.nodes().await.unwrap().is_empty());
    }
}
