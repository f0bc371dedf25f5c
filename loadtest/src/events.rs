//! `weir loadtest events`: room events fan-out under load. N WebSocket
//! subscribers spread over R rooms of a node (`/rooms/{room}/events`); the
//! first M of them are also chatters, sending danmaku at a total rate, each
//! carrying its send time, so every receiver measures delivery latency on
//! the same clock (same machine). Measures deliveries per second, delivery
//! latency percentiles, connect time, gaps in the `prev` chain (events the
//! node said it skipped are counted apart), disconnects by reason, and with
//! `--reconnect` a mass reconnect with recovery (`since=&epoch=`): the time
//! until every client has caught up.
//!
//! `--target nats-ws` drives nats-server's own WebSocket listener with the
//! same subscribers, rooms (one subject each) and message rate, as the peer
//! to compare with in the same run.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::{self, Message, protocol::WebSocketConfig};
use weir_protocol::bus::{EventBody, RoomEvent};

use crate::nats_ws;
use crate::{Percentiles, percentiles};

/// Most WebSocket connections one run may open.
pub const MAX_SUBSCRIBERS: u32 = 20_000;
/// Most rooms one run may spread them over.
pub const MAX_ROOMS: u32 = 10_000;
/// Highest total danmaku rate, per second.
pub const MAX_RATE: f64 = 10_000.0;
/// Longest sending phase, in seconds.
pub const MAX_DURATION_SECS: u64 = 600;
/// How long one connect (TCP, WebSocket handshake, first frame) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Connect attempts per client before it counts as failed.
const CONNECT_ATTEMPTS: u32 = 3;
/// How long to wait for every client to connect before sending anyway.
const CONNECT_PHASE_LIMIT: Duration = Duration::from_secs(180);
/// Latency samples a client buffers before adding them to the histogram.
const FLUSH_EVERY: usize = 512;
/// Subject prefix of the NATS peer (not the room bus's, so a JetStream
/// stream on the same server stores none of it).
pub const NATS_SUBJECT_PREFIX: &str = "weirbench.room.";

/// What `weir loadtest events` loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// A Weir node's room events WebSocket (`/rooms/{room}/events`).
    Weir,
    /// nats-server's own WebSocket listener (NATS client protocol, one
    /// subject per room): the side-by-side peer.
    NatsWs,
}

/// `weir loadtest events` options.
#[derive(Debug, Clone, clap::Args)]
pub struct EventsArgs {
    /// What to load: a Weir node, or nats-server's WebSocket (the peer).
    #[arg(long, value_enum, default_value_t = Target::Weir)]
    pub target: Target,
    /// With --target weir, the node's base URL (`http://HOST:PORT`); with
    /// --target nats-ws, nats-server's WebSocket URL (`ws://HOST:PORT`).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Control plane that mints the tokens (`POST /v1/tokens`; `weir dev`
    /// and `weir control --allow-token-minting` allow it). Not used with
    /// --token or --target nats-ws.
    #[arg(long, env = "WEIR_CONTROL", default_value = "http://127.0.0.1:7000")]
    pub control: String,
    /// One token for every connection instead of minting (then --rooms
    /// must be 1 and every chatter is the same user, so the node's per-user
    /// danmaku limit applies to them all).
    #[arg(long)]
    pub token: Option<String>,
    /// Room name; with --rooms above 1, rooms ROOM-0, ROOM-1, ...
    #[arg(long, default_value = "lt")]
    pub room: String,
    /// Rooms the subscribers are spread over (subscriber i joins room
    /// i mod ROOMS).
    #[arg(long, default_value_t = 1)]
    pub rooms: u32,
    /// WebSocket connections in all (at most 20000; raise `ulimit -n`).
    #[arg(long, default_value_t = 100)]
    pub subscribers: u32,
    /// How many of the subscribers also send danmaku (the first ones, so
    /// with at least ROOMS chatters every room has one); 0 picks
    /// max(ROOMS, RATE / MAX_CHATTER_RATE rounded up).
    #[arg(long, default_value_t = 0)]
    pub chatters: u32,
    /// Danmaku per second from all chatters together, spread evenly.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Most danmaku per second one chatter may send: keep it under the
    /// node's per-connection limit (`chat.conn_rate`, 2 by default) and
    /// per-user limit (`chat.user_rate`, 3), or the node refuses some.
    #[arg(long, default_value_t = 1.5)]
    pub max_chatter_rate: f64,
    /// Seconds of sending, once every subscriber is connected (at most 600).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Seconds after sending stops during which deliveries still count.
    #[arg(long, default_value_t = 3)]
    pub drain: u64,
    /// Connection handshakes in flight at once (initial connects and
    /// reconnects).
    #[arg(long, default_value_t = 500)]
    pub connect_concurrency: usize,
    /// Mass reconnect: every subscriber that is not a chatter disconnects
    /// while danmaku keep flowing, then all reconnect at once (at most
    /// --connect-concurrency handshakes in flight) with
    /// `since=&epoch=`; measures the time until every one has caught up
    /// (got an event at or past the newest offset acknowledged when they
    /// reconnected). Weir only.
    #[arg(long)]
    pub reconnect: bool,
    /// Seconds into the sending phase when the subscribers disconnect.
    #[arg(long, default_value_t = 5)]
    pub reconnect_at: u64,
    /// Milliseconds they stay away before reconnecting all at once.
    #[arg(long, default_value_t = 1000)]
    pub away_ms: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The checked shape of a run.
#[derive(Debug, Clone)]
struct Shape {
    rooms: Vec<String>,
    chatters: u32,
    /// Seconds between two danmaku of one chatter.
    period: f64,
}

impl EventsArgs {
    /// Checks every bound before any traffic.
    fn shape(&self) -> anyhow::Result<Shape> {
        if self.subscribers == 0 || self.subscribers > MAX_SUBSCRIBERS {
            bail!("--subscribers must be between 1 and {MAX_SUBSCRIBERS}");
        }
        if self.rooms == 0 || self.rooms > MAX_ROOMS || self.rooms > self.subscribers {
            bail!("--rooms must be between 1 and min({MAX_ROOMS}, --subscribers)");
        }
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= MAX_RATE) {
            bail!("--rate must be above 0 and at most {MAX_RATE} danmaku per second");
        }
        if !(self.max_chatter_rate.is_finite() && self.max_chatter_rate > 0.0) {
            bail!("--max-chatter-rate must be above 0");
        }
        if self.duration == 0 || self.duration > MAX_DURATION_SECS {
            bail!("--duration must be between 1 and {MAX_DURATION_SECS} seconds");
        }
        if self.drain > 60 {
            bail!("--drain must be at most 60 seconds");
        }
        if self.connect_concurrency == 0 || self.connect_concurrency > 100_000 {
            bail!("--connect-concurrency must be between 1 and 100000");
        }
        weir_protocol::RoomId::parse(&self.room).map_err(|e| anyhow::anyhow!("--room: {e}"))?;
        let chatters = match self.chatters {
            0 => (self.rate / self.max_chatter_rate)
                .ceil()
                .max(f64::from(self.rooms))
                .min(f64::from(u32::MAX)) as u32,
            n => n,
        };
        if chatters > self.subscribers {
            bail!(
                "--chatters: {chatters} chatters are needed (the chatters are subscribers too) but \
                 --subscribers is {}; lower --rate, raise --max-chatter-rate or add subscribers",
                self.subscribers
            );
        }
        let per_chatter = self.rate / f64::from(chatters);
        if per_chatter > self.max_chatter_rate {
            bail!(
                "--rate {} over {chatters} --chatters is {per_chatter:.2} danmaku/s each, above \
                 --max-chatter-rate {} (the node refuses danmaku beyond its per-connection and \
                 per-user limits): add chatters",
                self.rate,
                self.max_chatter_rate
            );
        }
        match self.target {
            Target::Weir => {
                if !self.url.starts_with("http://") {
                    bail!("--url: with --target weir, the node's http:// base URL");
                }
                if self.token.is_some() && self.rooms != 1 {
                    bail!(
                        "--token: one token serves one room; mint them (--control) for --rooms above 1"
                    );
                }
                if self.token.is_none() && !self.control.starts_with("http://") {
                    bail!("--control: an http:// URL (or pass --token)");
                }
            }
            Target::NatsWs => {
                if !self.url.starts_with("ws://") {
                    bail!("--url: with --target nats-ws, nats-server's ws:// WebSocket URL");
                }
                if self.reconnect {
                    bail!(
                        "--reconnect: only with --target weir (core NATS has no recovery of missed messages)"
                    );
                }
            }
        }
        if self.reconnect {
            if chatters >= self.subscribers {
                bail!(
                    "--reconnect: every subscriber is a chatter; add subscribers that can go away"
                );
            }
            let back = self.reconnect_at as f64 + self.away_ms as f64 / 1000.0;
            if self.away_ms == 0 || self.away_ms > 60_000 || back >= self.duration as f64 {
                bail!(
                    "--reconnect-at + --away-ms must end before --duration (and --away-ms be 1..=60000)"
                );
            }
        }
        let rooms = match self.rooms {
            1 => vec![self.room.clone()],
            n => (0..n).map(|i| format!("{}-{i}", self.room)).collect(),
        };
        for r in &rooms {
            weir_protocol::RoomId::parse(r).map_err(|e| anyhow::anyhow!("--room: {r}: {e}"))?;
        }
        Ok(Shape {
            rooms,
            chatters,
            period: f64::from(chatters) / self.rate,
        })
    }
}

