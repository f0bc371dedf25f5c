//! The ABR ladder itself, synchronous: decode the source once, scale it to
//! every rendition smaller than the source and encode each, keyframes
//! where the source has them (so segments align across variants). The
//! transcoder thread drives it; benchmarks drive it directly.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use ffmpeg_next as ffmpeg;

use super::Rendition;
use super::encoder::{self, EncoderKind};
use crate::hls::segmenter::VideoIn;
use crate::ingest::audio::TranscodeError;

/// One rendition being encoded.
struct Rung {
    name: Arc<str>,
    size: (u32, u32),
    scaler: ffmpeg::software::scaling::Context,
    encoder: ffmpeg::encoder::Video,
    scaled: ffmpeg::frame::Video,
}

/// Decoder, scalers and encoders of one source.
pub struct LadderEncoder {
    label: String,
    kind: EncoderKind,
    renditions: Vec<Rendition>,
    decoder: ffmpeg::decoder::Video,
    decoder_name: &'static str,
    /// Source size and format the rungs were built for.
    source: Option<(u32, u32, ffmpeg::format::Pixel)>,
    rungs: Vec<Rung>,
    left_out: Vec<Arc<str>>,
    decoded: ffmpeg::frame::Video,
    encoded: ffmpeg::Packet,
    recent_pts: VecDeque<i64>,
    errors: u64,
}

impl std::fmt::Debug for LadderEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LadderEncoder")
            .field("label", &self.label)
            .field("encoder", &self.kind)
            .field("decoder", &self.decoder_name)
            .finish_non_exhaustive()
    }
}

fn even(v: u32) -> u32 {
    (v / 2 * 2).max(2)
}

/// Frames per second from recent presentation times (in decode order, so
/// possibly reordered): the smallest gap between two of them is one frame.
fn fps(recent: &VecDeque<i64>) -> f64 {
    let mut sorted: Vec<i64> = recent.iter().copied().collect();
    sorted.sort_unstable();
    sorted
        .windows(2)
        .map(|w| w[1] - w[0])
        .filter(|d| *d > 0)
        .min()
        .map(|d| (90_000.0 / d as f64).clamp(1.0, 240.0))
        .unwrap_or(30.0)
}

impl LadderEncoder {
    /// Opens the decoder (NVDEC next to NVENC when it opens); encoders open
    /// at the first picture, when the source's size is known. `label`
    /// names it in logs (the room).
    pub fn new(
        label: String,
        renditions: Vec<Rendition>,
        kind: EncoderKind,
    ) -> Result<Self, TranscodeError> {
        let (decoder, decoder_name) = encoder::open_decoder(kind)?;
        Ok(Self {
            label,
            kind,
            renditions,
            decoder,
            decoder_name,
            source: None,
            rungs: Vec::new(),
            left_out: Vec::new(),
            decoded: ffmpeg::frame::Video::empty(),
            encoded: ffmpeg::Packet::empty(),
            recent_pts: VecDeque::new(),
            errors: 0,
        })
    }

    /// The encoder in use.
    pub fn encoder(&self) -> EncoderKind {
        self.kind
    }

    /// Renditions left out since the last call (not smaller than the
    /// source, or their encoder would not open).
    pub fn take_left_out(&mut self) -> Vec<Arc<str>> {
        std::mem::take(&mut self.left_out)
    }

    /// Names of the renditions being encoded.
    pub fn rendition_names(&self) -> Vec<Arc<str>> {
        self.rungs.iter().map(|r| r.name.clone()).collect()
    }

    /// Feeds one source access unit (Annex-B, decode order, times 90 kHz).
    /// `picture` sees every decoded source picture and whether it is a
    /// keyframe; encoded access units of the renditions go to `out`.
    pub fn push(
        &mut self,
        au: &[u8],
        pts: i64,
        dts: i64,
        keyframe: bool,
        mut picture: impl FnMut(&ffmpeg::frame::Video, bool),
        out: &mut Vec<(Arc<str>, VideoIn)>,
    ) -> Result<(), TranscodeError> {
        self.recent_pts.push_back(pts);
        if self.recent_pts.len() > 16 {
            self.recent_pts.pop_front();
        }
        let mut packet = ffmpeg::Packet::copy(au);
        packet.set_pts(Some(pts));
        packet.set_dts(Some(dts));
        if keyframe {
            packet.set_flags(ffmpeg::codec::packet::Flags::KEY);
        }
        self.decoder.send_packet(&packet)?;
        self.drain(&mut picture, out);
        Ok(())
    }

