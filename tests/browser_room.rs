//! The play page's room panel in headless Chromium (tests/e2e/room_e2e.mjs)
//! against `weir dev`: a danmaku typed by one viewer flies over the other's
//! video, likes add up, a paid gift shows and the balance drops, and a
//! dropped socket reconnects with recovery.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::DevServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_viewers_chat_like_and_send_gifts() {
    let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "Chromium not found at {chromium}: run deploy/setup.sh (or set CHROMIUM)"
    );
    assert!(
        e2e.join("node_modules/playwright-core").exists(),
        "tests/e2e/node_modules is missing: run deploy/setup.sh (npm ci in tests/e2e)"
    );
    let dev = DevServer::start();
    let room = "browser-chat";
    for (path, body) in [
        (
            "/v1/users",
            serde_json::json!({"id": "alice", "name": "Alice"}),
        ),
        ("/v1/users", serde_json::json!({"id": "bob", "name": "Bob"})),
        (
            "/v1/users",
            serde_json::json!({"id": "host", "name": "Host"}),
        ),
        (
            "/v1/rooms",
            serde_json::json!({"id": room, "owner": "host", "title": "Chat"}),
        ),
    ] {
        common::post_json_ok(&dev.control, path, &body).await;
    }
    let grant = common::ctl(&dev.control, &["wallet", "grant", "alice", "500"]);
    assert!(grant.status.success(), "{grant:?}");

    let out = Command::new("node")
        .current_dir(&e2e)
        .args([
            "room_e2e.mjs",
            "--base",
            &dev.node,
            "--room",
            room,
            "--sender",
            "alice",
            "--watcher",
            "bob",
            "--timeout-ms",
            "60000",
        ])
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "room e2e failed:\n{stdout}\n{stderr}");
    let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(result["balanceBefore"], 500, "{result}");
    assert_eq!(
        result["balanceAfter"], 490,
        "one rose, charged once: {result}"
    );
}

/// tests/e2e/dc_events.mjs: the same room events over the data channel of a
/// WHEP session, beside a WebSocket client of the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_gets_room_events_over_the_whep_data_channel() {
    let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    assert!(
        e2e.join("node_modules/playwright-core").exists(),
        "tests/e2e/node_modules is missing: run deploy/setup.sh (npm ci in tests/e2e)"
    );
    let dev = DevServer::start();
    let room = "browser-dc";
    let dc_token = dev.token(room, "play", "carol").await;
    let ws_token = dev.token(room, "play", "dave").await;
    let out = Command::new("node")
        .current_dir(&e2e)
        .args([
            "dc_events.mjs",
            "--base",
            &dev.node,
            "--room",
            room,
            "--dc-token",
            &dc_token,
            "--ws-token",
            &ws_token,
            "--timeout-ms",
            "60000",
        ])
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "data channel e2e failed:\n{stdout}\n{stderr}"
    );
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        r["hello"]["user"], "carol",
        "the session's token names the user: {r}"
    );
    assert_eq!(r["hello"]["room"], room, "{r}");
    assert_eq!(r["refused"], "malformed", "{r}");
    assert_eq!(r["recoveredFlag"], true, "{r}");
    assert_eq!(
        r["recovered"],
        serde_json::json!(["missed one", "missed two"]),
        "exactly the missed danmaku, in order: {r}"
    );
    assert_eq!(r["bye"]["code"], "bad_request", "{r}");
    assert!(
        r["bye"]["reason"]
            .as_str()
            .unwrap()
            .contains("since and epoch"),
        "{r}"
    );
    assert!(dev.metric("weir_events_channels_total").await >= 3.0);
}
