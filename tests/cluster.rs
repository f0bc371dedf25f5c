//! A cluster on loopback, every piece a real process: one etcd (Debian's
//! etcd-server), `weir control --etcd …` and `weir node --etcd …` processes.
//! Membership as the scheduler sees it: nodes appear, a node killed with
//! SIGKILL leaves the answers within its lease's TTL, a node stopped with
//! SIGTERM leaves at once; a node starts and serves while etcd is down and
//! joins when it comes up; a bad `--etcd` is refused before any port is bound.
//! Rollout weights set with `weir ctl rollout` steer viewers between nodes
//! of two versions (`--node-version blue|green`): all to one, the flip, a
//! split, and the survivor taking everyone when the weighted version dies.
//!
//! The whole picture: two `weir control` replicas and three nodes; viewers
//! spread, a node killed, a replica killed, cordon and drain, and a config
//! change reaching every node.
//!
//! Drain with media: viewers playing on a drained node stay while their
//! room's publisher is there, then move in paced batches (each told
//! in-band, its session URL answering 410) and play on the node the
//! scheduler gives them next, where the streamer went.
//!
//! `measure_node_death_to_removal` (ignored by default) measures how long a
//! killed node stays in the scheduler's answers; see bench/RESULTS.md.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../control-plane/tests/support/etcd.rs"]
mod etcd;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::proc::Proc;
use common::{request, temp_dir};
use etcd::Etcd;

/// The nodes' lease TTL (`weir_protocol::coordinator::NODE_TTL`).
const NODE_TTL: Duration = Duration::from_secs(5);
/// How long processes may take to start and nodes to show up (CI is slow).
const START_DEADLINE: Duration = Duration::from_secs(30);

/// A running `weir control`.
struct Control {
    proc: Proc,
    url: String,
    public_key: String,
}

fn start_control(dir: &Path, etcd: &str) -> Control {
    start_control_named(dir, etcd, "control")
}

/// [`start_control`] logging to `{name}.log` (replicas share the data dir,
/// and so the token key).
fn start_control_named(dir: &Path, etcd: &str, name: &str) -> Control {
    let data = dir.join("control-data");
    let proc = Proc::spawn(
        name,
        dir,
        &[
            "control",
            "--grpc",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--allow-token-minting",
            "--etcd",
            etcd,
        ],
    );
    let url = proc.wait_line("its URL", |l| {
        l.starts_with("http://").then(|| l.trim().to_owned())
    });
    let public_key = proc.wait_line("the token public key", |l| {
        l.starts_with("token public key")
            .then(|| l.split_whitespace().last().unwrap_or_default().to_owned())
    });
    Control {
        proc,
        url,
        public_key,
    }
}

/// A running `weir node`, with its HTTP base URL.
struct NodeProc {
    proc: Proc,
    id: String,
    url: String,
}

/// A free loopback UDP address: the SRT listener wants an explicit port.
fn free_udp_addr() -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().to_string()
}

fn start_node(dir: &Path, id: &str, etcd: &str, control: &Control) -> NodeProc {
    start_node_with(dir, id, etcd, control, &[])
}

/// [`start_node`] with more arguments.
fn start_node_with(
    dir: &Path,
    id: &str,
    etcd: &str,
    control: &Control,
    extra: &[&str],
) -> NodeProc {
    let srt = free_udp_addr();
    let mut args = vec![
        "node",
        "--etcd",
        etcd,
        "--node-id",
        id,
        "--udp",
        "127.0.0.1:0",
        "--relay",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--srt",
        &srt,
        "--token-public-key",
        &control.public_key,
        "--control-url",
        &control.url,
    ];
    args.extend_from_slice(extra);
    let proc = Proc::spawn(id, dir, &args);
    let url = proc.wait_line("its metrics URL", |l| {
        l.strip_suffix("/metrics").map(str::to_owned)
    });
    NodeProc {
        proc,
        id: id.to_owned(),
        url,
    }
}

