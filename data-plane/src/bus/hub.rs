//! The node's side of the room bus: one [`RoomFeed`] per room the node's
//! clients are in. A feed subscribes to the bus **once** and keeps the room's
//! recent events (as many as the bus keeps per room) in one shared, ordered
//! log; every client of the room reads that log through its own cursor, so
//! an event is stored and encoded once however many clients there are, and a
//! slow client only falls behind on its own cursor (it never slows the room).
//!
//! Recovery: a client that comes back with `since=OFFSET&epoch=E` starts its
//! cursor right after `OFFSET` when the log still holds it, which it does for
//! everything the bus still holds (the log is loaded from the bus when the
//! feed starts: one read per room, never one per client), or is told
//! `recovered: false`.
//!
//! While the broker is away the feed keeps its clients talking: their
//! danmaku are shown at once as `local` frames and queued; when the broker
//! returns the feed catches up from its last offset and publishes the queue
//! (with the same message ids, so nothing doubles).
//!
//! Likes are merged on the node and published a few times a second; each
//! node publishes its online count when it changes; moderation (mute, slow
//! mode) travels on the bus so every node applies it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::watch;
use weir_protocol::RoomId;
use weir_protocol::bus::{
    BusError, Delivered, EventBody, EventClass, MAX_ONLINE_USERS, ModerationAction, RoomBus,
    RoomEvent,
};
pub use weir_protocol::chat::ChatLimits;

use weir_protocol::events::{Format, ServerFrame};
use weir_protocol::stats::{LikesBatchRequest, LikesClaim, LikesMark};

use super::likes::{Ledger, LikeTotals, PERSIST_BATCH, Plan, Stored};

/// Settings of the node's room feeds.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Events kept per room (match the bus's per-room retention, so every
    /// event the bus still holds can be recovered from the node).
    pub history: usize,
    /// How often merged likes are published.
    pub likes_every: Duration,
    /// How often the online count is published (when it changed).
    pub online_every: Duration,
    /// How often the node sends its batch of like totals to the control
    /// plane (when it has a node secret).
    pub likes_persist_every: Duration,
    /// How often each room's counters are worked out for its clients.
    pub counters_every: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            history: 1000,
            likes_every: Duration::from_millis(250),
            online_every: Duration::from_secs(2),
            likes_persist_every: Duration::from_secs(5),
            counters_every: Duration::from_secs(1),
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A token bucket.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    tokens: f64,
    at_ms: u64,
}

impl Bucket {
    pub(crate) fn new(burst: f64) -> Self {
        Self {
            tokens: burst,
            at_ms: now_ms(),
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&mut self, rate: f64, burst: f64, now: u64) -> bool {
        let dt = now.saturating_sub(self.at_ms) as f64 / 1000.0;
        self.at_ms = now;
        self.tokens = (self.tokens + dt * rate).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One item of a room's log.
#[derive(Debug)]
pub(crate) struct Item {
    /// Node-local position: contiguous, so cursors are simple.
    pub seq: u64,
    pub kind: ItemKind,
    json: std::sync::OnceLock<Bytes>,
    msgpack: std::sync::OnceLock<Bytes>,
}

#[derive(Debug)]
pub(crate) enum ItemKind {
    /// An event from the bus; `prev` is the offset before it in this room.
    Bus {
        offset: u64,
        prev: u64,
        delivered: Delivered,
    },
    /// A danmaku shown while the broker was away.
    Local { id: String, event: RoomEvent },
    /// The log lost contiguity after `after`.
    Gap { after: u64 },
    /// The broker left or came back.
    Status { degraded: bool },
}

impl Item {
    fn new(seq: u64, kind: ItemKind) -> Arc<Self> {
        Arc::new(Self {
            seq,
            kind,
            json: std::sync::OnceLock::new(),
            msgpack: std::sync::OnceLock::new(),
        })
    }

    pub(crate) fn class(&self) -> EventClass {
        match &self.kind {
            ItemKind::Bus { delivered, .. } => delivered.event.body.class(),
            ItemKind::Local { .. } => EventClass::Chat,
            ItemKind::Gap { .. } | ItemKind::Status { .. } => EventClass::Critical,
        }
    }

    pub(crate) fn offset(&self) -> Option<u64> {
        match &self.kind {
            ItemKind::Bus { offset, .. } => Some(*offset),
            _ => None,
        }
    }

    fn frame(&self) -> ServerFrame {
        match &self.kind {
            ItemKind::Bus {
                offset,
                prev,
                delivered,
            } => ServerFrame::Event {
                offset: *offset,
                prev: *prev,
                at_ms: delivered.event.at_ms,
                id: delivered.msg_id.clone(),
                body: delivered.event.body.clone(),
            },
            ItemKind::Local { id, event } => ServerFrame::Local {
                id: id.clone(),
                at_ms: event.at_ms,
                body: event.body.clone(),
            },
            ItemKind::Gap { after } => ServerFrame::Gap { after: *after },
            ItemKind::Status { degraded } => ServerFrame::Status {
                degraded: *degraded,
            },
        }
    }

    /// The item's frame, encoded once per format.
    pub(crate) fn encoded(&self, format: Format) -> Bytes {
        let cell = match format {
            Format::Json => &self.json,
            Format::Msgpack => &self.msgpack,
        };
        cell.get_or_init(|| self.frame().encode(format).into())
            .clone()
    }
}

/// One step of delivering log items to a client.
#[derive(Debug)]
pub(crate) enum Delivery<'a> {
    /// Send the item's frame.
    Send(&'a Arc<Item>),
    /// Tell the client `count` events of `class` were left out for it, the
    /// last at offset `through` (0: not on the bus yet).
    Skipped {
        class: EventClass,
        count: u64,
        through: u64,
    },
}

/// Decides what of `items` a client `lag` items behind the room's newest
/// gets: everything while it keeps up; past `shed_lag` only critical
/// events (gifts, moderation, notices), the rest summed up in `Skipped`
/// steps, one per run of a class; past `max_lag`, `Err` with the reason it
/// is disconnected.
pub(crate) fn plan_delivery<'a>(
    items: &'a [Arc<Item>],
    lag: u64,
    limits: &ChatLimits,
) -> Result<Vec<Delivery<'a>>, String> {
    if lag > limits.max_lag {
        return Err(format!("{lag} events behind the room; reconnect to resync"));
    }
    let shedding = lag > limits.shed_lag;
    let mut out = Vec::with_capacity(items.len());
    let mut run: Option<(EventClass, u64, u64)> = None;
    for item in items {
        let class = item.class();
        if shedding && class != EventClass::Critical {
            let through = item.offset().unwrap_or(0);
            run = match run {
                Some((c, n, _)) if c == class => Some((c, n + 1, through)),
                Some((c, n, t)) => {
                    out.push(Delivery::Skipped {
                        class: c,
                        count: n,
                        through: t,
                    });
                    Some((class, 1, through))
                }
                None => Some((class, 1, through)),
            };
            continue;
        }
        if let Some((class, count, through)) = run.take() {
            out.push(Delivery::Skipped {
                class,
                count,
                through,
            });
        }
        out.push(Delivery::Send(item));
    }
    if let Some((class, count, through)) = run {
        out.push(Delivery::Skipped {
            class,
            count,
            through,
        });
    }
    Ok(out)
}

/// Why a client's frame was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub reason: String,
}

