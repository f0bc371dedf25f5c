//! The control plane's publisher to the room bus on NATS JetStream
//! (`weir control --nats URL[,URL…]`): what the outbox relay publishes gift
//! events through. It implements [`BusPublisher`]; reading rooms is the data
//! plane's business.
//!
//! The stream is [`STREAM`], capturing `weir.v1.room.>`, with retention per
//! room (subject) from [`Retention`], file storage, a duplicate window within
//! which a repeated `Nats-Msg-Id` stores nothing and is acked as a duplicate,
//! and three replicas when the server is part of a cluster of three or more
//! (else one). The data plane creates the same stream; whichever process
//! comes first creates it, and a stream that exists is used as it is.
//!
//! Every broker call is bounded by [`CALL_TIMEOUT`] and fails with
//! [`BusError::Unavailable`]; the connection is made in the background and
//! re-made after a loss, so the publisher can be built while the broker is
//! down.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use tokio::sync::OnceCell;
use weir_protocol::RoomId;
use weir_protocol::bus::{
    BusError, BusPublisher, Published, Retention, RoomEvent, STREAM, SUBJECT_PREFIX, room_subject,
};

/// Longest wait for any one broker call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Publishes room events to NATS JetStream.
#[derive(Debug, Clone)]
pub struct NatsPublisher {
    client: async_nats::Client,
    js: jetstream::Context,
    retention: Retention,
    /// The stream's epoch, once the stream was found or made (the broker
    /// may be down at start; every publish tries again until it is).
    epoch: Arc<OnceCell<u64>>,
}

/// A `--nats` value that is not a list of NATS URLs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadNatsUrl(String);

/// Parses `nats://host:port[,nats://host:port…]` (what `--nats` takes).
pub fn parse_urls(urls: &str) -> Result<Vec<async_nats::ServerAddr>, BadNatsUrl> {
    let addrs: Vec<async_nats::ServerAddr> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| BadNatsUrl(format!("bad NATS URL {u:?}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    if addrs.is_empty() {
        return Err(BadNatsUrl(
            "no NATS URL given (expected nats://HOST:PORT[,nats://HOST:PORT...])".into(),
        ));
    }
    Ok(addrs)
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, BusError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(BusError::Unavailable(format!("{what}: {e}"))),
        Err(_) => Err(BusError::Unavailable(format!(
            "{what}: no answer within {CALL_TIMEOUT:?}"
        ))),
    }
}

impl NatsPublisher {
    /// A publisher for the servers `urls` (see [`parse_urls`]). Returns at
    /// once, even when no server answers yet; only a malformed URL fails.
    pub async fn connect(urls: &str, retention: Retention) -> Result<Self, BusError> {
        let addrs = parse_urls(urls).map_err(|e| BusError::Unavailable(e.to_string()))?;
        let client = async_nats::ConnectOptions::new()
            .name("weir-control")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .event_callback(|event| async move {
                tracing::info!(%event, "room bus connection");
            })
            .connect(addrs)
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(CALL_TIMEOUT);
        Ok(Self {
            client,
            js,
            retention,
            epoch: Arc::default(),
        })
    }

    /// The stream's settings, the same in both planes.
    pub fn stream_config(retention: Retention, replicas: usize) -> stream::Config {
        stream::Config {
            name: STREAM.to_owned(),
            subjects: vec![format!("{SUBJECT_PREFIX}>")],
            max_messages_per_subject: i64::try_from(retention.max_per_room).unwrap_or(i64::MAX),
            max_age: Duration::from_secs(retention.max_age_s),
            duplicate_window: Duration::from_secs(retention.duplicate_window_s),
            storage: stream::StorageType::File,
            num_replicas: replicas,
            allow_direct: true,
            ..Default::default()
        }
    }

    /// The epoch of the bus: the stream's creation time
    /// (`StreamInfo.created`) in Unix milliseconds, at least 1. A stream
    /// deleted and made again gets a new one. The data plane's bus uses the
    /// same definition, so both planes agree on it. Finds or makes the
    /// stream on first use.
    pub async fn epoch(&self) -> Result<u64, BusError> {
        self.epoch
            .get_or_try_init(|| async {
                // R3 where this server is part of a cluster of three or more
                // (the servers it gossips are listed in `connect_urls`).
                let peers = self.client.server_info().connect_urls.len();
                let replicas = if peers >= 3 { 3 } else { 1 };
                let config = Self::stream_config(self.retention, replicas);
                let mut stream = timed(
                    "find or create the room stream",
                    self.js.get_or_create_stream(config),
                )
                .await?;
                let info = timed("read the room stream", stream.info()).await?;
                let ms = info.created.unix_timestamp_nanos() / 1_000_000;
                let epoch = u64::try_from(ms).unwrap_or(0).max(1);
                tracing::info!(
                    stream = STREAM,
                    epoch,
                    replicas = info.config.num_replicas,
                    "room bus stream ready"
                );
                Ok(epoch)
            })
            .await
            .copied()
    }
}

#[async_trait]
impl BusPublisher for NatsPublisher {
    async fn publish(
        &self,
        room: &RoomId,
        event: &RoomEvent,
        msg_id: Option<&str>,
    ) -> Result<Published, BusError> {
        let epoch = self.epoch().await?;
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
            epoch,
            duplicate: ack.duplicate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            parse_urls("nats://127.0.0.1:4222, nats://127.0.0.1:4223")
                .map(|a| a.len())
                .ok(),
            Some(2)
        );
        assert!(parse_urls("").is_err());
        assert!(parse_urls(" , ").is_err());
        assert!(parse_urls("nats://host:notaport").is_err());
    }

    #[test]
    fn the_stream_keeps_the_retention() {
        let r = Retention::default();
        let c = NatsPublisher::stream_config(r, 3);
        assert_eq!(c.name, STREAM);
        assert_eq!(c.subjects, vec!["weir.v1.room.>".to_owned()]);
        assert_eq!(c.max_messages_per_subject, 1000);
        assert_eq!(c.duplicate_window, Duration::from_secs(120));
        assert_eq!(c.max_age, Duration::from_secs(3600));
        assert_eq!(c.num_replicas, 3);
    }
}
