//! Rollout weights and CDN endpoints through the real API on a real port
//! (in-process coordinator): `SetRollout` validation, what `GetRollout`
//! reports, assignments that follow the weights (canary share, blue-green
//! flip) and stay put per viewer id, `weir ctl rollout`, and HLS endpoints on
//! the configured CDNs after the WHEP ones, a CDN with an open breaker last.
#![allow(clippy::unwrap_used)]

#[path = "support/serve.rs"]
mod serve;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use tonic::Code;
use weir_control_plane::ctl::{self, CdnsCommand, CtlArgs, CtlCommand, RolloutCommand};
use weir_control_plane::{ControlConfig, ControlState, LocalCoordinator, TokenIssuer};
use weir_protocol::coordinator::{BreakerState, CdnHealth, Coordinator, NodeInfo, NodeLoad};
use weir_protocol::pb;
use weir_protocol::pb::config_client::ConfigClient;
use weir_protocol::pb::rollout_client::RolloutClient;
use weir_protocol::pb::scheduler_client::SchedulerClient;
use weir_protocol::{NodeId, TokenSigner};

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn node(id: &str, version: &str) -> NodeInfo {
    NodeInfo {
        id: NodeId::parse(id).unwrap(),
        region: "eu".into(),
        zone: "a".into(),
        http_url: format!("http://{id}.test:8080"),
        relay_addr: None,
        version: version.into(),
        capacity: 1000,
        draining: false,
        load: NodeLoad {
            reported_at_ms: now_ms(),
            sessions: 0,
            egress_bps: 0,
            rooms: Vec::new(),
        },
    }
}

struct Server {
    addr: SocketAddr,
    coordinator: Arc<LocalCoordinator>,
    _stop: oneshot::Sender<()>,
}

impl Server {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn ctl(&self, command: CtlCommand, json: bool) -> ctl::Outcome {
        ctl::execute(CtlArgs {
            control: self.url(),
            json,
            command,
        })
        .await
    }

    /// Keeps the nodes' reports fresh (they live 60 s, reports must be < 3 s old).
    async fn refresh(&self, nodes: &[NodeInfo]) {
        for n in nodes {
            let mut n = n.clone();
            n.load.reported_at_ms = now_ms();
            self.coordinator
                .register_node(n, Duration::from_secs(60))
                .await
                .unwrap();
        }
    }
}

async fn start(nodes: &[NodeInfo]) -> Server {
    let coordinator = Arc::new(LocalCoordinator::new());
    let state = ControlState::new(
        coordinator.clone(),
        TokenIssuer::new(TokenSigner::generate()),
        ControlConfig::default(),
    )
    .unwrap();
    let (addr, stop) = serve::spawn(state).await;
    let server = Server {
        addr,
        coordinator,
        _stop: stop,
    };
    server.refresh(nodes).await;
    server
}

fn weights(pairs: &[(&str, u32)]) -> Vec<pb::VersionWeight> {
    pairs
        .iter()
        .map(|(v, w)| pb::VersionWeight {
            version: (*v).to_owned(),
            weight: *w,
        })
        .collect()
}

fn set(pairs: &[(&str, u32)]) -> pb::SetRolloutRequest {
    pb::SetRolloutRequest {
        weights: weights(pairs),
        updated_by: "test".into(),
        expected_version: None,
    }
}

fn ask(viewer: &str) -> pb::AssignViewerRequest {
    pb::AssignViewerRequest {
        room: "lobby".into(),
        region: String::new(),
        viewer_id: viewer.into(),
    }
}

