//! Re-encoding of H.264 that WebRTC receivers cannot decode as it is:
//! streams with B-frames. Chromium's WebRTC H.264 decoder decodes a handful
//! of frames of such a stream and then fails until the next keyframe, with
//! the frames in decode order and whichever of PTS or DTS is the RTP
//! timestamp (measured; see `docs/architecture.md`, "SRT ingest"). Encoders
//! that stream to WebRTC (OBS with `bframes=0`, x264 `-tune zerolatency`)
//! send none, and those are passed through untouched; a stream with B-frames
//! is decoded and encoded again here — libx264, no B-frames, zero latency —
//! on a thread of its own with a bounded queue.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Instant, SystemTime};

use ffmpeg_next as ffmpeg;

use super::audio::{TranscodeError, init_ffmpeg};
use super::h264::{AccessUnit, H264Stream};

/// Access units queued for the re-encoder before new ones are dropped.
const QUEUE: usize = 16;
/// Keyframe interval of the re-encoded stream, in frames (2 s at 30 fps).
const GOP: u32 = 60;

/// A re-encoded access unit with its media time (90 kHz).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedUnit {
    /// Media time, 90 kHz (presentation time: there is no reordering left).
    pub time: i64,
    /// The access unit, SPS and PPS before each IDR.
    pub au: AccessUnit,
}

/// H.264 in (any GOP structure) → H.264 out without B-frames.
pub struct H264Reencoder {
    decoder: ffmpeg::decoder::Video,
    encoder: Option<((u32, u32), ffmpeg::encoder::Video)>,
    scaler: Option<(
        ffmpeg::format::Pixel,
        (u32, u32),
        ffmpeg::software::scaling::Context,
    )>,
    decoded: ffmpeg::frame::Video,
    params: H264Stream,
    /// Which encoder runs (libx264 here; the transcoder ladder chooses NVENC).
    pub encoder_name: &'static str,
}

impl std::fmt::Debug for H264Reencoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H264Reencoder").finish_non_exhaustive()
    }
}

impl H264Reencoder {
    /// Opens the H.264 decoder; the encoder opens at the first frame, when
    /// the size is known.
    pub fn new() -> Result<Self, TranscodeError> {
        Self::from(ffmpeg::codec::Id::H264)
    }

    /// Decodes `codec` (H.264, VP8) instead: any of them in, H.264 out.
    pub fn from(codec: ffmpeg::codec::Id) -> Result<Self, TranscodeError> {
        init_ffmpeg()?;
        let h264 = ffmpeg::decoder::find(codec).ok_or(TranscodeError::Missing("video decoder"))?;
        ffmpeg::encoder::find_by_name("libx264")
            .ok_or(TranscodeError::Missing("libx264 encoder"))?;
        let decoder = ffmpeg::codec::context::Context::new_with_codec(h264)
            .decoder()
            .video()?;
        Ok(Self {
            decoder,
            encoder: None,
            scaler: None,
            decoded: ffmpeg::frame::Video::empty(),
            params: H264Stream::new(),
            encoder_name: "libx264",
        })
    }

    fn open_encoder(width: u32, height: u32) -> Result<ffmpeg::encoder::Video, TranscodeError> {
        let codec = ffmpeg::encoder::find_by_name("libx264")
            .ok_or(TranscodeError::Missing("libx264 encoder"))?;
        let mut enc = ffmpeg::codec::context::Context::new_with_codec(codec)
            .encoder()
            .video()?;
        enc.set_width(width);
        enc.set_height(height);
        enc.set_format(ffmpeg::format::Pixel::YUV420P);
        enc.set_time_base((1, 90_000));
        enc.set_frame_rate(Some((30, 1)));
        enc.set_gop(GOP);
        enc.set_max_b_frames(0);
        let mut opts = ffmpeg::Dictionary::new();
        opts.set("preset", "veryfast");
        opts.set("tune", "zerolatency");
        opts.set("profile", "baseline");
        Ok(enc.open_as_with(codec, opts)?)
    }

