//! Leader election on both backends: the in-process coordinator and a real
//! etcd. One candidate leads at a time; a resigning leader hands over at
//! once; a leader that dies (its task gone, its lease left to expire) is
//! replaced within the lease's TTL.
#![allow(clippy::unwrap_used)]

#[path = "support/etcd.rs"]
mod etcd;

use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_control_plane::election::{Candidacy, ElectionBackend, campaign};

const TTL: Duration = Duration::from_secs(2);
/// Generous: lease expiry is checked every 500 ms by etcd, CI is slow.
const TAKEOVER: Duration = Duration::from_secs(12);

async fn wait_leader(c: &mut Candidacy, within: Duration) -> Duration {
    let started = Instant::now();
    tokio::time::timeout(within, c.elected())
        .await
        .unwrap_or_else(|_| panic!("{} not elected within {within:?}", c.candidate()));
    started.elapsed()
}

async fn one_leader_then_handover(backend: Arc<dyn ElectionBackend>) {
    let mut a = campaign(backend.clone(), "relay", "a", TTL);
    wait_leader(&mut a, TAKEOVER).await;
    let mut b = campaign(backend.clone(), "relay", "b", TTL);
    // b sees a as the leader and does not lead.
    let deadline = Instant::now() + TAKEOVER;
    while b.leader().as_deref() != Some("a") {
        assert!(Instant::now() < deadline, "b never saw a lead");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!b.is_leader());
    assert!(a.is_leader());
    assert_eq!(backend.leader("relay").await.unwrap().as_deref(), Some("a"));
    // Another name is another election.
    let mut other = campaign(backend.clone(), "prober", "b", TTL);
    wait_leader(&mut other, TAKEOVER).await;

    // a resigns: b takes over well before a's lease could have expired.
    a.resign().await;
    let took = wait_leader(&mut b, TAKEOVER).await;
    assert!(took < TTL, "handover after resign took {took:?}");
    assert_eq!(backend.leader("relay").await.unwrap().as_deref(), Some("b"));

    // b dies without resigning (dropped: its lease is left to expire); c
    // takes over within the TTL plus slack, never before b's lease is gone.
    let mut c = campaign(backend.clone(), "relay", "c", TTL);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!c.is_leader());
    drop(b);
    let took = wait_leader(&mut c, TAKEOVER).await;
    eprintln!("leader died: successor elected after {took:?}");
    assert_eq!(backend.leader("relay").await.unwrap().as_deref(), Some("c"));
    c.resign().await;
    other.resign().await;
    assert_eq!(backend.leader("relay").await.unwrap(), None);
}

#[tokio::test]
async fn local_election() {
    one_leader_then_handover(Arc::new(weir_control_plane::LocalCoordinator::new())).await;
}

#[tokio::test]
async fn etcd_election() {
    let server = etcd::Etcd::start();
    let config = weir_control_plane::EtcdConfig::new(vec![server.endpoint()]);
    let coordinator = weir_control_plane::EtcdCoordinator::new(config).unwrap();
    one_leader_then_handover(Arc::new(coordinator)).await;
}

/// A leader whose etcd goes away steps down by itself within its TTL, so it
/// never believes it leads while another might.
#[tokio::test]
async fn a_leader_cut_off_from_etcd_steps_down() {
    let mut server = etcd::Etcd::start();
    let config = weir_control_plane::EtcdConfig::new(vec![server.endpoint()]);
    let backend = Arc::new(weir_control_plane::EtcdCoordinator::new(config).unwrap());
    let mut a = campaign(backend, "relay", "a", TTL);
    wait_leader(&mut a, TAKEOVER).await;
    server.kill();
    let killed = Instant::now();
    let mut changes = a.changes();
    tokio::time::timeout(TAKEOVER, changes.wait_for(|s| !s.is_leader))
        .await
        .expect("the cut-off leader did not step down")
        .unwrap();
    let took = killed.elapsed();
    eprintln!("stepped down {took:?} after etcd died");
    // Before its lease could expire (plus slack for slow machines).
    assert!(took < TTL + Duration::from_secs(1), "{took:?}");
}
