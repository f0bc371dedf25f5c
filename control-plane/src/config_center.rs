//! The config center's schema and its live application: the keys the control
//! plane knows (each with a default, a description and a parser), the typed
//! [`LiveConfig`] built from the coordinator's stored values, and the task
//! that watches the coordinator and swaps the live config in without a
//! restart.
//!
//! A value is validated twice: by `SetConfig` before anything is written
//! (a bad value is refused with the key named, and a change of several keys
//! is written all at once or not at all), and by every process when it
//! applies what it watched (a value that got into etcd some other way and
//! does not parse is ignored for its key, with a warning, and the key keeps
//! its default: the process never applies half a value).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use weir_protocol::coordinator::{ConfigSnapshot, Coordinator};

use crate::cdn::{self, CdnConfig};
use crate::rollout::RolloutWeights;

/// One key of the schema.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    /// The key, `area.name`.
    pub key: &'static str,
    /// The value when none is stored.
    pub default: &'static str,
    /// What it does and which values it takes.
    pub description: &'static str,
}

/// The CDNs viewers may play HLS through, with their weights and probes.
pub const CDN_ENDPOINTS: &str = "cdn.endpoints";
/// Share of new assignments per node version.
pub const ROLLOUT_WEIGHTS: &str = "rollout.weights";
/// Most sessions a node is given, as a share of its capacity.
pub const MAX_LOAD_RATIO: &str = "scheduler.max_load_ratio";
/// Load reports older than this mark a node unhealthy.
pub const REPORT_MAX_AGE_MS: &str = "scheduler.report_max_age_ms";
/// Lifetime of tokens minted without an explicit one.
pub const TOKEN_DEFAULT_TTL_S: &str = "tokens.default_ttl_s";

/// Every key the control plane knows, sorted.
pub const SCHEMA: &[KeySpec] = &[
    KeySpec {
        key: CDN_ENDPOINTS,
        default: "[]",
        description: "CDNs for HLS, a JSON list of {\"name\": [a-z0-9-]{1,32}, \"url\": http(s) URL template with {room}, e.g. https://cdn-a.example/hls/{room}/master.m3u8, \"weight\": 1 to 1000 (default 1), \"probe\": http:// URL the prober GETs every second}; at most 16",
    },
    KeySpec {
        key: ROLLOUT_WEIGHTS,
        default: "",
        description: "share of new viewers and publishers per node version, VERSION=WEIGHT,… (e.g. v1=90,v2=10; blue=100,green=0); weights 0 to 1000000, at least one above 0; versions not named get 0; empty: no weights, every version alike",
    },
    KeySpec {
        key: MAX_LOAD_RATIO,
        default: "1",
        description: "share of a node's capacity the scheduler fills before it stops sending new sessions there: a decimal from 0.05 to 1 (at most 3 decimals)",
    },
    KeySpec {
        key: REPORT_MAX_AGE_MS,
        default: "3000",
        description: "a node whose last load report is older than this many milliseconds gets no new sessions: 500 to 60000",
    },
    KeySpec {
        key: TOKEN_DEFAULT_TTL_S,
        default: "3600",
        description: "lifetime in seconds of the tokens handed out with assignments (and minted without a ttl): 60 to 604800",
    },
];

/// The spec of `key`, if the schema knows it (the control plane's own keys,
/// or the nodes' `chat.*` keys whose schema lives in `weir_protocol::chat`).
pub fn spec(key: &str) -> Option<KeySpec> {
    all_keys().into_iter().find(|s| s.key == key)
}

/// Every key of the config center, sorted: [`SCHEMA`] and the `chat.*` keys
/// the nodes apply.
pub fn all_keys() -> Vec<KeySpec> {
    let mut all: Vec<KeySpec> = SCHEMA.to_vec();
    all.extend(weir_protocol::chat::KEYS.iter().map(|k| KeySpec {
        key: k.key,
        default: k.default,
        description: k.description,
    }));
    all.sort_by_key(|s| s.key);
    all
}