/// Disconnects and reconnects of a run with `--reconnect`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ReconnectReport {
    /// Subscribers that went away and came back.
    pub clients: u64,
    pub reconnected: u64,
    pub failed: u64,
    /// Hello frames with `recovered: true` / `false`.
    pub recovered: u64,
    pub not_recovered: u64,
    /// Events the node said it would replay, over all clients.
    pub missed: u64,
    /// Danmaku of this run received while catching up (sent while away;
    /// counted in `deliveries` too) and their send-to-receive time, which
    /// includes the time away.
    pub replayed: u64,
    pub replayed_latency_ms: Option<Percentiles>,
    /// From the reconnect instant to the hello frame.
    pub connect_ms: Option<Percentiles>,
    /// From the reconnect instant to an event at or past the newest
    /// offset acknowledged then, per client.
    pub caught_up_ms: Option<Percentiles>,
    pub caught_up: u64,
    /// Until the last client caught up (None: not all did).
    pub all_caught_up_ms: Option<f64>,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct EventsReport {
    pub target: Target,
    pub rooms: u32,
    pub subscribers: u32,
    pub chatters: u32,
    /// Asked danmaku per second.
    pub rate: f64,
    pub duration_s: f64,
    pub connected: u64,
    pub connect_failed: u64,
    pub connect_ms: Option<Percentiles>,
    pub sent: u64,
    pub sent_per_s: f64,
    /// Acknowledged by the node (Weir); NATS core acknowledges nothing.
    pub acked: u64,
    pub refused: BTreeMap<String, u64>,
    /// Danmaku of this run that reached a subscriber.
    pub deliveries: u64,
    /// Acknowledged (Weir) or sent (NATS) danmaku times the subscribers of
    /// their room.
    pub expected_deliveries: u64,
    /// Deliveries received while the danmaku were being sent, per second
    /// of sending (a backlog delivered during --drain is not throughput).
    pub deliveries_per_s: f64,
    /// Send to receive, milliseconds, of live deliveries (not those
    /// replayed after a reconnect: see [`ReconnectReport`]).
    pub latency_ms: Option<Percentiles>,
    /// Send to the node's ack, milliseconds (Weir).
    pub ack_ms: Option<Percentiles>,
    /// Other frames (counters, online counts, likes, status).
    pub other_frames: u64,
    /// Event frames whose `prev` was not the last offset the client had,
    /// with no `skipped` frame saying why (Weir).
    pub gaps: u64,
    /// `skipped` frames and the events they covered (a slow client).
    pub skipped_frames: u64,
    pub skipped_events: u64,
    /// `gap` frames (the node lost contiguity).
    pub node_gaps: u64,
    /// Connections that ended before the run did: `bye` code (Weir),
    /// `-ERR` text (NATS), or `closed` without either.
    pub disconnects: BTreeMap<String, u64>,
    pub reconnect: Option<ReconnectReport>,
    pub errors: Vec<String>,
}

impl EventsReport {
    /// Whether the run is clean: every client connected, no unexplained
    /// gap, no disconnect, nothing refused, every reconnect recovered.
    pub fn clean(&self) -> bool {
        self.connect_failed == 0
            && self.gaps == 0
            && self.disconnects.is_empty()
            && self.refused.is_empty()
            && self
                .reconnect
                .as_ref()
                .is_none_or(|r| r.failed == 0 && r.not_recovered == 0)
    }
}

