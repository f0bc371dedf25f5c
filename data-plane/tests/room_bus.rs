//! The room bus contract, one suite run on both implementations: the
//! in-process bus and NATS JetStream (a real nats-server, one server; the
//! 3-server cluster in its own test). Ordering, offsets per room, duplicate
//! drop by message id, reads after an offset, `Gone` beyond retention,
//! subscriptions from an offset, and the epoch.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/nats.rs"]
mod nats;

use std::sync::Arc;
use std::time::Duration;

use weir_data_plane::bus::{LocalBus, NatsBus};
use weir_protocol::RoomId;
use weir_protocol::bus::{BusError, BusPublisher, EventBody, Retention, RoomBus, RoomEvent};

fn danmaku(text: &str) -> RoomEvent {
    RoomEvent {
        at_ms: 1,
        body: EventBody::Danmaku {
            user: "u".into(),
            text: text.into(),
        },
    }
}

fn text(e: &RoomEvent) -> &str {
    match &e.body {
        EventBody::Danmaku { text, .. } => text,
        other => panic!("not a danmaku: {other:?}"),
    }
}

/// Retention of the suite: 5 events per room.
const RETENTION: Retention = Retention {
    max_per_room: 5,
    max_age_s: 3600,
    duplicate_window_s: 60,
};

async fn conformance(bus: Arc<dyn RoomBus>) {
    let a = RoomId::parse("room.a").unwrap();
    let b = RoomId::parse("room-b").unwrap();
    let epoch = bus.epoch().await.unwrap();
    assert_ne!(epoch, 0);
    assert!(epoch < 1 << 53, "JavaScript clients hold the epoch exactly");
    assert_eq!(bus.last_offset(&a).await.unwrap(), 0);
    assert_eq!(bus.read_after(&a, 0, 10).await.unwrap(), vec![]);

    // A subscription made before anything is published sees it all.
    let mut sub = bus.subscribe(&a, 0).await.unwrap();

    let p1 = bus.publish(&a, &danmaku("a1"), Some("id-1")).await.unwrap();
    let pb = bus.publish(&b, &danmaku("b1"), None).await.unwrap();
    let p2 = bus.publish(&a, &danmaku("a2"), None).await.unwrap();
    assert_eq!(p1.epoch, epoch);
    assert!(!p1.duplicate && !p2.duplicate && !pb.duplicate);
    assert!(p2.offset > p1.offset, "offsets grow within a room");

    // The same message id again: nothing stored, the first offset answered.
    let dup = bus
        .publish(&a, &danmaku("a1 again"), Some("id-1"))
        .await
        .unwrap();
    assert!(dup.duplicate);
    assert_eq!(dup.offset, p1.offset);

    let all = bus.read_after(&a, 0, 10).await.unwrap();
    assert_eq!(
        all.iter().map(|d| text(&d.event)).collect::<Vec<_>>(),
        ["a1", "a2"],
        "rooms are separate and duplicates dropped"
    );
    assert_eq!(all[0].msg_id.as_deref(), Some("id-1"));
    assert_eq!(all[1].msg_id, None);
    assert_eq!(bus.last_offset(&a).await.unwrap(), p2.offset);
    let after_first = bus.read_after(&a, p1.offset, 10).await.unwrap();
    assert_eq!(after_first.len(), 1);
    assert_eq!(after_first[0].offset, p2.offset);
    assert_eq!(bus.read_after(&a, p2.offset, 10).await.unwrap(), vec![]);

    for want in ["a1", "a2"] {
        let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("a subscription delivers")
            .unwrap();
        assert_eq!(text(&d.event), want);
    }

    // A subscription from an offset gets what follows it, then live events.
    let mut from_p1 = bus.subscribe(&a, p1.offset).await.unwrap();
    let p3 = bus.publish(&a, &danmaku("a3"), None).await.unwrap();
    for want in [p2.offset, p3.offset] {
        let d = tokio::time::timeout(Duration::from_secs(5), from_p1.next())
            .await
            .expect("a subscription from an offset delivers")
            .unwrap();
        assert_eq!(d.offset, want);
    }
    let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.offset, p3.offset, "live events reach every subscription");

    // Past retention (5 per room): the oldest go, and reading after one of
    // them says so instead of returning a silent gap.
    let mut last = p3.offset;
    for i in 4..=9 {
        last = bus
            .publish(&a, &danmaku(&format!("a{i}")), None)
            .await
            .unwrap()
            .offset;
    }
    assert_eq!(
        bus.read_after(&a, p1.offset, 10).await,
        Err(BusError::Gone { after: p1.offset })
    );
    let held = bus.read_after(&a, 0, 10).await.unwrap();
    assert_eq!(
        held.iter().map(|d| text(&d.event)).collect::<Vec<_>>(),
        ["a5", "a6", "a7", "a8", "a9"]
    );
    let from_a5 = bus.read_after(&a, held[0].offset, 10).await.unwrap();
    assert_eq!(from_a5.len(), 4, "an offset still held reads fine");
    assert_eq!(bus.read_after(&a, last, 10).await.unwrap(), vec![]);
    // An offset that was never given (past the newest) is no recovery point.
    assert!(matches!(
        bus.read_after(&a, last + 1000, 10).await,
        Err(BusError::Gone { .. })
    ));
    // Room b is untouched by a's retention.
    assert_eq!(bus.read_after(&b, 0, 10).await.unwrap().len(), 1);
    assert_eq!(bus.epoch().await.unwrap(), epoch, "the epoch is stable");
}

