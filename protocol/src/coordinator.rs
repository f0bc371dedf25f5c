//! The coordination contract between nodes and the control plane: node
//! membership under leases with load reports, and room placement (which node
//! is a room's origin). One trait, two implementations chosen at start-up:
//! in-process (the embedded default) and etcd (clusters). The etcd key layout
//! lives here too so every process agrees on it.
//!
//! Beyond membership and placement the trait carries the operator's node
//! flags (cordon, drain) and the config center's stored values with their
//! versions and history. Those methods have default bodies that answer
//! [`CoordError::Unsupported`], so an implementation written for membership
//! alone (a test double) keeps compiling; both real coordinators implement
//! them all.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{NodeId, RoomId};

/// Versioned prefix of every key Weir writes to etcd.
pub const KEY_PREFIX: &str = "/weir/v1/";

/// Default lease time to live of a node: it vanishes this long after its last
/// keep-alive.
pub const NODE_TTL: Duration = Duration::from_secs(5);

/// A lease held by a node; its keys vanish when it expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseId(pub i64);

/// What a node tells the cluster about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    pub region: String,
    pub zone: String,
    /// Base URL of the node's HTTP surface (WHIP, WHEP, HLS, events).
    pub http_url: String,
    /// Where the node's QUIC relay listens (`host:port`), for edges pulling
    /// rooms published here; `None`: the node relays nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_addr: Option<String>,
    pub version: String,
    /// Most subscribers the node should carry.
    pub capacity: u32,
    pub draining: bool,
    pub load: NodeLoad,
}

/// The load a node reports every second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// Unix milliseconds when the report was made.
    pub reported_at_ms: u64,
    pub sessions: u32,
    pub egress_bps: u64,
    pub rooms: Vec<RoomLoad>,
}

/// One room as a node carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomLoad {
    pub room: RoomId,
    /// Whether a publisher is live on this node.
    pub live: bool,
    pub subscribers: u32,
}

/// Why a coordinator call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CoordError {
    #[error("lease {0:?} is unknown or expired")]
    LeaseExpired(LeaseId),
    #[error("coordinator unavailable: {0}")]
    Unavailable(String),
    /// A compare-and-set lost: what was read changed before the write.
    #[error("conflict: {0}")]
    Conflict(String),
    /// This coordinator does not implement the call.
    #[error("this coordinator does not support {0}")]
    Unsupported(&'static str),
}

/// The operator's flags on a node, kept apart from the node's own report
/// (and outliving its lease): the scheduler sends no new sessions to a
/// cordoned or draining node; a draining node's sessions are to move away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFlags {
    /// No new sessions.
    pub cordoned: bool,
    /// No new sessions, and the ones it carries should move.
    pub draining: bool,
    /// Unix milliseconds of the last change.
    pub updated_ms: u64,
}

impl NodeFlags {
    /// Whether the scheduler must leave the node out of new assignments.
    pub fn excludes(&self) -> bool {
        self.cordoned || self.draining
    }
}

/// One stored value of the config center.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigValue {
    /// The value as text, already validated by the writer.
    pub value: String,
    /// 1 for the first write of the key, then one more per change.
    pub version: u64,
    /// Unix milliseconds of the write.
    pub updated_ms: u64,
    /// Who wrote it (free text).
    pub updated_by: String,
}

/// Every stored config value at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigSnapshot {
    /// Grows with every config change and only then (etcd: the highest
    /// modification revision among the config keys); 0 when nothing is set.
    pub revision: u64,
    /// Values by key.
    pub values: BTreeMap<String, ConfigValue>,
}

/// One key to write in [`Coordinator::set_config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWrite {
    /// The key (see [`config_key`]).
    pub key: String,
    /// The new value, validated by the caller.
    pub value: String,
    /// The version the key must have now for the write to apply (0: unset).
    pub expected_version: u64,
}