/// Fields of a server frame a load client reads, borrowed from the
/// MessagePack map ([`weir_protocol::events::ServerFrame`] is the full
/// contract; this view decodes the same bytes without building it).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FrameView<'a> {
    #[serde(borrow)]
    t: &'a str,
    offset: u64,
    prev: u64,
    epoch: u64,
    recovered: Option<bool>,
    missed: u64,
    count: u64,
    through: u64,
    #[serde(borrow, rename = "type")]
    kind: Option<&'a str>,
    #[serde(borrow)]
    text: Option<&'a str>,
    #[serde(borrow, rename = "ref")]
    reference: Option<&'a str>,
    #[serde(borrow)]
    code: Option<&'a str>,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The danmaku text: `lt RUN SENT_US CHATTER SEQ`.
fn danmaku_text(run: u64, chatter: usize, seq: u64) -> String {
    format!("lt {run} {} {chatter} {seq}", now_us())
}

/// Send time of a danmaku of this run.
fn sent_us(text: &str, run: u64) -> Option<u64> {
    let mut words = text.strip_prefix("lt ")?.split(' ');
    if words.next()?.parse::<u64>().ok()? != run {
        return None;
    }
    words.next()?.parse().ok()
}

/// Histograms of microseconds up to 10 minutes.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// When the run's phases happen (sent to every client once all connected).
#[derive(Debug, Clone, Copy)]
struct Plan {
    start: Instant,
    end: Instant,
    stop: Instant,
    /// (go away, come back) for --reconnect.
    away: Option<(Instant, Instant)>,
}

/// What every client shares.
struct Ctx {
    target: Target,
    run: u64,
    url: String,
    rooms: Vec<String>,
    /// Subscriber token per room, chatter token per chatter (Weir).
    room_tokens: Vec<String>,
    chat_tokens: Vec<String>,
    chatters: usize,
    period: Duration,
    rate: f64,
    connect: Semaphore,
    plan: watch::Receiver<Option<Plan>>,
    ready: AtomicU64,
    ready_tx: watch::Sender<u64>,
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    connect_failed: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    deliveries: AtomicU64,
    other: AtomicU64,
    gaps: AtomicU64,
    skipped_frames: AtomicU64,
    skipped_events: AtomicU64,
    node_gaps: AtomicU64,
    refused: Mutex<BTreeMap<String, u64>>,
    disconnects: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<Vec<String>>,
    latency: Mutex<Option<Histogram<u64>>>,
    replayed: AtomicU64,
    in_window: AtomicU64,
    replayed_us: Mutex<Option<Histogram<u64>>>,
    ack: Mutex<Option<Histogram<u64>>>,
    connect_us: Mutex<Option<Histogram<u64>>>,
    /// Per room: acknowledged (Weir) or sent (NATS) danmaku.
    room_count: Vec<AtomicU64>,
    /// Per room: the newest acknowledged offset.
    room_offset: Vec<AtomicU64>,
    rc_clients: AtomicU64,
    rc_reconnected: AtomicU64,
    rc_failed: AtomicU64,
    rc_recovered: AtomicU64,
    rc_not_recovered: AtomicU64,
    rc_missed: AtomicU64,
    rc_caught_up: AtomicU64,
    rc_connect_us: Mutex<Option<Histogram<u64>>>,
    rc_caught_up_us: Mutex<Option<Histogram<u64>>>,
}

impl Stats {
    fn new(rooms: usize) -> Self {
        Self {
            latency: Mutex::new(Some(histogram())),
            replayed_us: Mutex::new(Some(histogram())),
            ack: Mutex::new(Some(histogram())),
            connect_us: Mutex::new(Some(histogram())),
            rc_connect_us: Mutex::new(Some(histogram())),
            rc_caught_up_us: Mutex::new(Some(histogram())),
            room_count: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            room_offset: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            ..Self::default()
        }
    }

    fn record(h: &Mutex<Option<Histogram<u64>>>, values: &[u64]) {
        if let Some(h) = lock(h).as_mut() {
            for v in values {
                h.saturating_record(*v);
            }
        }
    }

    fn bump(map: &Mutex<BTreeMap<String, u64>>, key: &str) {
        *lock(map).entry(key.to_owned()).or_default() += 1;
    }

    fn error(&self, e: String) {
        let mut errors = lock(&self.errors);
        if errors.len() < 10 {
            errors.push(e);
        }
    }

    fn take(h: &Mutex<Option<Histogram<u64>>>) -> Option<Percentiles> {
        lock(h).as_ref().and_then(|h| percentiles(h, 1000.0))
    }
}

/// A client's own counts, added to [`Stats`] in batches.
#[derive(Default)]
struct Local {
    deliveries: u64,
    other: u64,
    latency_us: Vec<u64>,
    /// Deliveries replayed after a reconnect (sent while the client was
    /// away), kept apart from live ones.
    replayed: u64,
    replayed_us: Vec<u64>,
    ack_us: Vec<u64>,
    /// End of the sending phase, and deliveries received before it.
    window_end: Option<Instant>,
    in_window: u64,
}

impl Local {
    fn flush(&mut self, stats: &Stats) {
        stats.deliveries.fetch_add(self.deliveries, Relaxed);
        stats.other.fetch_add(self.other, Relaxed);
        stats.replayed.fetch_add(self.replayed, Relaxed);
        stats.in_window.fetch_add(self.in_window, Relaxed);
        self.in_window = 0;
        self.deliveries = 0;
        self.other = 0;
        self.replayed = 0;
        Stats::record(&stats.latency, &self.latency_us);
        Stats::record(&stats.replayed_us, &self.replayed_us);
        Stats::record(&stats.ack, &self.ack_us);
        self.latency_us.clear();
        self.replayed_us.clear();
        self.ack_us.clear();
    }

    fn replayed(&mut self, sent_us: u64, stats: &Stats) {
        self.count();
        self.replayed += 1;
        self.replayed_us
            .push(now_us().saturating_sub(sent_us).max(1));
        if self.replayed_us.len() >= FLUSH_EVERY {
            self.flush(stats);
        }
    }

    fn count(&mut self) {
        self.deliveries += 1;
        if self.window_end.is_some_and(|end| Instant::now() <= end) {
            self.in_window += 1;
        }
    }

    fn delivered(&mut self, sent_us: u64, stats: &Stats) {
        self.count();
        self.latency_us
            .push(now_us().saturating_sub(sent_us).max(1));
        if self.latency_us.len() >= FLUSH_EVERY {
            self.flush(stats);
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Small buffers: thousands of connections in one process.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20))
}

/// Opens a WebSocket; `Err((retry, why))`.
async fn open(url: &str) -> Result<Ws, (bool, String)> {
    let connect = tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Err(_) => Err((true, format!("connect timed out after {CONNECT_TIMEOUT:?}"))),
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tungstenite::Error::Http(response))) => {
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).trim().to_owned())
                .unwrap_or_default();
            // A refusal (bad token, bad query) will not change on retry;
            // an overloaded server (5xx) may.
            Err((
                response.status().is_server_error(),
                format!("refused with {}: {body}", response.status()),
            ))
        }
        Ok(Err(e)) => Err((true, format!("cannot connect: {e}"))),
    }
}

