//! Room events over the data channel of a WebRTC session: a viewer (WHEP)
//! or streamer (WHIP) whose offer opens a data channel labelled
//! `weir-events` gets the same frames, with the same rules, as a client of
//! `/rooms/{room}/events`, without a second connection or token: the
//! session's token already named the room and the user.
//!
//! What the WebSocket takes as a query goes after a `?` in the label:
//! `weir-events?format=json&since=OFFSET&epoch=EPOCH`. Frames go out as
//! binary messages (MessagePack) or, with `format=json`, text messages; the
//! client sends JSON text messages. Channels with other labels are left
//! alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use weir_protocol::SessionId;
use weir_protocol::events::{Format, ServerFrame};
use weir_sfu::Role;

use super::hub::Hub;
use super::ws::{Client, End, Incoming, SEND_TIMEOUT, Transport};
use crate::shard::{ChannelOpened, ChannelSink, Shard};

/// The label (before any `?`) of the events channel.
pub const LABEL: &str = "weir-events";

/// Client messages queued per channel before more are dropped (and the
/// client told).
const INBOX: usize = 256;

/// How often a full channel is tried again.
const RETRY: Duration = Duration::from_millis(20);

/// What a label asks for: format, and where to recover from.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct LabelQuery {
    pub format: Format,
    pub since: Option<(u64, u64)>,
}

/// Parses `weir-events[?query]`: `None` for another label, `Some(Err)` for
/// an events label with a bad query.
pub(crate) fn parse_label(label: &str) -> Option<Result<LabelQuery, String>> {
    let (name, query) = label.split_once('?').unwrap_or((label, ""));
    if name != LABEL {
        return None;
    }
    Some(parse_query(query))
}

fn parse_query(query: &str) -> Result<LabelQuery, String> {
    let (mut format, mut since, mut epoch) = (Format::Msgpack, None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let number = |what: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{what} must be a number, not {v:?}"))
        };
        match k {
            "format" => {
                format = match v {
                    "msgpack" => Format::Msgpack,
                    "json" => Format::Json,
                    other => return Err(format!("format must be json or msgpack, not {other:?}")),
                }
            }
            "since" => since = Some(number("since")?),
            "epoch" => epoch = Some(number("epoch")?),
            other => {
                return Err(format!(
                    "unknown parameter {other:?} in the channel label (known: format, since, epoch)"
                ));
            }
        }
    }
    let since = match (since, epoch) {
        (None, None) => None,
        (Some(s), Some(e)) => Some((s, e)),
        _ => return Err("since and epoch go together: give both to recover, or neither".into()),
    };
    Ok(LabelQuery { format, since })
}

struct Inbox {
    label: String,
    tx: mpsc::Sender<(bool, Vec<u8>)>,
    dropped: Arc<AtomicU64>,
}

/// The node's [`ChannelSink`]: serves each events channel as a room events
/// client on the node's runtime.
pub(crate) struct DataChannels {
    rt: tokio::runtime::Handle,
    hub: Arc<Hub>,
    stop: watch::Receiver<bool>,
    draining: watch::Receiver<bool>,
    inboxes: Mutex<HashMap<SessionId, Inbox>>,
}

