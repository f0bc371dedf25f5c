//! Transcode throughput of the node's ABR ladder on a file, as fast as it
//! goes: the MPEG-TS input is demuxed first (not timed), then every H.264
//! access unit goes through the same `LadderEncoder` the transcoder thread
//! runs (decode once, scale and encode every rendition smaller than the
//! source). Prints one JSON line. Used by `bench/ingest.sh` next to the
//! ffmpeg CLI doing the same ladder.
//!
//! ```text
//! cargo run --release -p weir-data-plane --example ladder_throughput -- IN.ts [LADDER] [x264|nvenc|auto]
//! ```

use std::time::Instant;

use weir_data_plane::ingest::h264::H264Stream;
use weir_data_plane::ingest::ts::{StreamKind, TsDemuxer};
use weir_data_plane::transcode::{EncoderChoice, Ladder, LadderEncoder, encoder};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let input = args.next().ok_or_else(|| {
        anyhow::anyhow!("usage: ladder_throughput IN.ts [LADDER] [x264|nvenc|auto]")
    })?;
    let ladder = Ladder::parse(&args.next().unwrap_or_else(|| "source,480p,360p".into()))?;
    let choice: EncoderChoice = args
        .next()
        .unwrap_or_else(|| "x264".into())
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    let bytes = std::fs::read(&input)?;
    let mut demux = TsDemuxer::new();
    let mut pes = Vec::new();
    demux.push(&bytes, &mut pes);
    demux.flush(&mut pes);
    let mut h264 = H264Stream::new();
    let units: Vec<_> = pes
        .into_iter()
        .filter(|p| p.kind == StreamKind::H264)
        .filter_map(|p| {
            let pts = p.pts?;
            let dts = p.dts.unwrap_or(pts);
            h264.access_unit(&p.data).map(|au| (au, pts, dts))
        })
        .collect();
    let kind = encoder::choose(choice);
    let mut enc = LadderEncoder::new("bench".into(), ladder.renditions.clone(), kind)?;
    let mut out = Vec::new();
    let mut pictures = 0u64;
    let mut encoded = 0u64;
    let start = Instant::now();
    for (au, pts, dts) in &units {
        enc.push(
            &au.data,
            *pts,
            *dts,
            au.keyframe,
            |_, _| pictures += 1,
            &mut out,
        )?;
        encoded += out.len() as u64;
        out.clear();
    }
    enc.finish(|_, _| pictures += 1, &mut out);
    encoded += out.len() as u64;
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "input": input,
            "source_frames": pictures,
            "encoded_frames": encoded,
            "renditions": enc.rendition_names().iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "encoder": kind.name(),
            "seconds": seconds,
            "fps": pictures as f64 / seconds,
        })
    );
    Ok(())
}