/// The hello of a Weir connection.
#[derive(Debug, Clone, Copy)]
struct Hello {
    epoch: u64,
    offset: u64,
    recovered: Option<bool>,
    missed: u64,
}

async fn read_hello(ws: &mut Ws) -> Result<Hello, (bool, String)> {
    let first = tokio::time::timeout(CONNECT_TIMEOUT, ws.next())
        .await
        .map_err(|_| (true, "no hello frame in time".to_owned()))?;
    match first {
        Some(Ok(Message::Binary(b))) => {
            let f: FrameView<'_> =
                rmp_serde::from_slice(&b).map_err(|e| (false, format!("bad first frame: {e}")))?;
            if f.t != "hello" {
                return Err((false, format!("first frame is {:?}, not hello", f.t)));
            }
            Ok(Hello {
                epoch: f.epoch,
                offset: f.offset,
                recovered: f.recovered,
                missed: f.missed,
            })
        }
        other => Err((true, format!("no hello frame: {other:?}"))),
    }
}

/// Connects a Weir client (with retries) and reads its hello.
async fn open_weir(ctx: &Ctx, url: &str) -> Result<(Ws, Hello), String> {
    let mut last = String::new();
    for attempt in 0..CONNECT_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
        }
        let _permit = ctx.connect.acquire().await;
        let result = match open(url).await {
            Ok(mut ws) => read_hello(&mut ws).await.map(|h| (ws, h)),
            Err(e) => Err(e),
        };
        match result {
            Ok(v) => return Ok(v),
            Err((retry, why)) => {
                last = why;
                if !retry {
                    break;
                }
            }
        }
    }
    Err(last)
}

fn events_url(ctx: &Ctx, room: usize, token: &str, since: Option<(u64, u64)>) -> String {
    let base = ctx
        .url
        .trim_end_matches('/')
        .replacen("http://", "ws://", 1);
    let mut url = format!("{base}/rooms/{}/events?token={token}", ctx.rooms[room]);
    if let Some((since, epoch)) = since {
        url.push_str(&format!("&since={since}&epoch={epoch}"));
    }
    url
}

/// Resolves at `at`, or never.
struct Timer(Pin<Box<tokio::time::Sleep>>, bool);

impl Timer {
    fn new() -> Self {
        Self(
            Box::pin(tokio::time::sleep(Duration::from_secs(86_400))),
            false,
        )
    }

    fn set(&mut self, at: Option<Instant>) {
        self.1 = at.is_some();
        if let Some(at) = at {
            self.0.as_mut().reset(at.into());
        }
    }

    fn armed(&self) -> bool {
        self.1
    }
}

/// Where a Weir client stands in the room's `prev` chain.
struct Chain {
    /// Offset of the last event got (None: accept the next as is).
    last: Option<u64>,
    epoch: u64,
}

/// Catching up after a reconnect.
struct CatchUp {
    target: u64,
    since: Instant,
}

/// One Weir subscriber (and chatter when `i < chatters`).
async fn weir_client(ctx: Arc<Ctx>, i: usize) {
    let room = i % ctx.rooms.len();
    let chatter = i < ctx.chatters;
    let token = if chatter {
        ctx.chat_tokens[i.min(ctx.chat_tokens.len() - 1)].clone()
    } else {
        ctx.room_tokens[room.min(ctx.room_tokens.len() - 1)].clone()
    };
    let stats = &ctx.stats;
    let started = Instant::now();
    let opened = open_weir(&ctx, &events_url(&ctx, room, &token, None)).await;
    let (mut ws, hello) = match opened {
        Ok(v) => v,
        Err(e) => {
            stats.connect_failed.fetch_add(1, Relaxed);
            stats.error(format!("client {i}: {e}"));
            ctx.client_ready();
            return;
        }
    };
    stats.connected.fetch_add(1, Relaxed);
    Stats::record(&stats.connect_us, &[started.elapsed().as_micros() as u64]);
    ctx.client_ready();
    let mut chain = Chain {
        last: Some(hello.offset),
        epoch: hello.epoch,
    };
    let mut local = Local::default();
    let mut plan_rx = ctx.plan.clone();
    let mut plan: Option<Plan> = *plan_rx.borrow_and_update();
    let mut send = Timer::new();
    let mut away = Timer::new();
    let mut stop = Timer::new();
    let mut next_send = None;
    let mut seq = 0u64;
    let mut catch_up: Option<CatchUp> = None;
    let arm = |plan: &Plan, send: &mut Timer, away: &mut Timer, stop: &mut Timer| {
        let first = chatter.then(|| plan.start + Duration::from_secs_f64(i as f64 / ctx.rate));
        send.set(first);
        away.set(if chatter {
            None
        } else {
            plan.away.map(|a| a.0)
        });
        stop.set(Some(plan.stop));
        first
    };
    if let Some(p) = &plan {
        next_send = arm(p, &mut send, &mut away, &mut stop);
        local.window_end = Some(p.end);
    }
    let mut ended = false;
    while !ended {
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(Message::Binary(b))) => {
                    if let Some(code) = weir_frame(&ctx, room, &b, &mut chain, &mut local, &mut catch_up) {
                        Stats::bump(&stats.disconnects, &code);
                        ended = true;
                    }
                }
                Some(Ok(Message::Text(_))) => local.other += 1,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    Stats::bump(&stats.disconnects, "closed");
                    ended = true;
                }
            },
            changed = plan_rx.changed(), if plan.is_none() => {
                if changed.is_err() { break; }
                plan = *plan_rx.borrow_and_update();
                if let Some(p) = &plan {
                    next_send = arm(p, &mut send, &mut away, &mut stop);
                    local.window_end = Some(p.end);
                }
            }
            () = &mut send.0, if send.armed() => {
                let Some((at, p)) = next_send.zip(plan) else { break };
                seq += 1;
                let text = danmaku_text(ctx.run, i, seq);
                let frame = serde_json::json!({"t": "danmaku", "text": text, "ref": format!("{seq}:{}", now_us())});
                stats.sent.fetch_add(1, Relaxed);
                if ws.send(Message::Text(frame.to_string().into())).await.is_err() {
                    Stats::bump(&stats.disconnects, "closed");
                    break;
                }
                // The next slot; slots missed while late are dropped rather
                // than sent in a burst the node's rate limit would refuse.
                let mut next = at + ctx.period;
                let now = Instant::now();
                while next < now {
                    next += ctx.period;
                }
                next_send = (next < p.end).then_some(next);
                send.set(next_send);
            }
            () = &mut away.0, if away.armed() => {
                away.set(None);
                let Some((_, back)) = plan.and_then(|p| p.away) else { continue };
                stats.rc_clients.fetch_add(1, Relaxed);
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                drop(ws);
                tokio::time::sleep_until(back.into()).await;
                let target = stats.room_offset[room].load(Relaxed);
                let since = chain.last.map(|l| (l, chain.epoch));
                let url = events_url(&ctx, room, &token, since);
                match open_weir(&ctx, &url).await {
                    Ok((new_ws, hello)) => {
                        ws = new_ws;
                        let now = Instant::now();
                        stats.rc_reconnected.fetch_add(1, Relaxed);
                        Stats::record(&stats.rc_connect_us, &[(now - back).as_micros() as u64]);
                        stats.rc_missed.fetch_add(hello.missed, Relaxed);
                        if hello.recovered == Some(true) {
                            stats.rc_recovered.fetch_add(1, Relaxed);
                        } else {
                            stats.rc_not_recovered.fetch_add(1, Relaxed);
                            chain = Chain { last: Some(hello.offset), epoch: hello.epoch };
                        }
                        if chain.last.is_some_and(|l| l >= target) {
                            stats.rc_caught_up.fetch_add(1, Relaxed);
                            Stats::record(&stats.rc_caught_up_us, &[(now - back).as_micros() as u64]);
                        } else {
                            catch_up = Some(CatchUp { target, since: back });
                        }
                    }
                    Err(e) => {
                        stats.rc_failed.fetch_add(1, Relaxed);
                        stats.error(format!("client {i} reconnecting: {e}"));
                        local.flush(stats);
                        return;
                    }
                }
            }
            () = &mut stop.0, if stop.armed() => break,
        }
    }
    local.flush(stats);
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
}

