//! The relay's wire format between nodes (QUIC, `--relay`, default `:7400`):
//! a room's origin node sends its media frames to the edges that carry
//! viewers of the room, and edges send control messages back.
//!
//! Every message starts with [`VERSION`] and a type byte. Frames travel one
//! per QUIC datagram when they fit, else one per unidirectional stream (the
//! stream's whole content is the message). Control messages travel on the
//! connection's one bidirectional stream, each preceded by its length as a
//! big-endian `u16` ([`write_control`], [`ControlReader`]).
//!
//! Integers are big-endian. Decoding never panics: anything malformed is a
//! [`RelayError`].
//!
//! ```text
//! frame  = VERSION 0x10 kind codec flags generation:u64 seq:u32
//!          clock_rate:u32 time:u64 [rid_len:u8 rid] [capture_ntp:u64]
//!          [clock_offset:i64] payload…
//! flags  = bit 0 keyframe, bit 1 rid present, bit 2 capture time present,
//!          bit 3 clock offset present (only with bit 2)
//! subscribe        = VERSION 0x01 room_len:u8 room
//! keyframe request = VERSION 0x02 rid_len:u8 rid   (0: no layer)
//! room ended       = VERSION 0x03
//! refused          = VERSION 0x04 reason:u8
//! ```

use crate::RoomId;

/// First byte of every relay message; a peer of another version is refused.
pub const VERSION: u8 = 1;

/// Largest frame payload accepted (a 4K keyframe fits with room to spare).
pub const MAX_PAYLOAD: usize = 4 * 1024 * 1024;

/// Largest control message (they are tiny; this bounds what a peer can make
/// the reader buffer).
pub const MAX_CONTROL: usize = 1024;

/// Longest simulcast layer name (rid) carried.
pub const MAX_RID: usize = 32;

/// Largest encoded frame header: what a frame adds to its payload.
pub const MAX_FRAME_HEADER: usize = 2 + 3 + 8 + 4 + 4 + 8 + 1 + MAX_RID + 8 + 8;

const T_SUBSCRIBE: u8 = 0x01;
const T_KEYFRAME: u8 = 0x02;
const T_ENDED: u8 = 0x03;
const T_REFUSED: u8 = 0x04;
const T_FRAME: u8 = 0x10;

const F_KEY: u8 = 1;
const F_RID: u8 = 2;
const F_CAPTURE: u8 = 4;
const F_OFFSET: u8 = 8;

/// Why bytes are not a relay message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    #[error("relay message is empty")]
    Empty,
    #[error("relay message of version {0}, this node speaks {VERSION}")]
    Version(u8),
    #[error("unknown relay message type {0:#04x}")]
    UnknownType(u8),
    #[error("relay message ends early (reading {0})")]
    Truncated(&'static str),
    #[error("relay message has {0} trailing bytes")]
    Trailing(usize),
    #[error("bad {field} in relay message: {value}")]
    BadValue { field: &'static str, value: u64 },
    #[error("bad room id in relay message: {0}")]
    Room(#[from] crate::IdError),
    #[error("bad rid in relay message")]
    Rid,
    #[error("relay message of {0} bytes is too large")]
    TooLarge(usize),
}

/// Audio or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    Audio,
    Video,
}

/// The codecs the SFU forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FrameCodec {
    Opus,
    Pcmu,
    Pcma,
    Vp8,
    Vp9,
    H264,
    H265,
    Av1,
}

impl FrameCodec {
    fn to_byte(self) -> u8 {
        match self {
            Self::Opus => 1,
            Self::Pcmu => 2,
            Self::Pcma => 3,
            Self::Vp8 => 4,
            Self::Vp9 => 5,
            Self::H264 => 6,
            Self::H265 => 7,
            Self::Av1 => 8,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Opus,
            2 => Self::Pcmu,
            3 => Self::Pcma,
            4 => Self::Vp8,
            5 => Self::Vp9,
            6 => Self::H264,
            7 => Self::H265,
            8 => Self::Av1,
            _ => return None,
        })
    }
}

/// Why an origin refused a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefuseReason {
    /// The room is not published on this node.
    UnknownRoom,
    /// The node relays no more rooms or edges now.
    Overloaded,
    /// The first control message was not a subscription.
    Protocol,
    /// The subscription did not prove the cluster's node secret.
    Unauthorized,
}

