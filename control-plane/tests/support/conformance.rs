//! The conformance suite of the `Coordinator` trait: every case is a function
//! over `&dyn Coordinator`, run against each implementation (in-process and
//! etcd) by `coordinator_conformance.rs`. A case starts from an empty
//! coordinator and checks only what the trait promises, on the real clock:
//! waits are polling loops with generous deadlines, never fixed sleeps.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use weir_protocol::coordinator::{
    CoordError, Coordinator, LeaseId, NODE_TTL, NodeInfo, NodeLoad, RoomLoad,
};
use weir_protocol::{NodeId, RoomId};

/// The short lease of the expiry cases: etcd 3.4's smallest lease with its
/// default election timeout (1 s) is 2 s; it raises anything shorter.
pub const SHORT_TTL: Duration = Duration::from_secs(2);

/// How late after its TTL an expired lease may still be seen: etcd's leader
/// looks for expired leases every 500 ms, and CI machines are slow.
pub const EXPIRY_SLACK: Duration = Duration::from_secs(5);

pub fn id(s: &str) -> NodeId {
    NodeId::parse(s).unwrap()
}

pub fn room(s: &str) -> RoomId {
    RoomId::parse(s).unwrap()
}

pub fn node(s: &str) -> NodeInfo {
    NodeInfo {
        id: id(s),
        region: "eu-west".into(),
        zone: "eu-west-1a".into(),
        http_url: format!("http://{s}.example:8080"),
        version: "0.1.0-test".into(),
        capacity: 500,
        draining: false,
        load: NodeLoad::default(),
    }
}

async fn ids(c: &dyn Coordinator) -> Vec<String> {
    c.nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.id.as_str().to_owned())
        .collect()
}

async fn origins(c: &dyn Coordinator) -> Vec<(String, String)> {
    c.room_origins()
        .await
        .unwrap()
        .into_iter()
        .map(|(r, n)| (r.as_str().to_owned(), n.as_str().to_owned()))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(r, n)| ((*r).to_owned(), (*n).to_owned()))
        .collect()
}

/// Registration, keep-alive with new info, and listing (sorted by node id,
/// info exactly as written).
pub async fn register_keep_alive_and_list(c: &dyn Coordinator) {
    assert!(c.nodes().await.unwrap().is_empty());
    // Registered out of order: listed by id.
    let b = c.register_node(node("b"), NODE_TTL).await.unwrap();
    let a = c.register_node(node("a"), NODE_TTL).await.unwrap();
    assert_ne!(a, b);
    assert_eq!(c.nodes().await.unwrap(), vec![node("a"), node("b")]);

    let mut info = node("a");
    info.draining = true;
    info.load = NodeLoad {
        reported_at_ms: 1_700_000_000_123,
        sessions: 7,
        egress_bps: 12_000_000,
        rooms: vec![
            RoomLoad {
                room: room("r1"),
                live: true,
                subscribers: 6,
            },
            RoomLoad {
                room: room("r2"),
                live: false,
                subscribers: 1,
            },
        ],
    };
    c.keep_alive(a, info.clone()).await.unwrap();
    assert_eq!(c.nodes().await.unwrap(), vec![info, node("b")]);
    assert!(c.room_origins().await.unwrap().is_empty());

    c.revoke(a).await.unwrap();
    c.revoke(b).await.unwrap();
    assert!(c.nodes().await.unwrap().is_empty());
}

