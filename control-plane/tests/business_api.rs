//! The business and operator services over a real port: Users, Rooms,
//! Follows (on a SQLite store), Config and Nodes (on the in-process
//! coordinator), publish tokens carrying the stored owner, `weir ctl` for
//! nodes, rooms and config, and gRPC reflection.
#![allow(clippy::unwrap_used)]

#[path = "support/serve.rs"]
mod serve;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use tonic::Code;
use weir_control_plane::ctl::{
    self, ConfigCommand, CtlArgs, CtlCommand, NodesCommand, RoomsCommand,
};
use weir_control_plane::store::Store;
use weir_control_plane::{ControlConfig, ControlState, LocalCoordinator, TokenIssuer};
use weir_protocol::coordinator::{Coordinator, NodeInfo, NodeLoad};
use weir_protocol::pb;
use weir_protocol::pb::config_client::ConfigClient;
use weir_protocol::pb::follows_client::FollowsClient;
use weir_protocol::pb::nodes_client::NodesClient;
use weir_protocol::pb::rooms_client::RoomsClient;
use weir_protocol::pb::scheduler_client::SchedulerClient;
use weir_protocol::pb::users_client::UsersClient;
use weir_protocol::{Mode, NodeId, RoomId, TokenSigner, TokenVerifier};

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn node(id: &str, sessions: u32) -> NodeInfo {
    NodeInfo {
        id: NodeId::parse(id).unwrap(),
        region: "eu".into(),
        zone: "a".into(),
        http_url: format!("http://{id}.test:8080"),
        relay_addr: None,
        version: "test".into(),
        capacity: 10,
        draining: false,
        load: NodeLoad {
            reported_at_ms: now_ms(),
            sessions,
            egress_bps: 0,
            rooms: Vec::new(),
        },
    }
}

struct Server {
    addr: SocketAddr,
    verifier: TokenVerifier,
    coordinator: Arc<LocalCoordinator>,
    _stop: oneshot::Sender<()>,
    dir: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
}

async fn start() -> Server {
    let dir = std::env::temp_dir().join(format!("weir-bizapi-{}", uuid::Uuid::new_v4().simple()));
    let store = Store::connect(
        &weir_control_plane::store::sqlite_url(&dir.join("weir.db")),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let coordinator = Arc::new(LocalCoordinator::new());
    for n in [node("n1", 0), node("n2", 5)] {
        coordinator
            .register_node(n, Duration::from_secs(60))
            .await
            .unwrap();
    }
    let issuer = TokenIssuer::new(TokenSigner::generate());
    let verifier = issuer.verifier();
    let state = ControlState::new(
        coordinator.clone(),
        issuer,
        ControlConfig {
            default_owner: "fallback-owner".into(),
            ..ControlConfig::default()
        },
    )
    .unwrap()
    .with_store(store);
    let (addr, stop) = serve::spawn(state).await;
    Server {
        addr,
        verifier,
        coordinator,
        _stop: stop,
        dir,
    }
}

fn assert_status<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, contains: &str) {
    let status = r.unwrap_err();
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(contains),
        "{:?} does not contain {contains:?}",
        status.message()
    );
}

