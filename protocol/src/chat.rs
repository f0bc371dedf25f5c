//! The limits that protect rooms' chat, and their config-center keys
//! (`chat.*`): the control plane validates a value with [`validate`] before
//! it writes it; every node applies what it watches with
//! [`ChatLimits::from_values`], so both read the keys the same way.

use std::collections::BTreeMap;

use crate::bus::MAX_DANMAKU_BYTES;

/// One `chat.*` key: name, default, description.
#[derive(Debug, Clone, Copy)]
pub struct ChatKey {
    pub key: &'static str,
    pub default: &'static str,
    pub description: &'static str,
}

/// Every `chat.*` key, sorted.
pub const KEYS: &[ChatKey] = &[
    ChatKey {
        key: "chat.blocked_words",
        default: "",
        description: "the moderation hook: a danmaku containing any of these words (comma-separated, case-insensitive, each 1 to 64 characters, at most 1000) is refused with code `moderated`",
    },
    ChatKey {
        key: "chat.conn_burst",
        default: "5",
        description: "danmaku one connection may send at once before its rate applies: 1 to 1000",
    },
    ChatKey {
        key: "chat.conn_rate",
        default: "2",
        description: "danmaku per second one connection may send: a decimal from 0.1 to 100",
    },
    ChatKey {
        key: "chat.max_lag",
        default: "5000",
        description: "events a client may lag behind its room before it is disconnected (`bye too_slow`): 100 to 1000000",
    },
    ChatKey {
        key: "chat.max_text_bytes",
        default: "500",
        description: "longest danmaku in bytes: 1 to 500",
    },
    ChatKey {
        key: "chat.shed_lag",
        default: "200",
        description: "events a client may lag behind before it gets only gifts and notices (the rest as `skipped`): 10 to 100000",
    },
    ChatKey {
        key: "chat.user_burst",
        default: "8",
        description: "danmaku one user may send at once over all their connections to a node: 1 to 1000",
    },
    ChatKey {
        key: "chat.user_rate",
        default: "3",
        description: "danmaku per second one user may send over all their connections to a node: a decimal from 0.1 to 100",
    },
];

/// Limits that protect rooms.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatLimits {
    /// Danmaku per second one connection may send (token bucket rate).
    pub conn_rate: f64,
    /// Burst one connection may send at once.
    pub conn_burst: f64,
    /// Danmaku per second one user may send over all their connections to
    /// one node.
    pub user_rate: f64,
    pub user_burst: f64,
    /// Longest danmaku, in bytes.
    pub max_text_bytes: usize,
    /// Largest client frame, in bytes (a bigger one closes the connection).
    pub max_frame_bytes: usize,
    /// A danmaku containing one of these (case-insensitive) is refused: the
    /// moderation hook run before anything is published. Kept lowercase.
    pub blocked_words: Vec<String>,
    /// Events a client may lag behind before low-priority events (danmaku,
    /// counters) are skipped for it.
    pub shed_lag: u64,
    /// Events a client may lag behind before it is disconnected.
    pub max_lag: u64,
}

impl Default for ChatLimits {
    fn default() -> Self {
        Self {
            conn_rate: 2.0,
            conn_burst: 5.0,
            user_rate: 3.0,
            user_burst: 8.0,
            max_text_bytes: MAX_DANMAKU_BYTES,
            max_frame_bytes: 4096,
            blocked_words: Vec::new(),
            shed_lag: 200,
            max_lag: 5000,
        }
    }
}

fn whole(value: &str, min: u64, max: u64) -> Result<u64, String> {
    let n: u64 = value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a whole number"))?;
    if !(min..=max).contains(&n) {
        return Err(format!("{n} is outside {min}..={max}"));
    }
    Ok(n)
}

fn decimal(value: &str, min: f64, max: f64) -> Result<f64, String> {
    let x: f64 = value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a decimal like 2.5"))?;
    if !x.is_finite() || x < min || x > max {
        return Err(format!("{value} is outside {min}..={max}"));
    }
    Ok(x)
}

