//! The room's promise under faults, with a checker. Every piece is a real
//! process on loopback: a 3-server NATS JetStream cluster, etcd, PostgreSQL,
//! two `weir control` replicas and two `weir node`s. Gift senders pay
//! concurrently through both replicas with random retries (same key, either
//! replica) while viewers on both nodes read the room's events over
//! WebSocket, reconnecting with `since=&epoch=` whenever their connection
//! drops. Meanwhile the test `kill -9`s and restarts the relaying leader, a
//! data node, one NATS server and the other control replica.
//!
//! Afterwards the checker proves, from the database, the stream and every
//! viewer's received frames:
//! - every charged gift is in the room stream exactly once, and no gift is
//!   there that was not charged;
//! - every viewer saw every charged gift exactly once, and no other;
//! - no viewer saw a gap it was not told about (each event's `prev` is the
//!   offset of the one before it, across reconnects);
//! - the ledger sums to zero, every balance is its ledger, none is negative;
//! - every gift answered 200 is in the database, and a retry answered the
//!   same gift.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../control-plane/tests/support/etcd.rs"]
mod etcd;
#[rustfmt::skip]
#[path = "../data-plane/tests/support/nats.rs"]
mod nats;
#[path = "../control-plane/tests/support/postgres.rs"]
mod pg;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proc::Proc;
use common::ws::EventsClient;
use common::{request, temp_dir};
use serde_json::{Value, json};
use weir_control_plane::store::{PageRequest, Store, TransferKind, UserId};
use weir_data_plane::bus::NatsBus;
use weir_protocol::RoomId;
use weir_protocol::bus::{BusError, EventBody, Retention, RoomBus};

/// A guard against hangs (CI is slow), not a measurement.
const DEADLINE: Duration = Duration::from_secs(90);
const ROOM: &str = "arena";
const SENDERS: usize = 6;
const GIFTS_PER_SENDER: usize = 25;
/// Each sender can pay for this many roses (10 each): the rest are refused.
const AFFORDABLE: i64 = 20;
const VIEWERS: usize = 4;
const LEADER: &str = r#"weir_election_leader{election="control"}"#;

struct Control {
    proc: Proc,
    url: String,
}

fn start_control(name: &str, dir: &Path, etcd: &str, database: &str, nats: &str) -> Control {
    let proc = Proc::spawn(
        name,
        dir,
        &[
            "control",
            "--grpc",
            "127.0.0.1:0",
            "--data-dir",
            dir.join("control-data").to_str().unwrap(),
            "--etcd",
            etcd,
            "--database",
            database,
            "--nats",
            nats,
            "--allow-grants",
            "--allow-token-minting",
        ],
    );
    let url = proc.wait_line("its URL", |l| {
        l.starts_with("http://").then(|| l.trim().to_owned())
    });
    Control { proc, url }
}

fn start_node(dir: &Path, id: &str, nats: &str, key: &str) -> (Proc, String) {
    let srt = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().to_string()
    };
    let proc = Proc::spawn(
        id,
        dir,
        &[
            "node",
            "--nats",
            nats,
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
            key,
        ],
    );
    let url = proc.wait_line("its metrics URL", |l| {
        l.strip_suffix("/metrics").map(str::to_owned)
    });
    (proc, url)
}

async fn call(method: &str, url: &str, token: Option<&str>, body: &str) -> Option<(u16, Value)> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = auth.as_deref() {
        headers.push(("authorization", a));
    }
    let r = request(
        method,
        url,
        &headers,
        body.as_bytes(),
        Duration::from_secs(3),
    )
    .await
    .ok()?;
    Some((
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    ))
}

/// Calls each URL in turn until one answers.
async fn call_any(
    urls: &[String],
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let started = Instant::now();
    loop {
        for url in urls {
            if let Some(answer) = call(method, &format!("{url}{path}"), token, body).await {
                return answer;
            }
        }
        assert!(started.elapsed() < DEADLINE, "no replica answered {path}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn gauge(url: &str, series: &str) -> Option<f64> {
    let r = request(
        "GET",
        &format!("{url}/metrics"),
        &[],
        b"",
        Duration::from_secs(3),
    )
    .await
    .ok()?;
    r.text().lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().parse::<f64>().ok())
    })
}

/// A small deterministic generator (the test must be repeatable).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// What one sender saw.
#[derive(Default, Debug)]
struct Sent {
    /// Gift ids answered 200, by key.
    charged: BTreeMap<String, String>,
    /// Keys refused for want of money (409).
    refused: u32,
}

