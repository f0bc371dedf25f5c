//! MPEG transport stream demultiplexer: PAT/PMT, PES reassembly, PTS/DTS,
//! continuity and clock discontinuities. Sans-IO: bytes in, elementary
//! stream packets out; counters for what was damaged.
//!
//! Written here rather than taken from `mpeg2ts-reader` (the maintained
//! crate for this): its consumer traits report continuity errors but not
//! sync loss, transport errors, malformed sections or PCR jumps, which the
//! node must count and act on (`weir_ts_*` metrics, a timeline rebase on
//! discontinuity), and its generic demux context is more machinery than the
//! four stream types ingest takes. This parser checks every length against
//! the bytes present, verifies section CRCs and bounds every buffer, so
//! nothing a caller sends makes it panic or grow without limit.

use std::collections::HashMap;

/// Size of a transport packet.
pub const PACKET_SIZE: usize = 188;
const SYNC: u8 = 0x47;
const PID_PAT: u16 = 0x0000;
const PID_NULL: u16 = 0x1fff;
/// Largest PES kept (a 4K keyframe fits); larger ones are dropped and counted.
const MAX_PES: usize = 8 * 1024 * 1024;
/// Largest PSI section (the standard allows 1021 bytes after the header).
const MAX_SECTION: usize = 1024 + 3;
/// Most elementary streams followed per program.
const MAX_STREAMS: usize = 16;
/// 33-bit PTS/DTS/PCR-base clock.
const WRAP: i64 = 1 << 33;
/// A PCR that moves by more than this (or backwards) is a discontinuity.
const MAX_PCR_STEP: i64 = 90_000; // 1 s at 90 kHz
/// A DTS that moves by more than this (or backwards by more than this) too.
const MAX_DTS_STEP: i64 = 5 * 90_000;

/// What an elementary stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// H.264 / AVC (stream type 0x1B).
    H264,
    /// H.265 / HEVC (stream type 0x24).
    H265,
    /// AAC in ADTS (stream type 0x0F).
    Aac,
    /// Opus (private data 0x06 with an `Opus` registration descriptor).
    Opus,
}

impl StreamKind {
    /// Name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::H264 => "h264",
            StreamKind::H265 => "h265",
            StreamKind::Aac => "aac",
            StreamKind::Opus => "opus",
        }
    }
}

/// One reassembled PES payload of a known stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pes {
    /// The stream's PID.
    pub pid: u16,
    /// What it carries.
    pub kind: StreamKind,
    /// Presentation time, 90 kHz, unwrapped past 33 bits (may start anywhere).
    pub pts: Option<i64>,
    /// Decode time, 90 kHz, unwrapped; `None` when equal to the PTS.
    pub dts: Option<i64>,
    /// Increases at every discontinuity the demuxer saw (clock jump,
    /// continuity error on this stream, discontinuity indicator): the
    /// consumer rebases its timeline when it changes.
    pub epoch: u32,
    /// The elementary stream bytes.
    pub data: Vec<u8>,
    /// Which call of [`TsDemuxer::push`] (counted from 1) brought its first
    /// byte: lets the caller tell when the PES started to arrive.
    pub started: u64,
}

impl Pes {
    /// DTS if present, else PTS.
    pub fn decode_time(&self) -> Option<i64> {
        self.dts.or(self.pts)
    }
}

/// What went wrong so far (monotonic counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DemuxStats {
    /// Transport packets parsed.
    pub packets: u64,
    /// Packets skipped as damaged: transport error flag, bad adaptation
    /// field, bad PES header, oversized PES, lost sync (once per resync).
    pub corrupt_packets: u64,
    /// Continuity counter gaps on followed PIDs.
    pub continuity_errors: u64,
    /// Clock jumps and signalled discontinuities.
    pub discontinuities: u64,
    /// PSI sections refused (bad CRC, bad lengths).
    pub bad_sections: u64,
    /// PES delivered.
    pub pes: u64,
}

#[derive(Debug)]
struct EsState {
    kind: StreamKind,
    cc: Option<u8>,
    /// PES under reassembly: header parsed, payload growing.
    pending: Option<PendingPes>,
    last_dts: Option<i64>,
}

#[derive(Debug)]
struct PendingPes {
    /// The demuxer's epoch when the PES started.
    epoch: u32,
    /// The push that brought its start.
    started: u64,
    pts: Option<i64>,
    dts: Option<i64>,
    /// Expected payload length when the PES header gives one.
    expected: Option<usize>,
    data: Vec<u8>,
}

