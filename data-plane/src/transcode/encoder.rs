//! Which H.264 encoder (and decoder) the ladder uses, chosen at run time:
//! NVENC (`h264_nvenc`, with NVDEC through `h264_cuvid`) when ffmpeg has it
//! and opening it succeeds — which needs an NVIDIA GPU with an encoder and
//! its driver — otherwise libx264 with low-latency settings.

use std::str::FromStr;

use ffmpeg_next as ffmpeg;

use crate::ingest::audio::{TranscodeError, init_ffmpeg};

/// What the operator asked for (`--encoder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncoderChoice {
    /// NVENC when usable, else libx264.
    #[default]
    Auto,
    /// NVENC, falling back to libx264 (with an error in the log) when it
    /// cannot be opened.
    Nvenc,
    /// libx264 only.
    X264,
}

impl FromStr for EncoderChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "nvenc" | "h264_nvenc" => Ok(Self::Nvenc),
            "x264" | "libx264" => Ok(Self::X264),
            _ => Err(format!("unknown encoder {s:?}: auto, nvenc or x264")),
        }
    }
}

/// The encoder in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderKind {
    /// `h264_nvenc` (decoding with `h264_cuvid` when it opens).
    Nvenc,
    /// `libx264`.
    X264,
}

impl EncoderKind {
    /// ffmpeg's name of the encoder.
    pub fn name(self) -> &'static str {
        match self {
            EncoderKind::Nvenc => "h264_nvenc",
            EncoderKind::X264 => "libx264",
        }
    }
}

/// Probes and logs the choice, and exports `weir_transcoder_encoder{name}`.
pub fn choose(choice: EncoderChoice) -> EncoderKind {
    let kind = match choice {
        EncoderChoice::X264 => {
            tracing::info!(
                encoder = "libx264",
                "transcoder encoder: libx264 (chosen by --encoder)"
            );
            EncoderKind::X264
        }
        EncoderChoice::Auto | EncoderChoice::Nvenc => match probe_nvenc() {
            Ok(()) => {
                tracing::info!(
                    encoder = "h264_nvenc",
                    "transcoder encoder: NVENC on an NVIDIA GPU"
                );
                EncoderKind::Nvenc
            }
            Err(e) => {
                if choice == EncoderChoice::Nvenc {
                    tracing::error!(error = %e, "--encoder nvenc: NVENC cannot be opened; using libx264");
                } else {
                    tracing::info!(encoder = "libx264", nvenc = %e, "transcoder encoder: libx264 (no usable NVENC)");
                }
                EncoderKind::X264
            }
        },
    };
    for k in [EncoderKind::Nvenc, EncoderKind::X264] {
        metrics::gauge!("weir_transcoder_encoder", "name" => k.name()).set(if k == kind {
            1.0
        } else {
            0.0
        });
    }
    kind
}

/// Opens NVENC on a small picture: that succeeds only with a GPU, its
/// driver and an encoder unit on it.
fn probe_nvenc() -> Result<(), TranscodeError> {
    init_ffmpeg()?;
    open_encoder(EncoderKind::Nvenc, 640, 360, 30.0, 500).map(drop)
}

/// Opens an encoder for `width`x`height` YUV 4:2:0 at about `fps` and
/// `kbps`: no B-frames, keyframes where the caller marks them (aligned with
/// the source's, so renditions switch cleanly), at most every 4 s.
pub fn open_encoder(
    kind: EncoderKind,
    width: u32,
    height: u32,
    fps: f64,
    kbps: u32,
) -> Result<ffmpeg::encoder::Video, TranscodeError> {
    let codec = ffmpeg::encoder::find_by_name(kind.name()).ok_or(match kind {
        EncoderKind::Nvenc => TranscodeError::Missing("h264_nvenc encoder"),
        EncoderKind::X264 => TranscodeError::Missing("libx264 encoder"),
    })?;
    let mut enc = ffmpeg::codec::context::Context::new_with_codec(codec)
        .encoder()
        .video()?;
    let fps_int = fps.round().clamp(1.0, 240.0) as u32;
    enc.set_width(width);
    enc.set_height(height);
    enc.set_format(ffmpeg::format::Pixel::YUV420P);
    enc.set_time_base((1, 90_000));
    enc.set_frame_rate(Some((fps_int as i32, 1)));
    enc.set_gop(fps_int * 4);
    enc.set_max_b_frames(0);
    enc.set_bit_rate(kbps as usize * 1000);
    enc.set_max_bit_rate(kbps as usize * 1000);
    let mut opts = ffmpeg::Dictionary::new();
    // Generic AVCodecContext option: the VBV buffer, one second.
    opts.set("bufsize", &format!("{}k", kbps));
    opts.set("forced-idr", "1");
    match kind {
        EncoderKind::X264 => {
            opts.set("preset", "veryfast");
            opts.set("tune", "zerolatency");
            opts.set("profile", "main");
            // Keyframes only where the source has them (or at the GOP
            // limit), never at scene cuts: segments align across variants.
            opts.set("x264-params", "scenecut=0");
        }
        EncoderKind::Nvenc => {
            opts.set("preset", "p2");
            opts.set("tune", "ll");
            opts.set("rc", "cbr");
            opts.set("zerolatency", "1");
            opts.set("profile", "main");
            opts.set("no-scenecut", "1");
        }
    }
    Ok(enc.open_as_with(codec, opts)?)
}

/// The H.264 decoder: NVDEC (`h264_cuvid`) next to NVENC when it opens,
/// else ffmpeg's own (frame threads, as the ffmpeg CLI uses).
pub fn open_decoder(
    kind: EncoderKind,
) -> Result<(ffmpeg::decoder::Video, &'static str), TranscodeError> {
    init_ffmpeg()?;
    if kind == EncoderKind::Nvenc
        && let Some(cuvid) = ffmpeg::decoder::find_by_name("h264_cuvid")
        && let Ok(d) = ffmpeg::codec::context::Context::new_with_codec(cuvid)
            .decoder()
            .video()
    {
        return Ok((d, "h264_cuvid"));
    }
    let h264 = ffmpeg::decoder::find(ffmpeg::codec::Id::H264)
        .ok_or(TranscodeError::Missing("H.264 decoder"))?;
    let mut ctx = ffmpeg::codec::context::Context::new_with_codec(h264);
    ctx.set_threading(ffmpeg::codec::threading::Config {
        kind: ffmpeg::codec::threading::Type::Frame,
        count: 0,
        ..Default::default()
    });
    Ok((ctx.decoder().video()?, "h264"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse() {
        assert_eq!("auto".parse::<EncoderChoice>(), Ok(EncoderChoice::Auto));
        assert_eq!("NVENC".parse::<EncoderChoice>(), Ok(EncoderChoice::Nvenc));
        assert_eq!("libx264".parse::<EncoderChoice>(), Ok(EncoderChoice::X264));
        assert!("vp8".parse::<EncoderChoice>().is_err());
    }

    /// On a machine without an NVIDIA GPU the probe fails and the choice
    /// falls back to libx264; with one it is NVENC. Either way an encoder
    /// opens.
    #[test]
    fn the_choice_opens() {
        let kind = choose(EncoderChoice::Auto);
        open_encoder(kind, 320, 180, 30.0, 300).unwrap();
        assert_eq!(choose(EncoderChoice::X264), EncoderKind::X264);
    }
}