async fn sender(i: usize, controls: Arc<Mutex<Vec<String>>>, token: String) -> Sent {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1));
    let mut sent = Sent::default();
    for g in 0..GIFTS_PER_SENDER {
        let key = format!("s{i}-g{g}");
        let body = json!({"gift": "rose", "count": 1, "idempotency_key": key}).to_string();
        // Sometimes the client "times out" and retries, on either replica;
        // sometimes it sends the same key again after an answer.
        let tries = if rng.chance(30) { 2 } else { 1 };
        for _ in 0..tries {
            let mut urls = controls.lock().unwrap().clone();
            if rng.chance(50) {
                urls.reverse();
            }
            let (status, v) = call_any(
                &urls,
                "POST",
                &format!("/v1/rooms/{ROOM}/gifts"),
                Some(&token),
                &body,
            )
            .await;
            match status {
                200 => {
                    let id = v["id"].as_str().unwrap().to_owned();
                    if let Some(first) = sent.charged.insert(key.clone(), id.clone()) {
                        assert_eq!(first, id, "a retry of {key} answered another gift");
                        assert_eq!(v["replayed"], true, "{v}");
                    }
                }
                409 => {
                    assert!(
                        !sent.charged.contains_key(&key),
                        "{key} was charged, then refused: {v}"
                    );
                    sent.refused += 1;
                }
                // A replica that lost its store connection mid-kill: retry.
                503 | 504 => {}
                other => panic!("gift {key}: {other} {v}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(20 + rng.next() % 40)).await;
    }
    sent
}

/// What one viewer saw.
#[derive(Default, Debug)]
struct Seen {
    /// Gift ids in the order received.
    gifts: Vec<String>,
    /// Times a reconnect could not recover (a gap it was told about).
    told_gaps: u32,
    reconnects: u32,
    last_offset: u64,
    /// What happened, for the failure message.
    trace: Vec<String>,
}

async fn viewer(
    i: usize,
    epoch: u64,
    nodes: Arc<Mutex<Vec<String>>>,
    token: String,
    target: Arc<Mutex<Option<u64>>>,
) -> Seen {
    let mut seen = Seen::default();
    let started = Instant::now();
    'connect: loop {
        assert!(
            started.elapsed() < DEADLINE * 2,
            "viewer {i} never caught up: {seen:?}"
        );
        let urls = nodes.lock().unwrap().clone();
        let url = &urls[(i + seen.reconnects as usize) % urls.len()];
        // From the room's first event on (offset 0 of the stream's epoch),
        // then from the last one seen.
        let query = format!("token={token}&since={}&epoch={epoch}", seen.last_offset);
        let mut client = match tokio::time::timeout(
            Duration::from_secs(3),
            EventsClient::connect(url, ROOM, &query),
        )
        .await
        {
            Ok(Ok(c)) => c,
            _ => {
                seen.reconnects += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        assert_eq!(client.hello["epoch"].as_u64(), Some(epoch), "one epoch");
        seen.trace.push(format!("connect {url}: {}", client.hello));
        if client.hello["recovered"] == false {
            seen.told_gaps += 1;
            seen.last_offset = client.hello["offset"].as_u64().unwrap();
        }
        loop {
            if let Some(t) = *target.lock().unwrap()
                && seen.last_offset >= t
            {
                return seen;
            }
            let f = match tokio::time::timeout(Duration::from_secs(1), client.next()).await {
                Ok(f) => f,
                Err(_) => continue,
            };
            match f["t"].as_str().unwrap_or_default() {
                "event" => {
                    let offset = f["offset"].as_u64().unwrap();
                    let prev = f["prev"].as_u64().unwrap();
                    if seen.last_offset != 0 {
                        assert_eq!(
                            prev, seen.last_offset,
                            "viewer {i} saw a gap it was not told about: {f}"
                        );
                    }
                    seen.last_offset = offset;
                    seen.trace.push(format!("{offset}<-{prev} {}", f["type"]));
                    if f["type"] == "gift" {
                        seen.gifts.push(f["gift_id"].as_str().unwrap().to_owned());
                    }
                }
                "gap" => {
                    seen.told_gaps += 1;
                    seen.last_offset = 0;
                }
                "skipped" => panic!("viewer {i} was shed in a quiet room: {f}"),
                "closed" | "bye" => {
                    seen.reconnects += 1;
                    continue 'connect;
                }
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gifts_and_their_events_always_agree_through_kills() {
    let mut cluster = nats::NatsCluster::start();
    let etcd = etcd::Etcd::start();
    let postgres = pg::Postgres::start();
    let dir = temp_dir("room-faults");
    let nats_urls = cluster.urls();
    let a = start_control(
        "control-a",
        &dir,
        &etcd.endpoint(),
        &postgres.url(),
        &nats_urls,
    );
    let b = start_control(
        "control-b",
        &dir,
        &etcd.endpoint(),
        &postgres.url(),
        &nats_urls,
    );
    let key = a.proc.wait_line("the token public key", |l| {
        l.starts_with("token public key")
            .then(|| l.split_whitespace().last().unwrap_or_default().to_owned())
    });
    let (mut n1, n1_url) = start_node(&dir, "n1", &nats_urls, &key);
    let (_n2, n2_url) = start_node(&dir, "n2", &nats_urls, &key);
    let controls = Arc::new(Mutex::new(vec![a.url.clone(), b.url.clone()]));
    let nodes = Arc::new(Mutex::new(vec![n1_url.clone(), n2_url.clone()]));
    let all_controls = vec![a.url.clone(), b.url.clone()];

    // The room, its owner, the senders with money for some gifts only.
    let post = |path: &'static str, body: String| {
        let urls = all_controls.clone();
        async move { call_any(&urls, "POST", path, None, &body).await }
    };
    let (s, v) = post(
        "/v1/users",
        json!({"id": "star", "name": "Star"}).to_string(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = post(
        "/v1/rooms",
        json!({"id": ROOM, "owner": "star", "title": "Arena"}).to_string(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let mut tokens = Vec::new();
    for i in 0..SENDERS {
        let user = format!("fan{i}");
        let (s, v) = post("/v1/users", json!({"id": user, "name": user}).to_string()).await;
        assert_eq!(s, 200, "{v}");
        let mut wallet = weir_protocol::pb::wallet_client::WalletClient::connect(a.url.clone())
            .await
            .unwrap();
        wallet
            .grant(weir_protocol::pb::GrantRequest {
                user: user.clone(),
                amount: AFFORDABLE * 10,
                idempotency_key: format!("deposit-{user}"),
            })
            .await
            .unwrap();
        let (s, v) = post(
            "/v1/tokens",
            json!({"room": ROOM, "mode": "play", "subject": user}).to_string(),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        tokens.push(v["token"].as_str().unwrap().to_owned());
    }

    // Viewers on both nodes, from the start. The stream's epoch, as any
    // client of the bus sees it.
    let bus = NatsBus::connect(&nats_urls, Retention::default())
        .await
        .unwrap();
    let epoch = bus.epoch().await.unwrap();
    let target = Arc::new(Mutex::new(None));
    let mut viewers = Vec::new();
    for i in 0..VIEWERS {
        let (s, v) = post(
            "/v1/tokens",
            json!({"room": ROOM, "mode": "play", "subject": format!("viewer{i}")}).to_string(),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let token = v["token"].as_str().unwrap().to_owned();
        viewers.push(tokio::spawn(viewer(
            i,
            epoch,
            Arc::clone(&nodes),
            token,
            Arc::clone(&target),
        )));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let senders: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| tokio::spawn(sender(i, Arc::clone(&controls), t.clone())))
        .collect();

    // The faults, while gifts flow.
    let etcd_url = etcd.endpoint();
    let pg_url = postgres.url();
    let restart_control = |procs: &mut Vec<Control>, idx: usize, name: &str| {
        let dead = procs[idx].url.clone();
        procs[idx].proc.kill9();
        controls.lock().unwrap().retain(|u| *u != dead);
        std::thread::sleep(Duration::from_millis(1500));
        let again = start_control(name, &dir, &etcd_url, &pg_url, &nats_urls);
        controls.lock().unwrap().push(again.url.clone());
        procs[idx] = again;
    };
    let leader = usize::from(gauge(&a.url, LEADER).await != Some(1.0));
    let mut procs = vec![a, b];
    tokio::time::sleep(Duration::from_millis(800)).await;
    tokio::task::block_in_place(|| restart_control(&mut procs, leader, "leader-restarted"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    n1.kill9();
    nodes.lock().unwrap().retain(|u| *u != n1_url);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (n1_again, n1_url_again) = start_node(&dir, "n1-restarted", &nats_urls, &key);
    nodes.lock().unwrap().push(n1_url_again);
    tokio::time::sleep(Duration::from_millis(800)).await;
    cluster.servers[0].kill();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    cluster.servers[0].restart();
    tokio::time::sleep(Duration::from_millis(800)).await;
    tokio::task::block_in_place(|| restart_control(&mut procs, 1 - leader, "other-restarted"));

    let mut sent = Vec::new();
    for s in senders {
        sent.push(s.await.unwrap());
    }
    let live_controls: Vec<String> = procs.iter().map(|c| c.url.clone()).collect();

    // The outbox drains (whoever leads now).
    let started = Instant::now();
    loop {
        let mut drained = false;
        for url in &live_controls {
            if gauge(url, LEADER).await == Some(1.0)
                && gauge(url, "weir_outbox_pending").await == Some(0.0)
            {
                drained = true;
            }
        }
        if drained {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "the outbox did not drain");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The database.
    let store = Store::connect(&postgres.url(), Duration::from_secs(10))
        .await
        .unwrap();
    let audit = store.wallet_audit().await.unwrap();
    assert_eq!(audit.ledger_sum, 0, "{audit:?}");
    assert_eq!(audit.balance_sum, 0, "{audit:?}");
    assert_eq!(audit.mismatched_accounts, 0, "{audit:?}");
    assert_eq!(audit.negative_users, 0, "{audit:?}");
    assert_eq!(audit.outbox_pending, 0, "{audit:?}");
    assert_eq!(audit.gifts_without_one_outbox_row, 0, "{audit:?}");
    let mut charged: BTreeSet<String> = BTreeSet::new();
    let star = UserId::parse("star").unwrap();
    let mut page = PageRequest {
        after: String::new(),
        limit: 500,
    };
    loop {
        let p = store.ledger(&star, &page).await.unwrap();
        charged.extend(
            p.items
                .iter()
                .filter(|e| e.kind == TransferKind::Gift)
                .map(|e| e.transfer_id.clone()),
        );
        match p.next {
            Some(next) => page.after = next,
            None => break,
        }
    }
    assert_eq!(charged.len() as u64, audit.gifts);
    assert_eq!(
        charged.len() as i64,
        AFFORDABLE * SENDERS as i64,
        "every sender paid for exactly what they could afford"
    );
    for s in &sent {
        for id in s.charged.values() {
            assert!(
                charged.contains(id),
                "gift {id} answered 200 is not in the store"
            );
        }
    }

    // The stream: each charged gift exactly once, nothing else.
    let room = RoomId::parse(ROOM).unwrap();
    // A JetStream server was restarted a moment ago: until its stream has a
    // leader again, reads answer Unavailable ("try again later").
    let mut tries = 0;
    let events = loop {
        match bus.read_after(&room, 0, usize::MAX).await {
            Ok(events) => break events,
            Err(BusError::Unavailable(e)) if tries < 30 => {
                tries += 1;
                eprintln!("reading the stream back: {e}; again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("reading the stream back: {e}"),
        }
    };
    let in_stream: Vec<String> = events
        .iter()
        .filter_map(|d| match &d.event.body {
            EventBody::Gift { gift_id, .. } => Some(gift_id.clone()),
            _ => None,
        })
        .collect();
    let distinct: BTreeSet<String> = in_stream.iter().cloned().collect();
    assert_eq!(
        distinct.len(),
        in_stream.len(),
        "a gift is in the stream twice"
    );
    assert_eq!(distinct, charged, "the stream and the store disagree");

    // Every viewer: every charged gift exactly once, no untold gap.
    *target.lock().unwrap() = Some(events.last().unwrap().offset);
    for (i, v) in viewers.into_iter().enumerate() {
        let seen = tokio::time::timeout(DEADLINE, v)
            .await
            .unwrap_or_else(|_| panic!("viewer {i} did not catch up"))
            .unwrap();
        let distinct: BTreeSet<String> = seen.gifts.iter().cloned().collect();
        assert_eq!(
            distinct.len(),
            seen.gifts.len(),
            "viewer {i} saw a gift twice"
        );
        assert!(
            distinct.is_subset(&charged),
            "viewer {i} saw an unpaid gift"
        );
        if seen.told_gaps == 0 {
            let missing: Vec<u64> = events
                .iter()
                .filter(|d| {
                    matches!(&d.event.body, EventBody::Gift { gift_id, .. } if !distinct.contains(gift_id))
                })
                .map(|d| d.offset)
                .collect();
            assert!(
                missing.is_empty(),
                "viewer {i} missed gifts at offsets {missing:?} without being told; it saw:\n{}",
                seen.trace.join("\n")
            );
        }
        eprintln!(
            "viewer {i}: {} gifts, {} reconnects, {} told gaps",
            seen.gifts.len(),
            seen.reconnects,
            seen.told_gaps
        );
    }
    store.close().await;
    drop((n1_again, postgres, etcd, cluster));
    let _ = std::fs::remove_dir_all(&dir);
}
