//! The conformance suite of the `Coordinator` trait: every case is a function
//! over `&dyn Coordinator`, run against each implementation (in-process and
//! etcd) by `coordinator_conformance.rs`. A case starts from an empty
//! coordinator and checks only what the trait promises, on the real clock:
//! waits are polling loops with generous deadlines, never fixed sleeps.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use weir_protocol::coordinator::{
    BreakerState, CdnHealth, CoordError, Coordinator, LeaseId, NODE_TTL, NodeInfo, NodeLoad,
    RoomLoad,
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
        relay_addr: None,
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

/// Operator flags: set, listed, cleared; they outlive the node's lease and
/// come back with `cluster()` together with nodes and origins.
pub async fn node_flags_outlive_leases(c: &dyn Coordinator) {
    use weir_protocol::coordinator::NodeFlags;
    assert!(c.node_flags().await.unwrap().is_empty());
    let a = c.register_node(node("a"), NODE_TTL).await.unwrap();
    c.claim_room(&room("r"), &id("a"), a).await.unwrap();
    let cordon = NodeFlags {
        cordoned: true,
        draining: false,
        updated_ms: 42,
    };
    let drain = NodeFlags {
        cordoned: true,
        draining: true,
        updated_ms: 43,
    };
    c.set_node_flags(&id("a"), cordon).await.unwrap();
    // Flags may name a node that is not registered (yet, or any more).
    c.set_node_flags(&id("away"), drain).await.unwrap();
    let flags = c.node_flags().await.unwrap();
    assert_eq!(flags.len(), 2);
    assert_eq!(flags[&id("a")], cordon);
    assert_eq!(flags[&id("away")], drain);

    let cluster = c.cluster().await.unwrap();
    assert_eq!(cluster.nodes, vec![node("a")]);
    assert_eq!(cluster.origins, vec![(room("r"), id("a"))]);
    assert_eq!(cluster.flags, flags);

    c.revoke(a).await.unwrap();
    assert_eq!(c.node_flags().await.unwrap()[&id("a")], cordon);
    // Clearing both flags removes the entry.
    c.set_node_flags(&id("a"), NodeFlags::default())
        .await
        .unwrap();
    let flags = c.node_flags().await.unwrap();
    assert_eq!(flags.keys().collect::<Vec<_>>(), [&id("away")]);
    c.set_node_flags(&id("away"), NodeFlags::default())
        .await
        .unwrap();
    assert!(c.cluster().await.unwrap().flags.is_empty());
}

/// Config values: versions count from 1, a write at a stale version changes
/// nothing (all or none of a multi-key write), history is newest first, the
/// revision grows with every change and `next_config` wakes on it.
pub async fn config_is_versioned_and_atomic(c: &dyn Coordinator) {
    use weir_protocol::coordinator::ConfigWrite;
    let w = |key: &str, value: &str, expected_version: u64| ConfigWrite {
        key: key.into(),
        value: value.into(),
        expected_version,
    };
    let empty = c.config().await.unwrap();
    assert!(empty.values.is_empty());
    assert_eq!(empty.revision, 0);

    let one = c.set_config(&[w("a.x", "1", 0)], "alice").await.unwrap();
    assert!(one.revision > 0);
    let v = &one.values["a.x"];
    assert_eq!(
        (v.value.as_str(), v.version, v.updated_by.as_str()),
        ("1", 1, "alice")
    );
    assert!(v.updated_ms > 0);
    assert_eq!(c.config().await.unwrap(), one);

    // A stale version: nothing is written, not even the other, fresh key.
    let err = c
        .set_config(&[w("b.y", "x", 0), w("a.x", "2", 0)], "bob")
        .await
        .unwrap_err();
    assert!(matches!(err, CoordError::Conflict(_)), "{err}");
    assert_eq!(c.config().await.unwrap(), one);

    // The watch: a waiter behind the current revision returns at once; one
    // at it wakes on the next change.
    assert_eq!(c.next_config(0).await.unwrap(), one);
    let waiter = c.next_config(one.revision);
    let writer = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.set_config(&[w("a.x", "2", 1), w("b.y", "yes", 0)], "bob")
            .await
            .unwrap()
    };
    let (seen, two) = tokio::join!(
        async {
            tokio::time::timeout(Duration::from_secs(10), waiter)
                .await
                .expect("next_config did not wake on a change")
                .unwrap()
        },
        writer
    );
    assert!(two.revision > one.revision);
    assert_eq!(seen, two);
    assert_eq!(two.values["a.x"].version, 2);
    assert_eq!(two.values["b.y"].version, 1);

    for i in 3..=5u64 {
        c.set_config(&[w("a.x", &i.to_string(), i - 1)], "carol")
            .await
            .unwrap();
    }
    let history = c.config_history("a.x", 3).await.unwrap();
    let values: Vec<(&str, u64)> = history
        .iter()
        .map(|v| (v.value.as_str(), v.version))
        .collect();
    assert_eq!(values, [("5", 5), ("4", 4), ("3", 3)]);
    assert_eq!(c.config_history("a.x", 100).await.unwrap().len(), 5);
    assert!(c.config_history("never.set", 10).await.unwrap().is_empty());
    // A key is never confused with another that it prefixes.
    c.set_config(&[w("a.xy", "z", 0)], "dave").await.unwrap();
    assert_eq!(c.config_history("a.x", 100).await.unwrap().len(), 5);
}