#[tokio::test]
async fn users_rooms_and_follows_over_grpc() {
    let s = start().await;
    let channel = s.channel().await;
    let mut users = UsersClient::new(channel.clone());
    let mut rooms = RoomsClient::new(channel.clone());
    let mut follows = FollowsClient::new(channel.clone());

    let alice = users
        .create_user(pb::CreateUserRequest {
            id: "alice".into(),
            name: "Alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(alice.id, "alice");
    users
        .create_user(pb::CreateUserRequest {
            id: "bob".into(),
            name: "Bob".into(),
        })
        .await
        .unwrap();
    assert_status(
        users
            .create_user(pb::CreateUserRequest {
                id: "alice".into(),
                name: "Again".into(),
            })
            .await,
        Code::AlreadyExists,
        "alice",
    );
    assert_status(
        users
            .create_user(pb::CreateUserRequest {
                id: "bad id".into(),
                name: "x".into(),
            })
            .await,
        Code::InvalidArgument,
        "invalid id",
    );
    assert_status(
        users
            .create_user(pb::CreateUserRequest {
                id: String::new(),
                name: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "invalid name",
    );
    assert_status(
        users
            .get_user(pb::GetUserRequest {
                id: "nobody".into(),
            })
            .await,
        Code::NotFound,
        "nobody",
    );

    let start = i64::try_from(now_ms()).unwrap() + 60_000;
    let room = rooms
        .create_room(pb::CreateRoomRequest {
            id: "show".into(),
            owner: "alice".into(),
            title: "Alice's show".into(),
            scheduled_start_unix_ms: Some(start),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(room.status, i32::from(pb::RoomStatus::Scheduled));
    assert_eq!(room.scheduled_start_unix_ms, Some(start));
    assert_status(
        rooms
            .create_room(pb::CreateRoomRequest {
                id: "other".into(),
                owner: "ghost".into(),
                title: "t".into(),
                scheduled_start_unix_ms: None,
            })
            .await,
        Code::NotFound,
        "ghost",
    );
    assert_status(
        rooms
            .create_room(pb::CreateRoomRequest {
                id: "other".into(),
                owner: "alice".into(),
                title: " ".into(),
                scheduled_start_unix_ms: None,
            })
            .await,
        Code::InvalidArgument,
        "invalid title",
    );
    assert_status(
        rooms
            .create_room(pb::CreateRoomRequest {
                id: "other".into(),
                owner: "al ice".into(),
                title: "t".into(),
                scheduled_start_unix_ms: None,
            })
            .await,
        Code::InvalidArgument,
        "invalid owner",
    );
    assert_status(
        rooms
            .create_room(pb::CreateRoomRequest {
                id: "other".into(),
                owner: "alice".into(),
                title: "t".into(),
                scheduled_start_unix_ms: Some(-5),
            })
            .await,
        Code::InvalidArgument,
        "scheduled_start",
    );
    // None of the refused creates left a room behind.
    assert_status(
        rooms
            .get_room(pb::GetRoomRequest { id: "other".into() })
            .await,
        Code::NotFound,
        "other",
    );
    let generated = rooms
        .create_room(pb::CreateRoomRequest {
            id: String::new(),
            owner: "bob".into(),
            title: "Bob's".into(),
            scheduled_start_unix_ms: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(generated.id.starts_with("r-"), "{}", generated.id);

    let live = rooms
        .go_live(pb::GetRoomRequest { id: "show".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(live.status, i32::from(pb::RoomStatus::Live));
    let retitled = rooms
        .set_room_title(pb::SetRoomTitleRequest {
            id: "show".into(),
            title: "Live now".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retitled.title, "Live now");
    let listed = rooms
        .list_rooms(pb::RoomQuery {
            owner: String::new(),
            status: pb::RoomStatus::Live.into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.rooms.len(), 1);
    assert_eq!(listed.rooms[0].id, "show");
    assert_status(
        rooms
            .list_rooms(pb::RoomQuery {
                status: 42,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "invalid status",
    );

    follows
        .follow(pb::FollowRequest {
            follower: "bob".into(),
            followee: "alice".into(),
        })
        .await
        .unwrap();
    assert_status(
        follows
            .follow(pb::FollowRequest {
                follower: "bob".into(),
                followee: "alice".into(),
            })
            .await,
        Code::AlreadyExists,
        "bob->alice",
    );
    assert_status(
        follows
            .follow(pb::FollowRequest {
                follower: "bob".into(),
                followee: "bob".into(),
            })
            .await,
        Code::InvalidArgument,
        "invalid followee",
    );
    let page = follows
        .list_followers(pb::FollowQuery {
            user: "alice".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.follows.len(), 1);
    assert_eq!(page.follows[0].follower, "bob");
    follows
        .unfollow(pb::FollowRequest {
            follower: "bob".into(),
            followee: "alice".into(),
        })
        .await
        .unwrap();
    assert_status(
        follows
            .unfollow(pb::FollowRequest {
                follower: "bob".into(),
                followee: "alice".into(),
            })
            .await,
        Code::NotFound,
        "bob->alice",
    );

    // Publish tokens carry the stored owner; unknown rooms the default one;
    // an ended room takes no publisher.
    let mut scheduler = SchedulerClient::new(channel.clone());
    let publish_subject = |room: &str, token: &str| {
        s.verifier
            .authorize(
                token,
                &RoomId::parse(room).unwrap(),
                Mode::Publish,
                now_ms() / 1000,
            )
            .unwrap()
            .sub
    };
    let a = scheduler
        .assign_publisher(pb::AssignPublisherRequest {
            room: "show".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(publish_subject("show", &a.token), "alice");
    let a = scheduler
        .assign_publisher(pb::AssignPublisherRequest {
            room: "adhoc".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(publish_subject("adhoc", &a.token), "fallback-owner");
    rooms
        .end_room(pb::GetRoomRequest { id: "show".into() })
        .await
        .unwrap();
    assert_status(
        scheduler
            .assign_publisher(pb::AssignPublisherRequest {
                room: "show".into(),
            })
            .await,
        Code::FailedPrecondition,
        "ended",
    );
    assert_status(
        rooms
            .go_live(pb::GetRoomRequest { id: "show".into() })
            .await,
        Code::FailedPrecondition,
        "ended",
    );

    // weir ctl rooms show / end.
    let out = s
        .ctl(
            CtlCommand::Rooms {
                command: RoomsCommand::Show {
                    room: "show".into(),
                },
            },
            true,
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        (v["owner"].as_str(), v["status"].as_str()),
        (Some("alice"), Some("ended"))
    );
    let out = s
        .ctl(
            CtlCommand::Rooms {
                command: RoomsCommand::End {
                    room: generated.id.clone(),
                },
            },
            false,
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("ended"), "{out:?}");
    let out = s
        .ctl(
            CtlCommand::Rooms {
                command: RoomsCommand::Show {
                    room: "ghost".into(),
                },
            },
            false,
        )
        .await;
    assert_eq!(out.code, ctl::EXIT_USAGE, "{out:?}");
    assert!(out.stderr.contains("ghost"), "{out:?}");
}

#[tokio::test]
async fn config_is_validated_versioned_and_applied() {
    let s = start().await;
    let mut config = ConfigClient::new(s.channel().await);
    let state = config
        .get_config(pb::GetConfigRequest { keys: vec![] })
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<&str> = state.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "cdn.endpoints",
            "chat.blocked_words",
            "chat.conn_burst",
            "chat.conn_rate",
            "chat.max_lag",
            "chat.max_text_bytes",
            "chat.shed_lag",
            "chat.user_burst",
            "chat.user_rate",
            "rollout.weights",
            "scheduler.max_load_ratio",
            "scheduler.report_max_age_ms",
            "tokens.default_ttl_s"
        ]
    );
    assert!(
        state
            .entries
            .iter()
            .all(|e| e.version == 0 && e.value == e.default_value)
    );

    // A bad value among good ones: refused, naming the key, nothing written.
    let change = |key: &str, value: &str| pb::ConfigChange {
        key: key.into(),
        value: value.into(),
        expected_version: None,
    };
    assert_status(
        config
            .set_config(pb::SetConfigRequest {
                changes: vec![
                    change("tokens.default_ttl_s", "120"),
                    change("scheduler.max_load_ratio", "1.5"),
                ],
                updated_by: "test".into(),
            })
            .await,
        Code::InvalidArgument,
        "scheduler.max_load_ratio",
    );
    assert_status(
        config
            .set_config(pb::SetConfigRequest {
                changes: vec![change("no.such.key", "1")],
                updated_by: "test".into(),
            })
            .await,
        Code::InvalidArgument,
        "unknown config key",
    );
    let unchanged = config
        .get_config(pb::GetConfigRequest { keys: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unchanged.revision, 0);

    let set = config
        .set_config(pb::SetConfigRequest {
            changes: vec![
                change("tokens.default_ttl_s", "120"),
                change("scheduler.max_load_ratio", "0.50"),
            ],
            updated_by: "ops".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let ratio = set
        .entries
        .iter()
        .find(|e| e.key == "scheduler.max_load_ratio")
        .unwrap();
    assert_eq!((ratio.value.as_str(), ratio.version), ("0.5", 1));
    assert_eq!(ratio.updated_by, "ops");

    // Applied without a restart: tokens now live 120 s, and n2 (5 of 10
    // sessions) is full under a 0.5 cap.
    let mut scheduler = SchedulerClient::new(s.channel().await);
    let a = scheduler
        .assign_viewer(pb::AssignViewerRequest {
            room: "r".into(),
            region: String::new(),
            viewer_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let ttl = a.token_expires_unix - i64::try_from(now_ms() / 1000).unwrap();
    assert!((118..=121).contains(&ttl), "ttl {ttl}");
    let nodes: Vec<&str> = a.endpoints.iter().map(|e| e.node_id.as_str()).collect();
    assert_eq!(nodes, ["n1"]);

    // Optimistic concurrency: a stale expected version is ABORTED.
    assert_status(
        config
            .set_config(pb::SetConfigRequest {
                changes: vec![pb::ConfigChange {
                    expected_version: Some(0),
                    ..change("tokens.default_ttl_s", "300")
                }],
                updated_by: "ops".into(),
            })
            .await,
        Code::Aborted,
        "version",
    );

    // weir ctl config set / get / history.
    let out = s
        .ctl(
            CtlCommand::Config {
                command: ConfigCommand::Set {
                    pairs: vec!["tokens.default_ttl_s=600".into()],
                    by: "cli".into(),
                    expect_version: Some(1),
                },
            },
            false,
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("tokens.default_ttl_s  600"),
        "{}",
        out.stdout
    );
    let out = s
        .ctl(
            CtlCommand::Config {
                command: ConfigCommand::Set {
                    pairs: vec!["scheduler.report_max_age_ms=10".into()],
                    by: "cli".into(),
                    expect_version: None,
                },
            },
            false,
        )
        .await;
    assert_eq!(out.code, ctl::EXIT_USAGE, "{out:?}");
    assert!(
        out.stderr.contains("scheduler.report_max_age_ms"),
        "{out:?}"
    );
    let out = s
        .ctl(
            CtlCommand::Config {
                command: ConfigCommand::History {
                    key: "tokens.default_ttl_s".into(),
                    limit: 10,
                },
            },
            true,
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let history: Vec<(String, u64)> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["value"].as_str().unwrap().to_owned(),
                e["version"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(history, [("600".to_owned(), 2), ("120".to_owned(), 1)]);
    let out = s
        .ctl(
            CtlCommand::Config {
                command: ConfigCommand::Get { keys: vec![] },
            },
            true,
        )
        .await;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(v["revision"].as_u64().unwrap() >= 2, "{v}");
}

#[tokio::test]
async fn cordon_drain_and_uncordon_steer_the_scheduler() {
    let s = start().await;
    let mut nodes = NodesClient::new(s.channel().await);
    let mut scheduler = SchedulerClient::new(s.channel().await);
    let viewer_nodes =
        |a: pb::Assignment| -> Vec<String> { a.endpoints.into_iter().map(|e| e.node_id).collect() };
    let ask = pb::AssignViewerRequest {
        room: "lobby".into(),
        region: String::new(),
        viewer_id: String::new(),
    };
    assert_eq!(
        viewer_nodes(
            scheduler
                .assign_viewer(ask.clone())
                .await
                .unwrap()
                .into_inner()
        ),
        ["n1", "n2"]
    );

    let out = s
        .ctl(
            CtlCommand::Nodes {
                command: NodesCommand::Cordon { node: "n1".into() },
            },
            false,
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        viewer_nodes(
            scheduler
                .assign_viewer(ask.clone())
                .await
                .unwrap()
                .into_inner()
        ),
        ["n2"]
    );
    let drained = nodes
        .drain_node(pb::NodeRequest { id: "n2".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(drained.draining && drained.cordoned && !drained.schedulable);
    assert_status(
        scheduler.assign_viewer(ask.clone()).await,
        Code::Unavailable,
        "no media node",
    );

    let out = s
        .ctl(
            CtlCommand::Nodes {
                command: NodesCommand::List,
            },
            false,
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("NODE"), "{}", out.stdout);
    assert!(out.stdout.contains("n1    cordoned"), "{}", out.stdout);
    assert!(out.stdout.contains("n2    draining"), "{}", out.stdout);

    nodes
        .uncordon_node(pb::NodeRequest { id: "n1".into() })
        .await
        .unwrap();
    let out = s
        .ctl(
            CtlCommand::Nodes {
                command: NodesCommand::Uncordon { node: "n2".into() },
            },
            true,
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        viewer_nodes(scheduler.assign_viewer(ask).await.unwrap().into_inner()),
        ["n1", "n2"]
    );

    assert_status(
        nodes
            .cordon_node(pb::NodeRequest { id: "ghost".into() })
            .await,
        Code::NotFound,
        "ghost",
    );
    assert_status(
        nodes
            .cordon_node(pb::NodeRequest { id: "a/b".into() })
            .await,
        Code::InvalidArgument,
        "invalid id",
    );
    let out = s
        .ctl(
            CtlCommand::Nodes {
                command: NodesCommand::Drain {
                    node: "ghost".into(),
                },
            },
            false,
        )
        .await;
    assert_eq!(out.code, ctl::EXIT_USAGE, "{out:?}");
    // The flags outlive the node: a cordoned node that leaves is listed as away.
    nodes
        .cordon_node(pb::NodeRequest { id: "n2".into() })
        .await
        .unwrap();
    let leases = s.coordinator.nodes().await.unwrap().len();
    assert_eq!(leases, 2);
    let listed = nodes
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner();
    let n2 = listed.nodes.iter().find(|n| n.id == "n2").unwrap();
    assert!(n2.alive && n2.cordoned);
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let s = start().await;
    let mut client = ServerReflectionClient::new(s.channel().await);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "weir.v1.Scheduler",
        "weir.v1.Rooms",
        "weir.v1.Users",
        "weir.v1.Follows",
        "weir.v1.Config",
        "weir.v1.Nodes",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
}

#[tokio::test]
async fn the_leader_marks_stored_rooms_live_when_a_node_reports_them_live() {
    use weir_control_plane::election::{CONTROL_ELECTION, campaign};
    use weir_protocol::coordinator::RoomLoad;
    let dir = std::env::temp_dir().join(format!("weir-live-{}", uuid::Uuid::new_v4().simple()));
    let store = Store::connect(
        &weir_control_plane::store::sqlite_url(&dir.join("weir.db")),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let coordinator = Arc::new(LocalCoordinator::new());
    let state = Arc::new(
        ControlState::new(
            coordinator.clone(),
            TokenIssuer::new(TokenSigner::generate()),
            ControlConfig::default(),
        )
        .unwrap()
        .with_store(store.clone()),
    );
    store
        .create_user(
            Some(weir_control_plane::store::UserId::parse("u").unwrap()),
            "U",
        )
        .await
        .unwrap();
    for id in ["show", "later"] {
        store
            .create_room(weir_control_plane::store::NewRoom {
                id: RoomId::parse(id).unwrap(),
                owner: weir_control_plane::store::UserId::parse("u").unwrap(),
                title: id.into(),
                scheduled_start_ms: None,
            })
            .await
            .unwrap();
    }
    let mut n = node("n1", 1);
    n.load.rooms = vec![
        RoomLoad {
            room: RoomId::parse("show").unwrap(),
            live: true,
            subscribers: 0,
        },
        RoomLoad {
            room: RoomId::parse("unstored").unwrap(),
            live: true,
            subscribers: 0,
        },
        RoomLoad {
            room: RoomId::parse("later").unwrap(),
            live: false,
            subscribers: 3,
        },
    ];
    coordinator
        .register_node(n, Duration::from_secs(60))
        .await
        .unwrap();
    let mut leadership = campaign(
        coordinator.clone(),
        CONTROL_ELECTION,
        "me",
        Duration::from_secs(2),
    );
    leadership.elected().await;
    tokio::spawn(weir_control_plane::workers::run(
        Arc::clone(&state),
        leadership.changes(),
    ));
    let show = RoomId::parse("show").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.room(&show).await.unwrap().status != weir_control_plane::store::RoomStatus::Live {
        assert!(std::time::Instant::now() < deadline, "show never went live");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let later = store.room(&RoomId::parse("later").unwrap()).await.unwrap();
    assert_eq!(
        later.status,
        weir_control_plane::store::RoomStatus::Scheduled
    );
    leadership.resign().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A raw HTTP/1.1 request on a fresh connection: status and JSON body.
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn the_json_gateway_serves_the_business_calls() {
    let s = start().await;
    let (status, user) = http(s.addr, "POST", "/v1/users", r#"{"id":"ann","name":"Ann"}"#).await;
    assert_eq!(status, 200, "{user}");
    assert_eq!(user["id"], "ann");
    let (status, err) = http(s.addr, "POST", "/v1/users", r#"{"id":"ann","name":"Ann"}"#).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (409, Some("already_exists")),
        "{err}"
    );
    let (status, err) = http(s.addr, "POST", "/v1/users", r#"{"name":"x","extra":1}"#).await;
    assert_eq!(status, 422, "{err}");
    http(s.addr, "POST", "/v1/users", r#"{"id":"bo","name":"Bo"}"#).await;
    let (status, room) = http(
        s.addr,
        "POST",
        "/v1/rooms",
        r#"{"id":"gig","owner":"ann","title":"Gig"}"#,
    )
    .await;
    assert_eq!(status, 200, "{room}");
    assert_eq!(
        (room["status"].as_str(), room["owner"].as_str()),
        (Some("scheduled"), Some("ann"))
    );
    let (status, err) = http(
        s.addr,
        "POST",
        "/v1/rooms",
        r#"{"owner":"nobody","title":"Gig"}"#,
    )
    .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (404, Some("not_found")),
        "{err}"
    );
    let (status, room) = http(s.addr, "POST", "/v1/rooms/gig/live", "").await;
    assert_eq!(
        (status, room["status"].as_str()),
        (200, Some("live")),
        "{room}"
    );
    let (status, room) = http(s.addr, "GET", "/v1/rooms/gig", "").await;
    assert_eq!((status, room["title"].as_str()), (200, Some("Gig")));
    let (status, room) = http(s.addr, "POST", "/v1/rooms/gig/end", "").await;
    assert_eq!((status, room["status"].as_str()), (200, Some("ended")));
    let (status, err) = http(s.addr, "POST", "/v1/rooms/gig/live", "").await;
    assert_eq!(
        (status, err["code"].as_str()),
        (409, Some("failed_precondition")),
        "{err}"
    );
    let (status, err) = http(s.addr, "GET", "/v1/rooms/a%20b", "").await;
    assert_eq!(
        (status, err["code"].as_str()),
        (400, Some("invalid_argument")),
        "{err}"
    );
    let (status, _) = http(
        s.addr,
        "POST",
        "/v1/follows",
        r#"{"follower":"bo","followee":"ann"}"#,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = http(
        s.addr,
        "POST",
        "/v1/unfollow",
        r#"{"follower":"bo","followee":"ann"}"#,
    )
    .await;
    assert_eq!(status, 200);
    let (status, err) = http(
        s.addr,
        "POST",
        "/v1/unfollow",
        r#"{"follower":"bo","followee":"ann"}"#,
    )
    .await;
    assert_eq!(
        (status, err["code"].as_str()),
        (404, Some("not_found")),
        "{err}"
    );
    let (status, user) = http(s.addr, "GET", "/v1/users/bo", "").await;
    assert_eq!((status, user["name"].as_str()), (200, Some("Bo")));
    // The carried-rooms list is still a GET on /v1/rooms.
    let (status, rooms) = http(s.addr, "GET", "/v1/rooms", "").await;
    assert!(status == 200 && rooms["rooms"].is_array(), "{rooms}");
}