impl Refusal {
    fn new(code: &'static str, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Default)]
struct FeedState {
    /// The log, oldest first; `seq`s are contiguous.
    items: VecDeque<Arc<Item>>,
    next_seq: u64,
    /// Bus events in the log (the rest are local notices).
    bus_items: usize,
    /// Offset of the newest bus event in the log (0: none).
    last_offset: u64,
    /// Every bus event with an offset above this is in the log.
    complete_after: u64,
    epoch: u64,
    degraded: bool,
    /// Danmaku shown locally while the broker was away, to publish.
    queued: VecDeque<(String, RoomEvent)>,
    /// Likes events held and the stored total (see `likes.rs`).
    likes: Ledger,
    likes_pending: u64,
    like_users: HashSet<String>,
    /// Other nodes' latest online reports: count, when, who.
    online: HashMap<String, (u32, u64, Vec<String>)>,
    /// This node's users in the room, with their socket counts.
    local_users: BTreeMap<String, u32>,
    muted: HashMap<String, u64>,
    slow_mode_s: u32,
    last_danmaku: HashMap<String, u64>,
    /// Gift ids seen, oldest first (bounded): a gift re-published after the
    /// broker's duplicate window is dropped here, so it shows once.
    gifts_seen: HashSet<String>,
    gifts_order: VecDeque<String>,
}

/// A stable offset within `period` for `room` (spreads periodic work of
/// many rooms over the period).
fn phase(room: &RoomId, period: Duration) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    room.hash(&mut h);
    let nanos = period.as_nanos().max(1) as u64;
    Duration::from_nanos(h.finish() % nanos)
}

/// Users a feed tracks for slow mode and mutes before it drops what no
/// longer applies.
const MAX_TRACKED_USERS: usize = 100_000;

/// Gift ids a feed remembers to drop late duplicates.
const GIFT_IDS_KEPT: usize = 100_000;

/// One room as this node carries it.
pub struct RoomFeed {
    pub room: RoomId,
    state: Mutex<FeedState>,
    /// The newest `seq` (wakes clients).
    head: watch::Sender<u64>,
    /// Whether the log was loaded from the bus (clients wait for it).
    ready: watch::Sender<bool>,
    clients: AtomicU64,
    /// The room's counters `(likes, online)`, worked out once per room
    /// every `counters_every` and read by every client of the room.
    counters: watch::Sender<(u64, u64)>,
    node: String,
    config: HubConfig,
}

impl std::fmt::Debug for RoomFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomFeed")
            .field("room", &self.room)
            .finish()
    }
}

impl RoomFeed {
    fn lock(&self) -> MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends to the log and wakes clients. Caller holds the lock.
    fn push(&self, st: &mut FeedState, kind: ItemKind) {
        let is_bus = matches!(kind, ItemKind::Bus { .. });
        let seq = st.next_seq;
        st.next_seq += 1;
        st.items.push_back(Item::new(seq, kind));
        if is_bus {
            st.bus_items += 1;
        }
        while st.bus_items > self.config.history || st.items.len() > self.config.history * 2 {
            let Some(old) = st.items.pop_front() else {
                break;
            };
            if let ItemKind::Bus { offset, .. } = old.kind {
                st.bus_items -= 1;
                st.complete_after = offset;
            }
        }
        self.head.send_replace(seq);
    }

    /// Takes a bus event into the log and the room's state.
    fn apply(&self, st: &mut FeedState, d: Delivered) {
        if d.offset <= st.last_offset {
            return; // Already have it (a re-subscribe overlapped).
        }
        if let EventBody::Gift { gift_id, .. } = &d.event.body {
            if !st.gifts_seen.insert(gift_id.clone()) {
                // Past the broker's duplicate window: already shown once.
                // Left out of the log (the next event's `prev` is the one
                // before it, so clients see no gap).
                metrics::counter!("weir_bus_duplicates_dropped_total").increment(1);
                return;
            }
            st.gifts_order.push_back(gift_id.clone());
            if st.gifts_order.len() > GIFT_IDS_KEPT
                && let Some(old) = st.gifts_order.pop_front()
            {
                st.gifts_seen.remove(&old);
            }
        }
        let likes = match &d.event.body {
            EventBody::Likes { delta, .. } => Some(*delta),
            _ => None,
        };
        st.likes.take(d.offset, likes);
        match &d.event.body {
            EventBody::Online { node, count, users } => {
                st.online
                    .insert(node.clone(), (*count, d.event.at_ms, users.clone()));
            }
            EventBody::Moderation {
                action,
                user,
                seconds,
                ..
            } => match action {
                ModerationAction::Mute if *seconds == 0 => {
                    st.muted.remove(user);
                }
                ModerationAction::Mute => {
                    st.muted
                        .insert(user.clone(), d.event.at_ms + u64::from(*seconds) * 1000);
                }
                ModerationAction::SlowMode => st.slow_mode_s = *seconds,
            },
            _ => {}
        }
        let prev = st.last_offset;
        st.last_offset = d.offset;
        self.push(
            st,
            ItemKind::Bus {
                offset: d.offset,
                prev,
                delivered: d,
            },
        );
    }

