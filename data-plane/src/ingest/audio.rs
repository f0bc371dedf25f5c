//! Audio of an SRT stream, made fit for WebRTC: AAC (ADTS) is decoded,
//! resampled to 48 kHz stereo and encoded to Opus through ffmpeg's libraries
//! on a thread of its own; Opus carried in TS is unwrapped and passed as is.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use ffmpeg_next as ffmpeg;

/// Samples per Opus frame at 48 kHz (20 ms).
pub const OPUS_FRAME: usize = 960;
const OUT_RATE: u32 = 48_000;
/// Opus bit rate: stereo music, not just speech.
const OPUS_BITRATE: usize = 128_000;
/// AAC frames queued for the transcoder before new ones are dropped.
const QUEUE: usize = 64;

const ADTS_RATES: [u32; 13] = [
    96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
];

/// One ADTS frame found in a PES payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdtsFrame<'a> {
    /// The whole frame, header included (ffmpeg's decoder reads the header).
    pub data: &'a [u8],
    /// Its sample rate.
    pub rate: u32,
}

/// Splits a PES payload into ADTS frames; stops at the first damaged one.
pub fn adts_frames(mut data: &[u8]) -> Vec<AdtsFrame<'_>> {
    let mut out = Vec::new();
    while data.len() >= 7 {
        if data[0] != 0xff || data[1] & 0xf0 != 0xf0 {
            break;
        }
        let rate_index = usize::from((data[2] >> 2) & 0x0f);
        let len = (usize::from(data[3] & 0x03) << 11)
            | (usize::from(data[4]) << 3)
            | (usize::from(data[5]) >> 5);
        let header = if data[1] & 0x01 == 0 { 9 } else { 7 };
        let (Some(&rate), Some(frame)) = (ADTS_RATES.get(rate_index), data.get(..len)) else {
            break;
        };
        if len <= header {
            break;
        }
        out.push(AdtsFrame { data: frame, rate });
        data = &data[len..];
    }
    out
}

/// Splits a PES payload of Opus in TS (ETSI TS 102 366 style control
/// headers: `0x7FE0` prefix, flags, size bytes, optional trims) into Opus
/// packets.
pub fn opus_packets(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        if data[0] != 0x7f || data[1] & 0xe0 != 0xe0 {
            break;
        }
        let start_trim = data[1] & 0x10 != 0;
        let end_trim = data[1] & 0x08 != 0;
        let extension = data[1] & 0x04 != 0;
        let mut i = 2;
        let mut size = 0usize;
        loop {
            let Some(&b) = data.get(i) else {
                return out;
            };
            i += 1;
            size += usize::from(b);
            if b != 0xff {
                break;
            }
        }
        if start_trim {
            i += 2;
        }
        if end_trim {
            i += 2;
        }
        if extension {
            let Some(&n) = data.get(i) else {
                return out;
            };
            i += 1 + usize::from(n);
        }
        let Some(packet) = data.get(i..i + size) else {
            return out;
        };
        if !packet.is_empty() {
            out.push(packet);
        }
        data = &data[i + size..];
    }
    out
}

/// Duration of an Opus packet in 48 kHz samples, from its TOC byte
/// (RFC 6716 section 3.1); `None` for a malformed packet.
pub fn opus_duration(packet: &[u8]) -> Option<u32> {
    let toc = *packet.first()?;
    let config = toc >> 3;
    let per_frame = match config {
        0..=11 => [480, 960, 1920, 2880][usize::from(config % 4)],
        12..=15 => [480, 960][usize::from(config % 2)],
        _ => [120, 240, 480, 960][usize::from(config % 4)],
    };
    let frames = match toc & 0x03 {
        0 => 1,
        1 | 2 => 2,
        _ => u32::from(*packet.get(1)? & 0x3f),
    };
    Some(per_frame * frames)
}

