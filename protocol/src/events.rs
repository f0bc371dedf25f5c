//! The frames of a node's room events WebSocket (`/rooms/{room}/events`),
//! documented in docs/room-events.md: what nodes send and what clients (the
//! play page, `weir loadtest`) read.
//!
//! Server → client frames are MessagePack maps by default (binary messages;
//! compact, and any MessagePack library reads them) or JSON text with
//! `?format=json` (debugging, simple pages). Both carry the same fields.
//! An event frame is encoded once per format and shared by every client of
//! the node; what differs per client (events skipped for it, degraded) goes
//! in small frames of their own.
//!
//! Client → server frames are JSON text (they are few and small).

use crate::bus::{EventBody, EventClass};
use serde::{Deserialize, Serialize};

/// How a client wants its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// MessagePack maps in binary messages.
    #[default]
    Msgpack,
    /// JSON in text messages.
    Json,
}

/// A frame from the node to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame of every connection.
    Hello {
        room: String,
        epoch: u64,
        /// Offset of the newest event the node holds (0: none).
        offset: u64,
        /// Whether the client's `since` could be honoured: `Some(true)` when
        /// every missed event follows, `Some(false)` when some are gone (the
        /// client should resync), `None` when it asked for no recovery.
        recovered: Option<bool>,
        /// Events about to be replayed.
        missed: u64,
        /// The node has lost the broker: events from other nodes are late.
        degraded: bool,
        user: String,
    },
    /// One event of the room, in bus order. `prev` is the offset of the
    /// event before it in this room (0: none held before it): a client that
    /// sees `prev` differ from the last offset it got has missed something,
    /// unless a `skipped` frame said so.
    Event {
        offset: u64,
        prev: u64,
        at_ms: u64,
        /// The id it was published with (danmaku and gifts carry one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        #[serde(flatten)]
        body: EventBody,
    },
    /// A danmaku shown while the broker was away: no offset yet. The event
    /// frame that later carries the same `id` confirms it (clients show it
    /// once).
    Local {
        id: String,
        at_ms: u64,
        #[serde(flatten)]
        body: EventBody,
    },
    /// Events of a class were left out for this client (it is slow, or the
    /// room too hot): `through` is the offset of the last one skipped.
    Skipped {
        class: EventClass,
        count: u64,
        through: u64,
    },
    /// A notice for this user rather than for the room: a streamer they
    /// follow went live (`type: go_live`).
    Notice {
        at_ms: u64,
        #[serde(flatten)]
        body: EventBody,
    },
    /// The answer to `friends`: the people the user follows who are in the
    /// room now (as far as nodes name their viewers: rooms with more than
    /// `MAX_ONLINE_USERS` viewers on a node are not named there).
    Friends { users: Vec<String> },
    /// The room's counters (likes merged from every node, viewers online).
    Counters { likes: u64, online: u64 },
    /// The node could not keep the room's history contiguous (the broker
    /// dropped events while it was away): resync from here.
    Gap { after: u64 },
    /// The client's frame was accepted (`offset` 0: shown locally, the
    /// broker being away).
    Ack { r#ref: String, offset: u64 },
    /// The client's frame was refused, and why; nothing was changed.
    Refused {
        #[serde(default, skip_serializing_if = "String::is_empty")]
        r#ref: String,
        code: String,
        reason: String,
    },
    /// Whether the node has the broker (sent when it changes).
    Status { degraded: bool },
    /// The node is closing the connection, and why.
    Bye { code: String, reason: String },
    /// Answer to a ping.
    Pong,
}

impl ServerFrame {
    /// The frame in `format`.
    pub fn encode(&self, format: Format) -> Vec<u8> {
        match format {
            // Maps with field names: self-describing, so any MessagePack
            // reader decodes it without a schema.
            Format::Msgpack => rmp_serde::to_vec_named(self).unwrap_or_default(),
            Format::Json => serde_json::to_vec(self).unwrap_or_default(),
        }
    }

    /// Parses a frame (for clients and tests).
    pub fn decode(bytes: &[u8], format: Format) -> Result<Self, String> {
        match format {
            Format::Msgpack => rmp_serde::from_slice(bytes).map_err(|e| e.to_string()),
            Format::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        }
    }
}

/// A frame from a client.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Send a danmaku. `ref` comes back in the ack or refusal.
    Danmaku {
        text: String,
        #[serde(default)]
        r#ref: String,
    },
    /// Like the stream `count` times (1..=100), merged into counters.
    Like {
        #[serde(default = "one")]
        count: u32,
    },
    /// Streamer only: mute `user` for `seconds` (0 lifts it).
    Mute {
        user: String,
        seconds: u32,
    },
    /// Streamer only: one danmaku per `seconds` per user (0 lifts it).
    SlowMode {
        seconds: u32,
    },
    /// Which of the people I follow are in this room? (Answered `friends`.)
    Friends,
    Ping,
}

fn one() -> u32 {
    1
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_both_formats() {
        let f = ServerFrame::Event {
            offset: 7,
            prev: 3,
            at_ms: 1,
            id: Some("n1-x".into()),
            body: EventBody::Danmaku {
                user: "u".into(),
                text: "hi".into(),
            },
        };
        for format in [Format::Json, Format::Msgpack] {
            let bytes = f.encode(format);
            assert_eq!(ServerFrame::decode(&bytes, format).unwrap(), f);
        }
        let json = String::from_utf8(f.encode(Format::Json)).unwrap();
        assert!(json.contains("\"t\":\"event\"") && json.contains("\"type\":\"danmaku\""));
        assert!(f.encode(Format::Msgpack).len() < json.len());
    }

    #[test]
    fn client_frames_parse_and_refuse_unknown_fields() {
        let f: ClientFrame = serde_json::from_str(r#"{"t":"like"}"#).unwrap();
        assert_eq!(f, ClientFrame::Like { count: 1 });
        assert!(
            serde_json::from_str::<ClientFrame>(r#"{"t":"danmaku","text":"a","x":1}"#).is_err()
        );
        assert!(serde_json::from_str::<ClientFrame>(r#"{"t":"gift"}"#).is_err());
    }
}
