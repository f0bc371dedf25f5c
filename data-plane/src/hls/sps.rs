//! Just enough of an H.264 sequence parameter set (ITU-T H.264 7.3.2.1.1)
//! for an fMP4 init segment and an HLS `CODECS`/`RESOLUTION` attribute:
//! profile, level, chroma format, bit depth and the cropped picture size.
//! Malformed input is an error, never a panic.

/// What the packager needs from an SPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpsInfo {
    /// `profile_idc`.
    pub profile: u8,
    /// The constraint flags byte.
    pub compat: u8,
    /// `level_idc`.
    pub level: u8,
    /// 0 monochrome, 1 4:2:0, 2 4:2:2, 3 4:4:4.
    pub chroma_format: u8,
    /// Luma bit depth (8 for nearly everything).
    pub bit_depth_luma: u8,
    /// Chroma bit depth.
    pub bit_depth_chroma: u8,
    /// Displayed width after cropping.
    pub width: u32,
    /// Displayed height after cropping.
    pub height: u32,
}

impl SpsInfo {
    /// The RFC 6381 codec string, e.g. `avc1.64001f`.
    pub fn codec_string(&self) -> String {
        format!(
            "avc1.{:02x}{:02x}{:02x}",
            self.profile, self.compat, self.level
        )
    }
}

/// Why an SPS could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpsError {
    /// Not a NAL unit of type 7.
    #[error("not an SPS NAL unit")]
    NotSps,
    /// The bits ran out or a value is out of its range.
    #[error("SPS is cut short or malformed")]
    Malformed,
}

/// Reads bits of an RBSP (emulation prevention bytes already removed).
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bits<'a> {
    fn bit(&mut self) -> Result<u32, SpsError> {
        let byte = self.data.get(self.pos / 8).ok_or(SpsError::Malformed)?;
        let b = (byte >> (7 - (self.pos % 8))) & 1;
        self.pos += 1;
        Ok(u32::from(b))
    }

    fn bits(&mut self, n: u32) -> Result<u32, SpsError> {
        let mut v = 0;
        for _ in 0..n {
            v = (v << 1) | self.bit()?;
        }
        Ok(v)
    }

    /// Unsigned Exp-Golomb.
    fn ue(&mut self) -> Result<u32, SpsError> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return Err(SpsError::Malformed);
            }
        }
        let rest = self.bits(zeros)?;
        Ok(((1u64 << zeros) - 1 + u64::from(rest)).min(u64::from(u32::MAX)) as u32)
    }

    /// Signed Exp-Golomb.
    fn se(&mut self) -> Result<i32, SpsError> {
        let k = self.ue()?;
        let v = k.div_ceil(2) as i32;
        Ok(if k % 2 == 0 { -v } else { v })
    }
}

/// Removes emulation prevention bytes (`00 00 03` → `00 00`).
pub fn rbsp(nal: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(nal.len());
    let mut zeros = 0;
    for &b in nal {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        out.push(b);
    }
    out
}

fn skip_scaling_list(r: &mut Bits<'_>, size: u32) -> Result<(), SpsError> {
    let mut last = 8i32;
    let mut next = 8i32;
    for _ in 0..size {
        if next != 0 {
            let delta = r.se()?;
            next = (last + delta + 256).rem_euclid(256);
        }
        if next != 0 {
            last = next;
        }
    }
    Ok(())
}

