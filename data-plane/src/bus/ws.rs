//! `GET /rooms/{room}/events`: a room's events over WebSocket.
//!
//! Query: `token` (a play or publish token for the room; or an
//! `Authorization: Bearer` header), `since` and `epoch` (both, to recover
//! what was missed since the last event a client got), `format=json` for JSON
//! text frames instead of MessagePack. Everything is checked before the
//! upgrade: a bad request is a plain 4xx saying why. After it, a bad frame
//! is answered with a `refused` frame and changes nothing; only an oversized
//! frame, a flood of bad ones, or a client too slow to keep up closes the
//! connection, with a `bye` frame saying why.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::SinkExt;
use serde::Deserialize;
use tokio::sync::watch;
use weir_protocol::bus::ModerationAction;
use weir_protocol::{Mode, RoomId, TokenVerifier};

use super::hub::{Bucket, Delivery, Hub, RoomFeed, now_ms, plan_delivery};
use weir_protocol::events::{ClientFrame, Format, ServerFrame};

/// Longest a single frame may take to reach a client before it counts as
/// too slow and is disconnected.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Bad frames a connection may send before it is closed.
pub const MAX_BAD_FRAMES: u32 = 20;
/// Log items sent per wake-up before the connection looks at its input.
const BATCH: usize = 256;

/// What the events endpoint needs.
#[derive(Clone)]
pub(crate) struct EventsState {
    pub hub: Arc<Hub>,
    pub verifier: Arc<TokenVerifier>,
    pub stop: watch::Receiver<bool>,
    /// The node is drained: clients are sent elsewhere.
    pub draining: watch::Receiver<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsQuery {
    token: Option<String>,
    since: Option<u64>,
    epoch: Option<u64>,
    format: Option<String>,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    metrics::counter!("weir_events_refused_total", "status" => status.as_u16().to_string())
        .increment(1);
    (status, format!("{}\n", message.into())).into_response()
}

pub(crate) async fn events(
    State(state): State<EventsState>,
    Path(room): Path<String>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let room = match RoomId::parse(&room) {
        Ok(r) if r.as_str().starts_with('_') => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "rooms whose id starts with '_' are reserved",
            );
        }
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("bad room in URL: {e}")),
    };
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("bad query: {e} (known: token, since, epoch, format)"),
            );
        }
    };
    let format = match q.format.as_deref() {
        None | Some("msgpack") => Format::Msgpack,
        Some("json") => Format::Json,
        Some(other) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("format must be json or msgpack, not {other:?}"),
            );
        }
    };
    let since = match (q.since, q.epoch) {
        (None, None) => None,
        (Some(s), Some(e)) => Some((s, e)),
        _ => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "since and epoch go together: give both to recover, or neither",
            );
        }
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(token) = q.token.as_deref().or(bearer) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "missing token: add ?token=<play or publish token for this room> (or Authorization: Bearer)",
        );
    };
    let now = now_ms() / 1000;
    let claims = match state.verifier.verify(token, now) {
        Ok(c) => c,
        Err(e) => return refuse(StatusCode::UNAUTHORIZED, e.to_string()),
    };
    if claims.room != room {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("the token is for room {}, not {room}", claims.room),
        );
    }
    if *state.draining.borrow() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is draining: ask the control plane for another",
        );
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return refuse(
                StatusCode::UPGRADE_REQUIRED,
                format!("this is a WebSocket endpoint: {e}"),
            );
        }
    };
    let limits = state.hub.limits();
    let client = Client {
        hub: Arc::clone(&state.hub),
        room,
        user: claims.sub,
        streamer: claims.mode == Mode::Publish,
        format,
        stop: state.stop.clone(),
        draining: state.draining.clone(),
    };
    ws.max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
        .on_upgrade(move |socket| client.run(WsTransport { socket, format }, since))
}

pub(crate) struct Client {
    pub(crate) hub: Arc<Hub>,
    pub(crate) room: RoomId,
    pub(crate) user: String,
    pub(crate) streamer: bool,
    pub(crate) format: Format,
    pub(crate) stop: watch::Receiver<bool>,
    pub(crate) draining: watch::Receiver<bool>,
}

