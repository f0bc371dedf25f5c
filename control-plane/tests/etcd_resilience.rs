//! The etcd coordinator through etcd failures, on real etcd processes:
//! the leader of a 3-member cluster killed with SIGKILL, a single etcd
//! stopped and started again on the same ports and data, and a member that
//! is dead from the start. The coordinator under test is never rebuilt.
#![allow(clippy::unwrap_used)]

#[path = "support/conformance.rs"]
mod conformance;
#[path = "support/etcd.rs"]
mod etcd;

use std::time::{Duration, Instant};

use conformance::{id, node, room};
use etcd::{Etcd, EtcdCluster};
use weir_control_plane::{EtcdConfig, EtcdCoordinator};
use weir_protocol::coordinator::{CoordError, Coordinator};

/// Generous: a leader election takes ~1-3 s here, CI machines are slower.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(20);

/// Index (into `endpoints`) of the member that is the cluster's leader, from
/// each member's own status.
async fn leader_index(endpoints: &[String]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for (i, endpoint) in endpoints.iter().enumerate() {
            let Ok(mut client) = etcd_client::Client::connect([endpoint], None).await else {
                continue;
            };
            if let Ok(status) = client.status().await
                && let Some(header) = status.header()
                && status.leader() != 0
                && header.member_id() == status.leader()
            {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "no member says it is the leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn node_ids(c: &dyn Coordinator) -> Vec<String> {
    c.nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.id.as_str().to_owned())
        .collect()
}

#[tokio::test]
async fn writes_resume_after_the_leader_of_three_is_killed() {
    let mut cluster = EtcdCluster::start(3);
    let endpoints = cluster.endpoints();
    let leader = leader_index(&endpoints).await;
    // The leader first: it is the member the coordinator talks to until the kill.
    let mut ordered = vec![endpoints[leader].clone()];
    ordered.extend(
        endpoints
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != leader)
            .map(|(_, e)| e.clone()),
    );
    let c = EtcdCoordinator::new(EtcdConfig::new(ordered)).unwrap();
    let lease = c
        .register_node(node("a"), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        c.claim_room(&room("before"), &id("a"), lease)
            .await
            .unwrap(),
        id("a")
    );

    cluster.member(leader).kill();
    let killed = Instant::now();
    let mut attempt = 0;
    let recovered = loop {
        attempt += 1;
        let write = async {
            c.keep_alive(lease, node("a")).await?;
            c.claim_room(&room(&format!("after-{attempt}")), &id("a"), lease)
                .await
        }
        .await;
        match write {
            Ok(origin) => {
                assert_eq!(origin, id("a"));
                break killed.elapsed();
            }
            Err(CoordError::Unavailable(_)) => {}
            Err(e) => panic!("unexpected error while the cluster elects a leader: {e}"),
        }
        assert!(
            killed.elapsed() < RECOVERY_DEADLINE,
            "writes did not resume within {RECOVERY_DEADLINE:?} of killing the leader; logs:\n{}",
            cluster.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("writes resumed {recovered:?} after the leader was killed ({attempt} tries)");

    // With one member of three dead (and first in the coordinator's list),
    // every call succeeds: the dead endpoint costs no share of failures.
    for i in 0..30 {
        c.keep_alive(lease, node("a")).await.unwrap();
        assert_eq!(node_ids(&c).await, ["a"]);
        let r = room(&format!("steady-{i}"));
        assert_eq!(c.claim_room(&r, &id("a"), lease).await.unwrap(), id("a"));
        c.release_room(&r, &id("a")).await.unwrap();
    }
    // The lease, and the claim made before the kill, survived the election.
    let origins = c.room_origins().await.unwrap();
    assert!(origins.contains(&(room("before"), id("a"))), "{origins:?}");
    let b = c
        .register_node(node("b"), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(node_ids(&c).await, ["a", "b"]);
    c.revoke(b).await.unwrap();
    c.revoke(lease).await.unwrap();
    assert!(c.nodes().await.unwrap().is_empty());
}

#[tokio::test]
async fn reconnects_after_etcd_restarts() {
    let mut etcd = Etcd::start();
    let c = EtcdCoordinator::new(EtcdConfig::new(vec![etcd.endpoint()])).unwrap();
    let lease = c
        .register_node(node("a"), Duration::from_secs(30))
        .await
        .unwrap();
    c.claim_room(&room("r"), &id("a"), lease).await.unwrap();

    etcd.kill();
    // While etcd is down calls fail as unavailable, within their budget;
    // the lease is not reported expired (the agent would re-register).
    for _ in 0..2 {
        let started = Instant::now();
        let err = c.nodes().await.unwrap_err();
        assert!(matches!(err, CoordError::Unavailable(_)), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let err = c.keep_alive(lease, node("a")).await.unwrap_err();
        assert!(matches!(err, CoordError::Unavailable(_)), "{err}");
    }

    etcd.restart();
    etcd.wait_healthy(etcd::START_TIMEOUT).unwrap();
    let healthy = Instant::now();
    loop {
        match c.nodes().await {
            Ok(nodes) => {
                assert_eq!(nodes, vec![node("a")]);
                break;
            }
            Err(e) => assert!(
                healthy.elapsed() < RECOVERY_DEADLINE,
                "the coordinator did not reconnect within {RECOVERY_DEADLINE:?} of etcd being healthy again: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "the same coordinator answered {:?} after etcd was healthy again",
        healthy.elapsed()
    );
    // etcd keeps leases across a restart (and extends them): the node's
    // lease and its claim are still there.
    c.keep_alive(lease, node("a")).await.unwrap();
    assert_eq!(c.room_origins().await.unwrap(), vec![(room("r"), id("a"))]);
    let b = c
        .register_node(node("b"), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        c.claim_room(&room("r"), &id("b"), b).await.unwrap(),
        id("a")
    );
    c.revoke(lease).await.unwrap();
    assert_eq!(
        c.claim_room(&room("r"), &id("b"), b).await.unwrap(),
        id("b")
    );
    c.revoke(b).await.unwrap();
}

#[tokio::test]
async fn a_dead_endpoint_in_the_list_costs_no_failures() {
    let etcd = Etcd::start();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    // The dead endpoint first, so the first call meets it.
    let c = EtcdCoordinator::new(EtcdConfig::new(vec![dead, etcd.endpoint()])).unwrap();
    let started = Instant::now();
    let lease = c
        .register_node(node("a"), Duration::from_secs(10))
        .await
        .unwrap();
    eprintln!(
        "first call with a dead first endpoint took {:?}",
        started.elapsed()
    );
    for i in 0..50 {
        c.keep_alive(lease, node("a")).await.unwrap();
        assert_eq!(node_ids(&c).await, ["a"]);
        let r = room(&format!("r{i}"));
        assert_eq!(c.claim_room(&r, &id("a"), lease).await.unwrap(), id("a"));
    }
    c.revoke(lease).await.unwrap();
}

#[test]
fn a_missing_etcd_fails_loudly_with_a_remedy() {
    let missing = [std::path::PathBuf::from("/nonexistent/etcd")];
    let msg = etcd::find_etcd(None, &missing).unwrap_err();
    assert!(msg.contains("needs a real etcd"), "{msg}");
    assert!(msg.contains("etcd-server"), "{msg}");
    let msg = etcd::find_etcd(Some("/nonexistent/etcd".into()), &missing).unwrap_err();
    assert!(msg.contains("WEIR_ETCD_BIN"), "{msg}");
}
