//! Two `weir control` replicas on one etcd and one PostgreSQL, with two
//! `weir node` processes, every piece a real process on loopback:
//!
//! - business data written through one replica is read through the other,
//!   and a stored room's publish token carries its owner;
//! - `weir ctl config set` on one replica is applied by both without a
//!   restart; a bad value is refused (exit 64) and changes nothing;
//! - `weir ctl nodes cordon|drain|uncordon` on one replica steers the
//!   other's answers at once;
//! - CDN health found by the leader's prober is read by both replicas:
//!   both rank a dead CDN last;
//! - exactly one replica leads the singleton election; `kill -9` of the
//!   leader hands leadership to the survivor within the lease TTL, and the
//!   survivor keeps answering and takes over the CDN prober.
//!
//! `measure_config_propagation` (ignored by default) measures how long a
//! config change takes to reach N control processes; see bench/RESULTS.md.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../control-plane/tests/support/etcd.rs"]
mod etcd;
#[path = "../control-plane/tests/support/postgres.rs"]
mod pg;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::proc::Proc;
use common::{ctl, request, temp_dir};
use weir_protocol::pb;

/// How long processes may take to start and to agree (CI is slow).
const DEADLINE: Duration = Duration::from_secs(30);

/// A running `weir control`.
struct Control {
    proc: Proc,
    url: String,
    public_key: String,
}

fn start_control(name: &str, dir: &Path, etcd: &str, database: &str) -> Control {
    // Replicas share the data dir: one token key for the cluster.
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
            "--etcd",
            etcd,
            "--database",
            database,
            "--default-owner",
            "fallback",
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

fn free_udp_addr() -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().to_string()
}

