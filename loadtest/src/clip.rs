//! The media a synthetic publisher sends: a real VP8 clip (IVF file), so
//! decoders downstream work, generated with the ffmpeg CLI when none is
//! given.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// One VP8 frame of the clip.
#[derive(Debug, Clone)]
pub struct ClipFrame {
    pub keyframe: bool,
    pub data: std::sync::Arc<[u8]>,
}

/// A VP8 clip: frames in order, and the frame rate.
#[derive(Debug, Clone)]
pub struct Clip {
    pub frames: Vec<ClipFrame>,
    pub fps: u32,
}

impl Clip {
    /// Reads an IVF file with VP8 inside.
    pub fn read_ivf(path: &Path) -> anyhow::Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse_ivf(&bytes).with_context(|| format!("{} is not a VP8 IVF file", path.display()))
    }

    /// Parses an IVF file's bytes.
    pub fn parse_ivf(b: &[u8]) -> anyhow::Result<Self> {
        if b.len() < 32 || &b[0..4] != b"DKIF" {
            bail!("no IVF signature");
        }
        if &b[8..12] != b"VP80" {
            bail!(
                "codec is {:?}, not VP80",
                String::from_utf8_lossy(&b[8..12])
            );
        }
        let header_len = u16::from_le_bytes([b[6], b[7]]) as usize;
        let rate = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
        let scale = u32::from_le_bytes([b[20], b[21], b[22], b[23]]).max(1);
        let fps = (rate / scale).clamp(1, 120);
        let mut frames = Vec::new();
        let mut at = header_len.max(32);
        while at + 12 <= b.len() {
            let len = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
            at += 12;
            let Some(data) = b.get(at..at + len) else {
                bail!("truncated frame at byte {at}");
            };
            if !data.is_empty() {
                frames.push(ClipFrame {
                    // VP8: bit 0 of the first byte clear marks a keyframe.
                    keyframe: data[0] & 1 == 0,
                    data: data.into(),
                });
            }
            at += len;
        }
        if !frames.first().is_some_and(|f| f.keyframe) {
            bail!("the clip does not start with a keyframe");
        }
        Ok(Self { frames, fps })
    }

    /// Generates a clip with the ffmpeg CLI: a test pattern at `kbps`,
    /// a keyframe every 2 s.
    pub fn generate(dir: &Path, width: u32, height: u32, kbps: u32) -> anyhow::Result<PathBuf> {
        let path = dir.join(format!("weir-clip-{width}x{height}-{kbps}k.ivf"));
        if path.exists() {
            return Ok(path);
        }
        let tmp = path.with_extension("tmp.ivf");
        let status = Command::new("ffmpeg")
            .args([
                "-hide_banner",
                "-loglevel",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
            ])
            .arg(format!("testsrc2=size={width}x{height}:rate=30"))
            .args([
                "-t",
                "10",
                "-c:v",
                "libvpx",
                "-deadline",
                "realtime",
                "-cpu-used",
                "8",
            ])
            .args([
                "-b:v",
                &format!("{kbps}k"),
                "-minrate",
                &format!("{kbps}k"),
                "-maxrate",
                &format!("{kbps}k"),
            ])
            .args(["-g", "60", "-keyint_min", "60", "-f", "ivf"])
            .arg(&tmp)
            .status()
            .context("cannot run ffmpeg to generate the clip (install ffmpeg, or pass --clip)")?;
        if !status.success() {
            bail!("ffmpeg failed to generate the clip ({status})");
        }
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_ivf_and_refuses_garbage() {
        let mut b = Vec::new();
        b.extend_from_slice(b"DKIF");
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&32u16.to_le_bytes());
        b.extend_from_slice(b"VP80");
        b.extend_from_slice(&[0; 4]); // width, height
        b.extend_from_slice(&30u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        for (key, len) in [(true, 100usize), (false, 20)] {
            b.extend_from_slice(&(len as u32).to_le_bytes());
            b.extend_from_slice(&[0; 8]);
            let mut f = vec![0x55u8; len];
            f[0] = if key { 0x10 } else { 0x11 };
            b.extend_from_slice(&f);
        }
        let clip = Clip::parse_ivf(&b).unwrap();
        assert_eq!(clip.fps, 30);
        assert_eq!(clip.frames.len(), 2);
        assert!(clip.frames[0].keyframe && !clip.frames[1].keyframe);
        assert!(Clip::parse_ivf(b"nonsense").is_err());
        assert!(Clip::parse_ivf(&b[..b.len() - 5]).is_err(), "truncated");
    }
}