impl RefuseReason {
    /// A short name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownRoom => "unknown_room",
            Self::Overloaded => "overloaded",
            Self::Protocol => "protocol",
            Self::Unauthorized => "unauthorized",
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            Self::UnknownRoom => 1,
            Self::Overloaded => 2,
            Self::Protocol => 3,
            Self::Unauthorized => 4,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::UnknownRoom,
            2 => Self::Overloaded,
            3 => Self::Protocol,
            4 => Self::Unauthorized,
            _ => return None,
        })
    }
}

/// Everything about a frame but its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub codec: FrameCodec,
    /// Media time in units of `clock_rate`.
    pub time: u64,
    /// Ticks per second of `time` (48 000 audio, 90 000 video); never 0.
    pub clock_rate: u32,
    pub keyframe: bool,
    /// Simulcast layer, when the publisher sends several.
    pub rid: Option<String>,
    /// When the frame was captured, NTP Q32.32 (abs-capture-time).
    pub capture_ntp: Option<u64>,
    /// The sender's capture clock offset, signed Q32.32 (only with a capture time).
    pub clock_offset: Option<i64>,
    /// Changes when the room's publisher at the origin changes: viewers
    /// resync at the new publisher's first keyframe.
    pub generation: u64,
    /// Per connection, one more per frame sent (datagrams may be lost or
    /// overtaken; the receiver counts gaps and stale frames).
    pub seq: u32,
}

/// Length of a subscription's proof.
pub const PROOF_LEN: usize = 32;

fn proof_mac(secret: &crate::stats::NodeSecret, room: &RoomId) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac;
    // An HMAC takes a key of any length.
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.expose().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC keys may have any length"));
    mac.update(b"weir relay subscribe v1\0");
    mac.update(room.as_str().as_bytes());
    mac
}

/// What an edge sends to subscribe to `room`: HMAC-SHA256 of the room under
/// the cluster's node secret (the secret itself never crosses the wire).
pub fn subscribe_proof(secret: &crate::stats::NodeSecret, room: &RoomId) -> [u8; PROOF_LEN] {
    use hmac::Mac;
    proof_mac(secret, room).finalize().into_bytes().into()
}

/// Whether `proof` is [`subscribe_proof`] of `room` under `secret`
/// (compared in constant time).
pub fn check_proof(secret: &crate::stats::NodeSecret, room: &RoomId, proof: &[u8]) -> bool {
    use hmac::Mac;
    proof_mac(secret, room).verify_slice(proof).is_ok()
}

/// One relay message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayMessage {
    /// Edge → origin, first on the control stream: send me this room.
    /// `proof` ([`subscribe_proof`]) shows the edge holds the cluster's
    /// node secret; an origin with a secret refuses subscriptions without.
    Subscribe {
        room: RoomId,
        proof: Option<[u8; PROOF_LEN]>,
    },
    /// Edge → origin: viewers need a keyframe (of layer `rid`).
    KeyframeRequest { rid: Option<String> },
    /// Origin → edge: the room is no longer published here.
    RoomEnded,
    /// Origin → edge: the subscription is refused; the origin closes.
    Refused(RefuseReason),
    /// Origin → edge: a media frame.
    Frame {
        header: FrameHeader,
        payload: Vec<u8>,
    },
}

