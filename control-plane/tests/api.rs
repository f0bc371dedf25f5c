//! The control plane's API end to end: gRPC and the JSON gateway on one real
//! port, bad input on both, the operational endpoints, and `weir ctl`.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tonic::Code;
use tower::ServiceExt;
use weir_control_plane::ctl::{self, CtlArgs, CtlCommand, CtlMode, RoomsCommand, TokenArgs};
use weir_control_plane::{
    ControlConfig, ControlState, LocalCoordinator, RenderMetrics, TokenIssuer,
};
use weir_protocol::coordinator::{CoordError, Coordinator, LeaseId, NodeInfo, NodeLoad, RoomLoad};
use weir_protocol::pb;
use weir_protocol::pb::scheduler_client::SchedulerClient;
use weir_protocol::pb::tokens_client::TokensClient;
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

fn now_unix() -> u64 {
    now_ms() / 1000
}

fn node(id: &str, region: &str, sessions: u32) -> NodeInfo {
    NodeInfo {
        id: NodeId::parse(id).unwrap(),
        region: region.into(),
        zone: "a".into(),
        http_url: format!("http://{id}.test:8080/"),
        relay_addr: None,
        version: "test".into(),
        capacity: 100,
        draining: false,
        load: NodeLoad {
            reported_at_ms: now_ms(),
            sessions,
            egress_bps: 0,
            rooms: Vec::new(),
        },
    }
}

/// The local coordinator behind a switch that makes it fail.
#[derive(Default)]
struct Switchable {
    inner: LocalCoordinator,
    down: AtomicBool,
}