#[derive(Debug, Default)]
struct Section {
    cc: Option<u8>,
    buf: Vec<u8>,
    /// Version of the last table applied, to skip repeats cheaply.
    applied: Option<(u8, u32)>,
}

/// The demultiplexer of one transport stream.
#[derive(Debug, Default)]
pub struct TsDemuxer {
    /// Bytes of a packet split across inputs.
    carry: Vec<u8>,
    in_sync: bool,
    /// Bytes thrown away while looking for sync, not yet counted.
    skipped: usize,
    pat: Section,
    pmt_pid: Option<u16>,
    pmt: Section,
    pcr_pid: Option<u16>,
    streams: HashMap<u16, EsState>,
    last_pcr: Option<i64>,
    /// Reference for unwrapping 33-bit times (the latest time seen).
    last_time: Option<i64>,
    epoch: u32,
    stats: DemuxStats,
    /// Calls of `push` so far.
    pushes: u64,
}

/// CRC-32/MPEG-2 of PSI sections.
fn crc32_mpeg2(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04c1_1db7
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A 33-bit timestamp from the 5-byte PES encoding.
fn read_timestamp(b: &[u8]) -> Option<u64> {
    if b.len() < 5 || b[0] & 1 != 1 || b[2] & 1 != 1 || b[4] & 1 != 1 {
        return None; // marker bits missing: not a timestamp
    }
    Some(
        (u64::from(b[0] >> 1) & 0x07) << 30
            | u64::from(b[1]) << 22
            | (u64::from(b[2]) >> 1) << 15
            | u64::from(b[3]) << 7
            | u64::from(b[4]) >> 1,
    )
}

impl TsDemuxer {
    /// A demuxer waiting for its first PAT.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counters so far.
    pub fn stats(&self) -> DemuxStats {
        self.stats
    }

    /// The streams the current PMT announced, by PID.
    pub fn streams(&self) -> impl Iterator<Item = (u16, StreamKind)> + '_ {
        self.streams.iter().map(|(pid, s)| (*pid, s.kind))
    }

    /// Feeds bytes (any split: SRT carries 1316-byte messages, but nothing
    /// here relies on it) and appends every completed PES to `out`.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<Pes>) {
        self.pushes += 1;
        if !self.carry.is_empty() {
            let need = PACKET_SIZE - self.carry.len();
            let take = need.min(bytes.len());
            self.carry.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.carry.len() < PACKET_SIZE {
                return;
            }
            let carry = std::mem::take(&mut self.carry);
            if carry[0] == SYNC {
                self.packet(&carry, out);
            } else {
                self.lose_sync();
            }
        }
        while !bytes.is_empty() {
            if bytes[0] != SYNC {
                self.lose_sync();
                // Resynchronize on a sync byte followed by another one a
                // packet later (or at the end of what we have).
                let found = (1..bytes.len()).find(|&i| {
                    bytes[i] == SYNC && bytes.get(i + PACKET_SIZE).is_none_or(|&b| b == SYNC)
                });
                let skip = found.unwrap_or(bytes.len());
                self.skip(skip);
                match found {
                    Some(i) => bytes = &bytes[i..],
                    None => return,
                }
            }
            if bytes.len() < PACKET_SIZE {
                self.carry.extend_from_slice(bytes);
                return;
            }
            let (packet, rest) = bytes.split_at(PACKET_SIZE);
            self.packet(packet, out);
            bytes = rest;
        }
    }

    /// Emits every PES still under reassembly (end of stream).
    pub fn flush(&mut self, out: &mut Vec<Pes>) {
        let pids: Vec<u16> = self.streams.keys().copied().collect();
        for pid in pids {
            self.finish_pes(pid, out);
        }
    }

    /// Garbage that never formed a packet counts as one corrupt packet
    /// per packet's worth of bytes.
    fn skip(&mut self, n: usize) {
        self.skipped += n;
        let packets = self.skipped / PACKET_SIZE;
        self.stats.corrupt_packets += packets as u64;
        self.skipped %= PACKET_SIZE;
    }

    fn lose_sync(&mut self) {
        if self.in_sync {
            self.stats.corrupt_packets += 1;
        }
        self.in_sync = false;
        self.carry.clear();
    }

    fn packet(&mut self, p: &[u8], out: &mut Vec<Pes>) {
        self.in_sync = true;
        self.stats.packets += 1;
        if p[1] & 0x80 != 0 {
            // Transport error indicator: the sender's own demodulator or
            // relay knows this packet is damaged.
            self.stats.corrupt_packets += 1;
            return;
        }
        let pusi = p[1] & 0x40 != 0;
        let pid = (u16::from(p[1] & 0x1f) << 8) | u16::from(p[2]);
        if pid == PID_NULL {
            return;
        }
        let scrambled = p[3] & 0xc0 != 0;
        let afc = (p[3] >> 4) & 0x03;
        let cc = p[3] & 0x0f;
        let mut payload_start = 4;
        let mut discontinuity_flag = false;
        if afc == 0 {
            self.stats.corrupt_packets += 1;
            return;
        }
        if afc & 0x02 != 0 {
            let len = usize::from(p[4]);
            let max = if afc == 0x02 { 183 } else { 182 };
            if len > max {
                self.stats.corrupt_packets += 1;
                return;
            }
            if len > 0 {
                let flags = p[5];
                discontinuity_flag = flags & 0x80 != 0;
                if flags & 0x10 != 0 && len >= 7 && Some(pid) == self.pcr_pid {
                    let base = (u64::from(p[6]) << 25)
                        | (u64::from(p[7]) << 17)
                        | (u64::from(p[8]) << 9)
                        | (u64::from(p[9]) << 1)
                        | (u64::from(p[10]) >> 7);
                    self.on_pcr(base, discontinuity_flag);
                }
            }
            payload_start = 5 + len;
        }
        let has_payload = afc & 0x01 != 0 && payload_start < PACKET_SIZE;
        if !has_payload {
            return;
        }
        if scrambled {
            // Scrambled payloads cannot be used; count, keep the stream.
            self.stats.corrupt_packets += 1;
            return;
        }
        let payload = &p[payload_start..];
        if pid == PID_PAT || Some(pid) == self.pmt_pid {
            self.psi(pid, pusi, cc, discontinuity_flag, payload, out);
        } else if self.streams.contains_key(&pid) {
            self.es(pid, pusi, cc, discontinuity_flag, payload, out);
        }
    }

    fn on_pcr(&mut self, base: u64, signalled: bool) {
        let pcr = self.unwrap_time(base);
        if let Some(last) = self.last_pcr {
            let step = pcr - last;
            if signalled || !(0..=MAX_PCR_STEP).contains(&step) {
                self.discontinuity();
                // The next time stamps belong to the new clock: let them
                // unwrap against it rather than the old one.
                self.last_time = Some(pcr);
            }
        }
        self.last_pcr = Some(pcr);
    }

    fn discontinuity(&mut self) {
        self.stats.discontinuities += 1;
        self.epoch = self.epoch.wrapping_add(1);
        for s in self.streams.values_mut() {
            s.last_dts = None;
        }
    }

    /// Extends a 33-bit time to the 64-bit value nearest the latest one seen.
    fn unwrap_time(&mut self, raw: u64) -> i64 {
        let raw = (raw & (WRAP as u64 - 1)) as i64;
        let t = match self.last_time {
            None => raw,
            Some(last) => {
                let base = last - last.rem_euclid(WRAP);
                [base - WRAP + raw, base + raw, base + WRAP + raw]
                    .into_iter()
                    .min_by_key(|c| (c - last).abs())
                    .unwrap_or(raw)
            }
        };
        self.last_time = Some(t);
        t
    }

    /// Continuity check: `Ok(true)` to use the packet, `Ok(false)` for a
    /// duplicate to ignore, `Err(())` after a gap.
    fn check_cc(last: &mut Option<u8>, cc: u8, signalled: bool) -> Result<bool, ()> {
        let prev = last.replace(cc);
        match prev {
            None => Ok(true),
            Some(_) if signalled => Ok(true),
            Some(p) if p == cc => Ok(false),
            Some(p) if (p + 1) & 0x0f == cc => Ok(true),
            Some(_) => Err(()),
        }
    }

    fn psi(
        &mut self,
        pid: u16,
        pusi: bool,
        cc: u8,
        signalled: bool,
        payload: &[u8],
        out: &mut Vec<Pes>,
    ) {
        let section = if pid == PID_PAT {
            &mut self.pat
        } else {
            &mut self.pmt
        };
        match Self::check_cc(&mut section.cc, cc, signalled) {
            Ok(true) => {}
            Ok(false) => return,
            Err(()) => {
                self.stats.continuity_errors += 1;
                section.buf.clear();
            }
        }
        if pusi {
            let pointer = usize::from(payload[0]);
            let Some(start) = payload.get(1 + pointer..) else {
                self.stats.bad_sections += 1;
                section.buf.clear();
                return;
            };
            section.buf.clear();
            section.buf.extend_from_slice(start);
        } else if section.buf.is_empty() {
            return; // no section start seen yet
        } else {
            section.buf.extend_from_slice(payload);
        }
        if section.buf.len() < 3 {
            return;
        }
        let len = 3 + ((usize::from(section.buf[1] & 0x0f) << 8) | usize::from(section.buf[2]));
        if !(3 + 9..=MAX_SECTION).contains(&len) {
            self.stats.bad_sections += 1;
            section.buf.clear();
            return;
        }
        if section.buf.len() < len {
            return;
        }
        let data = std::mem::take(&mut section.buf);
        let data = &data[..len];
        if crc32_mpeg2(data) != 0 {
            self.stats.bad_sections += 1;
            return;
        }
        if pid == PID_PAT {
            self.apply_pat(data);
        } else {
            self.apply_pmt(data, out);
        }
    }

    fn apply_pat(&mut self, s: &[u8]) {
        if s[0] != 0x00 {
            return;
        }
        let version = (s[5] >> 1) & 0x1f;
        let crc = u32::from_be_bytes([
            s[s.len() - 4],
            s[s.len() - 3],
            s[s.len() - 2],
            s[s.len() - 1],
        ]);
        if self.pat.applied == Some((version, crc)) {
            return;
        }
        self.pat.applied = Some((version, crc));
        // The first program with a number other than 0 (0 is the NIT).
        let entries = &s[8..s.len() - 4];
        let pmt = entries.chunks_exact(4).find_map(|e| {
            let program = u16::from_be_bytes([e[0], e[1]]);
            (program != 0).then(|| (u16::from(e[2] & 0x1f) << 8) | u16::from(e[3]))
        });
        if pmt != self.pmt_pid {
            self.pmt_pid = pmt;
            self.pmt = Section::default();
        }
    }

    fn apply_pmt(&mut self, s: &[u8], out: &mut Vec<Pes>) {
        if s[0] != 0x02 {
            return;
        }
        let version = (s[5] >> 1) & 0x1f;
        let crc = u32::from_be_bytes([
            s[s.len() - 4],
            s[s.len() - 3],
            s[s.len() - 2],
            s[s.len() - 1],
        ]);
        if self.pmt.applied == Some((version, crc)) {
            return;
        }
        self.pmt.applied = Some((version, crc));
        self.pcr_pid = Some((u16::from(s[8] & 0x1f) << 8) | u16::from(s[9]));
        let info_len = (usize::from(s[10] & 0x0f) << 8) | usize::from(s[11]);
        let end = s.len() - 4;
        let mut i = 12 + info_len;
        let mut found: Vec<(u16, StreamKind)> = Vec::new();
        while i + 5 <= end {
            let stream_type = s[i];
            let pid = (u16::from(s[i + 1] & 0x1f) << 8) | u16::from(s[i + 2]);
            let es_len = (usize::from(s[i + 3] & 0x0f) << 8) | usize::from(s[i + 4]);
            let Some(descriptors) = s
                .get(i + 5..i + 5 + es_len)
                .filter(|_| i + 5 + es_len <= end)
            else {
                self.stats.bad_sections += 1;
                break;
            };
            let kind = match stream_type {
                0x1b => Some(StreamKind::H264),
                0x24 => Some(StreamKind::H265),
                0x0f => Some(StreamKind::Aac),
                0x06 if has_registration(descriptors, b"Opus") => Some(StreamKind::Opus),
                _ => None,
            };
            if let Some(kind) = kind
                && found.len() < MAX_STREAMS
            {
                found.push((pid, kind));
            }
            i += 5 + es_len;
        }
        // Streams that left the program are flushed and forgotten; those
        // that stayed keep their state.
        let gone: Vec<u16> = self
            .streams
            .keys()
            .filter(|pid| !found.iter().any(|(p, _)| p == *pid))
            .copied()
            .collect();
        for pid in gone {
            self.finish_pes(pid, out);
            self.streams.remove(&pid);
        }
        for (pid, kind) in found {
            let entry = self.streams.entry(pid).or_insert(EsState {
                kind,
                cc: None,
                pending: None,
                last_dts: None,
            });
            entry.kind = kind;
        }
    }

    fn es(
        &mut self,
        pid: u16,
        pusi: bool,
        cc: u8,
        signalled: bool,
        payload: &[u8],
        out: &mut Vec<Pes>,
    ) {
        let Some(state) = self.streams.get_mut(&pid) else {
            return;
        };
        match Self::check_cc(&mut state.cc, cc, signalled) {
            Ok(true) => {}
            Ok(false) => return,
            Err(()) => {
                // A gap: the PES under way lost bytes; drop it.
                self.stats.continuity_errors += 1;
                state.pending = None;
                state.last_dts = None;
                self.epoch = self.epoch.wrapping_add(1);
                self.stats.discontinuities += 1;
            }
        }
        if signalled && Some(pid) != self.pcr_pid {
            // (On the PCR PID, `on_pcr` has counted it already.)
            self.discontinuity();
        }
        if pusi {
            self.finish_pes(pid, out);
            match parse_pes_header(payload) {
                Some((header, body)) => {
                    let pts = header.pts.map(|t| self.unwrap_time(t));
                    let dts = header.dts.map(|t| self.unwrap_time(t));
                    let mut data = Vec::with_capacity(header.expected.unwrap_or(body.len()));
                    data.extend_from_slice(body);
                    if let Some(state) = self.streams.get_mut(&pid) {
                        state.pending = Some(PendingPes {
                            epoch: self.epoch,
                            started: self.pushes,
                            pts,
                            dts,
                            expected: header.expected,
                            data,
                        });
                    }
                }
                None => {
                    self.stats.corrupt_packets += 1;
                    return;
                }
            }
        } else {
            let Some(state) = self.streams.get_mut(&pid) else {
                return;
            };
            let Some(pending) = state.pending.as_mut() else {
                return; // joined mid-PES: wait for the next start
            };
            if pending.data.len() + payload.len() > MAX_PES {
                state.pending = None;
                self.stats.corrupt_packets += 1;
                return;
            }
            pending.data.extend_from_slice(payload);
        }
        // A PES whose length is known is complete as soon as it is whole
        // (audio: no wait for the next packet of the stream).
        let complete = self
            .streams
            .get(&pid)
            .and_then(|s| s.pending.as_ref())
            .is_some_and(|p| p.expected.is_some_and(|n| p.data.len() >= n));
        if complete {
            self.finish_pes(pid, out);
        }
    }

    fn finish_pes(&mut self, pid: u16, out: &mut Vec<Pes>) {
        let Some(state) = self.streams.get_mut(&pid) else {
            return;
        };
        let Some(mut p) = state.pending.take() else {
            return;
        };
        if let Some(n) = p.expected {
            if p.data.len() < n {
                // Cut short by the next PES start: bytes were lost.
                self.stats.corrupt_packets += 1;
                return;
            }
            p.data.truncate(n);
        }
        if p.data.is_empty() {
            return;
        }
        let mut jumped = false;
        if let Some(t) = p.dts.or(p.pts) {
            if let Some(last) = state.last_dts
                && !(-MAX_DTS_STEP..=MAX_DTS_STEP).contains(&(t - last))
            {
                jumped = true;
            }
            state.last_dts = Some(t);
        }
        let kind = state.kind;
        let dts = p.dts.filter(|d| Some(*d) != p.pts);
        if jumped {
            // `discontinuity` forgets every stream's last time; this one's
            // new time is the reference from now on.
            self.discontinuity();
            if let Some(state) = self.streams.get_mut(&pid) {
                state.last_dts = p.dts.or(p.pts);
            }
        }
        let epoch = if jumped { self.epoch } else { p.epoch };
        self.stats.pes += 1;
        out.push(Pes {
            pid,
            kind,
            pts: p.pts,
            dts,
            epoch,
            data: p.data,
            started: p.started,
        });
    }
}

