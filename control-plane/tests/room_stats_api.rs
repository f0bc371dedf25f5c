//! `POST /v1/room-stats/likes` over a real port (on a SQLite store): only
//! callers with the node secret get in; every bad batch is a 400 that says
//! what was wrong and writes nothing; claims are compare-and-sets.
#![allow(clippy::unwrap_used)]

#[path = "support/serve.rs"]
mod serve;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::oneshot;
use weir_control_plane::store::Store;
use weir_control_plane::{ControlConfig, ControlState, LocalCoordinator, TokenIssuer};
use weir_protocol::stats::{LIKES_PATH, NodeSecret};
use weir_protocol::{RoomId, TokenSigner};

const SECRET: &str = "a-node-secret-for-tests";

struct Server {
    addr: SocketAddr,
    store: Store,
    _stop: oneshot::Sender<()>,
    dir: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start(secret: Option<&str>) -> Server {
    let dir =
        std::env::temp_dir().join(format!("weir-stats-api-{}", uuid::Uuid::new_v4().simple()));
    let store = Store::connect(
        &weir_control_plane::store::sqlite_url(&dir.join("weir.db")),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let state = ControlState::new(
        Arc::new(LocalCoordinator::new()),
        TokenIssuer::new(TokenSigner::generate()),
        ControlConfig {
            node_secret: secret.map(|s| NodeSecret::parse(s).unwrap()),
            ..ControlConfig::default()
        },
    )
    .unwrap()
    .with_store(store.clone());
    let (addr, stop) = serve::spawn(state).await;
    Server {
        addr,
        store,
        _stop: stop,
        dir,
    }
}

/// A raw HTTP/1.1 POST of a likes batch on a fresh connection: status and
/// JSON body.
async fn post(addr: SocketAddr, auth: Option<&str>, body: &str) -> (u16, Value) {
    post_to(addr, LIKES_PATH, auth, body).await
}

async fn post_to(addr: SocketAddr, path: &str, auth: Option<&str>, body: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let auth = auth
        .map(|t| format!("Authorization: {t}\r\n"))
        .unwrap_or_default();
    let raw = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn bearer() -> Option<&'static str> {
    Some("Bearer a-node-secret-for-tests")
}

async fn likes(s: &Server, room: &str) -> Option<u64> {
    let room = RoomId::parse(room).unwrap();
    s.store
        .room_likes(std::slice::from_ref(&room))
        .await
        .unwrap()
        .get(&room)
        .map(|r| r.likes)
}

#[tokio::test]
async fn nodes_persist_batches_with_their_secret() {
    let s = start(Some(SECRET)).await;
    let create = json!({"node": "n1", "claims": [
        {"room": "a", "expect": null, "to": {"epoch": 5, "through": 3}, "add": 7},
        {"room": "b", "expect": null, "to": {"epoch": 5, "through": 4}, "add": 1},
    ], "read": ["c"]})
    .to_string();
    let (status, v) = post(s.addr, bearer(), &create).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["applied"], json!([true, true]));
    assert_eq!(v["rows"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["rows"][0]["room"], "a");
    assert_eq!(v["rows"][0]["likes"], 7);
    // The same claims again: the rows exist, nothing is added twice.
    let (status, v) = post(s.addr, bearer(), &create).await;
    assert_eq!((status, &v["applied"]), (200, &json!([false, false])));
    let forward = json!({"node": "n2", "claims": [
        {"room": "a", "expect": {"epoch": 5, "through": 3}, "to": {"epoch": 5, "through": 9}, "add": 2},
    ]})
    .to_string();
    let (status, v) = post(s.addr, bearer(), &forward).await;
    assert_eq!((status, &v["applied"]), (200, &json!([true])));
    assert_eq!(v["rows"][0]["likes"], 9);
    let (_, v) = post(s.addr, bearer(), &forward).await;
    assert_eq!(v["applied"], json!([false]), "a stale expectation loses");
    assert_eq!(v["rows"][0]["through"], 9, "and reads where the row stands");
    assert_eq!(likes(&s, "a").await, Some(9));

    // A full batch of reads fits the body limit.
    let read: Vec<String> = (0..1000)
        .map(|i| format!("room-{i:04}-{}", "x".repeat(40)))
        .collect();
    let (status, v) = post(
        s.addr,
        bearer(),
        &json!({"node": "n1", "read": read}).to_string(),
    )
    .await;
    assert_eq!((status, &v["rows"]), (200, &json!([])), "{v}");
}

#[tokio::test]
async fn only_nodes_with_the_secret_get_in() {
    let s = start(Some(SECRET)).await;
    let body = json!({"node": "n1", "claims": [
        {"room": "a", "expect": null, "to": {"epoch": 5, "through": 3}, "add": 7},
    ]})
    .to_string();
    for (auth, why) in [
        (None, "Bearer <node secret>"),
        (
            Some("Bearer wrong-secret-of-16-chars"),
            "not this control plane's",
        ),
        (
            Some("Basic a-node-secret-for-tests"),
            "Bearer <node secret>",
        ),
    ] {
        let (status, v) = post(s.addr, auth, &body).await;
        assert_eq!(status, 401, "{v}");
        assert_eq!(v["code"], "unauthenticated");
        assert!(v["error"].as_str().unwrap().contains(why), "{v}");
    }
    assert_eq!(likes(&s, "a").await, None);

    let closed = start(None).await;
    let (status, v) = post(closed.addr, bearer(), &body).await;
    assert_eq!(status, 403, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("--node-secret"),
        "{v}"
    );
    assert_eq!(likes(&closed, "a").await, None);
}

#[tokio::test]
async fn bad_batches_are_refused_with_reasons_and_write_nothing() {
    let s = start(Some(SECRET)).await;
    let ok = json!({"room": "fine", "expect": null, "to": {"epoch": 5, "through": 3}, "add": 7});
    let cases = [
        (json!({"node": "n 1", "claims": [ok]}).to_string(), "node"),
        (
            json!({"node": "n1", "claims": [ok, {"room": "bad room", "expect": null, "to": {"epoch": 5, "through": 3}, "add": 1}]}).to_string(),
            "claim 1: room",
        ),
        (
            json!({"node": "n1", "claims": [ok, {"room": "b", "expect": {"epoch": 5, "through": 9}, "to": {"epoch": 5, "through": 9}, "add": 1}]}).to_string(),
            "moves forward",
        ),
        (
            json!({"node": "n1", "claims": [ok, {"room": "b", "expect": null, "to": {"epoch": 0, "through": 9}, "add": 1}]}).to_string(),
            "never 0",
        ),
        (
            json!({"node": "n1", "claims": [ok, {"room": "b", "expect": null, "to": {"epoch": 1, "through": 9}, "add": 9_007_199_254_740_992u64}]}).to_string(),
            "largest allowed",
        ),
        (
            json!({"node": "n1", "claims": [ok, {"room": "b", "expect": null, "to": {"epoch": 1, "through": 9}, "add": -1}]}).to_string(),
            "invalid request body",
        ),
        (
            json!({"node": "n1", "claims": [ok], "extra": 1}).to_string(),
            "unknown field",
        ),
        ("{not json".to_owned(), "invalid request body"),
        (
            json!({"node": "n1", "claims": [ok], "read": (0..1000).map(|i| format!("r{i}")).collect::<Vec<_>>()}).to_string(),
            "at most 1000 rooms",
        ),
    ];
    for (body, why) in cases {
        let (status, v) = post(s.addr, bearer(), &body).await;
        assert_eq!(status, 400, "{why}: {v}");
        assert_eq!(v["code"], "invalid_argument", "{v}");
        assert!(v["error"].as_str().unwrap().contains(why), "{why}: {v}");
    }
    let too_big = json!({"node": "n1", "read": vec!["x".repeat(60); 10_000]}).to_string();
    let (status, v) = post(s.addr, bearer(), &too_big).await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(likes(&s, "fine").await, None, "nothing half written");
}

/// With a node secret the follow graph is for nodes only: who follows whom
/// among a room's viewers is answered to the secret's holders.
#[tokio::test]
async fn follows_questions_need_the_node_secret_when_there_is_one() {
    let s = start(Some(SECRET)).await;
    let body = json!({"user": "alice", "candidates": ["bob"]}).to_string();
    for path in ["/v1/follows/among", "/v1/follows/followed"] {
        let (status, v) = post_to(s.addr, path, None, &body).await;
        assert_eq!(status, 401, "{path}: {v}");
        let (status, v) = post_to(s.addr, path, Some("Bearer not-the-node-secret"), &body).await;
        assert_eq!(status, 401, "{path}: {v}");
        let (status, v) = post_to(s.addr, path, bearer(), &body).await;
        assert_eq!(status, 200, "{path}: {v}");
        assert_eq!(v["users"], json!([]), "{path}: {v}");
    }
    // Without a secret (a single machine) they stay open.
    let open = start(None).await;
    let (status, v) = post_to(open.addr, "/v1/follows/among", None, &body).await;
    assert_eq!(status, 200, "{v}");
}
