//! `weir ctl rollout` and `weir ctl top` as a script uses them: the real
//! binary against a real `weir dev` with a room published over SRT
//! (ffmpeg): JSON output, tables for people, exit codes, and assignments
//! that follow the rollout weights.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::ffmpeg::{Publisher, require_ffmpeg};
use common::{DevServer, ctl, request};

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", text(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

async fn assigned_node(control: &str, viewer: &str) -> (u16, String) {
    let body = serde_json::json!({ "room": "other", "viewer_id": viewer }).to_string();
    let r = request(
        "POST",
        &format!("{control}/v1/assign-viewer"),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let node = v["endpoints"][0]["node_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (r.status, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_and_top_from_the_command_line() {
    require_ffmpeg();
    let dev = DevServer::start_with(&["--ladder", "off", "--snapshot-interval", "0"]);
    let c = dev.control.as_str();
    // The dev node runs the binary's own version.
    let version = env!("CARGO_PKG_VERSION");

    // Nothing set: the node's version, every node alike.
    let state = json(&ctl(c, &["--json", "rollout", "get"]));
    assert_eq!(state["weights"], serde_json::json!({}));
    assert_eq!(state["version"], 0);
    assert_eq!(state["versions"][0]["version"], version);
    assert_eq!(state["versions"][0]["share"], 1.0);

    // A canary of a version no node runs yet: all of it still goes to the
    // node's version, which the output says.
    let set = ctl(
        c,
        &[
            "rollout",
            "set",
            &format!("{version}=90,next=10"),
            "--by",
            "ops",
        ],
    );
    assert!(set.status.success(), "{}", text(&set));
    let table = String::from_utf8_lossy(&set.stdout);
    assert!(table.starts_with("VERSION  WEIGHT  SHARE"), "{table}");
    assert!(
        table.contains(&format!("weights: {version}=90,next=10 (version 1")),
        "{table}"
    );
    let state = json(&ctl(c, &["--json", "rollout", "get"]));
    assert_eq!(state["weights"][version], 90);
    assert_eq!(state["updated_by"], "ops");
    let versions = state["versions"].as_array().unwrap();
    let next = versions.iter().find(|v| v["version"] == "next").unwrap();
    assert_eq!(
        (next["nodes"].as_u64(), next["share"].as_f64()),
        (Some(0), Some(0.0))
    );

    // Bad input: exit 64 with a reason, nothing written.
    for (args, want) in [
        (vec!["rollout", "set", "a=0,b=0"], "at least one weight"),
        (vec!["rollout", "set", "a=-3"], "VERSION=WEIGHT"),
        (
            vec!["rollout", "set", "bad version=3"],
            "not a version label",
        ),
        (
            vec!["rollout", "set", "a=1", "--expect-version", "7"],
            "version 1, not 7",
        ),
    ] {
        let out = ctl(c, &args);
        let code = if want.starts_with("version") { 75 } else { 64 };
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(want),
            "{args:?}: {}",
            text(&out)
        );
    }
    assert_eq!(json(&ctl(c, &["--json", "rollout", "get"]))["version"], 1);

    // Blue-green onto a version with no node: viewers are not turned away,
    // they stay on the only version there is.
    let out = ctl(
        c,
        &[
            "--json",
            "rollout",
            "set",
            "next=100",
            &format!("{version}=0"),
        ],
    );
    assert_eq!(json(&out)["weights"]["next"], 100);
    assert_eq!(assigned_node(c, "v1").await, (200, "dev".to_owned()));
    let out = ctl(c, &["--json", "rollout", "clear"]);
    assert_eq!(json(&out)["weights"], serde_json::json!({}));

    // An unreachable control plane: exit 69.
    let out = ctl("http://127.0.0.1:9", &["rollout", "get"]);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));

    // top: a room goes live; one JSON object per view.
    let token = dev.token("top-room", "publish", "streamer").await;
    let _publisher = Publisher::push(dev.srt, "top-room", &token);
    let deadline = Instant::now() + Duration::from_secs(30);
    let view = loop {
        let view = json(&ctl(c, &["top", "--once", "--json"]));
        let live = view["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["room"] == "top-room" && r["live"] == true);
        if live {
            break view;
        }
        assert!(
            Instant::now() < deadline,
            "top never showed the live room: {view}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let node = &view["nodes"][0];
    assert_eq!(node["id"], "dev");
    assert_eq!(node["version"], version);
    assert_eq!(node["schedulable"], true);
    assert_eq!(node["draining"], false);
    assert!(node["capacity"].as_u64().unwrap() > 0);
    assert!(view["at_unix_ms"].as_i64().unwrap() > 0);
    assert_eq!(view["rooms"][0]["origin_node"], "dev");
    assert_eq!(view["cdns"], serde_json::json!([]));

    let out = ctl(c, &["top", "--iterations", "2", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 2, "{}", text(&out));
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["nodes"][0]["id"], "dev");
    }

    // For people: the tables.
    let out = ctl(c, &["top", "--once"]);
    assert!(out.status.success(), "{}", text(&out));
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(screen.starts_with("weir top"), "{screen}");
    assert!(screen.contains("NODE  STATE"), "{screen}");
    assert!(screen.contains("top rooms by viewers"), "{screen}");
    assert!(screen.contains("top-room"), "{screen}");
    assert!(
        !screen.contains('\u{1b}'),
        "no terminal codes into a pipe: {screen}"
    );

    // top against nothing: exit 69 at once; bad usage: 64.
    let out = ctl("http://127.0.0.1:9", &["top", "--once"]);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    let out = ctl(c, &["top", "--iterations", "0"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
}
