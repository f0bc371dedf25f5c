//! H.264 access units from a transport stream, made fit for WebRTC: every
//! IDR access unit carries its SPS and PPS (cached from the stream and
//! prepended when the encoder sent them only once), access unit delimiters
//! and filler are dropped (WebRTC has no use for them), and the keyframe flag
//! is set only on an IDR a decoder can start from.

/// NAL unit types used here.
const NAL_IDR: u8 = 5;
const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;
const NAL_AUD: u8 = 9;
const NAL_FILLER: u8 = 12;
/// Largest parameter set kept (real ones are tens of bytes).
const MAX_PARAM_SET: usize = 1024;

/// Splits Annex-B bytes into NAL units (without start codes).
pub fn nal_units(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    let ends: Vec<usize> = starts
        .iter()
        .skip(1)
        .map(|&s| {
            // The next start code, with a leading zero of a 4-byte one
            // and trailing zero bytes trimmed.
            let mut e = s - 3;
            while e > 0 && data[e - 1] == 0 {
                e -= 1;
            }
            e
        })
        .chain(std::iter::once(data.len()))
        .collect();
    starts
        .into_iter()
        .zip(ends)
        .filter_map(move |(s, e)| data.get(s..e.max(s)))
        .filter(|n| !n.is_empty())
}

/// One access unit ready for the SFU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessUnit {
    /// Annex-B bytes with 4-byte start codes.
    pub data: Vec<u8>,
    /// Contains an IDR, preceded by SPS and PPS.
    pub keyframe: bool,
}

/// Per-stream state: the latest parameter sets.
#[derive(Debug, Default)]
pub struct H264Stream {
    sps: Option<Vec<u8>>,
    pps: Option<Vec<u8>>,
    /// IDR access units that could not be made decodable (no SPS/PPS yet).
    pub idr_without_params: u64,
}

impl H264Stream {
    /// A stream with no parameter sets seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Turns a PES payload (one access unit) into what WebRTC viewers need;
    /// `None` when nothing usable is left.
    pub fn access_unit(&mut self, pes: &[u8]) -> Option<AccessUnit> {
        let mut has_idr = false;
        let mut has_sps = false;
        let mut has_pps = false;
        let mut nals: Vec<&[u8]> = Vec::new();
        for nal in nal_units(pes) {
            match nal[0] & 0x1f {
                NAL_AUD | NAL_FILLER => continue,
                NAL_SPS => {
                    has_sps = true;
                    if nal.len() <= MAX_PARAM_SET {
                        self.sps = Some(nal.to_vec());
                    }
                }
                NAL_PPS => {
                    has_pps = true;
                    if nal.len() <= MAX_PARAM_SET {
                        self.pps = Some(nal.to_vec());
                    }
                }
                NAL_IDR => has_idr = true,
                _ => {}
            }
            nals.push(nal);
        }
        if nals.is_empty() {
            return None;
        }
        let mut data = Vec::with_capacity(pes.len() + 64);
        let mut keyframe = false;
        if has_idr {
            match (&self.sps, &self.pps) {
                (Some(sps), Some(pps)) => {
                    keyframe = true;
                    if !has_sps || !has_pps {
                        for p in [sps, pps] {
                            data.extend_from_slice(&[0, 0, 0, 1]);
                            data.extend_from_slice(p);
                        }
                    }
                }
                _ => self.idr_without_params += 1,
            }
        }
        for nal in nals {
            // When parameter sets were prepended, the AU's own (absent or
            // partial) ones are still kept after them: the later ones win.
            data.extend_from_slice(&[0, 0, 0, 1]);
            data.extend_from_slice(nal);
        }
        Some(AccessUnit { data, keyframe })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn annexb(nals: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, n) in nals.iter().enumerate() {
            if i % 2 == 0 {
                out.extend_from_slice(&[0, 0, 0, 1]);
            } else {
                out.extend_from_slice(&[0, 0, 1]);
            }
            out.extend_from_slice(n);
        }
        out
    }

    #[test]
    fn splits_nal_units_with_both_start_codes() {
        let data = annexb(&[&[0x09, 0xf0], &[0x67, 1, 2], &[0x68, 3], &[0x65, 4, 0, 5]]);
        let nals: Vec<&[u8]> = nal_units(&data).collect();
        assert_eq!(
            nals,
            vec![
                &[0x09, 0xf0][..],
                &[0x67, 1, 2],
                &[0x68, 3],
                &[0x65, 4, 0, 5]
            ]
        );
    }

    #[test]
    fn parameter_sets_are_cached_and_prepended_to_later_idrs() {
        let mut s = H264Stream::new();
        let first = s
            .access_unit(&annexb(&[
                &[0x09, 0xf0],
                &[0x67, 1],
                &[0x68, 2],
                &[0x65, 3],
            ]))
            .unwrap();
        assert!(first.keyframe);
        assert_eq!(first.data, annexb4(&[&[0x67, 1], &[0x68, 2], &[0x65, 3]]));
        let p = s.access_unit(&annexb(&[&[0x41, 9]])).unwrap();
        assert!(!p.keyframe);
        let idr = s.access_unit(&annexb(&[&[0x65, 7]])).unwrap();
        assert!(idr.keyframe);
        assert_eq!(idr.data, annexb4(&[&[0x67, 1], &[0x68, 2], &[0x65, 7]]));
    }

    #[test]
    fn an_idr_before_any_parameter_set_is_not_a_keyframe() {
        let mut s = H264Stream::new();
        let au = s.access_unit(&annexb(&[&[0x65, 1]])).unwrap();
        assert!(!au.keyframe);
        assert_eq!(s.idr_without_params, 1);
        assert!(s.access_unit(&annexb(&[&[0x09, 0x10]])).is_none());
        assert!(s.access_unit(&[1, 2, 3]).is_none());
    }

    fn annexb4(nals: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for n in nals {
            out.extend_from_slice(&[0, 0, 0, 1]);
            out.extend_from_slice(n);
        }
        out
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 7u64;
        let mut s = H264Stream::new();
        for _ in 0..2000 {
            let len = (seed % 300) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed % 4) as u8 // zeros and ones make many start codes
                })
                .collect();
            let _ = s.access_unit(&bytes);
        }
    }
}
