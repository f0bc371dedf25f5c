//! The room bus on NATS JetStream, for clusters (`weir node --nats URL,…`).
//!
//! One stream, [`STREAM`], captures every room subject (`weir.v1.room.>`);
//! retention is per subject (room) by count and by age; duplicates are
//! dropped by the `Nats-Msg-Id` header within the stream's duplicate window.
//! The stream sequence is the offset, and the **epoch is the stream's
//! creation time in Unix milliseconds**: a stream that is deleted and made
//! again gets a new one. The control plane's publisher creates the same
//! stream with the same settings, whichever comes first.
//!
//! Works against Debian's nats-server 2.9 (async-nats without its 2.10+
//! default features; see PITFALLS in docs/architecture.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::OnceCell;
use weir_protocol::RoomId;
use weir_protocol::bus::{
    BusError, BusPublisher, BusSubscription, Delivered, Published, Retention, RoomBus, RoomEvent,
    STREAM, SUBJECT_PREFIX, room_subject,
};

/// Longest wait for any one broker call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// The JetStream room bus.
#[derive(Debug, Clone)]
pub struct NatsBus {
    js: jetstream::Context,
    client: async_nats::Client,
    retention: Retention,
    /// The stream, made or found on first use (the broker may be down when
    /// the node starts; it keeps serving and tries again on each call).
    stream: Arc<OnceCell<(stream::Stream, u64)>>,
    /// Connection losses so far: a subscription made before one ends.
    disconnects: Arc<AtomicU64>,
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, BusError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(BusError::Unavailable(format!("{what}: {e}"))),
        Err(_) => Err(BusError::Unavailable(format!(
            "{what}: no answer in {CALL_TIMEOUT:?}"
        ))),
    }
}

impl NatsBus {
    /// Connects to `urls` (comma separated `nats://host:port`). Returns at
    /// once even when no server answers yet: the client keeps trying, and bus
    /// calls fail with [`BusError::Unavailable`] until one does.
    pub async fn connect(urls: &str, retention: Retention) -> Result<Self, BusError> {
        let addrs: Vec<async_nats::ServerAddr> = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                u.parse::<async_nats::ServerAddr>()
                    .map_err(|e| BusError::Unavailable(format!("bad NATS URL {u:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        if addrs.is_empty() {
            return Err(BusError::Unavailable("no NATS URL given".into()));
        }
        let disconnects = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&disconnects);
        let client = async_nats::ConnectOptions::new()
            .name("weir")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .event_callback(move |event| {
                if matches!(event, async_nats::Event::Disconnected) {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                async move {
                    tracing::info!(%event, "room bus connection");
                }
            })
            .connect(addrs)
            .await
            .map_err(unavailable)?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(CALL_TIMEOUT);
        Ok(Self {
            js,
            client,
            retention,
            stream: Arc::default(),
            disconnects,
        })
    }

    /// The stream's settings: what both planes create.
    pub fn stream_config(retention: Retention, replicas: usize) -> stream::Config {
        stream::Config {
            name: STREAM.to_owned(),
            subjects: vec![format!("{SUBJECT_PREFIX}>")],
            max_messages_per_subject: retention.max_per_room as i64,
            max_age: Duration::from_secs(retention.max_age_s),
            duplicate_window: Duration::from_secs(retention.duplicate_window_s),
            storage: stream::StorageType::File,
            num_replicas: replicas,
            allow_direct: true,
            ..Default::default()
        }
    }

    async fn stream(&self) -> Result<&(stream::Stream, u64), BusError> {
        self.stream
            .get_or_try_init(|| async {
                // R3 where the server is part of a cluster of three or more.
                let peers = self.client.server_info().connect_urls.len();
                let replicas = if peers >= 3 { 3 } else { 1 };
                let config = Self::stream_config(self.retention, replicas);
                let mut stream = timed(
                    "create the room stream",
                    self.js.get_or_create_stream(config),
                )
                .await?;
                let info = timed("read the room stream", stream.info()).await?;
                let epoch = (info.created.unix_timestamp_nanos() / 1_000_000).max(1) as u64;
                tracing::info!(
                    stream = STREAM,
                    epoch,
                    replicas = info.config.num_replicas,
                    "room bus stream ready"
                );
                Ok((stream, epoch))
            })
            .await
    }
}

#[async_trait]
impl BusPublisher for NatsBus {
    async fn publish(
        &self,
        room: &RoomId,
        event: &RoomEvent,
        msg_id: Option<&str>,
    ) -> Result<Published, BusError> {
        let (_, epoch) = self.stream().await?;
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = msg_id {
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        }
        let ack = timed("publish", async {
            self.js
                .publish_with_headers(room_subject(room), headers, event.encode().into())
                .await?
                .await
        })
        .await?;
        Ok(Published {
            offset: ack.sequence,
            epoch: *epoch,
            duplicate: ack.duplicate,
        })
    }
}

fn msg_id_of(headers: Option<&async_nats::HeaderMap>) -> Option<String> {
    headers
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|v| v.as_str().to_owned())
}

#[async_trait]
impl RoomBus for NatsBus {
    async fn epoch(&self) -> Result<u64, BusError> {
        Ok(self.stream().await?.1)
    }

