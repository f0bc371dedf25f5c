//! One WebRTC peer of the SFU: a publisher sending a room's media, or a
//! subscriber receiving it.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use str0m::Rtc;
use str0m::channel::ChannelId;
use str0m::format::{Codec, CodecSpec, PayloadParams};
use str0m::media::{Frequency, MediaKind, Mid, Pt};
use weir_protocol::{RoomId, SessionId};

use crate::frame::MediaFrame;
use crate::layers::LayerKey;
use crate::packetize::Packetized;
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
    /// Subscriber: packets were written since it was last polled, which
    /// str0m sends once it is given a timeout.
    pub(crate) written: bool,
    /// Subscriber: frames forwarded to it and not yet written, each with its
    /// timeline's generation. They are written right before the session is
    /// polled, so its state is read once per fan-out, not twice.
    pub(crate) queued: Vec<(Arc<Packetized>, u64)>,
    /// Subscriber: the next RTP sequence number of its audio and its video
    /// (extended: the rollover counter lives above the low 16 bits).
    pub(crate) next_seq: [u64; 2],
    /// Subscriber: the VP8 picture ids it has been sent.
    pub(crate) vp8: Vp8Ids,
    pub(crate) rebase_audio: Rebase,
    pub(crate) rebase_video: Rebase,
    /// Subscriber: the payload type (and its clock) each publisher payload
    /// type, or each codec of a non-WebRTC source, maps to here.
    pub(crate) pt_cache: Vec<(PtKey, (Pt, Frequency))>,
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
            next_seq: first_seqs(&id),
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
            written: false,
            queued: Vec::new(),
            vp8: Vp8Ids::default(),
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

    /// This viewer's payload type for `frame` on `mid`, with its clock.
    pub(crate) fn pt_for(&mut self, mid: Mid, frame: &MediaFrame) -> Option<(Pt, Frequency)> {
        let key = match frame.params {
            Some(p) => PtKey::Params(p.pt(), p.spec()),
            None => PtKey::Codec(frame.codec),
        };
        // Matching scores every payload type of the viewer: once per
        // publisher payload type is enough.
        if let Some((_, found)) = self.pt_cache.iter().find(|(k, _)| *k == key) {
            return Some(*found);
        }
        let config = self.rtc.codec_config();
        let found = match frame.params {
            Some(params) => config.match_params(params),
            None => {
                let remote = self.rtc.media(mid)?.remote_pts();
                source_params(
                    config.params().iter().filter(|p| remote.contains(&p.pt())),
                    frame.codec,
                )
            }
        }
        .map(|p| (p.pt(), p.spec().clock_rate))?;
        if self.pt_cache.len() < 8 {
            self.pt_cache.push((key, found));
        }
        Some(found)
    }
}

/// What a viewer's payload type is looked up by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PtKey {
    /// A WebRTC publisher's payload type and codec parameters.
    Params(Pt, CodecSpec),
    /// A non-WebRTC source's codec.
    Codec(Codec),
}

/// The viewer's payload type for a source's codec: for H.264 one with
/// packetization mode 1 (what every browser decodes), else the first match.
fn source_params<'a>(
    params: impl Iterator<Item = &'a PayloadParams>,
    codec: Codec,
) -> Option<&'a PayloadParams> {
    let mut fallback = None;
    for p in params.filter(|p| p.spec().codec == codec) {
        if codec != Codec::H264 || p.spec().format.packetization_mode == Some(1) {
            return Some(p);
        }
        fallback.get_or_insert(p);
    }
    fallback
}

/// Where a viewer's audio and video sequence numbers start: unpredictable
/// (RFC 3550), and low enough that the rollover counter starts at 0.
fn first_seqs(id: &SessionId) -> [u64; 2] {
    let mut h = DefaultHasher::new();
    id.hash(&mut h);
    let v = h.finish();
    [v & 0x7fff, (v >> 16) & 0x7fff]
}

/// A viewer's VP8 picture ids: the layer's own, shifted so that they go on
/// by one across a layer switch or a new publisher (each starts its own
/// count), as RFC 7741 asks of a sender.
#[derive(Debug, Default)]
pub(crate) struct Vp8Ids {
    /// The timeline (publisher and layer) the offset belongs to.
    generation: u64,
    offset: u16,
    last: Option<u16>,
}

impl Vp8Ids {
    /// The picture id to send for the layer's `id` on timeline `generation`.
    pub(crate) fn map(&mut self, generation: u64, id: u16) -> u16 {
        if generation != self.generation {
            self.generation = generation;
            self.offset = match self.last {
                None => 0,
                Some(last) => last.wrapping_add(1).wrapping_sub(id) & 0x7fff,
            };
        }
        let out = id.wrapping_add(self.offset) & 0x7fff;
        self.last = Some(out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vp8_picture_ids_go_on_by_one_across_timelines() {
        let mut ids = Vp8Ids::default();
        assert_eq!(ids.map(17, 40), 40, "the first timeline passes through");
        assert_eq!(ids.map(17, 41), 41);
        // A layer switch: that layer is at another count.
        assert_eq!(ids.map(18, 9000), 42);
        assert_eq!(ids.map(18, 9001), 43);
        // A new publisher counting from 0, then wrapping at 15 bits.
        assert_eq!(ids.map(33, 0), 44);
        let mut ids = Vp8Ids::default();
        ids.map(1, 0x7ffe);
        assert_eq!(ids.map(2, 5), 0x7fff);
        assert_eq!(ids.map(2, 6), 0, "15-bit wrap");
    }

    #[test]
    fn first_sequence_numbers_leave_the_rollover_counter_at_zero() {
        for _ in 0..100 {
            let [a, v] = first_seqs(&SessionId::random());
            assert!(a < 0x8000 && v < 0x8000);
        }
    }
}
