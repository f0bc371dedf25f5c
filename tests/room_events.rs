//! Room events end to end: `weir dev` (in-process bus) and two `weir node`
//! processes on a real JetStream, with WebSocket clients on
//! `/rooms/{room}/events`. Recovery of exactly the missed events, beyond
//! retention `recovered: false`, refusals with reasons that change nothing,
//! likes merged into counters, and one sequence for clients on two nodes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../data-plane/tests/support/nats.rs"]
mod nats;

use std::time::Duration;

use common::proc::Proc;
use common::ws::EventsClient;
use common::{DevServer, ctl};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn offset(f: &Value) -> u64 {
    f["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no offset in {f}"))
}

/// Reads event frames until `n` danmaku came (other events, such as online
/// counts, are read too but not returned), checking that each `prev` is the
/// offset of the event before (`last`: the offset before the first, 0 when
/// unknown).
async fn danmaku(client: &mut EventsClient, n: usize, mut last: u64) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let f = client.next_event_frame().await;
        assert_eq!(f["t"], "event", "expected an event, got {f}");
        if last != 0 {
            assert_eq!(f["prev"].as_u64(), Some(last), "no gap: {f}");
        }
        last = offset(&f);
        if f["type"] == "danmaku" {
            out.push(f);
        }
    }
    out
}

/// Reads `n` event frames of any type, checking the `prev` chain.
async fn events(client: &mut EventsClient, n: usize, mut last: u64) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let f = client.next_event_frame().await;
        assert_eq!(f["t"], "event", "expected an event, got {f}");
        if last != 0 {
            assert_eq!(f["prev"].as_u64(), Some(last), "no gap: {f}");
        }
        last = offset(&f);
        out.push(f);
    }
    out
}

/// The next event of `kind` (other frames and events skipped).
async fn next_event(client: &mut EventsClient, kind: &str) -> Value {
    loop {
        let f = client.next_of("event").await;
        if f["type"] == kind {
            return f;
        }
    }
}

