//! A room events client for the tests: a WebSocket to
//! `/rooms/{room}/events` with JSON (or MessagePack) frames read as JSON
//! values.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Stream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long a test waits for any one frame.
pub const FRAME_WAIT: Duration = Duration::from_secs(10);

pub struct EventsClient {
    stream: Stream,
    msgpack: bool,
    /// Frames read while looking for an answer, handed out by `next` first.
    pending: std::collections::VecDeque<Value>,
    /// The hello frame.
    pub hello: Value,
}

/// The events URL of `node` (http://…) for `room` with `query` (`token=…&…`).
pub fn events_url(node: &str, room: &str, query: &str) -> String {
    format!(
        "{}/rooms/{room}/events?{query}",
        node.replacen("http://", "ws://", 1)
    )
}

/// Why a connection was refused before the upgrade: status and body.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: String,
}

impl EventsClient {
    /// Connects with JSON frames; `query` holds the token and the rest.
    pub async fn connect(node: &str, room: &str, query: &str) -> Result<Self, Refused> {
        Self::connect_url(
            &events_url(node, room, &format!("{query}&format=json")),
            false,
        )
        .await
    }

    /// Connects with the default MessagePack frames.
    pub async fn connect_msgpack(node: &str, room: &str, query: &str) -> Result<Self, Refused> {
        Self::connect_url(&events_url(node, room, query), true).await
    }

    async fn connect_url(url: &str, msgpack: bool) -> Result<Self, Refused> {
        let request = url.into_client_request().unwrap();
        match tokio_tungstenite::connect_async(request).await {
            Ok((stream, _)) => {
                let mut client = Self {
                    stream,
                    msgpack,
                    pending: Default::default(),
                    hello: Value::Null,
                };
                let hello = client.next().await;
                assert_eq!(hello["t"], "hello", "first frame is hello: {hello}");
                client.hello = hello;
                Ok(client)
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(Refused {
                status: response.status().as_u16(),
                body: response
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            }),
            Err(e) => panic!("cannot connect to {url}: {e}"),
        }
    }

    /// The next frame of any kind, or `{"t":"closed"}` when the connection
    /// ended.
    pub async fn next(&mut self) -> Value {
        if let Some(f) = self.pending.pop_front() {
            return f;
        }
        self.read().await
    }

    async fn read(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(FRAME_WAIT, self.stream.next())
                .await
                .expect("a frame within the wait");
            match message {
                Some(Ok(Message::Text(t))) => {
                    assert!(!self.msgpack, "text frame on a MessagePack connection");
                    return serde_json::from_str(&t).unwrap();
                }
                Some(Ok(Message::Binary(b))) => {
                    assert!(self.msgpack, "binary frame on a JSON connection");
                    return rmp_serde::from_slice(&b).unwrap();
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    return json!({"t": "closed"});
                }
            }
        }
    }

    /// The next frame that is not a counters or status update.
    pub async fn next_event_frame(&mut self) -> Value {
        loop {
            let f = self.next().await;
            if f["t"] != "counters" && f["t"] != "status" {
                return f;
            }
        }
    }

    /// The next frame that is not a counters or status update, nor an
    /// online count event (those come whenever viewers come and go).
    pub async fn next_significant(&mut self) -> Value {
        loop {
            let f = self.next_event_frame().await;
            if !(f["t"] == "event" && f["type"] == "online") {
                return f;
            }
        }
    }

    /// The next frame of type `t`, skipping others.
    pub async fn next_of(&mut self, t: &str) -> Value {
        loop {
            let f = self.next().await;
            if f["t"] == t {
                return f;
            }
            assert_ne!(f["t"], "closed", "connection closed while waiting for {t}");
        }
    }

    pub async fn send(&mut self, frame: Value) {
        self.stream
            .send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, message: Message) {
        let _ = self.stream.send(message).await;
    }

    /// Sends a danmaku and returns the node's answer (ack or refused).
    pub async fn danmaku(&mut self, text: &str, r#ref: &str) -> Value {
        self.send(json!({"t": "danmaku", "text": text, "ref": r#ref}))
            .await;
        let mut seen = Vec::new();
        loop {
            let f = self.read().await;
            if (f["t"] == "ack" || f["t"] == "refused") && f["ref"] == r#ref {
                self.pending.extend(seen);
                return f;
            }
            assert_ne!(
                f["t"], "closed",
                "connection closed while waiting for {ref}"
            );
            seen.push(f);
        }
    }

    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}