    /// The room's counters as last worked out (at most `counters_every`
    /// old); clients wait on it rather than each taking the feed's lock.
    pub fn counters_watch(&self) -> watch::Receiver<(u64, u64)> {
        self.counters.subscribe()
    }

    /// Works the counters out and wakes the room's clients when they changed.
    fn refresh_counters(&self) {
        let now = self.counters();
        self.counters.send_if_modified(|c| {
            let changed = *c != now;
            *c = now;
            changed
        });
    }

    /// The room's counters now.
    pub fn counters(&self) -> (u64, u64) {
        let st = self.lock();
        let fresh_after = now_ms().saturating_sub(3 * self.config.online_every.as_millis() as u64);
        let mut online: u64 = st
            .online
            .iter()
            .filter(|(node, (_, at, _))| *node != &self.node && *at >= fresh_after)
            .map(|(_, (n, _, _))| u64::from(*n))
            .sum();
        online += self.clients.load(Ordering::Relaxed);
        (st.likes.total(st.epoch) + st.likes_pending, online)
    }

    /// Users in the room now: this node's, and those other nodes named in
    /// their fresh online reports.
    pub fn present_users(&self) -> Vec<String> {
        let st = self.lock();
        let fresh_after = now_ms().saturating_sub(3 * self.config.online_every.as_millis() as u64);
        let mut users: std::collections::BTreeSet<String> =
            st.local_users.keys().cloned().collect();
        for (node, (_, at, named)) in &st.online {
            if *node != self.node && *at >= fresh_after {
                users.extend(named.iter().cloned());
            }
        }
        users.into_iter().collect()
    }

    /// What this node would report as online: count and, for small rooms,
    /// who.
    fn online_report(&self) -> (u32, Vec<String>) {
        let st = self.lock();
        let count = st.local_users.values().sum::<u32>();
        let users = if st.local_users.len() <= MAX_ONLINE_USERS {
            st.local_users.keys().cloned().collect()
        } else {
            Vec::new()
        };
        (count, users)
    }

    /// Waits until the log is loaded.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    pub fn head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Where a client starts: `(first seq to send, recovered, missed, epoch,
    /// last offset, degraded)`.
    pub(crate) fn start(&self, since: Option<(u64, u64)>) -> Start {
        let st = self.lock();
        let head = st.next_seq;
        let base = Start {
            from_seq: head,
            recovered: None,
            missed: 0,
            epoch: st.epoch,
            offset: st.last_offset,
            degraded: st.degraded,
        };
        let Some((since, epoch)) = since else {
            return base;
        };
        if epoch != st.epoch || since > st.last_offset {
            return Start {
                recovered: Some(false),
                ..base
            };
        }
        if since == st.last_offset {
            return Start {
                recovered: Some(true),
                ..base
            };
        }
        if since < st.complete_after {
            return Start {
                recovered: Some(false),
                ..base
            };
        }
        // Everything after the client's event is sent (notices among it
        // too: a gap or a degraded spell after it concerns the client).
        // Searched from the newest end: a reconnect is usually recent.
        let idx = st
            .items
            .iter()
            .rposition(|i| i.offset().is_some_and(|o| o <= since))
            .map_or(0, |p| p + 1);
        let from_seq = st.items.get(idx).map_or(head, |i| i.seq);
        let missed = st
            .items
            .iter()
            .skip(idx)
            .filter(|i| i.offset().is_some())
            .count() as u64;
        Start {
            from_seq,
            recovered: Some(true),
            missed,
            ..base
        }
    }

    /// Log items from `from_seq` on, at most `max`; `Err(oldest)` when the
    /// log no longer holds `from_seq`.
    pub(crate) fn read(&self, from_seq: u64, max: usize) -> Result<Vec<Arc<Item>>, u64> {
        let st = self.lock();
        let oldest = st.items.front().map_or(st.next_seq, |i| i.seq);
        if from_seq < oldest {
            return Err(oldest);
        }
        let skip = (from_seq - oldest) as usize;
        Ok(st.items.iter().skip(skip).take(max).cloned().collect())
    }

    pub fn clients(&self) -> u64 {
        self.clients.load(Ordering::Relaxed)
    }
}

/// Works out every room's counters every `every`, once per room however
/// many clients it has, for as long as the hub lives.
async fn run_counters(hub: std::sync::Weak<Hub>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(hub) = hub.upgrade() else { return };
        for feed in hub.rooms() {
            feed.refresh_counters();
        }
    }
}

fn log_rebase(room: &RoomId, claim: &LikesClaim, reason: &str) {
    tracing::warn!(
        %room,
        reason,
        from_epoch = claim.expect.map_or(0, |m| m.epoch),
        from_offset = claim.expect.map_or(0, |m| m.through),
        to_epoch = claim.to.epoch,
        to_offset = claim.to.through,
        "room's like total rebased, keeping its likes: likes events between the two offsets were held by no node and are not in it"
    );
}