/// Polls the node's `/readyz` until it answers 200 (its media shard runs).
async fn wait_ready(node: &NodeProc) {
    let started = Instant::now();
    loop {
        let r = request(
            "GET",
            &format!("{}/readyz", node.url),
            &[],
            b"",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        if r.status == 200 {
            return;
        }
        assert!(
            started.elapsed() < START_DEADLINE,
            "{} not ready within {START_DEADLINE:?}: {} {}; log:\n{}",
            node.id,
            r.status,
            r.text(),
            node.proc.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `POST /v1/assign-viewer` for `room`: the status and the node ids of the
/// WHEP endpoints, best first (none on an error answer).
async fn assign_viewer(control: &str, room: &str) -> (u16, Vec<String>) {
    let body = serde_json::json!({ "room": room }).to_string();
    let r = request(
        "POST",
        &format!("{control}/v1/assign-viewer"),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    if r.status != 200 {
        return (r.status, Vec::new());
    }
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let endpoints = v["endpoints"].as_array().cloned().unwrap_or_default();
    for e in &endpoints {
        assert_eq!(e["kind"], "whep", "{v}");
        assert!(
            e["url"]
                .as_str()
                .unwrap()
                .ends_with(&format!("/whep/{room}")),
            "{v}"
        );
    }
    assert!(!v["token"].as_str().unwrap_or_default().is_empty(), "{v}");
    let ids = endpoints
        .iter()
        .map(|e| e["node_id"].as_str().unwrap().to_owned())
        .collect();
    (r.status, ids)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Polls assign-viewer until its node set is `want` (sorted); returns when.
async fn wait_for_nodes(control: &Control, want: &[&str], deadline: Duration) -> Duration {
    let started = Instant::now();
    let want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
    loop {
        let (status, ids) = assign_viewer(&control.url, "lobby").await;
        if status == 200 && sorted(ids.clone()) == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < deadline,
            "assign-viewer still answers {status} {ids:?}, not {want:?}, after {deadline:?}; control log:\n{}",
            control.proc.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many node keys etcd holds, through its JSON gateway (a client
/// Weir did not write).
async fn etcd_node_count(endpoint: &str) -> u64 {
    // base64 of "/weir/v1/nodes/" and of the end of that prefix's range, "/weir/v1/nodes0".
    let body =
        r#"{"key":"L3dlaXIvdjEvbm9kZXMv","range_end":"L3dlaXIvdjEvbm9kZXMw","count_only":true}"#;
    let r = request(
        "POST",
        &format!("{endpoint}/v3/kv/range"),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    // int64 fields are strings in the gateway's JSON, and absent when 0.
    v["count"].as_str().map_or(0, |s| s.parse().unwrap())
}

#[tokio::test]
async fn nodes_join_and_leave_the_scheduler_answers() {
    let etcd = Etcd::start();
    let dir = temp_dir("cluster");
    let control = start_control(&dir, &etcd.endpoint());
    let mut nodes: Vec<NodeProc> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| start_node(&dir, id, &etcd.endpoint(), &control))
        .collect();

    // All three are known: a viewer of a room nobody publishes gets WHEP
    // endpoints on every node (equally loaded), each on its own URL.
    let took = wait_for_nodes(&control, &["n1", "n2", "n3"], START_DEADLINE).await;
    eprintln!("three nodes in the answers {took:?} after they printed their URLs");
    assert_eq!(etcd_node_count(&etcd.endpoint()).await, 3);
    let r = request(
        "GET",
        &format!("{}/v1/rooms", control.url),
        &[],
        b"",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let rooms: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert!(rooms["rooms"].is_array(), "{rooms}");
    for n in &nodes {
        wait_ready(n).await;
    }

    // kill -9 of n2: gone from every answer within the lease TTL plus a second.
    nodes[1].proc.kill9();
    let killed = Instant::now();
    let gone = wait_for_nodes(&control, &["n1", "n3"], NODE_TTL + Duration::from_secs(1)).await;
    eprintln!("n2 (SIGKILL) left the answers after {gone:?}");
    // ...and its lease expires in etcd, which deletes its key.
    while etcd_node_count(&etcd.endpoint()).await != 2 {
        assert!(
            killed.elapsed() < NODE_TTL + Duration::from_secs(3),
            "n2's key still in etcd {:?} after the kill",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("n2's key left etcd after {:?}", killed.elapsed());
    // A viewer who asks again is sent to live nodes only, the same ones every time.
    for _ in 0..5 {
        let (status, ids) = assign_viewer(&control.url, "lobby").await;
        assert_eq!((status, sorted(ids)), (200, vec!["n1".into(), "n3".into()]));
    }

    // SIGTERM of n3: the node revokes its lease before it exits, so it is
    // out of etcd the moment it is gone, and out of the answers as soon as
    // the control plane's watch brings the deletion (milliseconds; long
    // before its lease could have expired).
    let stop = nodes[2].proc.terminate();
    assert!(stop < Duration::from_secs(3), "n3 took {stop:?} to stop");
    assert_eq!(etcd_node_count(&etcd.endpoint()).await, 1);
    let gone = wait_for_nodes(&control, &["n1"], Duration::from_secs(1)).await;
    eprintln!(
        "n3 (SIGTERM) stopped in {stop:?}, out of etcd at once and of the answers {gone:?} later"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The first WHEP node of `viewer`'s answer for a room nobody publishes.
async fn first_node_for(control: &str, viewer: &str) -> String {
    let body = serde_json::json!({ "room": "lobby", "viewer_id": viewer }).to_string();
    let r = request(
        "POST",
        &format!("{control}/v1/assign-viewer"),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v["endpoints"][0]["node_id"].as_str().unwrap().to_owned()
}

/// First nodes of viewers `viewer-0..n`, counted by node.
async fn first_nodes(control: &str, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for i in 0..n {
        *counts
            .entry(first_node_for(control, &format!("viewer-{i}")).await)
            .or_default() += 1;
    }
    counts
}

fn ctl_ok(control: &str, args: &[&str]) -> String {
    let out = common::ctl(control, args);
    assert!(
        out.status.success(),
        "weir ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn rollout_weights_steer_viewers_between_node_versions() {
    let etcd = Etcd::start();
    let dir = temp_dir("rollout");
    let control = start_control(&dir, &etcd.endpoint());
    let mut blue = start_node_with(
        &dir,
        "blue-1",
        &etcd.endpoint(),
        &control,
        &["--node-version", "blue"],
    );
    let _green = start_node_with(
        &dir,
        "green-1",
        &etcd.endpoint(),
        &control,
        &["--node-version", "green"],
    );
    wait_for_nodes(&control, &["blue-1", "green-1"], START_DEADLINE).await;
    let c = control.url.as_str();

    // Blue-green: everyone to blue; only blue is offered.
    ctl_ok(c, &["rollout", "set", "blue=100,green=0"]);
    let counts = first_nodes(c, 20).await;
    assert_eq!(counts.get("blue-1"), Some(&20), "{counts:?}");
    let (_, ids) = assign_viewer(c, "lobby").await;
    assert_eq!(ids, ["blue-1"]);

    // The flip.
    ctl_ok(c, &["rollout", "set", "blue=0,green=100"]);
    assert_eq!(first_nodes(c, 20).await.get("green-1"), Some(&20));

    // A 50/50 split: both versions get viewers, each viewer always the same.
    let out = ctl_ok(c, &["--json", "rollout", "set", "blue=50", "green=50"]);
    let state: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(state["versions"][0]["schedulable_nodes"], 1, "{state}");
    assert_eq!(state["versions"][0]["share"], 0.5, "{state}");
    let counts = first_nodes(c, 40).await;
    assert!(
        counts.len() == 2 && counts.values().all(|n| *n >= 8),
        "{counts:?}"
    );
    let one = first_node_for(c, "viewer-7").await;
    for _ in 0..5 {
        assert_eq!(first_node_for(c, "viewer-7").await, one);
    }

    // Everything on blue, and blue dies: green takes the viewers rather
    // than anyone being turned away.
    ctl_ok(c, &["rollout", "set", "blue=100,green=0"]);
    blue.proc.kill9();
    wait_for_nodes(&control, &["green-1"], NODE_TTL + Duration::from_secs(5)).await;
    assert_eq!(first_nodes(c, 5).await.get("green-1"), Some(&5));

    // A bad --node-version is refused before anything is bound.
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args([
            "node",
            "--node-version",
            "no spaces",
            "--token-public-key",
            &control.public_key,
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--node-version"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_node_serves_while_etcd_is_down_and_joins_when_it_is_up() {
    let dir = temp_dir("cluster-late-etcd");
    // etcd's ports are chosen, but it is not started yet.
    let mut etcd = Etcd::reserve();
    let control = start_control(&dir, &etcd.endpoint());
    let node = start_node(&dir, "early", &etcd.endpoint(), &control);
    // The node serves without etcd.
    wait_ready(&node).await;
    // The control plane has never seen the cluster: no node to offer, said plainly.
    let (status, _) = assign_viewer(&control.url, "lobby").await;
    assert!(
        status >= 500,
        "assign-viewer without etcd answered {status}"
    );

    etcd.restart();
    etcd.wait_healthy(etcd::START_TIMEOUT).unwrap();
    let took = wait_for_nodes(&control, &["early"], START_DEADLINE).await;
    eprintln!("the node joined {took:?} after etcd became healthy");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_bad_etcd_flag_exits_64_before_binding_ports() {
    let key = weir_protocol::TokenSigner::generate()
        .verifier()
        .to_base64();
    // A port this test holds: binding it would fail with another exit code.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let dir = temp_dir("bad-etcd");
    for bad in ["", "ftp://x:1", "http://x:1/path", "https://x:2379", "a,,b"] {
        let node = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["node", "--etcd", bad, "--token-public-key", &key])
            .args([
                "--http",
                &addr,
                "--udp",
                "127.0.0.1:0",
                "--relay",
                "127.0.0.1:0",
                "--srt",
                &free_udp_addr(),
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&node.stderr);
        assert_eq!(
            node.status.code(),
            Some(64),
            "node --etcd {bad:?}: {stderr}"
        );
        assert!(stderr.contains("--etcd"), "node --etcd {bad:?}: {stderr}");

        let control = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["control", "--etcd", bad, "--grpc", &addr, "--data-dir"])
            .arg(dir.join("data"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&control.stderr);
        assert_eq!(
            control.status.code(),
            Some(64),
            "control --etcd {bad:?}: {stderr}"
        );
        assert!(
            stderr.contains("--etcd"),
            "control --etcd {bad:?}: {stderr}"
        );
    }
    // The environment variable is read too.
    let node = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["node", "--token-public-key", &key, "--http", &addr])
        .env("WEIR_ETCD", "ftp://x:1")
        .output()
        .unwrap();
    assert_eq!(
        node.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&node.stderr)
    );
    drop(held);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Measures how long a node killed with SIGKILL stays in assign-viewer
/// answers, and how long its key stays in etcd (its lease expiring), over
/// several runs. Prints a table; the numbers go to bench/RESULTS.md.
/// `cargo test --test cluster -- --ignored --nocapture measure_node_death_to_removal`
/// (`WEIR_MEASURE_RUNS` runs, 9 by default).
#[tokio::test]
#[ignore = "a measurement, not a check: run it by name"]
async fn measure_node_death_to_removal() {
    let runs: usize = std::env::var("WEIR_MEASURE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9);
    let etcd = Etcd::start();
    let dir = temp_dir("cluster-measure");
    let control = start_control(&dir, &etcd.endpoint());
    let _stays = start_node(&dir, "stays", &etcd.endpoint(), &control);
    let mut answers = Vec::new();
    let mut keys = Vec::new();
    for run in 0..runs {
        let id = format!("victim-{run}");
        let mut victim = start_node(&dir, &id, &etcd.endpoint(), &control);
        wait_for_nodes(&control, &["stays", &id], START_DEADLINE).await;
        // Kill at a different phase of the victim's 1 s report cycle each run.
        let phase = Duration::from_millis(1000 * run as u64 / runs as u64);
        tokio::time::sleep(Duration::from_millis(1500) + phase).await;
        victim.proc.kill9();
        let killed = Instant::now();
        let mut answer_gone = None;
        let mut key_gone = None;
        while answer_gone.is_none() || key_gone.is_none() {
            if answer_gone.is_none() {
                let (status, ids) = assign_viewer(&control.url, "lobby").await;
                if status == 200 && ids == ["stays"] {
                    answer_gone = Some(killed.elapsed());
                }
            }
            if key_gone.is_none() && etcd_node_count(&etcd.endpoint()).await == 1 {
                key_gone = Some(killed.elapsed());
            }
            assert!(
                killed.elapsed() < Duration::from_secs(30),
                "victim never left"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (a, k) = (answer_gone.unwrap(), key_gone.unwrap());
        eprintln!(
            "run {run}: out of the answers after {:.2} s, key gone from etcd after {:.2} s",
            a.as_secs_f64(),
            k.as_secs_f64()
        );
        answers.push(a);
        keys.push(k);
    }
    let summary = |mut v: Vec<Duration>| {
        v.sort();
        format!(
            "min {:.2} s, median {:.2} s, max {:.2} s",
            v[0].as_secs_f64(),
            v[v.len() / 2].as_secs_f64(),
            v[v.len() - 1].as_secs_f64()
        )
    };
    eprintln!(
        "kill -9 -> out of assign-viewer answers ({runs} runs): {}",
        summary(answers)
    );
    eprintln!(
        "kill -9 -> node key deleted by lease expiry ({runs} runs): {}",
        summary(keys)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The node's applied config revision (`weir_config_revision`).
async fn node_config_revision(node: &NodeProc) -> f64 {
    let r = request(
        "GET",
        &format!("{}/metrics", node.url),
        &[],
        b"",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    r.text()
        .lines()
        .find_map(|l| {
            l.strip_prefix("weir_config_revision ")
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

#[tokio::test]
async fn two_replicas_and_three_nodes_through_kills_cordon_drain_and_config() {
    let etcd = Etcd::start();
    let dir = temp_dir("cluster-all");
    let a = start_control_named(&dir, &etcd.endpoint(), "control-a");
    let mut b = start_control_named(&dir, &etcd.endpoint(), "control-b");
    let mut nodes: Vec<NodeProc> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| start_node(&dir, id, &etcd.endpoint(), &a))
        .collect();
    for control in [&a, &b] {
        wait_for_nodes(control, &["n1", "n2", "n3"], START_DEADLINE).await;
    }
    for n in &nodes {
        wait_ready(n).await;
    }

    // Every answer offers every live node, ranked by load; equally loaded
    // ones (no sessions yet) in an order drawn per viewer, so viewers spread.
    let (status, ids) = assign_viewer(&b.url, "lobby").await;
    assert_eq!(
        (status, sorted(ids)),
        (200, vec!["n1".into(), "n2".into(), "n3".into()])
    );
    let spread = first_nodes(&b.url, 30).await;
    assert_eq!(
        spread.len(),
        3,
        "every node is first for some viewers: {spread:?}"
    );

    // kill -9 of n2: out of both replicas' answers within the lease TTL,
    // and a viewer who asks again gets live nodes.
    nodes[1].proc.kill9();
    for control in [&a, &b] {
        let gone = wait_for_nodes(control, &["n1", "n3"], NODE_TTL + Duration::from_secs(2)).await;
        eprintln!("n2 left the answers of a replica after {gone:?}");
    }

    // kill -9 of replica A: a client that retries on B is served as before.
    let mut a = a;
    a.proc.kill9();
    let (status, ids) = assign_viewer(&b.url, "lobby").await;
    assert_eq!((status, sorted(ids)), (200, vec!["n1".into(), "n3".into()]));

    // Cordon and drain through weir ctl on B.
    ctl_ok(&b.url, &["nodes", "cordon", "n1"]);
    wait_for_nodes(&b, &["n3"], Duration::from_secs(5)).await;
    ctl_ok(&b.url, &["nodes", "drain", "n3"]);
    let (status, _) = assign_viewer(&b.url, "lobby").await;
    assert_eq!(status, 503, "no node left to take viewers");
    let drained = &nodes[2];
    let started = Instant::now();
    loop {
        let r = request(
            "GET",
            &format!("{}/readyz", drained.url),
            &[],
            b"",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        if r.status == 503 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "n3 never noticed its drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in ["n1", "n3"] {
        ctl_ok(&b.url, &["nodes", "uncordon", n]);
    }
    wait_for_nodes(&b, &["n1", "n3"], Duration::from_secs(10)).await;

    // A config change reaches every live node (they apply chat.* keys); a
    // bad value is refused and reaches nobody.
    let bad = common::ctl(&b.url, &["config", "set", "chat.conn_rate=-1"]);
    assert_eq!(bad.status.code(), Some(64), "{bad:?}");
    let revisions = [
        node_config_revision(&nodes[0]).await,
        node_config_revision(&nodes[2]).await,
    ];
    ctl_ok(&b.url, &["config", "set", "chat.conn_burst=7"]);
    let set_at = Instant::now();
    for (node, before) in [&nodes[0], &nodes[2]].into_iter().zip(revisions) {
        loop {
            if node_config_revision(node).await > before {
                eprintln!(
                    "{} applied the config change after {:?}",
                    node.id,
                    set_at.elapsed()
                );
                break;
            }
            assert!(
                set_at.elapsed() < Duration::from_secs(10),
                "{} never applied the change",
                node.id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    b.proc.kill9();
    let _ = std::fs::remove_dir_all(&dir);
}

/// One WHEP session of a [`follow_viewer`]: where, what it got, and whether
/// the node ended it in-band (DTLS close_notify).
#[derive(Debug, Clone)]
struct Visit {
    /// The node's base URL.
    node: String,
    session_url: String,
    /// The play token it was opened with.
    token: String,
    video_frames: u64,
    /// Video keyframes among them.
    keyframes: u64,
    closed_by_node: bool,
}

/// A str0m WHEP viewer that behaves like the play page: asks the control
/// plane for a node, plays there, and when the node ends the session asks
/// again. Every session is appended to `visits`; stops at `stop`.
async fn follow_viewer(
    control: String,
    room: String,
    visits: std::sync::Arc<std::sync::Mutex<Vec<Visit>>>,
    stop: Instant,
) {
    while Instant::now() < stop {
        let played = match weir_loadtest::assign_viewer(&control, &room).await {
            Ok(target) => play_once(&target, &visits, stop).await,
            Err(e) => Err(e),
        };
        if let Err(e) = played {
            eprintln!("viewer of {room}: {e:#}; asking again");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A viewer that plays at one node (not the scheduler's pick), again
/// after any error, until `stop`.
async fn fixed_viewer(
    target: weir_loadtest::viewer::Target,
    visits: std::sync::Arc<std::sync::Mutex<Vec<Visit>>>,
    stop: Instant,
) {
    while Instant::now() < stop {
        if let Err(e) = play_once(&target, &visits, stop).await {
            eprintln!("viewer at {}: {e:#}; again", target.whep_url);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Plays one WHEP session until the node ends it or `stop`.
async fn play_once(
    target: &weir_loadtest::viewer::Target,
    visits: &std::sync::Mutex<Vec<Visit>>,
    stop: Instant,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use str0m::media::{Direction, MediaKind};
    use str0m::net::{Protocol, Receive};
    use str0m::{Candidate, Event, Input, Output, Rtc};

    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let local = socket.local_addr()?;
    let mut rtc = Rtc::builder().build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local, "udp")?);
    let mut change = rtc.sdp_api();
    change.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
    let video = change.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    let (offer, pending) = change.apply().context("no offer")?;
    let auth = format!("Bearer {}", target.token);
    let r = request(
        "POST",
        &target.whep_url,
        &[
            ("Content-Type", "application/sdp"),
            ("Authorization", &auth),
        ],
        offer.to_sdp_string().as_bytes(),
        Duration::from_secs(10),
    )
    .await?;
    anyhow::ensure!(r.status == 201, "WHEP answered {}: {}", r.status, r.text());
    let node = target
        .whep_url
        .split("/whep/")
        .next()
        .unwrap_or_default()
        .to_owned();
    let session_url = format!("{node}{}", r.header("location").context("no Location")?);
    let answer = str0m::change::SdpAnswer::from_sdp_string(&r.text())?;
    rtc.sdp_api().accept_answer(pending, answer)?;
    let index = {
        let mut v = visits.lock().unwrap();
        v.push(Visit {
            node,
            session_url: session_url.clone(),
            token: target.token.clone(),
            video_frames: 0,
            keyframes: 0,
            closed_by_node: false,
        });
        v.len() - 1
    };
    let mut buf = vec![0u8; 2048];
    loop {
        let timeout = loop {
            match rtc.poll_output()? {
                Output::Transmit(t) => {
                    let _ = socket.send_to(&t.contents, t.destination).await;
                }
                Output::Timeout(t) => break t,
                Output::Event(Event::MediaData(d)) if d.mid == video => {
                    let mut v = visits.lock().unwrap();
                    v[index].video_frames += 1;
                    v[index].keyframes += u64::from(d.is_keyframe());
                }
                Output::Event(Event::Closed) => {
                    visits.lock().unwrap()[index].closed_by_node = true;
                    return Ok(());
                }
                Output::Event(Event::IceConnectionStateChange(
                    str0m::IceConnectionState::Disconnected,
                )) => anyhow::bail!("ICE disconnected from {session_url}"),
                Output::Event(_) => {}
            }
        };
        let now = Instant::now();
        if now >= stop {
            let _ = request(
                "DELETE",
                &session_url,
                &[("Authorization", &auth)],
                b"",
                Duration::from_secs(5),
            )
            .await;
            return Ok(());
        }
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let (n, source) = r?;
                let Ok(contents) = buf[..n].try_into() else { continue };
                let input = Input::Receive(Instant::now(), Receive { proto: Protocol::Udp, source, destination: local, contents });
                if rtc.accepts(&input) {
                    rtc.handle_input(input)?;
                }
            }
            _ = tokio::time::sleep_until(timeout.min(stop).max(now).into()) => {
                rtc.handle_input(Input::Timeout(Instant::now()))?;
            }
        }
    }
}

/// The value of an unlabelled counter or gauge on a node (0 when absent).
async fn node_metric(node: &NodeProc, name: &str) -> f64 {
    let r = request(
        "GET",
        &format!("{}/metrics", node.url),
        &[],
        b"",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    r.text()
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Polls `/readyz` of `node` until it answers `status`.
async fn wait_readyz(node: &NodeProc, status: u16) {
    let started = Instant::now();
    loop {
        let r = request(
            "GET",
            &format!("{}/readyz", node.url),
            &[],
            b"",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        if r.status == status {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} /readyz answers {} rather than {status}",
            node.id,
            r.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `check` over every viewer's visits until it holds for all.
async fn wait_viewers(
    viewers: &[std::sync::Arc<std::sync::Mutex<Vec<Visit>>>],
    what: &str,
    deadline: Duration,
    check: impl Fn(&[Visit]) -> bool,
) {
    let started = Instant::now();
    loop {
        if viewers.iter().all(|v| check(&v.lock().unwrap())) {
            return;
        }
        let seen: Vec<Vec<Visit>> = viewers.iter().map(|v| v.lock().unwrap().clone()).collect();
        assert!(
            started.elapsed() < deadline,
            "viewers not {what} after {deadline:?}: {seen:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The video frames and keyframes of a viewer's last visit.
fn last_frames(v: &std::sync::Mutex<Vec<Visit>>) -> (u64, u64) {
    v.lock()
        .unwrap()
        .last()
        .map_or((0, 0), |l| (l.video_frames, l.keyframes))
}

#[tokio::test]
async fn a_room_plays_on_other_nodes_through_the_relay_and_a_drained_origin_moves_its_viewers() {
    const RELAY_SECRET: &str = "cluster-relay-test-secret-0123456789";
    use std::sync::{Arc, Mutex};
    weir_data_plane::install_crypto_provider();
    let etcd = Etcd::start();
    let dir = temp_dir("cluster-relay");
    let control = start_control(&dir, &etcd.endpoint());
    let a = start_node_with(
        &dir,
        "a",
        &etcd.endpoint(),
        &control,
        &[
            "--drain-batch",
            "2",
            "--drain-interval-ms",
            "700",
            "--drain-grace-ms",
            "300",
            "--node-secret",
            RELAY_SECRET,
        ],
    );
    // B proves the same node secret when it subscribes to A's room.
    let b = start_node_with(
        &dir,
        "b",
        &etcd.endpoint(),
        &control,
        &["--node-secret", RELAY_SECRET],
    );
    let a_relay = a.proc.wait_line("its relay address", |l| {
        l.strip_prefix("quic://").map(str::to_owned)
    });
    wait_for_nodes(&control, &["a", "b"], START_DEADLINE).await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    let c = control.url.as_str();
    let room = "relayed-show";
    let clip = Arc::new(
        weir_loadtest::clip::Clip::read_ivf(
            &weir_loadtest::clip::Clip::generate(&dir, 320, 240, 300)
                .expect("ffmpeg generates the test clip"),
        )
        .unwrap(),
    );

    // Garbage on the relay port changes nothing (quinn drops what is not
    // QUIC; the node keeps serving).
    let junk = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let len = (i as usize * 37) % 1400 + 1;
        let bytes: Vec<u8> = (0..len).map(|j| (j as u32 ^ i) as u8).collect();
        let _ = junk.send_to(&bytes, &a_relay);
    }

    // The room goes live on A (B cordoned while the publisher is placed).
    ctl_ok(c, &["nodes", "cordon", "b"]);
    wait_for_nodes(&control, &["a"], Duration::from_secs(5)).await;
    let target = weir_loadtest::assign_publisher(c, room).await.unwrap();
    assert!(target.whip_url.starts_with(&a.url), "{target:?}");
    // The publisher leaves at this deadline and reconnects at once (an
    // encoder restarting): a new publisher generation at the origin.
    let first_leaves = Instant::now() + Duration::from_secs(12);
    let stop = Instant::now() + Duration::from_secs(90);
    let publisher = {
        let (clip, target) = (clip.clone(), target.clone());
        tokio::spawn(async move {
            let first = weir_loadtest::publisher::run(
                &target,
                &clip,
                "127.0.0.1".parse().unwrap(),
                first_leaves,
            )
            .await;
            assert!(first.error.is_none(), "{first:?}");
            loop {
                let r = weir_loadtest::publisher::run(
                    &target,
                    &clip,
                    "127.0.0.1".parse().unwrap(),
                    stop,
                )
                .await;
                if r.error.is_none() || Instant::now() >= stop {
                    return r;
                }
                eprintln!("publisher on a: {:?}; again", r.error);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let started = Instant::now();
    loop {
        let (status, ids) = assign_viewer(c, room).await;
        if status == 200 && ids == ["a"] {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{room} never went live on a: {status} {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ctl_ok(c, &["nodes", "uncordon", "b"]);
    wait_for_nodes(&control, &["a", "b"], Duration::from_secs(5)).await;
    // The origin leads the answer; B may follow now (it can pull the room).
    let (_, ids) = assign_viewer(c, room).await;
    assert_eq!(ids, ["a", "b"]);

    // Three viewers follow the scheduler (to A, the origin); three play at
    // B, which pulls the room from A over the relay.
    let followers: Vec<Arc<Mutex<Vec<Visit>>>> = (0..3).map(|_| Arc::default()).collect();
    let at_b: Vec<Arc<Mutex<Vec<Visit>>>> = (0..3).map(|_| Arc::default()).collect();
    let mut tasks = Vec::new();
    for v in &followers {
        tasks.push(tokio::spawn(follow_viewer(
            c.to_owned(),
            room.to_owned(),
            v.clone(),
            stop,
        )));
    }
    let token = weir_loadtest::assign_viewer(c, room).await.unwrap().token;
    for v in &at_b {
        let target = weir_loadtest::viewer::Target {
            whep_url: format!("{}/whep/{room}", b.url),
            token: token.clone(),
        };
        tasks.push(tokio::spawn(fixed_viewer(target, v.clone(), stop)));
    }
    wait_viewers(&followers, "playing on a", Duration::from_secs(15), |v| {
        v.len() == 1 && v[0].node == a.url && v[0].video_frames > 10
    })
    .await;
    wait_viewers(
        &at_b,
        "playing on b through the relay",
        Duration::from_secs(15),
        |v| {
            v.last()
                .is_some_and(|l| l.node == b.url && l.video_frames > 10 && l.keyframes >= 1)
        },
    )
    .await;
    assert_eq!(node_metric(&a, "weir_relay_edges").await, 1.0);
    assert_eq!(node_metric(&b, "weir_relay_pulls").await, 1.0);
    // And etcd says so: `rooms/{room}/edges/b`, bound to B's lease.
    {
        use weir_protocol::coordinator::Coordinator;
        let etcd_view =
            weir_control_plane::EtcdCoordinator::new(weir_control_plane::EtcdConfig::new(vec![
                etcd.endpoint(),
            ]))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let edges = etcd_view.room_edges().await.unwrap();
            if edges
                .iter()
                .any(|(r, n)| r.as_str() == room && n.as_str() == "b")
            {
                break;
            }
            assert!(Instant::now() < deadline, "no edge record: {edges:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(node_metric(&a, "weir_relay_frames_out_total").await > 10.0);
    assert!(node_metric(&b, "weir_relay_frames_in_total").await > 10.0);
    // B now carries the room: the scheduler counts it among the room's nodes.

    // The publisher reconnects at A: B's viewers resync and keep playing.
    let wait_until = first_leaves + Duration::from_secs(1);
    tokio::time::sleep_until(wait_until.into()).await;
    let before: Vec<(u64, u64)> = at_b.iter().map(|v| last_frames(v)).collect();
    wait_viewers(
        &at_b,
        "playing on b after the publisher reconnected",
        Duration::from_secs(20),
        |v| {
            v.last()
                .is_some_and(|l| l.node == b.url && l.video_frames > 0)
        },
    )
    .await;
    let started = Instant::now();
    loop {
        let now: Vec<(u64, u64)> = at_b.iter().map(|v| last_frames(v)).collect();
        if now
            .iter()
            .zip(&before)
            .all(|(n, b)| n.0 > b.0 + 30 && n.1 > b.1)
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "b's viewers stalled after the publisher reconnected: {before:?} -> {now:?}\nb: {}",
            b.proc.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Drain A: its viewers move to B in batches (each told in-band), while
    // the publisher stays on A and B pulls the room from it.
    ctl_ok(c, &["nodes", "drain", "a"]);
    wait_readyz(&a, 503).await;
    wait_viewers(&followers, "moved to b", Duration::from_secs(30), |v| {
        v.len() >= 2
            && v[0].node == a.url
            && v[0].closed_by_node
            && v.last()
                .is_some_and(|l| l.node == b.url && l.video_frames > 10)
    })
    .await;
    assert_eq!(node_metric(&a, "weir_drain_viewers_moved_total").await, 3.0);
    let log = std::fs::read_to_string(&a.proc.log).unwrap();
    let batches: Vec<u64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "drain: viewers sent to other nodes")
        .map(|v| v["moved"].as_u64().unwrap())
        .collect();
    assert!(
        batches.len() >= 2
            && batches.iter().all(|n| (1..=2).contains(n))
            && batches.iter().sum::<u64>() == 3,
        "batches {batches:?}"
    );
    // A moved viewer's session URL says so.
    let (url, token) = {
        let v = followers[0].lock().unwrap();
        (v[0].session_url.clone(), v[0].token.clone())
    };
    let r = request(
        "PATCH",
        &url,
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Content-Type", "application/trickle-ice-sdpfrag"),
        ],
        b"",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 410, "{}", r.text());
    assert!(r.text().contains("draining"), "{}", r.text());
    // The publisher never left A.
    assert!(!publisher.is_finished());
    let (_, ids) = assign_viewer(c, room).await;
    assert_eq!(ids, ["b"], "a drained origin takes no new viewers");

    // Undrained, A is ready again.
    ctl_ok(c, &["nodes", "uncordon", "a"]);
    wait_readyz(&a, 200).await;
    for t in tasks {
        t.abort();
    }
    publisher.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