/// `cluster_view` shows what `cluster` shows: at once for this process's own
/// flag writes, and within moments for membership changes.
pub async fn cluster_view_follows_the_cluster(c: &dyn Coordinator) {
    use weir_protocol::coordinator::NodeFlags;
    let view = c.cluster_view().await.unwrap();
    assert!(view.nodes.is_empty() && view.origins.is_empty() && view.flags.is_empty());
    let a = c.register_node(node("a"), NODE_TTL).await.unwrap();
    c.claim_room(&room("r"), &id("a"), a).await.unwrap();
    // Eventually (a watch-fed copy may lag a little behind a register).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view = c.cluster_view().await.unwrap();
        if view.nodes == vec![node("a")] && view.origins == vec![(room("r"), id("a"))] {
            break;
        }
        assert!(Instant::now() < deadline, "view never showed a: {view:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Own flag writes: visible on the very next read.
    for i in 0..5u64 {
        let flags = NodeFlags {
            cordoned: true,
            draining: i % 2 == 1,
            updated_ms: i,
        };
        c.set_node_flags(&id("a"), flags).await.unwrap();
        assert_eq!(c.cluster_view().await.unwrap().flags[&id("a")], flags);
    }
    c.set_node_flags(&id("a"), NodeFlags::default())
        .await
        .unwrap();
    assert!(c.cluster_view().await.unwrap().flags.is_empty());
    c.revoke(a).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.cluster_view().await.unwrap().nodes.is_empty() {
        assert!(Instant::now() < deadline, "revoked node still in the view");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(c.cluster().await.unwrap().origins.is_empty());
}

/// CDN health is stored per name, replaced on every put, listed by name.
pub async fn cdn_health_is_stored_per_name(c: &dyn Coordinator) {
    assert!(c.cdn_health().await.unwrap().is_empty());
    let health = |name: &str, state, failures| CdnHealth {
        name: name.into(),
        state,
        consecutive_failures: failures,
        changed_ms: 1,
        probed_ms: 2,
        last_error: String::new(),
    };
    c.put_cdn_health(&health("b", BreakerState::Closed, 0))
        .await
        .unwrap();
    c.put_cdn_health(&health("a", BreakerState::Closed, 1))
        .await
        .unwrap();
    c.put_cdn_health(&health("a", BreakerState::Open, 3))
        .await
        .unwrap();
    assert_eq!(
        c.cdn_health().await.unwrap(),
        vec![
            health("a", BreakerState::Open, 3),
            health("b", BreakerState::Closed, 0)
        ]
    );
}

async fn edges(c: &dyn Coordinator) -> Vec<(String, String)> {
    c.room_edges()
        .await
        .unwrap()
        .into_iter()
        .map(|(r, n)| (r.as_str().to_owned(), n.as_str().to_owned()))
        .collect()
}

/// Edges (`rooms/{room}/edges/{node}`) live beside the room's origin, bound
/// to the edge's lease: released one by one, or all at once with the node.
pub async fn edges_follow_their_leases(c: &dyn Coordinator) {
    let a = c.register_node(node("a"), NODE_TTL).await.unwrap();
    let b = c.register_node(node("b"), NODE_TTL).await.unwrap();
    let e = c.register_node(node("e"), NODE_TTL).await.unwrap();
    c.claim_room(&room("r1"), &id("a"), a).await.unwrap();
    c.register_edge(&room("r1"), &id("b"), b).await.unwrap();
    c.register_edge(&room("r1"), &id("e"), e).await.unwrap();
    c.register_edge(&room("r2"), &id("b"), b).await.unwrap();
    // Registering twice changes nothing.
    c.register_edge(&room("r2"), &id("b"), b).await.unwrap();
    assert_eq!(
        edges(c).await,
        pairs(&[("r1", "b"), ("r1", "e"), ("r2", "b")])
    );
    // Edges are not origins.
    assert_eq!(origins(c).await, pairs(&[("r1", "a")]));
    c.release_edge(&room("r2"), &id("b")).await.unwrap();
    c.release_edge(&room("r2"), &id("b")).await.unwrap();
    assert_eq!(edges(c).await, pairs(&[("r1", "b"), ("r1", "e")]));
    c.revoke(b).await.unwrap();
    assert_eq!(edges(c).await, pairs(&[("r1", "e")]));
    assert_eq!(
        c.register_edge(&room("r3"), &id("b"), b).await,
        Err(CoordError::LeaseExpired(b))
    );
    assert_eq!(origins(c).await, pairs(&[("r1", "a")]));
    c.revoke(e).await.unwrap();
    assert!(edges(c).await.is_empty());
    c.revoke(a).await.unwrap();
}
