//! The SRT streamid grammar: which room an SRT caller wants, in which mode,
//! with which token.
//!
//! Two forms are accepted:
//!
//! - the SRT access-control convention
//!   (`#!::r=ROOM,m=publish,t=TOKEN`): comma-separated `key=value` pairs after
//!   the `#!::` marker, keys in any order, unknown keys ignored (`u`, `s`,
//!   `h`… may be present). `r` is the room (required), `m` the mode
//!   (`publish`, `request`, `play`, `bidirectional`; `publish` when absent,
//!   since Weir's SRT listener only ingests), `t` the token. The convention
//!   names its own `t` key "type"; Weir uses it for the token, as the design
//!   fixes, and nothing else in Weir reads a type.
//! - the plain form `ROOM?token=TOKEN` (`&`-separated query pairs after the
//!   room; `mode=` accepted as well, unknown keys ignored), for callers that
//!   cannot type `#!::`.
//!
//! Values are taken literally: ffmpeg does not URL-decode a streamid, so no
//! decoding is done here either (tokens and room ids need none). The parser
//! never panics, whatever the bytes.

use crate::{IdError, RoomId};

/// Longest streamid SRT carries (the protocol limits it to 512 bytes).
pub const MAX_STREAMID_LEN: usize = 512;

const ACCESS_CONTROL_MARKER: &str = "#!::";

/// What an SRT caller asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StreamMode {
    /// Send media into the room (`m=publish`).
    Publish,
    /// Receive the room's media (`m=request`, or `m=play`).
    Request,
    /// Send and receive (`m=bidirectional`).
    Bidirectional,
}

impl StreamMode {
    /// The mode's name in the convention.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamMode::Publish => "publish",
            StreamMode::Request => "request",
            StreamMode::Bidirectional => "bidirectional",
        }
    }

    fn parse(s: &str) -> Result<Self, StreamIdError> {
        match s {
            "publish" => Ok(StreamMode::Publish),
            "request" | "play" => Ok(StreamMode::Request),
            "bidirectional" => Ok(StreamMode::Bidirectional),
            other => Err(StreamIdError::UnknownMode(truncate(other))),
        }
    }
}

/// A parsed streamid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamId {
    /// The room.
    pub room: RoomId,
    /// What the caller asks to do.
    pub mode: StreamMode,
    /// The token, when one was given (checked by the node, not here).
    pub token: Option<String>,
}

/// Why a streamid was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamIdError {
    /// No streamid at all.
    #[error("the streamid is empty: use #!::r=ROOM,m=publish,t=TOKEN")]
    Empty,
    /// Longer than SRT allows.
    #[error("the streamid is longer than {MAX_STREAMID_LEN} bytes")]
    TooLong,
    /// Bytes that are not UTF-8.
    #[error("the streamid is not UTF-8")]
    NotUtf8,
    /// A pair without `=`.
    #[error("malformed pair {0:?}: expected key=value")]
    MalformedPair(String),
    /// A known key given twice.
    #[error("key {0:?} appears more than once")]
    DuplicateKey(String),
    /// No `r=` key (or an empty room before `?`).
    #[error("the streamid names no room (r=ROOM)")]
    MissingRoom,
    /// The room is not a valid room id.
    #[error("bad room in streamid: {0}")]
    BadRoom(IdError),
    /// A mode other than publish, request, play or bidirectional.
    #[error("unknown mode {0:?}: expected publish, request, play or bidirectional")]
    UnknownMode(String),
}

/// Keeps hostile input out of error messages and logs at a bounded size.
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

impl StreamId {
    /// Parses a streamid as raw bytes (what arrives from the network).
    pub fn parse_bytes(bytes: &[u8]) -> Result<Self, StreamIdError> {
        if bytes.len() > MAX_STREAMID_LEN {
            return Err(StreamIdError::TooLong);
        }
        let s = std::str::from_utf8(bytes).map_err(|_| StreamIdError::NotUtf8)?;
        Self::parse(s)
    }

    /// Parses a streamid in either form.
    pub fn parse(s: &str) -> Result<Self, StreamIdError> {
        if s.len() > MAX_STREAMID_LEN {
            return Err(StreamIdError::TooLong);
        }
        if s.is_empty() {
            return Err(StreamIdError::Empty);
        }
        let (room, fields) = match s.strip_prefix(ACCESS_CONTROL_MARKER) {
            Some(pairs) => {
                let f = parse_pairs(pairs.split(','), "r", &["m"], "t")?;
                (f.room, f)
            }
            None => {
                let (room, query) = s.split_once('?').unwrap_or((s, ""));
                let f = parse_pairs(query.split('&'), "", &["mode", "m"], "token")?;
                (Some(room), f)
            }
        };
        let room = match room {
            Some("") | None => return Err(StreamIdError::MissingRoom),
            Some(r) => RoomId::parse(r).map_err(StreamIdError::BadRoom)?,
        };
        Ok(Self {
            room,
            mode: fields.mode,
            token: fields.token,
        })
    }
}

/// The pairs of either form, before the room is validated.
struct Fields<'a> {
    room: Option<&'a str>,
    mode: StreamMode,
    token: Option<String>,
}

