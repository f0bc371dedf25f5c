//! CDN failover end to end: two Debian nginx processes, each a caching
//! proxy in front of a real `weir dev` node, stand in for two CDNs. They are
//! configured with `weir ctl config set cdn.endpoints=…`; the control
//! plane's CDN prober (the elected singleton worker; in `weir dev` the only
//! candidate) probes each through the proxy every second.
//!
//! - `AssignViewer` lists both CDNs' HLS URLs after the node's WHEP one;
//! - the master playlist of a room published over SRT (ffmpeg) is fetched
//!   through a CDN (nginx's cache header shows it went through it);
//! - one nginx is stopped: within a few seconds its breaker opens and it is
//!   at the back of every answer (`weir ctl cdns list` says `open`, the
//!   metrics count its failed probes);
//! - it is started again on the same port: its breaker closes, it is offered
//!   in its turn again, and the playlist comes through it again.
//!
//! A second test has the play page in Chromium fail over between CDNs: the
//! CDN ranked first answers 404 for the room (its probe still passes), so
//! the page must move on to the next CDN and play from it, asked for HLS or
//! after its WebRTC failed.
//!
//! Needs nginx and ffmpeg, and Chromium with the e2e npm packages for the
//! page (`deploy/setup.sh --test`); a missing one fails the test with an
//! install hint.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::ffmpeg::{Publisher, require_ffmpeg};
use common::nginx::{Nginx, free_port, require_nginx};
use common::{DevServer, ctl, request, temp_dir};

/// How long a state may take to show (a few seconds expected; CI is slow).
const BOUND: Duration = Duration::from_secs(20);

