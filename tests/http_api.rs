//! The node's WHIP/WHEP HTTP surface against bad input: each refusal is a
//! clear 4xx with a message, and the node keeps serving afterwards. Also
//! what a publisher's WHIP takeover keeps (the room's origin).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{DevServer, Response, offer, request};

const T: Duration = Duration::from_secs(10);

async fn call(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    request(method, url, headers, body, T).await.unwrap()
}

fn assert_refused(r: &Response, status: u16, needle: &str) {
    assert_eq!(r.status, status, "body: {}", r.text());
    assert!(
        r.text().to_lowercase().contains(&needle.to_lowercase()),
        "expected {needle:?} in {:?}",
        r.text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn whip_and_whep_refuse_bad_input_clearly_and_keep_serving() {
    weir_data_plane::install_crypto_provider();
    let dev = DevServer::start();
    let base = &dev.node;
    let publish = dev.token("room1", "publish", "alice").await;
    let play = dev.token("room1", "play", "v1").await;
    let other_room = dev.token("room2", "publish", "alice").await;
    let bearer = |t: &str| format!("Bearer {t}");
    let (pb, vb, ob) = (bearer(&publish), bearer(&play), bearer(&other_room));
    let sdp = ("Content-Type", "application/sdp");
    let whip = format!("{base}/whip/room1");
    let whep = format!("{base}/whep/room1");
    let pub_offer = offer(true);

    // Tokens.
    let r = call("POST", &whip, &[sdp], pub_offer.as_bytes()).await;
    assert_refused(&r, 401, "missing Authorization");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = call(
        "POST",
        &whip,
        &[sdp, ("Authorization", "Bearer w1.garbage.sig")],
        pub_offer.as_bytes(),
    )
    .await;
    assert_refused(&r, 401, "malformed");
    let r = call(
        "POST",
        &whip,
        &[sdp, ("Authorization", "Basic abc")],
        pub_offer.as_bytes(),
    )
    .await;
    assert_refused(&r, 401, "Bearer");
    let r = call(
        "POST",
        &whip,
        &[sdp, ("Authorization", &vb)],
        pub_offer.as_bytes(),
    )
    .await;
    assert_refused(&r, 403, "allows Play");
    let r = call(
        "POST",
        &whip,
        &[sdp, ("Authorization", &ob)],
        pub_offer.as_bytes(),
    )
    .await;
    assert_refused(&r, 403, "room2");

    // Bodies.
    let r = call(
        "POST",
        &whip,
        &[("Content-Type", "text/plain"), ("Authorization", &pb)],
        pub_offer.as_bytes(),
    )
    .await;
    assert_refused(&r, 415, "application/sdp");
    let r = call(
        "POST",
        &whip,
        &[("Authorization", &pb)],
        pub_offer.as_bytes(),
    )
    .await;
    assert_refused(&r, 415, "application/sdp");
    let big = vec![b'a'; 70 * 1024];
    let r = call("POST", &whip, &[sdp, ("Authorization", &pb)], &big).await;
    assert_refused(&r, 413, "larger than");
    let r = call(
        "POST",
        &whip,
        &[sdp, ("Authorization", &pb)],
        b"v=0\r\nthis is not sdp",
    )
    .await;
    assert_refused(&r, 400, "invalid SDP offer");
    let r = call(
        "POST",
        &whip,
        &[sdp, ("Authorization", &pb)],
        &[0xff, 0xfe, 0x00],
    )
    .await;
    assert_refused(&r, 400, "UTF-8");
    // A viewer's offer sent to WHIP publishes nothing.
    let r = call(
        "POST",
        &whip,
        &[sdp, ("Authorization", &pb)],
        offer(false).as_bytes(),
    )
    .await;
    assert_refused(&r, 400, "no audio or video to publish");
    let r = call(
        "POST",
        &format!("{base}/whip/bad%20room"),
        &[sdp, ("Authorization", &pb)],
        b"x",
    )
    .await;
    assert_refused(&r, 400, "bad room");

    // Sessions that do not exist.
    let r = call(
        "DELETE",
        &format!("{whip}/0123456789abcdef"),
        &[("Authorization", &pb)],
        b"",
    )
    .await;
    assert_refused(&r, 404, "no such session");
    let r = call(
        "DELETE",
        &format!("{whip}/not%20an%20id"),
        &[("Authorization", &pb)],
        b"",
    )
    .await;
    assert_refused(&r, 404, "no such session");
    let r = call("DELETE", &format!("{whip}/0123456789abcdef"), &[], b"").await;
    assert_refused(&r, 401, "missing Authorization");

    // Methods.
    let r = call("GET", &whip, &[], b"").await;
    assert_refused(&r, 405, "not allowed");
    assert_eq!(r.header("allow"), Some("POST, OPTIONS"));
    let r = call("PUT", &format!("{whip}/0123456789abcdef"), &[], b"").await;
    assert_refused(&r, 405, "not allowed");
    let r = call("OPTIONS", &whip, &[], b"").await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("accept-post"), Some("application/sdp"));
    // A WHEP layer cap that is no layer name, or a query it does not know.
    for (query, needle) in [
        ("layer=much-too-long", "bad layer"),
        ("layer=3%2060p", "bad layer"),
        ("layer=", "bad layer"),
        ("lyr=360p", "known: layer"),
    ] {
        let r = call(
            "POST",
            &format!("{whep}?{query}"),
            &[sdp, ("Authorization", &vb)],
            offer(false).as_bytes(),
        )
        .await;
        assert_refused(&r, 400, needle);
    }
    // CORS preflight, as a browser on another origin sends it.
    let r = call(
        "OPTIONS",
        &whep,
        &[
            ("Origin", "http://example.test"),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization,content-type",
            ),
        ],
        b"",
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    let allowed = r
        .header("access-control-allow-headers")
        .unwrap()
        .to_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );

    // After all that, the real flow works: publish, play, PATCH, DELETE.
    let r = call(
        "POST",
        &whip,
        &[
            sdp,
            ("Authorization", &pb),
            ("Origin", "http://example.test"),
        ],
        pub_offer.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(r.text().starts_with("v=0"));
    assert_eq!(r.header("content-type"), Some("application/sdp"));
    let expose = r
        .header("access-control-expose-headers")
        .unwrap()
        .to_lowercase();
    assert!(expose.contains("location"), "{expose}");
    let location = r.header("location").unwrap().to_owned();
    assert!(location.starts_with("/whip/room1/"), "{location}");

    // Another streamer is refused while the room has a publisher; the owner takes over.
    let mallory = bearer(&dev.token("room1", "publish", "mallory").await);
    let r = call(
        "POST",
        &whip,
        &[sdp, ("Authorization", &mallory)],
        offer(true).as_bytes(),
    )
    .await;
    assert_refused(&r, 409, "already has a publisher");
    let r = call(
        "POST",
        &whip,
        &[sdp, ("Authorization", &pb)],
        offer(true).as_bytes(),
    )
    .await;
    assert_eq!(r.status, 201, "the same owner takes over: {}", r.text());
    let r2 = call(
        "DELETE",
        &format!("{base}{location}"),
        &[("Authorization", &pb)],
        b"",
    )
    .await;
    assert_refused(&r2, 404, "no such session");
    let location = r.header("location").unwrap().to_owned();

    let r = call(
        "POST",
        &whep,
        &[sdp, ("Authorization", &vb)],
        offer(false).as_bytes(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let viewer = r.header("location").unwrap().to_owned();
    assert!(viewer.starts_with("/whep/room1/"));
    let frag = ("Content-Type", "application/trickle-ice-sdpfrag");
    let r = call(
        "PATCH",
        &format!("{base}{viewer}"),
        &[sdp, ("Authorization", &vb)],
        b"a=end-of-candidates\r\n",
    )
    .await;
    assert_refused(&r, 415, "trickle-ice-sdpfrag");
    let r = call(
        "PATCH",
        &format!("{base}{viewer}"),
        &[frag, ("Authorization", &vb)],
        b"a=ice-ufrag:zzzz\r\n",
    )
    .await;
    assert_refused(&r, 422, "ICE restart");
    let r = call(
        "PATCH",
        &format!("{base}{viewer}"),
        &[frag, ("Authorization", &vb)],
        b"a=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\n",
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    // A viewer's token cannot end the publisher's session.
    let r = call(
        "DELETE",
        &format!("{base}{location}"),
        &[("Authorization", &vb)],
        b"",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    for loc in [&viewer, &location] {
        let token = if loc.starts_with("/whip") { &pb } else { &vb };
        let r = call(
            "DELETE",
            &format!("{base}{loc}"),
            &[("Authorization", token)],
            b"",
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let r = call(
            "DELETE",
            &format!("{base}{loc}"),
            &[("Authorization", token)],
            b"",
        )
        .await;
        assert_eq!(r.status, 404, "a deleted session is gone");
    }
    let r = call("GET", &format!("{base}/readyz"), &[], b"").await;
    assert_eq!(r.status, 200);
    // Request ids come back on every answer.
    assert!(r.header("x-request-id").is_some_and(|v| !v.is_empty()));
}

/// `POST /rooms/{room}/qoe`: viewers' reports become the `weir_viewer_*`
/// series; bad reports, tokens and rooms are refused with a reason and
/// count for nothing.
#[tokio::test(flavor = "multi_thread")]
async fn qoe_reports_become_metrics_and_bad_ones_change_nothing() {
    let dev = DevServer::start();
    let url = format!("{}/rooms/show/qoe", dev.node);
    let play = format!("Bearer {}", dev.token("show", "play", "v1").await);
    let other = format!("Bearer {}", dev.token("other", "play", "v1").await);
    let json = ("Content-Type", "application/json");
    let good = br#"{"protocol":"webrtc","played_ms":5000,"stalls":2,"stall_ms":700,"ttff_ms":350,"av_sync_ms":-40}"#;

    let r = call("POST", &url, &[json], good).await;
    assert_refused(&r, 401, "missing Authorization");
    let r = call("POST", &url, &[json, ("Authorization", &other)], good).await;
    assert_refused(&r, 403, "other");
    let bad: [(&[u8], &str); 8] = [
        (br#"{"protocol":"rtmp","played_ms":1}"#, "protocol must be"),
        (br#"{"protocol":"hls","played_ms":999999}"#, "played_ms"),
        (
            br#"{"protocol":"hls","played_ms":10,"stall_ms":5}"#,
            "without stalls",
        ),
        (
            br#"{"protocol":"hls","played_ms":10,"stalls":5000,"stall_ms":5}"#,
            "stalls",
        ),
        (
            br#"{"protocol":"hls","played_ms":10,"av_sync_ms":99999}"#,
            "av_sync_ms",
        ),
        (
            br#"{"protocol":"hls","played_ms":10,"extra":1}"#,
            "unknown field",
        ),
        (br#"{"protocol":"hls","played_ms":-1}"#, "bad QoE report"),
        (b"not json", "bad QoE report"),
    ];
    for (body, needle) in bad {
        let r = call("POST", &url, &[json, ("Authorization", &play)], body).await;
        assert_refused(&r, 400, needle);
    }
    assert_eq!(dev.metric("weir_viewer_reports_total").await, 0.0);

    let r = call("POST", &url, &[json, ("Authorization", &play)], good).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let hls = br#"{"protocol":"hls","played_ms":3000}"#;
    let r = call("POST", &url, &[json, ("Authorization", &play)], hls).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(dev.metric("weir_viewer_reports_total").await, 2.0);
    assert_eq!(dev.metric("weir_viewer_played_ms_total").await, 8000.0);
    assert_eq!(
        dev.metric_with("weir_viewer_stalls_total", "protocol=\"webrtc\"")
            .await,
        2.0
    );
    assert_eq!(dev.metric("weir_viewer_stall_ms_total").await, 700.0);
    assert_eq!(dev.metric("weir_viewer_ttff_seconds_count").await, 1.0);
    assert_eq!(dev.metric("weir_viewer_av_offset_seconds_count").await, 1.0);
}

/// `/debug/pprof/profile` on the node and on the control plane: a
/// flamegraph of the whole process; bad durations are refused.
#[tokio::test(flavor = "multi_thread")]
async fn both_planes_serve_a_cpu_profile() {
    let dev = DevServer::start();
    for base in [&dev.node, &dev.control] {
        let r = call(
            "GET",
            &format!("{base}/debug/pprof/profile?seconds=0"),
            &[],
            b"",
        )
        .await;
        assert_refused(&r, 400, "seconds must be");
        // One second of sampling, then symbolizing a debug build for the
        // flamegraph, which on two cores busy with other tests took over 10 s.
        let r = request(
            "GET",
            &format!("{base}/debug/pprof/profile?seconds=1"),
            &[],
            b"",
            Duration::from_secs(90),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{base}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("image/svg+xml"));
        assert!(
            r.text().contains("<svg"),
            "{base}: {}",
            &r.text()[..r.text().len().min(300)]
        );
    }
}

/// Whether `weir ctl rooms list` reports the room live (from the nodes'
/// load reports), and its origin.
fn room_state(control: &str, room: &str) -> (bool, Option<String>) {
    let out = common::ctl(control, &["--json", "rooms", "list"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = v["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["room"] == room);
    (
        r.is_some_and(|r| r["live"] == true),
        r.and_then(|r| r["origin_node"].as_str().map(str::to_owned)),
    )
}

/// An encoder that reconnects takes over its own session at once; while the
/// new session is still connecting nobody publishes the room, and its
/// origin must stay (the scheduler keeps sending viewers here, edges keep
/// pulling it). The node gave it up at its next load report, and nothing
/// claimed it back.
#[tokio::test(flavor = "multi_thread")]
async fn a_publisher_taking_over_keeps_the_rooms_origin_while_it_connects() {
    let dev = DevServer::start();
    let room = "takeover";
    let clip = weir_loadtest::Clip::read_ivf(
        &weir_loadtest::Clip::generate(&dev.dir, 320, 240, 150)
            .expect("ffmpeg generates the test clip"),
    )
    .unwrap();
    let target = weir_loadtest::assign_publisher(&dev.control, room)
        .await
        .unwrap();
    let publisher = {
        let target = target.clone();
        tokio::spawn(async move {
            let until = std::time::Instant::now() + Duration::from_secs(20);
            weir_loadtest::publisher::run(&target, &clip, "127.0.0.1".parse().unwrap(), until).await
        })
    };
    // Live, as a load report (one a second) said.
    let started = std::time::Instant::now();
    while !room_state(&dev.control, room).0 {
        assert!(started.elapsed() < T, "the room never went live");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(room_state(&dev.control, room).1.as_deref(), Some("dev"));

    // The same owner takes over with a session that never connects.
    let r = call(
        "POST",
        &target.whip_url,
        &[
            ("Content-Type", "application/sdp"),
            ("Authorization", &format!("Bearer {}", target.token)),
        ],
        offer(true).as_bytes(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    // Three load reports without a live publisher: the origin stays.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (live, origin) = room_state(&dev.control, room);
    assert!(
        !live,
        "nobody publishes the room while the new session connects"
    );
    assert_eq!(
        origin.as_deref(),
        Some("dev"),
        "the origin went while the publisher was reconnecting; log:\n{}",
        dev.log()
    );
    publisher.abort();
}