    /// Feeds one access unit (Annex-B) with its decode-order media time and
    /// presentation time (90 kHz); appends what the encoder gives back.
    pub fn push(
        &mut self,
        au: &[u8],
        pts: i64,
        out: &mut Vec<EncodedUnit>,
    ) -> Result<(), TranscodeError> {
        let mut packet = ffmpeg::Packet::copy(au);
        packet.set_pts(Some(pts));
        self.decoder.send_packet(&packet)?;
        while self.decoder.receive_frame(&mut self.decoded).is_ok() {
            let time = self.decoded.pts().unwrap_or(pts);
            let size = (self.decoded.width(), self.decoded.height());
            if size.0 == 0 || size.1 == 0 {
                continue;
            }
            if self.encoder.as_ref().is_none_or(|(s, _)| *s != size) {
                self.encoder = Some((size, Self::open_encoder(size.0, size.1)?));
            }
            let format = self.decoded.format();
            let mut frame = if format == ffmpeg::format::Pixel::YUV420P {
                self.decoded.clone()
            } else {
                if self
                    .scaler
                    .as_ref()
                    .is_none_or(|(f, s, _)| *f != format || *s != size)
                {
                    let ctx = ffmpeg::software::scaling::Context::get(
                        format,
                        size.0,
                        size.1,
                        ffmpeg::format::Pixel::YUV420P,
                        size.0,
                        size.1,
                        ffmpeg::software::scaling::Flags::BILINEAR,
                    )?;
                    self.scaler = Some((format, size, ctx));
                }
                let mut converted = ffmpeg::frame::Video::empty();
                if let Some((_, _, ctx)) = self.scaler.as_mut() {
                    ctx.run(&self.decoded, &mut converted)?;
                }
                converted
            };
            frame.set_pts(Some(time));
            frame.set_kind(ffmpeg::picture::Type::None);
            let Some((_, encoder)) = self.encoder.as_mut() else {
                continue;
            };
            encoder.send_frame(&frame)?;
            let mut encoded = ffmpeg::Packet::empty();
            while encoder.receive_packet(&mut encoded).is_ok() {
                let Some(data) = encoded.data() else {
                    continue;
                };
                if let Some(au) = self.params.access_unit(data) {
                    out.push(EncodedUnit {
                        time: encoded.pts().unwrap_or(time),
                        au,
                    });
                }
            }
        }
        Ok(())
    }
}

/// What the re-encoder thread is handed.
#[derive(Debug)]
pub struct VideoJob {
    /// One access unit, Annex-B.
    pub au: Vec<u8>,
    /// Whether it holds an IDR.
    pub keyframe: bool,
    /// Presentation time on the room's timeline, 90 kHz.
    pub pts: i64,
    /// The wall clock `pts` maps to.
    pub network_time: Instant,
    /// When the publisher sent it (abs-capture-time for viewers).
    pub capture: Option<SystemTime>,
}

/// The sending side of a re-encoder thread: never blocks.
#[derive(Debug)]
pub struct VideoTranscoder {
    jobs: SyncSender<VideoJob>,
    /// After a drop, everything up to the next keyframe is dropped too
    /// (the decoder could not use it).
    skipping: bool,
}

impl VideoTranscoder {
    /// Starts the thread; each re-encoded access unit goes to `emit` with
    /// its media time (90 kHz), wall clock and send time.
    pub fn spawn(
        name: String,
        emit: impl FnMut(EncodedUnit, Instant, Option<SystemTime>) + Send + 'static,
    ) -> Result<Self, TranscodeError> {
        // Opened once here so a missing codec is reported at once; the
        // thread opens its own (ffmpeg's scaler may not cross threads).
        drop(H264Reencoder::new()?);
        let (jobs, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || match H264Reencoder::new() {
                Ok(codec) => run(codec, rx, emit),
                Err(e) => tracing::error!(error = %e, "H.264 re-encoder did not start"),
            })
            .map_err(|_| TranscodeError::Missing("a thread for the transcoder"))?;
        Ok(Self {
            jobs,
            skipping: false,
        })
    }