/// Takes one frame; `Some(code)` when the node said goodbye.
fn weir_frame(
    ctx: &Ctx,
    room: usize,
    bytes: &[u8],
    chain: &mut Chain,
    local: &mut Local,
    catch_up: &mut Option<CatchUp>,
) -> Option<String> {
    let stats = &ctx.stats;
    let f: FrameView<'_> = match rmp_serde::from_slice(bytes) {
        Ok(f) => f,
        Err(e) => {
            stats.error(format!("undecodable frame: {e}"));
            return Some("undecodable".into());
        }
    };
    match f.t {
        "event" => {
            if let Some(last) = chain.last
                && f.prev != last
            {
                stats.gaps.fetch_add(1, Relaxed);
            }
            chain.last = Some(f.offset);
            // Until it reaches the target the client is replaying what it
            // missed (the target event included).
            let replaying = catch_up.is_some();
            if let Some(c) = catch_up
                && f.offset >= c.target
            {
                stats.rc_caught_up.fetch_add(1, Relaxed);
                Stats::record(
                    &stats.rc_caught_up_us,
                    &[c.since.elapsed().as_micros() as u64],
                );
                *catch_up = None;
            }
            match (f.kind, f.text.and_then(|t| sent_us(t, ctx.run))) {
                (Some("danmaku"), Some(sent)) if replaying => local.replayed(sent, stats),
                (Some("danmaku"), Some(sent)) => local.delivered(sent, stats),
                _ => local.other += 1,
            }
        }
        "skipped" => {
            stats.skipped_frames.fetch_add(1, Relaxed);
            stats.skipped_events.fetch_add(f.count, Relaxed);
            if f.through > 0 {
                chain.last = Some(f.through);
            }
        }
        "gap" => {
            stats.node_gaps.fetch_add(1, Relaxed);
            chain.last = None;
        }
        "ack" => {
            stats.acked.fetch_add(1, Relaxed);
            stats.room_count[room].fetch_add(1, Relaxed);
            stats.room_offset[room].fetch_max(f.offset, Relaxed);
            if let Some(sent) = f
                .reference
                .and_then(|r| r.split_once(':'))
                .and_then(|(_, us)| us.parse::<u64>().ok())
            {
                local.ack_us.push(now_us().saturating_sub(sent).max(1));
            }
        }
        "refused" => Stats::bump(&stats.refused, f.code.unwrap_or("?")),
        "bye" => return Some(f.code.unwrap_or("bye").to_owned()),
        _ => local.other += 1,
    }
    None
}

/// Connects a NATS WebSocket client, subscribes to its room's subject and
/// waits for the server to confirm (PONG after SUB).
async fn open_nats(ctx: &Ctx, subject: &str) -> Result<(Ws, nats_ws::Reader), String> {
    let mut last = String::new();
    for attempt in 0..CONNECT_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
        }
        let _permit = ctx.connect.acquire().await;
        let mut ws = match open(&ctx.url).await {
            Ok(ws) => ws,
            Err((retry, why)) => {
                last = why;
                if retry {
                    continue;
                }
                break;
            }
        };
        let hello = format!("{}{}PING\r\n", nats_ws::CONNECT, nats_ws::sub(subject, 1));
        if let Err(e) = ws.send(Message::Text(hello.into())).await {
            last = format!("cannot subscribe: {e}");
            continue;
        }
        let mut reader = nats_ws::Reader::default();
        let confirmed = tokio::time::timeout(CONNECT_TIMEOUT, async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) => reader.push(&b),
                    Some(Ok(Message::Text(t))) => reader.push(t.as_bytes()),
                    Some(Ok(_)) => continue,
                    other => return Err(format!("closed while subscribing: {other:?}")),
                }
                while let Some(op) = reader.next_op()? {
                    match op {
                        nats_ws::Op::Pong => return Ok(()),
                        nats_ws::Op::Err(e) => return Err(format!("-ERR {e}")),
                        _ => {}
                    }
                }
            }
        })
        .await;
        match confirmed {
            Ok(Ok(())) => return Ok((ws, reader)),
            Ok(Err(e)) => last = e,
            Err(_) => last = "no PONG after SUB in time".into(),
        }
    }
    Err(last)
}

