//! Packetizing a frame once for every viewer of its layer.
//!
//! str0m's frame API packetizes a frame again for each viewer it is written
//! to. Viewers' sessions run in str0m's RTP mode instead: the SFU cuts each
//! frame into RTP payloads once, when it arrives, and hands every viewer the
//! same shared payloads with that viewer's own sequence numbers, timestamps
//! and (VP8) picture ids. Only the header, the encryption and the send are
//! per viewer.

use std::sync::Arc;

use str0m::format::Codec;
use str0m::unversioned::{H264Packetizer, OpusPacketizer, Packetizer as _};

use crate::frame::MediaFrame;

/// A frame with its RTP payloads. The marker bit goes on the last payload of
/// a video frame.
#[derive(Debug, Clone)]
pub(crate) struct Packetized {
    pub(crate) frame: MediaFrame,
    pub(crate) payloads: Arc<[Arc<[u8]>]>,
    /// VP8: the picture id every payload's descriptor carries (15 bits).
    pub(crate) picture_id: Option<u16>,
}

/// A layer's (or a room's audio) packetizer, kept across frames: H.264
/// remembers parameter sets, VP8 counts pictures.
#[derive(Debug)]
pub(crate) enum Packetizer {
    H264(H264Packetizer),
    Vp8 { next_picture_id: u16 },
    Opus,
}

/// VP8 payload descriptor: X, then I, then a 15-bit picture id (RFC 7741).
const VP8_DESCRIPTOR: usize = 4;

impl Packetizer {
    fn new(codec: Codec) -> Option<Self> {
        match codec {
            Codec::H264 => Some(Self::H264(H264Packetizer::default())),
            Codec::Vp8 => Some(Self::Vp8 { next_picture_id: 0 }),
            Codec::Opus => Some(Self::Opus),
            _ => None,
        }
    }

    fn codec(&self) -> Codec {
        match self {
            Self::H264(_) => Codec::H264,
            Self::Vp8 { .. } => Codec::Vp8,
            Self::Opus => Codec::Opus,
        }
    }

    /// Cuts `frame` into payloads of at most `mtu` bytes, with the packetizer
    /// in `slot` (a new one when the codec changed: another publisher took
    /// the room over). A frame that cannot be packetized gets no payloads.
    pub(crate) fn run(slot: &mut Option<Self>, frame: &MediaFrame, mtu: usize) -> Packetized {
        if slot.as_ref().is_none_or(|p| p.codec() != frame.codec) {
            *slot = Self::new(frame.codec);
        }
        let mut picture_id = None;
        let chunks = match slot {
            Some(Self::H264(p)) => p.packetize(mtu, &frame.data).unwrap_or_else(|e| {
                tracing::debug!(error = %e, "H.264 frame not packetized");
                Vec::new()
            }),
            Some(Self::Opus) => OpusPacketizer
                .packetize(mtu, &frame.data)
                .unwrap_or_default(),
            Some(Self::Vp8 { next_picture_id }) => {
                let id = *next_picture_id;
                *next_picture_id = (id + 1) & 0x7fff;
                picture_id = Some(id);
                vp8(mtu, id, &frame.data)
            }
            None => Vec::new(),
        };
        Packetized {
            frame: frame.clone(),
            payloads: chunks.into_iter().map(Arc::from).collect(),
            picture_id,
        }
    }
}

