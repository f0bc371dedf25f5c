//! Rollout weights: the share of new assignments each node version gets.
//!
//! Nodes carry a version (`NodeInfo::version`). The operator sets weights
//! per version (`rollout.weights` in the config center, e.g. `v1=90,v2=10`
//! for a canary, `v1=100,v2=0` for blue-green, rolled back by flipping);
//! the scheduler then picks, for each new assignment, a version by weight
//! among the versions that have a node able to take it, and ranks that
//! version's nodes as usual. Versions the weights do not name get weight 0;
//! with no weights set every version is equal (the weights play no part).
//!
//! Which version an assignment gets is decided by a *draw*, a point on a
//! wheel of `u64`: [`stable_draw`] hashes a client id (so one viewer keeps
//! landing on the same version while the weights stay put), [`random_draw`]
//! serves clients without one. The scheduler is a pure function of the
//! draw, so tests over many draws are deterministic.

use std::collections::BTreeMap;
use std::fmt;

/// Longest version label.
pub const MAX_VERSION_LEN: usize = 64;
/// Most versions the weights may name.
pub const MAX_VERSIONS: usize = 32;
/// Largest weight of one version.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// Weight per node version; empty: no weights set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RolloutWeights(BTreeMap<String, u32>);

/// Why weights were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RolloutError {
    /// A version label is empty, too long or has characters outside `[A-Za-z0-9._+-]`.
    #[error("version {0:?} is not a version label (1 to {MAX_VERSION_LEN} of A-Z a-z 0-9 . _ + -)")]
    BadVersion(String),
    /// A weight is not a whole number from 0 to [`MAX_WEIGHT`].
    #[error("weight of {version} must be a whole number from 0 to {MAX_WEIGHT}, got {weight:?}")]
    BadWeight {
        /// The version.
        version: String,
        /// The weight as given.
        weight: String,
    },
    /// A `VERSION=WEIGHT` item does not have that shape.
    #[error("expected VERSION=WEIGHT, got {0:?}")]
    BadItem(String),
    /// A version is named twice.
    #[error("version {0} is given twice")]
    Duplicate(String),
    /// Every weight is 0: no version would get anything.
    #[error("at least one weight must be above 0 (to clear the weights, set none)")]
    AllZero,
    /// Too many versions.
    #[error("at most {MAX_VERSIONS} versions, got {0}")]
    TooMany(usize),
}

/// Whether `v` is a well-formed version label.
pub fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_VERSION_LEN
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
}

impl RolloutWeights {
    /// No weights.
    pub const EMPTY: Self = Self(BTreeMap::new());

    /// Weights from `(version, weight)` pairs, checked: labels well formed,
    /// no version twice, weights at most [`MAX_WEIGHT`], at least one above
    /// 0 (unless there are none: no weights).
    pub fn new(pairs: impl IntoIterator<Item = (String, u32)>) -> Result<Self, RolloutError> {
        let mut map = BTreeMap::new();
        for (version, weight) in pairs {
            if !valid_version(&version) {
                return Err(RolloutError::BadVersion(version));
            }
            if weight > MAX_WEIGHT {
                return Err(RolloutError::BadWeight {
                    version,
                    weight: weight.to_string(),
                });
            }
            if map.contains_key(&version) {
                return Err(RolloutError::Duplicate(version));
            }
            map.insert(version, weight);
        }
        if map.len() > MAX_VERSIONS {
            return Err(RolloutError::TooMany(map.len()));
        }
        if !map.is_empty() && map.values().all(|w| *w == 0) {
            return Err(RolloutError::AllZero);
        }
        Ok(Self(map))
    }

