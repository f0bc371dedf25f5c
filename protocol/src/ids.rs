//! Validated identifiers. Anything that comes from the network is parsed into
//! one of these before it is used ("parse, don't validate").

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is longer than {max} bytes")]
    TooLong { kind: &'static str, max: usize },
    #[error("{kind} may contain only ASCII letters, digits, '-', '_' and '.', found {found:?}")]
    BadChar { kind: &'static str, found: char },
}

fn validate(kind: &'static str, s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > max {
        return Err(IdError::TooLong { kind, max });
    }
    if let Some(found) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(IdError::BadChar { kind, found });
    }
    if s == "." || s == ".." {
        return Err(IdError::BadChar { kind, found: '.' });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr) => {
        $(#[$doc])*
        // Shared text: ids are cloned on hot paths (a shard's per-viewer
        // bookkeeping), where a clone is a reference count, not a copy.
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            /// Parses and validates an id.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                validate($kind, s, $max)?;
                Ok(Self(Arc::from(s)))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                validate($kind, &s, $max)?;
                Ok(Self(Arc::from(s)))
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}

string_id!(
    /// A room: what streamers publish to and viewers play.
    RoomId, "room id", 64
);
string_id!(
    /// A media node of the data plane.
    NodeId, "node id", 64
);
string_id!(
    /// One WebRTC session (a publisher or a viewer) on a node.
    SessionId, "session id", 64
);

impl SessionId {
    /// A fresh random session id (128 bits, hex).
    pub fn random() -> Self {
        let v: u128 = rand::random();
        Self(Arc::from(format!("{v:032x}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids_are_validated() {
        assert!(RoomId::parse("lobby-1_a.b").is_ok());
        assert_eq!(RoomId::parse(""), Err(IdError::Empty { kind: "room id" }));
        assert!(matches!(
            RoomId::parse("a/b"),
            Err(IdError::BadChar { found: '/', .. })
        ));
        assert!(matches!(RoomId::parse(".."), Err(IdError::BadChar { .. })));
        assert!(matches!(
            RoomId::parse(&"x".repeat(65)),
            Err(IdError::TooLong { .. })
        ));
        assert!(matches!(RoomId::parse("é"), Err(IdError::BadChar { .. })));
    }

    #[test]
    fn session_ids_are_unique_and_valid() {
        let a = SessionId::random();
        let b = SessionId::random();
        assert_ne!(a, b);
        assert!(SessionId::parse(a.as_str()).is_ok());
    }

    #[test]
    fn ids_deserialize_through_validation() {
        assert!(serde_json::from_str::<RoomId>("\"ok\"").is_ok());
        assert!(serde_json::from_str::<RoomId>("\"no way\"").is_err());
    }
}