/// Why a connection ends.
pub(crate) enum End {
    Closed,
    Bye(&'static str, String),
}

/// What a client sent.
pub(crate) enum Incoming {
    /// A text frame (JSON).
    Text(String),
    /// Something that is not a JSON text frame, with why.
    Bad(String),
    /// Nothing to act on (pings).
    Nothing,
    /// The client is gone.
    Closed,
}

/// How frames reach a client and its frames reach us: a WebSocket, or the
/// data channel of a WebRTC session (`super::dc`).
pub(crate) trait Transport: Send {
    /// Writes encoded frames in order, all within one [`SEND_TIMEOUT`].
    fn send_batch(
        &mut self,
        frames: Vec<Bytes>,
    ) -> impl std::future::Future<Output = Result<(), End>> + Send;
    /// The client's next frame. Cancel-safe.
    fn recv(&mut self) -> impl std::future::Future<Output = Incoming> + Send;
    /// Says goodbye with the encoded `bye` frame and closes (best effort,
    /// bounded in time).
    fn close(
        &mut self,
        bye: Bytes,
        code: &'static str,
    ) -> impl std::future::Future<Output = ()> + Send;
}

/// [`Transport`] over an upgraded WebSocket.
struct WsTransport {
    socket: WebSocket,
    format: Format,
}

impl WsTransport {
    fn message(&self, bytes: Bytes) -> Message {
        match self.format {
            Format::Msgpack => Message::Binary(bytes),
            // Encoded from serde_json: valid UTF-8.
            Format::Json => match axum::extract::ws::Utf8Bytes::try_from(bytes) {
                Ok(text) => Message::Text(text),
                Err(_) => Message::Text("{}".into()),
            },
        }
    }
}

impl Transport for WsTransport {
    /// Feeds the batch and flushes once (a flush per frame was most of a
    /// busy node's time).
    async fn send_batch(&mut self, frames: Vec<Bytes>) -> Result<(), End> {
        if frames.is_empty() {
            return Ok(());
        }
        let messages: Vec<Message> = frames.into_iter().map(|b| self.message(b)).collect();
        let socket = &mut self.socket;
        let write = async {
            for m in messages {
                socket.feed(m).await?;
            }
            socket.flush().await
        };
        match tokio::time::timeout(SEND_TIMEOUT, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Closed),
            Err(_) => Err(End::Bye(
                "too_slow",
                format!("frames took over {SEND_TIMEOUT:?} to reach you"),
            )),
        }
    }

    async fn recv(&mut self) -> Incoming {
        match self.socket.recv().await {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => Incoming::Closed,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Incoming::Nothing,
            Some(Ok(Message::Binary(_))) => {
                Incoming::Bad("binary frames are not accepted; send JSON text".to_owned())
            }
            Some(Ok(Message::Text(text))) => Incoming::Text(text.as_str().to_owned()),
        }
    }

    async fn close(&mut self, bye: Bytes, code: &'static str) {
        let bye = self.message(bye);
        let socket = &mut self.socket;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = socket.send(bye).await;
            let _ = socket
                .send(Message::Close(Some(CloseFrame {
                    code: if code == "shutdown" || code == "drain" {
                        1001
                    } else {
                        1008
                    },
                    reason: code.into(),
                })))
                .await;
        })
        .await;
    }
}

impl Client {
    fn frame(&self, f: &ServerFrame) -> Bytes {
        f.encode(self.format).into()
    }

    async fn send<T: Transport>(&self, t: &mut T, frame: Bytes) -> Result<(), End> {
        t.send_batch(vec![frame]).await
    }

    /// Serves the client until it leaves or is let go.
    pub(crate) async fn run<T: Transport>(self, mut t: T, since: Option<(u64, u64)>) {
        metrics::counter!("weir_events_connections_total").increment(1);
        let membership = self.hub.join(&self.room, Some(&self.user));
        let feed = Arc::clone(&membership.feed);
        // A room whose bus is away still serves (degraded) after this.
        let _ = tokio::time::timeout(Duration::from_secs(5), feed.wait_ready()).await;
        let end = self.serve(&mut t, &feed, since).await;
        if let End::Bye(code, reason) = end {
            metrics::counter!("weir_events_disconnected_total", "reason" => code).increment(1);
            tracing::info!(room = %self.room, user = %self.user, code, %reason, "events client disconnected");
            let bye = self.frame(&ServerFrame::Bye {
                code: code.to_owned(),
                reason: reason.clone(),
            });
            t.close(bye, code).await;
        }
        drop(membership);
    }

