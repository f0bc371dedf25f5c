//! The room bus on a node: the in-process bus of `weir dev` ([`LocalBus`]),
//! the JetStream bus of clusters ([`NatsBus`]), the per-room feeds that fan
//! events out to this node's clients ([`Hub`]) and the WebSocket endpoint
//! they connect to (`/rooms/{room}/events`, in `ws`; or a WebRTC session's
//! data channel, in `dc`), go-live notices for the users connected here
//! ([`notices`]), and like totals persisted in batches through the control
//! plane ([`likes`]). The contract both
//! buses keep is `weir_protocol::bus`.

mod control;
pub(crate) mod dc;
mod hub;
pub mod likes;
mod local;
mod nats;
pub mod notices;
pub(crate) mod ws;

pub use hub::{ChatLimits, Hub, HubConfig, Membership, Refusal, RoomFeed};
pub use likes::{HttpLikeTotals, LikeTotals};
pub use local::LocalBus;
pub use nats::{CALL_TIMEOUT, NatsBus};
pub use notices::{FollowChecker, HttpFollowChecker};
