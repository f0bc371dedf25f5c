//! Weir's sans-IO forwarding core: rooms of WebRTC sessions built on str0m.
//!
//! The [`Sfu`] owns every session of one shard. The caller (the node's UDP
//! loop) feeds it input — datagrams and the passing of time — and commands
//! (accept a WHIP/WHEP offer, close a session), then drains [`Sfu::poll_output`]
//! until it returns [`Output::Timeout`]:
//!
//! ```text
//! loop {
//!     match sfu.poll_output(now) {
//!         Output::Transmit(t) => socket.send_to(&t.contents, t.destination),
//!         Output::Event(e) => metrics_and_logs(e),
//!         Output::Timeout(at) => { wait for a datagram or `at`; feed it; }
//!     }
//! }
//! ```
//!
//! Drain rule: after every `handle_input` or command, call `poll_output` until
//! it returns `Timeout`; the timeout is only valid once everything queued
//! before it has been taken. `poll_output` does work too: a frame's fan-out
//! to many viewers is made a chunk at a time as its datagrams are taken, so
//! the first viewers' copies can be sent before the last ones exist. The
//! core never reads a clock, never opens a socket and never spawns a thread,
//! so tests drive it with a virtual clock.

mod frame;
mod gop;
mod layers;
mod packetize;
mod rebase;
mod session;
mod sfu;
pub mod sim;

pub use frame::MediaFrame;
pub use gop::GopLimits;
pub use sfu::{
    Accepted, CloseReason, Counters, Event, Input, Output, Role, RoomSummary, Sfu, SfuConfig,
    SfuError, Transmit,
};
pub use str0m::format::Codec;
pub use str0m::media::{MediaKind, MediaTime};

/// Installs the process-wide crypto provider str0m uses (DTLS, SRTP). Call
/// once at start, before the first [`Sfu`] is built.
pub fn install_crypto_provider() {
    str0m::crypto::from_feature_flags().install_process_default();
}