impl Switchable {
    fn check(&self) -> Result<(), CoordError> {
        if self.down.load(Ordering::SeqCst) {
            Err(CoordError::Unavailable("switched off by the test".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Coordinator for Switchable {
    async fn register_node(&self, info: NodeInfo, ttl: Duration) -> Result<LeaseId, CoordError> {
        self.check()?;
        self.inner.register_node(info, ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId, info: NodeInfo) -> Result<(), CoordError> {
        self.check()?;
        self.inner.keep_alive(lease, info).await
    }
    async fn revoke(&self, lease: LeaseId) -> Result<(), CoordError> {
        self.check()?;
        self.inner.revoke(lease).await
    }
    async fn nodes(&self) -> Result<Vec<NodeInfo>, CoordError> {
        self.check()?;
        self.inner.nodes().await
    }
    async fn claim_room(
        &self,
        room: &RoomId,
        node: &NodeId,
        lease: LeaseId,
    ) -> Result<NodeId, CoordError> {
        self.check()?;
        self.inner.claim_room(room, node, lease).await
    }
    async fn release_room(&self, room: &RoomId, node: &NodeId) -> Result<(), CoordError> {
        self.check()?;
        self.inner.release_room(room, node).await
    }
    async fn room_origins(&self) -> Result<Vec<(RoomId, NodeId)>, CoordError> {
        self.check()?;
        self.inner.room_origins().await
    }
}

struct Harness {
    coordinator: Arc<Switchable>,
    verifier: TokenVerifier,
    state: Option<ControlState>,
}

fn render() -> RenderMetrics {
    Arc::new(|| "weir_test_metric 1\n".to_owned())
}

impl Harness {
    fn new(allow_token_minting: bool) -> Self {
        let coordinator = Arc::new(Switchable::default());
        let issuer = TokenIssuer::new(TokenSigner::generate());
        let verifier = issuer.verifier();
        let config = ControlConfig {
            default_owner: "owner-1".into(),
            allow_token_minting,
            ..ControlConfig::default()
        };
        let state = ControlState::new(coordinator.clone(), issuer, config).unwrap();
        Self {
            coordinator,
            verifier,
            state: Some(state),
        }
    }

    async fn with_nodes(self, nodes: &[NodeInfo]) -> Self {
        for n in nodes {
            self.coordinator
                .register_node(n.clone(), Duration::from_secs(60))
                .await
                .unwrap();
        }
        self
    }

    async fn router(&mut self) -> axum::Router {
        let state = self.state.take().unwrap();
        weir_control_plane::router(Arc::new(state), render()).await
    }

    /// Serves on a real port; the server stops when the sender is dropped.
    async fn serve(&mut self) -> (SocketAddr, oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let state = self.state.take().unwrap();
        tokio::spawn(weir_control_plane::serve(
            listener,
            state,
            render(),
            async move {
                let _ = stopped.await;
            },
        ));
        (addr, stop)
    }
}

async fn call(
    router: &axum::Router,
    request: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
    });
    (status, headers, json)
}

fn post_json(path: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

fn grpc_request<T>(message: T, request_id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-request-id", request_id.parse().unwrap());
    request
}

// ---------------------------------------------------------------- gRPC

#[tokio::test]
async fn grpc_and_http1_json_share_one_port() {
    let mut h = Harness::new(false)
        .with_nodes(&[node("busy", "eu", 50), node("idle", "us", 1)])
        .await;
    let (addr, _stop) = h.serve().await;

    // gRPC over h2c (prior knowledge) through axum::serve.
    let mut client = SchedulerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let response = client
        .assign_viewer(grpc_request(
            pb::AssignViewerRequest {
                room: "lobby".into(),
                region: "eu".into(),
                viewer_id: String::new(),
            },
            "rid-grpc-1",
        ))
        .await
        .unwrap();
    assert_eq!(
        response.metadata().get("x-request-id").unwrap(),
        "rid-grpc-1"
    );
    let a = response.into_inner();
    assert_eq!(a.room, "lobby");
    assert!(!a.degraded);
    let urls: Vec<&str> = a.endpoints.iter().map(|e| e.url.as_str()).collect();
    assert_eq!(
        urls,
        [
            "http://busy.test:8080/whep/lobby",
            "http://idle.test:8080/whep/lobby"
        ]
    );
    assert_eq!(a.endpoints[0].kind, i32::from(pb::EndpointKind::Whep));
    assert_eq!(a.endpoints[0].node_id, "busy");
    let room = RoomId::parse("lobby").unwrap();
    let claims = h
        .verifier
        .authorize(&a.token, &room, Mode::Play, now_unix())
        .unwrap();
    assert!(claims.sub.starts_with("viewer-"), "{}", claims.sub);
    assert_eq!(i64::try_from(claims.exp).unwrap(), a.token_expires_unix);

    // A plain HTTP/1.1 JSON POST on the same port.
    let body = r#"{"room":"lobby"}"#;
    let raw = format!(
        "POST /v1/assign-viewer HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nX-Request-Id: rid-http-1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-request-id: rid-http-1"),
        "{head}"
    );
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(json["room"], "lobby");
    assert_eq!(json["degraded"], false);
    // No region: the least loaded first.
    assert_eq!(
        json["endpoints"][0]["url"],
        "http://idle.test:8080/whep/lobby"
    );
    assert_eq!(json["endpoints"][0]["kind"], "whep");
    assert_eq!(json["endpoints"][0]["node_id"], "idle");
    let token = json["token"].as_str().unwrap();
    assert!(
        h.verifier
            .authorize(token, &room, Mode::Play, now_unix())
            .is_ok()
    );
    assert!(json["token_expires_unix"].as_u64().unwrap() > now_unix());

    // The gRPC health service is there too.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let served = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "weir.v1.Scheduler".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        served.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn grpc_publisher_goes_to_the_origin_with_an_owner_token() {
    let mut h = Harness::new(false).with_nodes(&[node("a", "eu", 0)]).await;
    let lease = h
        .coordinator
        .register_node(node("b", "eu", 90), Duration::from_secs(60))
        .await
        .unwrap();
    let room = RoomId::parse("show").unwrap();
    h.coordinator
        .claim_room(&room, &NodeId::parse("b").unwrap(), lease)
        .await
        .unwrap();
    let (addr, _stop) = h.serve().await;
    let mut client = SchedulerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let a = client
        .assign_publisher(pb::AssignPublisherRequest {
            room: "show".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.endpoints.len(), 1);
    assert_eq!(a.endpoints[0].url, "http://b.test:8080/whip/show");
    assert_eq!(a.endpoints[0].kind, i32::from(pb::EndpointKind::Whip));
    let claims = h
        .verifier
        .authorize(&a.token, &room, Mode::Publish, now_unix())
        .unwrap();
    assert_eq!(claims.sub, "owner-1");

    // Viewers of the live room: its origin first, then the other nodes
    // (they pull the room over the relay).
    let v = client
        .assign_viewer(pb::AssignViewerRequest {
            room: "show".into(),
            region: String::new(),
            viewer_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let nodes: Vec<&str> = v.endpoints.iter().map(|e| e.node_id.as_str()).collect();
    assert_eq!(nodes, ["b", "a"]);

    // A room nobody holds goes to the least loaded node.
    let a = client
        .assign_publisher(pb::AssignPublisherRequest { room: "new".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.endpoints[0].node_id, "a");
}

#[tokio::test]
async fn grpc_bad_input_is_invalid_argument_naming_the_field() {
    let mut h = Harness::new(true).with_nodes(&[node("a", "eu", 0)]).await;
    let (addr, _stop) = h.serve().await;
    let mut scheduler = SchedulerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut tokens = TokensClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let status = scheduler
        .assign_viewer(grpc_request(
            pb::AssignViewerRequest {
                room: String::new(),
                region: String::new(),
                viewer_id: String::new(),
            },
            "rid-bad-1",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "invalid room: room id is empty");
    assert_eq!(status.metadata().get("x-request-id").unwrap(), "rid-bad-1");

    let status = scheduler
        .assign_publisher(pb::AssignPublisherRequest { room: "a/b".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("invalid room:"),
        "{}",
        status.message()
    );
    assert!(status.message().contains("'/'"), "{}", status.message());
    // A generated request id comes back when the client sent none.
    let rid = status
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(uuid::Uuid::parse_str(rid).is_ok(), "{rid}");

    let mint = |mode: &str, ttl_seconds: u32, subject: String| pb::MintTokenRequest {
        room: "r".into(),
        mode: mode.into(),
        subject,
        ttl_seconds,
    };
    let status = tokens
        .mint_token(mint("admin", 0, String::new()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("invalid mode:"),
        "{}",
        status.message()
    );
    assert!(status.message().contains("admin"), "{}", status.message());

    let status = tokens
        .mint_token(mint("play", 7 * 24 * 3600 + 1, String::new()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("invalid ttl_seconds:"),
        "{}",
        status.message()
    );

    let status = tokens
        .mint_token(mint("play", 0, "x".repeat(129)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("invalid subject:"),
        "{}",
        status.message()
    );

    // Good minting: default subjects and an explicit ttl.
    let t = tokens
        .mint_token(mint("publish", 0, String::new()))
        .await
        .unwrap()
        .into_inner();
    let room = RoomId::parse("r").unwrap();
    let claims = h
        .verifier
        .authorize(&t.token, &room, Mode::Publish, now_unix())
        .unwrap();
    assert_eq!(claims.sub, "owner-1");
    assert_eq!(claims.exp - claims.iat, 3600);
    let t = tokens
        .mint_token(mint("chat", 60, String::new()))
        .await
        .unwrap()
        .into_inner();
    let claims = h
        .verifier
        .authorize(&t.token, &room, Mode::Chat, now_unix())
        .unwrap();
    assert!(claims.sub.starts_with("anon-"), "{}", claims.sub);
    assert_eq!(claims.exp - claims.iat, 60);
    assert_eq!(i64::try_from(claims.exp).unwrap(), t.expires_unix);
    let t = tokens
        .mint_token(mint("play", 0, "alice".into()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.verifier.verify(&t.token, now_unix()).unwrap().sub,
        "alice"
    );
}

#[tokio::test]
async fn grpc_minting_disabled_and_no_nodes() {
    let mut h = Harness::new(false);
    let (addr, _stop) = h.serve().await;
    let mut tokens = TokensClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let status = tokens
        .mint_token(pb::MintTokenRequest {
            room: "r".into(),
            mode: "play".into(),
            subject: String::new(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("minting is disabled"),
        "{}",
        status.message()
    );

    let mut scheduler = SchedulerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let status = scheduler
        .assign_viewer(pb::AssignViewerRequest {
            room: "r".into(),
            region: String::new(),
            viewer_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("no media node"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn grpc_list_rooms_merges_reports_and_origins() {
    let mut a = node("a", "eu", 3);
    a.load.rooms = vec![RoomLoad {
        room: RoomId::parse("show").unwrap(),
        live: true,
        subscribers: 3,
    }];
    let mut h = Harness::new(false).with_nodes(&[a]).await;
    let lease = h
        .coordinator
        .register_node(node("b", "eu", 0), Duration::from_secs(60))
        .await
        .unwrap();
    h.coordinator
        .claim_room(
            &RoomId::parse("show").unwrap(),
            &NodeId::parse("b").unwrap(),
            lease,
        )
        .await
        .unwrap();
    let (addr, _stop) = h.serve().await;
    let mut client = SchedulerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let rooms = client
        .list_rooms(pb::ListRoomsRequest {})
        .await
        .unwrap()
        .into_inner()
        .rooms;
    assert_eq!(
        rooms,
        vec![pb::RoomSummary {
            room: "show".into(),
            origin_node: "b".into(),
            live: true,
            subscribers: 3,
        }]
    );
}

#[tokio::test]
async fn a_lost_coordinator_gives_degraded_answers_from_the_last_view() {
    let mut h = Harness::new(false).with_nodes(&[node("a", "eu", 0)]).await;
    let coordinator = h.coordinator.clone();
    let router = h.router().await;
    let body = r#"{"room":"r"}"#;

    // Nothing seen yet and the coordinator down: unavailable.
    coordinator.down.store(true, Ordering::SeqCst);
    let (status, _, json) = call(&router, post_json("/v1/assign-viewer", body)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["code"], "unavailable");

    coordinator.down.store(false, Ordering::SeqCst);
    let (status, _, json) = call(&router, post_json("/v1/assign-viewer", body)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["degraded"], false);

    coordinator.down.store(true, Ordering::SeqCst);
    let (status, _, json) = call(&router, post_json("/v1/assign-viewer", body)).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["degraded"], true);
    assert_eq!(json["endpoints"][0]["node_id"], "a");

    // Readiness follows the coordinator.
    let (status, _, _) = call(
        &router,
        Request::get("/readyz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    coordinator.down.store(false, Ordering::SeqCst);
    let (status, _, _) = call(
        &router,
        Request::get("/readyz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

// ---------------------------------------------------------------- JSON gateway

#[tokio::test]
async fn gateway_refuses_bad_bodies_with_json_errors() {
    let mut h = Harness::new(true).with_nodes(&[node("a", "eu", 0)]).await;
    let router = h.router().await;

    let (status, _, json) = call(&router, post_json("/v1/assign-viewer", "{not json")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["code"], "invalid_argument");
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid request body"),
        "{json}"
    );

    let request = Request::post("/v1/assign-viewer")
        .header("content-type", "text/plain")
        .body(Body::from(r#"{"room":"r"}"#))
        .unwrap();
    let (status, _, json) = call(&router, request).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(json["code"], "invalid_argument");
    assert!(
        json["error"].as_str().unwrap().contains("application/json"),
        "{json}"
    );

    let big = format!(r#"{{"room":"r","region":"{}"}}"#, "x".repeat(17 * 1024));
    let (status, _, json) = call(&router, post_json("/v1/assign-viewer", &big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json["code"], "invalid_argument");
    assert!(json["error"].as_str().unwrap().contains("16384"), "{json}");

    let (status, _, json) = call(
        &router,
        post_json("/v1/assign-viewer", r#"{"room":"r","colour":1}"#),
    )
    .await;
    assert!(status.is_client_error(), "{status}");
    assert_eq!(json["code"], "invalid_argument");
    assert!(json["error"].as_str().unwrap().contains("colour"), "{json}");

    let (status, _, json) = call(&router, post_json("/v1/tokens", r#"{"room":"r"}"#)).await;
    assert!(status.is_client_error(), "{status}");
    assert!(json["error"].as_str().unwrap().contains("mode"), "{json}");

    let (status, headers, json) =
        call(&router, post_json("/v1/assign-publisher", r#"{"room":""}"#)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["code"], "invalid_argument");
    assert_eq!(json["error"], "invalid room: room id is empty");
    assert!(headers.contains_key("x-request-id"));

    let (status, _, json) = call(
        &router,
        post_json("/v1/tokens", r#"{"room":"r","mode":"x"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        json["error"].as_str().unwrap().starts_with("invalid mode:"),
        "{json}"
    );

    let (status, _, json) = call(
        &router,
        Request::get("/v1/assign-viewer")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(json["code"], "invalid_argument");

    let (status, _, json) = call(
        &router,
        Request::get("/v1/nope").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(json["code"], "not_found");

    // Unknown gRPC services still get a gRPC answer.
    let request = Request::post("/weir.v1.Nope/Call")
        .header("content-type", "application/grpc")
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = call(&router, request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["grpc-status"], "12");
}

#[tokio::test]
async fn gateway_good_paths() {
    let mut h = Harness::new(true).with_nodes(&[node("a", "eu", 0)]).await;
    let verifier = h.verifier.clone();
    let router = h.router().await;
    let room = RoomId::parse("r").unwrap();

    let request = Request::post("/v1/assign-publisher")
        .header("content-type", "application/json")
        .header("x-request-id", "abc-123")
        .body(Body::from(r#"{"room":"r"}"#))
        .unwrap();
    let (status, headers, json) = call(&router, request).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(headers["x-request-id"], "abc-123");
    assert_eq!(json["endpoints"][0]["kind"], "whip");
    assert_eq!(json["endpoints"][0]["url"], "http://a.test:8080/whip/r");
    let token = json["token"].as_str().unwrap();
    assert_eq!(
        verifier
            .authorize(token, &room, Mode::Publish, now_unix())
            .unwrap()
            .sub,
        "owner-1"
    );

    let body = r#"{"room":"r","mode":"chat","subject":"bob","ttl_seconds":120}"#;
    let (status, _, json) = call(&router, post_json("/v1/tokens", body)).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["room"], "r");
    assert_eq!(json["mode"], "chat");
    assert_eq!(json["subject"], "bob");
    let claims = verifier
        .authorize(
            json["token"].as_str().unwrap(),
            &room,
            Mode::Chat,
            now_unix(),
        )
        .unwrap();
    assert_eq!(claims.exp - claims.iat, 120);
    assert_eq!(json["expires_unix"].as_u64().unwrap(), claims.exp);

    let (status, _, json) = call(
        &router,
        Request::get("/v1/rooms").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json, serde_json::json!({"rooms": []}));
}

#[tokio::test]
async fn gateway_minting_disabled_is_forbidden() {
    let mut h = Harness::new(false);
    let router = h.router().await;
    let (status, _, json) = call(
        &router,
        post_json("/v1/tokens", r#"{"room":"r","mode":"play"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(json["code"], "permission_denied");
}

#[tokio::test]
async fn cors_and_operational_endpoints() {
    let mut h = Harness::new(false);
    let router = h.router().await;

    let preflight = Request::options("/v1/assign-viewer")
        .header("origin", "https://example.org")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,x-request-id",
        )
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = call(&router, preflight).await;
    assert!(status.is_success(), "{status}");
    assert_eq!(headers["access-control-allow-origin"], "*");
    let methods = headers["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_ascii_uppercase();
    assert!(
        methods.contains("POST") && methods.contains("GET"),
        "{methods}"
    );
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("x-request-id") && allowed.contains("content-type"),
        "{allowed}"
    );

    let request = Request::get("/v1/rooms")
        .header("origin", "https://example.org")
        .body(Body::empty())
        .unwrap();
    let (_, headers, _) = call(&router, request).await;
    assert_eq!(headers["access-control-allow-origin"], "*");
    let exposed = headers["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("x-request-id"), "{exposed}");

    let (status, _, body) = call(
        &router,
        Request::get("/healthz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, serde_json::Value::String("ok".into()))
    );
    let (status, _, _) = call(
        &router,
        Request::get("/readyz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, headers, body) = call(
        &router,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(
        body,
        serde_json::Value::String("weir_test_metric 1\n".into())
    );
}

// ---------------------------------------------------------------- weir ctl

fn ctl_args(addr: SocketAddr, json: bool, command: CtlCommand) -> CtlArgs {
    CtlArgs {
        control: format!("http://{addr}"),
        json,
        command,
    }
}

fn token_command(room: &str, mode: CtlMode, ttl: Option<u32>) -> CtlCommand {
    CtlCommand::Token(TokenArgs {
        room: room.into(),
        mode,
        subject: None,
        ttl,
    })
}

#[tokio::test]
async fn ctl_token_and_rooms() {
    let mut h = Harness::new(true).with_nodes(&[node("a", "eu", 0)]).await;
    let (addr, _stop) = h.serve().await;
    let room = RoomId::parse("lobby").unwrap();

    let out = ctl::execute(ctl_args(
        addr,
        false,
        token_command("lobby", CtlMode::Publish, None),
    ))
    .await;
    assert_eq!(out.code, ctl::EXIT_OK, "{out:?}");
    let token = out.stdout.strip_suffix('\n').unwrap();
    assert!(!token.contains('\n'));
    assert!(
        h.verifier
            .authorize(token, &room, Mode::Publish, now_unix())
            .is_ok()
    );

    let out = ctl::execute(ctl_args(
        addr,
        true,
        token_command("lobby", CtlMode::Play, Some(90)),
    ))
    .await;
    assert_eq!(out.code, ctl::EXIT_OK, "{out:?}");
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json["mode"], "play");
    assert_eq!(json["room"], "lobby");
    let claims = h
        .verifier
        .authorize(
            json["token"].as_str().unwrap(),
            &room,
            Mode::Play,
            now_unix(),
        )
        .unwrap();
    assert_eq!(claims.exp - claims.iat, 90);

    let out = ctl::execute(ctl_args(
        addr,
        false,
        token_command("bad room", CtlMode::Play, None),
    ))
    .await;
    assert_eq!(out.code, ctl::EXIT_USAGE, "{out:?}");
    assert!(out.stderr.contains("invalid room"), "{}", out.stderr);
    assert!(out.stderr.contains("request id"), "{}", out.stderr);

    let rooms = CtlCommand::Rooms {
        command: RoomsCommand::List,
    };
    let out = ctl::execute(ctl_args(addr, false, rooms.clone())).await;
    assert_eq!(out.code, ctl::EXIT_OK, "{out:?}");
    assert!(out.stdout.starts_with("ROOM"), "{}", out.stdout);
    let out = ctl::execute(ctl_args(addr, true, rooms)).await;
    assert_eq!(out.code, ctl::EXIT_OK, "{out:?}");
    assert_eq!(out.stdout, "{\"rooms\":[]}\n");
}

#[tokio::test]
async fn ctl_exit_codes_for_denied_and_unreachable() {
    let mut h = Harness::new(false);
    let (addr, _stop) = h.serve().await;
    let out = ctl::execute(ctl_args(
        addr,
        false,
        token_command("r", CtlMode::Play, None),
    ))
    .await;
    assert_eq!(out.code, ctl::EXIT_NOPERM, "{out:?}");
    assert!(out.stderr.contains("minting is disabled"), "{}", out.stderr);

    // A port nobody listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = listener.local_addr().unwrap();
    drop(listener);
    let out = ctl::execute(ctl_args(
        closed,
        false,
        token_command("r", CtlMode::Play, None),
    ))
    .await;
    assert_eq!(out.code, ctl::EXIT_UNAVAILABLE, "{out:?}");
    assert!(
        out.stderr.contains("cannot reach the control plane"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn serve_stops_on_shutdown() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let state = ControlState::new(
        Arc::new(LocalCoordinator::new()),
        TokenIssuer::new(TokenSigner::generate()),
        ControlConfig::default(),
    )
    .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(weir_control_plane::serve(
        listener,
        state,
        render(),
        async move {
            let _ = stopped.await;
        },
    ));
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[test]
fn bad_config_is_refused() {
    let config = ControlConfig {
        default_owner: String::new(),
        ..ControlConfig::default()
    };
    let err = ControlState::new(
        Arc::new(LocalCoordinator::new()),
        TokenIssuer::new(TokenSigner::generate()),
        config,
    )
    .unwrap_err();
    assert!(err.to_string().contains("default_owner"), "{err}");
}