fn has_registration(descriptors: &[u8], id: &[u8; 4]) -> bool {
    let mut i = 0;
    while i + 2 <= descriptors.len() {
        let tag = descriptors[i];
        let len = usize::from(descriptors[i + 1]);
        let Some(body) = descriptors.get(i + 2..i + 2 + len) else {
            return false;
        };
        if tag == 0x05 && body.len() >= 4 && &body[..4] == id {
            return true;
        }
        i += 2 + len;
    }
    false
}

struct PesHeader {
    pts: Option<u64>,
    dts: Option<u64>,
    expected: Option<usize>,
}

/// Parses a PES header at the start of `payload`; returns the header and the
/// first payload bytes. `None` when it is not a PES header we can use.
fn parse_pes_header(payload: &[u8]) -> Option<(PesHeader, &[u8])> {
    if payload.len() < 9 || payload[..3] != [0, 0, 1] {
        return None;
    }
    let stream_id = payload[3];
    let packet_len = usize::from(u16::from_be_bytes([payload[4], payload[5]]));
    // Stream ids without the optional header (padding, private 2, ...)
    // never carry audio or video.
    if matches!(
        stream_id,
        0xbc | 0xbe | 0xbf | 0xf0 | 0xf1 | 0xf2 | 0xf8 | 0xff
    ) {
        return None;
    }
    if payload[6] & 0xc0 != 0x80 {
        return None;
    }
    let flags = payload[7] >> 6;
    let header_len = usize::from(payload[8]);
    let body_start = 9 + header_len;
    let optional = payload.get(9..body_start)?;
    let (pts, dts) = match flags {
        0b10 => (Some(read_timestamp(optional)?), None),
        0b11 => (
            Some(read_timestamp(optional)?),
            Some(read_timestamp(optional.get(5..)?)?),
        ),
        0b00 => (None, None),
        _ => return None, // 0b01 is forbidden
    };
    let expected = if packet_len == 0 {
        None
    } else {
        // PES_packet_length counts the bytes after itself.
        Some(packet_len.checked_sub(3 + header_len)?)
    };
    Some((PesHeader { pts, dts, expected }, &payload[body_start..]))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// A small TS muxer for tests: PAT, PMT, PES split into packets.
    pub(crate) struct Muxer {
        cc: HashMap<u16, u8>,
        pub streams: Vec<(u16, u8, Vec<u8>)>,
    }

    impl Muxer {
        pub(crate) fn new(streams: Vec<(u16, u8, Vec<u8>)>) -> Self {
            Self {
                cc: HashMap::new(),
                streams,
            }
        }

        fn next_cc(&mut self, pid: u16) -> u8 {
            let c = self.cc.entry(pid).or_insert(0x0f);
            *c = (*c + 1) & 0x0f;
            *c
        }

        fn section(&mut self, pid: u16, body: &[u8], table: u8) -> Vec<u8> {
            let mut s = vec![table, 0xb0, 0, 0, 1, 0xc1, 0, 0];
            s.extend_from_slice(body);
            let len = s.len() - 3 + 4;
            s[1] = 0xb0 | ((len >> 8) as u8 & 0x0f);
            s[2] = len as u8;
            let crc = crc32_mpeg2(&s);
            s.extend_from_slice(&crc.to_be_bytes());
            let mut p = vec![
                SYNC,
                0x40 | (pid >> 8) as u8,
                pid as u8,
                0x10 | self.next_cc(pid),
                0,
            ];
            p.extend_from_slice(&s);
            p.resize(PACKET_SIZE, 0xff);
            p
        }

        pub(crate) fn tables(&mut self) -> Vec<u8> {
            let mut out = self.section(0, &[0, 1, 0xf0, 0x00], 0x00);
            let mut pmt = vec![0xe1, 0x00, 0xf0, 0x00]; // PCR PID 0x100
            for (pid, ty, desc) in self.streams.clone() {
                pmt.extend_from_slice(&[ty, 0xe0 | (pid >> 8) as u8, pid as u8]);
                pmt.extend_from_slice(&[0xf0 | (desc.len() >> 8) as u8, desc.len() as u8]);
                pmt.extend_from_slice(&desc);
            }
            out.extend(self.section(0x1000, &pmt, 0x02));
            out
        }

        fn ts(t: u64, marker: u8) -> [u8; 5] {
            [
                (marker << 4) | (((t >> 30) as u8 & 0x07) << 1) | 1,
                (t >> 22) as u8,
                (((t >> 15) as u8) << 1) | 1,
                (t >> 7) as u8,
                ((t as u8) << 1) | 1,
            ]
        }

        /// One PES in packets; `sized` writes PES_packet_length.
        pub(crate) fn pes(
            &mut self,
            pid: u16,
            pts: u64,
            dts: Option<u64>,
            data: &[u8],
            sized: bool,
            pcr: Option<u64>,
        ) -> Vec<u8> {
            let mut pes = vec![0, 0, 1, 0xe0, 0, 0, 0x80];
            let mut hdr = Vec::new();
            match dts {
                Some(d) => {
                    pes.push(0xc0);
                    hdr.extend_from_slice(&Self::ts(pts, 3));
                    hdr.extend_from_slice(&Self::ts(d, 1));
                }
                None => {
                    pes.push(0x80);
                    hdr.extend_from_slice(&Self::ts(pts, 2));
                }
            }
            pes.push(hdr.len() as u8);
            pes.extend_from_slice(&hdr);
            if sized {
                let n = 3 + hdr.len() + data.len();
                pes[4] = (n >> 8) as u8;
                pes[5] = n as u8;
            }
            pes.extend_from_slice(data);
            let mut out = Vec::new();
            let mut first = true;
            let mut rest = &pes[..];
            while !rest.is_empty() {
                let mut p = vec![
                    SYNC,
                    (if first { 0x40 } else { 0 }) | (pid >> 8) as u8,
                    pid as u8,
                    0,
                ];
                // Adaptation field content (after its length byte).
                let mut af: Option<Vec<u8>> = None;
                if first && let Some(pcr) = pcr {
                    af = Some(vec![
                        0x10,
                        (pcr >> 25) as u8,
                        (pcr >> 17) as u8,
                        (pcr >> 9) as u8,
                        (pcr >> 1) as u8,
                        ((pcr as u8) << 7) | 0x7e,
                        0,
                    ]);
                }
                let room = 184 - af.as_ref().map_or(0, |a| 1 + a.len());
                let take = rest.len().min(room);
                if take < room {
                    let pad = room - take;
                    match af.as_mut() {
                        Some(a) => a.resize(a.len() + pad, 0xff),
                        None if pad == 1 => af = Some(Vec::new()),
                        None => {
                            let mut a = vec![0x00];
                            a.resize(pad - 1, 0xff);
                            af = Some(a);
                        }
                    }
                }
                let cc = self.next_cc(pid);
                p[3] = if af.is_some() { 0x30 } else { 0x10 } | cc;
                if let Some(a) = af {
                    p.push(a.len() as u8);
                    p.extend_from_slice(&a);
                }
                p.extend_from_slice(&rest[..take]);
                assert_eq!(p.len(), PACKET_SIZE, "test muxer packet size");
                rest = &rest[take..];
                out.extend(p);
                first = false;
            }
            out
        }
    }

    fn demux_all(bytes: &[u8], chunk: usize) -> (Vec<Pes>, DemuxStats) {
        let mut d = TsDemuxer::new();
        let mut out = Vec::new();
        for c in bytes.chunks(chunk.max(1)) {
            d.push(c, &mut out);
        }
        d.flush(&mut out);
        (out, d.stats())
    }

    fn sample_stream() -> (Muxer, Vec<u8>) {
        let mut m = Muxer::new(vec![
            (0x100, 0x1b, vec![]),
            (0x101, 0x0f, vec![]),
            (0x102, 0x06, vec![0x05, 4, b'O', b'p', b'u', b's']),
            (0x103, 0x06, vec![]), // private data without Opus: ignored
        ]);
        let mut ts = m.tables();
        ts.extend(m.pes(0x100, 3003, Some(0), &[0xaa; 1000], false, Some(0)));
        ts.extend(m.pes(0x101, 1000, None, &[0xbb; 300], true, None));
        ts.extend(m.pes(0x102, 1000, None, &[0xcc; 10], true, None));
        ts.extend(m.pes(0x103, 1000, None, &[0xdd; 10], true, None));
        ts.extend(m.pes(0x100, 6006, Some(3003), &[0xee; 183], false, Some(3003)));
        (m, ts)
    }

    #[test]
    fn demuxes_video_audio_and_opus_in_any_chunking() {
        let (_, ts) = sample_stream();
        for chunk in [1, 7, 188, 1316, 100_000] {
            let (pes, stats) = demux_all(&ts, chunk);
            assert_eq!(stats.corrupt_packets, 0, "chunk {chunk}");
            assert_eq!(stats.continuity_errors, 0);
            assert_eq!(stats.bad_sections, 0);
            let kinds: Vec<_> = pes.iter().map(|p| (p.kind, p.data.len())).collect();
            assert_eq!(
                kinds,
                vec![
                    (StreamKind::Aac, 300),
                    (StreamKind::Opus, 10),
                    (StreamKind::H264, 1000),
                    (StreamKind::H264, 183),
                ],
                "chunk {chunk}"
            );
            assert_eq!(pes[2].pts, Some(3003));
            assert_eq!(pes[2].dts, Some(0));
            assert_eq!(pes[0].pts, Some(1000));
            assert_eq!(pes[0].dts, None);
            assert!(pes.iter().all(|p| p.epoch == 0));
        }
    }

    #[test]
    fn timestamps_unwrap_past_33_bits() {
        let mut m = Muxer::new(vec![(0x101, 0x0f, vec![])]);
        let mut ts = m.tables();
        let near = (1u64 << 33) - 1800;
        for i in 0..4u64 {
            let t = (near + i * 1920) & ((1 << 33) - 1);
            ts.extend(m.pes(0x101, t, None, &[1; 50], true, None));
        }
        let (pes, stats) = demux_all(&ts, 188);
        let times: Vec<i64> = pes.iter().filter_map(|p| p.pts).collect();
        assert_eq!(times.len(), 4);
        for w in times.windows(2) {
            assert_eq!(w[1] - w[0], 1920);
        }
        assert_eq!(stats.discontinuities, 0);
    }

    #[test]
    fn continuity_gap_drops_the_damaged_pes_and_bumps_the_epoch() {
        let mut m = Muxer::new(vec![(0x100, 0x1b, vec![])]);
        let mut ts = m.tables();
        ts.extend(m.pes(0x100, 0, None, &[1; 1000], false, None));
        let second = m.pes(0x100, 3000, None, &[2; 1000], false, None);
        // Lose the second packet of the second PES.
        ts.extend_from_slice(&second[..188]);
        ts.extend_from_slice(&second[376..]);
        ts.extend(m.pes(0x100, 6000, None, &[3; 100], false, None));
        let (pes, stats) = demux_all(&ts, 1316);
        assert_eq!(stats.continuity_errors, 1);
        let firsts: Vec<(u8, u32)> = pes.iter().map(|p| (p.data[0], p.epoch)).collect();
        // The damaged PES (2) is gone; what follows is in a new epoch.
        assert_eq!(firsts, vec![(1, 0), (3, 1)]);
    }

    #[test]
    fn pcr_and_pts_jumps_are_discontinuities() {
        let mut m = Muxer::new(vec![(0x100, 0x1b, vec![])]);
        let mut ts = m.tables();
        ts.extend(m.pes(0x100, 0, None, &[1; 10], false, Some(0)));
        ts.extend(m.pes(0x100, 3000, None, &[2; 10], false, Some(3000)));
        // The encoder restarted: clocks jump back.
        ts.extend(m.pes(0x100, 900_000_000, None, &[3; 10], false, Some(900_000_000)));
        ts.extend(m.pes(0x100, 900_003_000, None, &[4; 10], false, Some(900_003_000)));
        let (pes, stats) = demux_all(&ts, 188);
        assert!(stats.discontinuities >= 1, "{stats:?}");
        assert_eq!(pes.len(), 4);
        assert_eq!(pes[0].epoch, pes[1].epoch);
        assert_ne!(pes[1].epoch, pes[2].epoch);
        assert_eq!(pes[2].epoch, pes[3].epoch);
        assert_eq!(pes[3].pts.unwrap_or(0) - pes[2].pts.unwrap_or(0), 3000);
    }

    #[test]
    fn garbage_between_packets_is_skipped_and_counted() {
        let (_, ts) = sample_stream();
        let mut damaged = ts[..188 * 2].to_vec();
        damaged.extend_from_slice(b"\x00\x01garbage\x47\x47 not a packet");
        damaged.extend_from_slice(&ts[188 * 2..]);
        let (pes, stats) = demux_all(&damaged, 1316);
        assert!(stats.corrupt_packets >= 1);
        assert_eq!(pes.len(), 4, "every PES after the garbage still arrives");
    }

    #[test]
    fn bad_crc_sections_are_refused() {
        let mut m = Muxer::new(vec![(0x100, 0x1b, vec![])]);
        let mut ts = m.tables();
        ts[188 + 20] ^= 0xff; // inside the PMT
        ts.extend(m.pes(0x100, 0, None, &[1; 10], false, None));
        let (pes, stats) = demux_all(&ts, 188);
        assert_eq!(stats.bad_sections, 1);
        assert!(pes.is_empty(), "no PMT, no streams");
    }

    fn xorshift(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    /// Random bytes, random bytes with sync bytes at packet boundaries, and
    /// a real-looking stream with random bytes flipped: never a panic.
    #[test]
    fn random_and_corrupted_input_never_panics() {
        let mut seed = 0x1234_5678_9abc_def1u64;
        for round in 0..300 {
            let len = (xorshift(&mut seed) % 20_000) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| xorshift(&mut seed) as u8).collect();
            if round % 2 == 1 {
                for i in (0..bytes.len()).step_by(PACKET_SIZE) {
                    bytes[i] = SYNC;
                }
            }
            let _ = demux_all(&bytes, 1 + (xorshift(&mut seed) % 2000) as usize);
        }
        let (_, ts) = sample_stream();
        for _ in 0..2000 {
            let mut bytes = ts.clone();
            for _ in 0..(1 + xorshift(&mut seed) % 8) {
                let i = (xorshift(&mut seed) as usize) % bytes.len();
                bytes[i] = xorshift(&mut seed) as u8;
            }
            let cut = (xorshift(&mut seed) as usize) % bytes.len();
            let _ = demux_all(&bytes[..cut], 1 + (xorshift(&mut seed) % 400) as usize);
        }
    }
}