/// A `weir node` and its HTTP base URL.
fn start_node(dir: &Path, id: &str, etcd: &str, control: &Control) -> (Proc, String) {
    let proc = Proc::spawn(
        id,
        dir,
        &[
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
            &free_udp_addr(),
            "--shards",
            "1",
            "--token-public-key",
            &control.public_key,
            "--control-url",
            &control.url,
        ],
    );
    let url = proc.wait_line("its metrics URL", |l| {
        l.strip_suffix("/metrics").map(str::to_owned)
    });
    (proc, url)
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Node ids of assign-viewer's WHEP endpoints (none on an error answer).
async fn viewer_nodes(control: &str) -> (u16, Vec<String>) {
    let r = request(
        "POST",
        &format!("{control}/v1/assign-viewer"),
        &[("Content-Type", "application/json")],
        br#"{"room":"lobby"}"#,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    if r.status != 200 {
        return (r.status, Vec::new());
    }
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let mut ids: Vec<String> = v["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|e| e["kind"] == "whep")
        .map(|e| e["node_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    (r.status, ids)
}

/// The CDN of assign-viewer's last endpoint (empty when it is no CDN).
async fn last_hls(control: &str) -> String {
    let r = request(
        "POST",
        &format!("{control}/v1/assign-viewer"),
        &[("Content-Type", "application/json")],
        br#"{"room":"lobby"}"#,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v["endpoints"]
        .as_array()
        .and_then(|e| e.last())
        .and_then(|e| e["cdn"].as_str())
        .unwrap_or_default()
        .to_owned()
}

async fn wait_viewer_nodes(control: &Control, want: &[&str]) {
    let started = Instant::now();
    loop {
        let (status, ids) = viewer_nodes(&control.url).await;
        if status == 200 && ids == want {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "assign-viewer on {} answers {status} {ids:?}, not {want:?}; log:\n{}",
            control.proc.name,
            control.proc.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A gauge's value in the control plane's `/metrics`, if present.
async fn gauge(control: &str, series: &str) -> Option<f64> {
    let r = request(
        "GET",
        &format!("{control}/metrics"),
        &[],
        b"",
        Duration::from_secs(5),
    )
    .await
    .ok()?;
    r.text().lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().parse::<f64>().ok())
    })
}

const LEADER: &str = r#"weir_election_leader{election="control"}"#;

async fn config_revision(control: &str) -> f64 {
    gauge(control, "weir_config_revision").await.unwrap_or(0.0)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_business_data_config_flags_and_leadership() {
    let etcd = etcd::Etcd::start();
    let postgres = pg::Postgres::start();
    let dir = temp_dir("control");
    let mut a = start_control("control-a", &dir, &etcd.endpoint(), &postgres.url());
    let mut b = start_control("control-b", &dir, &etcd.endpoint(), &postgres.url());
    assert_eq!(a.public_key, b.public_key, "replicas share the token key");
    let (_n1, _) = start_node(&dir, "n1", &etcd.endpoint(), &a);
    let (_n2, n2_url) = start_node(&dir, "n2", &etcd.endpoint(), &a);
    wait_viewer_nodes(&a, &["n1", "n2"]).await;
    wait_viewer_nodes(&b, &["n1", "n2"]).await;

    // Business data: written through A, read through B.
    let mut users = pb::users_client::UsersClient::connect(a.url.clone())
        .await
        .unwrap();
    users
        .create_user(pb::CreateUserRequest {
            id: "streamer".into(),
            name: "Streamer".into(),
        })
        .await
        .unwrap();
    let mut rooms_a = pb::rooms_client::RoomsClient::connect(a.url.clone())
        .await
        .unwrap();
    rooms_a
        .create_room(pb::CreateRoomRequest {
            id: "show".into(),
            owner: "streamer".into(),
            title: "The show".into(),
            scheduled_start_unix_ms: None,
        })
        .await
        .unwrap();
    let mut rooms_b = pb::rooms_client::RoomsClient::connect(b.url.clone())
        .await
        .unwrap();
    let room = rooms_b
        .get_room(pb::GetRoomRequest { id: "show".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (room.owner.as_str(), room.title.as_str()),
        ("streamer", "The show")
    );
    let mut scheduler_b = pb::scheduler_client::SchedulerClient::connect(b.url.clone())
        .await
        .unwrap();
    let assignment = scheduler_b
        .assign_publisher(pb::AssignPublisherRequest {
            room: "show".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let verifier = weir_protocol::TokenVerifier::from_base64(&b.public_key).unwrap();
    let room_id = weir_protocol::RoomId::parse("show").unwrap();
    let claims = verifier
        .authorize(
            &assignment.token,
            &room_id,
            weir_protocol::Mode::Publish,
            now_unix(),
        )
        .unwrap();
    assert_eq!(claims.sub, "streamer");
    let out = ctl(&b.url, &["rooms", "show", "show"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("streamer"),
        "{}",
        text(&out)
    );

    // Config: set through A with the CLI, applied by both without a restart.
    let before = config_revision(&b.url).await;
    let out = ctl(
        &a.url,
        &[
            "config",
            "set",
            "scheduler.max_load_ratio=0.5",
            "tokens.default_ttl_s=120",
            "--by",
            "test",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let set_at = Instant::now();
    let mut applied = [None, None];
    while applied.iter().any(Option::is_none) {
        for (i, c) in [&a, &b].iter().enumerate() {
            if applied[i].is_none() && config_revision(&c.url).await > before {
                applied[i] = Some(set_at.elapsed());
            }
        }
        assert!(
            set_at.elapsed() < DEADLINE,
            "config not applied everywhere: {applied:?}; B's log:\n{}",
            b.proc.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "config applied by A after {:?}, by B after {:?}",
        applied[0], applied[1]
    );
    // B's answers follow: tokens now live 120 s.
    let assignment = scheduler_b
        .assign_viewer(pb::AssignViewerRequest {
            room: "lobby".into(),
            region: String::new(),
            viewer_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let ttl = assignment.token_expires_unix - i64::try_from(now_unix()).unwrap();
    assert!((118..=121).contains(&ttl), "token ttl on B is {ttl}");
    // A bad value is refused, named, and changes nothing anywhere.
    let revision = config_revision(&a.url).await;
    let out = ctl(
        &b.url,
        &[
            "config",
            "set",
            "tokens.default_ttl_s=60",
            "scheduler.max_load_ratio=7",
        ],
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("scheduler.max_load_ratio"),
        "{}",
        text(&out)
    );
    let out = ctl(&a.url, &["config", "get", "tokens.default_ttl_s", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["entries"][0]["value"], "120", "{v}");
    assert_eq!(config_revision(&a.url).await, revision);
    assert_eq!(config_revision(&b.url).await, revision);

    // Cordon and drain through A steer B's answers at once.
    // (A sees its own write at once; B within its watch's lag.)
    let out = ctl(&a.url, &["nodes", "cordon", "n1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(viewer_nodes(&a.url).await, (200, vec!["n2".to_owned()]));
    wait_viewer_nodes(&b, &["n2"]).await;
    // A room-events client on n2, with a token from the scheduler.
    let r = request(
        "POST",
        &format!("{}/v1/assign-viewer", b.url),
        &[("Content-Type", "application/json")],
        br#"{"room":"lobby"}"#,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let token = v["token"].as_str().unwrap().to_owned();
    let mut events = common::ws::EventsClient::connect(&n2_url, "lobby", &format!("token={token}"))
        .await
        .unwrap();
    let out = ctl(&a.url, &["nodes", "drain", "n2"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(viewer_nodes(&a.url).await.0, 503);
    // The node reads its flag: its events clients are sent elsewhere, it
    // refuses new viewers and stops answering ready.
    let bye = events.next_of("bye").await;
    assert_eq!(bye["code"], "drain", "{bye}");
    let ready = request(
        "GET",
        &format!("{n2_url}/readyz"),
        &[],
        b"",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!((ready.status, ready.text().trim()), (503, "draining"));
    let whep = request(
        "POST",
        &format!("{n2_url}/whep/lobby"),
        &[
            ("Content-Type", "application/sdp"),
            ("Authorization", &format!("Bearer {token}")),
        ],
        common::offer(false).as_bytes(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(whep.status, 503, "{}", whep.text());
    assert!(whep.text().contains("draining"));
    let started = Instant::now();
    while viewer_nodes(&b.url).await.0 != 503 {
        assert!(
            started.elapsed() < DEADLINE,
            "B still assigns to drained nodes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = ctl(&b.url, &["nodes", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let states: Vec<(String, bool, bool)> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap().to_owned(),
                n["cordoned"].as_bool().unwrap(),
                n["draining"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("n1".to_owned(), true, false),
            ("n2".to_owned(), true, true)
        ]
    );
    for n in ["n1", "n2"] {
        let out = ctl(&b.url, &["nodes", "uncordon", n]);
        assert!(out.status.success(), "{}", text(&out));
    }
    // (Within a load report: a drained node also reported itself draining.)
    wait_viewer_nodes(&b, &["n1", "n2"]).await;
    wait_viewer_nodes(&a, &["n1", "n2"]).await;
    // n2 takes viewers again once it read the cleared flag.
    let started = Instant::now();
    loop {
        let ready = request(
            "GET",
            &format!("{n2_url}/readyz"),
            &[],
            b"",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        if ready.status == 200 {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "n2 stays drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = ctl(&a.url, &["nodes", "cordon", "no-such-node"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));

    // CDNs: the leader probes; both replicas read what it found and rank
    // the dead CDN last. (The healthy one probes a control plane's own
    // /healthz.)
    let cdns = serde_json::json!([
        {"name": "cdn-dead", "url": "https://dead.example/hls/{room}/master.m3u8",
         "weight": 10, "probe": "http://127.0.0.1:1/healthz"},
        {"name": "cdn-ok", "url": "https://ok.example/hls/{room}/master.m3u8",
         "weight": 1, "probe": format!("{}/healthz", a.url)},
    ]);
    let out = ctl(&a.url, &["config", "set", &format!("cdn.endpoints={cdns}")]);
    assert!(out.status.success(), "{}", text(&out));
    for c in [&a, &b] {
        let started = Instant::now();
        loop {
            let out = ctl(&c.url, &["cdns", "list", "--json"]);
            assert!(out.status.success(), "{}", text(&out));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let states: Vec<&str> = v["cdns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["state"].as_str().unwrap())
                .collect();
            let last = last_hls(&c.url).await;
            if states == ["open", "closed"] && last == "cdn-dead" {
                break;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "{}: CDN states {states:?}, last CDN {last}",
                c.proc.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Leadership: exactly one replica leads; kill -9 it and the other takes over.
    let started = Instant::now();
    let (leader_is_a, _) = loop {
        let la = gauge(&a.url, LEADER).await.unwrap_or(0.0);
        let lb = gauge(&b.url, LEADER).await.unwrap_or(0.0);
        match (la, lb) {
            (1.0, 0.0) => break (true, ()),
            (0.0, 1.0) => break (false, ()),
            (1.0, 1.0) => panic!("both replicas lead"),
            _ => {}
        }
        assert!(started.elapsed() < DEADLINE, "no replica leads: {la} {lb}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (leader, survivor) = if leader_is_a {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    leader.proc.kill9();
    let killed = Instant::now();
    while gauge(&survivor.url, LEADER).await != Some(1.0) {
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "the survivor did not take over; log:\n{}",
            survivor.proc.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("leader killed: survivor leads after {:?}", killed.elapsed());
    // The survivor now probes the CDNs itself, from the states stored.
    let taken = Instant::now();
    while gauge(&survivor.url, r#"weir_cdn_probes_total{cdn="cdn-ok"}"#)
        .await
        .is_none()
    {
        assert!(
            taken.elapsed() < DEADLINE,
            "the survivor does not probe the CDNs; log:\n{}",
            survivor.proc.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last_hls(&survivor.url).await, "cdn-dead");
    // Clients that retry on the survivor see no difference.
    assert_eq!(
        viewer_nodes(&survivor.url).await,
        (200, vec!["n1".to_owned(), "n2".to_owned()])
    );
    drop(postgres);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Config propagation to N control processes (`WEIR_MEASURE_PROCESSES`,
/// default 10) over one etcd: each process logs `config applied` with the
/// Unix ms it applied a revision at; the time from the moment `SetConfig`
/// was sent to the last process applying it is the propagation time.
/// `cargo test --test control -- --ignored --nocapture measure_config_propagation`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: run it by name"]
async fn measure_config_propagation() {
    let n: usize = std::env::var("WEIR_MEASURE_PROCESSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let runs: u64 = 20;
    let etcd = etcd::Etcd::start();
    let dir = temp_dir("control-measure");
    let controls: Vec<Control> = (0..n)
        .map(|i| {
            let sqlite = format!("sqlite://{}/c{i}.db?mode=rwc", dir.display());
            start_control(&format!("c{i}"), &dir, &etcd.endpoint(), &sqlite)
        })
        .collect();
    let mut config = pb::config_client::ConfigClient::connect(controls[0].url.clone())
        .await
        .unwrap();
    // Let every process's watch settle on the initial config.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut worst = Vec::new();
    for run in 0..runs {
        let sent_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let state = config
            .set_config(pb::SetConfigRequest {
                changes: vec![pb::ConfigChange {
                    key: "tokens.default_ttl_s".into(),
                    value: (600 + run).to_string(),
                    expected_version: None,
                }],
                updated_by: "measure".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let revision = state.revision;
        let deadline = Instant::now() + DEADLINE;
        let mut applied_at = vec![None; n];
        while applied_at.iter().any(Option::is_none) {
            for (i, c) in controls.iter().enumerate() {
                if applied_at[i].is_some() {
                    continue;
                }
                let log = std::fs::read_to_string(&c.proc.log).unwrap_or_default();
                applied_at[i] = log
                    .lines()
                    .filter(|l| l.contains("config applied"))
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .find(|v| v["revision"].as_u64() == Some(revision))
                    .and_then(|v| v["applied_unix_ms"].as_u64());
            }
            assert!(
                Instant::now() < deadline,
                "run {run}: not applied everywhere"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let max = applied_at
            .iter()
            .map(|t| t.unwrap().saturating_sub(sent_ms))
            .max()
            .unwrap();
        eprintln!(
            "run {run}: revision {revision} applied by all {n} processes {max} ms after it was sent"
        );
        worst.push(max);
    }
    worst.sort_unstable();
    eprintln!(
        "config propagation to {n} processes ({runs} runs): median {} ms, p90 {} ms, max {} ms",
        worst[worst.len() / 2],
        worst[worst.len() * 9 / 10],
        worst[worst.len() - 1]
    );
    drop(controls);
    let _ = std::fs::remove_dir_all(&dir);
}
