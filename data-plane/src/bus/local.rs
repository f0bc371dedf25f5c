//! The in-process room bus of `weir dev`: the same contract as JetStream
//! (ordered offsets per room, retention by count and age, duplicate drop by
//! message id within a window, an epoch) for one process. Offsets are
//! contiguous per room; the epoch is the time the bus was made (Unix ms,
//! like a JetStream stream's creation time), so offsets from an earlier run
//! are told apart and a newer bus has a larger epoch.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::sync::mpsc;
use weir_protocol::RoomId;
use weir_protocol::bus::{
    BusError, BusPublisher, BusSubscription, Delivered, Published, Retention, RoomBus, RoomEvent,
};

/// The in-process bus. Clones share it.
#[derive(Debug, Clone)]
pub struct LocalBus {
    inner: Arc<Mutex<Inner>>,
    epoch: u64,
    retention: Retention,
}

#[derive(Debug, Default)]
struct Inner {
    rooms: HashMap<RoomId, RoomLog>,
}

#[derive(Debug, Default)]
struct RoomLog {
    /// Held events, oldest first, with the Unix milliseconds they were stored.
    events: VecDeque<(u64, Delivered)>,
    /// Offset of the newest event ever stored (0: none).
    last: u64,
    /// Message ids seen within the duplicate window: id → (offset, stored ms).
    seen: HashMap<String, (u64, u64)>,
    subscribers: Vec<mpsc::UnboundedSender<Delivered>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl LocalBus {
    pub fn new(retention: Retention) -> Self {
        Self {
            inner: Arc::default(),
            // Never 0, so a client's "no epoch yet" never matches.
            epoch: new_epoch(),
            retention,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the log inconsistent
        // (every change is one push or pop), so a poisoned lock is used as is.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops what retention no longer keeps.
    fn trim(&self, log: &mut RoomLog, now: u64) {
        let max_age_ms = self.retention.max_age_s.saturating_mul(1000);
        while let Some((at, _)) = log.events.front() {
            let too_many = log.events.len() as u64 > self.retention.max_per_room;
            let too_old = now.saturating_sub(*at) > max_age_ms;
            if !(too_many || too_old) {
                break;
            }
            log.events.pop_front();
        }
        let window_ms = self.retention.duplicate_window_s.saturating_mul(1000);
        if log.seen.len() > 1024 {
            log.seen
                .retain(|_, (_, at)| now.saturating_sub(*at) <= window_ms);
        }
    }
}

/// The time now in Unix ms (below 2^53, so JavaScript clients hold it
/// exactly), and larger than any epoch made before in this process.
fn new_epoch() -> u64 {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = now_ms().max(1);
    let prev = LAST
        .fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |last| Some(now.max(last + 1)),
        )
        .unwrap_or(0);
    now.max(prev + 1)
}

#[async_trait]
impl BusPublisher for LocalBus {
    async fn publish(
        &self,
        room: &RoomId,
        event: &RoomEvent,
        msg_id: Option<&str>,
    ) -> Result<Published, BusError> {
        let now = now_ms();
        let window_ms = self.retention.duplicate_window_s.saturating_mul(1000);
        let mut inner = self.lock();
        let log = inner.rooms.entry(room.clone()).or_default();
        if let Some(id) = msg_id
            && let Some((offset, at)) = log.seen.get(id)
            && now.saturating_sub(*at) <= window_ms
        {
            return Ok(Published {
                offset: *offset,
                epoch: self.epoch,
                duplicate: true,
            });
        }
        log.last += 1;
        let delivered = Delivered {
            offset: log.last,
            msg_id: msg_id.map(str::to_owned),
            event: event.clone(),
        };
        if let Some(id) = msg_id {
            log.seen.insert(id.to_owned(), (log.last, now));
        }
        log.subscribers
            .retain(|tx| tx.send(delivered.clone()).is_ok());
        log.events.push_back((now, delivered));
        let offset = log.last;
        self.trim(log, now);
        Ok(Published {
            offset,
            epoch: self.epoch,
            duplicate: false,
        })
    }
}

#[async_trait]
impl RoomBus for LocalBus {
    async fn epoch(&self) -> Result<u64, BusError> {
        Ok(self.epoch)
    }

    async fn read_after(
        &self,
        room: &RoomId,
        after: u64,
        max: usize,
    ) -> Result<Vec<Delivered>, BusError> {
        let mut inner = self.lock();
        let Some(log) = inner.rooms.get_mut(room) else {
            return if after == 0 {
                Ok(Vec::new())
            } else {
                Err(BusError::Gone { after })
            };
        };
        self.trim(log, now_ms());
        if after > log.last {
            return Err(BusError::Gone { after });
        }
        if after > 0 {
            // Offsets are contiguous here: `after` is held iff it is not
            // older than the oldest held event (or it is the newest).
            let oldest = log.events.front().map_or(log.last + 1, |(_, d)| d.offset);
            if after < oldest && after != log.last {
                return Err(BusError::Gone { after });
            }
        }
        Ok(log
            .events
            .iter()
            .map(|(_, d)| d)
            .filter(|d| d.offset > after)
            .take(max)
            .cloned()
            .collect())
    }

    async fn last_offset(&self, room: &RoomId) -> Result<u64, BusError> {
        Ok(self.lock().rooms.get(room).map_or(0, |l| l.last))
    }

    async fn subscribe(
        &self,
        room: &RoomId,
        after: u64,
    ) -> Result<Box<dyn BusSubscription>, BusError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.lock();
        let log = inner.rooms.entry(room.clone()).or_default();
        let backlog: VecDeque<Delivered> = log
            .events
            .iter()
            .map(|(_, d)| d)
            .filter(|d| d.offset > after)
            .cloned()
            .collect();
        log.subscribers.push(tx);
        Ok(Box::new(LocalSubscription { backlog, rx }))
    }
}

struct LocalSubscription {
    backlog: VecDeque<Delivered>,
    rx: mpsc::UnboundedReceiver<Delivered>,
}

#[async_trait]
impl BusSubscription for LocalSubscription {
    async fn next(&mut self) -> Result<Delivered, BusError> {
        if let Some(d) = self.backlog.pop_front() {
            return Ok(d);
        }
        self.rx.recv().await.ok_or(BusError::Closed)
    }
}