    /// Queues an access unit; when the re-encoder is behind, it and every
    /// access unit up to the next keyframe are dropped and counted
    /// (`weir_transcode_dropped_total{kind="video"}`).
    pub fn push(&mut self, job: VideoJob) {
        if self.skipping && !job.keyframe {
            metrics::counter!("weir_transcode_dropped_total", "kind" => "video").increment(1);
            return;
        }
        match self.jobs.try_send(job) {
            Ok(()) => self.skipping = false,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.skipping = true;
                metrics::counter!("weir_transcode_dropped_total", "kind" => "video").increment(1);
            }
        }
    }
}

fn run(
    mut codec: H264Reencoder,
    rx: Receiver<VideoJob>,
    mut emit: impl FnMut(EncodedUnit, Instant, Option<SystemTime>),
) {
    let mut out = Vec::new();
    let mut errors = 0u64;
    // Wall clock of recent inputs by media time, to give outputs theirs.
    let mut clocks: std::collections::VecDeque<(i64, Instant, Option<SystemTime>)> =
        Default::default();
    while let Ok(job) = rx.recv() {
        clocks.push_back((job.pts, job.network_time, job.capture));
        if clocks.len() > 64 {
            clocks.pop_front();
        }
        if let Err(e) = codec.push(&job.au, job.pts, &mut out) {
            errors += 1;
            metrics::counter!("weir_transcode_errors_total", "kind" => "video").increment(1);
            if errors.is_power_of_two() {
                tracing::warn!(error = %e, errors, "H.264 access unit could not be re-encoded");
            }
        }
        for unit in out.drain(..) {
            let (wall, capture) = clocks
                .iter()
                .find(|(t, _, _)| *t == unit.time)
                .map(|(_, w, c)| (*w, *c))
                .unwrap_or((job.network_time, job.capture));
            metrics::counter!("weir_transcode_frames_total", "kind" => "video", "encoder" => codec.encoder_name)
                .increment(1);
            emit(unit, wall, capture);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ingest::h264::nal_units;
    use crate::ingest::ts::{StreamKind, TsDemuxer};

    /// x264 with its default B-frames, through the demuxer and the
    /// re-encoder: what comes out has no reordering (PTS rising in output
    /// order) and starts with a decodable keyframe.
    #[test]
    fn b_frames_are_reencoded_away() {
        let out = std::process::Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i"])
            .arg("testsrc2=size=320x240:rate=30:duration=2")
            .args([
                "-pix_fmt", "yuv420p", "-c:v", "libx264", "-bf", "2", "-g", "30",
            ])
            .args(["-f", "mpegts", "-"])
            .output()
            .unwrap_or_else(|e| panic!("ffmpeg CLI is needed (deploy/setup.sh): {e}"));
        assert!(out.status.success());
        let mut demux = TsDemuxer::new();
        let mut pes = Vec::new();
        demux.push(&out.stdout, &mut pes);
        demux.flush(&mut pes);
        let video: Vec<_> = pes.iter().filter(|p| p.kind == StreamKind::H264).collect();
        assert!(video.len() >= 55, "{} access units", video.len());
        assert!(
            video.iter().any(|p| p.dts.is_some()),
            "the input has B-frames (DTS differs from PTS)"
        );
        let mut codec = H264Reencoder::new().unwrap_or_else(|e| panic!("{e}"));
        let mut units = Vec::new();
        for p in &video {
            codec
                .push(&p.data, p.pts.unwrap_or(0), &mut units)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(units.len() >= 50, "{} re-encoded units", units.len());
        assert!(units[0].au.keyframe);
        let first: Vec<u8> = nal_units(&units[0].au.data).map(|n| n[0] & 0x1f).collect();
        assert_eq!(&first[..2], &[7, 8], "SPS and PPS lead the first keyframe");
        for w in units.windows(2) {
            assert!(w[1].time > w[0].time, "no reordering left");
        }
        // Garbage is an error or nothing, never a panic.
        let _ = codec.push(&[0, 0, 0, 1, 0x65, 0xff, 0x00, 0x12], 0, &mut units);
    }
}
