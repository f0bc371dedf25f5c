//! The config center's API: read every key (stored value or default, with
//! its schema), write validated changes all at once, read a key's history.

use std::collections::BTreeSet;

use weir_protocol::coordinator::{ConfigSnapshot, ConfigValue, ConfigWrite, CoordError};

use super::{ApiError, ControlState, RequestId, observe, validate_subject, with_timeout};
use crate::config_center::{self, ConfigValueError};

/// How often a change is tried again when another writer got in between.
const SET_ATTEMPTS: usize = 5;
/// History entries returned when none is asked for.
const DEFAULT_HISTORY: u32 = 20;
/// Most history entries returned.
const MAX_HISTORY: u32 = 100;

/// One key as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigEntryView {
    /// The key.
    pub key: String,
    /// The value in force: stored, or the default when never set.
    pub value: String,
    /// 0 when never set.
    pub version: u64,
    /// When it was set, Unix ms (0 when never set).
    pub updated_ms: u64,
    /// Who set it.
    pub updated_by: String,
    /// The schema's default.
    pub default_value: String,
    /// The schema's description (empty for a key this control plane does not know).
    pub description: String,
}

/// One change asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigUpdate {
    /// The key.
    pub key: String,
    /// The new value.
    pub value: String,
    /// Apply only if the key is at this version now.
    pub expected_version: Option<u64>,
}

fn view(key: &str, stored: Option<&ConfigValue>) -> ConfigEntryView {
    let spec = config_center::spec(key);
    let default_value = spec.map(|s| s.default.to_owned()).unwrap_or_default();
    ConfigEntryView {
        key: key.to_owned(),
        value: stored.map_or_else(|| default_value.clone(), |v| v.value.clone()),
        version: stored.map_or(0, |v| v.version),
        updated_ms: stored.map_or(0, |v| v.updated_ms),
        updated_by: stored.map(|v| v.updated_by.clone()).unwrap_or_default(),
        default_value,
        description: spec.map(|s| s.description.to_owned()).unwrap_or_default(),
    }
}

/// Every schema key and every stored key, sorted, or only `keys`.
fn views(snapshot: &ConfigSnapshot, keys: &BTreeSet<String>) -> Vec<ConfigEntryView> {
    let mut all: BTreeSet<&str> = config_center::all_keys().iter().map(|s| s.key).collect();
    all.extend(snapshot.values.keys().map(String::as_str));
    all.into_iter()
        .filter(|k| keys.is_empty() || keys.contains(*k))
        .map(|k| view(k, snapshot.values.get(k)))
        .collect()
}

fn check_known(key: &str) -> Result<(), ApiError> {
    if config_center::spec(key).is_some() {
        return Ok(());
    }
    Err(ApiError::Config(ConfigValueError::UnknownKey {
        key: key.to_owned(),
        known: config_center::all_keys()
            .iter()
            .map(|s| s.key)
            .collect::<Vec<_>>()
            .join(", "),
    }))
}

impl ControlState {
    /// Every key (or only `keys`) with its value in force, and the revision.
    pub async fn get_config(
        &self,
        rid: &RequestId,
        keys: &[String],
    ) -> Result<(Vec<ConfigEntryView>, u64), ApiError> {
        observe("GetConfig", rid, async {
            for k in keys {
                check_known(k)?;
            }
            let snapshot = with_timeout(self.coordinator.config()).await?;
            let keys = keys.iter().cloned().collect();
            Ok((views(&snapshot, &keys), snapshot.revision))
        })
        .await
    }

    /// Validates every change, then writes them all at once (or none) and
    /// applies them in this process at once; other processes apply them
    /// through their watch.
    pub async fn set_config(
        &self,
        rid: &RequestId,
        changes: Vec<ConfigUpdate>,
        updated_by: &str,
    ) -> Result<(Vec<ConfigEntryView>, u64), ApiError> {
        observe("SetConfig", rid, self.write_config(changes, updated_by)).await
    }

    /// [`ControlState::set_config`] without its own span and count (for
    /// calls that write config as part of their work).
    pub(super) async fn write_config(
        &self,
        changes: Vec<ConfigUpdate>,
        updated_by: &str,
    ) -> Result<(Vec<ConfigEntryView>, u64), ApiError> {
        if changes.is_empty() {
            return Err(ApiError::invalid("changes", "no change given"));
        }
        validate_subject(updated_by).map_err(|_| {
            ApiError::invalid(
                "updated_by",
                "must be at most 128 characters without control characters",
            )
        })?;
        let updated_by = if updated_by.is_empty() {
            "unknown"
        } else {
            updated_by
        };
        let mut seen = BTreeSet::new();
        let mut checked = Vec::with_capacity(changes.len());
        for change in changes {
            if !seen.insert(change.key.clone()) {
                return Err(ApiError::invalid(
                    "changes",
                    format!("key {} is given twice", change.key),
                ));
            }
            let value = config_center::validate(&change.key, &change.value)?;
            checked.push((change.key, value, change.expected_version));
        }
        let mut last = None;
        for _ in 0..SET_ATTEMPTS {
            let current = with_timeout(self.coordinator.config()).await?;
            let mut writes = Vec::with_capacity(checked.len());
            for (key, value, expected) in &checked {
                let version = current.values.get(key).map_or(0, |v| v.version);
                if let Some(expected) = expected
                    && *expected != version
                {
                    return Err(ApiError::Coordinator(CoordError::Conflict(format!(
                        "{key} is at version {version}, not {expected}"
                    ))));
                }
                writes.push(ConfigWrite {
                    key: key.clone(),
                    value: value.clone(),
                    expected_version: version,
                });
            }
            match with_timeout(self.coordinator.set_config(&writes, updated_by)).await {
                Ok(snapshot) => {
                    self.live.apply(&snapshot);
                    tracing::info!(
                        revision = snapshot.revision,
                        updated_by,
                        keys = ?checked.iter().map(|c| &c.0).collect::<Vec<_>>(),
                        "config set"
                    );
                    return Ok((views(&snapshot, &BTreeSet::new()), snapshot.revision));
                }
                // Another writer between our read and our write: read
                // again and validate against the new state.
                Err(CoordError::Conflict(e)) => last = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Coordinator(CoordError::Conflict(format!(
            "config kept changing under this write ({}); retry",
            last.unwrap_or_default()
        ))))
    }

    /// Past values of `key`, newest first.
    pub async fn config_history(
        &self,
        rid: &RequestId,
        key: &str,
        limit: u32,
    ) -> Result<Vec<ConfigEntryView>, ApiError> {
        observe("ConfigHistory", rid, async {
            check_known(key)?;
            let limit = match limit {
                0 => DEFAULT_HISTORY,
                n if n > MAX_HISTORY => {
                    return Err(ApiError::invalid(
                        "limit",
                        format!("{n} is more than the most allowed, {MAX_HISTORY}"),
                    ));
                }
                n => n,
            };
            let history =
                with_timeout(self.coordinator.config_history(key, limit as usize)).await?;
            Ok(history.iter().map(|v| view(key, Some(v))).collect())
        })
        .await
    }
}