/// Parses an SPS NAL unit (with its one-byte header, without start code).
pub fn parse(nal: &[u8]) -> Result<SpsInfo, SpsError> {
    if nal.first().map(|h| h & 0x1f) != Some(7) {
        return Err(SpsError::NotSps);
    }
    let data = rbsp(&nal[1..]);
    if data.len() < 4 {
        return Err(SpsError::Malformed);
    }
    let (profile, compat, level) = (data[0], data[1], data[2]);
    let mut r = Bits {
        data: &data[3..],
        pos: 0,
    };
    r.ue()?; // seq_parameter_set_id
    let mut chroma_format = 1u32;
    let mut separate_colour_plane = 0;
    let (mut depth_luma, mut depth_chroma) = (8u32, 8u32);
    if matches!(
        profile,
        100 | 110 | 122 | 244 | 44 | 83 | 86 | 118 | 128 | 138 | 139 | 134 | 135
    ) {
        chroma_format = r.ue()?;
        if chroma_format > 3 {
            return Err(SpsError::Malformed);
        }
        if chroma_format == 3 {
            separate_colour_plane = r.bit()?;
        }
        depth_luma = r.ue()? + 8;
        depth_chroma = r.ue()? + 8;
        if depth_luma > 14 || depth_chroma > 14 {
            return Err(SpsError::Malformed);
        }
        r.bit()?; // qpprime_y_zero_transform_bypass_flag
        if r.bit()? == 1 {
            let lists = if chroma_format == 3 { 12 } else { 8 };
            for i in 0..lists {
                if r.bit()? == 1 {
                    skip_scaling_list(&mut r, if i < 6 { 16 } else { 64 })?;
                }
            }
        }
    }
    r.ue()?; // log2_max_frame_num_minus4
    match r.ue()? {
        0 => {
            r.ue()?; // log2_max_pic_order_cnt_lsb_minus4
        }
        1 => {
            r.bit()?;
            r.se()?;
            r.se()?;
            let n = r.ue()?;
            if n > 255 {
                return Err(SpsError::Malformed);
            }
            for _ in 0..n {
                r.se()?;
            }
        }
        2 => {}
        _ => return Err(SpsError::Malformed),
    }
    r.ue()?; // max_num_ref_frames
    r.bit()?; // gaps_in_frame_num_value_allowed_flag
    let width_mbs = r.ue()? + 1;
    let height_map_units = r.ue()? + 1;
    let frame_mbs_only = r.bit()?;
    if frame_mbs_only == 0 {
        r.bit()?; // mb_adaptive_frame_field_flag
    }
    r.bit()?; // direct_8x8_inference_flag
    let (mut crop_l, mut crop_r, mut crop_t, mut crop_b) = (0, 0, 0, 0);
    if r.bit()? == 1 {
        crop_l = r.ue()?;
        crop_r = r.ue()?;
        crop_t = r.ue()?;
        crop_b = r.ue()?;
    }
    let (sub_w, sub_h): (u32, u32) = match (chroma_format, separate_colour_plane) {
        (1, 0) => (2, 2),
        (2, 0) => (2, 1),
        _ => (1, 1),
    };
    let (crop_unit_x, crop_unit_y) = if chroma_format == 0 || separate_colour_plane == 1 {
        (1, 2 - frame_mbs_only)
    } else {
        (sub_w, sub_h * (2 - frame_mbs_only))
    };
    let width = u64::from(width_mbs) * 16;
    let height = u64::from(height_map_units) * 16 * u64::from(2 - frame_mbs_only);
    let crop_x = u64::from(crop_l) + u64::from(crop_r);
    let crop_y = u64::from(crop_t) + u64::from(crop_b);
    let width = width
        .checked_sub(crop_x * u64::from(crop_unit_x))
        .ok_or(SpsError::Malformed)?;
    let height = height
        .checked_sub(crop_y * u64::from(crop_unit_y))
        .ok_or(SpsError::Malformed)?;
    if width == 0 || height == 0 || width > 16384 || height > 16384 {
        return Err(SpsError::Malformed);
    }
    Ok(SpsInfo {
        profile,
        compat,
        level,
        chroma_format: chroma_format as u8,
        bit_depth_luma: depth_luma as u8,
        bit_depth_chroma: depth_chroma as u8,
        width: width as u32,
        height: height as u32,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// SPS of x264, High profile, 640x360 (cropped from 640x368).
    const SPS_640X360: [u8; 26] = [
        0x67, 0x64, 0x00, 0x1e, 0xac, 0xd9, 0x40, 0xa0, 0x2f, 0xf9, 0x70, 0x11, 0x00, 0x00, 0x03,
        0x00, 0x01, 0x00, 0x00, 0x03, 0x00, 0x3c, 0x0f, 0x16, 0x2d, 0x96,
    ];
    /// x264 Constrained Baseline, 854x480 (cropped from 864x480).
    const SPS_854X480: [u8; 25] = [
        0x67, 0x42, 0xc0, 0x1f, 0xd9, 0x00, 0xd8, 0x3d, 0xe6, 0xf0, 0x11, 0x00, 0x00, 0x03, 0x00,
        0x01, 0x00, 0x00, 0x03, 0x00, 0x3c, 0x0f, 0x18, 0x32, 0x48,
    ];

    #[test]
    fn reads_size_profile_and_level() {
        let s = parse(&SPS_640X360).unwrap();
        assert_eq!((s.width, s.height), (640, 360));
        assert_eq!((s.profile, s.level, s.chroma_format), (100, 30, 1));
        assert_eq!(s.codec_string(), "avc1.64001e");
        let s = parse(&SPS_854X480).unwrap();
        assert_eq!((s.width, s.height), (854, 480));
        assert_eq!(s.codec_string(), "avc1.42c01f");
    }

    #[test]
    fn emulation_prevention_is_removed() {
        assert_eq!(rbsp(&[0, 0, 3, 1, 0, 0, 3]), vec![0, 0, 1, 0, 0]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(parse(&[0x65, 1, 2]), Err(SpsError::NotSps));
        assert!(parse(&[0x67]).is_err());
        let mut seed = 3u64;
        for len in 0..400 {
            let mut nal = vec![0x67];
            for _ in 0..(len % 40) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                nal.push(seed as u8);
            }
            let _ = parse(&nal);
        }
    }
}
