//! The coordination contract between nodes and the control plane: node
//! membership under leases with load reports, and room placement (which node
//! is a room's origin). One trait, two implementations chosen at start-up:
//! in-process (the embedded default) and etcd (clusters). The etcd key layout
//! lives here too so every process agrees on it.

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
}

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
}

/// etcd key of a node's info.
pub fn node_key(node: &NodeId) -> String {
    format!("{KEY_PREFIX}nodes/{node}")
}

/// etcd key of a room's origin.
pub fn room_origin_key(room: &RoomId) -> String {
    format!("{KEY_PREFIX}rooms/{room}/origin")
}
