//! `AssignViewer` throughput and latency against one control-plane replica
//! on a real etcd with many nodes and rooms registered (bench/RESULTS.md,
//! "Control plane (issue 5)").
//!
//! It starts a single-member etcd (Debian's etcd-server, on free loopback
//! ports), registers `--nodes` nodes whose leases and load reports are
//! refreshed every second (as agents do) and `--rooms` room origins spread
//! over them, serves one control plane in this process on a loopback port,
//! and drives `AssignViewer` over gRPC from `--concurrency` concurrent
//! callers (on 8 HTTP/2 connections) for `--seconds`, after a warm-up.
//! Viewers ask for rooms that are live on some node, so every answer is a
//! real placement. `--direct` switches the watch-fed cluster mirror off
//! (every assignment then reads every key from etcd), for comparison.
//!
//! Everything shares the machine: etcd, the agents' refreshes, the server
//! and the callers. Run it in release:
//! `cargo run --release -p weir-control-plane --example assign_bench -- --seconds 10`
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/etcd.rs"]
mod etcd;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use weir_control_plane::{ControlConfig, ControlState, EtcdConfig, EtcdCoordinator, TokenIssuer};
use weir_protocol::coordinator::{
    ClusterState, CoordError, Coordinator, LeaseId, NodeInfo, NodeLoad, RoomLoad,
};
use weir_protocol::pb;
use weir_protocol::{NodeId, RoomId, TokenSigner};

struct Args {
    nodes: usize,
    rooms: usize,
    concurrency: usize,
    seconds: u64,
    direct: bool,
}