    /// Drains the decoder and the encoders at the end of the stream.
    pub fn finish(
        &mut self,
        mut picture: impl FnMut(&ffmpeg::frame::Video, bool),
        out: &mut Vec<(Arc<str>, VideoIn)>,
    ) {
        let _ = self.decoder.send_eof();
        self.drain(&mut picture, out);
        for rung in &mut self.rungs {
            let _ = rung.encoder.send_eof();
            while rung.encoder.receive_packet(&mut self.encoded).is_ok() {
                emit(&rung.name, &self.encoded, self.kind, out);
            }
        }
    }

    fn drain(
        &mut self,
        picture: &mut impl FnMut(&ffmpeg::frame::Video, bool),
        out: &mut Vec<(Arc<str>, VideoIn)>,
    ) {
        while self.decoder.receive_frame(&mut self.decoded).is_ok() {
            let pts = self.decoded.timestamp().or(self.decoded.pts()).unwrap_or(0);
            let key = self.decoded.is_key();
            picture(&self.decoded, key);
            let source = (
                self.decoded.width(),
                self.decoded.height(),
                self.decoded.format(),
            );
            if source.0 == 0 || source.1 == 0 {
                continue;
            }
            if self.source != Some(source) {
                self.build(source);
            }
            for rung in &mut self.rungs {
                if let Err(e) = rung.scaler.run(&self.decoded, &mut rung.scaled) {
                    self.errors += 1;
                    if self.errors.is_power_of_two() {
                        tracing::warn!(room = %self.label, error = %e, "transcoder: scaling failed");
                    }
                    continue;
                }
                rung.scaled.set_pts(Some(pts));
                rung.scaled.set_kind(if key {
                    ffmpeg::picture::Type::I
                } else {
                    ffmpeg::picture::Type::None
                });
                if let Err(e) = rung.encoder.send_frame(&rung.scaled) {
                    self.errors += 1;
                    metrics::counter!("weir_transcode_errors_total", "kind" => "ladder")
                        .increment(1);
                    if self.errors.is_power_of_two() {
                        tracing::warn!(room = %self.label, rendition = %rung.name, error = %e, "transcoder: encoding failed");
                    }
                    continue;
                }
                while rung.encoder.receive_packet(&mut self.encoded).is_ok() {
                    emit(&rung.name, &self.encoded, self.kind, out);
                }
            }
        }
    }

    /// Opens a scaler and an encoder per rendition smaller than the source.
    fn build(&mut self, source: (u32, u32, ffmpeg::format::Pixel)) {
        let (sw, sh, format) = source;
        let fps = fps(&self.recent_pts);
        let previous: Vec<Arc<str>> = self.rungs.drain(..).map(|r| r.name).collect();
        for r in &self.renditions {
            let name: Arc<str> = Arc::from(r.name.as_str());
            if r.height >= sh {
                tracing::info!(room = %self.label, rendition = %r.name, source_height = sh, "rendition left out: not smaller than the source");
                self.left_out.push(name);
                continue;
            }
            let h = even(r.height);
            let w =
                even(((u64::from(sw) * u64::from(h) + u64::from(sh) / 2) / u64::from(sh)) as u32);
            let opened = ffmpeg::software::scaling::Context::get(
                format,
                sw,
                sh,
                ffmpeg::format::Pixel::YUV420P,
                w,
                h,
                ffmpeg::software::scaling::Flags::BILINEAR,
            )
            .map_err(TranscodeError::from)
            .and_then(|scaler| {
                encoder::open_encoder(self.kind, w, h, fps, r.kbps).map(|e| (scaler, e))
            });
            match opened {
                Ok((scaler, encoder)) => self.rungs.push(Rung {
                    name,
                    size: (w, h),
                    scaler,
                    encoder,
                    scaled: ffmpeg::frame::Video::empty(),
                }),
                Err(e) => {
                    tracing::error!(room = %self.label, rendition = %r.name, error = %e, "rendition cannot be encoded; left out");
                    self.left_out.push(name);
                }
            }
        }
        // A rendition that was encoded before and is not now is left out too.
        for p in previous {
            if !self.rungs.iter().any(|r| r.name == p) && !self.left_out.contains(&p) {
                self.left_out.push(p);
            }
        }
        self.source = Some(source);
        tracing::info!(
            room = %self.label,
            source = %format!("{sw}x{sh}"),
            fps = format!("{fps:.2}"),
            renditions = ?self.rungs.iter().map(|r| format!("{} {}x{}", r.name, r.size.0, r.size.1)).collect::<Vec<_>>(),
            encoder = self.kind.name(),
            decoder = self.decoder_name,
            "transcoder ladder ready"
        );
    }
}

