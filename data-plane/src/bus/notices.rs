//! Go-live notices: the control plane announces on the notices room
//! (`weir_protocol::bus::NOTICES_ROOM`) every room that goes live; each node
//! follows that room once, asks the control plane which of the users
//! connected to it follow the streamer (one call per notice and 500 users,
//! never one per user), and hands them a `notice` frame on whatever room's
//! socket they have open.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use weir_protocol::RoomId;
use weir_protocol::bus::{EventBody, NOTICES_ROOM};
use weir_protocol::events::ServerFrame;

use super::hub::{Hub, ItemKind};

/// Users asked about in one follow check.
pub const CHECK_BATCH: usize = 500;
/// Longest wait for one follow check.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Which users follow whom: the control plane's follows.
#[async_trait]
pub trait FollowChecker: Send + Sync {
    /// Those of `candidates` (at most [`CHECK_BATCH`]) who follow `streamer`.
    async fn followers_among(
        &self,
        streamer: &str,
        candidates: &[String],
    ) -> Result<Vec<String>, String>;

    /// Those of `candidates` (at most [`CHECK_BATCH`]) whom `user` follows.
    async fn followed_among(
        &self,
        user: &str,
        candidates: &[String],
    ) -> Result<Vec<String>, String>;
}

/// [`FollowChecker`] over the control plane's JSON gateway.
pub struct HttpFollowChecker {
    control: super::control::ControlClient,
}

impl HttpFollowChecker {
    /// Checks through the control plane at `control_url` (`http://…`),
    /// proving `secret` (a control plane with a node secret answers only
    /// nodes that send it).
    pub fn new(control_url: &str, secret: Option<weir_protocol::stats::NodeSecret>) -> Self {
        Self {
            control: super::control::ControlClient::new(control_url, secret, CHECK_TIMEOUT),
        }
    }

    async fn call(
        &self,
        path: &str,
        user: &str,
        candidates: &[String],
    ) -> Result<Vec<String>, String> {
        let body = serde_json::json!({ "user": user, "candidates": candidates });
        let v: serde_json::Value = self.control.post_json(path, &body).await?;
        Ok(v["users"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|u| u.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }
}

#[async_trait]
impl FollowChecker for HttpFollowChecker {
    async fn followers_among(
        &self,
        streamer: &str,
        candidates: &[String],
    ) -> Result<Vec<String>, String> {
        self.call("/v1/follows/among", streamer, candidates).await
    }

    async fn followed_among(
        &self,
        user: &str,
        candidates: &[String],
    ) -> Result<Vec<String>, String> {
        self.call("/v1/follows/followed", user, candidates).await
    }
}

/// One socket of a user: its id and where its notices go.
type Socket = (u64, mpsc::UnboundedSender<ServerFrame>);

/// The users connected to this node, each with the sockets to reach them.
#[derive(Default)]
pub struct Users {
    next: AtomicU64,
    by_user: Mutex<HashMap<String, Vec<Socket>>>,
}

/// A socket's place in [`Users`]; dropping it leaves.
pub struct UserSlot {
    users: Arc<Users>,
    user: String,
    id: u64,
    /// The socket's notices.
    pub notices: mpsc::UnboundedReceiver<ServerFrame>,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut map = self.users.by_user.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slots) = map.get_mut(&self.user) {
            slots.retain(|(id, _)| *id != self.id);
            if slots.is_empty() {
                map.remove(&self.user);
            }
        }
    }
}

impl Users {
    /// Registers one socket of `user`.
    pub fn register(self: &Arc<Self>, user: &str) -> UserSlot {
        let (tx, notices) = mpsc::unbounded_channel();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.by_user
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(user.to_owned())
            .or_default()
            .push((id, tx));
        UserSlot {
            users: Arc::clone(self),
            user: user.to_owned(),
            id,
            notices,
        }
    }

    fn names(&self) -> Vec<String> {
        self.by_user
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn send(&self, user: &str, frame: &ServerFrame) -> usize {
        let map = self.by_user.lock().unwrap_or_else(|e| e.into_inner());
        map.get(user).map_or(0, |slots| {
            slots
                .iter()
                .filter(|(_, tx)| tx.send(frame.clone()).is_ok())
                .count()
        })
    }
}

/// Follows the notices room for as long as the node runs (when it knows
/// where to ask who follows whom).
pub async fn run(hub: Arc<Hub>) {
    let (Ok(room), Some(checker)) = (RoomId::parse(NOTICES_ROOM), hub.follow_checker()) else {
        return;
    };
    let membership = hub.join(&room, None);
    let feed = Arc::clone(&membership.feed);
    feed.wait_ready().await;
    // Only notices from now on: a node that starts does not replay old ones.
    let mut cursor = feed.start(None).from_seq;
    let mut head = feed.head();
    loop {
        let newest = *head.borrow_and_update();
        while cursor <= newest {
            let items = match feed.read(cursor, 256) {
                Ok(items) => items,
                // Fell out of the log (a burst of notices): carry on from its start.
                Err(oldest) => {
                    cursor = oldest;
                    continue;
                }
            };
            let Some(last) = items.last() else { break };
            cursor = last.seq + 1;
            for item in items {
                if let ItemKind::Bus { delivered, .. } = &item.kind
                    && let EventBody::GoLive { streamer, .. } = &delivered.event.body
                {
                    let frame = ServerFrame::Notice {
                        at_ms: delivered.event.at_ms,
                        body: delivered.event.body.clone(),
                    };
                    deliver(&hub, checker.as_ref(), streamer, &frame).await;
                }
            }
        }
        if head.changed().await.is_err() {
            return;
        }
    }
}

async fn deliver(hub: &Hub, checker: &dyn FollowChecker, streamer: &str, frame: &ServerFrame) {
    let users = hub.users().names();
    let mut told = 0;
    for batch in users.chunks(CHECK_BATCH) {
        match checker.followers_among(streamer, batch).await {
            Ok(followers) => {
                for f in followers {
                    told += hub.users().send(&f, frame);
                }
            }
            Err(e) => {
                metrics::counter!("weir_go_live_check_errors_total").increment(1);
                tracing::warn!(streamer, error = %e, "cannot ask who follows a streamer; their go-live notice is not delivered here");
            }
        }
    }
    metrics::counter!("weir_go_live_delivered_total").increment(told as u64);
    tracing::info!(streamer, sockets = told, "go-live notice delivered");
}
