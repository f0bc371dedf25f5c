//! The room bus on a node: the in-process bus of `weir dev` ([`LocalBus`]),
//! the JetStream bus of clusters ([`NatsBus`]), the per-room feeds that fan
//! events out to this node's clients ([`Hub`]) and the WebSocket endpoint
//! they connect to (`/rooms/{room}/events`, in `ws`; or a WebRTC session's
//! data channel, in `dc`), and go-live notices
//! for the users connected here ([`notices`]). The contract both
//! buses keep is `weir_protocol::bus`.

pub(crate) mod dc;
mod hub;
mod local;
mod nats;
pub mod notices;
pub(crate) mod ws;

pub use hub::{ChatLimits, Hub, HubConfig, Membership, Refusal, RoomFeed};
pub use local::LocalBus;
pub use nats::{CALL_TIMEOUT, NatsBus};
pub use notices::{FollowChecker, HttpFollowChecker};