/// One room's part of a batch of like totals.
struct Entry {
    feed: Arc<RoomFeed>,
    /// Its claim's index in the batch, and whether the claim is a rebase.
    claim: Option<(usize, Option<&'static str>)>,
}

/// Where a new client starts reading.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Start {
    pub from_seq: u64,
    pub recovered: Option<bool>,
    pub missed: u64,
    pub epoch: u64,
    pub offset: u64,
    pub degraded: bool,
}

/// The node's room feeds.
pub struct Hub {
    bus: Arc<dyn RoomBus>,
    node: String,
    config: HubConfig,
    limits: RwLock<Arc<ChatLimits>>,
    feeds: Mutex<HashMap<RoomId, Arc<RoomFeed>>>,
    users: Mutex<HashMap<String, Bucket>>,
    next_id: AtomicU64,
    /// Who is connected to this node (for notices meant for a user).
    connected: Arc<super::notices::Users>,
    /// Who follows whom (the control plane), for go-live notices and
    /// friends in a room.
    follows: RwLock<Option<Arc<dyn super::notices::FollowChecker>>>,
    /// Rooms closed since the last batch of like totals: their last claims
    /// go in the next one.
    closing: Mutex<Vec<Arc<RoomFeed>>>,
    /// Whether the task that works out every room's counters runs.
    counters_task: std::sync::Once,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("node", &self.node).finish()
    }
}

/// Holds a client's place in a room; dropping it leaves.
pub struct Membership {
    pub feed: Arc<RoomFeed>,
    hub: Arc<Hub>,
    user: Option<String>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        if let Some(user) = &self.user {
            let mut st = self.feed.lock();
            if let Some(n) = st.local_users.get_mut(user) {
                *n -= 1;
                if *n == 0 {
                    st.local_users.remove(user);
                }
            }
        }
        let left = self.feed.clients.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!("weir_room_clients").decrement(1.0);
        if left == 0 {
            self.hub.maybe_close(&self.feed);
        }
    }
}

impl Hub {
    pub fn new(bus: Arc<dyn RoomBus>, node: String, config: HubConfig) -> Arc<Self> {
        Arc::new(Self {
            bus,
            node,
            config,
            limits: RwLock::new(Arc::new(ChatLimits::default())),
            feeds: Mutex::default(),
            users: Mutex::default(),
            next_id: AtomicU64::new(0),
            connected: Arc::default(),
            follows: RwLock::new(None),
            closing: Mutex::default(),
            counters_task: std::sync::Once::new(),
        })
    }

    pub fn bus(&self) -> &Arc<dyn RoomBus> {
        &self.bus
    }

    /// Where to ask who follows whom.
    pub fn set_follow_checker(&self, checker: Arc<dyn super::notices::FollowChecker>) {
        *self.follows.write().unwrap_or_else(|e| e.into_inner()) = Some(checker);
    }

