//! Fragmented MP4 (ISO/IEC 14496-12, CMAF-style) written by hand: an init
//! segment (`ftyp` + `moov` with an `avc1`/`avcC` video track and an
//! `mp4a`/`esds` AAC track) and media segments (`styp` + one `moof` with a
//! `traf` per track + one `mdat`). Only what HLS players need, and all of
//! it: no sample tables in `moov`, one fragment per segment, per-sample
//! duration, size, flags and composition offset in `trun`.
//!
//! Written here rather than taken from a crate: the boxes are few and fixed,
//! and the crates that write fMP4 either pull a runtime of their own or do
//! not write `avcC`/`esds` for us; ffmpeg's muxer would tie segment cutting
//! to its own HLS muxer and its file layout.

use super::sps::SpsInfo;

/// Track id of the video track.
pub const VIDEO_TRACK: u32 = 1;
/// Track id of the audio track.
pub const AUDIO_TRACK: u32 = 2;
/// Timescale of the video track (the MPEG-TS clock).
pub const VIDEO_TIMESCALE: u32 = 90_000;

/// The H.264 track of an init segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VideoTrack {
    /// The SPS NAL unit (header byte included).
    pub sps: Vec<u8>,
    /// The PPS NAL unit.
    pub pps: Vec<u8>,
    /// What the SPS says.
    pub info: SpsInfo,
}

/// The AAC track of an init segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioTrack {
    /// AudioSpecificConfig (ISO/IEC 14496-3), two bytes for AAC-LC.
    pub asc: [u8; 2],
    /// Sample rate (also the track's timescale).
    pub rate: u32,
    /// Channel count.
    pub channels: u16,
    /// MPEG-4 audio object type (2 = AAC-LC).
    pub object_type: u8,
}

impl AudioTrack {
    /// From an ADTS header (7 or 9 bytes at the start of `adts`); `None`
    /// when it is not one.
    pub fn from_adts(adts: &[u8]) -> Option<Self> {
        if adts.len() < 7 || adts[0] != 0xff || adts[1] & 0xf0 != 0xf0 {
            return None;
        }
        let object_type = (adts[2] >> 6) + 1;
        let freq_index = (adts[2] >> 2) & 0x0f;
        let channels = ((adts[2] & 0x01) << 2) | (adts[3] >> 6);
        const RATES: [u32; 13] = [
            96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
        ];
        let rate = *RATES.get(usize::from(freq_index))?;
        if channels == 0 {
            // Channel layout in a PCE: not supported here.
            return None;
        }
        let asc = [
            (object_type << 3) | (freq_index >> 1),
            ((freq_index & 1) << 7) | (channels << 3),
        ];
        Some(Self {
            asc,
            rate,
            channels: u16::from(channels),
            object_type,
        })
    }

    /// The RFC 6381 codec string, e.g. `mp4a.40.2`.
    pub fn codec_string(&self) -> String {
        format!("mp4a.40.{}", self.object_type)
    }
}

/// One sample of a fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The sample's bytes (H.264: length-prefixed NAL units).
    pub data: bytes::Bytes,
    /// Duration in the track's timescale.
    pub duration: u32,
    /// Presentation minus decode time, in the track's timescale.
    pub cto: i32,
    /// A sync sample (IDR; every AAC frame).
    pub keyframe: bool,
}

/// One track's samples in a media segment.
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    /// Which track.
    pub track: u32,
    /// Decode time of the first sample, in the track's timescale.
    pub base_time: u64,
    /// The samples, in decode order.
    pub samples: &'a [Sample],
}

/// Appends a box: size, type, then whatever `body` writes.
fn bx(out: &mut Vec<u8>, kind: &[u8; 4], body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(kind);
    body(out);
    let size = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
}

/// Appends a full box (version and flags after the type).
fn full(
    out: &mut Vec<u8>,
    kind: &[u8; 4],
    version: u8,
    flags: u32,
    body: impl FnOnce(&mut Vec<u8>),
) {
    bx(out, kind, |o| {
        o.push(version);
        o.extend_from_slice(&flags.to_be_bytes()[1..]);
        body(o);
    });
}

fn u16be(o: &mut Vec<u8>, v: u16) {
    o.extend_from_slice(&v.to_be_bytes());
}

fn u32be(o: &mut Vec<u8>, v: u32) {
    o.extend_from_slice(&v.to_be_bytes());
}

fn u64be(o: &mut Vec<u8>, v: u64) {
    o.extend_from_slice(&v.to_be_bytes());
}

const MATRIX: [u32; 9] = [0x0001_0000, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000];

fn matrix(o: &mut Vec<u8>) {
    for v in MATRIX {
        u32be(o, v);
    }
}