fn words(value: &str) -> Result<Vec<String>, String> {
    let list: Vec<String> = value
        .split(',')
        .map(|w| w.trim().to_lowercase())
        .filter(|w| !w.is_empty())
        .collect();
    if list.len() > 1000 {
        return Err(format!("{} words; at most 1000", list.len()));
    }
    if let Some(w) = list.iter().find(|w| w.chars().count() > 64) {
        return Err(format!("{w:?} is longer than 64 characters"));
    }
    Ok(list)
}

/// Whether `key` is a chat key.
pub fn is_chat_key(key: &str) -> bool {
    KEYS.iter().any(|k| k.key == key)
}

/// Checks `value` for the chat key `key`; returns it in canonical form.
pub fn validate(key: &str, value: &str) -> Result<String, String> {
    let mut limits = ChatLimits::default();
    apply(&mut limits, key, value)?;
    Ok(match key {
        "chat.blocked_words" => limits.blocked_words.join(","),
        _ => value.trim().to_owned(),
    })
}

fn apply(limits: &mut ChatLimits, key: &str, value: &str) -> Result<(), String> {
    match key {
        "chat.blocked_words" => limits.blocked_words = words(value)?,
        "chat.conn_burst" => limits.conn_burst = whole(value, 1, 1000)? as f64,
        "chat.conn_rate" => limits.conn_rate = decimal(value, 0.1, 100.0)?,
        "chat.max_lag" => limits.max_lag = whole(value, 100, 1_000_000)?,
        "chat.max_text_bytes" => {
            limits.max_text_bytes = whole(value, 1, MAX_DANMAKU_BYTES as u64)? as usize;
        }
        "chat.shed_lag" => limits.shed_lag = whole(value, 10, 100_000)?,
        "chat.user_burst" => limits.user_burst = whole(value, 1, 1000)? as f64,
        "chat.user_rate" => limits.user_rate = decimal(value, 0.1, 100.0)?,
        _ => return Err(format!("{key} is not a chat key")),
    }
    Ok(())
}

impl ChatLimits {
    /// The limits from stored config values (other keys are ignored). A
    /// value that does not parse keeps its key's default and is reported.
    pub fn from_values(values: &BTreeMap<String, String>) -> (Self, Vec<String>) {
        let mut limits = Self::default();
        let mut problems = Vec::new();
        for (key, value) in values.iter().filter(|(k, _)| is_chat_key(k)) {
            if let Err(e) = apply(&mut limits, key, value) {
                problems.push(format!("{key}: {e}"));
            }
        }
        (limits, problems)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_sorted_and_their_defaults_valid() {
        assert!(KEYS.windows(2).all(|w| w[0].key < w[1].key));
        for k in KEYS {
            validate(k.key, k.default).unwrap();
        }
        let defaults: BTreeMap<String, String> = KEYS
            .iter()
            .map(|k| (k.key.to_owned(), k.default.to_owned()))
            .collect();
        assert_eq!(
            ChatLimits::from_values(&defaults),
            (ChatLimits::default(), vec![])
        );
    }

    #[test]
    fn values_are_checked_and_applied() {
        assert_eq!(validate("chat.conn_rate", " 0.5 ").unwrap(), "0.5");
        assert!(validate("chat.conn_rate", "0").is_err());
        assert!(validate("chat.conn_rate", "NaN").is_err());
        assert!(validate("chat.max_lag", "99").is_err());
        assert!(validate("chat.max_text_bytes", "501").is_err());
        assert!(validate("chat.nope", "1").is_err());
        assert_eq!(
            validate("chat.blocked_words", " Spam, ,SCAM ").unwrap(),
            "spam,scam"
        );
        assert!(validate("chat.blocked_words", &"x".repeat(65)).is_err());
        let values: BTreeMap<String, String> = [
            ("chat.conn_burst", "9"),
            ("chat.shed_lag", "bad"),
            ("scheduler.max_load_ratio", "0.5"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let (limits, problems) = ChatLimits::from_values(&values);
        assert_eq!(limits.conn_burst, 9.0);
        assert_eq!(limits.shed_lag, 200, "a bad value keeps the default");
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("chat.shed_lag"));
    }
}