/// The state of a CDN's circuit breaker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Probes pass: the CDN is offered in its turn.
    #[default]
    Closed,
    /// Probes failed: the CDN goes to the back of every answer until a
    /// probe after the cool-down passes.
    Open,
    /// The cool-down is over and the next probe decides; still at the back.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// What the CDN prober (one elected control-plane replica) last found out
/// about a CDN; every replica ranks CDNs by it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CdnHealth {
    /// The CDN's configured name.
    pub name: String,
    /// Its breaker.
    pub state: BreakerState,
    /// Probes failed in a row (0 after a pass).
    pub consecutive_failures: u32,
    /// Unix milliseconds of the last state change.
    pub changed_ms: u64,
    /// Unix milliseconds of the last probe.
    pub probed_ms: u64,
    /// Why the last failed probe failed (empty after a pass).
    pub last_error: String,
}

/// Most past values kept per config key.
pub const CONFIG_HISTORY_KEPT: u64 = 100;

/// Membership, load and placement, as every process sees them.
#[async_trait]
pub trait Coordinator: Send + Sync + 'static {
    /// Registers a node under a new lease of `ttl`.
    async fn register_node(&self, info: NodeInfo, ttl: Duration) -> Result<LeaseId, CoordError>;

    /// Refreshes the lease and replaces the node's info (load, draining).
    async fn keep_alive(&self, lease: LeaseId, info: NodeInfo) -> Result<(), CoordError>;

    /// Removes the node and everything bound to its lease at once.
    async fn revoke(&self, lease: LeaseId) -> Result<(), CoordError>;

    /// Live nodes.
    async fn nodes(&self) -> Result<Vec<NodeInfo>, CoordError>;

    /// Makes `node` the origin of `room` unless another live node already is;
    /// returns the origin after the call. The claim is bound to the lease.
    async fn claim_room(
        &self,
        room: &RoomId,
        node: &NodeId,
        lease: LeaseId,
    ) -> Result<NodeId, CoordError>;

    /// Gives up the origin of `room` if `node` holds it.
    async fn release_room(&self, room: &RoomId, node: &NodeId) -> Result<(), CoordError>;

    /// Current origins of all rooms.
    async fn room_origins(&self) -> Result<Vec<(RoomId, NodeId)>, CoordError>;

    /// Records that `node` relays `room` from its origin (an edge), bound
    /// to the node's lease: the record vanishes with the node.
    async fn register_edge(
        &self,
        room: &RoomId,
        node: &NodeId,
        lease: LeaseId,
    ) -> Result<(), CoordError> {
        let _ = (room, node, lease);
        Err(CoordError::Unsupported("room edges"))
    }

    /// Removes the record that `node` relays `room`.
    async fn release_edge(&self, room: &RoomId, node: &NodeId) -> Result<(), CoordError> {
        let _ = (room, node);
        Err(CoordError::Unsupported("room edges"))
    }

    /// Every (room, edge node) pair, sorted.
    async fn room_edges(&self) -> Result<Vec<(RoomId, NodeId)>, CoordError> {
        Ok(Vec::new())
    }

    /// Live nodes, room origins and node flags, read together (one round
    /// trip where the backend allows it). The default reads them in turn.
    async fn cluster(&self) -> Result<ClusterState, CoordError> {
        Ok(ClusterState {
            nodes: self.nodes().await?,
            origins: self.room_origins().await?,
            flags: self.node_flags().await?,
        })
    }

    /// What [`Coordinator::cluster`] returns, possibly a few milliseconds
    /// behind the backend: a backend that keeps a watch-fed copy answers
    /// from it without a round trip (the scheduler calls this on every
    /// assignment). A process always sees its own writes through it. The
    /// default reads [`Coordinator::cluster`].
    async fn cluster_view(&self) -> Result<std::sync::Arc<ClusterState>, CoordError> {
        Ok(std::sync::Arc::new(self.cluster().await?))
    }

    /// Sets the operator's flags of `node` (whether or not it is alive now).
    async fn set_node_flags(&self, node: &NodeId, flags: NodeFlags) -> Result<(), CoordError> {
        let _ = (node, flags);
        Err(CoordError::Unsupported("node flags"))
    }

    /// The operator's flags of every node that has any.
    async fn node_flags(&self) -> Result<BTreeMap<NodeId, NodeFlags>, CoordError> {
        Ok(BTreeMap::new())
    }

    /// Every stored config value.
    async fn config(&self) -> Result<ConfigSnapshot, CoordError> {
        Err(CoordError::Unsupported("the config center"))
    }

    /// Writes all of `writes` at once if every key is at its expected
    /// version, else none ([`CoordError::Conflict`]); returns the config
    /// after the write. Each written key's version becomes expected + 1 and
    /// its old value joins the key's history.
    async fn set_config(
        &self,
        writes: &[ConfigWrite],
        updated_by: &str,
    ) -> Result<ConfigSnapshot, CoordError> {
        let _ = (writes, updated_by);
        Err(CoordError::Unsupported("the config center"))
    }

    /// Values `key` had, newest first (the current one included), at most `limit`.
    async fn config_history(
        &self,
        key: &str,
        limit: usize,
    ) -> Result<Vec<ConfigValue>, CoordError> {
        let _ = (key, limit);
        Err(CoordError::Unsupported("the config center"))
    }

    /// Stores what the CDN prober found out about one CDN (replacing what
    /// was stored for that name).
    async fn put_cdn_health(&self, health: &CdnHealth) -> Result<(), CoordError> {
        let _ = health;
        Err(CoordError::Unsupported("CDN health"))
    }

    /// The stored health of every CDN, sorted by name.
    async fn cdn_health(&self) -> Result<Vec<CdnHealth>, CoordError> {
        Ok(Vec::new())
    }

    /// Waits until the config's revision is above `after_revision` and
    /// returns it (at once when it already is). Callers loop on it to watch
    /// the config; they bound each wait with a timeout of their own.
    async fn next_config(&self, after_revision: u64) -> Result<ConfigSnapshot, CoordError> {
        let _ = after_revision;
        Err(CoordError::Unsupported("config watch"))
    }
}