    /// Parses `v1=90,v2=10` (spaces around items allowed); an empty string
    /// is no weights.
    pub fn parse(text: &str) -> Result<Self, RolloutError> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(Self::default());
        }
        let mut pairs = Vec::new();
        for item in text.split(',') {
            let item = item.trim();
            let Some((version, weight)) = item.split_once('=') else {
                return Err(RolloutError::BadItem(item.to_owned()));
            };
            let (version, weight) = (version.trim(), weight.trim());
            let parsed = if weight.bytes().all(|b| b.is_ascii_digit()) {
                weight.parse::<u32>().ok()
            } else {
                None
            };
            match parsed {
                Some(w) => pairs.push((version.to_owned(), w)),
                None => {
                    return Err(RolloutError::BadWeight {
                        version: version.to_owned(),
                        weight: weight.to_owned(),
                    });
                }
            }
        }
        Self::new(pairs)
    }

    /// Whether no weights are set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The weight of `version`: its own, 0 when the weights do not name it,
    /// `None` when no weights are set.
    pub fn weight(&self, version: &str) -> Option<u32> {
        if self.0.is_empty() {
            return None;
        }
        Some(self.0.get(version).copied().unwrap_or(0))
    }

    /// Versions and weights, sorted by version.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u32)> {
        self.0.iter().map(|(v, w)| (v.as_str(), *w))
    }

    /// Of `versions` (each with its weight), the one `draw` lands on: the
    /// wheel is split in proportion to the weights, in the order given.
    /// `None` when every weight is 0.
    pub fn pick<'v>(versions: &[(&'v str, u32)], draw: u64) -> Option<&'v str> {
        let total: u64 = versions.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            return None;
        }
        // The draw scaled onto [0, total): uniform when the draw is.
        let point = ((u128::from(draw) * u128::from(total)) >> 64) as u64;
        let mut upto = 0u64;
        for (version, weight) in versions {
            upto += u64::from(*weight);
            if point < upto {
                return Some(version);
            }
        }
        None
    }
}

impl fmt::Display for RolloutWeights {
    /// The canonical form: `v1=90,v2=10`, sorted by version; empty when none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (v, w)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{v}={w}")?;
        }
        Ok(())
    }
}

/// A draw from a client's id: the same id always gives the same draw.
/// (FNV-1a, then the splitmix64 finalizer so that ids differing in one
/// character land far apart on the wheel.)
pub fn stable_draw(id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A draw for a client without an id.
pub fn random_draw() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn weights_parse_and_print_canonically() {
        let w = RolloutWeights::parse(" v2 = 10 , v1=90").unwrap();
        assert_eq!(w.to_string(), "v1=90,v2=10");
        assert_eq!(w.weight("v1"), Some(90));
        assert_eq!(w.weight("v3"), Some(0));
        let none = RolloutWeights::parse("").unwrap();
        assert!(none.is_empty());
        assert_eq!(none.weight("v1"), None);
        assert_eq!(none.to_string(), "");
        assert_eq!(
            RolloutWeights::parse("blue=100,green=0")
                .unwrap()
                .to_string(),
            "blue=100,green=0"
        );
        assert_eq!(
            RolloutWeights::parse("1.2.3+build_7-rc=1")
                .unwrap()
                .to_string(),
            "1.2.3+build_7-rc=1"
        );
    }

    #[test]
    fn bad_weights_are_refused_with_a_reason() {
        for (text, want) in [
            ("v1=-1", "whole number"),
            ("v1=1.5", "whole number"),
            ("v1=", "whole number"),
            ("v1=1000001", "whole number"),
            ("v1", "VERSION=WEIGHT"),
            ("v1=1,,v2=1", "VERSION=WEIGHT"),
            ("=5", "not a version label"),
            ("v 1=5", "not a version label"),
            ("v/1=5", "not a version label"),
            ("v1=0,v2=0", "at least one weight"),
            ("v1=1,v1=2", "given twice"),
        ] {
            let err = RolloutWeights::parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let long = format!("{}=1", "v".repeat(MAX_VERSION_LEN + 1));
        assert!(RolloutWeights::parse(&long).is_err());
        let many: Vec<String> = (0..=MAX_VERSIONS).map(|i| format!("v{i}=1")).collect();
        assert!(matches!(
            RolloutWeights::parse(&many.join(",")),
            Err(RolloutError::TooMany(_))
        ));
    }

    #[test]
    fn the_wheel_splits_by_weight() {
        let versions = [("a", 1), ("b", 0), ("c", 3)];
        assert_eq!(RolloutWeights::pick(&versions, 0), Some("a"));
        assert_eq!(RolloutWeights::pick(&versions, u64::MAX / 4 - 1), Some("a"));
        assert_eq!(RolloutWeights::pick(&versions, u64::MAX / 4 + 1), Some("c"));
        assert_eq!(RolloutWeights::pick(&versions, u64::MAX), Some("c"));
        assert_eq!(RolloutWeights::pick(&[("a", 0)], 7), None);
        assert_eq!(RolloutWeights::pick(&[], 7), None);
    }

    #[test]
    fn draws_are_stable_and_spread() {
        assert_eq!(stable_draw("viewer-1"), stable_draw("viewer-1"));
        assert_ne!(stable_draw("viewer-1"), stable_draw("viewer-2"));
        // Ids that differ in one character fall in both halves of the wheel.
        let upper = (0..1000)
            .filter(|i| stable_draw(&format!("v{i}")) > u64::MAX / 2)
            .count();
        assert!((400..=600).contains(&upper), "{upper}");
    }
}
