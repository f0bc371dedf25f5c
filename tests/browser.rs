//! End to end with clients no one here wrote: headless Chromium publishes
//! through the publish page (WHIP) and two more Chromium processes play
//! through the play page (WHEP), one of them joining late. Before that the
//! node is sent garbage on its UDP port and bad HTTP, which must change
//! nothing. Needs Debian's chromium and the npm packages of tests/e2e:
//! `deploy/setup.sh` installs both; a missing one fails the test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{DevServer, request};

fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

fn require_browser_tools() {
    let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    assert!(
        Path::new(&chromium()).exists(),
        "Chromium not found at {}: run deploy/setup.sh (or set CHROMIUM)",
        chromium()
    );
    assert!(
        e2e.join("node_modules/playwright-core").exists(),
        "tests/e2e/node_modules is missing: run deploy/setup.sh (npm ci in tests/e2e)"
    );
}

fn run_browsers(base: &str, room: &str, codec: &str) -> serde_json::Value {
    let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    let out = Command::new("node")
        .current_dir(&e2e)
        .args([
            "browser_e2e.mjs",
            "--base",
            base,
            "--room",
            room,
            "--codec",
            codec,
            "--timeout-ms",
            "90000",
            // Long enough for the pages' first QoE report (every 5 s).
            "--watch-ms",
            "2500",
        ])
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browsers failed ({codec}):\n{stdout}\n{stderr}"
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("bad output {stdout}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn chromium_plays_vp8_and_h264_through_io_uring_shards() {
    chromium_publishes_and_two_chromium_viewers_play("io_uring").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chromium_plays_vp8_and_h264_through_the_epoll_fallback() {
    chromium_publishes_and_two_chromium_viewers_play("epoll").await;
}

async fn chromium_publishes_and_two_chromium_viewers_play(io: &str) {
    require_browser_tools();
    // Two shards, so rooms land on different shards of one node.
    let dev = DevServer::start_with(&["--io", io, "--shards", "2"]);
    assert!(
        dev.stdout_lines()
            .iter()
            .any(|l| l.starts_with("media shards") && l.contains(&format!("on {io} I/O"))),
        "weir dev runs the {io} backend: {:?}",
        dev.stdout_lines()
    );

    // Hostile traffic first: random datagrams on the WebRTC port.
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for n in 0..3000usize {
        let bytes: Vec<u8> = (0..(n % 1200) + 1)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        socket.send_to(&bytes, dev.udp).await.unwrap();
        if n % 50 == 49 {
            // Paced, so the kernel's receive buffer does not drop them first.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // And HTTP that is not WHIP.
    for (method, path) in [
        ("POST", "/whip/x"),
        ("POST", "/whep/%00"),
        ("GET", "/whip/x/y"),
        ("BREW", "/"),
    ] {
        let r = request(
            method,
            &format!("{}{path}", dev.node),
            &[],
            b"junk",
            Duration::from_secs(5),
        )
        .await;
        assert!(r.is_ok_and(|r| (400..500).contains(&r.status)));
    }

    let mut ttff_samples = 0;
    for codec in ["vp8", "h264"] {
        let room = format!("e2e-{codec}");
        let result = run_browsers(&dev.node, &room, codec);
        assert_eq!(result["ok"], true, "{result}");
        let viewers = result["viewers"].as_array().unwrap();
        assert_eq!(viewers.len(), 2, "{result}");
        for v in viewers {
            assert!(v["framesDecoded"].as_u64().unwrap() > 0, "{result}");
            assert!(v["audioPackets"].as_u64().unwrap() > 0, "{result}");
            assert!(
                v["videoCodec"]
                    .as_str()
                    .unwrap()
                    .to_lowercase()
                    .starts_with(codec),
                "{result}"
            );
        }
        ttff_samples += viewers.len();
    }

    // Counted and dropped (a few may be lost in the kernel before the node sees them).
    let dropped = dev.metric("weir_udp_datagrams_dropped_total").await;
    assert!(dropped >= 2500.0, "{dropped} garbage datagrams counted");
    assert!(dev.metric("weir_frames_forwarded_total").await > 0.0);
    assert!(
        dev.metric("weir_time_to_first_frame_seconds_count").await >= ttff_samples as f64,
        "server-side time to first frame is recorded per viewer"
    );
    assert!(dev.metric("weir_sessions_connected_total").await >= 6.0);
    // The play pages reported what their viewers experienced.
    assert!(
        dev.metric_with("weir_viewer_reports_total", "protocol=\"webrtc\"")
            .await
            >= 2.0
    );
    assert!(dev.metric("weir_viewer_played_ms_total").await > 1000.0);
    assert!(dev.metric("weir_viewer_ttff_seconds_count").await >= 2.0);
}