/// Why the transcoder could not start or went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TranscodeError {
    /// An ffmpeg encoder or decoder is missing from the system libraries.
    #[error("ffmpeg has no {0}")]
    Missing(&'static str),
    /// ffmpeg refused something.
    #[error("ffmpeg: {0}")]
    Ffmpeg(#[from] ffmpeg::Error),
}

/// An encoded Opus packet with its media time (48 kHz).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpusPacket {
    /// Media time of its first sample, 48 kHz.
    pub time: i64,
    /// The packet.
    pub data: Vec<u8>,
}

/// AAC → Opus: decode, resample to 48 kHz stereo, encode 20 ms frames.
pub struct AacToOpus {
    decoder: ffmpeg::decoder::Audio,
    resampler: Resampler,
    encoder: ffmpeg::encoder::Audio,
    /// Interleaved stereo samples waiting for a full frame.
    pending: Vec<i16>,
    /// Media time (48 kHz) of `pending[0]`.
    pending_time: i64,
    /// Times of frames sent to the encoder, oldest first.
    sent: std::collections::VecDeque<i64>,
    decoded: ffmpeg::frame::Audio,
}

type ResamplerKey = (ffmpeg::format::Sample, u64, u32);

/// Decoded audio to 48 kHz stereo in one sample format, through a resampler
/// opened for the input's format, layout and rate (again when they change).
struct Resampler {
    format: ffmpeg::format::Sample,
    current: Option<(ResamplerKey, ffmpeg::software::resampling::Context)>,
}

impl Resampler {
    fn new(format: ffmpeg::format::Sample) -> Self {
        Self {
            format,
            current: None,
        }
    }

    fn run(
        &mut self,
        decoded: &ffmpeg::frame::Audio,
    ) -> Result<ffmpeg::frame::Audio, TranscodeError> {
        let layout = if decoded.channel_layout().bits() == 0 {
            ffmpeg::ChannelLayout::default(i32::from(decoded.channels()))
        } else {
            decoded.channel_layout()
        };
        let key = (decoded.format(), layout.bits(), decoded.rate());
        let ctx = match &mut self.current {
            Some((k, ctx)) if *k == key => ctx,
            current => {
                let ctx = ffmpeg::software::resampling::Context::get(
                    decoded.format(),
                    layout,
                    decoded.rate(),
                    self.format,
                    ffmpeg::ChannelLayout::STEREO,
                    OUT_RATE,
                )?;
                &mut current.insert((key, ctx)).1
            }
        };
        let mut input = decoded.clone();
        input.set_channel_layout(layout);
        // Room for every sample this frame and the resampler's buffer can
        // give (ffmpeg-next would size it for the input's count, and an
        // upsampler would then fall further behind with every frame).
        let capacity = input.samples() * OUT_RATE as usize / input.rate().max(1) as usize + 512;
        let mut resampled =
            ffmpeg::frame::Audio::new(self.format, capacity, ffmpeg::ChannelLayout::STEREO);
        ctx.run(&input, &mut resampled)?;
        Ok(resampled)
    }
}

impl std::fmt::Debug for AacToOpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AacToOpus").finish_non_exhaustive()
    }
}

/// Initializes ffmpeg's libraries once (idempotent).
pub fn init_ffmpeg() -> Result<(), TranscodeError> {
    ffmpeg::init()?;
    // ffmpeg's own logging would go to stderr unstructured; errors surface
    // through return codes and our logs instead.
    ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Fatal);
    Ok(())
}