impl DataChannels {
    pub(crate) fn new(
        rt: tokio::runtime::Handle,
        hub: Arc<Hub>,
        stop: watch::Receiver<bool>,
        draining: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            rt,
            hub,
            stop,
            draining,
            inboxes: Mutex::new(HashMap::new()),
        })
    }

    fn inboxes(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Inbox>> {
        self.inboxes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ChannelSink for DataChannels {
    fn opened(&self, shard: Shard, opened: ChannelOpened) {
        let Some(query) = parse_label(&opened.label) else {
            return;
        };
        let (tx, inbox) = mpsc::channel(INBOX);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut transport = DcTransport {
            shard,
            session: opened.session.clone(),
            label: opened.label.clone(),
            binary: true,
            inbox,
            dropped: Arc::clone(&dropped),
            max_frame: self.hub.limits().max_frame_bytes,
        };
        let query = match query {
            Ok(q) => q,
            Err(reason) => {
                metrics::counter!("weir_events_refused_total", "status" => "channel").increment(1);
                tracing::info!(room = %opened.room, session = %opened.session, %reason, "events channel refused");
                transport.binary = false;
                self.rt.spawn(async move {
                    let bye = ServerFrame::Bye {
                        code: "bad_request".into(),
                        reason,
                    };
                    transport
                        .close(bye.encode(Format::Json).into(), "bad_request")
                        .await;
                });
                return;
            }
        };
        transport.binary = query.format == Format::Msgpack;
        self.inboxes().insert(
            opened.session.clone(),
            Inbox {
                label: opened.label,
                tx,
                dropped,
            },
        );
        let client = Client {
            hub: Arc::clone(&self.hub),
            room: opened.room,
            user: opened.owner,
            streamer: opened.role == Role::Publisher,
            format: query.format,
            stop: self.stop.clone(),
            draining: self.draining.clone(),
        };
        metrics::counter!("weir_events_channels_total").increment(1);
        self.rt.spawn(client.run(transport, query.since));
    }

    fn message(&self, session: &SessionId, label: &str, binary: bool, data: Vec<u8>) {
        let inboxes = self.inboxes();
        let Some(inbox) = inboxes.get(session).filter(|i| i.label == label) else {
            return;
        };
        if inbox.tx.try_send((binary, data)).is_err() {
            // The shard never waits: the client is told on its next read.
            inbox.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("weir_events_channel_dropped_total").increment(1);
        }
    }

    fn closed(&self, session: &SessionId, label: &str) {
        let mut inboxes = self.inboxes();
        if inboxes.get(session).is_some_and(|i| i.label == label) {
            // Dropping the sender ends the client's reads: it leaves.
            inboxes.remove(session);
        }
    }
}

/// [`Transport`] over a session's data channel, through its shard.
struct DcTransport {
    shard: Shard,
    session: SessionId,
    label: String,
    binary: bool,
    inbox: mpsc::Receiver<(bool, Vec<u8>)>,
    dropped: Arc<AtomicU64>,
    max_frame: usize,
}

impl DcTransport {
    /// Writes what fits, then retries the rest until `deadline`.
    async fn write(&mut self, mut frames: Vec<Bytes>, deadline: Instant) -> Result<(), End> {
        while !frames.is_empty() {
            let written = match self
                .shard
                .channel_send(
                    self.session.clone(),
                    self.label.clone(),
                    self.binary,
                    frames.clone(),
                )
                .await
            {
                Ok(Ok(n)) => n,
                // The session or its channel is gone, or the shard stops.
                Ok(Err(_)) | Err(_) => return Err(End::Closed),
            };
            frames.drain(..written.min(frames.len()));
            if frames.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(End::Bye(
                    "too_slow",
                    format!("frames took over {SEND_TIMEOUT:?} to reach you"),
                ));
            }
            tokio::time::sleep(RETRY).await;
        }
        Ok(())
    }
}

impl Transport for DcTransport {
    async fn send_batch(&mut self, frames: Vec<Bytes>) -> Result<(), End> {
        self.write(frames, Instant::now() + SEND_TIMEOUT).await
    }

    async fn recv(&mut self) -> Incoming {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            return Incoming::Bad(format!(
                "{dropped} messages arrived faster than the node reads them and were dropped"
            ));
        }
        match self.inbox.recv().await {
            None => Incoming::Closed,
            Some((true, _)) => {
                Incoming::Bad("binary messages are not accepted; send JSON text".into())
            }
            Some((false, data)) if data.len() > self.max_frame => Incoming::Bad(format!(
                "message of {} bytes; at most {}",
                data.len(),
                self.max_frame
            )),
            Some((false, data)) => match String::from_utf8(data) {
                Ok(text) => Incoming::Text(text),
                Err(_) => Incoming::Bad("text messages must be UTF-8".into()),
            },
        }
    }

    async fn close(&mut self, bye: Bytes, _code: &'static str) {
        // The session stays (it carries media); only the events end.
        let _ = self
            .write(vec![bye], Instant::now() + Duration::from_secs(1))
            .await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_the_channel_and_carry_the_events_query() {
        assert_eq!(parse_label("chat"), None);
        assert_eq!(parse_label("weir-eventsX"), None);
        assert_eq!(
            parse_label("weir-events"),
            Some(Ok(LabelQuery {
                format: Format::Msgpack,
                since: None
            }))
        );
        assert_eq!(
            parse_label("weir-events?format=json&since=5&epoch=9"),
            Some(Ok(LabelQuery {
                format: Format::Json,
                since: Some((5, 9))
            }))
        );
        for bad in [
            "weir-events?format=xml",
            "weir-events?since=5",
            "weir-events?since=x&epoch=1",
            "weir-events?token=abc",
        ] {
            assert!(matches!(parse_label(bad), Some(Err(_))), "{bad}");
        }
    }
}