fn texts(frames: &[Value]) -> Vec<&str> {
    frames.iter().map(|f| f["text"].as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_recover_exactly_what_they_missed() {
    let dev = DevServer::start_with(&["--room-history", "20"]);
    let room = "chat";
    let token_a = dev.token(room, "play", "alice").await;
    let token_b = dev.token(room, "play", "bob").await;

    let mut a = EventsClient::connect(&dev.node, room, &format!("token={token_a}"))
        .await
        .unwrap();
    let mut b = EventsClient::connect(&dev.node, room, &format!("token={token_b}"))
        .await
        .unwrap();
    assert_eq!(a.hello["recovered"], Value::Null);
    assert_eq!(a.hello["user"], "alice");
    let epoch = a.hello["epoch"].as_u64().unwrap();
    assert_ne!(epoch, 0);

    let ack = a.danmaku("hello", "r1").await;
    assert_eq!(ack["t"], "ack", "{ack}");
    let first = offset(&ack);
    for client in [&mut a, &mut b] {
        let e = danmaku(client, 1, 0).await;
        assert_eq!(e[0]["text"], "hello");
        assert_eq!(e[0]["user"], "alice");
        assert_eq!(offset(&e[0]), first, "every client sees the same offset");
    }

    // Alice leaves; five danmaku go by; she comes back with her last offset.
    a.close().await;
    let mut sent = Vec::new();
    for i in 0..5 {
        let ack = b.danmaku(&format!("missed {i}"), &format!("m{i}")).await;
        assert_eq!(ack["t"], "ack", "{ack}");
        sent.push(format!("missed {i}"));
    }
    let mut a = EventsClient::connect(
        &dev.node,
        room,
        &format!("token={token_a}&since={first}&epoch={epoch}"),
    )
    .await
    .unwrap();
    assert_eq!(a.hello["recovered"], true, "{}", a.hello);
    // The missed events: the five danmaku, and the online count that
    // changed when Alice left.
    let missed = a.hello["missed"].as_u64().unwrap() as usize;
    let replay = events(&mut a, missed, first).await;
    let replay: Vec<Value> = replay
        .into_iter()
        .filter(|f| f["type"] != "online")
        .collect();
    assert_eq!(texts(&replay), sent, "exactly the missed ones, in order");
    let last_seen = offset(&replay[4]);

    // Then live events follow without a gap.
    assert_eq!(a.danmaku("live", "l1").await["t"], "ack");
    loop {
        let f = a.next_of("event").await;
        if f["type"] == "danmaku" {
            assert_eq!(f["text"], "live");
            break;
        }
    }

    // A wrong epoch cannot be recovered from.
    let c = EventsClient::connect(
        &dev.node,
        room,
        &format!("token={token_a}&since={first}&epoch={}", epoch + 1),
    )
    .await
    .unwrap();
    assert_eq!(c.hello["recovered"], false, "{}", c.hello);
    assert_eq!(c.hello["missed"], 0);

    // Beyond retention (20 per room): 25 more go by; the old offset is gone.
    a.close().await;
    for user in ["u1", "u2", "u3", "u4", "u5"] {
        let token = dev.token(room, "play", user).await;
        let mut u = EventsClient::connect(&dev.node, room, &format!("token={token}"))
            .await
            .unwrap();
        for i in 0..5 {
            let ack = u
                .danmaku(&format!("{user} {i}"), &format!("{user}{i}"))
                .await;
            assert_eq!(ack["t"], "ack", "{ack}");
        }
        u.close().await;
    }
    let gone = EventsClient::connect(
        &dev.node,
        room,
        &format!("token={token_a}&since={last_seen}&epoch={epoch}"),
    )
    .await
    .unwrap();
    assert_eq!(gone.hello["recovered"], false, "{}", gone.hello);
    assert!(
        dev.metric_with("weir_events_recoveries_total", "result=\"gone\"")
            .await
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_come_back_with_reasons_and_change_nothing() {
    let dev = DevServer::start();
    let room = "guarded";
    let viewer = dev.token(room, "play", "vic").await;
    let streamer = dev.token(room, "publish", "star").await;
    let other_room = dev.token("elsewhere", "play", "vic").await;

    // Refused before the upgrade, each with a status and a reason.
    for (query, status, says) in [
        ("", 401, "missing token"),
        ("token=w1.garbage.x", 401, ""),
        (&*format!("token={other_room}"), 403, "elsewhere"),
        (&*format!("token={viewer}&since=3"), 400, "since and epoch"),
        (
            &*format!("token={viewer}&since=x&epoch=1"),
            400,
            "bad query",
        ),
        (&*format!("token={viewer}&nope=1"), 400, "bad query"),
    ] {
        let r = EventsClient::connect(&dev.node, room, query)
            .await
            .err()
            .unwrap_or_else(|| panic!("{query:?} was accepted"));
        assert_eq!(r.status, status, "{query:?}: {}", r.body);
        assert!(r.body.contains(says), "{query:?}: {}", r.body);
    }
    let r = EventsClient::connect(&dev.node, "bad%21room", &format!("token={viewer}"))
        .await
        .err()
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    let plain = common::request(
        "GET",
        &format!("{}/rooms/{room}/events?token={viewer}", dev.node),
        &[],
        b"",
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(plain.status, 426, "{}", plain.text());
    assert!(plain.text().contains("WebSocket"));

    let mut vic = EventsClient::connect(&dev.node, room, &format!("token={viewer}"))
        .await
        .unwrap();
    let mut star = EventsClient::connect(&dev.node, room, &format!("token={streamer}"))
        .await
        .unwrap();

    // Malformed frames: refused, the connection goes on.
    for bad in [
        "not json",
        r#"{"t":"gift"}"#,
        r#"{"t":"danmaku"}"#,
        r#"{"t":"danmaku","text":"x","extra":1}"#,
    ] {
        vic.send_raw(Message::Text(bad.into())).await;
        let f = vic.next_significant().await;
        assert_eq!(f["t"], "refused", "{bad}: {f}");
        assert_eq!(f["code"], "malformed", "{bad}: {f}");
    }
    vic.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    let f = vic.next_significant().await;
    assert_eq!(
        (f["t"].as_str(), f["code"].as_str()),
        (Some("refused"), Some("malformed"))
    );
    vic.send(json!({"t": "ping"})).await;
    assert_eq!(vic.next_significant().await["t"], "pong");

    // Size and content limits.
    let long = "x".repeat(501);
    let f = vic.danmaku(&long, "long").await;
    assert_eq!(f["code"], "too_long", "{f}");
    assert_eq!(vic.danmaku("   ", "blank").await["code"], "empty");
    assert_eq!(vic.danmaku("a\u{7}b", "ctl").await["code"], "bad_text");
    // Likes: a bad count is refused.
    vic.send(json!({"t": "like", "count": 0})).await;
    assert_eq!(vic.next_significant().await["code"], "bad_count");

    // Only the streamer moderates.
    vic.send(json!({"t": "mute", "user": "star", "seconds": 60}))
        .await;
    let f = vic.next_significant().await;
    assert_eq!(f["code"], "forbidden", "{f}");
    star.send(json!({"t": "mute", "user": "vic", "seconds": 60}))
        .await;
    let ack = star.next_of("ack").await;
    assert!(offset(&ack) > 0);
    // Every client sees the moderation event; then vic is muted.
    let m = next_event(&mut vic, "moderation").await;
    assert_eq!(
        (m["action"].as_str(), m["user"].as_str()),
        (Some("mute"), Some("vic"))
    );
    let f = vic.danmaku("let me talk", "muted").await;
    assert_eq!(f["code"], "muted", "{f}");
    assert!(f["reason"].as_str().unwrap().contains("muted"));
    // Others are unaffected; the streamer lifts the mute.
    assert_eq!(star.danmaku("welcome", "w").await["t"], "ack");
    star.send(json!({"t": "mute", "user": "vic", "seconds": 0}))
        .await;
    star.next_of("ack").await;
    let unmute = next_event(&mut vic, "moderation").await;
    assert_eq!(unmute["seconds"], 0);

    // Rate limit: a burst of 5 per connection, then refusals.
    let mut codes = Vec::new();
    for i in 0..7 {
        let f = vic.danmaku(&format!("burst {i}"), &format!("b{i}")).await;
        codes.push(f["t"].as_str().unwrap().to_owned() + ":" + f["code"].as_str().unwrap_or(""));
    }
    assert_eq!(
        codes.iter().filter(|c| *c == "ack:").count(),
        5,
        "{codes:?}"
    );
    assert!(
        codes[5..].iter().all(|c| c == "refused:rate_limited"),
        "{codes:?}"
    );

    // Slow mode for everyone: one danmaku per 30 s.
    star.send(json!({"t": "slow_mode", "seconds": 30})).await;
    star.next_of("ack").await;
    // Once the streamer sees the event, the node (one feed per room) has
    // applied it.
    while next_event(&mut star, "moderation").await["action"] != "slow_mode" {}
    let token = dev.token(room, "play", "wes").await;
    let mut wes = EventsClient::connect(&dev.node, room, &format!("token={token}"))
        .await
        .unwrap();
    assert_eq!(wes.danmaku("one", "s1").await["t"], "ack");
    let f = wes.danmaku("two", "s2").await;
    assert_eq!(f["code"], "slow_mode", "{f}");

    // An oversized frame closes that connection with a reason; others stay.
    wes.send_raw(Message::Text("x".repeat(10_000).into())).await;
    loop {
        let f = wes.next().await;
        if f["t"] == "closed" || f["t"] == "bye" {
            break;
        }
    }
    star.send(json!({"t": "ping"})).await;
    assert_eq!(star.next_of("pong").await["t"], "pong");

    // Nothing refused reached the room: a full replay holds only accepted
    // danmaku.
    let epoch = star.hello["epoch"].as_u64().unwrap();
    let mut replay = EventsClient::connect(
        &dev.node,
        room,
        &format!("token={viewer}&since=0&epoch={epoch}"),
    )
    .await
    .unwrap();
    let n = replay.hello["missed"].as_u64().unwrap() as usize;
    let all = events(&mut replay, n, 0).await;
    let danmaku: Vec<&str> = all
        .iter()
        .filter(|f| f["type"] == "danmaku")
        .map(|f| f["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        danmaku,
        [
            "welcome", "burst 0", "burst 1", "burst 2", "burst 3", "burst 4", "one"
        ]
    );
    assert!(dev.metric("weir_events_client_refused_total").await >= 10.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn likes_merge_into_counters_and_frames_default_to_msgpack() {
    let dev = DevServer::start();
    let room = "hearts";
    let token = dev.token(room, "play", "fan").await;
    let mut fan = EventsClient::connect_msgpack(&dev.node, room, &format!("token={token}"))
        .await
        .unwrap();
    assert_eq!(fan.hello["user"], "fan", "MessagePack hello decodes");
    for _ in 0..3 {
        fan.send(json!({"t": "like", "count": 10})).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let f = fan.next_of("counters").await;
        if f["likes"] == 30 {
            assert_eq!(f["online"], 1, "{f}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "likes not counted: {f}"
        );
    }
    // Thirty likes went on the bus as a few merged events, not thirty (the
    // counters above include likes not flushed yet: wait for the flush).
    let epoch = fan.hello["epoch"].as_u64().unwrap();
    loop {
        let mut replay = EventsClient::connect(
            &dev.node,
            room,
            &format!("token={token}&since=0&epoch={epoch}"),
        )
        .await
        .unwrap();
        let missed = replay.hello["missed"].as_u64().unwrap() as usize;
        let all = events(&mut replay, missed, 0).await;
        let likes: Vec<&Value> = all.iter().filter(|f| f["type"] == "likes").collect();
        let total: u64 = likes.iter().map(|f| f["delta"].as_u64().unwrap()).sum();
        if total == 30 {
            assert!(likes.len() <= 3, "{} events for 3 like frames", likes.len());
            assert!(likes.iter().all(|f| f["node"] == "dev" && f["users"] == 1));
            break;
        }
        assert!(total < 30, "more likes than sent: {total}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the likes were never published"
        );
        replay.close().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A running `weir node` on a JetStream bus.
struct BusNode {
    _proc: Proc,
    url: String,
}

fn start_node(dir: &std::path::Path, id: &str, nats: &str, key: &str, control: &str) -> BusNode {
    start_node_with(dir, id, nats, key, control, &[])
}

/// [`start_node`] with extra arguments.
fn start_node_with(
    dir: &std::path::Path,
    id: &str,
    nats: &str,
    key: &str,
    control: &str,
    extra: &[&str],
) -> BusNode {
    // A free port for the SRT listener (the socket is closed right away).
    let srt = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().to_string()
    };
    let proc = Proc::spawn(
        id,
        dir,
        &[
            "node",
            "--nats",
            nats,
            "--node-id",
            id,
            "--udp",
            "127.0.0.1:0",
            "--relay",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--srt",
            &srt,
            "--token-public-key",
            key,
            "--control-url",
            control,
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect::<Vec<_>>(),
    );
    let url = proc.wait_line("its metrics URL", |l| {
        l.strip_suffix("/metrics").map(str::to_owned)
    });
    BusNode { _proc: proc, url }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_two_nodes_see_one_sequence_and_survive_a_broker_restart() {
    let mut server = nats::Nats::start();
    let dir = common::temp_dir("bus-nodes");
    let control = Proc::spawn(
        "control",
        &dir,
        &[
            "control",
            "--grpc",
            "127.0.0.1:0",
            "--data-dir",
            dir.join("control").to_str().unwrap(),
            "--allow-token-minting",
        ],
    );
    let control_url = control.wait_line("its URL", |l| {
        l.starts_with("http://").then(|| l.trim().to_owned())
    });
    let key = control.wait_line("the token public key", |l| {
        l.starts_with("token public key")
            .then(|| l.split_whitespace().last().unwrap_or_default().to_owned())
    });
    let n1 = start_node(&dir, "n1", &server.url(), &key, &control_url);
    let n2 = start_node(&dir, "n2", &server.url(), &key, &control_url);
    let token = |user: &'static str| {
        let control_url = control_url.clone();
        async move {
            let body = json!({"room": "shared", "mode": "play", "subject": user}).to_string();
            let r = common::request(
                "POST",
                &format!("{control_url}/v1/tokens"),
                &[("Content-Type", "application/json")],
                body.as_bytes(),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            v["token"].as_str().unwrap().to_owned()
        }
    };
    let (ta, tb) = (token("ann").await, token("ben").await);
    let mut a = EventsClient::connect(&n1.url, "shared", &format!("token={ta}"))
        .await
        .unwrap();
    let mut b = EventsClient::connect(&n2.url, "shared", &format!("token={tb}"))
        .await
        .unwrap();
    assert_eq!(
        a.hello["epoch"], b.hello["epoch"],
        "one epoch: the stream's"
    );
    assert_eq!(a.hello["degraded"], false);

    for i in 0..3 {
        assert_eq!(
            a.danmaku(&format!("from n1 {i}"), &format!("a{i}")).await["t"],
            "ack"
        );
        assert_eq!(
            b.danmaku(&format!("from n2 {i}"), &format!("b{i}")).await["t"],
            "ack"
        );
    }
    let seen_a = danmaku(&mut a, 6, 0).await;
    let seen_b = danmaku(&mut b, 6, 0).await;

    // Friends across nodes: ann (on n1) follows ben (on n2); n2 names its
    // viewers in its online reports.
    for (path, body) in [
        ("/v1/users", json!({"id": "ann", "name": "Ann"})),
        ("/v1/users", json!({"id": "ben", "name": "Ben"})),
        ("/v1/follows", json!({"follower": "ann", "followee": "ben"})),
    ] {
        common::post_json_ok(&control_url, path, &body).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        a.send(json!({"t": "friends"})).await;
        let f = a.next_of("friends").await;
        if f["users"] == json!(["ben"]) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ben never showed up: {f}"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let seq = |v: &[Value]| -> Vec<(u64, String)> {
        v.iter()
            .map(|f| (offset(f), f["text"].as_str().unwrap().to_owned()))
            .collect()
    };
    assert_eq!(
        seq(&seen_a),
        seq(&seen_b),
        "both nodes deliver one sequence"
    );

    // The broker goes away: each node keeps its own clients talking,
    // marked degraded, and catches up when it returns.
    server.kill();
    assert_eq!(a.next_of("status").await["degraded"], true);
    let ack = a.danmaku("while away", "w").await;
    assert_eq!(
        (ack["t"].as_str(), ack["offset"].as_u64()),
        (Some("ack"), Some(0))
    );
    let local = a.next_of("local").await;
    assert_eq!(local["text"], "while away");
    let id = local["id"].as_str().unwrap().to_owned();
    server.restart();
    server.wait_healthy(nats::START_TIMEOUT).unwrap();
    assert_eq!(a.next_of("status").await["degraded"], false);
    // The queued danmaku reaches the bus once, with its id: n2's client gets
    // it as an ordinary event, n1's client as the confirmation of its local
    // copy.
    let last = offset(&seen_b[5]);
    let on_b = danmaku(&mut b, 1, last).await;
    assert_eq!(
        (on_b[0]["text"].as_str(), on_b[0]["id"].as_str()),
        (Some("while away"), Some(&*id))
    );
    let on_a = next_event(&mut a, "danmaku").await;
    assert_eq!(on_a["id"].as_str(), Some(&*id));
    assert_eq!(offset(&on_a), offset(&on_b[0]));
    drop((n1, n2));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_limits_follow_the_config_center_and_paid_gifts_reach_the_room() {
    let dev = DevServer::start();
    let room = "tuned";
    let token = dev.token(room, "play", "ada").await;
    let mut ada = EventsClient::connect(&dev.node, room, &format!("token={token}"))
        .await
        .unwrap();
    assert_eq!(ada.danmaku("buy spam now", "before").await["t"], "ack");

    // A bad value is refused and changes nothing; a good one applies at
    // once to the connected client (no reconnect).
    let bad = ctl(&dev.control, &["config", "set", "chat.conn_rate=fast"]);
    assert_eq!(bad.status.code(), Some(64), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("chat.conn_rate"));
    let ok = ctl(
        &dev.control,
        &["config", "set", "chat.blocked_words=Spam,scam"],
    );
    assert!(ok.status.success(), "{ok:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let f = ada.danmaku("more spam", "after").await;
        if f["t"] == "refused" {
            assert_eq!(f["code"], "moderated", "{f}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the config never applied"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(ada.danmaku("all good", "clean").await["t"], "ack");

    // A paid gift shows in the room once, through the outbox relay and the
    // in-process bus of `weir dev`.
    for (path, body) in [
        ("/v1/users", json!({"id": "ada", "name": "Ada"})),
        ("/v1/users", json!({"id": "host", "name": "Host"})),
        (
            "/v1/rooms",
            json!({"id": room, "owner": "host", "title": "Tuned"}),
        ),
    ] {
        common::post_json_ok(&dev.control, path, &body).await;
    }
    let grant = ctl(
        &dev.control,
        &["wallet", "grant", "ada", "100", "--key", "k1"],
    );
    assert!(grant.status.success(), "{grant:?}");
    let body = json!({"gift": "rose", "count": 2, "idempotency_key": "g1"}).to_string();
    let auth = format!("Bearer {token}");
    for _ in 0..2 {
        let r = common::request(
            "POST",
            &format!("{}/v1/rooms/{room}/gifts", dev.control),
            &[
                ("content-type", "application/json"),
                ("authorization", &auth),
            ],
            body.as_bytes(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let gift = next_event(&mut ada, "gift").await;
    assert_eq!(
        (gift["from_user"].as_str(), gift["count"].as_u64()),
        (Some("ada"), Some(2))
    );
    assert_eq!(
        gift["id"], gift["gift_id"],
        "the bus message id is the gift id"
    );
    // The retry charged nothing and showed nothing more.
    ada.send(json!({"t": "ping"})).await;
    loop {
        let f = ada.next_significant().await;
        assert!(
            !(f["t"] == "event" && f["type"] == "gift"),
            "a gift twice: {f}"
        );
        if f["t"] == "pong" {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_connected_anywhere_hear_when_a_streamer_goes_live() {
    let dev = DevServer::start();
    let post = |path: &'static str, body: Value| {
        let control = dev.control.clone();
        async move { common::post_json_ok(&control, path, &body).await }
    };
    for user in ["star", "fan", "other"] {
        post("/v1/users", json!({"id": user, "name": user})).await;
    }
    post(
        "/v1/follows",
        json!({"follower": "fan", "followee": "star"}),
    )
    .await;
    post(
        "/v1/rooms",
        json!({"id": "stage", "owner": "star", "title": "Opening night"}),
    )
    .await;

    // Both watch some other room; only the follower is told.
    let fan_token = dev.token("lobby", "play", "fan").await;
    let other_token = dev.token("lobby", "play", "other").await;
    let mut fan = EventsClient::connect(&dev.node, "lobby", &format!("token={fan_token}"))
        .await
        .unwrap();
    let mut other = EventsClient::connect(&dev.node, "lobby", &format!("token={other_token}"))
        .await
        .unwrap();
    // The reserved notices room cannot be joined.
    let refused = EventsClient::connect(&dev.node, "_notices", &format!("token={fan_token}"))
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 400, "{}", refused.body);

    post("/v1/rooms/stage/live", json!({})).await;
    let notice = fan.next_of("notice").await;
    assert_eq!(notice["type"], "go_live", "{notice}");
    assert_eq!(
        (
            notice["streamer"].as_str(),
            notice["room"].as_str(),
            notice["title"].as_str()
        ),
        (Some("star"), Some("stage"), Some("Opening night"))
    );
    // Announced again each second for a minute by the leader, delivered
    // once: the broker drops the repeats by message id.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for client in [&mut fan, &mut other] {
        client.send(json!({"t": "ping"})).await;
        loop {
            let f = client.next().await;
            assert_ne!(
                f["t"], "notice",
                "a notice twice, or to a non-follower: {f}"
            );
            if f["t"] == "pong" {
                break;
            }
        }
    }
    assert_eq!(dev.metric("weir_go_live_delivered_total").await, 1.0);

    // Friends in a room: the people I follow who are here.
    post(
        "/v1/follows",
        json!({"follower": "fan", "followee": "other"}),
    )
    .await;
    let star_token = dev.token("lobby", "play", "star").await;
    let _star = EventsClient::connect(&dev.node, "lobby", &format!("token={star_token}"))
        .await
        .unwrap();
    fan.send(json!({"t": "friends"})).await;
    let friends = fan.next_of("friends").await;
    assert_eq!(friends["users"], json!(["other", "star"]), "{friends}");
    other.send(json!({"t": "friends"})).await;
    assert_eq!(other.next_of("friends").await["users"], json!([]));
}

const NODE_SECRET: &str = "test-node-secret-0123456789";

/// The like total the control plane holds for `room` (`None`: no row yet),
/// read through the nodes' own call.
async fn stored_likes(control: &str, room: &str) -> Option<u64> {
    let body = json!({"node": "test", "read": [room]}).to_string();
    let r = common::request(
        "POST",
        &format!("{control}/v1/room-stats/likes"),
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {NODE_SECRET}")),
        ],
        body.as_bytes(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    v["rows"][0]["likes"].as_u64()
}

/// Reads `counters` frames until one shows `likes`; fails on more, or on
/// none within 20 s.
async fn wait_counters(client: &mut EventsClient, likes: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let f = client.next_of("counters").await;
        let shown = f["likes"].as_u64().unwrap();
        assert!(shown <= likes, "more likes shown than sent: {f}");
        if shown == likes {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "likes never reached {likes}: {f}"
        );
    }
}

/// Polls the control plane until it holds `likes` for `room`; fails on more.
async fn wait_stored(control: &str, room: &str, likes: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stored = stored_likes(control, room).await;
        assert!(
            stored.unwrap_or(0) <= likes,
            "counted twice: {stored:?} > {likes}"
        );
        if stored == Some(likes) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the control plane never held {likes} likes: {stored:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Likes on two nodes of one room are persisted once (both nodes claim the
/// same ranges; the compare-and-set lets one win each), survive both nodes
/// dying and the bus's retention passing, and a fresh node shows the total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn like_totals_survive_node_deaths_and_bus_retention() {
    let server = nats::Nats::start();
    let dir = common::temp_dir("likes");
    let control = Proc::spawn(
        "control",
        &dir,
        &[
            "control",
            "--grpc",
            "127.0.0.1:0",
            "--data-dir",
            dir.join("control").to_str().unwrap(),
            "--allow-token-minting",
            "--node-secret",
            NODE_SECRET,
        ],
    );
    let control_url = control.wait_line("its URL", |l| {
        l.starts_with("http://").then(|| l.trim().to_owned())
    });
    let key = control.wait_line("the token public key", |l| {
        l.starts_with("token public key")
            .then(|| l.split_whitespace().last().unwrap_or_default().to_owned())
    });
    // Each room keeps 20 events on the bus; batches every second.
    let args = [
        "--node-secret",
        NODE_SECRET,
        "--likes-persist-every",
        "1",
        "--room-history",
        "20",
    ];
    let node = |id: &str| start_node_with(&dir, id, &server.url(), &key, &control_url, &args);
    let mut n1 = node("n1");
    let mut n2 = node("n2");
    let room = "tally";
    let token = |user: &'static str| {
        let control_url = control_url.clone();
        async move {
            let body = json!({"room": room, "mode": "play", "subject": user}).to_string();
            let r = common::request(
                "POST",
                &format!("{control_url}/v1/tokens"),
                &[("Content-Type", "application/json")],
                body.as_bytes(),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            v["token"].as_str().unwrap().to_owned()
        }
    };
    let mut a = EventsClient::connect(&n1.url, room, &format!("token={}", token("ann").await))
        .await
        .unwrap();
    let mut b = EventsClient::connect(&n2.url, room, &format!("token={}", token("ben").await))
        .await
        .unwrap();
    for _ in 0..3 {
        a.send(json!({"t": "like", "count": 10})).await;
    }
    for _ in 0..2 {
        b.send(json!({"t": "like", "count": 5})).await;
    }
    wait_counters(&mut a, 40).await;
    wait_counters(&mut b, 40).await;
    wait_stored(&control_url, room, 40).await;
    // Both nodes keep claiming every second: still 40, not 80.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(stored_likes(&control_url, room).await, Some(40));

    // Both nodes die; then more than the bus keeps of the room goes by, so
    // no likes event is left on the bus.
    n1._proc.kill9();
    n2._proc.kill9();
    drop((a, b));
    let bus = weir_data_plane::bus::NatsBus::connect(
        &server.url(),
        weir_protocol::bus::Retention {
            max_per_room: 20,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let room_id = weir_protocol::RoomId::parse(room).unwrap();
    for i in 0..30 {
        let event = weir_protocol::bus::RoomEvent {
            at_ms: 1,
            body: weir_protocol::bus::EventBody::Danmaku {
                user: "chatter".into(),
                text: format!("line {i}"),
            },
        };
        weir_protocol::bus::BusPublisher::publish(&bus, &room_id, &event, None)
            .await
            .unwrap();
    }

    // A fresh node shows the stored total, and counts on from it.
    let n3 = node("n3");
    let mut c = EventsClient::connect(&n3.url, room, &format!("token={}", token("cat").await))
        .await
        .unwrap();
    wait_counters(&mut c, 40).await;
    c.send(json!({"t": "like", "count": 7})).await;
    wait_counters(&mut c, 47).await;
    wait_stored(&control_url, room, 47).await;
    drop(n3);
    let _ = std::fs::remove_dir_all(&dir);
}