/// The init segment for the tracks present (at least one).
pub fn init_segment(video: Option<&VideoTrack>, audio: Option<&AudioTrack>) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    bx(&mut out, b"ftyp", |o| {
        o.extend_from_slice(b"iso6");
        u32be(o, 0);
        for brand in [b"iso6", b"cmfc", b"mp41", b"avc1"] {
            o.extend_from_slice(brand);
        }
    });
    bx(&mut out, b"moov", |o| {
        full(o, b"mvhd", 0, 0, |o| {
            u32be(o, 0); // creation_time
            u32be(o, 0); // modification_time
            u32be(o, 1000); // timescale
            u32be(o, 0); // duration: unknown (fragmented)
            u32be(o, 0x0001_0000); // rate 1.0
            u16be(o, 0x0100); // volume 1.0
            o.extend_from_slice(&[0; 10]);
            matrix(o);
            o.extend_from_slice(&[0; 24]);
            u32be(o, AUDIO_TRACK + 1); // next_track_ID
        });
        if let Some(v) = video {
            video_trak(o, v);
        }
        if let Some(a) = audio {
            audio_trak(o, a);
        }
        bx(o, b"mvex", |o| {
            for (present, track) in [
                (video.is_some(), VIDEO_TRACK),
                (audio.is_some(), AUDIO_TRACK),
            ] {
                if present {
                    full(o, b"trex", 0, 0, |o| {
                        u32be(o, track);
                        u32be(o, 1); // default_sample_description_index
                        u32be(o, 0);
                        u32be(o, 0);
                        u32be(o, 0);
                    });
                }
            }
        });
    });
    out
}

fn tkhd(o: &mut Vec<u8>, track: u32, volume: u16, width: u32, height: u32) {
    // Flags: enabled, in movie.
    full(o, b"tkhd", 0, 3, |o| {
        u32be(o, 0);
        u32be(o, 0);
        u32be(o, track);
        u32be(o, 0); // reserved
        u32be(o, 0); // duration
        o.extend_from_slice(&[0; 8]);
        u16be(o, 0); // layer
        u16be(o, 0); // alternate_group
        u16be(o, volume);
        u16be(o, 0);
        matrix(o);
        u32be(o, width << 16);
        u32be(o, height << 16);
    });
}

fn mdhd_hdlr(o: &mut Vec<u8>, timescale: u32, handler: &[u8; 4], name: &str) {
    full(o, b"mdhd", 0, 0, |o| {
        u32be(o, 0);
        u32be(o, 0);
        u32be(o, timescale);
        u32be(o, 0);
        u16be(o, 0x55c4); // language "und"
        u16be(o, 0);
    });
    full(o, b"hdlr", 0, 0, |o| {
        u32be(o, 0);
        o.extend_from_slice(handler);
        o.extend_from_slice(&[0; 12]);
        o.extend_from_slice(name.as_bytes());
        o.push(0);
    });
}

/// `dinf` and the empty sample tables around a sample entry.
fn dinf_stbl(o: &mut Vec<u8>, entry: impl FnOnce(&mut Vec<u8>)) {
    bx(o, b"dinf", |o| {
        full(o, b"dref", 0, 0, |o| {
            u32be(o, 1);
            full(o, b"url ", 0, 1, |_| {});
        });
    });
    bx(o, b"stbl", |o| {
        full(o, b"stsd", 0, 0, |o| {
            u32be(o, 1);
            entry(o);
        });
        for kind in [b"stts", b"stsc", b"stco"] {
            full(o, kind, 0, 0, |o| u32be(o, 0));
        }
        full(o, b"stsz", 0, 0, |o| {
            u32be(o, 0);
            u32be(o, 0);
        });
    });
}

fn video_trak(o: &mut Vec<u8>, v: &VideoTrack) {
    let (w, h) = (v.info.width, v.info.height);
    bx(o, b"trak", |o| {
        tkhd(o, VIDEO_TRACK, 0, w, h);
        bx(o, b"mdia", |o| {
            mdhd_hdlr(o, VIDEO_TIMESCALE, b"vide", "Weir video");
            bx(o, b"minf", |o| {
                full(o, b"vmhd", 0, 1, |o| o.extend_from_slice(&[0; 8]));
                dinf_stbl(o, |o| {
                    bx(o, b"avc1", |o| {
                        o.extend_from_slice(&[0; 6]);
                        u16be(o, 1); // data_reference_index
                        o.extend_from_slice(&[0; 16]);
                        u16be(o, w.min(0xffff) as u16);
                        u16be(o, h.min(0xffff) as u16);
                        u32be(o, 0x0048_0000); // 72 dpi
                        u32be(o, 0x0048_0000);
                        u32be(o, 0);
                        u16be(o, 1); // frame_count
                        o.extend_from_slice(&[0; 32]); // compressorname
                        u16be(o, 0x0018); // depth
                        u16be(o, 0xffff); // pre_defined = -1
                        bx(o, b"avcC", |o| avcc(o, v));
                    });
                });
            });
        });
    });
}

