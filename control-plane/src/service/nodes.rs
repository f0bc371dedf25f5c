//! The Nodes API: every node the coordinator knows (alive, or only flagged
//! by the operator), and the operator's cordon / drain / uncordon flags,
//! which the scheduler reads with every assignment.

use std::collections::BTreeSet;

use weir_protocol::NodeId;
use weir_protocol::coordinator::{NodeFlags, NodeInfo};

use super::{ApiError, ControlState, RequestId, observe, unix_ms, with_timeout};
use crate::scheduler::Snapshot;

/// One node as the API shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NodeView {
    /// The node.
    pub id: NodeId,
    /// Its last report (`None`: not alive, only flagged).
    pub info: Option<NodeInfo>,
    /// Registered under a live lease.
    pub alive: bool,
    /// Alive, fresh, not draining, not flagged: takes new sessions.
    pub schedulable: bool,
    /// The operator's flags.
    pub flags: NodeFlags,
}

/// What an operator does to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeAction {
    Cordon,
    Drain,
    Uncordon,
}

impl ControlState {
    /// Every node that is alive or flagged, sorted by id.
    pub async fn list_nodes(&self, rid: &RequestId) -> Result<Vec<NodeView>, ApiError> {
        observe("ListNodes", rid, async { self.node_views(None).await }).await
    }

    /// No new sessions for the node.
    pub async fn cordon_node(&self, rid: &RequestId, id: &str) -> Result<NodeView, ApiError> {
        observe("CordonNode", rid, self.flag_node(id, NodeAction::Cordon)).await
    }

    /// No new sessions for the node, and its sessions should move.
    pub async fn drain_node(&self, rid: &RequestId, id: &str) -> Result<NodeView, ApiError> {
        observe("DrainNode", rid, self.flag_node(id, NodeAction::Drain)).await
    }

    /// Clears the node's flags.
    pub async fn uncordon_node(&self, rid: &RequestId, id: &str) -> Result<NodeView, ApiError> {
        observe(
            "UncordonNode",
            rid,
            self.flag_node(id, NodeAction::Uncordon),
        )
        .await
    }

    async fn flag_node(&self, id: &str, action: NodeAction) -> Result<NodeView, ApiError> {
        let id = NodeId::parse(id).map_err(|e| ApiError::invalid("id", e))?;
        // A typo must not cordon a node that does not exist: the node must be
        // alive or already flagged.
        let known = self.node_views(Some(&id)).await?;
        let Some(current) = known.into_iter().next() else {
            return Err(ApiError::NotFound {
                what: "node",
                id: id.to_string(),
            });
        };
        let flags = match action {
            NodeAction::Cordon => NodeFlags {
                cordoned: true,
                draining: current.flags.draining,
                updated_ms: unix_ms(),
            },
            NodeAction::Drain => NodeFlags {
                cordoned: true,
                draining: true,
                updated_ms: unix_ms(),
            },
            NodeAction::Uncordon => NodeFlags::default(),
        };
        with_timeout(self.coordinator.set_node_flags(&id, flags)).await?;
        tracing::info!(node = %id, ?action, "node flags set");
        // Assignments made from here on see the flags.
        self.forget_view();
        self.node_views(Some(&id))
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::NotFound {
                what: "node",
                id: id.to_string(),
            })
    }

    async fn node_views(&self, only: Option<&NodeId>) -> Result<Vec<NodeView>, ApiError> {
        let cluster = with_timeout(self.coordinator.cluster()).await?;
        let live = self.live.get();
        let snapshot = Snapshot {
            flags: &cluster.flags,
            report_max_age_ms: live.report_max_age_ms,
            max_load_permille: live.max_load_permille,
            ..Snapshot::new(&cluster.nodes, &cluster.origins, unix_ms())
        };
        let mut ids: BTreeSet<&NodeId> = cluster.nodes.iter().map(|n| &n.id).collect();
        ids.extend(cluster.flags.keys());
        Ok(ids
            .into_iter()
            .filter(|id| only.is_none_or(|o| o == *id))
            .map(|id| {
                let info = cluster.nodes.iter().find(|n| &n.id == id).cloned();
                NodeView {
                    id: id.clone(),
                    alive: info.is_some(),
                    schedulable: info.as_ref().is_some_and(|n| snapshot.is_healthy(n)),
                    flags: cluster.flags.get(id).copied().unwrap_or_default(),
                    info,
                }
            })
            .collect())
    }
}
