//! `weir loadtest gifts` against a `weir control` on SQLite: what the
//! harness says it paid is what the store holds (read here straight from
//! the store, not through the API the harness checks itself with), the
//! idempotent retries paid nothing more, and bad arguments are refused
//! before any traffic. Counts, not timings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::proc::Proc;
use common::temp_dir;
use serde_json::Value;
use weir_control_plane::store::{Store, UserId, sqlite_url};

const GIFTS: u64 = 60;
const SENDERS: u64 = 6;

fn loadtest(args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["--log-format", "json", "loadtest", "gifts", "--json"])
        .args(args)
        .output()
        .expect("weir runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), report, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reported_gifts_are_the_stored_gifts() {
    let dir = temp_dir("loadtest-gifts");
    let data = dir.join("control-data");
    let control = Proc::spawn(
        "control",
        &dir,
        &[
            "control",
            "--grpc",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--allow-grants",
            "--allow-token-minting",
        ],
    );
    let url = control.wait_line("its URL", |l| {
        l.starts_with("http://").then(|| l.trim().to_owned())
    });
    let (code, r, stderr) = loadtest(&[
        "--control",
        &url,
        "--senders",
        &SENDERS.to_string(),
        "--rooms",
        "2",
        "--count",
        &GIFTS.to_string(),
        "--duration",
        "120",
        "--gift",
        "rose",
        "--gift-count",
        "3",
        "--retry-ratio",
        "0.5",
        // No room bus here: the relay cannot publish, so do not wait for it.
        "--outbox-wait",
        "0",
    ]);
    assert_eq!(code, 0, "report {r}\nstderr {stderr}");
    assert_eq!(r["stopped_by"], "count", "{r}");
    assert_eq!(r["attempts"].as_u64(), Some(GIFTS), "{r}");
    assert_eq!(r["committed"].as_u64(), Some(GIFTS), "{r}");
    assert_eq!(r["errors"], serde_json::json!({}), "{r}");
    assert_eq!(r["latency_ms"]["count"].as_u64(), Some(GIFTS), "{r}");
    // A rose costs 10; three of them per gift.
    assert_eq!(r["price"].as_i64(), Some(10), "{r}");
    assert_eq!(r["amount"].as_i64(), Some(30 * GIFTS as i64), "{r}");
    // Every sender re-sends half of its paid gifts (rounded down each).
    let replays = r["replays"].as_u64().unwrap();
    assert!(
        (GIFTS / 2 - SENDERS..=GIFTS / 2).contains(&replays),
        "{replays} replays: {r}"
    );
    assert_eq!(r["replay_mismatches"], 0, "{r}");
    assert_eq!(r["unexpected_replays"], 0, "{r}");
    assert_eq!(r["verify"]["consistent"], true, "{r}");
    assert_eq!(
        r["verify"]["senders_checked"].as_u64(),
        Some(SENDERS),
        "{r}"
    );
    assert_eq!(r["verify"]["ledger_gift_rows"].as_u64(), Some(GIFTS), "{r}");
    assert_eq!(r["verify"]["leaderboards_checked"], 2, "{r}");

    // The store itself: a fresh database, so everything in it is the run's.
    let store = Store::connect(&sqlite_url(&data.join("weir.db")), Duration::from_secs(10))
        .await
        .unwrap();
    let audit = store.wallet_audit().await.unwrap();
    assert_eq!(audit.gifts, GIFTS, "retries wrote no gift: {audit:?}");
    assert_eq!(audit.outbox_rows, GIFTS, "{audit:?}");
    assert_eq!(audit.gifts_without_one_outbox_row, 0, "{audit:?}");
    assert_eq!(audit.ledger_sum, 0, "{audit:?}");
    assert_eq!(audit.balance_sum, 0, "{audit:?}");
    assert_eq!(audit.mismatched_accounts, 0, "{audit:?}");
    assert_eq!(audit.negative_users, 0, "{audit:?}");
    // Ledger rows: two per grant (one per sender) and two per gift.
    assert_eq!(audit.ledger_rows, 2 * (SENDERS + GIFTS), "{audit:?}");
    let run = r["run"].as_str().unwrap();
    let mut owners = 0;
    for j in 0..2 {
        let owner = UserId::parse(&format!("ltg-{run}-o{j}")).unwrap();
        owners += store.balance(&owner).await.unwrap().balance;
    }
    assert_eq!(
        owners,
        r["amount"].as_i64().unwrap(),
        "the rooms' owners received exactly what the run says it paid"
    );
    assert_eq!(r["verify"]["owners_balance"].as_i64(), Some(owners), "{r}");
    store.close().await;
    drop(control);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_arguments_are_refused_before_any_traffic() {
    // Nothing listens on port 1: a refusal must come before connecting.
    for (args, want) in [
        (&["--senders", "0"][..], "--senders"),
        (&["--senders", "2", "--rooms", "3"][..], "--rooms"),
        (&["--retry-ratio", "2"][..], "--retry-ratio"),
        (&["--duration", "0"][..], "--duration"),
        (&["--count", "0"][..], "--count"),
    ] {
        let (code, _, stderr) =
            loadtest(&[&["--control", "http://127.0.0.1:1"][..], args].concat());
        assert_ne!(code, 0, "{args:?}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    let (code, _, stderr) = loadtest(&["--control", "http://127.0.0.1:1", "--duration", "1"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("cannot connect"), "{stderr}");
}