#[tokio::test]
async fn in_process_bus_keeps_the_contract() {
    conformance(Arc::new(LocalBus::new(RETENTION))).await;
    assert_ne!(
        LocalBus::new(RETENTION).epoch().await.unwrap(),
        LocalBus::new(RETENTION).epoch().await.unwrap(),
        "every in-process bus is a new epoch"
    );
}

#[tokio::test]
async fn jetstream_bus_keeps_the_contract() {
    let server = nats::Nats::start();
    let bus = NatsBus::connect(&server.url(), RETENTION).await.unwrap();
    conformance(Arc::new(bus)).await;
}

#[tokio::test]
async fn jetstream_bus_survives_a_broker_restart() {
    let mut server = nats::Nats::start();
    let bus = NatsBus::connect(&server.url(), RETENTION).await.unwrap();
    let room = RoomId::parse("r").unwrap();
    let first = bus.publish(&room, &danmaku("before"), None).await.unwrap();
    let mut sub = bus.subscribe(&room, first.offset).await.unwrap();

    server.kill();
    let down = bus.publish(&room, &danmaku("while down"), None).await;
    assert!(
        matches!(down, Err(BusError::Unavailable(_))),
        "a publish without a broker fails plainly: {down:?}"
    );
    server.restart();
    server.wait_healthy(nats::START_TIMEOUT).unwrap();

    // The client reconnects on its own; the stream (file storage) kept its
    // events and its epoch.
    let mut again = None;
    for _ in 0..100 {
        match bus.publish(&room, &danmaku("after"), None).await {
            Ok(p) => {
                again = Some(p);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let again = again.expect("publishing works again after the broker returns");
    assert_eq!(again.epoch, first.epoch);
    let held = bus.read_after(&room, first.offset, 10).await.unwrap();
    assert_eq!(
        held.iter().map(|d| text(&d.event)).collect::<Vec<_>>(),
        ["after"]
    );
    // The old subscription either delivers it (the ordered consumer
    // recovered) or reports the loss, so its owner subscribes again.
    match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
        Ok(Ok(d)) => assert_eq!(d.offset, again.offset),
        Ok(Err(e)) => assert!(matches!(e, BusError::Unavailable(_)), "{e:?}"),
        Err(_) => panic!("a subscription neither delivered nor failed after the broker came back"),
    }
}

#[tokio::test]
async fn jetstream_cluster_replicates_the_room_stream() {
    let cluster = nats::NatsCluster::start();
    let bus = NatsBus::connect(&cluster.urls(), RETENTION).await.unwrap();
    let room = RoomId::parse("r3").unwrap();
    // The meta leader may take a moment after start.
    let mut published = None;
    for _ in 0..100 {
        match bus.publish(&room, &danmaku("x"), Some("m1")).await {
            Ok(p) => {
                published = Some(p);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let p = published.expect("the cluster takes a publish");
    // A second client, on another server of the cluster, reads the same.
    let other = NatsBus::connect(&cluster.servers[2].url(), RETENTION)
        .await
        .unwrap();
    assert_eq!(other.epoch().await.unwrap(), p.epoch);
    let held = other.read_after(&room, 0, 10).await.unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].offset, p.offset);
    assert_eq!(held[0].msg_id.as_deref(), Some("m1"));
    assert!(
        other
            .publish(&room, &danmaku("x"), Some("m1"))
            .await
            .unwrap()
            .duplicate,
        "duplicates are dropped cluster-wide"
    );
}