/// One NATS WebSocket subscriber (and publisher when `i < chatters`).
async fn nats_client(ctx: Arc<Ctx>, i: usize) {
    let room = i % ctx.rooms.len();
    let chatter = i < ctx.chatters;
    let subject = format!("{NATS_SUBJECT_PREFIX}{}", ctx.rooms[room]);
    let stats = &ctx.stats;
    let started = Instant::now();
    let opened = open_nats(&ctx, &subject).await;
    let (mut ws, mut reader) = match opened {
        Ok(v) => v,
        Err(e) => {
            stats.connect_failed.fetch_add(1, Relaxed);
            stats.error(format!("client {i}: {e}"));
            ctx.client_ready();
            return;
        }
    };
    stats.connected.fetch_add(1, Relaxed);
    Stats::record(&stats.connect_us, &[started.elapsed().as_micros() as u64]);
    ctx.client_ready();
    let mut local = Local::default();
    let mut plan_rx = ctx.plan.clone();
    let mut plan: Option<Plan> = *plan_rx.borrow_and_update();
    let mut send = Timer::new();
    let mut stop = Timer::new();
    let mut next_send = None;
    let mut seq = 0u64;
    let arm = |plan: &Plan, send: &mut Timer, stop: &mut Timer| {
        let first = chatter.then(|| plan.start + Duration::from_secs_f64(i as f64 / ctx.rate));
        send.set(first);
        stop.set(Some(plan.stop));
        first
    };
    if let Some(p) = &plan {
        next_send = arm(p, &mut send, &mut stop);
        local.window_end = Some(p.end);
    }
    'run: loop {
        tokio::select! {
            message = ws.next() => {
                match message {
                    Some(Ok(Message::Binary(b))) => reader.push(&b),
                    Some(Ok(Message::Text(t))) => reader.push(t.as_bytes()),
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => {
                        Stats::bump(&stats.disconnects, "closed");
                        break;
                    }
                }
                loop {
                    match reader.next_op() {
                        Ok(Some(nats_ws::Op::Msg { payload, .. })) => {
                            match serde_json::from_slice::<RoomEvent>(&payload) {
                                Ok(RoomEvent { body: EventBody::Danmaku { text, .. }, .. }) => {
                                    match sent_us(&text, ctx.run) {
                                        Some(sent) => local.delivered(sent, stats),
                                        None => local.other += 1,
                                    }
                                }
                                _ => local.other += 1,
                            }
                        }
                        Ok(Some(nats_ws::Op::Ping)) => {
                            if ws.send(Message::Text("PONG\r\n".into())).await.is_err() {
                                Stats::bump(&stats.disconnects, "closed");
                                break 'run;
                            }
                        }
                        Ok(Some(nats_ws::Op::Err(e))) => {
                            Stats::bump(&stats.disconnects, &format!("-ERR {e}"));
                            break 'run;
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => {
                            stats.error(format!("client {i}: {e}"));
                            Stats::bump(&stats.disconnects, "protocol");
                            break 'run;
                        }
                    }
                }
            }
            changed = plan_rx.changed(), if plan.is_none() => {
                if changed.is_err() { break; }
                plan = *plan_rx.borrow_and_update();
                if let Some(p) = &plan {
                    next_send = arm(p, &mut send, &mut stop);
                    local.window_end = Some(p.end);
                }
            }
            () = &mut send.0, if send.armed() => {
                let Some((at, p)) = next_send.zip(plan) else { break };
                seq += 1;
                let event = RoomEvent {
                    at_ms: now_us() / 1000,
                    body: EventBody::Danmaku {
                        user: format!("lt-chat-{i}"),
                        text: danmaku_text(ctx.run, i, seq),
                    },
                };
                let frame = nats_ws::publish(&subject, &event.encode());
                stats.sent.fetch_add(1, Relaxed);
                stats.room_count[room].fetch_add(1, Relaxed);
                if ws.send(Message::Binary(frame.into())).await.is_err() {
                    Stats::bump(&stats.disconnects, "closed");
                    break;
                }
                let mut next = at + ctx.period;
                let now = Instant::now();
                while next < now {
                    next += ctx.period;
                }
                next_send = (next < p.end).then_some(next);
                send.set(next_send);
            }
            () = &mut stop.0, if stop.armed() => break,
        }
    }
    local.flush(stats);
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
}

impl Ctx {
    fn client_ready(&self) {
        let n = self.ready.fetch_add(1, Relaxed) + 1;
        self.ready_tx.send_replace(n);
    }
}

/// Mints `(room, subject)` play tokens through the control plane, a few at
/// a time.
async fn mint(control: &str, wanted: Vec<(String, String)>) -> anyhow::Result<Vec<String>> {
    let url = format!("{}/v1/tokens", control.trim_end_matches('/'));
    let mut out = Vec::with_capacity(wanted.len());
    for chunk in wanted.chunks(16) {
        let mut tasks = Vec::new();
        for (room, subject) in chunk {
            let url = url.clone();
            let body =
                serde_json::json!({ "room": room, "mode": "play", "subject": subject }).to_string();
            tasks.push(tokio::spawn(async move {
                let r = crate::http::request(
                    "POST",
                    &url,
                    &[("Content-Type", "application/json")],
                    body.as_bytes(),
                    Duration::from_secs(10),
                )
                .await?;
                if r.status != 200 {
                    bail!("POST {url} answered {}: {}", r.status, r.text().trim());
                }
                let v: serde_json::Value =
                    serde_json::from_slice(&r.body).context("token: bad JSON")?;
                Ok(v["token"]
                    .as_str()
                    .context("token: none in the answer")?
                    .to_owned())
            }));
        }
        for t in tasks {
            out.push(t.await.context("minting task failed")??);
        }
    }
    Ok(out)
}