/// The first node's version for `n` viewers with ids `viewer-{i}`.
async fn first_versions(
    scheduler: &mut SchedulerClient<tonic::transport::Channel>,
    n: usize,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let a = scheduler
            .assign_viewer(ask(&format!("viewer-{i}")))
            .await
            .unwrap()
            .into_inner();
        let version = match a.endpoints[0].node_id.as_str() {
            id if id.starts_with("old") => "v1",
            id if id.starts_with("new") => "v2",
            other => panic!("unexpected node {other}"),
        };
        *counts.entry(version.to_owned()).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn rollout_weights_are_validated_reported_and_followed() {
    let nodes = [
        node("old-1", "v1"),
        node("old-2", "v1"),
        node("new-1", "v2"),
    ];
    let server = start(&nodes).await;
    let channel = server.channel().await;
    let mut rollout = RolloutClient::new(channel.clone());
    let mut scheduler = SchedulerClient::new(channel.clone());

    // Nothing set: every version alike, shares by schedulable nodes.
    let state = rollout
        .get_rollout(pb::GetRolloutRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(state.weights.is_empty());
    assert_eq!(state.version, 0);
    let shares: Vec<(String, u32, f64)> = state
        .versions
        .iter()
        .map(|v| (v.version.clone(), v.schedulable_nodes, v.share))
        .collect();
    assert_eq!(
        shares,
        [("v1".into(), 2, 2.0 / 3.0), ("v2".into(), 1, 1.0 / 3.0)]
    );

    // Bad weights are refused, naming what is wrong, and change nothing.
    for (bad, want) in [
        (set(&[("v1", 0), ("v2", 0)]), "at least one weight"),
        (set(&[("v 1", 5)]), "not a version label"),
        (set(&[("v1", 5), ("v1", 6)]), "given twice"),
        (set(&[("v1", 1_000_001)]), "whole number from 0 to 1000000"),
    ] {
        let status = rollout.set_rollout(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(want), "{}", status.message());
    }
    assert_eq!(
        rollout
            .get_rollout(pb::GetRolloutRequest {})
            .await
            .unwrap()
            .into_inner()
            .version,
        0
    );

    // A 90/10 canary: shares reported, and 1000 hashed viewers split near it.
    let state = rollout
        .set_rollout(set(&[("v1", 90), ("v2", 10)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.version, 1);
    assert_eq!(state.updated_by, "test");
    let shares: Vec<(String, u32, f64)> = state
        .versions
        .iter()
        .map(|v| (v.version.clone(), v.weight, v.share))
        .collect();
    assert_eq!(shares, [("v1".into(), 90, 0.9), ("v2".into(), 10, 0.1)]);
    server.refresh(&nodes).await;
    let counts = first_versions(&mut scheduler, 1000).await;
    assert!((60..=140).contains(&counts["v2"]), "{counts:?}");
    // The same viewer lands on the same node every time.
    let again = |a: pb::Assignment| a.endpoints[0].node_id.clone();
    let first = again(
        scheduler
            .assign_viewer(ask("viewer-42"))
            .await
            .unwrap()
            .into_inner(),
    );
    for _ in 0..5 {
        let next = again(
            scheduler
                .assign_viewer(ask("viewer-42"))
                .await
                .unwrap()
                .into_inner(),
        );
        assert_eq!(next, first);
    }

    // Blue-green: everything to v2, then the flip back; the config history
    // keeps every step.
    rollout
        .set_rollout(set(&[("v1", 0), ("v2", 100)]))
        .await
        .unwrap();
    server.refresh(&nodes).await;
    assert_eq!(
        first_versions(&mut scheduler, 200).await.get("v2"),
        Some(&200)
    );
    // Weight 0 leaves v1 out of the answer altogether.
    let a = scheduler
        .assign_viewer(ask("x"))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = a.endpoints.iter().map(|e| e.node_id.as_str()).collect();
    assert_eq!(ids, ["new-1"]);
    // A compare-and-set on a stale version is refused.
    let mut stale = set(&[("v1", 100)]);
    stale.expected_version = Some(1);
    assert_eq!(
        rollout.set_rollout(stale).await.unwrap_err().code(),
        Code::Aborted
    );
    let mut flip = set(&[("v1", 100), ("v2", 0)]);
    flip.expected_version = Some(2);
    rollout.set_rollout(flip).await.unwrap();
    server.refresh(&nodes).await;
    assert_eq!(
        first_versions(&mut scheduler, 200).await.get("v1"),
        Some(&200)
    );
    let history = ConfigClient::new(channel.clone())
        .config_history(pb::ConfigHistoryRequest {
            key: "rollout.weights".into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let values: Vec<&str> = history.entries.iter().map(|e| e.value.as_str()).collect();
    assert_eq!(values, ["v1=100,v2=0", "v1=0,v2=100", "v1=90,v2=10"]);

    // Clearing: no weights, every version alike again.
    let cleared = rollout.set_rollout(set(&[])).await.unwrap().into_inner();
    assert!(cleared.weights.is_empty());
    server.refresh(&nodes).await;
    // (The nodes are equally loaded: viewers spread over both versions.)
    assert_eq!(
        first_versions(&mut scheduler, 30).await.len(),
        2,
        "equally loaded nodes share the first viewers"
    );

    // The same through `weir ctl rollout`.
    let out = server
        .ctl(
            CtlCommand::Rollout {
                command: RolloutCommand::Set {
                    weights: vec!["v1=75,v2=25".into()],
                    by: "ops".into(),
                    expect_version: None,
                },
            },
            false,
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("v1       75      75.0%"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("weights: v1=75,v2=25"),
        "{}",
        out.stdout
    );
    let out = server
        .ctl(
            CtlCommand::Rollout {
                command: RolloutCommand::Get,
            },
            true,
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json["weights"]["v2"], 25);
    assert_eq!(json["updated_by"], "ops");
    let bad = server
        .ctl(
            CtlCommand::Rollout {
                command: RolloutCommand::Set {
                    weights: vec!["v1=0".into()],
                    by: "ops".into(),
                    expect_version: None,
                },
            },
            false,
        )
        .await;
    assert_eq!(bad.code, ctl::EXIT_USAGE, "{bad:?}");
    assert!(bad.stderr.contains("at least one weight"), "{}", bad.stderr);
    let bad = server
        .ctl(
            CtlCommand::Rollout {
                command: RolloutCommand::Set {
                    weights: vec!["v1=-5".into()],
                    by: "ops".into(),
                    expect_version: None,
                },
            },
            false,
        )
        .await;
    assert_eq!(bad.code, ctl::EXIT_USAGE, "{bad:?}");
}

#[tokio::test]
async fn cdns_follow_the_whep_endpoints_and_failing_ones_go_last() {
    let nodes = [node("n1", "v1")];
    let server = start(&nodes).await;
    let channel = server.channel().await;
    let mut config = ConfigClient::new(channel.clone());
    let mut scheduler = SchedulerClient::new(channel.clone());

    let cdns = serde_json::json!([
        {"name": "cdn-a", "url": "https://a.example/hls/{room}/master.m3u8", "weight": 1, "probe": "http://127.0.0.1:9/healthz"},
        {"name": "cdn-b", "url": "https://b.example/live/{room}.m3u8", "weight": 1, "probe": "http://127.0.0.1:9/healthz"},
    ]);
    let set = |value: String| pb::SetConfigRequest {
        changes: vec![pb::ConfigChange {
            key: "cdn.endpoints".into(),
            value,
            expected_version: None,
        }],
        updated_by: "test".into(),
    };
    // A bad list is refused with the reason.
    let status = config
        .set_config(set(
            r#"[{"name":"a","url":"https://a/x","probe":"http://a/"}]"#.into(),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("{room}"), "{}", status.message());
    config.set_config(set(cdns.to_string())).await.unwrap();

    let hls = |a: &pb::Assignment| -> Vec<(String, String)> {
        a.endpoints
            .iter()
            .filter(|e| e.kind == pb::EndpointKind::Hls as i32)
            .map(|e| (e.cdn.clone(), e.url.clone()))
            .collect()
    };
    let a = scheduler
        .assign_viewer(ask("v"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.endpoints[0].kind, pb::EndpointKind::Whep as i32);
    assert_eq!(a.endpoints[0].node_id, "n1");
    assert!(a.endpoints[0].cdn.is_empty());
    let mut got = hls(&a);
    got.sort();
    assert_eq!(
        got,
        [
            (
                "cdn-a".to_owned(),
                "https://a.example/hls/lobby/master.m3u8".to_owned()
            ),
            (
                "cdn-b".to_owned(),
                "https://b.example/live/lobby.m3u8".to_owned()
            )
        ]
    );
    // Equal weights: viewers are spread over both CDNs.
    let mut firsts = BTreeMap::<String, usize>::new();
    for i in 0..200 {
        let a = scheduler
            .assign_viewer(ask(&format!("viewer-{i}")))
            .await
            .unwrap()
            .into_inner();
        *firsts.entry(hls(&a)[0].0.clone()).or_default() += 1;
    }
    assert!(firsts.values().all(|n| *n >= 60), "{firsts:?}");

    // The prober (here: the test in its place) opens cdn-a's breaker: every
    // replica reads it and cdn-a goes last for every viewer.
    server
        .coordinator
        .put_cdn_health(&CdnHealth {
            name: "cdn-a".into(),
            state: BreakerState::Open,
            consecutive_failures: 3,
            changed_ms: now_ms(),
            probed_ms: now_ms(),
            last_error: "connection refused".into(),
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        server.refresh(&nodes).await;
        let lasts: Vec<String> = {
            let mut v = Vec::new();
            for i in 0..20 {
                let a = scheduler
                    .assign_viewer(ask(&format!("viewer-{i}")))
                    .await
                    .unwrap()
                    .into_inner();
                v.push(hls(&a).last().unwrap().0.clone());
            }
            v
        };
        if lasts.iter().all(|n| n == "cdn-a") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cdn-a never went last: {lasts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = server
        .ctl(
            CtlCommand::Cdns {
                command: CdnsCommand::List,
            },
            true,
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json["cdns"][0]["name"], "cdn-a");
    assert_eq!(json["cdns"][0]["state"], "open");
    assert_eq!(json["cdns"][0]["last_error"], "connection refused");
    assert_eq!(json["cdns"][1]["state"], "unknown");
}