fn ctl_json(control: &str, args: &[&str]) -> serde_json::Value {
    let out = ctl(control, args);
    assert!(
        out.status.success(),
        "weir ctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Breaker state of each CDN by name, from `weir ctl cdns list --json`.
fn cdn_states(control: &str) -> Vec<(String, String)> {
    let v = ctl_json(control, &["--json", "cdns", "list"]);
    v["cdns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// `(kind, node_id or cdn)` of each endpoint of an assignment through the
/// JSON gateway.
async fn assign(control: &str, viewer: &str) -> Vec<(String, String)> {
    let body = serde_json::json!({ "room": "cdn-room", "viewer_id": viewer }).to_string();
    let r = request(
        "POST",
        &format!("{control}/v1/assign-viewer"),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let kind = e["kind"].as_str().unwrap().to_owned();
            let at = e["node_id"]
                .as_str()
                .or(e["cdn"].as_str())
                .unwrap()
                .to_owned();
            (kind, at)
        })
        .collect()
}

/// The CDN each of 20 viewers would try last.
async fn last_cdns(control: &str) -> Vec<String> {
    let mut lasts = Vec::new();
    for i in 0..20 {
        let endpoints = assign(control, &format!("viewer-{i}")).await;
        lasts.push(endpoints.last().unwrap().1.clone());
    }
    lasts
}

/// Waits until `check` holds, or panics after [`BOUND`] with `what`.
async fn wait_for<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let started = Instant::now();
    loop {
        match check().await {
            Ok(()) => return started.elapsed(),
            Err(last) => assert!(
                started.elapsed() < BOUND,
                "{what} did not happen within {BOUND:?}; last: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// GETs the room's master playlist through `cdn`; Ok when it is one.
async fn master_through(cdn: &Nginx) -> Result<String, String> {
    let url = format!("{}/hls/cdn-room/master.m3u8", cdn.url());
    let r = request("GET", &url, &[], b"", Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    let text = r.text();
    if r.status != 200 || !text.starts_with("#EXTM3U") {
        return Err(format!("{url}: {} {text}", r.status));
    }
    // nginx names its cache status: the answer came through the proxy.
    let cache = r.header("X-Cache-Status").unwrap_or_default().to_owned();
    if cache.is_empty() {
        return Err(format!("{url}: no X-Cache-Status header"));
    }
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_cdn_goes_to_the_back_and_comes_back() {
    require_nginx();
    require_ffmpeg();
    let dev = DevServer::start_with(&["--ladder", "off", "--snapshot-interval", "0"]);
    let upstream = dev.node.trim_start_matches("http://").to_owned();
    let dir = temp_dir("cdn");
    let mut a = Nginx::start(free_port(), &upstream, dir.join("nginx-a"));
    let b = Nginx::start(free_port(), &upstream, dir.join("nginx-b"));

    let cdns = serde_json::json!([
        {"name": "cdn-a", "url": format!("{}/hls/{{room}}/master.m3u8", a.url()),
         "weight": 1, "probe": format!("{}/healthz", a.url())},
        {"name": "cdn-b", "url": format!("{}/hls/{{room}}/master.m3u8", b.url()),
         "weight": 1, "probe": format!("{}/healthz", b.url())},
    ]);
    let set = ctl(
        &dev.control,
        &["config", "set", &format!("cdn.endpoints={cdns}")],
    );
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    // A bad list is refused with exit 64 and the reason.
    let bad = ctl(
        &dev.control,
        &["config", "set", "cdn.endpoints=[{\"name\":\"x\"}]"],
    );
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cdn.endpoints"));

    // Both probed healthy.
    wait_for("both CDNs probed closed", || async {
        let states = cdn_states(&dev.control);
        let want = [("cdn-a", "closed"), ("cdn-b", "closed")];
        let ok = states.len() == 2
            && states
                .iter()
                .zip(want)
                .all(|((n, s), (wn, ws))| n == wn && s == ws);
        if ok {
            Ok(())
        } else {
            Err(format!("{states:?}"))
        }
    })
    .await;

    // WHEP on the node first, then both CDNs; with equal weights viewers
    // are spread over them.
    let endpoints = assign(&dev.control, "viewer-0").await;
    assert_eq!(endpoints[0], ("whep".to_owned(), "dev".to_owned()));
    let mut cdns_listed: Vec<(String, String)> = endpoints[1..].to_vec();
    cdns_listed.sort();
    assert_eq!(
        cdns_listed,
        [
            ("hls".to_owned(), "cdn-a".to_owned()),
            ("hls".to_owned(), "cdn-b".to_owned())
        ]
    );
    let lasts = last_cdns(&dev.control).await;
    assert!(
        lasts.contains(&"cdn-a".to_owned()) && lasts.contains(&"cdn-b".to_owned()),
        "{lasts:?}"
    );

    // A live room: its master playlist comes through either CDN.
    let token = dev.token("cdn-room", "publish", "streamer").await;
    let _publisher = Publisher::push(dev.srt, "cdn-room", &token);
    wait_for("the master playlist through cdn-a", || async {
        master_through(&a).await.map(drop)
    })
    .await;
    let playlist = master_through(&b).await.unwrap();
    assert!(playlist.contains("#EXT-X-STREAM-INF"), "{playlist}");

    // cdn-a goes down: its breaker opens and it is last for every viewer.
    a.stop();
    let took = wait_for("cdn-a demoted to the back", || async {
        let lasts = last_cdns(&dev.control).await;
        let states = cdn_states(&dev.control);
        let open = states.iter().any(|(n, s)| n == "cdn-a" && s == "open");
        if open && lasts.iter().all(|n| n == "cdn-a") {
            Ok(())
        } else {
            Err(format!("states {states:?}, last CDNs {lasts:?}"))
        }
    })
    .await;
    println!("cdn-a demoted {took:?} after it stopped");
    assert!(
        dev.metric_with("weir_cdn_probe_failures_total", "cdn=\"cdn-a\"")
            .await
            >= 3.0
    );
    assert_eq!(
        dev.metric_with("weir_cdn_breaker_state", "cdn=\"cdn-a\"")
            .await,
        2.0
    );
    // The healthy CDN still serves the room.
    master_through(&b).await.unwrap();
    let list = ctl(&dev.control, &["cdns", "list"]);
    let table = String::from_utf8_lossy(&list.stdout);
    assert!(table.contains("cdn-a") && table.contains("open"), "{table}");

    // cdn-a comes back on the same port: closed again, offered in its turn.
    a.restart();
    let took = wait_for("cdn-a back in front for some viewers", || async {
        let lasts = last_cdns(&dev.control).await;
        let states = cdn_states(&dev.control);
        let closed = states.iter().all(|(_, s)| s == "closed");
        if closed && lasts.contains(&"cdn-b".to_owned()) {
            Ok(())
        } else {
            Err(format!("states {states:?}, last CDNs {lasts:?}"))
        }
    })
    .await;
    println!("cdn-a back {took:?} after it restarted");
    wait_for("the master playlist through cdn-a again", || async {
        master_through(&a).await.map(drop)
    })
    .await;
    drop(b);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_play_page_moves_on_to_the_next_cdn() {
    require_nginx();
    require_ffmpeg();
    require_browser_tools();
    let dev = DevServer::start_with(&["--ladder", "off", "--snapshot-interval", "0"]);
    let upstream = dev.node.trim_start_matches("http://").to_owned();
    let dir = temp_dir("cdn-page");
    let a = Nginx::start(free_port(), &upstream, dir.join("nginx-a"));
    let b = Nginx::start(free_port(), &upstream, dir.join("nginx-b"));
    // cdn-bad is healthy by its probe but has no such path: viewers get it
    // first (its weight) and must move on.
    let cdns = serde_json::json!([
        {"name": "cdn-bad", "url": format!("{}/no-such-path/{{room}}/master.m3u8", a.url()),
         "weight": 1000, "probe": format!("{}/healthz", a.url())},
        {"name": "cdn-b", "url": format!("{}/hls/{{room}}/master.m3u8", b.url()),
         "weight": 1, "probe": format!("{}/healthz", b.url())},
    ]);
    let set = ctl(
        &dev.control,
        &["config", "set", &format!("cdn.endpoints={cdns}")],
    );
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let token = dev.token("cdn-room", "publish", "streamer").await;
    let _publisher = Publisher::push(dev.srt, "cdn-room", &token);
    wait_for("the master playlist through cdn-b", || async {
        master_through(&b).await.map(drop)
    })
    .await;

    let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    let out = Command::new("node")
        .current_dir(&e2e)
        .args(["cdn_play.mjs", "--base", &dev.node, "--room", "cdn-room"])
        .args(["--frames", "50", "--timeout-ms", "90000"])
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the play page did not fail over:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    println!("{result}");
    let viewers = result["viewers"].as_array().unwrap();
    assert_eq!(viewers.len(), 2, "{result}");
    for v in viewers {
        assert_eq!(v["protocol"], "hls", "{result}");
        assert_eq!(v["cdn"], "cdn-b", "{result}");
        assert!(v["framesDecoded"].as_u64().unwrap() >= 50, "{result}");
        // Ranked first (as good as always, by weight), cdn-bad was tried
        // and failed before cdn-b.
        let hls: Vec<&str> = v["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "hls")
            .map(|e| e["cdn"].as_str().unwrap())
            .collect();
        if hls.first() == Some(&"cdn-bad") {
            let failed_bad = v["failures"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["cdn"] == "cdn-bad" && f["kind"] == "hls");
            assert!(failed_bad, "{result}");
        }
    }
    let broken = viewers
        .iter()
        .find(|v| v["name"] == "webrtc-broken")
        .unwrap();
    assert!(
        broken["fallback"]
            .as_str()
            .unwrap()
            .contains("WebRTC failed"),
        "{result}"
    );
    drop((a, b));
}