/// What the scheduler reads: live nodes, room origins, operator flags.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    /// Live nodes with their last report, sorted by id.
    pub nodes: Vec<NodeInfo>,
    /// Origin of each placed room, sorted by room.
    pub origins: Vec<(RoomId, NodeId)>,
    /// Operator flags by node.
    pub flags: BTreeMap<NodeId, NodeFlags>,
}

/// etcd key of a node's info.
pub fn node_key(node: &NodeId) -> String {
    format!("{KEY_PREFIX}nodes/{node}")
}

/// etcd key of a room's origin.
pub fn room_origin_key(room: &RoomId) -> String {
    format!("{KEY_PREFIX}rooms/{room}/origin")
}

/// etcd key of an edge that relays `room` from its origin.
pub fn room_edge_key(room: &RoomId, node: &NodeId) -> String {
    format!("{KEY_PREFIX}rooms/{room}/edges/{node}")
}

/// etcd key of a node's operator flags (not bound to any lease).
pub fn node_flags_key(node: &NodeId) -> String {
    format!("{KEY_PREFIX}node-flags/{node}")
}

/// etcd key of a config value.
pub fn config_key(key: &str) -> String {
    format!("{KEY_PREFIX}config/{key}")
}

/// etcd key of one past value of a config key (`version` zero-padded so
/// keys sort by version).
pub fn config_history_key(key: &str, version: u64) -> String {
    format!("{KEY_PREFIX}config-history/{key}/{version:020}")
}

/// etcd key of a CDN's health, as the CDN prober last stored it (bound to
/// no lease: a new prober starts from it).
pub fn cdn_health_key(name: &str) -> String {
    format!("{KEY_PREFIX}cdn-health/{name}")
}

/// etcd key of a singleton worker's election.
pub fn election_key(name: &str) -> String {
    format!("{KEY_PREFIX}election/{name}")
}