fn parse_pairs<'a>(
    pairs: impl Iterator<Item = &'a str>,
    room_key: &str,
    mode_keys: &[&str],
    token_key: &str,
) -> Result<Fields<'a>, StreamIdError> {
    let mut room: Option<&str> = None;
    let mut mode: Option<&str> = None;
    let mut token: Option<&str> = None;
    for pair in pairs {
        let pair = pair.trim();
        if pair.is_empty() {
            continue;
        }
        let Some((key, value)) = pair.split_once('=') else {
            return Err(StreamIdError::MalformedPair(truncate(pair)));
        };
        let key = key.trim();
        let slot = if !room_key.is_empty() && key == room_key {
            &mut room
        } else if mode_keys.contains(&key) {
            &mut mode
        } else if key == token_key {
            &mut token
        } else {
            continue; // unknown keys are ignored, as the convention asks
        };
        if slot.is_some() {
            return Err(StreamIdError::DuplicateKey(truncate(key)));
        }
        *slot = Some(value.trim());
    }
    let mode = match mode {
        Some(m) => StreamMode::parse(m)?,
        None => StreamMode::Publish,
    };
    Ok(Fields {
        room,
        mode,
        token: token.filter(|t| !t.is_empty()).map(str::to_owned),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn room(s: &str) -> RoomId {
        RoomId::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn access_control_form() {
        let id = StreamId::parse("#!::r=live-1,m=publish,t=w1.abc.def").unwrap();
        assert_eq!(id.room, room("live-1"));
        assert_eq!(id.mode, StreamMode::Publish);
        assert_eq!(id.token.as_deref(), Some("w1.abc.def"));
    }

    #[test]
    fn keys_in_any_order_unknown_ignored_mode_defaults_to_publish() {
        let id = StreamId::parse("#!::u=alice,t=tok,s=xyz,r=room,h=example.com").unwrap();
        assert_eq!(id.room, room("room"));
        assert_eq!(id.mode, StreamMode::Publish);
        assert_eq!(id.token.as_deref(), Some("tok"));
    }

    #[test]
    fn request_and_play_are_parsed_so_they_can_be_refused() {
        let id = StreamId::parse("#!::r=a,m=request").unwrap();
        assert_eq!(id.mode, StreamMode::Request);
        assert_eq!(id.token, None);
        let id = StreamId::parse("#!::m=play,r=a,t=x").unwrap();
        assert_eq!(id.mode, StreamMode::Request);
        let id = StreamId::parse("#!::m=bidirectional,r=a").unwrap();
        assert_eq!(id.mode, StreamMode::Bidirectional);
        assert_eq!(
            StreamId::parse("#!::r=a,m=watch"),
            Err(StreamIdError::UnknownMode("watch".into()))
        );
    }

    #[test]
    fn plain_form() {
        let id = StreamId::parse("lobby?token=w1.x.y").unwrap();
        assert_eq!(id.room, room("lobby"));
        assert_eq!(id.mode, StreamMode::Publish);
        assert_eq!(id.token.as_deref(), Some("w1.x.y"));
        let id = StreamId::parse("lobby").unwrap();
        assert_eq!(id.token, None);
        let id = StreamId::parse("lobby?foo=1&token=t&mode=play").unwrap();
        assert_eq!(id.mode, StreamMode::Request);
        assert_eq!(id.token.as_deref(), Some("t"));
    }

    #[test]
    fn refusals_are_typed() {
        assert_eq!(StreamId::parse(""), Err(StreamIdError::Empty));
        assert_eq!(
            StreamId::parse(&"a".repeat(600)),
            Err(StreamIdError::TooLong)
        );
        assert_eq!(
            StreamId::parse_bytes(&[0xff, 0xfe]),
            Err(StreamIdError::NotUtf8)
        );
        assert_eq!(
            StreamId::parse("#!::m=publish"),
            Err(StreamIdError::MissingRoom)
        );
        assert_eq!(StreamId::parse("#!::r="), Err(StreamIdError::MissingRoom));
        assert_eq!(
            StreamId::parse("#!::r=a,junk"),
            Err(StreamIdError::MalformedPair("junk".into()))
        );
        assert_eq!(
            StreamId::parse("#!::r=a,r=b"),
            Err(StreamIdError::DuplicateKey("r".into()))
        );
        assert!(matches!(
            StreamId::parse("#!::r=a/b"),
            Err(StreamIdError::BadRoom(_))
        ));
        assert!(matches!(
            StreamId::parse("a b?token=x"),
            Err(StreamIdError::BadRoom(_))
        ));
        assert_eq!(StreamId::parse("?token=x"), Err(StreamIdError::MissingRoom));
        assert_eq!(
            StreamId::parse("room?token"),
            Err(StreamIdError::MalformedPair("token".into()))
        );
    }

    #[test]
    fn error_messages_stay_short() {
        let long = format!("#!::r=a,m={}", "x".repeat(400));
        match StreamId::parse(&long) {
            Err(StreamIdError::UnknownMode(m)) => assert_eq!(m.len(), 64),
            other => panic!("{other:?}"),
        }
    }

    /// Random bytes and random mixes of the grammar's own characters: every
    /// input gives an answer, never a panic.
    #[test]
    fn random_input_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        const ALPHABET: &[u8] = b"#!::r=m,t?&=publishrequesta.b-_\xff\x00 ";
        let mut accepted = 0;
        for n in 0..20_000 {
            let len = (next() % 80) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    let v = next();
                    if n % 2 == 0 {
                        v as u8
                    } else {
                        ALPHABET[(v as usize) % ALPHABET.len()]
                    }
                })
                .collect();
            let mut with_marker = b"#!::".to_vec();
            with_marker.extend_from_slice(&bytes);
            for input in [&bytes, &with_marker] {
                if StreamId::parse_bytes(input).is_ok() {
                    accepted += 1;
                }
            }
        }
        assert!(accepted > 0, "some random mixes are valid streamids");
    }
}