impl AacToOpus {
    /// Opens the AAC decoder and the libopus encoder.
    pub fn new() -> Result<Self, TranscodeError> {
        init_ffmpeg()?;
        let aac = ffmpeg::decoder::find(ffmpeg::codec::Id::AAC)
            .ok_or(TranscodeError::Missing("AAC decoder"))?;
        let decoder = ffmpeg::codec::context::Context::new_with_codec(aac)
            .decoder()
            .audio()?;
        let opus = ffmpeg::encoder::find_by_name("libopus")
            .ok_or(TranscodeError::Missing("libopus encoder"))?;
        let mut enc = ffmpeg::codec::context::Context::new_with_codec(opus)
            .encoder()
            .audio()?;
        enc.set_rate(OUT_RATE as i32);
        enc.set_channel_layout(ffmpeg::ChannelLayout::STEREO);
        enc.set_channels(2);
        enc.set_format(ffmpeg::format::Sample::I16(
            ffmpeg::format::sample::Type::Packed,
        ));
        enc.set_bit_rate(OPUS_BITRATE);
        enc.set_time_base((1, OUT_RATE as i32));
        let mut opts = ffmpeg::Dictionary::new();
        opts.set("application", "audio");
        opts.set("frame_duration", "20");
        let encoder = enc.open_as_with(opus, opts)?;
        Ok(Self {
            decoder,
            resampler: Resampler::new(ffmpeg::format::Sample::I16(
                ffmpeg::format::sample::Type::Packed,
            )),
            encoder,
            pending: Vec::with_capacity(OPUS_FRAME * 4),
            pending_time: 0,
            sent: Default::default(),
            decoded: ffmpeg::frame::Audio::empty(),
        })
    }

    /// Decodes one ADTS frame whose first sample is at `time` (48 kHz) and
    /// appends the Opus packets now complete. A gap or overlap of more than
    /// one frame in `time` restarts the output timeline there.
    pub fn push(
        &mut self,
        adts: &[u8],
        time: i64,
        out: &mut Vec<OpusPacket>,
    ) -> Result<(), TranscodeError> {
        let mut packet = ffmpeg::Packet::copy(adts);
        packet.set_pts(Some(time));
        self.decoder.send_packet(&packet)?;
        while self.decoder.receive_frame(&mut self.decoded).is_ok() {
            // The decoder may hold a packet back: the frame's own time
            // (the packet's, carried through) is what counts.
            let frame_time = self.decoded.pts().unwrap_or(time);
            let expected = self.pending_time + (self.pending.len() / 2) as i64;
            if self.pending.is_empty() || (frame_time - expected).abs() > OPUS_FRAME as i64 {
                self.pending.clear();
                self.pending_time = frame_time;
            }
            self.resample()?;
            self.encode(out)?;
        }
        Ok(())
    }

    fn resample(&mut self) -> Result<(), TranscodeError> {
        let resampled = self.resampler.run(&self.decoded)?;
        let n = resampled.samples() * 2;
        let bytes = resampled.data(0);
        self.pending.extend(
            bytes
                .chunks_exact(2)
                .take(n)
                .map(|b| i16::from_ne_bytes([b[0], b[1]])),
        );
        Ok(())
    }