    async fn read_after(
        &self,
        room: &RoomId,
        after: u64,
        max: usize,
    ) -> Result<Vec<Delivered>, BusError> {
        let (stream, _) = self.stream().await?;
        let subject = room_subject(room);
        let last = self.last_offset(room).await?;
        if after > 0 {
            // Retention drops a room's oldest events first, so if the event
            // at `after` is still held, every later one is too.
            let held = match tokio::time::timeout(CALL_TIMEOUT, stream.get_raw_message(after)).await
            {
                Ok(Ok(m)) => m.subject.as_str() == subject,
                Ok(Err(e)) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => false,
                // Anything else (no leader during a failover, a timeout) says
                // nothing about what is held: try again later.
                Ok(Err(e)) => return Err(unavailable(format!("read one event: {e}"))),
                Err(_) => return Err(unavailable("read one event: no answer in time")),
            };
            if !held {
                return Err(BusError::Gone { after });
            }
        }
        if last <= after || max == 0 {
            return Ok(Vec::new());
        }
        let consumer = timed(
            "open a reader",
            stream.create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject,
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                ..Default::default()
            }),
        )
        .await?;
        let mut messages = timed("open a reader", consumer.messages()).await?;
        let mut out = Vec::new();
        while out.len() < max {
            let Some(message) = timed("read events", async {
                Ok::<_, String>(messages.next().await)
            })
            .await?
            else {
                break;
            };
            let message = message.map_err(unavailable)?;
            let info = message.info().map_err(unavailable)?;
            let (offset, pending) = (info.stream_sequence, info.pending);
            let msg_id = msg_id_of(message.headers.as_ref());
            match RoomEvent::decode(&message.payload) {
                Ok(event) => out.push(Delivered {
                    offset,
                    msg_id,
                    event,
                }),
                Err(e) => {
                    metrics::counter!("weir_bus_malformed_total").increment(1);
                    tracing::warn!(offset, error = %e, "skipping a malformed room event");
                }
            }
            if pending == 0 || offset >= last {
                break;
            }
        }
        Ok(out)
    }

    async fn last_offset(&self, room: &RoomId) -> Result<u64, BusError> {
        let (stream, _) = self.stream().await?;
        match tokio::time::timeout(
            CALL_TIMEOUT,
            stream.get_last_raw_message_by_subject(&room_subject(room)),
        )
        .await
        {
            Ok(Ok(m)) => Ok(m.sequence),
            Ok(Err(e)) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Ok(Err(e)) => Err(unavailable(format!("last event: {e}"))),
            Err(_) => Err(unavailable("last event: no answer in time")),
        }
    }

    async fn subscribe(
        &self,
        room: &RoomId,
        after: u64,
    ) -> Result<Box<dyn BusSubscription>, BusError> {
        let (stream, _) = self.stream().await?;
        let deliver_policy = if after == 0 {
            consumer::DeliverPolicy::All
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            }
        };
        let consumer = timed(
            "subscribe",
            stream.create_consumer(consumer::pull::OrderedConfig {
                filter_subject: room_subject(room),
                deliver_policy,
                ..Default::default()
            }),
        )
        .await?;
        let messages = timed("subscribe", consumer.messages()).await?;
        Ok(Box::new(NatsSubscription {
            messages,
            client: self.client.clone(),
            disconnects: Arc::clone(&self.disconnects),
            seen: self.disconnects.load(Ordering::Relaxed),
        }))
    }
}

/// How often a subscription checks that the connection is up.
const WATCH_EVERY: Duration = Duration::from_millis(250);

struct NatsSubscription {
    messages: consumer::pull::Ordered,
    /// Watched: once the connection drops, the (ephemeral) consumer behind
    /// `messages` may be gone with the server, and the ordered consumer can
    /// take many seconds to notice; the subscription ends at once instead so
    /// its owner subscribes again from its last offset.
    client: async_nats::Client,
    disconnects: Arc<AtomicU64>,
    /// `disconnects` when the subscription was made.
    seen: u64,
}

#[async_trait]
impl BusSubscription for NatsSubscription {
    async fn next(&mut self) -> Result<Delivered, BusError> {
        let mut watch = tokio::time::interval(WATCH_EVERY);
        loop {
            let next = tokio::select! {
                next = self.messages.next() => next,
                _ = watch.tick() => {
                    if self.client.connection_state() != async_nats::connection::State::Connected
                        || self.disconnects.load(Ordering::Relaxed) != self.seen
                    {
                        return Err(unavailable("lost the connection to the broker"));
                    }
                    continue;
                }
            };
            let message = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(unavailable(e)),
                None => return Err(BusError::Closed),
            };
            let offset = message.info().map_err(unavailable)?.stream_sequence;
            match RoomEvent::decode(&message.payload) {
                Ok(event) => {
                    return Ok(Delivered {
                        offset,
                        msg_id: msg_id_of(message.headers.as_ref()),
                        event,
                    });
                }
                Err(e) => {
                    metrics::counter!("weir_bus_malformed_total").increment(1);
                    tracing::warn!(offset, error = %e, "skipping a malformed room event");
                }
            }
        }
    }
}