/// VP8 payloads (RFC 7741) that always carry a 15-bit picture id, so that a
/// viewer's picture ids can be rewritten in place to stay continuous across
/// layer switches and takeovers.
fn vp8(mtu: usize, picture_id: u16, frame: &[u8]) -> Vec<Vec<u8>> {
    let Some(room) = mtu.checked_sub(VP8_DESCRIPTOR).filter(|r| *r > 0) else {
        return Vec::new();
    };
    frame
        .chunks(room)
        .enumerate()
        .map(|(i, chunk)| {
            let mut p = Vec::with_capacity(VP8_DESCRIPTOR + chunk.len());
            // X, and S on the first packet of the frame (partition 0).
            p.push(if i == 0 { 0x90 } else { 0x80 });
            // I: a picture id follows.
            p.push(0x80);
            // M: the 15-bit form.
            p.push(0x80 | ((picture_id >> 8) as u8 & 0x7f));
            p.push(picture_id as u8);
            p.extend_from_slice(chunk);
            p
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use str0m::media::{MediaKind, MediaTime};
    use str0m::rtp::Vp8Descriptor;

    use super::*;

    fn frame(codec: Codec, data: Vec<u8>) -> MediaFrame {
        #[allow(clippy::disallowed_methods)] // a timestamp no test reads
        let now = Instant::now();
        MediaFrame {
            kind: if codec == Codec::Opus {
                MediaKind::Audio
            } else {
                MediaKind::Video
            },
            codec,
            params: None,
            time: MediaTime::from_90khz(0),
            network_time: now,
            keyframe: true,
            rid: None,
            capture_time: None,
            data: Arc::from(data),
        }
    }

    #[test]
    fn vp8_payloads_carry_the_frame_and_a_15_bit_picture_id() {
        let data: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let mut slot = None;
        let mut ids = Vec::new();
        for _ in 0..130 {
            let p = Packetizer::run(&mut slot, &frame(Codec::Vp8, data.clone()), 1000);
            assert_eq!(p.payloads.len(), 3, "2500 bytes in 996-byte pieces");
            let mut joined = Vec::new();
            for (i, payload) in p.payloads.iter().enumerate() {
                assert!(payload.len() <= 1000);
                let d = Vp8Descriptor::parse(payload).expect("descriptor parses");
                assert_eq!(d.picture_id(), p.picture_id);
                assert_eq!(payload[0] & 0x10 != 0, i == 0, "S only on the first");
                // The 15-bit form from the first picture on, so a rewrite
                // to any id fits in place.
                assert_ne!(payload[2] & 0x80, 0);
                d.patch().picture_id(0x7fff).build().expect("any id fits");
                joined.extend_from_slice(&payload[VP8_DESCRIPTOR..]);
            }
            assert_eq!(joined, data);
            ids.push(p.picture_id.expect("VP8 has picture ids"));
        }
        assert_eq!(ids, (0..130).collect::<Vec<u16>>());
    }

    #[test]
    fn a_codec_change_starts_a_new_packetizer() {
        let mut slot = None;
        Packetizer::run(&mut slot, &frame(Codec::Vp8, vec![1; 10]), 1000);
        Packetizer::run(&mut slot, &frame(Codec::Vp8, vec![1; 10]), 1000);
        let h264 = vec![0, 0, 0, 1, 0x65, 1, 2, 3];
        let p = Packetizer::run(&mut slot, &frame(Codec::H264, h264), 1000);
        assert_eq!(p.picture_id, None);
        assert_eq!(&p.payloads[0][..], &[0x65, 1, 2, 3]);
        let p = Packetizer::run(&mut slot, &frame(Codec::Vp8, vec![1; 10]), 1000);
        assert_eq!(p.picture_id, Some(0), "VP8 counts again from a new start");
        let p = Packetizer::run(&mut slot, &frame(Codec::Opus, vec![7; 80]), 1000);
        assert_eq!(p.payloads.len(), 1);
        assert_eq!(p.payloads[0].len(), 80);
    }

    #[test]
    fn empty_frames_and_tiny_mtus_give_no_payloads() {
        let mut slot = None;
        assert!(
            Packetizer::run(&mut slot, &frame(Codec::Vp8, vec![]), 1000)
                .payloads
                .is_empty()
        );
        assert!(
            Packetizer::run(&mut slot, &frame(Codec::Vp8, vec![1; 9]), 4)
                .payloads
                .is_empty()
        );
        let mut slot = None;
        assert!(
            Packetizer::run(&mut slot, &frame(Codec::H264, vec![]), 1000)
                .payloads
                .is_empty()
        );
    }
}