fn known_keys() -> String {
    all_keys()
        .iter()
        .map(|s| s.key)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigValueError {
    /// The key is not in the schema.
    #[error("unknown config key {key:?}; known keys: {known}")]
    UnknownKey {
        /// The key as given.
        key: String,
        /// The known keys, comma-separated.
        known: String,
    },
    /// The value does not parse or is out of range.
    #[error("{key}: {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// The settings the control plane applies while running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveConfig {
    /// `cdn.endpoints`.
    pub cdns: Arc<Vec<CdnConfig>>,
    /// `rollout.weights`.
    pub rollout: Arc<RolloutWeights>,
    /// `scheduler.max_load_ratio`, in thousandths (1000 = the full capacity).
    pub max_load_permille: u32,
    /// `scheduler.report_max_age_ms`.
    pub report_max_age_ms: u64,
    /// `tokens.default_ttl_s`.
    pub token_default_ttl: Duration,
    /// The coordinator's config revision this was built from (0: defaults only).
    pub revision: u64,
}

impl Default for LiveConfig {
    fn default() -> Self {
        Self {
            cdns: Arc::default(),
            rollout: Arc::default(),
            max_load_permille: 1000,
            report_max_age_ms: 3000,
            token_default_ttl: Duration::from_secs(3600),
            revision: 0,
        }
    }
}

fn bad(key: &str, reason: impl Into<String>) -> ConfigValueError {
    ConfigValueError::BadValue {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn parse_u64_in(key: &str, value: &str, min: u64, max: u64) -> Result<u64, ConfigValueError> {
    let n: u64 = value
        .parse()
        .map_err(|_| bad(key, format!("{value:?} is not a whole number")))?;
    if !(min..=max).contains(&n) {
        return Err(bad(key, format!("{n} is outside {min}..={max}")));
    }
    Ok(n)
}

/// `0.8`, `1`, `0.125` → thousandths; at most 3 decimals, from 0.05 to 1.
fn parse_ratio_permille(key: &str, value: &str) -> Result<u32, ConfigValueError> {
    let not_decimal = || bad(key, format!("{value:?} is not a decimal like 0.8"));
    let (whole, frac) = value.split_once('.').unwrap_or((value, ""));
    if whole.is_empty() || frac.len() > 3 {
        return Err(not_decimal());
    }
    if !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(not_decimal());
    }
    if value.ends_with('.') {
        return Err(not_decimal());
    }
    let whole: u32 = whole.parse().map_err(|_| not_decimal())?;
    let frac_padded = format!("{frac:0<3}");
    let frac: u32 = frac_padded.parse().map_err(|_| not_decimal())?;
    let permille = whole.saturating_mul(1000).saturating_add(frac);
    if !(50..=1000).contains(&permille) {
        return Err(bad(key, format!("{value} is outside 0.05..=1")));
    }
    Ok(permille)
}

/// Checks `value` for `key`; returns it in its canonical form (what is stored).
pub fn validate(key: &str, value: &str) -> Result<String, ConfigValueError> {
    let value = value.trim();
    match key {
        CDN_ENDPOINTS => {
            let cdns = cdn::parse_cdns(value).map_err(|reason| bad(key, reason))?;
            Ok(cdn::format_cdns(&cdns))
        }
        ROLLOUT_WEIGHTS => Ok(RolloutWeights::parse(value)
            .map_err(|e| bad(key, e.to_string()))?
            .to_string()),
        MAX_LOAD_RATIO => {
            let p = parse_ratio_permille(key, value)?;
            Ok(format_permille(p))
        }
        REPORT_MAX_AGE_MS => Ok(parse_u64_in(key, value, 500, 60_000)?.to_string()),
        TOKEN_DEFAULT_TTL_S => Ok(parse_u64_in(key, value, 60, 604_800)?.to_string()),
        chat if weir_protocol::chat::is_chat_key(chat) => {
            weir_protocol::chat::validate(chat, value).map_err(|reason| bad(key, reason))
        }
        _ => Err(ConfigValueError::UnknownKey {
            key: key.to_owned(),
            known: known_keys(),
        }),
    }
}

fn format_permille(p: u32) -> String {
    if p.is_multiple_of(1000) {
        return (p / 1000).to_string();
    }
    let s = format!("{}.{:03}", p / 1000, p % 1000);
    s.trim_end_matches('0').to_owned()
}

impl LiveConfig {
    /// The typed config from stored values: each key parsed on its own; a key
    /// with no value or a value that does not parse keeps its default (the
    /// latter reported in the returned warnings).
    pub fn from_values(values: &BTreeMap<String, String>, revision: u64) -> (Self, Vec<String>) {
        let mut live = Self {
            revision,
            ..Self::default()
        };
        let mut warnings = Vec::new();
        for (key, value) in values {
            let applied = match key.as_str() {
                CDN_ENDPOINTS => cdn::parse_cdns(value)
                    .map(|c| live.cdns = Arc::new(c))
                    .map_err(|reason| bad(key, reason)),
                ROLLOUT_WEIGHTS => RolloutWeights::parse(value)
                    .map(|w| live.rollout = Arc::new(w))
                    .map_err(|e| bad(key, e.to_string())),
                MAX_LOAD_RATIO => {
                    parse_ratio_permille(key, value).map(|p| live.max_load_permille = p)
                }
                REPORT_MAX_AGE_MS => {
                    parse_u64_in(key, value, 500, 60_000).map(|v| live.report_max_age_ms = v)
                }
                TOKEN_DEFAULT_TTL_S => parse_u64_in(key, value, 60, 604_800)
                    .map(|v| live.token_default_ttl = Duration::from_secs(v)),
                // A key a newer control plane knows: not ours to judge.
                _ => Ok(()),
            };
            if let Err(e) = applied {
                warnings.push(e.to_string());
            }
        }
        (live, warnings)
    }

    /// [`LiveConfig::from_values`] of a coordinator snapshot.
    pub fn from_snapshot(snapshot: &ConfigSnapshot) -> (Self, Vec<String>) {
        let values = snapshot
            .values
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect();
        Self::from_values(&values, snapshot.revision)
    }
}

/// The live config of a process, swapped whole when the watch sees a change.
#[derive(Debug, Default)]
pub struct LiveConfigCell {
    current: RwLock<LiveConfig>,
}

impl LiveConfigCell {
    /// The config now.
    pub fn get(&self) -> LiveConfig {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Applies a snapshot (if newer than what is applied); returns whether it changed anything.
    pub fn apply(&self, snapshot: &ConfigSnapshot) -> bool {
        let (live, warnings) = LiveConfig::from_snapshot(snapshot);
        for w in &warnings {
            tracing::warn!(revision = snapshot.revision, problem = %w, "stored config value ignored; the key keeps its default");
        }
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if live.revision < current.revision || live == *current {
            return false;
        }
        metrics::gauge!("weir_config_revision").set(live.revision as f64);
        tracing::info!(
            revision = live.revision,
            applied_unix_ms = crate::store::unix_ms(),
            max_load_permille = live.max_load_permille,
            report_max_age_ms = live.report_max_age_ms,
            token_default_ttl_s = live.token_default_ttl.as_secs(),
            rollout = %live.rollout,
            cdns = live.cdns.len(),
            "config applied"
        );
        *current = live;
        true
    }
}

/// How long one wait for a config change lasts before it is started again
/// (a backstop: the coordinator's watch wakes it on every change).
const WAIT: Duration = Duration::from_secs(30);

/// Watches the coordinator's config and applies every change to `cell`,
/// forever (spawn it; it ends when the runtime does).
pub async fn watch(coordinator: Arc<dyn Coordinator>, cell: Arc<LiveConfigCell>) {
    let mut revision = 0u64;
    let mut failures = 0u32;
    // The first read, then waits for changes; after a failure, a fresh read.
    let mut need_read = true;
    loop {
        let next = if need_read {
            tokio::time::timeout(WAIT, coordinator.config()).await
        } else {
            tokio::time::timeout(WAIT, coordinator.next_config(revision)).await
        };
        match next {
            Ok(Ok(snapshot)) => {
                failures = 0;
                need_read = false;
                revision = revision.max(snapshot.revision);
                cell.apply(&snapshot);
            }
            // No change within the wait: wait again.
            Err(_) => need_read = false,
            Ok(Err(e)) => {
                failures += 1;
                need_read = true;
                if failures == 1 || failures.is_multiple_of(60) {
                    tracing::warn!(error = %e, "cannot read the config; keeping the one applied");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn schema_is_sorted_and_defaults_are_valid() {
        let keys: Vec<&str> = SCHEMA.iter().map(|s| s.key).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        for s in all_keys() {
            assert_eq!(validate(s.key, s.default).unwrap(), s.default, "{}", s.key);
        }
        let values = SCHEMA
            .iter()
            .map(|s| (s.key.to_owned(), s.default.to_owned()))
            .collect();
        assert_eq!(
            LiveConfig::from_values(&values, 0),
            (LiveConfig::default(), vec![])
        );
    }

    #[test]
    fn ratios_are_decimals_in_range() {
        for (input, canonical) in [
            ("1", "1"),
            ("0.8", "0.8"),
            ("0.125", "0.125"),
            (" 0.50 ", "0.5"),
            ("1.000", "1"),
            ("0.05", "0.05"),
        ] {
            assert_eq!(
                validate(MAX_LOAD_RATIO, input).unwrap(),
                canonical,
                "{input}"
            );
        }
        for bad in [
            "", "1.5", "0.04", "0", "-0.5", ".5", "1.", "0.1234", "abc", "1e-1", "NaN",
        ] {
            let err = validate(MAX_LOAD_RATIO, bad).unwrap_err();
            assert!(
                err.to_string().starts_with("scheduler.max_load_ratio:"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn numbers_are_bounded_and_unknown_keys_named() {
        assert_eq!(validate(REPORT_MAX_AGE_MS, "500").unwrap(), "500");
        assert!(validate(REPORT_MAX_AGE_MS, "499").is_err());
        assert!(validate(REPORT_MAX_AGE_MS, "-1").is_err());
        assert!(validate(TOKEN_DEFAULT_TTL_S, "604801").is_err());
        let err = validate("scheduler.nope", "1").unwrap_err();
        assert!(matches!(err, ConfigValueError::UnknownKey { .. }));
        assert!(err.to_string().contains(MAX_LOAD_RATIO), "{err}");
    }

    #[test]
    fn a_bad_stored_value_keeps_the_default_for_its_key_only() {
        let values: BTreeMap<String, String> = [
            (MAX_LOAD_RATIO.to_owned(), "2".to_owned()),
            (REPORT_MAX_AGE_MS.to_owned(), "1500".to_owned()),
            ("future.key".to_owned(), "x".to_owned()),
        ]
        .into();
        let (live, warnings) = LiveConfig::from_values(&values, 7);
        assert_eq!(live.max_load_permille, 1000);
        assert_eq!(live.report_max_age_ms, 1500);
        assert_eq!(live.revision, 7);
        assert_eq!(warnings.len(), 1);
    }

    #[test]
    fn the_cell_applies_newer_snapshots_only() {
        use weir_protocol::coordinator::ConfigValue;
        let cell = LiveConfigCell::default();
        let snap = |rev: u64, ttl: &str| ConfigSnapshot {
            revision: rev,
            values: [(
                TOKEN_DEFAULT_TTL_S.to_owned(),
                ConfigValue {
                    value: ttl.to_owned(),
                    version: 1,
                    updated_ms: 1,
                    updated_by: "t".into(),
                },
            )]
            .into(),
        };
        assert!(cell.apply(&snap(5, "120")));
        assert_eq!(cell.get().token_default_ttl, Duration::from_secs(120));
        assert!(!cell.apply(&snap(4, "600")));
        assert!(!cell.apply(&snap(5, "120")));
        assert!(cell.apply(&snap(6, "600")));
        assert_eq!(cell.get().revision, 6);
    }
}