fn emit(
    name: &Arc<str>,
    packet: &ffmpeg::Packet,
    kind: EncoderKind,
    out: &mut Vec<(Arc<str>, VideoIn)>,
) {
    let Some(data) = packet.data() else {
        return;
    };
    let pts = packet.pts().unwrap_or(0);
    metrics::counter!("weir_transcode_frames_total", "kind" => "ladder", "encoder" => kind.name())
        .increment(1);
    out.push((
        name.clone(),
        VideoIn {
            annexb: Bytes::copy_from_slice(data),
            pts,
            dts: packet.dts().unwrap_or(pts),
            keyframe: packet.is_key(),
            wall: SystemTime::now(),
        },
    ));
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ingest::h264::H264Stream;
    use crate::ingest::ts::{StreamKind, TsDemuxer};
    use crate::transcode::Ladder;

    /// A real x264 stream (with B-frames) through the ladder: every
    /// rendition smaller than the source comes out at its size, with
    /// keyframes where the source has them; larger ones are left out.
    #[test]
    fn renditions_come_out_at_their_sizes_with_aligned_keyframes() {
        let out = std::process::Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i"])
            .arg("testsrc2=size=640x360:rate=30:duration=3")
            .args(["-pix_fmt", "yuv420p", "-c:v", "libx264", "-g", "30"])
            .args(["-f", "mpegts", "-"])
            .output()
            .unwrap_or_else(|e| panic!("ffmpeg CLI is needed (deploy/setup.sh): {e}"));
        assert!(out.status.success());
        let mut demux = TsDemuxer::new();
        let mut pes = Vec::new();
        demux.push(&out.stdout, &mut pes);
        demux.flush(&mut pes);
        let ladder = Ladder::parse("720p,240p,160p").unwrap();
        let mut enc =
            LadderEncoder::new("test".into(), ladder.renditions, EncoderKind::X264).unwrap();
        let mut h264 = H264Stream::new();
        let mut units = Vec::new();
        let mut pictures = 0;
        let mut source_keys = Vec::new();
        for p in pes.iter().filter(|p| p.kind == StreamKind::H264) {
            let au = h264.access_unit(&p.data).unwrap();
            let pts = p.pts.unwrap();
            let dts = p.dts.unwrap_or(pts);
            enc.push(
                &au.data,
                pts,
                dts,
                au.keyframe,
                |_, key| {
                    pictures += 1;
                    if key {
                        source_keys.push(pictures);
                    }
                },
                &mut units,
            )
            .unwrap();
        }
        enc.finish(|_, _| pictures += 1, &mut units);
        assert_eq!(pictures, 90);
        assert_eq!(&*enc.take_left_out()[0], "720p");
        for (name, size) in [("240p", (426, 240)), ("160p", (284, 160))] {
            let frames: Vec<&VideoIn> = units
                .iter()
                .filter(|(n, _)| &**n == name)
                .map(|(_, v)| v)
                .collect();
            assert_eq!(frames.len(), 90, "{name}");
            let keys: Vec<i64> = frames
                .iter()
                .filter(|v| v.keyframe)
                .map(|v| v.pts)
                .collect();
            assert_eq!(keys.len(), 3, "{name}: one keyframe per source keyframe");
            let sps = crate::ingest::h264::nal_units(&frames[0].annexb)
                .find(|n| n[0] & 0x1f == 7)
                .unwrap();
            let info = crate::hls::sps::parse(sps).unwrap();
            assert_eq!((info.width, info.height), size);
        }
        // Garbage is an error or nothing, never a panic.
        let _ = enc.push(&[0, 0, 0, 1, 0x65, 0xff], 0, 0, true, |_, _| {}, &mut units);
    }
}