fn args() -> Args {
    let mut a = Args {
        nodes: 100,
        rooms: 10_000,
        concurrency: 64,
        seconds: 10,
        direct: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().and_then(|v| v.parse().ok()).expect("a number");
        match flag.as_str() {
            "--nodes" => a.nodes = value(),
            "--rooms" => a.rooms = value(),
            "--concurrency" => a.concurrency = value(),
            "--seconds" => a.seconds = value() as u64,
            "--direct" => a.direct = true,
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn node_info(i: usize, rooms: &[RoomId]) -> NodeInfo {
    NodeInfo {
        id: NodeId::parse(&format!("node-{i:03}")).unwrap(),
        region: ["eu", "us", "ap"][i % 3].into(),
        zone: "a".into(),
        http_url: format!("http://10.0.{}.{}:8080", i / 250, i % 250),
        relay_addr: None,
        version: "bench".into(),
        capacity: 100_000,
        draining: false,
        load: NodeLoad {
            reported_at_ms: now_ms(),
            sessions: (i * 37 % 500) as u32,
            egress_bps: 0,
            rooms: rooms
                .iter()
                .map(|r| RoomLoad {
                    room: r.clone(),
                    live: true,
                    subscribers: 10,
                })
                .collect(),
        },
    }
}

/// The etcd coordinator with its mirror bypassed (`--direct`).
struct Direct(EtcdCoordinator);

#[async_trait]
impl Coordinator for Direct {
    async fn register_node(&self, info: NodeInfo, ttl: Duration) -> Result<LeaseId, CoordError> {
        self.0.register_node(info, ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId, info: NodeInfo) -> Result<(), CoordError> {
        self.0.keep_alive(lease, info).await
    }
    async fn revoke(&self, lease: LeaseId) -> Result<(), CoordError> {
        self.0.revoke(lease).await
    }
    async fn nodes(&self) -> Result<Vec<NodeInfo>, CoordError> {
        self.0.nodes().await
    }
    async fn claim_room(
        &self,
        room: &RoomId,
        node: &NodeId,
        lease: LeaseId,
    ) -> Result<NodeId, CoordError> {
        self.0.claim_room(room, node, lease).await
    }
    async fn release_room(&self, room: &RoomId, node: &NodeId) -> Result<(), CoordError> {
        self.0.release_room(room, node).await
    }
    async fn room_origins(&self) -> Result<Vec<(RoomId, NodeId)>, CoordError> {
        self.0.room_origins().await
    }
    async fn cluster(&self) -> Result<ClusterState, CoordError> {
        self.0.cluster().await
    }
}

#[tokio::main]
async fn main() {
    let a = args();
    let server = etcd::Etcd::start();
    let endpoint = server.endpoint();
    eprintln!("etcd at {endpoint}");

    // The agents: register, claim, refresh every second.
    let agents = Arc::new(EtcdCoordinator::new(EtcdConfig::new(vec![endpoint.clone()])).unwrap());
    let rooms: Vec<RoomId> = (0..a.rooms)
        .map(|i| RoomId::parse(&format!("room-{i:05}")).unwrap())
        .collect();
    let per_node: Vec<Vec<RoomId>> = (0..a.nodes)
        .map(|n| rooms.iter().skip(n).step_by(a.nodes).cloned().collect())
        .collect();
    let started = Instant::now();
    let mut leases = Vec::new();
    for (i, node_rooms) in per_node.iter().enumerate() {
        let lease = agents
            .register_node(node_info(i, node_rooms), Duration::from_secs(30))
            .await
            .unwrap();
        leases.push(lease);
    }
    let claims: Vec<_> = per_node
        .iter()
        .enumerate()
        .map(|(i, node_rooms)| {
            let agents = Arc::clone(&agents);
            let node = NodeId::parse(&format!("node-{i:03}")).unwrap();
            let lease = leases[i];
            let node_rooms = node_rooms.clone();
            tokio::spawn(async move {
                for r in &node_rooms {
                    agents.claim_room(r, &node, lease).await.unwrap();
                }
            })
        })
        .collect();
    for c in claims {
        c.await.unwrap();
    }
    eprintln!(
        "registered {} nodes and {} room origins in {:?}",
        a.nodes,
        a.rooms,
        started.elapsed()
    );
    let stop = Arc::new(AtomicBool::new(false));
    {
        let per_node = per_node.clone();
        // One agent per node, each on its own 1 s tick, as real nodes do.
        for (i, node_rooms) in per_node.into_iter().enumerate() {
            let (agents, stop, lease) = (Arc::clone(&agents), Arc::clone(&stop), leases[i]);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let _ = agents.keep_alive(lease, node_info(i, &node_rooms)).await;
                }
            });
        }
    }

    // One control-plane replica.
    let coordinator: Arc<dyn Coordinator> = if a.direct {
        Arc::new(Direct(
            EtcdCoordinator::new(EtcdConfig::new(vec![endpoint.clone()])).unwrap(),
        ))
    } else {
        Arc::new(EtcdCoordinator::new(EtcdConfig::new(vec![endpoint.clone()])).unwrap())
    };
    let state = ControlState::new(
        coordinator,
        TokenIssuer::new(TokenSigner::generate()),
        ControlConfig::default(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(weir_control_plane::serve(
        listener,
        state,
        Arc::new(String::new),
        std::future::pending(),
    ));

    let channels: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(
                tonic::transport::Endpoint::from_shared(url.clone())
                    .unwrap()
                    .connect()
                    .await
                    .unwrap(),
            );
        }
        v
    };
    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    // Answers from the last view (the coordinator did not answer in time).
    let degraded = Arc::new(AtomicU64::new(0));
    // Answers not sent to the origin (its load report looked stale).
    let stale = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..a.concurrency)
        .map(|i| {
            let mut client = pb::scheduler_client::SchedulerClient::new(channels[i % 8].clone());
            let (measuring, done, errors, degraded, stale) = (
                Arc::clone(&measuring),
                Arc::clone(&done),
                Arc::clone(&errors),
                Arc::clone(&degraded),
                Arc::clone(&stale),
            );
            let n_rooms = a.rooms as u64;
            tokio::spawn(async move {
                let mut histogram = hdrhistogram::Histogram::<u64>::new(3).unwrap();
                let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1);
                while !done.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let room = format!("room-{:05}", x % n_rooms);
                    // Only calls that start inside the window count.
                    let counted = measuring.load(Ordering::Relaxed);
                    let t = Instant::now();
                    let r = client
                        .assign_viewer(pb::AssignViewerRequest {
                            room,
                            region: String::new(),
                            viewer_id: String::new(),
                        })
                        .await;
                    let us = t.elapsed().as_micros() as u64;
                    if counted && measuring.load(Ordering::Relaxed) {
                        match r {
                            // A live room: its origin is the one answer.
                            Ok(a) if a.get_ref().endpoints.len() == 1 && !a.get_ref().degraded => {
                                histogram.record(us.max(1)).unwrap();
                            }
                            Ok(a) if a.get_ref().degraded => {
                                degraded.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(_) => {
                                stale.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                histogram
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed();
    done.store(true, Ordering::Relaxed);
    let mut all = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for c in callers {
        all.add(c.await.unwrap()).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "AssignViewer, {} nodes, {} rooms, concurrency {}, {} ({}): {} ok in {:.1} s = {:.0}/s; \
         latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; {} errors, {} degraded, {} not at the origin",
        a.nodes,
        a.rooms,
        a.concurrency,
        if a.direct {
            "direct etcd reads"
        } else {
            "watch-fed mirror"
        },
        std::env::consts::ARCH,
        all.len(),
        elapsed.as_secs_f64(),
        all.len() as f64 / elapsed.as_secs_f64(),
        ms(all.value_at_quantile(0.5)),
        ms(all.value_at_quantile(0.99)),
        ms(all.value_at_quantile(0.999)),
        ms(all.max()),
        errors.load(Ordering::Relaxed),
        degraded.load(Ordering::Relaxed),
        stale.load(Ordering::Relaxed),
    );
}
