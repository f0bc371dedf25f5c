//! HLS, the transcoder ladder and snapshots end to end, with clients no one
//! here wrote: the ffmpeg CLI pushes a test pattern with a tone over SRT
//! into `weir dev`; `ffprobe` validates the master playlist and the sizes
//! of the renditions; `ffmpeg -i …/index.m3u8 -f null -` plays variants and
//! counts frames; a second publisher after the first produces a
//! discontinuity and a playlist that still plays; headless Chromium plays
//! the play page over HLS (hls.js, the fallback when WebRTC is missing or
//! fails, and Chromium's native HLS). A transcoder slowed down on purpose
//! drops its own frames while a WebRTC viewer keeps getting every one.
//! Needs ffmpeg, ffprobe, Chromium and the npm packages of tests/e2e
//! (`deploy/setup.sh --test`); a missing one fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{DevServer, Response, request};

/// The tests here each keep a transcoder and an encoding ffmpeg busy; on a
/// small machine they run one at a time.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn require_ffmpeg() {
    for tool in ["ffmpeg", "ffprobe"] {
        let ok = Command::new(tool)
            .arg("-version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "the {tool} CLI is missing: run deploy/setup.sh --test");
    }
}

fn require_browser_tools() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "Chromium not found at {chromium}: run deploy/setup.sh --test (or set CHROMIUM)"
    );
    let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    assert!(
        e2e.join("node_modules/playwright-core").exists(),
        "tests/e2e/node_modules is missing: run deploy/setup.sh --test"
    );
}

/// An ffmpeg CLI publisher; killed on drop.
struct Ffmpeg(Child);

impl Ffmpeg {
    /// Pushes testsrc2 (`size`, 30 fps, keyframe every 2 s) + sine as
    /// MPEG-TS over SRT for `seconds`, in real time; `x264` adds encoder
    /// options (and may override the audio codec).
    fn push(
        srt: std::net::SocketAddr,
        room: &str,
        token: &str,
        size: &str,
        seconds: u32,
        x264: &[&str],
    ) -> Self {
        let url = format!("srt://{srt}?streamid=#!::r={room},m=publish,t={token}");
        let child = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-re"])
            .args([
                "-f",
                "lavfi",
                "-i",
                &format!("testsrc2=size={size}:rate=30"),
            ])
            .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
            .args([
                "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "veryfast", "-g", "60",
            ])
            .args(["-c:a", "aac", "-b:a", "96k"])
            .args(x264)
            .args(["-t", &seconds.to_string(), "-f", "mpegts"])
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ffmpeg runs");
        Self(child)
    }

    /// Waits for ffmpeg to end by itself.
    fn wait(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("ffmpeg did not end within {limit:?}");
    }
}

impl Drop for Ffmpeg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn get(url: &str) -> Response {
    request("GET", url, &[], b"", Duration::from_secs(10))
        .await
        .unwrap()
}

fn header<'a>(r: &'a Response, name: &str) -> &'a str {
    r.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