/// Runs the clients and returns the report.
pub async fn measure(args: &EventsArgs) -> anyhow::Result<EventsReport> {
    let shape = args.shape()?;
    let run = now_us() ^ u64::from(std::process::id());
    let (room_tokens, chat_tokens) = match (args.target, &args.token) {
        (Target::NatsWs, _) => (Vec::new(), Vec::new()),
        (Target::Weir, Some(t)) => (vec![t.clone()], vec![t.clone()]),
        (Target::Weir, None) => {
            let rooms = shape
                .rooms
                .iter()
                .map(|r| (r.clone(), "lt-sub".to_owned()))
                .collect();
            let chatters = (0..shape.chatters as usize)
                .map(|i| {
                    (
                        shape.rooms[i % shape.rooms.len()].clone(),
                        format!("lt-chat-{i}"),
                    )
                })
                .collect();
            (
                mint(&args.control, rooms)
                    .await
                    .context("cannot mint subscriber tokens")?,
                mint(&args.control, chatters)
                    .await
                    .context("cannot mint chatter tokens")?,
            )
        }
    };
    let (plan_tx, plan_rx) = watch::channel(None);
    let (ready_tx, mut ready_rx) = watch::channel(0u64);
    let ctx = Arc::new(Ctx {
        target: args.target,
        run,
        url: args.url.clone(),
        room_tokens,
        chat_tokens,
        chatters: shape.chatters as usize,
        period: Duration::from_secs_f64(shape.period),
        rate: args.rate,
        connect: Semaphore::new(args.connect_concurrency),
        plan: plan_rx,
        ready: AtomicU64::new(0),
        ready_tx,
        stats: Stats::new(shape.rooms.len()),
        rooms: shape.rooms.clone(),
    });
    let n = u64::from(args.subscribers);
    let mut tasks = Vec::with_capacity(args.subscribers as usize);
    for i in 0..args.subscribers as usize {
        let ctx = Arc::clone(&ctx);
        tasks.push(tokio::spawn(async move {
            match ctx.target {
                Target::Weir => weir_client(ctx, i).await,
                Target::NatsWs => nats_client(ctx, i).await,
            }
        }));
    }
    let connecting = Instant::now();
    let _ = tokio::time::timeout(CONNECT_PHASE_LIMIT, ready_rx.wait_for(|r| *r >= n)).await;
    // Progress on stderr (the report goes to stdout): scripts wait for
    // "sending" to sample CPU over the sending phase.
    eprintln!(
        "connected {} of {n} ({} failed) in {:.1} s; sending for {} s",
        ctx.stats.connected.load(Relaxed),
        ctx.stats.connect_failed.load(Relaxed),
        connecting.elapsed().as_secs_f64(),
        args.duration
    );
    // Let the last hellos settle (and the node's online counts go out).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs(args.duration);
    let away = args.reconnect.then(|| {
        let at = start + Duration::from_secs(args.reconnect_at);
        (at, at + Duration::from_millis(args.away_ms))
    });
    plan_tx.send_replace(Some(Plan {
        start,
        end,
        stop: end + Duration::from_secs(args.drain),
        away,
    }));
    for t in tasks {
        if let Err(e) = t.await {
            ctx.stats.error(format!("client task failed: {e}"));
        }
    }
    let s = &ctx.stats;
    let duration_s = args.duration as f64;
    let mut per_room = vec![0u64; shape.rooms.len()];
    for i in 0..args.subscribers as usize {
        per_room[i % shape.rooms.len()] += 1;
    }
    let expected = per_room
        .iter()
        .zip(&s.room_count)
        .map(|(subs, count)| subs * count.load(Relaxed))
        .sum();
    let deliveries = s.deliveries.load(Relaxed);
    let sent = s.sent.load(Relaxed);
    let reconnect = args.reconnect.then(|| {
        let clients = s.rc_clients.load(Relaxed);
        let caught_up = s.rc_caught_up.load(Relaxed);
        let caught = lock(&s.rc_caught_up_us).as_ref().map(|h| h.max());
        ReconnectReport {
            clients,
            reconnected: s.rc_reconnected.load(Relaxed),
            failed: s.rc_failed.load(Relaxed),
            recovered: s.rc_recovered.load(Relaxed),
            not_recovered: s.rc_not_recovered.load(Relaxed),
            missed: s.rc_missed.load(Relaxed),
            replayed: s.replayed.load(Relaxed),
            replayed_latency_ms: Stats::take(&s.replayed_us),
            connect_ms: Stats::take(&s.rc_connect_us),
            caught_up_ms: Stats::take(&s.rc_caught_up_us),
            caught_up,
            all_caught_up_ms: (clients > 0 && caught_up == clients)
                .then(|| caught.map(|us| us as f64 / 1000.0))
                .flatten(),
        }
    });
    Ok(EventsReport {
        target: args.target,
        rooms: shape.rooms.len() as u32,
        subscribers: args.subscribers,
        chatters: shape.chatters,
        rate: args.rate,
        duration_s,
        connected: s.connected.load(Relaxed),
        connect_failed: s.connect_failed.load(Relaxed),
        connect_ms: Stats::take(&s.connect_us),
        sent,
        sent_per_s: sent as f64 / duration_s,
        acked: s.acked.load(Relaxed),
        refused: lock(&s.refused).clone(),
        deliveries,
        expected_deliveries: expected,
        deliveries_per_s: s.in_window.load(Relaxed) as f64 / duration_s,
        latency_ms: Stats::take(&s.latency),
        ack_ms: match args.target {
            Target::Weir => Stats::take(&s.ack),
            Target::NatsWs => None,
        },
        other_frames: s.other.load(Relaxed),
        gaps: s.gaps.load(Relaxed),
        skipped_frames: s.skipped_frames.load(Relaxed),
        skipped_events: s.skipped_events.load(Relaxed),
        node_gaps: s.node_gaps.load(Relaxed),
        disconnects: lock(&s.disconnects).clone(),
        reconnect,
        errors: lock(&s.errors).clone(),
    })
}

