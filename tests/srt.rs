//! SRT ingest end to end, with clients no one here wrote: the ffmpeg CLI
//! pushes a test pattern with a tone (libx264 with its default B-frames,
//! AAC) over SRT into `weir dev`, and two headless Chromium viewers play the
//! room over WHEP, decoding video and receiving audio. Then every kind of
//! refusal, each counted in /metrics and logged, while the node keeps
//! serving the room that is live. Needs ffmpeg, Chromium and the npm
//! packages of tests/e2e (`deploy/setup.sh --test`); a missing one fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{DevServer, request};
use futures::SinkExt;

fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

fn require_ffmpeg() {
    let ok = Command::new("ffmpeg")
        .arg("-version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "the ffmpeg CLI is missing: run deploy/setup.sh --test");
}

fn require_browser_tools() {
    let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    assert!(
        Path::new(&chromium()).exists(),
        "Chromium not found at {}: run deploy/setup.sh --test (or set CHROMIUM)",
        chromium()
    );
    assert!(
        e2e.join("node_modules/playwright-core").exists(),
        "tests/e2e/node_modules is missing: run deploy/setup.sh --test"
    );
}

/// An ffmpeg CLI publisher; killed on drop.
struct Ffmpeg(Child);

impl Ffmpeg {
    /// Pushes testsrc2 + sine as MPEG-TS over SRT for `seconds`, in real time.
    fn push(srt: std::net::SocketAddr, streamid: &str, seconds: u32) -> Self {
        let url = format!("srt://{srt}?streamid={streamid}");
        let child = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-re"])
            .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30"])
            .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
            // libx264's defaults (B-frames included); yuv420p for browsers.
            .args([
                "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "veryfast",
            ])
            .args(["-g", "60", "-c:a", "aac", "-b:a", "128k"])
            .args(["-t", &seconds.to_string(), "-f", "mpegts"])
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ffmpeg runs");
        Self(child)
    }

    /// Waits for ffmpeg to exit (it does at once when refused).
    fn wait(mut self, limit: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.0.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return (status.code(), err);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (None, String::new())
    }
}

impl Drop for Ffmpeg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn access_control(room: &str, mode: &str, token: &str) -> String {
    format!("#!::r={room},m={mode},t={token}")
}

/// Polls a metric until it passes `min` (frames flow asynchronously).
async fn wait_metric(dev: &DevServer, name: &str, labels: &str, min: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = if labels.is_empty() {
            dev.metric(name).await
        } else {
            dev.metric_with(name, labels).await
        };
        if v > min || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ffmpeg_pushes_srt_and_two_chromium_viewers_play_it() {
    require_ffmpeg();
    require_browser_tools();
    // One rendition below the 640x360 source: a second video layer.
    let dev = DevServer::start_with(&["--ladder", "source,180p"]);
    let room = "srt-e2e";
    let token = dev.token(room, "publish", "streamer").await;
    let _ffmpeg = Ffmpeg::push(dev.srt, &access_control(room, "publish", &token), 120);
    let video = wait_metric(&dev, "weir_srt_frames_total", "kind=\"video\"", 30.0).await;
    assert!(video > 30.0, "frames arrive over SRT; log: {}", dev.log());

    let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    let out = Command::new("node")
        .current_dir(&e2e)
        .args(["browser_e2e.mjs", "--base", &dev.node, "--room", room])
        .args(["--codec", "h264", "--no-publisher", "--watch-ms", "4000"])
        // The late joiner asks for at most the 180p rendition.
        .args(["--viewer2-query", "layer=180p"])
        .args(["--timeout-ms", "90000"])
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "browsers failed:\n{stdout}\n{stderr}");
    let result: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    eprintln!("browsers: {result}");
    let viewers = result["viewers"].as_array().unwrap();
    assert_eq!(viewers.len(), 2, "{result}");
    // The source as sent (without B-frames) to one; the ladder's rendition,
    // a simulcast layer of the room, to the one that asked for it. Shown at
    // some time while they played, not necessarily at the end: on two
    // cores shared with ffmpeg, two encoders and two browsers, a layer whose
    // transcoder falls 500 ms behind is left for one that keeps pace (and a
    // bandwidth estimate can dip), by design. Their last sizes had made
    // this test fail in 8 of 27 runs here.
    let seen = |v: &serde_json::Value, size: &str| {
        v["sizesSeen"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x == size))
    };
    assert!(seen(&viewers[0], "640x360"), "{result}");
    assert!(seen(&viewers[1], "320x180"), "{result}");
    for v in viewers {
        let decoded = v["framesDecoded"].as_u64().unwrap();
        let received = v["framesReceived"].as_u64().unwrap();
        // Not a handful of frames before the decoder gives up (what B-frames
        // passed through do to Chromium), but the stream, every frame of it.
        assert!(decoded >= 60, "{result}");
        // (At most half dropped: a loaded machine drops some in the
        // decoder; B-frames break nearly all of them.)
        assert!(decoded * 2 >= received, "{result}");
        assert!(v["audioPackets"].as_u64().unwrap() > 0, "{result}");
        assert!(
            v["videoCodec"]
                .as_str()
                .unwrap()
                .to_lowercase()
                .starts_with("h264"),
            "{result}"
        );
    }
    // The B-frames were seen and re-encoded away; audio went through the
    // AAC → Opus transcoder.
    assert!(dev.metric("weir_srt_reencoded_streams_total").await >= 1.0);
    assert!(
        dev.metric_with("weir_srt_frames_total", "kind=\"audio\"")
            .await
            > 0.0
    );
    assert_eq!(dev.metric("weir_ts_corrupt_packets_total").await, 0.0);
}

