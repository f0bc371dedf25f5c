//! The room bus contract: every event of a room (danmaku, like counters,
//! gifts, system notices) is published to the room's subject and the bus
//! gives it an **offset** (strictly increasing within the room, not
//! necessarily contiguous: on JetStream it is the stream sequence, shared by
//! all rooms) within an **epoch** (the identity of the bus's store: a new
//! in-process bus or a re-created JetStream stream gets a new one, and
//! offsets of an older epoch mean nothing in it; epochs are the store's
//! creation time in Unix ms, so a newer store has a larger one). Epochs and
//! offsets stay below 2^53 so JavaScript clients hold them exactly.
//!
//! Two traits: [`BusPublisher`], all the control plane needs (its outbox
//! relay publishes gift events), and [`RoomBus`], what a node needs to carry
//! rooms (subscribe once per room, read what a reconnecting client missed).
//! Implementations live in the planes (in-process in the data plane, NATS
//! JetStream in each plane); the subject names, the stream layout and the
//! event envelope live here so every process agrees on them.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::RoomId;

/// Name of the JetStream stream that holds every room's events.
pub const STREAM: &str = "WEIR_ROOMS_V1";
/// Prefix of every room subject; the stream captures `{SUBJECT_PREFIX}>`.
pub const SUBJECT_PREFIX: &str = "weir.v1.room.";
/// The room whose events go to every node rather than to a room's
/// viewers: go-live notices, which each node hands to those of its
/// connected users who follow the streamer. Rooms whose id starts with `_`
/// are reserved: clients cannot join them.
pub const NOTICES_ROOM: &str = "_notices";

/// How long after a room went live its go-live notice is (re)announced: a
/// control plane that dies between marking a room live and publishing the
/// notice is covered by the next leader within this window; the broker's
/// duplicate window drops the repeats.
pub const GO_LIVE_ANNOUNCE_S: u64 = 60;

/// Most users a node names in an `online` event of a room.
pub const MAX_ONLINE_USERS: usize = 200;

/// Longest danmaku text, in bytes (UTF-8).
pub const MAX_DANMAKU_BYTES: usize = 500;

/// The subject a room's events go to. Room ids may contain `.`, which NATS
/// reads as a token separator, so it is written as `~` (not in the room id
/// alphabet, so the mapping is one to one).
pub fn room_subject(room: &RoomId) -> String {
    format!("{SUBJECT_PREFIX}{}", room.as_str().replace('.', "~"))
}

/// The room of a subject made by [`room_subject`].
pub fn subject_room(subject: &str) -> Option<RoomId> {
    let token = subject.strip_prefix(SUBJECT_PREFIX)?;
    RoomId::parse(&token.replace('~', ".")).ok()
}

/// How an event may be treated on its way to viewers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventClass {
    /// Gifts and system notices: never dropped, sampled or reordered.
    Critical,
    /// Counter updates (likes, online counts): a newer one supersedes an
    /// older one, so a slow client may skip to the latest.
    Counter,
    /// Danmaku: may be sampled when a room is too hot for a client.
    Chat,
}

/// What happened in a room.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventBody {
    /// A chat message flying over the video.
    Danmaku { user: String, text: String },
    /// Likes merged on one node over a short window: `delta` new likes from
    /// `users` distinct users.
    Likes {
        node: String,
        delta: u64,
        users: u32,
    },
    /// Viewers of the room connected to one node right now.
    Online {
        node: String,
        count: u32,
        /// Who they are, when the node has at most [`MAX_ONLINE_USERS`]
        /// of them in the room (else empty): what "friends in this room"
        /// is answered from.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        users: Vec<String>,
    },
    /// A paid gift, published by the control plane's outbox relay once the
    /// payment committed.
    Gift {
        /// The gift row's id (also the bus message id, so duplicates drop).
        gift_id: String,
        from_user: String,
        to_user: String,
        gift: String,
        count: u32,
        /// Total price charged, in the wallet's smallest unit.
        amount: i64,
    },
    /// A streamer this room's viewers may follow went live.
    GoLive {
        streamer: String,
        room: String,
        title: String,
    },
    /// A notice from the platform (room ended, ...).
    System { code: String, text: String },
    /// The streamer (or an operator) moderated the room; every node applies
    /// it. `seconds == 0` lifts it.
    Moderation {
        action: ModerationAction,
        /// The user it is about (empty for room-wide actions).
        user: String,
        seconds: u32,
        by: String,
    },
}

/// What a moderation event does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModerationAction {
    /// `user` may not send danmaku for `seconds`.
    Mute,
    /// Every user may send one danmaku per `seconds`.
    SlowMode,
}

impl EventBody {
    /// The class that decides how the event travels.
    pub fn class(&self) -> EventClass {
        match self {
            Self::Danmaku { .. } => EventClass::Chat,
            Self::Likes { .. } | Self::Online { .. } => EventClass::Counter,
            Self::Gift { .. }
            | Self::GoLive { .. }
            | Self::System { .. }
            | Self::Moderation { .. } => EventClass::Critical,
        }
    }
}

