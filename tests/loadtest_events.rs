//! `weir loadtest events` against `weir dev`: every delivery counted, no
//! gap, nothing refused; a mass reconnect recovers every client; bad
//! arguments are refused before any traffic. Counts, not timings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::DevServer;
use serde_json::Value;

fn loadtest(args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["--log-format", "json", "loadtest", "events", "--json"])
        .args(args)
        .output()
        .expect("weir runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), report, stderr)
}

#[test]
fn twenty_subscribers_get_every_danmaku_without_gaps() {
    let dev = DevServer::start();
    let (code, r, stderr) = loadtest(&[
        "--url",
        &dev.node,
        "--control",
        &dev.control,
        "--room",
        "lt-clean",
        "--subscribers",
        "20",
        "--chatters",
        "1",
        "--rate",
        "1",
        "--duration",
        "3",
        "--drain",
        "2",
    ]);
    assert_eq!(code, 0, "report {r}\nstderr {stderr}");
    assert_eq!(r["connected"], 20, "{r}");
    assert_eq!(r["connect_failed"], 0, "{r}");
    let sent = r["sent"].as_u64().unwrap();
    assert!(sent >= 2, "one chatter at 1/s for 3 s sends ~3: {r}");
    assert_eq!(r["acked"].as_u64(), Some(sent), "{r}");
    // Every acknowledged danmaku reached all 20 subscribers (the chatter
    // included), and nothing was skipped or missing in the prev chain.
    assert_eq!(r["expected_deliveries"].as_u64(), Some(sent * 20), "{r}");
    assert_eq!(r["deliveries"], r["expected_deliveries"], "{r}");
    assert_eq!(r["latency_ms"]["count"], r["deliveries"], "{r}");
    assert_eq!(r["gaps"], 0, "{r}");
    assert_eq!(r["skipped_events"], 0, "{r}");
    assert_eq!(r["disconnects"], serde_json::json!({}), "{r}");
    assert_eq!(r["refused"], serde_json::json!({}), "{r}");
}

#[test]
fn a_mass_reconnect_recovers_every_client() {
    let dev = DevServer::start();
    let (code, r, stderr) = loadtest(&[
        "--url",
        &dev.node,
        "--control",
        &dev.control,
        "--room",
        "lt-back",
        "--rooms",
        "2",
        "--subscribers",
        "30",
        "--rate",
        "4",
        "--duration",
        "5",
        "--reconnect",
        "--reconnect-at",
        "2",
        "--away-ms",
        "1000",
    ]);
    assert_eq!(code, 0, "report {r}\nstderr {stderr}");
    let rc = &r["reconnect"];
    let away = rc["clients"].as_u64().unwrap();
    // Auto chatters: max(rooms, ceil(4 / 1.5)) = 3, at 4/3 danmaku/s each.
    assert_eq!(r["chatters"], 3, "{r}");
    assert_eq!(away, 27, "{r}");
    assert_eq!(rc["reconnected"].as_u64(), Some(away), "{r}");
    assert_eq!(rc["recovered"].as_u64(), Some(away), "{r}");
    assert_eq!(rc["caught_up"].as_u64(), Some(away), "{r}");
    assert!(rc["all_caught_up_ms"].is_number(), "{r}");
    // Recovery replayed what they missed: nothing lost across the gap.
    assert_eq!(r["gaps"], 0, "{r}");
    assert_eq!(r["deliveries"], r["expected_deliveries"], "{r}");
    // Live and replayed deliveries are timed apart.
    let live = r["latency_ms"]["count"].as_u64().unwrap();
    let replayed = rc["replayed"].as_u64().unwrap();
    assert_eq!(Some(live + replayed), r["deliveries"].as_u64(), "{r}");
}

#[test]
fn bad_arguments_are_refused_before_any_traffic() {
    // Nothing listens on port 1: a refusal must come before connecting.
    for (args, want) in [
        (vec!["--rate", "50", "--chatters", "2"], "add chatters"),
        (vec!["--subscribers", "0"], "--subscribers"),
        (vec!["--target", "nats-ws", "--reconnect"], "--url"),
        (vec!["--rooms", "3", "--token", "x"], "--token"),
    ] {
        let mut all = vec![
            "--url",
            "http://127.0.0.1:1",
            "--control",
            "http://127.0.0.1:1",
        ];
        all.extend(args);
        let (code, _, stderr) = loadtest(&all);
        assert_ne!(code, 0, "{all:?} should be refused");
        assert!(stderr.contains(want), "{all:?}: {stderr}");
        assert!(
            !stderr.contains("cannot mint"),
            "refused after traffic: {stderr}"
        );
    }
    // A clap-level mistake exits 64 (usage).
    let (code, _, _) = loadtest(&["--rate", "fast"]);
    assert_eq!(code, 64);
}