/// An SRT caller from srt-tokio; `Err` when the node refuses it.
async fn call(
    srt: std::net::SocketAddr,
    streamid: Option<&str>,
) -> std::io::Result<srt_tokio::SrtSocket> {
    srt_tokio::SrtSocket::builder()
        .call(srt.to_string().as_str(), streamid)
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn srt_refusals_are_counted_and_the_node_keeps_serving() {
    require_ffmpeg();
    let dev = DevServer::start();
    let live = "srt-live";
    let token = dev.token(live, "publish", "streamer").await;
    let _ffmpeg = Ffmpeg::push(dev.srt, &access_control(live, "publish", &token), 120);
    assert!(wait_metric(&dev, "weir_srt_frames_total", "kind=\"video\"", 10.0).await > 10.0);

    // A bad token, from the ffmpeg CLI itself: refused, ffmpeg says so.
    let refused = Ffmpeg::push(
        dev.srt,
        &access_control("other", "publish", "w1.bad.token"),
        5,
    )
    .wait(Duration::from_secs(20));
    assert_ne!(refused.0, Some(0), "ffmpeg is refused: {refused:?}");

    let other = dev.token("other", "publish", "streamer").await;
    let rival = dev.token(live, "publish", "someone-else").await;
    let play = dev.token(live, "play", "viewer").await;
    let cases: Vec<(Option<String>, &str)> = vec![
        (Some(access_control(live, "request", &token)), "mode"),
        (Some(access_control(live, "dance", &token)), "mode"),
        (Some(access_control(live, "publish", &play)), "forbidden"),
        (Some(access_control(live, "publish", &other)), "forbidden"),
        (Some(format!("#!::r={live},m=publish")), "token"),
        (Some(access_control(live, "publish", &rival)), "busy"),
        (Some("#!::junk".into()), "streamid"),
        (Some("#!::r=a/b,t=x".into()), "streamid"),
        (None, "streamid"),
    ];
    for (streamid, _) in &cases {
        let r = call(dev.srt, streamid.as_deref()).await;
        assert!(r.is_err(), "{streamid:?} is refused");
    }
    for reason in ["token", "mode", "streamid", "forbidden", "busy"] {
        let n = dev
            .metric_with("weir_srt_rejected_total", &format!("reason=\"{reason}\""))
            .await;
        let want =
            cases.iter().filter(|(_, r)| *r == reason).count() + usize::from(reason == "token");
        assert_eq!(n, want as f64, "weir_srt_rejected_total{{reason={reason}}}");
    }
    let log = dev.log();
    assert!(log.contains("SRT publisher refused"), "{log}");
    assert!(log.contains("\"reason\":\"busy\""), "{log}");
    assert!(!log.contains(&token), "tokens stay out of the logs");

    // Random bytes as a TS stream (plain streamid form): survived, counted.
    let noise_token = dev.token("noise", "publish", "noisy").await;
    let mut noise = call(dev.srt, Some(&format!("noise?token={noise_token}")))
        .await
        .expect("a valid plain streamid is admitted");
    let mut seed = 0x5eed_u64;
    for n in 0..2000 {
        let chunk: Vec<u8> = (0..1316)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        noise
            .send((Instant::now(), bytes::Bytes::from(chunk)))
            .await
            .unwrap();
        // Paced (~5 Mbit/s): a burst would be SRT's to drop as too late
        // on a busy machine, and then nothing reaches the demuxer.
        if n % 5 == 4 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let _ = noise.close().await;
    let corrupt = wait_metric(&dev, "weir_ts_corrupt_packets_total", "", 100.0).await;
    assert!(
        corrupt > 100.0,
        "random bytes are counted as corrupt packets: {corrupt} of {} bytes received",
        dev.metric("weir_srt_bytes_received_total").await
    );

    // The live room kept flowing all along, and still takes viewers.
    let before = dev
        .metric_with("weir_srt_frames_total", "kind=\"video\"")
        .await;
    let after = wait_metric(
        &dev,
        "weir_srt_frames_total",
        "kind=\"video\"",
        before + 30.0,
    )
    .await;
    assert!(after > before + 30.0, "{before} -> {after}");
    let r = request(
        "POST",
        &format!("{}/whep/{live}", dev.node),
        &[
            ("Content-Type", "application/sdp"),
            ("Authorization", &format!("Bearer {play}")),
        ],
        common::offer(false).as_bytes(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(dev.metric("weir_srt_connections").await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypted_srt_with_latency_interoperates_with_ffmpeg() {
    require_ffmpeg();
    let passphrase = "correct-horse-battery";
    let dev = DevServer::start_with(&["--srt-passphrase", passphrase]);
    let room = "secret";
    let token = dev.token(room, "publish", "streamer").await;
    let streamid = access_control(room, "publish", &token);

    // No encryption, then the wrong passphrase: both refused.
    let plain = Ffmpeg::push(dev.srt, &streamid, 5).wait(Duration::from_secs(20));
    assert_ne!(plain.0, Some(0), "{plain:?}");
    let wrong = format!("{streamid}&passphrase=wrong-horse-battery&pbkeylen=16");
    let wrong = Ffmpeg::push(dev.srt, &wrong, 5).wait(Duration::from_secs(20));
    assert_ne!(wrong.0, Some(0), "{wrong:?}");
    assert_eq!(
        dev.metric_with("weir_srt_rejected_total", "reason=\"encryption\"")
            .await,
        1.0
    );
    assert_eq!(dev.metric("weir_srt_frames_total").await, 0.0);

    // The right one (AES-128), with a latency of 200 ms (ffmpeg counts in µs).
    let right = format!("{streamid}&passphrase={passphrase}&pbkeylen=16&latency=200000");
    let _ffmpeg = Ffmpeg::push(dev.srt, &right, 60);
    let video = wait_metric(&dev, "weir_srt_frames_total", "kind=\"video\"", 30.0).await;
    assert!(video > 30.0, "encrypted frames arrive; log: {}", dev.log());
    assert_eq!(dev.metric("weir_ts_corrupt_packets_total").await, 0.0);
}
