//! Snapshots: the latest keyframe of a room as a JPEG (cover images,
//! moderation), taken on the transcoder's thread every few seconds and kept
//! in memory — one small image per room, never on the forwarding path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ffmpeg_next as ffmpeg;
use weir_protocol::RoomId;

use crate::ingest::audio::TranscodeError;

/// Snapshots older than this are forgotten (the room is long gone).
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// One room's latest snapshot.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The JPEG.
    pub jpeg: Bytes,
    /// When it was taken.
    pub taken: SystemTime,
    /// Picture width.
    pub width: u32,
    /// Picture height.
    pub height: u32,
}

/// The latest snapshot of every room.
#[derive(Debug, Clone, Default)]
pub struct SnapshotStore {
    rooms: Arc<Mutex<HashMap<RoomId, Snapshot>>>,
}

impl SnapshotStore {
    /// The room's latest snapshot.
    pub fn get(&self, room: &RoomId) -> Option<Snapshot> {
        self.rooms.lock().ok()?.get(room).cloned()
    }

    /// Stores a new snapshot (and forgets very old ones).
    pub fn put(&self, room: &RoomId, snapshot: Snapshot) {
        if let Ok(mut m) = self.rooms.lock() {
            m.retain(|_, s| {
                s.taken
                    .elapsed()
                    .map(|age| age < FORGET_AFTER)
                    .unwrap_or(true)
            });
            m.insert(room.clone(), snapshot);
        }
        metrics::counter!("weir_snapshots_total").increment(1);
    }
}

/// Turns decoded pictures into JPEGs at their own size.
pub struct JpegEncoder {
    encoder: Option<((u32, u32), ffmpeg::encoder::Video)>,
    /// Pictures encoded (their pts: encoders want them rising).
    count: i64,
    scaler: Option<(
        ffmpeg::format::Pixel,
        (u32, u32),
        ffmpeg::software::scaling::Context,
    )>,
}

impl std::fmt::Debug for JpegEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JpegEncoder").finish_non_exhaustive()
    }
}

impl Default for JpegEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl JpegEncoder {
    /// Nothing is opened until the first picture.
    pub fn new() -> Self {
        Self {
            encoder: None,
            count: 0,
            scaler: None,
        }
    }

    fn open(width: u32, height: u32) -> Result<ffmpeg::encoder::Video, TranscodeError> {
        let codec = ffmpeg::encoder::find(ffmpeg::codec::Id::MJPEG)
            .ok_or(TranscodeError::Missing("MJPEG encoder"))?;
        let mut enc = ffmpeg::codec::context::Context::new_with_codec(codec)
            .encoder()
            .video()?;
        enc.set_width(width);
        enc.set_height(height);
        enc.set_format(ffmpeg::format::Pixel::YUVJ420P);
        enc.set_time_base((1, 25));
        // Quality, not bit rate: quantizer 2..=5 of 31.
        enc.set_qmin(2);
        enc.set_qmax(5);
        let mut opts = ffmpeg::Dictionary::new();
        opts.set("huffman", "optimal");
        Ok(enc.open_as_with(codec, opts)?)
    }

    /// Encodes one picture.
    pub fn encode(&mut self, picture: &ffmpeg::frame::Video) -> Result<Snapshot, TranscodeError> {
        let size = (picture.width(), picture.height());
        if size.0 == 0 || size.1 == 0 {
            return Err(TranscodeError::Ffmpeg(ffmpeg::Error::InvalidData));
        }
        if self.encoder.as_ref().is_none_or(|(s, _)| *s != size) {
            self.encoder = Some((size, Self::open(size.0, size.1)?));
        }
        let format = picture.format();
        if self
            .scaler
            .as_ref()
            .is_none_or(|(f, s, _)| *f != format || *s != size)
        {
            let ctx = ffmpeg::software::scaling::Context::get(
                format,
                size.0,
                size.1,
                ffmpeg::format::Pixel::YUVJ420P,
                size.0,
                size.1,
                ffmpeg::software::scaling::Flags::BICUBIC,
            )?;
            self.scaler = Some((format, size, ctx));
        }
        let mut converted = ffmpeg::frame::Video::empty();
        if let Some((_, _, ctx)) = self.scaler.as_mut() {
            ctx.run(picture, &mut converted)?;
        }
        converted.set_pts(Some(self.count));
        self.count += 1;
        let Some((_, enc)) = self.encoder.as_mut() else {
            return Err(TranscodeError::Missing("MJPEG encoder"));
        };
        enc.send_frame(&converted)?;
        let mut packet = ffmpeg::Packet::empty();
        enc.receive_packet(&mut packet)?;
        let jpeg = Bytes::copy_from_slice(packet.data().unwrap_or_default());
        Ok(Snapshot {
            jpeg,
            taken: SystemTime::now(),
            width: size.0,
            height: size.1,
        })
    }
}