fn valid_rid(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= MAX_RID
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl FrameHeader {
    /// Encodes the header followed by `payload` (one datagram or stream).
    pub fn encode(&self, payload: &[u8]) -> Result<Vec<u8>, RelayError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(RelayError::TooLarge(payload.len()));
        }
        if self.clock_rate == 0 {
            return Err(RelayError::BadValue {
                field: "clock rate",
                value: 0,
            });
        }
        let mut out = Vec::with_capacity(MAX_FRAME_HEADER + payload.len());
        let mut flags = 0;
        if self.keyframe {
            flags |= F_KEY;
        }
        if let Some(rid) = &self.rid {
            if !valid_rid(rid) {
                return Err(RelayError::Rid);
            }
            flags |= F_RID;
        }
        if self.capture_ntp.is_some() {
            flags |= F_CAPTURE;
            if self.clock_offset.is_some() {
                flags |= F_OFFSET;
            }
        }
        out.extend_from_slice(&[VERSION, T_FRAME]);
        out.push(match self.kind {
            FrameKind::Audio => 0,
            FrameKind::Video => 1,
        });
        out.push(self.codec.to_byte());
        out.push(flags);
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.clock_rate.to_be_bytes());
        out.extend_from_slice(&self.time.to_be_bytes());
        if let Some(rid) = &self.rid {
            out.push(rid.len() as u8);
            out.extend_from_slice(rid.as_bytes());
        }
        if let Some(ntp) = self.capture_ntp {
            out.extend_from_slice(&ntp.to_be_bytes());
            if let Some(off) = self.clock_offset {
                out.extend_from_slice(&off.to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        Ok(out)
    }
}

impl RelayMessage {
    /// Encodes a control message (not a frame: see [`FrameHeader::encode`]).
    pub fn encode(&self) -> Result<Vec<u8>, RelayError> {
        let mut out = vec![VERSION];
        match self {
            Self::Subscribe { room, proof } => {
                let room = room.as_str().as_bytes();
                let len = u8::try_from(room.len()).map_err(|_| RelayError::TooLarge(room.len()))?;
                out.extend_from_slice(&[T_SUBSCRIBE, len]);
                out.extend_from_slice(room);
                match proof {
                    Some(p) => {
                        out.push(PROOF_LEN as u8);
                        out.extend_from_slice(p);
                    }
                    None => out.push(0),
                }
            }
            Self::KeyframeRequest { rid } => {
                out.push(T_KEYFRAME);
                match rid {
                    Some(r) if valid_rid(r) => {
                        out.push(r.len() as u8);
                        out.extend_from_slice(r.as_bytes());
                    }
                    Some(_) => return Err(RelayError::Rid),
                    None => out.push(0),
                }
            }
            Self::RoomEnded => out.push(T_ENDED),
            Self::Refused(why) => out.extend_from_slice(&[T_REFUSED, why.to_byte()]),
            Self::Frame { header, payload } => return header.encode(payload),
        }
        Ok(out)
    }

    /// Decodes one whole message (a datagram, a stream's content, or one
    /// length-prefixed control message without its prefix).
    pub fn decode(buf: &[u8]) -> Result<Self, RelayError> {
        let mut r = Reader(buf);
        let version = r.u8("version").map_err(|_| RelayError::Empty)?;
        if version != VERSION {
            return Err(RelayError::Version(version));
        }
        let msg = match r.u8("type")? {
            T_SUBSCRIBE => {
                let len = r.u8("room length")?;
                let room = r.take(usize::from(len), "room")?;
                let room = std::str::from_utf8(room).map_err(|_| RelayError::BadValue {
                    field: "room",
                    value: 0,
                })?;
                let room = RoomId::parse(room)?;
                let proof = match r.u8("proof length")? {
                    0 => None,
                    n if usize::from(n) == PROOF_LEN => {
                        let mut p = [0u8; PROOF_LEN];
                        p.copy_from_slice(r.take(PROOF_LEN, "proof")?);
                        Some(p)
                    }
                    n => {
                        return Err(RelayError::BadValue {
                            field: "proof length",
                            value: u64::from(n),
                        });
                    }
                };
                Self::Subscribe { room, proof }
            }
            T_KEYFRAME => {
                let len = r.u8("rid length")?;
                let rid = if len == 0 { None } else { Some(r.rid(len)?) };
                Self::KeyframeRequest { rid }
            }
            T_ENDED => Self::RoomEnded,
            T_REFUSED => {
                let b = r.u8("reason")?;
                Self::Refused(RefuseReason::from_byte(b).ok_or(RelayError::BadValue {
                    field: "refuse reason",
                    value: u64::from(b),
                })?)
            }
            T_FRAME => return decode_frame(r),
            t => return Err(RelayError::UnknownType(t)),
        };
        if !r.0.is_empty() {
            return Err(RelayError::Trailing(r.0.len()));
        }
        Ok(msg)
    }
}

fn decode_frame(mut r: Reader<'_>) -> Result<RelayMessage, RelayError> {
    let kind = match r.u8("kind")? {
        0 => FrameKind::Audio,
        1 => FrameKind::Video,
        k => {
            return Err(RelayError::BadValue {
                field: "kind",
                value: u64::from(k),
            });
        }
    };
    let c = r.u8("codec")?;
    let codec = FrameCodec::from_byte(c).ok_or(RelayError::BadValue {
        field: "codec",
        value: u64::from(c),
    })?;
    let flags = r.u8("flags")?;
    if flags & !(F_KEY | F_RID | F_CAPTURE | F_OFFSET) != 0
        || (flags & F_OFFSET != 0 && flags & F_CAPTURE == 0)
    {
        return Err(RelayError::BadValue {
            field: "flags",
            value: u64::from(flags),
        });
    }
    let generation = r.u64("generation")?;
    let seq = r.u32("seq")?;
    let clock_rate = r.u32("clock rate")?;
    if clock_rate == 0 {
        return Err(RelayError::BadValue {
            field: "clock rate",
            value: 0,
        });
    }
    let time = r.u64("time")?;
    let rid = if flags & F_RID != 0 {
        let len = r.u8("rid length")?;
        Some(r.rid(len)?)
    } else {
        None
    };
    let capture_ntp = if flags & F_CAPTURE != 0 {
        Some(r.u64("capture time")?)
    } else {
        None
    };
    let clock_offset = if flags & F_OFFSET != 0 {
        Some(r.u64("clock offset")? as i64)
    } else {
        None
    };
    if r.0.len() > MAX_PAYLOAD {
        return Err(RelayError::TooLarge(r.0.len()));
    }
    Ok(RelayMessage::Frame {
        header: FrameHeader {
            kind,
            codec,
            time,
            clock_rate,
            keyframe: flags & F_KEY != 0,
            rid,
            capture_ntp,
            clock_offset,
            generation,
            seq,
        },
        payload: r.0.to_vec(),
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], RelayError> {
        if self.0.len() < n {
            return Err(RelayError::Truncated(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, RelayError> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, RelayError> {
        let mut b = [0; 4];
        b.copy_from_slice(self.take(4, what)?);
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, RelayError> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_be_bytes(b))
    }

    fn rid(&mut self, len: u8) -> Result<String, RelayError> {
        let raw = self.take(usize::from(len), "rid")?;
        match std::str::from_utf8(raw) {
            Ok(s) if valid_rid(s) => Ok(s.to_owned()),
            _ => Err(RelayError::Rid),
        }
    }
}

/// Appends `msg` to `out` with its `u16` length prefix (control stream).
pub fn write_control(msg: &RelayMessage, out: &mut Vec<u8>) -> Result<(), RelayError> {
    let body = msg.encode()?;
    if body.len() > MAX_CONTROL {
        return Err(RelayError::TooLarge(body.len()));
    }
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// Splits a control stream's bytes into messages as they arrive.
#[derive(Debug, Default)]
pub struct ControlReader {
    buf: Vec<u8>,
}

impl ControlReader {
    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `Ok(None)` until one has arrived. An error
    /// means the stream is unusable (the caller closes it).
    pub fn next_message(&mut self) -> Result<Option<RelayMessage>, RelayError> {
        if self.buf.len() < 2 {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([self.buf[0], self.buf[1]]));
        if len > MAX_CONTROL {
            return Err(RelayError::TooLarge(len));
        }
        if self.buf.len() < 2 + len {
            return Ok(None);
        }
        let msg = RelayMessage::decode(&self.buf[2..2 + len]);
        self.buf.drain(..2 + len);
        msg.map(Some)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn header() -> FrameHeader {
        FrameHeader {
            kind: FrameKind::Video,
            codec: FrameCodec::H264,
            time: 90_000 * 3600 * 30,
            clock_rate: 90_000,
            keyframe: true,
            rid: Some("h".into()),
            capture_ntp: Some(0xDEAD_BEEF_0000_0001),
            clock_offset: Some(-5),
            generation: 7,
            seq: u32::MAX,
        }
    }

    #[test]
    fn frames_round_trip() {
        let payload = vec![0, 0, 0, 1, 0x65, 1, 2, 3];
        let bytes = header().encode(&payload).unwrap();
        assert_eq!(
            RelayMessage::decode(&bytes).unwrap(),
            RelayMessage::Frame {
                header: header(),
                payload: payload.clone()
            }
        );
        let plain = FrameHeader {
            kind: FrameKind::Audio,
            codec: FrameCodec::Opus,
            time: 960,
            clock_rate: 48_000,
            keyframe: false,
            rid: None,
            capture_ntp: None,
            clock_offset: None,
            generation: 0,
            seq: 0,
        };
        let bytes = plain.encode(&[]).unwrap();
        assert_eq!(bytes.len(), 29, "the fixed header is compact");
        assert_eq!(
            RelayMessage::decode(&bytes).unwrap(),
            RelayMessage::Frame {
                header: plain,
                payload: Vec::new()
            }
        );
        assert!(header().encode(&payload).unwrap().len() <= MAX_FRAME_HEADER + payload.len());
    }

    #[test]
    fn control_messages_round_trip_through_the_stream_reader() {
        let msgs = [
            RelayMessage::Subscribe {
                room: RoomId::parse("room-1").unwrap(),
                proof: None,
            },
            RelayMessage::Subscribe {
                room: RoomId::parse("room-2").unwrap(),
                proof: Some([7; PROOF_LEN]),
            },
            RelayMessage::KeyframeRequest { rid: None },
            RelayMessage::KeyframeRequest {
                rid: Some("q".into()),
            },
            RelayMessage::RoomEnded,
            RelayMessage::Refused(RefuseReason::UnknownRoom),
            RelayMessage::Refused(RefuseReason::Unauthorized),
        ];
        let mut stream = Vec::new();
        for m in &msgs {
            write_control(m, &mut stream).unwrap();
        }
        // Arriving a byte at a time.
        let mut reader = ControlReader::default();
        let mut got = Vec::new();
        for b in &stream {
            reader.push(std::slice::from_ref(b));
            while let Some(m) = reader.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
    }

    #[test]
    fn subscription_proofs_bind_the_secret_and_the_room() {
        use crate::stats::NodeSecret;
        let secret = NodeSecret::generate();
        let other = NodeSecret::generate();
        let room = RoomId::parse("show").unwrap();
        let proof = subscribe_proof(&secret, &room);
        assert!(check_proof(&secret, &room, &proof));
        assert!(!check_proof(&other, &room, &proof));
        assert!(!check_proof(
            &secret,
            &RoomId::parse("show2").unwrap(),
            &proof
        ));
        assert!(!check_proof(&secret, &room, &proof[..31]));
        assert!(!check_proof(&secret, &room, &[]));
        // A proof of another length does not decode.
        let mut bytes = RelayMessage::Subscribe {
            room: room.clone(),
            proof: Some(proof),
        }
        .encode()
        .unwrap();
        let at = bytes.len() - PROOF_LEN - 1;
        bytes[at] = 5;
        bytes.truncate(at + 6);
        assert!(RelayMessage::decode(&bytes).is_err());
    }

    #[test]
    fn bad_values_are_refused_when_encoding() {
        let mut h = header();
        h.rid = Some("no spaces".into());
        assert_eq!(h.encode(&[]), Err(RelayError::Rid));
        let mut h = header();
        h.clock_rate = 0;
        assert!(h.encode(&[]).is_err());
        assert!(
            RelayMessage::KeyframeRequest {
                rid: Some(String::new())
            }
            .encode()
            .is_err()
        );
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        assert_eq!(RelayMessage::decode(&[]), Err(RelayError::Empty));
        assert_eq!(RelayMessage::decode(&[9, 1]), Err(RelayError::Version(9)));
        assert_eq!(
            RelayMessage::decode(&[VERSION, 0x7f]),
            Err(RelayError::UnknownType(0x7f))
        );
        assert!(matches!(
            RelayMessage::decode(&[VERSION, T_SUBSCRIBE, 5, b'a']),
            Err(RelayError::Truncated(_))
        ));
        assert!(matches!(
            RelayMessage::decode(&[VERSION, T_SUBSCRIBE, 3, b'a', b'/', b'b']),
            Err(RelayError::Room(_))
        ));
        assert_eq!(
            RelayMessage::decode(&[VERSION, T_ENDED, 0]),
            Err(RelayError::Trailing(1))
        );
        // Every prefix of a valid frame, and every single-byte corruption of
        // it, decodes to something or to an error.
        let good = header().encode(&[1, 2, 3]).unwrap();
        for n in 0..good.len() {
            let _ = RelayMessage::decode(&good[..n]);
        }
        for i in 0..good.len() {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut bad = good.clone();
                bad[i] = v;
                let _ = RelayMessage::decode(&bad);
            }
        }
        // A pseudo-random soup.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in 0..2000usize {
            let buf: Vec<u8> = (0..len % 97)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = RelayMessage::decode(&buf);
            let mut reader = ControlReader::default();
            reader.push(&buf);
            while let Ok(Some(_)) = reader.next_message() {}
        }
        // A control stream announcing an oversized message is unusable.
        let mut reader = ControlReader::default();
        reader.push(&[0xff, 0xff]);
        assert!(reader.next_message().is_err());
        // Offset without capture time.
        let mut bad = header().encode(&[]).unwrap();
        bad[4] = F_OFFSET;
        assert!(RelayMessage::decode(&bad).is_err());
    }
}
