//! The outbox relay against a real NATS JetStream (Debian's nats-server,
//! started per test; the test fails, never skips, when it is not
//! installed): gifts paid while the broker is down are published once it
//! returns, each exactly once in the stream with the gift id as its message
//! id; a repeated publish of a gift is acked as a duplicate and stores
//! nothing; and with two control-plane replicas only the elected one relays.
#![allow(clippy::unwrap_used)]

// The data plane's file, formatted by its owners (rustfmt would otherwise
// reformat it from here).
#[rustfmt::skip]
#[path = "../../data-plane/tests/support/nats.rs"]
mod nats;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use tokio::sync::Notify;
use weir_control_plane::bus::NatsPublisher;
use weir_control_plane::election::{ElectionBackend, campaign};
use weir_control_plane::outbox::{relay, relay_pass};
use weir_control_plane::service::{RequestId, SendGiftRequest};
use weir_control_plane::store::{Gift, NewGift, NewRoom, Store, UserId};
use weir_control_plane::{ControlConfig, ControlState, LocalCoordinator, TokenIssuer};
use weir_protocol::bus::{
    BusPublisher, EventBody, Retention, RoomEvent, STREAM, room_subject, subject_room,
};
use weir_protocol::{Mode, RoomId, TokenSigner};

/// A guard against a hang, not a measurement: CI machines are slow.
const PATIENCE: Duration = Duration::from_secs(90);

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn store() -> (TempDir, Store) {
    let dir = std::env::temp_dir().join(format!("weir-outbox-{}", uuid::Uuid::new_v4().simple()));
    let store = Store::connect(
        &weir_control_plane::store::sqlite_url(&dir.join("weir.db")),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    for u in ["streamer", "singer", "fan"] {
        store
            .create_user(Some(UserId::parse(u).unwrap()), u)
            .await
            .unwrap();
    }
    for (room, owner) in [("stage", "streamer"), ("dot.room", "singer")] {
        store
            .create_room(NewRoom {
                id: RoomId::parse(room).unwrap(),
                owner: UserId::parse(owner).unwrap(),
                title: room.into(),
                scheduled_start_ms: None,
            })
            .await
            .unwrap();
    }
    store
        .grant(&UserId::parse("fan").unwrap(), 100_000, "dep")
        .await
        .unwrap();
    (TempDir(dir), store)
}

async fn send(store: &Store, room: &str, key: &str) -> Gift {
    store
        .send_gift(&NewGift {
            room: RoomId::parse(room).unwrap(),
            from: UserId::parse("fan").unwrap(),
            gift: "rose".into(),
            count: 1,
            idempotency_key: key.into(),
        })
        .await
        .unwrap()
        .gift
}

/// Polls `check` until it holds; panics after [`PATIENCE`] with `what`.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every message of the stream: gift id (its `Nats-Msg-Id`) → (sequence,
/// room, event).
async fn read_stream(url: &str) -> BTreeMap<String, Vec<(u64, RoomId, RoomEvent)>> {
    let client = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(client);
    let mut stream = js.get_stream(STREAM).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut out: BTreeMap<String, Vec<_>> = BTreeMap::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let m = stream.get_raw_message(seq).await.unwrap();
        let id = m
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .unwrap()
            .as_str()
            .to_owned();
        let room = subject_room(m.subject.as_str()).unwrap();
        let event = RoomEvent::decode(&m.payload).unwrap();
        out.entry(id).or_default().push((seq, room, event));
    }
    out
}

