//! A room bigger than one shard: once its home shard carries `--shard-spill`
//! viewers, further viewers go to another shard, fed from the home shard
//! over in-memory queues, and play like the others. Publisher and viewers
//! are `weir loadtest`'s (str0m peers; the publisher sends a VP8 clip that
//! ffmpeg generates).
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::DevServer;

#[test]
fn viewers_beyond_the_home_shard_play_through_another_shard() {
    let dev = DevServer::start_with(&["--shards", "2", "--shard-spill", "2"]);
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["loadtest", "--control", &dev.control, "--room", "fanout"])
        .args([
            "--publishers",
            "1",
            "--viewers",
            "6",
            "--duration",
            "6",
            "--json",
        ])
        .output()
        .expect("weir loadtest runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "loadtest failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["viewers"], 6, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(
        summary["viewers_without_video"], 0,
        "every viewer, on either shard, got video: {summary}"
    );
    assert!(
        summary["video_fps"]["p50"].as_f64().unwrap() > 20.0,
        "{summary}"
    );
    assert!(
        dev.log().contains("room fans out to another shard"),
        "the room was relayed to the second shard"
    );
}

/// The shards' I/O flags refuse what they cannot mean, from the command
/// line and from the environment, before anything is started.
#[test]
fn bad_shard_io_flags_are_usage_errors() {
    let dir = common::temp_dir("bad-io-flags");
    let run = |args: &[&str], env: Option<(&str, &str)>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_weir"));
        cmd.arg("dev")
            .args(args)
            .arg("--data-dir")
            .arg(dir.join("data"));
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    for (args, env, flag) in [
        (&["--udp-gso", "maybe"][..], None, "--udp-gso"),
        (&["--udp-gso"][..], None, "--udp-gso"),
        (&[][..], Some(("WEIR_UDP_GSO", "on")), "--udp-gso"),
        (&["--io", "kqueue"][..], None, "--io"),
    ] {
        let out = run(args, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?} {env:?}: {stderr}");
    }
    assert!(!dir.join("data").exists(), "nothing was started or written");
}