fn avcc(o: &mut Vec<u8>, v: &VideoTrack) {
    o.push(1);
    o.push(v.info.profile);
    o.push(v.info.compat);
    o.push(v.info.level);
    o.push(0xfc | 3); // 4-byte NAL lengths
    o.push(0xe0 | 1);
    u16be(o, v.sps.len() as u16);
    o.extend_from_slice(&v.sps);
    o.push(1);
    u16be(o, v.pps.len() as u16);
    o.extend_from_slice(&v.pps);
    if !matches!(v.info.profile, 66 | 77 | 88) {
        o.push(0xfc | (v.info.chroma_format & 3));
        o.push(0xf8 | (v.info.bit_depth_luma.saturating_sub(8) & 7));
        o.push(0xf8 | (v.info.bit_depth_chroma.saturating_sub(8) & 7));
        o.push(0); // no SPS extensions
    }
}

fn audio_trak(o: &mut Vec<u8>, a: &AudioTrack) {
    bx(o, b"trak", |o| {
        tkhd(o, AUDIO_TRACK, 0x0100, 0, 0);
        bx(o, b"mdia", |o| {
            mdhd_hdlr(o, a.rate, b"soun", "Weir audio");
            bx(o, b"minf", |o| {
                full(o, b"smhd", 0, 0, |o| u32be(o, 0));
                dinf_stbl(o, |o| {
                    bx(o, b"mp4a", |o| {
                        o.extend_from_slice(&[0; 6]);
                        u16be(o, 1);
                        o.extend_from_slice(&[0; 8]);
                        u16be(o, a.channels);
                        u16be(o, 16); // samplesize
                        u32be(o, 0);
                        u32be(o, a.rate.min(0xffff) << 16);
                        full(o, b"esds", 0, 0, |o| esds(o, a));
                    });
                });
            });
        });
    });
}

/// The ES descriptor of an AAC track (lengths fit one byte).
fn esds(o: &mut Vec<u8>, a: &AudioTrack) {
    let dsi = [0x05, 2, a.asc[0], a.asc[1]];
    let sl = [0x06, 1, 2];
    let dcd_len = 13 + dsi.len();
    let es_len = 3 + 2 + dcd_len + sl.len();
    o.push(0x03);
    o.push(es_len as u8);
    u16be(o, AUDIO_TRACK as u16); // ES_ID
    o.push(0); // flags
    o.push(0x04);
    o.push(dcd_len as u8);
    o.push(0x40); // MPEG-4 audio
    o.push(0x15); // audio stream, upstream 0, reserved 1
    o.extend_from_slice(&[0, 0, 0]); // bufferSizeDB
    u32be(o, 0); // maxBitrate
    u32be(o, 0); // avgBitrate
    o.extend_from_slice(&dsi);
    o.extend_from_slice(&sl);
}

/// Sample flags: a sync sample depends on nothing; others depend on
/// earlier samples and are not sync samples.
fn sample_flags(keyframe: bool) -> u32 {
    if keyframe { 0x0200_0000 } else { 0x0101_0000 }
}

