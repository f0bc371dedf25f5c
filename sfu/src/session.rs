//! One WebRTC peer of the SFU: a publisher sending a room's media, or a
//! subscriber receiving it.

use std::collections::HashMap;
use std::time::Instant;

use str0m::Rtc;
use str0m::channel::ChannelId;
use str0m::format::CodecSpec;
use str0m::media::{MediaKind, Mid, Pt};
use weir_protocol::{RoomId, SessionId};

use crate::layers::LayerKey;
use crate::rebase::Rebase;
use crate::sfu::Role;

pub(crate) struct Session {
    pub(crate) id: SessionId,
    pub(crate) room: RoomId,
    pub(crate) role: Role,
    /// Token subject of whoever opened the session.
    pub(crate) owner: String,
    pub(crate) rtc: Rtc,
    /// When the offer was answered.
    pub(crate) created: Instant,
    pub(crate) connected: bool,
    pub(crate) next_timeout: Instant,
    /// Whether `next_timeout` has a live entry in the SFU's timer heap.
    pub(crate) timer_armed: bool,
    /// ICE username fragment the peer offered; a PATCH with another one is an
    /// ICE restart.
    pub(crate) remote_ufrag: Option<String>,
    /// The SDP answer, until it is handed to the caller.
    pub(crate) answer: Option<String>,

    /// Publisher: the media it sends, by mid.
    pub(crate) incoming: HashMap<Mid, MediaKind>,

    /// Subscriber: where each kind of media goes (first m-line of that kind).
    pub(crate) outgoing: Vec<(Mid, MediaKind)>,
    /// Subscriber: the video layer it gets (from a keyframe on); `None`
    /// until its video has started.
    pub(crate) layer: Option<LayerKey>,
    /// Subscriber: the layer it moves to at that layer's next keyframe.
    pub(crate) pending_layer: Option<LayerKey>,
    /// Subscriber: the layer it asked for at most (WHEP `?layer=`).
    pub(crate) max_layer: Option<LayerKey>,
    /// Subscriber: the latest bandwidth estimate towards it (TWCC).
    pub(crate) estimate_bps: Option<u64>,
    /// Subscriber: NACKs and PLIs it had sent at the last stats report, and
    /// video bytes sent to it then.
    pub(crate) reported: (u64, u64, u64),
    pub(crate) first_frame_sent: bool,
    /// Subscriber: frames written since it was last polled, which str0m
    /// has yet to packetize.
    pub(crate) unpacketized: u32,
    pub(crate) rebase_audio: Rebase,
    pub(crate) rebase_video: Rebase,
    /// Subscriber: the payload type each publisher payload type (and its
    /// codec parameters) maps to here.
    pub(crate) pt_cache: Vec<((Pt, CodecSpec), Pt)>,
    /// Open data channels, by label (the peer's first [`MAX_CHANNELS`]).
    pub(crate) channels: Vec<(ChannelId, String)>,
}

/// Data channels a session may have open; more are ignored.
pub(crate) const MAX_CHANNELS: usize = 8;

impl Session {
    pub(crate) fn new(
        id: SessionId,
        room: RoomId,
        role: Role,
        owner: String,
        rtc: Rtc,
        now: Instant,
        remote_ufrag: Option<String>,
    ) -> Self {
        Self {
            id,
            room,
            role,
            owner,
            rtc,
            created: now,
            connected: false,
            next_timeout: now,
            timer_armed: false,
            remote_ufrag,
            answer: None,
            incoming: HashMap::new(),
            outgoing: Vec::new(),
            layer: None,
            pending_layer: None,
            max_layer: None,
            estimate_bps: None,
            reported: (0, 0, 0),
            first_frame_sent: false,
            unpacketized: 0,
            rebase_audio: Rebase::default(),
            rebase_video: Rebase::default(),
            pt_cache: Vec::new(),
            channels: Vec::new(),
        }
    }

    pub(crate) fn channel_label(&self, id: ChannelId) -> Option<&str> {
        self.channels
            .iter()
            .find(|(c, _)| *c == id)
            .map(|(_, l)| l.as_str())
    }

    pub(crate) fn out_mid(&self, kind: MediaKind) -> Option<Mid> {
        self.outgoing
            .iter()
            .find(|(_, k)| *k == kind)
            .map(|(mid, _)| *mid)
    }
}