/// The envelope published on the bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomEvent {
    /// Unix milliseconds when the publisher made it.
    pub at_ms: u64,
    #[serde(flatten)]
    pub body: EventBody,
}

impl RoomEvent {
    /// The envelope as published (JSON).
    pub fn encode(&self) -> Vec<u8> {
        // A derived Serialize of plain strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a published envelope.
    pub fn decode(bytes: &[u8]) -> Result<Self, BusError> {
        serde_json::from_slice(bytes).map_err(|e| BusError::Malformed(e.to_string()))
    }
}

/// One event as the bus ordered it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    pub offset: u64,
    /// The id it was published with, if any (gift id, or a node's id for a
    /// danmaku it already showed its own clients while the bus was away).
    pub msg_id: Option<String>,
    pub event: RoomEvent,
}

/// The bus's answer to a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub offset: u64,
    pub epoch: u64,
    /// The message id was seen before: nothing new was stored, `offset` is
    /// the first copy's.
    pub duplicate: bool,
}

/// Why a bus call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// The broker cannot be reached (or did not answer in time).
    #[error("room bus unavailable: {0}")]
    Unavailable(String),
    /// Events after the asked offset are no longer held (retention), or the
    /// offset is from another epoch.
    #[error("events after offset {after} are gone")]
    Gone { after: u64 },
    /// A stored message is not a Weir event.
    #[error("malformed bus message: {0}")]
    Malformed(String),
    /// The subscription ended (bus shut down).
    #[error("subscription closed")]
    Closed,
}

/// Publishing to room subjects: what the control plane needs.
#[async_trait]
pub trait BusPublisher: Send + Sync + fmt::Debug {
    /// Publishes `event` to `room`'s subject and returns once the bus stored
    /// it. With `msg_id`, a second publish of the same id within the bus's
    /// duplicate window stores nothing and answers the first offset.
    async fn publish(
        &self,
        room: &RoomId,
        event: &RoomEvent,
        msg_id: Option<&str>,
    ) -> Result<Published, BusError>;
}

/// A live feed of one room's events, in offset order.
#[async_trait]
pub trait BusSubscription: Send {
    /// The next event; [`BusError::Unavailable`] when the broker was lost
    /// (subscribe again from the last offset seen once it returns).
    async fn next(&mut self) -> Result<Delivered, BusError>;
}

/// Everything a node needs to carry rooms.
#[async_trait]
pub trait RoomBus: BusPublisher {
    /// The identity of the bus's store.
    async fn epoch(&self) -> Result<u64, BusError>;

    /// The room's events with an offset above `after`, oldest first, at most
    /// `max` of them. `after == 0` reads from the oldest held. Fails with
    /// [`BusError::Gone`] when `after > 0` and the event at `after` is no
    /// longer held, since then some events after it may be gone too.
    async fn read_after(
        &self,
        room: &RoomId,
        after: u64,
        max: usize,
    ) -> Result<Vec<Delivered>, BusError>;

    /// The offset of the room's newest event (0: none held).
    async fn last_offset(&self, room: &RoomId) -> Result<u64, BusError>;

    /// Every event of the room with an offset above `after`, then live ones.
    async fn subscribe(
        &self,
        room: &RoomId,
        after: u64,
    ) -> Result<Box<dyn BusSubscription>, BusError>;
}

/// Retention of a room's events on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Most events kept per room.
    pub max_per_room: u64,
    /// Oldest event kept, in seconds.
    pub max_age_s: u64,
    /// How long a message id is remembered to drop duplicates, in seconds.
    pub duplicate_window_s: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_per_room: 1000,
            max_age_s: 3600,
            duplicate_window_s: 120,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip_dotted_rooms() {
        let room = RoomId::parse("a.b-c_d").unwrap();
        let subject = room_subject(&room);
        assert_eq!(subject, "weir.v1.room.a~b-c_d");
        assert_eq!(subject_room(&subject), Some(room));
        assert_eq!(subject_room("weir.v1.room.a b"), None);
        assert_eq!(subject_room("other.a"), None);
    }

    #[test]
    fn envelope_round_trips_and_classes() {
        let e = RoomEvent {
            at_ms: 5,
            body: EventBody::Gift {
                gift_id: "g1".into(),
                from_user: "u".into(),
                to_user: "s".into(),
                gift: "rose".into(),
                count: 3,
                amount: 30,
            },
        };
        let bytes = e.encode();
        assert!(
            std::str::from_utf8(&bytes)
                .unwrap()
                .contains("\"type\":\"gift\"")
        );
        assert_eq!(RoomEvent::decode(&bytes).unwrap(), e);
        assert_eq!(e.body.class(), EventClass::Critical);
        assert!(matches!(
            RoomEvent::decode(b"{\"type\":\"nope\"}"),
            Err(BusError::Malformed(_))
        ));
    }
}