    /// Who follows whom, if the node knows where to ask.
    pub fn follow_checker(&self) -> Option<Arc<dyn super::notices::FollowChecker>> {
        self.follows
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The users connected to this node.
    pub fn users(&self) -> &Arc<super::notices::Users> {
        &self.connected
    }

    pub fn limits(&self) -> Arc<ChatLimits> {
        Arc::clone(&self.limits.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Applies new limits to every room at once.
    pub fn set_limits(&self, limits: ChatLimits) {
        *self.limits.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(limits);
    }

    /// Rooms with clients on this node.
    pub fn rooms(&self) -> Vec<Arc<RoomFeed>> {
        self.feeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Joins `room` as `user` (`None`: the node itself, as for the notices
    /// room), starting its feed if this is its first client here.
    pub fn join(self: &Arc<Self>, room: &RoomId, user: Option<&str>) -> Membership {
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        let feed = feeds
            .entry(room.clone())
            .or_insert_with(|| {
                let feed = Arc::new(RoomFeed {
                    room: room.clone(),
                    state: Mutex::default(),
                    head: watch::channel(0).0,
                    ready: watch::channel(false).0,
                    clients: AtomicU64::new(0),
                    counters: watch::channel((0, 0)).0,
                    node: self.node.clone(),
                    config: self.config.clone(),
                });
                metrics::gauge!("weir_bus_rooms").increment(1.0);
                tokio::spawn(Arc::clone(self).run_feed(Arc::clone(&feed)));
                feed
            })
            .clone();
        feed.clients.fetch_add(1, Ordering::Relaxed);
        if let Some(user) = user {
            *feed.lock().local_users.entry(user.to_owned()).or_default() += 1;
        }
        // The newcomer counts at once; later changes every counters_every.
        feed.refresh_counters();
        self.counters_task.call_once(|| {
            tokio::spawn(run_counters(
                Arc::downgrade(self),
                self.config.counters_every,
            ));
        });
        metrics::gauge!("weir_room_clients").increment(1.0);
        Membership {
            feed,
            hub: Arc::clone(self),
            user: user.map(str::to_owned),
        }
    }

    /// Persists like totals through `store` every `likes_persist_every`
    /// (see `likes.rs`) until `stop`, then sends a last batch.
    pub async fn persist_likes(
        self: Arc<Self>,
        store: Arc<dyn LikeTotals>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(self.config.likes_persist_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = async { drop(stop.wait_for(|s| *s).await) } => {
                    self.likes_round(store.as_ref()).await;
                    return;
                }
            }
            self.likes_round(store.as_ref()).await;
        }
    }

    /// One round: a batch (or a few, past [`PERSIST_BATCH`] rooms) naming
    /// every room carried here and the ones closed since the last round.
    async fn likes_round(&self, store: &dyn LikeTotals) {
        let closing = std::mem::take(&mut *self.closing.lock().unwrap_or_else(|e| e.into_inner()));
        let mut feeds: Vec<Arc<RoomFeed>> = self.rooms();
        feeds.extend(closing);
        feeds.retain(|f| !f.room.as_str().starts_with('_'));
        feeds.sort_by(|a, b| a.room.cmp(&b.room));
        // A room closed and reopened since the last round: its open feed
        // speaks for it.
        feeds.dedup_by(|later, first| later.room == first.room);
        for chunk in feeds.chunks(PERSIST_BATCH) {
            self.likes_batch(store, chunk).await;
        }
    }

    async fn likes_batch(&self, store: &dyn LikeTotals, feeds: &[Arc<RoomFeed>]) {
        let mut request = LikesBatchRequest {
            node: self.node.clone(),
            ..LikesBatchRequest::default()
        };
        let mut entries = Vec::with_capacity(feeds.len());
        for feed in feeds {
            let plan = {
                let st = feed.lock();
                st.likes.plan(feed.room.as_str(), st.epoch, st.last_offset)
            };
            let claim = match plan {
                Plan::Read => None,
                Plan::Claim { claim, rebase } => Some((claim, rebase)),
                Plan::RebaseIfGone { after, claim } => {
                    let stuck = claim
                        .expect
                        .is_some_and(|m| feed.lock().likes.stuck_since_last_round(m));
                    // Only when nobody moved the row for a whole round and
                    // the bus no longer holds its offset: then no node can
                    // count what came between.
                    let gone = stuck
                        && matches!(
                            self.bus.read_after(&feed.room, after, 1).await,
                            Err(BusError::Gone { .. })
                        );
                    gone.then_some((claim, Some("retention")))
                }
            };
            let claim = claim.map(|(c, rebase)| {
                request.claims.push(c);
                (request.claims.len() - 1, rebase)
            });
            if claim.is_none() {
                request.read.push(feed.room.to_string());
            }
            entries.push(Entry {
                feed: Arc::clone(feed),
                claim,
            });
        }
        let answer = match store.batch(&request).await {
            Ok(a) => a,
            Err(e) => {
                metrics::counter!("weir_room_likes_persist_errors_total").increment(1);
                tracing::warn!(error = %e, rooms = feeds.len(), "like totals not persisted this round; kept for the next");
                return;
            }
        };
        let rows: HashMap<&str, Stored> = answer
            .rows
            .iter()
            .map(|r| {
                (
                    r.room.as_str(),
                    Stored {
                        likes: r.likes,
                        mark: LikesMark {
                            epoch: r.epoch,
                            through: r.through,
                        },
                    },
                )
            })
            .collect();
        for e in entries {
            if let Some((i, rebase)) = e.claim
                && answer.applied.get(i) == Some(&true)
                && let Some(c) = request.claims.get(i)
            {
                metrics::counter!("weir_room_likes_persisted_total").increment(c.add);
                if let Some(reason) = rebase {
                    metrics::counter!("weir_room_likes_rebased_total", "reason" => reason)
                        .increment(1);
                    log_rebase(&e.feed.room, c, reason);
                }
            }
            let row = rows.get(e.feed.room.as_str()).copied();
            // The feed may have moved to another epoch meanwhile: the row
            // is taken for the epoch it has now.
            let mut st = e.feed.lock();
            let epoch = st.epoch;
            st.likes.stored(row, epoch);
        }
    }

    fn maybe_close(&self, feed: &Arc<RoomFeed>) {
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        if feed.clients.load(Ordering::Relaxed) == 0
            && feeds.get(&feed.room).is_some_and(|f| Arc::ptr_eq(f, feed))
        {
            feeds.remove(&feed.room);
            metrics::gauge!("weir_bus_rooms").decrement(1.0);
            self.closing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Arc::clone(feed));
        }
    }

    fn is_open(&self, feed: &Arc<RoomFeed>) -> bool {
        self.feeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&feed.room)
            .is_some_and(|f| Arc::ptr_eq(f, feed))
    }

    fn set_degraded(&self, feed: &RoomFeed, degraded: bool) {
        let mut st = feed.lock();
        if st.degraded != degraded {
            st.degraded = degraded;
            if degraded {
                metrics::gauge!("weir_bus_degraded_rooms").increment(1.0);
            } else {
                metrics::gauge!("weir_bus_degraded_rooms").decrement(1.0);
            }
            feed.push(&mut st, ItemKind::Status { degraded });
        }
    }

    /// Loads the room's held events, then follows the bus; on loss, marks
    /// the room degraded and catches up from its last offset when the broker
    /// returns. Ends when the room has no clients here.
    async fn run_feed(self: Arc<Self>, feed: Arc<RoomFeed>) {
        let mut backoff = Duration::from_millis(100);
        let mut likes_tick = tokio::time::interval(self.config.likes_every);
        // Rooms report at their own phase of the period, not all at once.
        let mut online_tick = tokio::time::interval_at(
            tokio::time::Instant::now() + phase(&feed.room, self.config.online_every),
            self.config.online_every,
        );
        let mut last_online: Option<(u32, Vec<String>)> = None;
        // Other nodes count a report for 3 periods: an unchanged one is
        // sent again every 2, so a quiet room's viewers here stay counted.
        let mut online_sent_ticks = 0u32;
        'outer: while self.is_open(&feed) {
            // (Re)load: epoch, then the held events after what we have.
            let loaded = async {
                let epoch = self.bus.epoch().await?;
                let after = {
                    let st = feed.lock();
                    if st.epoch == epoch { st.last_offset } else { 0 }
                };
                let events = match self.bus.read_after(&feed.room, after, usize::MAX).await {
                    Err(BusError::Gone { .. }) => {
                        // The broker dropped events while we were away.
                        // Clients are told; the events still held after
                        // the ones we have are taken in below.
                        {
                            let mut st = feed.lock();
                            feed.push(&mut st, ItemKind::Gap { after });
                            st.likes.reset();
                        }
                        let held = self.bus.read_after(&feed.room, 0, usize::MAX).await?;
                        // Recovery from before the oldest held event would
                        // skip what the broker dropped: such clients resync.
                        let mut st = feed.lock();
                        let before_held = held.first().map_or(0, |d| d.offset - 1);
                        st.complete_after = st.last_offset.max(before_held);
                        drop(st);
                        held
                    }
                    other => other?,
                };
                let sub = self
                    .bus
                    .subscribe(&feed.room, events.last().map_or(after, |d| d.offset))
                    .await?;
                Ok::<_, BusError>((epoch, events, sub))
            }
            .await;
            let (epoch, events, mut sub) = match loaded {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(room = %feed.room, error = %e, "room bus unavailable; room degraded");
                    self.set_degraded(&feed, true);
                    feed.ready.send_replace(true);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            {
                let mut st = feed.lock();
                if st.epoch != epoch {
                    if st.epoch != 0 {
                        let after = st.last_offset;
                        feed.push(&mut st, ItemKind::Gap { after });
                    }
                    st.epoch = epoch;
                    st.last_offset = 0;
                    st.complete_after = 0;
                    st.likes.reset();
                }
                if st.last_offset == 0
                    && let Some(first) = events.first()
                {
                    // Whatever came before the oldest held event is gone.
                    st.complete_after = first.offset - 1;
                }
                for d in events {
                    feed.apply(&mut st, d);
                }
            }
            self.set_degraded(&feed, false);
            feed.ready.send_replace(true);
            backoff = Duration::from_millis(100);
            self.flush_queue(&feed).await;
            loop {
                tokio::select! {
                    next = sub.next() => match next {
                        Ok(d) => {
                            let mut st = feed.lock();
                            feed.apply(&mut st, d);
                        }
                        Err(e) => {
                            tracing::warn!(room = %feed.room, error = %e, "room bus subscription lost; room degraded");
                            self.set_degraded(&feed, true);
                            continue 'outer;
                        }
                    },
                    _ = likes_tick.tick() => {
                        let open = self.is_open(&feed);
                        // The last likes of a closing room go out too.
                        self.flush_likes(&feed).await;
                        if !open {
                            break 'outer;
                        }
                    }
                    _ = online_tick.tick() => {
                        let report = feed.online_report();
                        online_sent_ticks += 1;
                        let due = Some(&report) != last_online.as_ref() || online_sent_ticks >= 2;
                        // Reserved rooms (the notices) have no audience.
                        if due && !feed.room.as_str().starts_with('_') {
                            let event = RoomEvent {
                                at_ms: now_ms(),
                                body: EventBody::Online {
                                    node: self.node.clone(),
                                    count: report.0,
                                    users: report.1.clone(),
                                },
                            };
                            if self.bus.publish(&feed.room, &event, None).await.is_ok() {
                                last_online = Some(report);
                                online_sent_ticks = 0;
                            }
                        }
                    }
                }
            }
        }
        tracing::debug!(room = %feed.room, "room feed stopped");
    }

    async fn flush_likes(&self, feed: &RoomFeed) {
        let (delta, users) = {
            let mut st = feed.lock();
            if st.likes_pending == 0 {
                return;
            }
            let users = st.like_users.len() as u32;
            st.like_users.clear();
            (std::mem::take(&mut st.likes_pending), users)
        };
        let event = RoomEvent {
            at_ms: now_ms(),
            body: EventBody::Likes {
                node: self.node.clone(),
                delta,
                users,
            },
        };
        if self.bus.publish(&feed.room, &event, None).await.is_err() {
            // Kept for the next try: likes are counters, late is fine.
            let mut st = feed.lock();
            st.likes_pending += delta;
        }
    }

    async fn flush_queue(&self, feed: &RoomFeed) {
        loop {
            let Some((id, event)) = feed.lock().queued.front().cloned() else {
                return;
            };
            match self.bus.publish(&feed.room, &event, Some(&id)).await {
                Ok(_) => {
                    feed.lock().queued.pop_front();
                }
                Err(e) => {
                    tracing::debug!(room = %feed.room, error = %e, "queued danmaku wait for the bus");
                    return;
                }
            }
        }
    }

    fn new_msg_id(&self) -> String {
        format!(
            "{}-{}-{}",
            self.node,
            uuid::Uuid::new_v4().simple(),
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Checks a danmaku against the room's rules: size, content, the
    /// moderation hook (blocked words), mute and slow mode. Rate limits are
    /// taken after this passes, so a refused danmaku costs no allowance.
    pub fn check_danmaku(&self, feed: &RoomFeed, user: &str, text: &str) -> Result<(), Refusal> {
        let limits = self.limits();
        let text_trimmed = text.trim();
        if text_trimmed.is_empty() {
            return Err(Refusal::new("empty", "a danmaku needs some text"));
        }
        if text.len() > limits.max_text_bytes {
            return Err(Refusal::new(
                "too_long",
                format!(
                    "a danmaku may be at most {} bytes; this one is {}",
                    limits.max_text_bytes,
                    text.len()
                ),
            ));
        }
        if text.chars().any(|c| c.is_control() && c != '\n') {
            return Err(Refusal::new(
                "bad_text",
                "a danmaku may not contain control characters",
            ));
        }
        let lower = text.to_lowercase();
        if let Some(word) = limits
            .blocked_words
            .iter()
            .find(|w| !w.is_empty() && lower.contains(w.as_str()))
        {
            return Err(Refusal::new(
                "moderated",
                format!("refused by the room's moderation: contains {word:?}"),
            ));
        }
        let now = now_ms();
        {
            let st = feed.lock();
            if let Some(until) = st.muted.get(user)
                && *until > now
            {
                return Err(Refusal::new(
                    "muted",
                    format!(
                        "you are muted in this room for {} more seconds",
                        (until - now).div_ceil(1000)
                    ),
                ));
            }
            if st.slow_mode_s > 0
                && let Some(last) = st.last_danmaku.get(user)
            {
                let wait = u64::from(st.slow_mode_s) * 1000;
                if now.saturating_sub(*last) < wait {
                    return Err(Refusal::new(
                        "slow_mode",
                        format!(
                            "slow mode: one danmaku per {} s; wait {} s",
                            st.slow_mode_s,
                            (wait - now.saturating_sub(*last)).div_ceil(1000)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Takes one danmaku from `user`'s allowance on this node (all their
    /// connections together).
    pub fn take_user_token(&self, user: &str) -> Result<(), Refusal> {
        let limits = self.limits();
        let now = now_ms();
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if users.len() > 100_000 {
            users.retain(|_, b| now.saturating_sub(b.at_ms) < 60_000);
        }
        let bucket = users
            .entry(user.to_owned())
            .or_insert_with(|| Bucket::new(limits.user_burst));
        if !bucket.take(limits.user_rate, limits.user_burst, now) {
            return Err(Refusal::new(
                "rate_limited",
                format!(
                    "too many danmaku from you: at most {} per second",
                    limits.user_rate
                ),
            ));
        }
        Ok(())
    }

    /// Publishes a checked danmaku; returns its offset, or 0 when the broker
    /// is away and it was shown locally (it is published when it returns).
    pub async fn send_danmaku(&self, feed: &RoomFeed, user: &str, text: &str) -> u64 {
        let id = self.new_msg_id();
        let event = RoomEvent {
            at_ms: now_ms(),
            body: EventBody::Danmaku {
                user: user.to_owned(),
                text: text.to_owned(),
            },
        };
        let degraded = {
            let mut st = feed.lock();
            // Bounded: what slow mode and mutes no longer need goes.
            if st.last_danmaku.len() >= MAX_TRACKED_USERS {
                let keep_after = event.at_ms.saturating_sub(u64::from(st.slow_mode_s) * 1000);
                st.last_danmaku.retain(|_, at| *at > keep_after);
            }
            if st.muted.len() >= MAX_TRACKED_USERS {
                st.muted.retain(|_, until| *until > event.at_ms);
            }
            st.last_danmaku.insert(user.to_owned(), event.at_ms);
            st.degraded
        };
        if !degraded {
            match self.bus.publish(&feed.room, &event, Some(&id)).await {
                Ok(p) => {
                    metrics::counter!("weir_danmaku_published_total").increment(1);
                    return p.offset;
                }
                Err(e) => {
                    tracing::warn!(room = %feed.room, error = %e, "danmaku not published; shown locally");
                }
            }
        }
        metrics::counter!("weir_danmaku_local_total").increment(1);
        let mut st = feed.lock();
        st.queued.push_back((id.clone(), event.clone()));
        while st.queued.len() > self.config.history {
            st.queued.pop_front();
            metrics::counter!("weir_danmaku_dropped_total", "reason" => "queue_full").increment(1);
        }
        feed.push(&mut st, ItemKind::Local { id, event });
        0
    }

    /// Counts likes, published merged a few times a second.
    pub fn like(&self, feed: &RoomFeed, user: &str, count: u32) {
        let mut st = feed.lock();
        st.likes_pending += u64::from(count);
        if st.like_users.len() < 100_000 {
            st.like_users.insert(user.to_owned());
        }
    }

    /// Publishes a moderation event (the caller checked the right to).
    pub async fn moderate(
        &self,
        feed: &RoomFeed,
        by: &str,
        action: ModerationAction,
        user: &str,
        seconds: u32,
    ) -> Result<u64, BusError> {
        let event = RoomEvent {
            at_ms: now_ms(),
            body: EventBody::Moderation {
                action,
                user: user.to_owned(),
                seconds,
                by: by.to_owned(),
            },
        };
        let published = self
            .bus
            .publish(&feed.room, &event, Some(&self.new_msg_id()))
            .await?;
        Ok(published.offset)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn bus_item(seq: u64, body: EventBody) -> Arc<Item> {
        Item::new(
            seq,
            ItemKind::Bus {
                offset: seq * 10,
                prev: seq.saturating_sub(1) * 10,
                delivered: Delivered {
                    offset: seq * 10,
                    msg_id: None,
                    event: RoomEvent { at_ms: 0, body },
                },
            },
        )
    }

    fn chat(seq: u64) -> Arc<Item> {
        bus_item(
            seq,
            EventBody::Danmaku {
                user: "u".into(),
                text: "t".into(),
            },
        )
    }

    fn gift(seq: u64) -> Arc<Item> {
        bus_item(
            seq,
            EventBody::Gift {
                gift_id: format!("g{seq}"),
                from_user: "a".into(),
                to_user: "b".into(),
                gift: "rose".into(),
                count: 1,
                amount: 1,
            },
        )
    }

    fn likes(seq: u64) -> Arc<Item> {
        bus_item(
            seq,
            EventBody::Likes {
                node: "n".into(),
                delta: 1,
                users: 1,
            },
        )
    }

    fn describe(plan: &[Delivery<'_>]) -> Vec<String> {
        plan.iter()
            .map(|d| match d {
                Delivery::Send(i) => format!("send {}", i.offset().unwrap()),
                Delivery::Skipped {
                    class,
                    count,
                    through,
                } => format!("skip {class:?} {count} {through}"),
            })
            .collect()
    }

    #[test]
    fn a_client_that_keeps_up_gets_everything() {
        let items = vec![chat(1), likes(2), gift(3)];
        let plan = plan_delivery(&items, 3, &ChatLimits::default()).unwrap();
        assert_eq!(describe(&plan), ["send 10", "send 20", "send 30"]);
    }

    #[test]
    fn a_lagging_client_gets_every_gift_and_is_told_what_it_missed() {
        let items = vec![
            chat(1),
            chat(2),
            gift(3),
            likes(4),
            chat(5),
            gift(6),
            chat(7),
        ];
        let limits = ChatLimits {
            shed_lag: 10,
            ..ChatLimits::default()
        };
        let plan = plan_delivery(&items, 11, &limits).unwrap();
        assert_eq!(
            describe(&plan),
            [
                "skip Chat 2 20",
                "send 30",
                "skip Counter 1 40",
                "skip Chat 1 50",
                "send 60",
                "skip Chat 1 70",
            ]
        );
    }

    #[test]
    fn a_client_too_far_behind_is_let_go() {
        let limits = ChatLimits {
            max_lag: 100,
            ..ChatLimits::default()
        };
        let err = plan_delivery(&[chat(1)], 101, &limits).unwrap_err();
        assert!(err.contains("101 events behind"), "{err}");
    }

    fn feed(history: usize) -> RoomFeed {
        RoomFeed {
            room: RoomId::parse("r").unwrap(),
            state: Mutex::new(FeedState {
                epoch: 7,
                ..FeedState::default()
            }),
            head: watch::channel(0).0,
            ready: watch::channel(true).0,
            clients: AtomicU64::new(0),
            counters: watch::channel((0, 0)).0,
            node: "n".into(),
            config: HubConfig {
                history,
                ..HubConfig::default()
            },
        }
    }

    fn delivered(offset: u64, body: EventBody) -> Delivered {
        Delivered {
            offset,
            msg_id: None,
            event: RoomEvent { at_ms: 0, body },
        }
    }

    fn gift_body(id: &str) -> EventBody {
        EventBody::Gift {
            gift_id: id.into(),
            from_user: "a".into(),
            to_user: "b".into(),
            gift: "rose".into(),
            count: 1,
            amount: 5,
        }
    }

    fn chat_body() -> EventBody {
        EventBody::Danmaku {
            user: "u".into(),
            text: "t".into(),
        }
    }

    fn prevs(feed: &RoomFeed) -> Vec<(u64, u64)> {
        feed.lock()
            .items
            .iter()
            .filter_map(|i| match &i.kind {
                ItemKind::Bus { offset, prev, .. } => Some((*offset, *prev)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_gift_seen_again_past_the_broker_window_shows_once_without_a_gap() {
        let feed = feed(100);
        let mut st = feed.lock();
        feed.apply(&mut st, delivered(3, gift_body("g1")));
        feed.apply(&mut st, delivered(5, chat_body()));
        feed.apply(&mut st, delivered(8, gift_body("g1")));
        feed.apply(&mut st, delivered(9, chat_body()));
        // A re-subscription that overlaps is ignored too.
        feed.apply(&mut st, delivered(5, chat_body()));
        drop(st);
        assert_eq!(prevs(&feed), [(3, 0), (5, 3), (9, 5)]);
    }

    #[test]
    fn recovery_starts_right_after_the_clients_offset_or_says_it_cannot() {
        let feed = feed(3);
        {
            let mut st = feed.lock();
            for offset in [2, 4, 6, 8, 10] {
                feed.apply(&mut st, delivered(offset, chat_body()));
            }
        }
        // The log keeps 3: offsets 6, 8, 10; everything after 4 is held.
        assert_eq!(prevs(&feed), [(6, 4), (8, 6), (10, 8)]);
        let start = feed.start(Some((6, 7)));
        assert_eq!((start.recovered, start.missed), (Some(true), 2));
        let from = feed.read(start.from_seq, 10).unwrap();
        assert_eq!(from[0].offset(), Some(8));
        let start = feed.start(Some((4, 7)));
        assert_eq!((start.recovered, start.missed), (Some(true), 3));
        assert_eq!(feed.start(Some((2, 7))).recovered, Some(false), "trimmed");
        assert_eq!(
            feed.start(Some((6, 8))).recovered,
            Some(false),
            "other epoch"
        );
        assert_eq!(
            feed.start(Some((11, 7))).recovered,
            Some(false),
            "never given"
        );
        let up_to_date = feed.start(Some((10, 7)));
        assert_eq!((up_to_date.recovered, up_to_date.missed), (Some(true), 0));
        assert_eq!(feed.start(None).recovered, None);
    }

    #[test]
    fn token_buckets_refill_at_their_rate() {
        let mut b = Bucket {
            tokens: 2.0,
            at_ms: 0,
        };
        assert!(b.take(1.0, 2.0, 0));
        assert!(b.take(1.0, 2.0, 0));
        assert!(!b.take(1.0, 2.0, 0), "burst spent");
        assert!(!b.take(1.0, 2.0, 500), "half a token after 0.5 s");
        assert!(b.take(1.0, 2.0, 1000), "a whole one after 1 s");
        assert!(b.take(1.0, 2.0, 10_000) && b.take(1.0, 2.0, 10_000));
        assert!(!b.take(1.0, 2.0, 10_000), "refill is capped at the burst");
    }

    /// Two nodes of one room on one bus: each counts the other's viewers,
    /// and still does long after the counts stopped changing (reports are
    /// counted for three periods, so unchanged ones are sent again).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_keep_counting_each_others_viewers_while_nothing_changes() {
        let bus: Arc<dyn RoomBus> = Arc::new(super::super::LocalBus::new(
            weir_protocol::bus::Retention::default(),
        ));
        let config = HubConfig {
            online_every: Duration::from_millis(100),
            ..HubConfig::default()
        };
        let a = Hub::new(Arc::clone(&bus), "a".into(), config.clone());
        let b = Hub::new(Arc::clone(&bus), "b".into(), config);
        let room = RoomId::parse("quiet").unwrap();
        let on_a = a.join(&room, Some("u1"));
        let on_b = b.join(&room, Some("u2"));
        let _on_b2 = b.join(&room, Some("u3"));
        // Ten report periods, over three times the freshness window.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(on_a.feed.counters().1, 3, "a counts its 1 and b's 2");
        assert_eq!(on_b.feed.counters().1, 3, "b counts its 2 and a's 1");
    }
}
