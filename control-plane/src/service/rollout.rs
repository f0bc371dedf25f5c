//! The Rollout API: the weights per node version, kept as the config key
//! `rollout.weights` (validated, versioned, watched by every replica, so a
//! change applies without a restart), and the versions the nodes run.

use std::collections::BTreeMap;

use super::{ApiError, ConfigUpdate, ControlState, RequestId, observe, unix_ms, with_timeout};
use crate::config_center::ROLLOUT_WEIGHTS;
use crate::rollout::RolloutWeights;
use crate::scheduler::Snapshot;

/// One version as the API shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VersionView {
    /// The version label.
    pub version: String,
    /// Its weight (0 when not named, or when no weights are set).
    pub weight: u32,
    /// Alive nodes running it.
    pub nodes: u32,
    /// Of those, the ones taking new sessions.
    pub schedulable_nodes: u32,
    /// Share of new assignments it gets now, 0 to 1.
    pub share: f64,
}

/// The weights in force with what they mean for the cluster now.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RolloutView {
    /// Sorted by version; empty: no weights.
    pub weights: Vec<(String, u32)>,
    /// Version of the config key (0: never set).
    pub version: u64,
    /// When it was set, Unix ms (0: never).
    pub updated_ms: u64,
    /// Who set it.
    pub updated_by: String,
    /// Every version named by the weights or run by an alive node, sorted.
    pub versions: Vec<VersionView>,
}

impl ControlState {
    /// The weights in force and the versions the cluster runs.
    pub async fn get_rollout(&self, rid: &RequestId) -> Result<RolloutView, ApiError> {
        observe("GetRollout", rid, self.rollout_view()).await
    }

    /// Checks and writes the weights (`[]` clears them); `expected_version`
    /// makes it a compare-and-set on the config key.
    pub async fn set_rollout(
        &self,
        rid: &RequestId,
        weights: Vec<(String, u32)>,
        updated_by: &str,
        expected_version: Option<u64>,
    ) -> Result<RolloutView, ApiError> {
        observe("SetRollout", rid, async {
            let weights =
                RolloutWeights::new(weights).map_err(|e| ApiError::invalid("weights", e))?;
            self.write_config(
                vec![ConfigUpdate {
                    key: ROLLOUT_WEIGHTS.to_owned(),
                    value: weights.to_string(),
                    expected_version,
                }],
                updated_by,
            )
            .await?;
            tracing::info!(weights = %weights, updated_by, "rollout weights set");
            // Assignments made from here on use the new weights.
            self.forget_view();
            self.rollout_view().await
        })
        .await
    }

    async fn rollout_view(&self) -> Result<RolloutView, ApiError> {
        let config = with_timeout(self.coordinator.config()).await?;
        let stored = config.values.get(ROLLOUT_WEIGHTS);
        // What the stored value says (the live config of this process may
        // trail the coordinator by a watch round trip).
        let weights = stored
            .map(|v| RolloutWeights::parse(&v.value).unwrap_or_default())
            .unwrap_or_default();
        let cluster = with_timeout(self.coordinator.cluster()).await?;
        let live = self.live.get();
        let snapshot = Snapshot {
            flags: &cluster.flags,
            report_max_age_ms: live.report_max_age_ms,
            max_load_permille: live.max_load_permille,
            ..Snapshot::new(&cluster.nodes, &cluster.origins, unix_ms())
        };
        let mut versions: BTreeMap<String, VersionView> = BTreeMap::new();
        let blank = |version: &str| VersionView {
            version: version.to_owned(),
            weight: weights.weight(version).unwrap_or(0),
            nodes: 0,
            schedulable_nodes: 0,
            share: 0.0,
        };
        for (version, _) in weights.iter() {
            versions.insert(version.to_owned(), blank(version));
        }
        for node in &cluster.nodes {
            let v = versions
                .entry(node.version.clone())
                .or_insert_with(|| blank(&node.version));
            v.nodes += 1;
            if snapshot.is_healthy(node) {
                v.schedulable_nodes += 1;
            }
        }
        // The wheel covers the versions with a schedulable node; with no
        // weights (or none of them there) every such node is alike.
        let with_nodes = || versions.values().filter(|v| v.schedulable_nodes > 0);
        let total_weight: u64 = with_nodes().map(|v| u64::from(v.weight)).sum();
        let total_nodes: u64 = with_nodes().map(|v| u64::from(v.schedulable_nodes)).sum();
        let shares: Vec<(String, f64)> = with_nodes()
            .map(|v| {
                let share = if total_weight > 0 {
                    f64::from(v.weight) / total_weight as f64
                } else {
                    f64::from(v.schedulable_nodes) / total_nodes as f64
                };
                (v.version.clone(), share)
            })
            .collect();
        for (version, share) in shares {
            if let Some(v) = versions.get_mut(&version) {
                v.share = share;
            }
        }
        Ok(RolloutView {
            weights: weights.iter().map(|(v, w)| (v.to_owned(), w)).collect(),
            version: stored.map_or(0, |v| v.version),
            updated_ms: stored.map_or(0, |v| v.updated_ms),
            updated_by: stored.map(|v| v.updated_by.clone()).unwrap_or_default(),
            versions: versions.into_values().collect(),
        })
    }
}