/// The stream holds each gift exactly once, on its room's subject, as the
/// event the gift row describes.
fn assert_once_each(stream: &BTreeMap<String, Vec<(u64, RoomId, RoomEvent)>>, gifts: &[Gift]) {
    assert_eq!(stream.len(), gifts.len(), "{stream:?}");
    for g in gifts {
        let copies = &stream[&g.id];
        assert_eq!(
            copies.len(),
            1,
            "gift {} stored {} times",
            g.id,
            copies.len()
        );
        let (_, room, event) = &copies[0];
        assert_eq!(room, &g.room);
        assert_eq!(event, &g.event());
        assert!(matches!(&event.body, EventBody::Gift { gift_id, .. } if gift_id == &g.id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gifts_paid_while_the_bus_is_down_are_published_once_it_returns() {
    let mut nats = tokio::task::spawn_blocking(nats::Nats::start)
        .await
        .unwrap();
    let url = nats.url();
    let (_dir, store) = store().await;
    let bus = NatsPublisher::connect(&url, Retention::default())
        .await
        .unwrap();
    let epoch = bus.epoch().await.unwrap();
    assert!(epoch > 1_600_000_000_000, "epoch is Unix ms: {epoch}");

    // The broker goes away; gifts keep being paid.
    nats.kill();
    let mut gifts = Vec::new();
    for i in 0..6 {
        let room = if i % 2 == 0 { "stage" } else { "dot.room" };
        gifts.push(send(&store, room, &format!("down-{i}")).await);
    }
    let wake = Arc::new(Notify::new());
    let publisher: Arc<dyn BusPublisher> = Arc::new(bus.clone());
    let relay_task = tokio::spawn(relay(store.clone(), Some(publisher), wake.clone()));
    // The relay tried and failed (the rows count attempts and stay pending).
    eventually("a failed publish is recorded", || async {
        store.pending_outbox(10).await.unwrap()[0].attempts >= 1
    })
    .await;
    assert_eq!(store.outbox_pending_count().await.unwrap(), 6);

    // The broker returns (same store on disk): everything goes out.
    let mut nats = tokio::task::spawn_blocking(move || {
        nats.restart();
        nats.wait_healthy(nats::START_TIMEOUT).unwrap();
        nats
    })
    .await
    .unwrap();
    eventually("the outbox drains", || async {
        store.outbox_pending_count().await.unwrap() == 0
    })
    .await;
    // A gift paid while the relay runs is published too (woken by the payer).
    gifts.push(send(&store, "stage", "up-1").await);
    wake.notify_one();
    eventually("the new gift is published", || async {
        store.outbox_pending_count().await.unwrap() == 0
    })
    .await;
    relay_task.abort();

    let stream = read_stream(&url).await;
    assert_once_each(&stream, &gifts);
    // Within a room, events keep the order the gifts were paid in.
    for room in ["stage", "dot.room"] {
        let room = RoomId::parse(room).unwrap();
        let seqs: Vec<u64> = gifts
            .iter()
            .filter(|g| g.room == room)
            .map(|g| stream[&g.id][0].0)
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{room}: {seqs:?}");
    }
    assert_eq!(
        room_subject(&RoomId::parse("dot.room").unwrap()),
        "weir.v1.room.dot~room"
    );

    // Publishing a gift again (a relay that crashed between the ack and the
    // mark) stores nothing: the broker answers the first copy's offset.
    let g = &gifts[0];
    let again = bus.publish(&g.room, &g.event(), Some(&g.id)).await.unwrap();
    assert!(again.duplicate);
    assert_eq!((again.offset, again.epoch), (stream[&g.id][0].0, epoch));
    // The same through the relay: a gift published but not marked is marked
    // on the next pass, as a duplicate.
    let late = send(&store, "stage", "late").await;
    let first = bus
        .publish(&late.room, &late.event(), Some(&late.id))
        .await
        .unwrap();
    assert!(!first.duplicate);
    let pass = relay_pass(&store, &bus).await.unwrap();
    assert_eq!((pass.published, pass.duplicates), (1, 1));
    gifts.push(late);
    assert_once_each(&read_stream(&url).await, &gifts);
    let audit = store.wallet_audit().await.unwrap();
    assert_eq!((audit.ledger_sum, audit.outbox_pending), (0, 0));
    nats.kill();
}

/// Two replicas share a store and an election: only the leader relays, and
/// gifts paid on either replica are published exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_elected_replica_relays() {
    let nats = tokio::task::spawn_blocking(nats::Nats::start)
        .await
        .unwrap();
    let url = nats.url();
    let (_dir, store) = store().await;
    let coordinator = Arc::new(LocalCoordinator::new());
    let signer = TokenSigner::generate();
    let key = signer.to_base64();
    let token = TokenIssuer::new(signer)
        .mint(&RoomId::parse("stage").unwrap(), Mode::Play, "fan", None)
        .unwrap()
        .token;
    let mut replicas = Vec::new();
    for name in ["a", "b"] {
        let bus = NatsPublisher::connect(&url, Retention::default())
            .await
            .unwrap();
        let state = Arc::new(
            ControlState::new(
                coordinator.clone(),
                TokenIssuer::new(TokenSigner::from_base64(&key).unwrap()),
                ControlConfig::default(),
            )
            .unwrap()
            .with_store(store.clone())
            .with_bus(Arc::new(bus)),
        );
        let election: Arc<dyn ElectionBackend> = coordinator.clone();
        let candidacy = campaign(
            election,
            weir_control_plane::election::CONTROL_ELECTION,
            name,
            Duration::from_secs(2),
        );
        let workers = tokio::spawn(weir_control_plane::workers::run(
            Arc::clone(&state),
            candidacy.changes(),
        ));
        replicas.push((state, candidacy, workers));
    }
    let mut gifts = Vec::new();
    for i in 0..10 {
        let (state, _, _) = &replicas[i % 2];
        let sent = state
            .send_gift(
                &RequestId::generate(),
                Some(&format!("Bearer {token}")),
                SendGiftRequest {
                    room: "stage".into(),
                    gift: "heart".into(),
                    count: 1,
                    idempotency_key: format!("tap-{i}"),
                },
            )
            .await
            .unwrap();
        gifts.push(sent.gift);
    }
    eventually("the outbox drains", || async {
        store.outbox_pending_count().await.unwrap() == 0
    })
    .await;
    let leaders = replicas.iter().filter(|(_, c, _)| c.is_leader()).count();
    assert_eq!(leaders, 1);
    assert_once_each(&read_stream(&url).await, &gifts);

    // The leader resigns: the other one takes over and relays what comes next.
    let (leader, follower): (Vec<_>, Vec<_>) =
        replicas.into_iter().partition(|(_, c, _)| c.is_leader());
    let (_, old, old_workers) = leader.into_iter().next().unwrap();
    old.resign().await;
    old_workers.abort();
    let (state, mut next, _workers) = follower.into_iter().next().unwrap();
    tokio::time::timeout(PATIENCE, next.elected())
        .await
        .unwrap();
    let sent = state
        .send_gift(
            &RequestId::generate(),
            Some(&format!("Bearer {token}")),
            SendGiftRequest {
                room: "stage".into(),
                gift: "heart".into(),
                count: 1,
                idempotency_key: "after-handover".into(),
            },
        )
        .await
        .unwrap();
    gifts.push(sent.gift);
    eventually("the new leader publishes", || async {
        store.outbox_pending_count().await.unwrap() == 0
    })
    .await;
    assert_once_each(&read_stream(&url).await, &gifts);
    next.resign().await;
}

/// On a 3-server cluster the publisher makes the stream with three
/// replicas, and publishes and drops duplicates through any server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_is_replicated_on_a_cluster() {
    let cluster = tokio::task::spawn_blocking(nats::NatsCluster::start)
        .await
        .unwrap();
    let bus = NatsPublisher::connect(&cluster.urls(), Retention::default())
        .await
        .unwrap();
    // The cluster may still be settling its JetStream leaders: retry.
    let deadline = Instant::now() + PATIENCE;
    let room = RoomId::parse("stage").unwrap();
    let event = RoomEvent {
        at_ms: 1,
        body: EventBody::System {
            code: "test".into(),
            text: "hello".into(),
        },
    };
    let first = loop {
        match bus.publish(&room, &event, Some("m-1")).await {
            Ok(p) => break p,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "cluster never took a publish: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(!first.duplicate);
    let again = bus.publish(&room, &event, Some("m-1")).await.unwrap();
    assert_eq!(
        (again.duplicate, again.offset, again.epoch),
        (true, first.offset, first.epoch)
    );
    let client = async_nats::connect(cluster.servers[2].url()).await.unwrap();
    let mut stream = jetstream::new(client).get_stream(STREAM).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(info.state.messages, 1);
    assert_eq!(
        u64::try_from(info.created.unix_timestamp_nanos() / 1_000_000).unwrap(),
        first.epoch
    );
}

/// A lone control plane (`weir dev`) runs the relay without an election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_control_plane_relays_without_an_election() {
    let nats = tokio::task::spawn_blocking(nats::Nats::start)
        .await
        .unwrap();
    let url = nats.url();
    let (_dir, store) = store().await;
    let issuer = TokenIssuer::new(TokenSigner::generate());
    let token = issuer
        .mint(&RoomId::parse("dot.room").unwrap(), Mode::Chat, "fan", None)
        .unwrap()
        .token;
    let bus = NatsPublisher::connect(&url, Retention::default())
        .await
        .unwrap();
    let state = Arc::new(
        ControlState::new(
            Arc::new(LocalCoordinator::new()),
            issuer,
            ControlConfig::default(),
        )
        .unwrap()
        .with_store(store.clone())
        .with_bus(Arc::new(bus)),
    );
    let workers = tokio::spawn(weir_control_plane::workers::run_unelected(Arc::clone(
        &state,
    )));
    let sent = state
        .send_gift(
            &RequestId::generate(),
            Some(&format!("Bearer {token}")),
            SendGiftRequest {
                room: "dot.room".into(),
                gift: "cake".into(),
                count: 2,
                idempotency_key: "solo".into(),
            },
        )
        .await
        .unwrap();
    eventually("the gift is published", || async {
        store.outbox_pending_count().await.unwrap() == 0
    })
    .await;
    assert_once_each(&read_stream(&url).await, &[sent.gift]);
    workers.abort();
}
