//! Gifts across a failure, every piece a real process on loopback: two
//! `weir control --nats` replicas on one etcd, one PostgreSQL and one
//! nats-server. A viewer sends gifts through both replicas over the JSON
//! gateway (retrying on the other replica with the same key when one does
//! not answer); halfway, the leader (the replica whose outbox relay
//! publishes) is killed with `kill -9`. The checker then proves that no
//! paid gift was lost or doubled: every gift answered 200 is in the store,
//! the ledger sums to zero, the balance is charged once per gift, the room
//! stream holds exactly as many messages as gifts, and every gift's id is
//! already in it (a re-publish is acked as a duplicate).
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../control-plane/tests/support/etcd.rs"]
mod etcd;
// The data plane's file, formatted by its owners.
#[rustfmt::skip]
#[path = "../data-plane/tests/support/nats.rs"]
mod nats;
#[path = "../control-plane/tests/support/postgres.rs"]
mod pg;

use std::path::Path;
use std::time::{Duration, Instant};

use common::proc::Proc;
use common::{request, temp_dir};
use weir_control_plane::bus::NatsPublisher;
use weir_control_plane::store::{Store, UserId};
use weir_protocol::bus::{BusPublisher, Retention, STREAM};
use weir_protocol::pb;

/// A guard against hangs (CI is slow), not a measurement.
const DEADLINE: Duration = Duration::from_secs(60);
const GIFTS: usize = 40;
const LEADER: &str = r#"weir_election_leader{election="control"}"#;

struct Control {
    proc: Proc,
    url: String,
}

fn start_control(name: &str, dir: &Path, etcd: &str, database: &str, nats: &str) -> Control {
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

async fn json(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: &str,
) -> Option<(u16, serde_json::Value)> {
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
        Duration::from_secs(5),
    )
    .await
    .ok()?;
    let value = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
    Some((r.status, value))
}

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

/// Messages held by the room stream, from the server's monitoring port.
async fn stream_messages(monitor_port: u16) -> u64 {
    let r = request(
        "GET",
        &format!("http://127.0.0.1:{monitor_port}/jsz?streams=true"),
        &[],
        b"",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let jsz: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    fn find(v: &serde_json::Value) -> Option<u64> {
        match v {
            serde_json::Value::Object(m) => {
                if m.get("name").and_then(|n| n.as_str()) == Some(STREAM) {
                    return m.get("state")?.get("messages")?.as_u64();
                }
                m.values().find_map(find)
            }
            serde_json::Value::Array(a) => a.iter().find_map(find),
            _ => None,
        }
    }
    find(&jsz).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_paid_gift_is_lost_or_doubled_when_the_leader_dies() {
    let etcd = etcd::Etcd::start();
    let postgres = pg::Postgres::start();
    let nats = nats::Nats::start();
    let dir = temp_dir("gifts");
    let mut a = start_control(
        "control-a",
        &dir,
        &etcd.endpoint(),
        &postgres.url(),
        &nats.url(),
    );
    let mut b = start_control(
        "control-b",
        &dir,
        &etcd.endpoint(),
        &postgres.url(),
        &nats.url(),
    );

    for body in [
        r#"{"id":"star","name":"Star"}"#,
        r#"{"id":"fan","name":"Fan"}"#,
    ] {
        let (status, v) = json("POST", &format!("{}/v1/users", a.url), None, body)
            .await
            .unwrap();
        assert_eq!(status, 200, "{v}");
    }
    let (status, v) = json(
        "POST",
        &format!("{}/v1/rooms", a.url),
        None,
        r#"{"id":"show","owner":"star","title":"Show"}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{v}");
    let mut wallet = pb::wallet_client::WalletClient::connect(b.url.clone())
        .await
        .unwrap();
    wallet
        .grant(pb::GrantRequest {
            user: "fan".into(),
            amount: 100_000,
            idempotency_key: "deposit".into(),
        })
        .await
        .unwrap();
    let (status, minted) = json(
        "POST",
        &format!("{}/v1/tokens", a.url),
        None,
        r#"{"room":"show","mode":"play","subject":"fan"}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{minted}");
    let token = minted["token"].as_str().unwrap().to_owned();

    // Who leads (and so relays)?
    let started = Instant::now();
    let leader_is_a = loop {
        let la = gauge(&a.url, LEADER).await.unwrap_or(0.0);
        let lb = gauge(&b.url, LEADER).await.unwrap_or(0.0);
        match (la, lb) {
            (1.0, 0.0) => break true,
            (0.0, 1.0) => break false,
            (1.0, 1.0) => panic!("both replicas lead"),
            _ => {}
        }
        assert!(started.elapsed() < DEADLINE, "no replica leads");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let mut ids = Vec::new();
    let mut leader_alive = true;
    for i in 0..GIFTS {
        if i == GIFTS / 2 {
            let leader = if leader_is_a { &mut a } else { &mut b };
            leader.proc.kill9();
            leader_alive = false;
        }
        let body = format!(r#"{{"gift":"rose","count":1,"idempotency_key":"tap-{i}"}}"#);
        // Alternate replicas; a dead one is retried on the other, same key.
        let first = if i % 2 == 0 { &a.url } else { &b.url };
        let second = if i % 2 == 0 { &b.url } else { &a.url };
        let mut answer = None;
        for url in [first, second] {
            if let Some((200, v)) = json(
                "POST",
                &format!("{url}/v1/rooms/show/gifts"),
                Some(&token),
                &body,
            )
            .await
            {
                answer = Some(v);
                break;
            }
        }
        let v = answer.unwrap_or_else(|| panic!("gift {i} was answered by neither replica"));
        assert_eq!(v["amount"].as_i64(), Some(10), "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    assert!(!leader_alive);
    let survivor = if leader_is_a { &b } else { &a };

    // The survivor takes over and drains the outbox.
    let killed = Instant::now();
    loop {
        let leads = gauge(&survivor.url, LEADER).await == Some(1.0);
        let pending = gauge(&survivor.url, "weir_outbox_pending").await;
        if leads && pending == Some(0.0) {
            break;
        }
        assert!(
            killed.elapsed() < DEADLINE,
            "the survivor did not publish everything (leads {leads}, pending {pending:?}); log:\n{}",
            survivor.proc.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The checker.
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), GIFTS, "every gift got its own id");
    let store = Store::connect(&postgres.url(), Duration::from_secs(10))
        .await
        .unwrap();
    let audit = store.wallet_audit().await.unwrap();
    assert_eq!(
        (
            audit.ledger_sum,
            audit.balance_sum,
            audit.mismatched_accounts,
            audit.gifts,
            audit.outbox_pending,
            audit.gifts_without_one_outbox_row
        ),
        (0, 0, 0, GIFTS as u64, 0, 0),
        "{audit:?}"
    );
    let fan = store.balance(&UserId::parse("fan").unwrap()).await.unwrap();
    assert_eq!(fan.balance, 100_000 - 10 * GIFTS as i64);
    assert_eq!(stream_messages(nats.monitor_port).await, GIFTS as u64);
    let bus = NatsPublisher::connect(&nats.url(), Retention::default())
        .await
        .unwrap();
    for id in &ids {
        let gift = store.gift(id).await.unwrap();
        let ack = bus
            .publish(&gift.room, &gift.event(), Some(&gift.id))
            .await
            .unwrap();
        assert!(ack.duplicate, "gift {id} was not in the stream");
    }
    assert_eq!(stream_messages(nats.monitor_port).await, GIFTS as u64);
    store.close().await;
    drop(postgres);
    let _ = std::fs::remove_dir_all(&dir);
}
