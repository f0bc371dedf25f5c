//! Hot room state persisted in batches: the JSON of
//! `POST /v1/room-stats/likes`, which every node calls every few seconds with
//! one batch for the rooms it carries (docs/room-events.md), and the node
//! secret that authenticates it.
//!
//! A stored row says "`likes` likes counted from the room's bus events
//! through offset `through` of epoch `epoch`". A claim is a compare-and-set:
//! "the row stands at `expect`; move it to `to` and add `add`". The answer
//! says which claims were applied and where every room named stands now.

use serde::{Deserialize, Serialize};

/// Path of the batch call on the control plane's JSON gateway.
pub const LIKES_PATH: &str = "/v1/room-stats/likes";

/// Shortest node secret accepted.
pub const NODE_SECRET_MIN_LEN: usize = 16;
/// Longest node secret accepted.
pub const NODE_SECRET_MAX_LEN: usize = 256;

/// Checks a node secret: [`NODE_SECRET_MIN_LEN`] to [`NODE_SECRET_MAX_LEN`]
/// visible ASCII characters (it travels in an HTTP header).
pub fn check_node_secret(secret: &str) -> Result<(), String> {
    let len = secret.len();
    if !(NODE_SECRET_MIN_LEN..=NODE_SECRET_MAX_LEN).contains(&len) {
        return Err(format!(
            "must be {NODE_SECRET_MIN_LEN} to {NODE_SECRET_MAX_LEN} characters, not {len}"
        ));
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be visible ASCII characters only (no spaces)".into());
    }
    Ok(())
}

/// The secret shared by a cluster's nodes and control planes: nodes send it
/// as `authorization: Bearer <secret>` on their calls to the control plane
/// that change stored state. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeSecret(String);

impl std::fmt::Debug for NodeSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeSecret(***)")
    }
}

impl NodeSecret {
    /// Checks and takes a secret (see [`check_node_secret`]).
    pub fn parse(secret: &str) -> Result<Self, String> {
        check_node_secret(secret)?;
        Ok(Self(secret.to_owned()))
    }

    /// A new random secret (for `weir dev`, whose node and control plane
    /// share a process).
    pub fn generate() -> Self {
        use base64::Engine;
        use rand::RngCore;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    }

    /// The secret, to send.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is the secret, in time that does not depend on
    /// where they first differ.
    pub fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// Where a room's row stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LikesMark {
    pub epoch: u64,
    pub through: u64,
}

/// One compare-and-set of a room's row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LikesClaim {
    pub room: String,
    /// The row as last read; `null`: the room has no row yet (the claim
    /// creates it unless another node did first).
    pub expect: Option<LikesMark>,
    pub to: LikesMark,
    /// Likes to add: the sum of the likes events in the range moved over.
    pub add: u64,
}

/// Body of `POST /v1/room-stats/likes`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LikesBatchRequest {
    /// The calling node's id (for logs).
    pub node: String,
    #[serde(default)]
    pub claims: Vec<LikesClaim>,
    /// Rooms whose rows to read, besides the claimed ones.
    #[serde(default)]
    pub read: Vec<String>,
}

/// A room's row as answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LikesRow {
    pub room: String,
    pub likes: u64,
    pub epoch: u64,
    pub through: u64,
    pub updated_unix_ms: u64,
}

/// Answer of `POST /v1/room-stats/likes`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LikesBatchAnswer {
    /// Per claim, in the order sent: whether it was applied.
    pub applied: Vec<bool>,
    /// Every room named that has a row, after the claims.
    pub rows: Vec<LikesRow>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_checked() {
        assert!(check_node_secret(&"s".repeat(16)).is_ok());
        assert!(check_node_secret("short").is_err());
        assert!(check_node_secret(&"s".repeat(257)).is_err());
        assert!(check_node_secret("sixteen chars ok").is_err(), "space");
        let s = NodeSecret::parse("0123456789abcdef").unwrap();
        assert!(s.matches("0123456789abcdef"));
        assert!(!s.matches("0123456789abcdeF") && !s.matches("0123456789abcde"));
        assert!(!format!("{s:?}").contains("0123"));
        assert!(NodeSecret::parse(NodeSecret::generate().expose()).is_ok());
    }

    #[test]
    fn requests_refuse_unknown_fields() {
        let r: LikesBatchRequest = serde_json::from_str(
            r#"{"node":"n","claims":[{"room":"r","expect":null,"to":{"epoch":1,"through":2},"add":3}]}"#,
        )
        .unwrap();
        assert_eq!(r.claims[0].add, 3);
        assert!(r.read.is_empty());
        assert!(serde_json::from_str::<LikesBatchRequest>(r#"{"node":"n","x":1}"#).is_err());
    }
}