/// A lease that is not kept alive expires with its node and its room claims;
/// one that is kept alive outlives its TTL many times; an expired lease
/// answers `LeaseExpired` (so an agent registers again), and its rooms are
/// free for others.
pub async fn lease_expiry_removes_node_and_claims(c: &dyn Coordinator) {
    let started = Instant::now();
    let a = c.register_node(node("a"), SHORT_TTL).await.unwrap();
    let b = c.register_node(node("b"), SHORT_TTL).await.unwrap();
    assert_eq!(
        c.claim_room(&room("ra"), &id("a"), a).await.unwrap(),
        id("a")
    );
    assert_eq!(
        c.claim_room(&room("rb"), &id("b"), b).await.unwrap(),
        id("b")
    );
    assert_eq!(origins(c).await, pairs(&[("ra", "a"), ("rb", "b")]));

    // Keep `a` alive, not `b`: `b` and its claim go.
    let deadline = Instant::now() + SHORT_TTL + EXPIRY_SLACK;
    loop {
        c.keep_alive(a, node("a")).await.unwrap();
        if ids(c).await == ["a"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node b still listed {:?} after registration, its TTL being {SHORT_TTL:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(origins(c).await, pairs(&[("ra", "a")]));
    assert_eq!(
        c.keep_alive(b, node("b")).await,
        Err(CoordError::LeaseExpired(b))
    );
    assert_eq!(
        c.claim_room(&room("rc"), &id("b"), b).await,
        Err(CoordError::LeaseExpired(b))
    );
    assert_eq!(origins(c).await, pairs(&[("ra", "a")]));

    // `a`, kept alive, outlives two of its TTLs.
    while started.elapsed() < SHORT_TTL * 2 + Duration::from_millis(500) {
        c.keep_alive(a, node("a")).await.unwrap();
        assert_eq!(ids(c).await, ["a"]);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }

    // Left alone, `a` goes too, with its claim.
    let deadline = Instant::now() + SHORT_TTL + EXPIRY_SLACK;
    while !c.nodes().await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "node a not expired in time");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(c.room_origins().await.unwrap().is_empty());
    assert_eq!(
        c.keep_alive(a, node("a")).await,
        Err(CoordError::LeaseExpired(a))
    );

    // The freed room goes to whoever claims it next.
    let b2 = c.register_node(node("b"), NODE_TTL).await.unwrap();
    assert_eq!(
        c.claim_room(&room("ra"), &id("b"), b2).await.unwrap(),
        id("b")
    );
    c.revoke(b2).await.unwrap();
}

/// The first claim wins; a later claimer learns the origin; the holder may
/// claim again; claims race safely.
pub async fn claim_is_compare_and_set(c: &dyn Coordinator) {
    let a = c.register_node(node("a"), NODE_TTL).await.unwrap();
    let b = c.register_node(node("b"), NODE_TTL).await.unwrap();
    assert_eq!(
        c.claim_room(&room("r"), &id("a"), a).await.unwrap(),
        id("a")
    );
    assert_eq!(
        c.claim_room(&room("r"), &id("b"), b).await.unwrap(),
        id("a")
    );
    assert_eq!(
        c.claim_room(&room("r"), &id("a"), a).await.unwrap(),
        id("a")
    );
    assert_eq!(
        c.claim_room(&room("q"), &id("b"), b).await.unwrap(),
        id("b")
    );
    // Sorted by room id (not by key: "q-x" sorts before "q/" in etcd's keys).
    assert_eq!(
        c.claim_room(&room("q-x"), &id("a"), a).await.unwrap(),
        id("a")
    );
    assert_eq!(
        origins(c).await,
        pairs(&[("q", "b"), ("q-x", "a"), ("r", "a")])
    );

    // Racing claims: exactly one winner per room, and both see it.
    for i in 0..5 {
        let r = room(&format!("race-{i}"));
        let (na, nb) = (id("a"), id("b"));
        let (x, y) = tokio::join!(c.claim_room(&r, &na, a), c.claim_room(&r, &nb, b));
        let (x, y) = (x.unwrap(), y.unwrap());
        assert_eq!(x, y, "room {r}: both claimers must see the same origin");
        assert!(x == id("a") || x == id("b"));
    }
    c.revoke(a).await.unwrap();
    c.revoke(b).await.unwrap();
}

/// Only the holder releases a room; releasing a free room is harmless.
pub async fn only_the_holder_releases(c: &dyn Coordinator) {
    let a = c.register_node(node("a"), NODE_TTL).await.unwrap();
    let b = c.register_node(node("b"), NODE_TTL).await.unwrap();
    c.claim_room(&room("r"), &id("a"), a).await.unwrap();
    c.release_room(&room("r"), &id("b")).await.unwrap();
    assert_eq!(origins(c).await, pairs(&[("r", "a")]));
    c.release_room(&room("r"), &id("a")).await.unwrap();
    assert!(c.room_origins().await.unwrap().is_empty());
    c.release_room(&room("r"), &id("a")).await.unwrap();
    c.release_room(&room("never-claimed"), &id("a"))
        .await
        .unwrap();
    // Released, the room is free for another node.
    assert_eq!(
        c.claim_room(&room("r"), &id("b"), b).await.unwrap(),
        id("b")
    );
    c.revoke(a).await.unwrap();
    c.revoke(b).await.unwrap();
}

/// Revoking removes the node and all its claims at once and leaves others;
/// the revoked (or an unknown) lease answers `LeaseExpired`.
pub async fn revoke_removes_everything(c: &dyn Coordinator) {
    let a = c.register_node(node("a"), NODE_TTL).await.unwrap();
    let b = c.register_node(node("b"), NODE_TTL).await.unwrap();
    c.claim_room(&room("r1"), &id("a"), a).await.unwrap();
    c.claim_room(&room("r2"), &id("a"), a).await.unwrap();
    c.claim_room(&room("r3"), &id("b"), b).await.unwrap();
    c.revoke(a).await.unwrap();
    assert_eq!(ids(c).await, ["b"]);
    assert_eq!(origins(c).await, pairs(&[("r3", "b")]));
    assert_eq!(c.revoke(a).await, Err(CoordError::LeaseExpired(a)));
    assert_eq!(
        c.keep_alive(a, node("a")).await,
        Err(CoordError::LeaseExpired(a))
    );
    assert_eq!(
        c.claim_room(&room("r4"), &id("a"), a).await,
        Err(CoordError::LeaseExpired(a))
    );
    let unknown = LeaseId(0x5eed_1234);
    assert_eq!(
        c.keep_alive(unknown, node("c")).await,
        Err(CoordError::LeaseExpired(unknown))
    );
    assert_eq!(
        c.revoke(unknown).await,
        Err(CoordError::LeaseExpired(unknown))
    );
    assert_eq!(ids(c).await, ["b"]);
    c.revoke(b).await.unwrap();
    assert!(c.nodes().await.unwrap().is_empty());
    assert!(c.room_origins().await.unwrap().is_empty());
}

/// A node that registers again (after a restart) rebinds its key to the new
/// lease: revoking the old lease no longer removes it, revoking the new one does.
pub async fn re_registering_rebinds_the_node_key(c: &dyn Coordinator) {
    let old = c.register_node(node("a"), NODE_TTL).await.unwrap();
    let mut info = node("a");
    info.version = "0.2.0-test".into();
    let new = c.register_node(info.clone(), NODE_TTL).await.unwrap();
    assert_ne!(old, new);
    assert_eq!(c.nodes().await.unwrap(), vec![info]);
    c.revoke(old).await.unwrap();
    assert_eq!(ids(c).await, ["a"]);
    c.revoke(new).await.unwrap();
    assert!(c.nodes().await.unwrap().is_empty());
}