/// Entry point of `weir loadtest events`; exit code 0 when the run was
/// clean ([`EventsReport::clean`]).
pub async fn run(args: EventsArgs) -> anyhow::Result<i32> {
    let report = measure(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(if report.clean() { 0 } else { 1 })
}

fn print_table(r: &EventsReport) {
    let target = match r.target {
        Target::Weir => "weir",
        Target::NatsWs => "nats-ws",
    };
    println!(
        "{target}: {} subscribers in {} rooms ({} chatters), {:.0} danmaku/s asked for {:.0} s",
        r.subscribers, r.rooms, r.chatters, r.rate, r.duration_s
    );
    println!(
        "connected {}, failed {}; sent {} ({:.1}/s), acked {}, refused {:?}",
        r.connected, r.connect_failed, r.sent, r.sent_per_s, r.acked, r.refused
    );
    let ratio = if r.expected_deliveries > 0 {
        100.0 * r.deliveries as f64 / r.expected_deliveries as f64
    } else {
        0.0
    };
    println!(
        "deliveries {} of {} expected ({ratio:.2} %), {:.0}/s",
        r.deliveries, r.expected_deliveries, r.deliveries_per_s
    );
    println!(
        "gaps {}, skipped {} events in {} frames, node gaps {}, disconnects {:?}",
        r.gaps, r.skipped_events, r.skipped_frames, r.node_gaps, r.disconnects
    );
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "measure", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    let mut rows = vec![
        ("connect (ms)", &r.connect_ms),
        ("delivery latency (ms)", &r.latency_ms),
        ("ack (ms)", &r.ack_ms),
    ];
    if let Some(rc) = &r.reconnect {
        rows.push(("reconnect (ms)", &rc.connect_ms));
        rows.push(("caught up (ms)", &rc.caught_up_ms));
        rows.push(("replayed latency (ms)", &rc.replayed_latency_ms));
    }
    for (name, p) in rows {
        match p {
            Some(p) => println!(
                "{:<22} {:>9} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                name, p.count, p.p50, p.p90, p.p99, p.p999, p.max
            ),
            None => println!("{name:<22} {:>9}", 0),
        }
    }
    if let Some(rc) = &r.reconnect {
        println!(
            "reconnect: {} went away, {} back, {} failed; recovered {}, not {}; {} missed replayed; \
             caught up {} — all after {}",
            rc.clients,
            rc.reconnected,
            rc.failed,
            rc.recovered,
            rc.not_recovered,
            rc.missed,
            rc.caught_up,
            rc.all_caught_up_ms
                .map_or("never (not all caught up)".to_owned(), |ms| format!(
                    "{ms:.0} ms"
                ))
        );
    }
    for e in &r.errors {
        println!("error: {e}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use weir_protocol::events::{Format, ServerFrame};

    fn args() -> EventsArgs {
        EventsArgs {
            target: Target::Weir,
            // Nothing listens here: every refusal must come before traffic.
            url: "http://127.0.0.1:1".into(),
            control: "http://127.0.0.1:1".into(),
            token: None,
            room: "lt".into(),
            rooms: 1,
            subscribers: 20,
            chatters: 0,
            rate: 2.0,
            max_chatter_rate: 1.5,
            duration: 2,
            drain: 1,
            connect_concurrency: 10,
            reconnect: false,
            reconnect_at: 1,
            away_ms: 500,
            json: true,
        }
    }

    #[tokio::test]
    async fn bad_arguments_are_refused_before_any_traffic() {
        for (bad, want) in [
            (
                EventsArgs {
                    subscribers: 0,
                    ..args()
                },
                "--subscribers",
            ),
            (
                EventsArgs {
                    subscribers: MAX_SUBSCRIBERS + 1,
                    ..args()
                },
                "--subscribers",
            ),
            (
                EventsArgs {
                    rooms: 21,
                    ..args()
                },
                "--rooms",
            ),
            (
                EventsArgs {
                    rate: 0.0,
                    ..args()
                },
                "--rate",
            ),
            (
                EventsArgs {
                    rate: f64::NAN,
                    ..args()
                },
                "--rate",
            ),
            (
                EventsArgs {
                    duration: 0,
                    ..args()
                },
                "--duration",
            ),
            (
                EventsArgs {
                    chatters: 1,
                    rate: 5.0,
                    ..args()
                },
                "add chatters",
            ),
            (
                EventsArgs {
                    rate: 100.0,
                    ..args()
                },
                "--chatters",
            ),
            (
                EventsArgs {
                    room: "a b".into(),
                    ..args()
                },
                "--room",
            ),
            (
                EventsArgs {
                    url: "ws://x".into(),
                    ..args()
                },
                "--url",
            ),
            (
                EventsArgs {
                    token: Some("t".into()),
                    rooms: 2,
                    ..args()
                },
                "--token",
            ),
            (
                EventsArgs {
                    target: Target::NatsWs,
                    ..args()
                },
                "--url",
            ),
            (
                EventsArgs {
                    target: Target::NatsWs,
                    url: "ws://127.0.0.1:1".into(),
                    reconnect: true,
                    ..args()
                },
                "--reconnect",
            ),
            (
                EventsArgs {
                    reconnect: true,
                    reconnect_at: 2,
                    ..args()
                },
                "--reconnect-at",
            ),
            (
                EventsArgs {
                    reconnect: true,
                    chatters: 20,
                    ..args()
                },
                "--reconnect",
            ),
        ] {
            let e = measure(&bad)
                .await
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(want), "{e:?} should name {want}");
        }
        // A control plane that does not answer is a clear error, not a hang.
        let e = measure(&args())
            .await
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("cannot mint"), "{e}");
    }

    #[test]
    fn auto_chatters_cover_every_room_within_the_rate_limit() {
        let s = EventsArgs {
            rooms: 10,
            rate: 200.0,
            subscribers: 200,
            ..args()
        }
        .shape()
        .unwrap();
        assert_eq!(s.chatters, 134);
        assert!(200.0 / f64::from(s.chatters) <= 1.5);
        let s = EventsArgs {
            rooms: 20,
            rate: 2.0,
            ..args()
        }
        .shape()
        .unwrap();
        assert_eq!((s.chatters, s.rooms.len()), (20, 20));
        assert_eq!(s.rooms[3], "lt-3");
    }

    #[test]
    fn the_frame_view_reads_what_the_node_encodes() {
        let run = 42;
        let text = danmaku_text(run, 3, 9);
        let sent = sent_us(&text, run).unwrap();
        assert!(sent > 0 && sent_us(&text, 43).is_none() && sent_us("hi", run).is_none());
        let event = ServerFrame::Event {
            offset: 7,
            prev: 5,
            at_ms: 1,
            id: Some("n-1".into()),
            body: EventBody::Danmaku {
                user: "u".into(),
                text: text.clone(),
            },
        }
        .encode(Format::Msgpack);
        let f: FrameView<'_> = rmp_serde::from_slice(&event).unwrap();
        assert_eq!(
            (f.t, f.offset, f.prev, f.kind, f.text),
            ("event", 7, 5, Some("danmaku"), Some(text.as_str()))
        );
        let hello = ServerFrame::Hello {
            room: "r".into(),
            epoch: 11,
            offset: 7,
            recovered: Some(true),
            missed: 3,
            degraded: false,
            user: "u".into(),
        }
        .encode(Format::Msgpack);
        let f: FrameView<'_> = rmp_serde::from_slice(&hello).unwrap();
        assert_eq!(
            (f.t, f.epoch, f.offset, f.recovered, f.missed),
            ("hello", 11, 7, Some(true), 3)
        );
        let skipped = ServerFrame::Skipped {
            class: weir_protocol::bus::EventClass::Chat,
            count: 4,
            through: 12,
        }
        .encode(Format::Msgpack);
        let f: FrameView<'_> = rmp_serde::from_slice(&skipped).unwrap();
        assert_eq!((f.t, f.count, f.through), ("skipped", 4, 12));
        for (frame, t) in [
            (
                ServerFrame::Ack {
                    r#ref: "1:5".into(),
                    offset: 7,
                },
                "ack",
            ),
            (
                ServerFrame::Bye {
                    code: "too_slow".into(),
                    reason: "x".into(),
                },
                "bye",
            ),
            (
                ServerFrame::Refused {
                    r#ref: "1:5".into(),
                    code: "rate_limited".into(),
                    reason: "x".into(),
                },
                "refused",
            ),
        ] {
            let bytes = frame.encode(Format::Msgpack);
            let f: FrameView<'_> = rmp_serde::from_slice(&bytes).unwrap();
            assert_eq!(f.t, t);
            assert!(f.reference == Some("1:5") || f.code == Some("too_slow"));
        }
    }
}
