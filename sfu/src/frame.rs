//! The unit the SFU forwards: one depacketized media frame, from a WebRTC
//! publisher or from a non-WebRTC source (SRT ingest, a transcoder).

use std::sync::Arc;
use std::time::Instant;

use str0m::format::{Codec, PayloadParams};
use str0m::media::{MediaData, MediaKind, MediaTime, Rid};
use str0m::rtp::AbsCaptureTime;

/// A media frame. H.264 is an Annex-B access unit (start codes), VP8 and
/// Opus are the codec's own frame.
#[derive(Debug, Clone)]
pub struct MediaFrame {
    pub kind: MediaKind,
    pub codec: Codec,
    /// Codec parameters of a WebRTC publisher, matched to each viewer's
    /// payload types; `None` for other sources (matched by codec).
    pub params: Option<PayloadParams>,
    /// Media time (48 kHz audio, 90 kHz video).
    pub time: MediaTime,
    /// When the frame arrived (the sender-report wall clock).
    pub network_time: Instant,
    pub keyframe: bool,
    /// Simulcast layer, when the publisher sends several.
    pub rid: Option<Rid>,
    /// When the frame was captured (abs-capture-time), carried through to
    /// viewers so end-to-end delay can be measured.
    pub capture_time: Option<AbsCaptureTime>,
    pub data: Arc<[u8]>,
}

impl MediaFrame {
    pub(crate) fn from_media_data(kind: MediaKind, d: &MediaData) -> Self {
        Self {
            kind,
            codec: d.params.spec().codec,
            params: Some(d.params),
            time: d.time,
            network_time: d.network_time,
            keyframe: d.is_keyframe(),
            rid: d.rid,
            capture_time: d.ext_vals.abs_capture_time,
            data: d.data.clone(),
        }
    }
}