/// Polls until the rendition's media playlist lists `min` segments (and
/// contains `needle`); returns its text.
async fn wait_playlist(url: &str, min: usize, needle: &str, dev: &DevServer) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = get(url).await;
        let text = r.text();
        if r.status == 200 && text.matches("#EXTINF").count() >= min && text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{url}: no {min} segments with {needle:?}; last answer {} {text}\nlog: {}",
            r.status,
            dev.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `ffprobe` of a URL as JSON; panics (with ffprobe's words) when it fails.
fn ffprobe(url: &str) -> serde_json::Value {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-of",
            "json",
            "-show_streams",
            "-show_programs",
        ])
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ffprobe {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Plays an HLS playlist from its first listed segment for `seconds` with
/// the ffmpeg CLI; returns the video frames it decoded.
fn play(url: &str, seconds: u32) -> u64 {
    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostats"])
        .args(["-live_start_index", "0", "-i", url])
        .args(["-t", &seconds.to_string(), "-map", "0:v:0"])
        .args(["-progress", "pipe:1", "-f", "null", "-"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ffmpeg played {url}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("frame="))
        .filter_map(|v| v.trim().parse().ok())
        .next_back()
        .unwrap_or(0)
}

/// (width, height) of every video stream ffprobe found.
fn video_sizes(probe: &serde_json::Value) -> Vec<(u64, u64)> {
    let mut sizes: Vec<(u64, u64)> = probe["streams"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["codec_type"] == "video")
        .map(|s| (s["width"].as_u64().unwrap(), s["height"].as_u64().unwrap()))
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

#[tokio::test(flavor = "multi_thread")]
async fn srt_room_plays_over_hls_with_its_ladder_and_survives_a_reconnect() {
    require_ffmpeg();
    require_browser_tools();
    let _heavy = HEAVY.lock().await;
    let dev = DevServer::start_with(&[
        "--ladder",
        "source,360p,240p@300",
        "--room-ladder",
        "plain=off",
        "--snapshot-interval",
        "1",
    ]);
    let room = "hls-e2e";
    let base = format!("{}/hls/{room}", dev.node);
    let token = dev.token(room, "publish", "streamer").await;

    // Nothing yet: clear refusals, no crash.
    let r = get(&format!("{base}/master.m3u8")).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.text().contains("no HLS"), "{}", r.text());
    let r = get(&format!("{}/rooms/{room}/snapshot.jpg", dev.node)).await;
    assert_eq!(r.status, 404);
    assert!(r.text().contains("no snapshot"), "{}", r.text());
    assert_eq!(
        get(&format!("{}/hls/a%2Fb/master.m3u8", dev.node))
            .await
            .status,
        400
    );

    // The first publisher: 854x480 with x264's default B-frames.
    let mut first = Ffmpeg::push(dev.srt, room, &token, "854x480", 20, &[]);
    for rendition in ["source", "360p", "240p"] {
        wait_playlist(&format!("{base}/{rendition}/index.m3u8"), 3, "", &dev).await;
    }

    let master = get(&format!("{base}/master.m3u8")).await;
    assert_eq!(master.status, 200);
    assert_eq!(
        header(&master, "content-type"),
        "application/vnd.apple.mpegurl"
    );
    assert_eq!(header(&master, "access-control-allow-origin"), "*");
    assert_eq!(header(&master, "cache-control"), "max-age=1");
    let text = master.text();
    assert!(text.starts_with("#EXTM3U\n"), "{text}");
    assert_eq!(text.matches("#EXT-X-STREAM-INF").count(), 3, "{text}");
    assert!(text.contains("RESOLUTION=854x480"), "{text}");
    assert!(
        text.contains("CODECS=\"avc1.") && text.contains(",mp4a.40.2\""),
        "{text}"
    );
    // ffprobe reads the master, every variant, init and segments, and finds
    // the source and the two renditions at their configured sizes.
    let probe = ffprobe(&format!("{base}/master.m3u8"));
    assert_eq!(
        video_sizes(&probe),
        vec![(426, 240), (640, 360), (854, 480)],
        "{probe}"
    );
    assert_eq!(probe["programs"].as_array().unwrap().len(), 3, "{probe}");
    // Each variant alone, too.
    for (rendition, size) in [("360p", (640, 360)), ("240p", (426, 240))] {
        let p = ffprobe(&format!("{base}/{rendition}/index.m3u8"));
        assert_eq!(video_sizes(&p), vec![size], "{p}");
        assert!(
            p["streams"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["codec_name"] == "aac"),
            "{p}"
        );
    }

    // Segments and init segments: types, CORS, caching.
    let playlist = get(&format!("{base}/360p/index.m3u8")).await.text();
    let init = playlist
        .lines()
        .find_map(|l| l.strip_prefix("#EXT-X-MAP:URI=\""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap();
    let segment = playlist.lines().find(|l| l.ends_with(".m4s")).unwrap();
    let r = get(&format!("{base}/360p/{init}")).await;
    assert_eq!((r.status, header(&r, "content-type")), (200, "video/mp4"));
    assert_eq!(&r.body[4..8], b"ftyp");
    let r = get(&format!("{base}/360p/{segment}")).await;
    assert_eq!(
        (r.status, header(&r, "content-type")),
        (200, "video/iso.segment")
    );
    assert!(header(&r, "cache-control").contains("immutable"));
    assert_eq!(header(&r, "access-control-allow-origin"), "*");
    assert_eq!(&r.body[4..8], b"styp");
    for bad in [
        "../../../etc/passwd",
        "x.m4s",
        "index.m3u9",
        "00000000-1.m4s",
    ] {
        let r = get(&format!("{base}/360p/{bad}")).await;
        assert!(matches!(r.status, 400 | 404), "{bad}: {}", r.status);
    }
    assert_eq!(get(&format!("{base}/1080p/index.m3u8")).await.status, 404);
    let preflight = request(
        "OPTIONS",
        &format!("{base}/master.m3u8"),
        &[
            ("Origin", "https://player.example"),
            ("Access-Control-Request-Method", "GET"),
        ],
        b"",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(preflight.status, 204);
    assert_eq!(header(&preflight, "access-control-allow-origin"), "*");

    // A variant plays: 6 s at 30 fps.
    let frames = play(&format!("{base}/360p/index.m3u8"), 6);
    assert!(
        (170..=185).contains(&frames),
        "{frames} frames of 360p in 6 s"
    );

    // The snapshot is a JPEG of the stream's size.
    let r = get(&format!("{}/rooms/{room}/snapshot.jpg", dev.node)).await;
    assert_eq!((r.status, header(&r, "content-type")), (200, "image/jpeg"));
    assert_eq!(&r.body[..3], &[0xff, 0xd8, 0xff], "JPEG SOI");
    let jpeg = dev.dir.join("snapshot.jpg");
    std::fs::write(&jpeg, &r.body).unwrap();
    let p = ffprobe(jpeg.to_str().unwrap());
    assert_eq!(p["streams"][0]["codec_name"], "mjpeg", "{p}");
    assert_eq!(video_sizes(&p), vec![(854, 480)], "{p}");

    // The play page over HLS in Chromium: asked for (hls.js), as the
    // fallback when WebRTC is missing or fails, and Chromium's own player.
    let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    let out = Command::new("node")
        .current_dir(&e2e)
        .args(["hls_play.mjs", "--base", &dev.node, "--room", room])
        .args(["--frames", "60", "--timeout-ms", "60000"])
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "HLS in Chromium failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    let viewers = result["viewers"].as_array().unwrap();
    assert_eq!(viewers.len(), 4, "{result}");
    for v in viewers {
        assert_eq!(v["protocol"], "hls", "{result}");
        assert!(v["framesDecoded"].as_u64().unwrap() >= 60, "{result}");
        let expected = if v["name"] == "native" {
            "native"
        } else {
            "hls.js"
        };
        assert_eq!(v["player"], expected, "{result}");
    }
    let by_name = |n: &str| viewers.iter().find(|v| v["name"] == n).unwrap();
    assert!(by_name("hls")["fallback"].is_null(), "{result}");
    assert_eq!(
        by_name("hls")["levels"],
        3,
        "hls.js sees the three variants: {result}"
    );
    assert!(
        by_name("fallback")["fallback"]
            .as_str()
            .unwrap()
            .contains("no WebRTC")
    );
    assert!(
        by_name("broken")["fallback"]
            .as_str()
            .unwrap()
            .contains("WebRTC failed")
    );

    // A room with transcoding off has only its source.
    let plain = dev.token("plain", "publish", "streamer").await;
    let _plain = Ffmpeg::push(dev.srt, "plain", &plain, "320x240", 30, &[]);
    wait_playlist(
        &format!("{}/hls/plain/source/index.m3u8", dev.node),
        1,
        "",
        &dev,
    )
    .await;
    let m = get(&format!("{}/hls/plain/master.m3u8", dev.node))
        .await
        .text();
    assert_eq!(m.matches("#EXT-X-STREAM-INF").count(), 1, "{m}");
    assert_eq!(
        get(&format!("{}/hls/plain/240p/index.m3u8", dev.node))
            .await
            .status,
        404
    );

    // The publisher goes, and comes back (another encoder, another size):
    // the playlists say so with a discontinuity and still play.
    first.wait(Duration::from_secs(40));
    let _second = Ffmpeg::push(dev.srt, room, &token, "640x360", 30, &["-bf", "0"]);
    let text = wait_playlist(
        &format!("{base}/source/index.m3u8"),
        3,
        "#EXT-X-DISCONTINUITY\n",
        &dev,
    )
    .await;
    let after = text.split("#EXT-X-DISCONTINUITY\n").nth(1).unwrap();
    assert!(after.matches("#EXTINF").count() >= 1, "{text}");
    assert!(
        text.matches("#EXT-X-MAP").count() >= 2,
        "a new init segment for the new SPS: {text}"
    );
    // Still valid for ffprobe (which reads the oldest listed segments).
    let probe = ffprobe(&format!("{base}/master.m3u8"));
    assert!(!video_sizes(&probe).is_empty(), "{probe}");
    // 240p is still made from the new 360p source; 360p is not (it would
    // not be smaller) and is no longer offered.
    let master = get(&format!("{base}/master.m3u8")).await.text();
    assert!(!master.contains("\n360p/index.m3u8"), "{master}");
    // Played from the oldest listed segment, across the discontinuity.
    let listed: f64 = text
        .lines()
        .filter_map(|l| l.strip_prefix("#EXTINF:"))
        .filter_map(|l| l.trim_end_matches(',').parse::<f64>().ok())
        .sum();
    let seconds = listed.floor() as u32;
    let frames = play(&format!("{base}/source/index.m3u8"), seconds);
    assert!(
        frames >= u64::from(seconds) * 30 * 9 / 10,
        "{frames} frames in {seconds} s across the discontinuity"
    );

    // Disk stays bounded: the window (6) + 4 kept + init segments.
    // (One directory per packaging run under the room's.)
    let runs: Vec<_> = std::fs::read_dir(dev.dir.join("data/hls").join(room))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let files = std::fs::read_dir(runs[0].join("source")).unwrap().count();
    assert!(files <= 6 + 4 + 2, "{files} files");
    assert!(dev.metric("weir_hls_segments_total").await >= 20.0);
    assert_eq!(dev.metric("weir_hls_dropped_total").await, 0.0);
    assert_eq!(
        dev.metric_with("weir_transcoder_encoder", "name=\"libx264\"")
            .await
            + dev
                .metric_with("weir_transcoder_encoder", "name=\"h264_nvenc\"")
                .await,
        1.0,
        "one encoder chosen and exported"
    );
    assert!(
        dev.log().contains("transcoder encoder:"),
        "the choice is logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_transcoder_never_delays_webrtc_forwarding() {
    require_ffmpeg();
    let _heavy = HEAVY.lock().await;
    // 150 ms per frame: the ladder runs at under 7 fps of a 30 fps stream.
    let dev = DevServer::start_with(&[
        "--ladder",
        "source,240p",
        "--transcode-test-delay-ms",
        "150",
    ]);
    let room = "stalled";
    let token = dev.token(room, "publish", "streamer").await;
    let _ffmpeg = Ffmpeg::push(
        dev.srt,
        room,
        &token,
        "640x360",
        40,
        &["-tune", "zerolatency"],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while dev
        .metric_with("weir_transcode_dropped_total", "kind=\"ladder\"")
        .await
        == 0.0
    {
        assert!(
            Instant::now() < deadline,
            "the transcoder never fell behind"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A WebRTC viewer (str0m, from weir-loadtest) plays 8 s meanwhile.
    let play = dev.token(room, "play", "viewer").await;
    let target = weir_loadtest::Target {
        whep_url: format!("{}/whep/{room}", dev.node),
        token: play,
    };
    let dropped_before = dev
        .metric_with("weir_transcode_dropped_total", "kind=\"ladder\"")
        .await;
    let report = weir_loadtest::viewer::run(
        &target,
        "127.0.0.1".parse().unwrap(),
        Instant::now() + Duration::from_secs(8),
    )
    .await;
    let dropped_after = dev
        .metric_with("weir_transcode_dropped_total", "kind=\"ladder\"")
        .await;
    assert!(report.error.is_none(), "{report:?}");
    assert!(report.first_frame.is_some(), "video arrived: {report:?}");
    let fps = report.video_frames as f64 / report.played.as_secs_f64().max(0.1);
    assert!(
        fps >= 27.0,
        "{fps:.1} fps reached the viewer while the transcoder was stalled: {report:?}"
    );
    assert_eq!(report.freezes, 0, "{report:?}");
    assert!(
        dropped_after > dropped_before + 100.0,
        "the transcoder kept dropping its own frames: {dropped_before} -> {dropped_after}"
    );
    assert_eq!(dev.metric("weir_source_frames_dropped_total").await, 0.0);
}

/// A room published over WebRTC (WHIP, `weir loadtest`'s str0m publisher
/// sending a VP8 clip and Opus) is on HLS too: VP8 re-encoded to H.264,
/// Opus to AAC, with its ladder and snapshots, like an SRT room.
#[tokio::test(flavor = "multi_thread")]
async fn a_whip_room_is_on_hls_with_its_ladder() {
    require_ffmpeg();
    let _heavy = HEAVY.lock().await;
    let dev = DevServer::start_with(&["--ladder", "source,180p", "--snapshot-interval", "1"]);
    let room = "whip-hls";
    let base = format!("{}/hls/{room}", dev.node);
    // A 640x360 VP8 clip: light enough to re-encode beside everything else
    // on a small machine.
    let clip = weir_loadtest::Clip::generate(&dev.dir, 640, 360, 800).unwrap();
    let loadtest = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["loadtest", "--control", &dev.control, "--room", room])
        .args(["--publishers", "1", "--viewers", "1", "--duration", "14"])
        .arg("--clip")
        .arg(&clip)
        .args(["--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("weir loadtest runs");
    for rendition in ["source", "180p"] {
        wait_playlist(&format!("{base}/{rendition}/index.m3u8"), 3, "", &dev).await;
    }
    let master = get(&format!("{base}/master.m3u8")).await;
    assert_eq!(master.status, 200);
    let text = master.text();
    assert!(text.contains("RESOLUTION=640x360"), "{text}");
    assert!(text.contains("RESOLUTION=320x180"), "{text}");
    assert!(text.contains("mp4a.40.2"), "AAC audio: {text}");
    let probe = ffprobe(&format!("{base}/master.m3u8"));
    assert_eq!(video_sizes(&probe), vec![(320, 180), (640, 360)], "{probe}");
    assert!(
        probe["streams"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["codec_name"] == "aac"),
        "{probe}"
    );
    let frames = play(&format!("{base}/source/index.m3u8"), 3);
    assert!(frames >= 60, "ffmpeg decoded {frames} frames of the source");
    let snap = get(&format!("{}/rooms/{room}/snapshot.jpg", dev.node)).await;
    assert_eq!(snap.status, 200);
    assert_eq!(header(&snap, "content-type"), "image/jpeg");
    let out = loadtest.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Opus in MPEG-TS over SRT (what ffmpeg sends with `-c:a libopus`) reaches
/// HLS as AAC, beside WebRTC viewers' Opus.
#[tokio::test(flavor = "multi_thread")]
async fn srt_opus_audio_is_on_hls_as_aac() {
    require_ffmpeg();
    let _heavy = HEAVY.lock().await;
    let dev = DevServer::start_with(&["--ladder", "off"]);
    let room = "opus-hls";
    let base = format!("{}/hls/{room}", dev.node);
    let token = dev.token(room, "publish", "streamer").await;
    let _ffmpeg = Ffmpeg::push(
        dev.srt,
        room,
        &token,
        "320x180",
        15,
        &["-bf", "0", "-c:a", "libopus", "-b:a", "96k"],
    );
    wait_playlist(&format!("{base}/source/index.m3u8"), 2, "", &dev).await;
    let master = get(&format!("{base}/master.m3u8")).await.text();
    assert!(master.contains("mp4a.40.2"), "{master}");
    let probe = ffprobe(&format!("{base}/source/index.m3u8"));
    let audio: Vec<_> = probe["streams"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["codec_type"] == "audio")
        .collect();
    assert_eq!(audio.len(), 1, "{probe}");
    assert_eq!(audio[0]["codec_name"], "aac", "{probe}");
    assert_eq!(audio[0]["sample_rate"], "48000", "{probe}");
}