/// A media segment: `styp`, one `moof` with a `traf` per run, one `mdat`.
pub fn media_segment(sequence: u32, runs: &[Run<'_>]) -> Vec<u8> {
    let payload: usize = runs
        .iter()
        .flat_map(|r| r.samples.iter())
        .map(|s| s.data.len())
        .sum();
    let mut out = Vec::with_capacity(payload + 256 + runs.len() * 16 * 64);
    bx(&mut out, b"styp", |o| {
        o.extend_from_slice(b"msdh");
        u32be(o, 0);
        o.extend_from_slice(b"msdh");
        o.extend_from_slice(b"msix");
    });
    let moof_start = out.len();
    let mut offset_fields = Vec::with_capacity(runs.len());
    bx(&mut out, b"moof", |o| {
        full(o, b"mfhd", 0, 0, |o| u32be(o, sequence));
        for run in runs {
            bx(o, b"traf", |o| {
                // default-base-is-moof
                full(o, b"tfhd", 0, 0x02_0000, |o| u32be(o, run.track));
                full(o, b"tfdt", 1, 0, |o| u64be(o, run.base_time));
                // data-offset, duration, size, flags, composition offset
                let flags = 0x001 | 0x100 | 0x200 | 0x400 | 0x800;
                full(o, b"trun", 1, flags, |o| {
                    u32be(o, run.samples.len() as u32);
                    offset_fields.push(o.len());
                    u32be(o, 0); // data_offset, patched below
                    for s in run.samples {
                        u32be(o, s.duration);
                        u32be(o, s.data.len() as u32);
                        u32be(o, sample_flags(s.keyframe));
                        o.extend_from_slice(&s.cto.to_be_bytes());
                    }
                });
            });
        }
    });
    let moof_size = out.len() - moof_start;
    // Each run's data starts after the moof, the mdat header and the runs
    // before it.
    let mut data_offset = moof_size + 8;
    for (run, &field) in runs.iter().zip(&offset_fields) {
        let v = (data_offset as u32).to_be_bytes();
        out[field..field + 4].copy_from_slice(&v);
        data_offset += run.samples.iter().map(|s| s.data.len()).sum::<usize>();
    }
    u32be(&mut out, (8 + payload) as u32);
    out.extend_from_slice(b"mdat");
    for run in runs {
        for s in run.samples {
            out.extend_from_slice(&s.data);
        }
    }
    out
}

/// Annex-B NAL units → one sample: 4-byte lengths, with the NAL units the
/// init segment carries (SPS, PPS) and those MP4 has no use for (AUD,
/// filler) left out.
pub fn avcc_sample(nals: impl Iterator<Item = impl AsRef<[u8]>>) -> Vec<u8> {
    let mut out = Vec::new();
    for nal in nals {
        let nal = nal.as_ref();
        let Some(h) = nal.first() else {
            continue;
        };
        if matches!(h & 0x1f, 7 | 8 | 9 | 12) {
            continue;
        }
        u32be(&mut out, nal.len() as u32);
        out.extend_from_slice(nal);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Walks boxes at one level: (type, body).
    fn boxes(mut data: &[u8]) -> Vec<([u8; 4], &[u8])> {
        let mut out = Vec::new();
        while data.len() >= 8 {
            let size = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
            assert!(size >= 8 && size <= data.len(), "box size {size}");
            out.push((data[4..8].try_into().unwrap(), &data[8..size]));
            data = &data[size..];
        }
        assert!(data.is_empty());
        out
    }

    #[test]
    fn adts_headers_give_the_audio_specific_config() {
        // AAC-LC, 48 kHz (index 3), stereo.
        let adts = [0xff, 0xf1, 0x4c, 0x80, 0x2e, 0x7f, 0xfc];
        let a = AudioTrack::from_adts(&adts).unwrap();
        assert_eq!((a.rate, a.channels, a.object_type), (48_000, 2, 2));
        assert_eq!(a.asc, [0x11, 0x90]);
        assert_eq!(a.codec_string(), "mp4a.40.2");
        assert!(AudioTrack::from_adts(&[0xff, 0xf1, 0x4c]).is_none());
    }

    #[test]
    fn segments_nest_and_offsets_point_into_mdat() {
        let video = [
            Sample {
                data: bytes::Bytes::from_static(&[0, 0, 0, 2, 0x65, 1]),
                duration: 3000,
                cto: 0,
                keyframe: true,
            },
            Sample {
                data: bytes::Bytes::from_static(&[0, 0, 0, 2, 0x41, 2]),
                duration: 3000,
                cto: 3000,
                keyframe: false,
            },
        ];
        let audio = [Sample {
            data: bytes::Bytes::from_static(&[9, 9, 9]),
            duration: 1024,
            cto: 0,
            keyframe: true,
        }];
        let seg = media_segment(
            7,
            &[
                Run {
                    track: VIDEO_TRACK,
                    base_time: 90_000,
                    samples: &video,
                },
                Run {
                    track: AUDIO_TRACK,
                    base_time: 48_000,
                    samples: &audio,
                },
            ],
        );
        let top = boxes(&seg);
        let kinds: Vec<_> = top.iter().map(|(k, _)| k).collect();
        assert_eq!(kinds, vec![b"styp", b"moof", b"mdat"]);
        let moof_start = top[0].1.len() + 8;
        let moof = boxes(top[1].1);
        assert_eq!(&moof[0].0, b"mfhd");
        // The audio trun's data offset points at its bytes.
        let traf = boxes(moof[2].1);
        let trun = traf[2].1;
        let off = u32::from_be_bytes(trun[8..12].try_into().unwrap()) as usize;
        assert_eq!(&seg[moof_start + off..moof_start + off + 3], &[9, 9, 9]);
    }

    #[test]
    fn sps_and_pps_stay_in_the_init_segment() {
        let nals: Vec<&[u8]> = vec![&[0x09, 0x10], &[0x67, 1], &[0x68, 2], &[0x65, 3, 4]];
        assert_eq!(avcc_sample(nals.into_iter()), vec![0, 0, 0, 3, 0x65, 3, 4]);
    }
}