    fn encode(&mut self, out: &mut Vec<OpusPacket>) -> Result<(), TranscodeError> {
        while self.pending.len() >= OPUS_FRAME * 2 {
            let mut frame = ffmpeg::frame::Audio::new(
                ffmpeg::format::Sample::I16(ffmpeg::format::sample::Type::Packed),
                OPUS_FRAME,
                ffmpeg::ChannelLayout::STEREO,
            );
            frame.set_rate(OUT_RATE);
            frame.set_pts(Some(self.pending_time));
            {
                let dst = frame.data_mut(0);
                for (d, s) in dst
                    .chunks_exact_mut(2)
                    .zip(self.pending.drain(..OPUS_FRAME * 2))
                {
                    d.copy_from_slice(&s.to_ne_bytes());
                }
            }
            self.sent.push_back(self.pending_time);
            self.pending_time += OPUS_FRAME as i64;
            self.encoder.send_frame(&frame)?;
            let mut packet = ffmpeg::Packet::empty();
            while self.encoder.receive_packet(&mut packet).is_ok() {
                let time = self.sent.pop_front().unwrap_or(self.pending_time);
                if let Some(data) = packet.data() {
                    out.push(OpusPacket {
                        time,
                        data: data.to_vec(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// AAC bit rate for HLS audio transcoded from Opus.
const AAC_BITRATE: usize = 128_000;
/// Samples per AAC-LC frame.
const AAC_FRAME: usize = 1024;

/// An AAC frame with its ADTS header, and the media time (48 kHz) of its
/// first sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdtsPacket {
    pub time: i64,
    pub adts: Vec<u8>,
}

/// Opus → AAC (for HLS of WebRTC-published rooms): decode, resample to
/// 48 kHz stereo planar float, encode AAC-LC frames of 1024 samples with
/// ffmpeg's own encoder, each wrapped in an ADTS header.
pub struct OpusToAac {
    decoder: ffmpeg::decoder::Audio,
    resampler: Resampler,
    encoder: ffmpeg::encoder::Audio,
    /// Left and right samples waiting for a full frame.
    pending: [Vec<f32>; 2],
    /// Media time (48 kHz) of `pending[_][0]`.
    pending_time: i64,
    sent: std::collections::VecDeque<i64>,
    decoded: ffmpeg::frame::Audio,
}

impl std::fmt::Debug for OpusToAac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpusToAac").finish_non_exhaustive()
    }
}

const FLTP: ffmpeg::format::Sample =
    ffmpeg::format::Sample::F32(ffmpeg::format::sample::Type::Planar);

impl OpusToAac {
    /// Opens the Opus decoder and the AAC encoder.
    pub fn new() -> Result<Self, TranscodeError> {
        init_ffmpeg()?;
        let opus = ffmpeg::decoder::find(ffmpeg::codec::Id::OPUS)
            .ok_or(TranscodeError::Missing("Opus decoder"))?;
        // No extradata: ffmpeg's decoder then takes WebRTC's 48 kHz stereo.
        let dec = ffmpeg::codec::context::Context::new_with_codec(opus);
        let decoder = dec.decoder().audio()?;
        let aac = ffmpeg::encoder::find(ffmpeg::codec::Id::AAC)
            .ok_or(TranscodeError::Missing("AAC encoder"))?;
        let mut enc = ffmpeg::codec::context::Context::new_with_codec(aac)
            .encoder()
            .audio()?;
        enc.set_rate(OUT_RATE as i32);
        enc.set_channel_layout(ffmpeg::ChannelLayout::STEREO);
        enc.set_format(FLTP);
        enc.set_bit_rate(AAC_BITRATE);
        enc.set_time_base((1, OUT_RATE as i32));
        let encoder = enc.open_as(aac)?;
        Ok(Self {
            decoder,
            resampler: Resampler::new(FLTP),
            encoder,
            pending: [Vec::new(), Vec::new()],
            pending_time: 0,
            sent: Default::default(),
            decoded: ffmpeg::frame::Audio::empty(),
        })
    }

    /// Decodes one Opus packet whose first sample is at `time` (48 kHz)
    /// and appends the AAC frames now complete. A jump of more than a
    /// frame restarts the output timeline there.
    pub fn push(
        &mut self,
        opus: &[u8],
        time: i64,
        out: &mut Vec<AdtsPacket>,
    ) -> Result<(), TranscodeError> {
        let mut packet = ffmpeg::Packet::copy(opus);
        packet.set_pts(Some(time));
        self.decoder.send_packet(&packet)?;
        while self.decoder.receive_frame(&mut self.decoded).is_ok() {
            let frame_time = self.decoded.pts().unwrap_or(time);
            let expected = self.pending_time + self.pending[0].len() as i64;
            if self.pending[0].is_empty() || (frame_time - expected).abs() > AAC_FRAME as i64 {
                self.pending[0].clear();
                self.pending[1].clear();
                self.pending_time = frame_time;
            }
            self.resample()?;
            self.encode(out)?;
        }
        Ok(())
    }

    fn resample(&mut self) -> Result<(), TranscodeError> {
        let resampled = self.resampler.run(&self.decoded)?;
        let n = resampled.samples();
        for (ch, pending) in self.pending.iter_mut().enumerate() {
            pending.extend(
                resampled
                    .data(ch)
                    .chunks_exact(4)
                    .take(n)
                    .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Ok(())
    }

    fn encode(&mut self, out: &mut Vec<AdtsPacket>) -> Result<(), TranscodeError> {
        while self.pending[0].len() >= AAC_FRAME && self.pending[1].len() >= AAC_FRAME {
            let mut frame =
                ffmpeg::frame::Audio::new(FLTP, AAC_FRAME, ffmpeg::ChannelLayout::STEREO);
            frame.set_rate(OUT_RATE);
            frame.set_pts(Some(self.pending_time));
            for ch in 0..2 {
                let dst = frame.data_mut(ch);
                for (d, s) in dst
                    .chunks_exact_mut(4)
                    .zip(self.pending[ch].drain(..AAC_FRAME))
                {
                    d.copy_from_slice(&s.to_ne_bytes());
                }
            }
            self.sent.push_back(self.pending_time);
            self.pending_time += AAC_FRAME as i64;
            self.encoder.send_frame(&frame)?;
            let mut packet = ffmpeg::Packet::empty();
            while self.encoder.receive_packet(&mut packet).is_ok() {
                let time = self.sent.pop_front().unwrap_or(self.pending_time);
                if let Some(data) = packet.data() {
                    out.push(AdtsPacket {
                        time,
                        adts: adts_wrap(data),
                    });
                }
            }
        }
        Ok(())
    }
}

/// An AAC-LC frame of 48 kHz stereo behind a 7-byte ADTS header.
fn adts_wrap(raw: &[u8]) -> Vec<u8> {
    let len = raw.len() + 7;
    let (profile, rate_index, channels) = (1u8, 3u8, 2u8); // LC, 48 kHz, stereo
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&[
        0xff,
        0xf1,
        (profile << 6) | (rate_index << 2) | (channels >> 2),
        ((channels & 3) << 6) | ((len >> 11) as u8 & 0x03),
        (len >> 3) as u8,
        ((len as u8 & 0x07) << 5) | 0x1f,
        0xfc,
    ]);
    f.extend_from_slice(raw);
    f
}

/// What the transcoder thread is handed.
#[derive(Debug)]
pub struct AacJob {
    /// One ADTS frame.
    pub adts: Vec<u8>,
    /// Media time of its first sample, 48 kHz.
    pub time: i64,
    /// Wall clock the frame's time maps to (kept for the Opus output).
    pub network_time: std::time::Instant,
}

/// The sending side of a transcoder thread: never blocks.
#[derive(Debug)]
pub struct AudioTranscoder {
    jobs: SyncSender<AacJob>,
}

impl AudioTranscoder {
    /// Starts a thread that turns AAC jobs into Opus packets and hands each
    /// to `emit` (with the network time of the AAC frame it came from).
    pub fn spawn(
        name: String,
        emit: impl FnMut(OpusPacket, std::time::Instant) + Send + 'static,
    ) -> Result<Self, TranscodeError> {
        // Open the codecs here so a missing encoder is reported at once.
        let codec = AacToOpus::new()?;
        let (jobs, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || run(codec, rx, emit))
            .map_err(|_| TranscodeError::Missing("a thread for the transcoder"))?;
        Ok(Self { jobs })
    }

    /// Queues an AAC frame; when the transcoder is behind the frame is
    /// dropped and counted (`weir_transcode_dropped_total{kind="audio"}`).
    pub fn push(&self, job: AacJob) {
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                metrics::counter!("weir_transcode_dropped_total", "kind" => "audio").increment(1);
            }
        }
    }
}

fn run(
    mut codec: AacToOpus,
    rx: Receiver<AacJob>,
    mut emit: impl FnMut(OpusPacket, std::time::Instant),
) {
    let mut out = Vec::new();
    let mut errors = 0u64;
    while let Ok(job) = rx.recv() {
        if let Err(e) = codec.push(&job.adts, job.time, &mut out) {
            errors += 1;
            metrics::counter!("weir_transcode_errors_total", "kind" => "audio").increment(1);
            // A damaged frame is common on a lossy link: say so once in a while.
            if errors.is_power_of_two() {
                tracing::warn!(error = %e, errors, "AAC frame could not be transcoded");
            }
        }
        for p in out.drain(..) {
            let delay = std::time::Duration::from_micros(
                ((p.time - job.time).max(0) as u64) * 1_000_000 / u64::from(OUT_RATE),
            );
            emit(p, job.network_time + delay);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn adts_frames_are_split_and_damage_stops_the_split() {
        // Two ADTS frames of 10 bytes, 48 kHz (index 3), no CRC.
        let frame = |fill: u8| {
            let len = 10usize;
            let mut f = vec![
                0xff,
                0xf1,
                (1 << 6) | (3 << 2),
                0x80 | ((len >> 11) as u8 & 0x03),
                (len >> 3) as u8,
                ((len as u8) << 5) | 0x1f,
                0xfc,
            ];
            f.extend_from_slice(&[fill; 3]);
            f
        };
        let mut data = frame(1);
        data.extend(frame(2));
        let frames = adts_frames(&data);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1].data[7], 2);
        assert_eq!(frames[0].rate, 48000);
        data.extend_from_slice(&[0xff, 0xf1, 0, 0]);
        assert_eq!(adts_frames(&data).len(), 2);
        assert!(adts_frames(&[1, 2, 3, 4, 5, 6, 7, 8]).is_empty());
    }

    #[test]
    fn opus_control_headers_are_unwrapped() {
        let mut data = vec![0x7f, 0xe0, 3, 0xf8, 0xff, 0xfe];
        data.extend_from_slice(&[0x7f, 0xf0, 2, 0, 0, 0xf8, 1]); // with start trim
        let packets = opus_packets(&data);
        assert_eq!(packets, vec![&[0xf8, 0xff, 0xfe][..], &[0xf8, 1]]);
        assert_eq!(opus_duration(&[0xf8]), Some(960)); // CELT FB 20 ms
        assert_eq!(opus_duration(&[0xf9, 0]), Some(1920));
        assert_eq!(opus_duration(&[]), None);
        assert!(opus_packets(&[0x7f, 0xe0, 0xff]).is_empty());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 99u64;
        for _ in 0..5000 {
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = adts_frames(&bytes);
            let _ = opus_packets(&bytes);
            let _ = opus_duration(&bytes);
        }
    }

    /// Real AAC from the ffmpeg CLI through the real transcoder: Opus comes
    /// out, 20 ms apart, at 48 kHz.
    #[test]
    fn aac_from_ffmpeg_becomes_opus() {
        let dir = std::env::temp_dir().join(format!("weir-aac-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("tone.aac");
        let status = std::process::Command::new("ffmpeg")
            .args([
                "-hide_banner",
                "-loglevel",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
            ])
            .arg("sine=frequency=440:sample_rate=44100:duration=1")
            .args(["-ac", "2", "-c:a", "aac", "-f", "adts"])
            .arg(&path)
            .status()
            .unwrap_or_else(|e| panic!("ffmpeg CLI is needed (deploy/setup.sh): {e}"));
        assert!(status.success());
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
        let frames = adts_frames(&bytes);
        assert!(frames.len() > 40, "{} ADTS frames", frames.len());
        let mut codec = AacToOpus::new().unwrap_or_else(|e| panic!("{e}"));
        let mut out = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let time = (i as i64) * 1024 * 48_000 / i64::from(f.rate);
            codec
                .push(f.data, time, &mut out)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(out.len() >= 45, "{} Opus packets for ~1 s", out.len());
        for w in out.windows(2) {
            assert_eq!(w[1].time - w[0].time, OPUS_FRAME as i64);
        }
        assert!(out.iter().all(|p| opus_duration(&p.data) == Some(960)));
        // Garbage is an error, never a panic.
        let _ = codec.push(
            &[0xff, 0xf1, 0x50, 0x80, 0x02, 0x1f, 0xfc, 1, 2, 3],
            0,
            &mut out,
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod opus_to_aac_tests {
    use super::*;

    /// 20 ms Opus packets of a 440 Hz stereo tone, from libopus.
    fn opus_tone(packets: usize) -> Vec<Vec<u8>> {
        init_ffmpeg().unwrap();
        let codec = ffmpeg::encoder::find_by_name("libopus").unwrap();
        let mut enc = ffmpeg::codec::context::Context::new_with_codec(codec)
            .encoder()
            .audio()
            .unwrap();
        let s16 = ffmpeg::format::Sample::I16(ffmpeg::format::sample::Type::Packed);
        enc.set_rate(48_000);
        enc.set_channel_layout(ffmpeg::ChannelLayout::STEREO);
        enc.set_format(s16);
        enc.set_bit_rate(64_000);
        enc.set_time_base((1, 48_000));
        let mut enc = enc.open_as(codec).unwrap();
        let mut out = Vec::new();
        for i in 0..packets {
            let mut frame = ffmpeg::frame::Audio::new(s16, 960, ffmpeg::ChannelLayout::STEREO);
            frame.set_rate(48_000);
            frame.set_pts(Some((i * 960) as i64));
            for (n, d) in frame.data_mut(0).chunks_exact_mut(4).enumerate() {
                let t = (i * 960 + n) as f64 / 48_000.0;
                let v = ((t * 440.0 * std::f64::consts::TAU).sin() * 8000.0) as i16;
                d[..2].copy_from_slice(&v.to_ne_bytes());
                d[2..].copy_from_slice(&v.to_ne_bytes());
            }
            enc.send_frame(&frame).unwrap();
            let mut p = ffmpeg::Packet::empty();
            while enc.receive_packet(&mut p).is_ok() {
                out.push(p.data().unwrap().to_vec());
            }
        }
        out
    }

    #[test]
    fn opus_becomes_adts_aac_on_the_same_timeline_that_aac_decoders_take() {
        let packets = opus_tone(100); // 2 s
        let mut conv = OpusToAac::new().unwrap();
        let mut out = Vec::new();
        for (i, p) in packets.iter().enumerate() {
            conv.push(p, 10_000 + (i * 960) as i64, &mut out).unwrap();
        }
        assert!(out.len() >= 85, "{} AAC frames from 2 s", out.len());
        // Times advance by one AAC frame from the first Opus packet's.
        assert_eq!(out[0].time, 10_000);
        assert!(out.windows(2).all(|w| w[1].time - w[0].time == 1024));
        // Each is a well-formed ADTS frame that ffmpeg's AAC decoder takes.
        let mut all = Vec::new();
        for p in &out {
            let frames = adts_frames(&p.adts);
            assert_eq!(frames.len(), 1);
            assert_eq!(frames[0].rate, 48_000);
            all.extend_from_slice(&p.adts);
        }
        let mut back = AacToOpus::new().unwrap();
        let mut opus = Vec::new();
        for (i, f) in adts_frames(&all).iter().enumerate() {
            back.push(f.data, (i * 1024) as i64, &mut opus).unwrap();
        }
        assert!(
            opus.len() >= 80,
            "round trip gave {} Opus packets",
            opus.len()
        );
        // Garbage is refused or ignored, never a crash, and the converter
        // goes on with the next good packets.
        let _ = conv.push(&[0xff; 3], 200_000, &mut out);
        let before = out.len();
        for (i, p) in packets.iter().take(20).enumerate() {
            conv.push(p, 300_000 + (i * 960) as i64, &mut out).unwrap();
        }
        assert!(out.len() > before + 10, "{} then {}", before, out.len());
        assert!(out[before..].iter().any(|p| p.time >= 300_000));
    }
}