    async fn serve<T: Transport>(
        &self,
        socket: &mut T,
        feed: &Arc<RoomFeed>,
        since: Option<(u64, u64)>,
    ) -> End {
        let start = feed.start(since);
        let hello = ServerFrame::Hello {
            room: self.room.to_string(),
            epoch: start.epoch,
            offset: start.offset,
            recovered: start.recovered,
            missed: start.missed,
            degraded: start.degraded,
            user: self.user.clone(),
        };
        if let Some(false) = start.recovered {
            metrics::counter!("weir_events_recoveries_total", "result" => "gone").increment(1);
        } else if start.recovered.is_some() {
            metrics::counter!("weir_events_recoveries_total", "result" => "ok").increment(1);
        }
        if let Err(end) = self.send(socket, self.frame(&hello)).await {
            return end;
        }
        let mut cursor = start.from_seq;
        let mut head = feed.head();
        let mut stop = self.stop.clone();
        let mut draining = self.draining.clone();
        let limits = self.hub.limits();
        let mut danmaku_bucket = Bucket::new(limits.conn_burst);
        let mut like_bucket = Bucket::new(20.0);
        let mut friends_bucket = Bucket::new(3.0);
        let mut bad_frames = 0u32;
        // Worked out once per room (`HubConfig::counters_every`); the
        // first value goes out at once.
        let mut counters = feed.counters_watch();
        counters.mark_changed();
        // Notices for this user (a streamer they follow went live).
        let mut slot = self.hub.users().register(&self.user);
        loop {
            // Send what the log has beyond our cursor.
            let newest = *head.borrow_and_update();
            while cursor <= newest {
                let items = match feed.read(cursor, BATCH) {
                    Ok(items) => items,
                    Err(_) => {
                        return End::Bye(
                            "too_slow",
                            "you fell behind the room's history; reconnect to resync".into(),
                        );
                    }
                };
                let Some(last) = items.last() else { break };
                let next_cursor = last.seq + 1;
                let lag = newest.saturating_sub(cursor);
                let plan = match plan_delivery(&items, lag, &self.hub.limits()) {
                    Ok(plan) => plan,
                    Err(reason) => return End::Bye("too_slow", reason),
                };
                let messages: Vec<Bytes> = plan
                    .into_iter()
                    .map(|step| match step {
                        Delivery::Send(item) => item.encoded(self.format),
                        Delivery::Skipped {
                            class,
                            count,
                            through,
                        } => {
                            metrics::counter!("weir_events_skipped_total").increment(count);
                            self.frame(&ServerFrame::Skipped {
                                class,
                                count,
                                through,
                            })
                        }
                    })
                    .collect();
                if let Err(end) = socket.send_batch(messages).await {
                    return end;
                }
                cursor = next_cursor;
            }
            tokio::select! {
                changed = head.changed() => {
                    if changed.is_err() {
                        return End::Bye("room_closed", "the room's feed stopped".into());
                    }
                }
                Ok(()) = draining.changed() => {
                    if *draining.borrow() {
                        return End::Bye("drain", "this node is draining: reconnect through the control plane (with since and epoch)".into());
                    }
                }
                _ = stop.changed() => {
                    return End::Bye("shutdown", "the node is shutting down; reconnect to another".into());
                }
                Some(notice) = slot.notices.recv() => {
                    if let Err(end) = self.send(socket, self.frame(&notice)).await {
                        return end;
                    }
                }
                Ok(()) = counters.changed() => {
                    let (likes, online) = *counters.borrow_and_update();
                    let f = ServerFrame::Counters { likes, online };
                    if let Err(end) = self.send(socket, self.frame(&f)).await {
                        return end;
                    }
                }
                message = socket.recv() => {
                    let reply = match message {
                        Incoming::Closed => return End::Closed,
                        Incoming::Nothing => continue,
                        Incoming::Bad(why) => Err(("malformed", String::new(), why)),
                        Incoming::Text(text) => {
                            self.handle(feed, &text, &mut danmaku_bucket, &mut like_bucket, &mut friends_bucket).await
                        }
                    };
                    let frame = match reply {
                        Ok(Some(f)) => f,
                        Ok(None) => continue,
                        Err((code, r#ref, reason)) => {
                            metrics::counter!("weir_events_client_refused_total", "code" => code).increment(1);
                            if code == "malformed" {
                                bad_frames += 1;
                                if bad_frames > MAX_BAD_FRAMES {
                                    return End::Bye("malformed", format!("over {MAX_BAD_FRAMES} malformed frames"));
                                }
                            }
                            ServerFrame::Refused { r#ref, code: code.to_owned(), reason }
                        }
                    };
                    if let Err(end) = self.send(socket, self.frame(&frame)).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Acts on one client frame: `Ok(reply)`, or `Err((code, ref, reason))`.
    async fn handle(
        &self,
        feed: &Arc<RoomFeed>,
        text: &str,
        danmaku_bucket: &mut Bucket,
        like_bucket: &mut Bucket,
        friends_bucket: &mut Bucket,
    ) -> Result<Option<ServerFrame>, (&'static str, String, String)> {
        let frame: ClientFrame = serde_json::from_str(text)
            .map_err(|e| ("malformed", String::new(), format!("bad frame: {e}")))?;
        let limits = self.hub.limits();
        match frame {
            ClientFrame::Ping => Ok(Some(ServerFrame::Pong)),
            ClientFrame::Friends => {
                if !friends_bucket.take(1.0, 3.0, now_ms()) {
                    return Err((
                        "rate_limited",
                        String::new(),
                        "friends: at most one question a second".into(),
                    ));
                }
                let Some(checker) = self.hub.follow_checker() else {
                    return Err((
                        "unavailable",
                        String::new(),
                        "this node has no control plane to ask who you follow".into(),
                    ));
                };
                let present: Vec<String> = feed
                    .present_users()
                    .into_iter()
                    .filter(|u| *u != self.user)
                    .collect();
                let mut users = Vec::new();
                for batch in present.chunks(super::notices::CHECK_BATCH) {
                    let found = checker
                        .followed_among(&self.user, batch)
                        .await
                        .map_err(|e| {
                            (
                                "unavailable",
                                String::new(),
                                format!("cannot ask who you follow: {e}"),
                            )
                        })?;
                    users.extend(found);
                }
                Ok(Some(ServerFrame::Friends { users }))
            }
            ClientFrame::Danmaku { text, r#ref } => {
                if r#ref.len() > 64 {
                    return Err((
                        "malformed",
                        String::new(),
                        "ref may be at most 64 bytes".into(),
                    ));
                }
                self.hub
                    .check_danmaku(feed, &self.user, &text)
                    .map_err(|r| (r.code, r#ref.clone(), r.reason))?;
                if !danmaku_bucket.take(limits.conn_rate, limits.conn_burst, now_ms()) {
                    return Err((
                        "rate_limited",
                        r#ref,
                        format!(
                            "too many danmaku on this connection: at most {} per second",
                            limits.conn_rate
                        ),
                    ));
                }
                self.hub
                    .take_user_token(&self.user)
                    .map_err(|r| (r.code, r#ref.clone(), r.reason))?;
                let offset = self.hub.send_danmaku(feed, &self.user, &text).await;
                Ok(Some(ServerFrame::Ack { r#ref, offset }))
            }
            ClientFrame::Like { count } => {
                if !(1..=100).contains(&count) {
                    return Err((
                        "bad_count",
                        String::new(),
                        "like count must be 1..=100".into(),
                    ));
                }
                if !like_bucket.take(10.0, 20.0, now_ms()) {
                    return Err((
                        "rate_limited",
                        String::new(),
                        "too many like frames: at most 10 per second (send a count)".into(),
                    ));
                }
                self.hub.like(feed, &self.user, count);
                Ok(None)
            }
            ClientFrame::Mute { user, seconds } => {
                if user.is_empty() || user.len() > 64 {
                    return Err((
                        "bad_user",
                        String::new(),
                        "user must be 1..=64 bytes".into(),
                    ));
                }
                self.moderate(feed, ModerationAction::Mute, &user, seconds)
                    .await
            }
            ClientFrame::SlowMode { seconds } => {
                self.moderate(feed, ModerationAction::SlowMode, "", seconds)
                    .await
            }
        }
    }

    async fn moderate(
        &self,
        feed: &Arc<RoomFeed>,
        action: ModerationAction,
        user: &str,
        seconds: u32,
    ) -> Result<Option<ServerFrame>, (&'static str, String, String)> {
        if !self.streamer {
            return Err((
                "forbidden",
                String::new(),
                "only the room's streamer (a publish token) may moderate".into(),
            ));
        }
        if seconds > 86_400 {
            return Err((
                "bad_seconds",
                String::new(),
                "seconds must be 0..=86400".into(),
            ));
        }
        match self
            .hub
            .moderate(feed, &self.user, action, user, seconds)
            .await
        {
            Ok(offset) => Ok(Some(ServerFrame::Ack {
                r#ref: String::new(),
                offset,
            })),
            Err(e) => Err(("unavailable", String::new(), format!("not applied: {e}"))),
        }
    }
}
