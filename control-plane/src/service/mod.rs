//! The control plane's API, one implementation behind two transports: the
//! gRPC services ([`grpc`]) and the JSON gateway for web pages ([`http`]) both
//! call the methods of [`ControlState`], which validate input into domain
//! types, read the cluster from the coordinator, ask the [`crate::scheduler`]
//! and sign tokens. Request ids, tracing spans and metrics are handled here,
//! once for both transports.

mod business;
mod cdns;
mod config;
pub mod error;
pub mod grpc;
pub mod http;
mod nodes;
mod rollout;
mod room_stats;
mod wallet;

use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::Notify;
use tracing::Instrument;
use weir_protocol::bus::BusPublisher;
use weir_protocol::coordinator::{ClusterState, CoordError, Coordinator, NodeInfo};
use weir_protocol::{Mode, NodeId, RoomId};

use crate::cdn::{self, CdnHealthCell};
use crate::config_center::{LiveConfig, LiveConfigCell};
use crate::rollout::{random_draw, stable_draw};
use crate::scheduler::{self, RoomSummary, Snapshot};
use crate::store::{RoomStatus, Store};
use crate::tokens::{MAX_SUBJECT_LEN, MAX_TOKEN_TTL, TokenIssueError, TokenIssuer};

pub use business::{CreateRoom, ListQuery};
pub use cdns::CdnView;
pub use config::{ConfigEntryView, ConfigUpdate};
pub use error::{ApiError, ErrorKind};
pub use nodes::NodeView;
pub use rollout::{RolloutView, VersionView};
pub use wallet::{BEARER_HEADER, SendGiftRequest, bearer_token};

/// Longest wait for the coordinator before a call counts as failed (and a
/// degraded answer from the last view is considered).
pub const COORDINATOR_TIMEOUT: Duration = Duration::from_secs(2);

/// Header and gRPC metadata key of the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Settings of the control plane's API.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Owner of the rooms the store does not know (and of every room when
    /// there is no store), and so the subject of their publish tokens (`dev`
    /// in `weir dev`). A room in the store is owned by its stored owner.
    pub default_owner: String,
    /// Whether `MintToken` / `POST /v1/tokens` hands out arbitrary tokens.
    /// `weir dev` enables it; a cluster leaves it off.
    pub allow_token_minting: bool,
    /// Whether `Wallet.Grant` credits users from the mint. `weir dev`
    /// enables it; a cluster leaves it off unless `--allow-grants`.
    pub allow_grants: bool,
    /// How old the last good view of the cluster may be to answer from when
    /// the coordinator does not respond (answers are then marked degraded).
    pub stale_view_max_age: Duration,
    /// The secret nodes send (`authorization: Bearer …`) with their batches
    /// of like totals (`POST /v1/room-stats/likes`); `None`: the call is
    /// refused (nothing is persisted). `weir dev` makes one up for its node.
    pub node_secret: Option<weir_protocol::stats::NodeSecret>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            default_owner: "dev".to_owned(),
            allow_token_minting: false,
            allow_grants: false,
            stale_view_max_age: Duration::from_secs(30),
            node_secret: None,
        }
    }
}

/// Why a [`ControlConfig`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error(
        "default_owner must be 1 to {MAX_SUBJECT_LEN} characters without control characters, got {0:?}"
    )]
    BadDefaultOwner(String),
}

impl ControlConfig {
    /// Checks the settings; call before binding any port.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if validate_subject(&self.default_owner).is_err() || self.default_owner.is_empty() {
            return Err(ConfigError::BadDefaultOwner(self.default_owner.clone()));
        }
        Ok(())
    }
}

/// Everything the API needs: the coordinator, the token issuer, the
/// business store, the settings (fixed at start and live from the config
/// center), the last good view of the cluster, and the room bus the outbox
/// relay publishes to.
pub struct ControlState {
    coordinator: Arc<dyn Coordinator>,
    tokens: TokenIssuer,
    config: ControlConfig,
    store: Option<Store>,
    live: Arc<LiveConfigCell>,
    cdn_health: Arc<CdnHealthCell>,
    last_view: Mutex<Option<Arc<ClusterView>>>,
    bus: Option<Arc<dyn BusPublisher>>,
    outbox_wake: Arc<Notify>,
}

impl std::fmt::Debug for ControlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlState")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The cluster as read from the coordinator at one moment.
#[derive(Debug)]
struct ClusterView {
    cluster: Arc<ClusterState>,
    taken_at_ms: u64,
    taken_at: Instant,
}

/// What kind of endpoint a client is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum EndpointKind {
    /// WebRTC publishing (WHIP).
    Whip,
    /// WebRTC playing (WHEP).
    Whep,
    /// HLS playing.
    Hls,
}

/// One place a client can publish to or play from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub kind: EndpointKind,
    pub url: String,
    /// The node, for endpoints on a node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<NodeId>,
    /// The CDN's name, for endpoints on a CDN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cdn: Option<String>,
}

/// The answer to an assign call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Assignment {
    pub room: RoomId,
    /// Best first.
    pub endpoints: Vec<Endpoint>,
    /// Bearer token for the endpoints.
    pub token: String,
    pub token_expires_unix: u64,
    /// True when answered from a stale view of the cluster.
    pub degraded: bool,
}

/// A mint request as it arrives, not yet validated.
#[derive(Debug, Clone, Default)]
pub struct MintRequest {
    pub room: String,
    pub mode: String,
    /// Empty: the room's owner for publish tokens, an anonymous id otherwise.
    pub subject: String,
    /// 0: the default lifetime.
    pub ttl_seconds: u64,
}

/// A minted token with what it was minted for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IssuedToken {
    pub room: RoomId,
    pub mode: Mode,
    pub subject: String,
    pub token: String,
    pub expires_unix: u64,
}

/// The id that follows one request through logs, both transports and replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    /// Takes the client's id when it is sane (1 to 128 visible ASCII
    /// characters), otherwise makes a new one (uuid v4).
    pub fn from_client(value: Option<&str>) -> Self {
        match value {
            Some(v)
                if !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Self(v.to_owned())
            }
            _ => Self::generate(),
        }
    }

    /// A new random id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    /// The id as text (always a valid header value).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl ControlState {
    /// Builds the state after checking the config.
    pub fn new(
        coordinator: Arc<dyn Coordinator>,
        tokens: TokenIssuer,
        config: ControlConfig,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            coordinator,
            tokens,
            config,
            store: None,
            live: Arc::new(LiveConfigCell::default()),
            cdn_health: Arc::new(CdnHealthCell::default()),
            last_view: Mutex::new(None),
            bus: None,
            outbox_wake: Arc::new(Notify::new()),
        })
    }

    /// The same state with a room bus, which the outbox relay publishes
    /// gift events to: the NATS JetStream publisher in clusters
    /// ([`crate::bus::NatsPublisher`], `weir control --nats`), or any other
    /// [`BusPublisher`] (the data plane's in-process bus for `weir dev`).
    /// Without one, gift events stay in the outbox.
    pub fn with_bus(mut self, bus: Arc<dyn BusPublisher>) -> Self {
        self.bus = Some(bus);
        self
    }

    /// The room bus, if there is one.
    pub fn bus(&self) -> Option<&Arc<dyn BusPublisher>> {
        self.bus.as_ref()
    }

    /// Notified after every gift this replica commits, so the outbox relay
    /// (when it runs here) publishes it at once instead of at its next poll.
    pub fn outbox_wake(&self) -> &Arc<Notify> {
        &self.outbox_wake
    }

    /// The same state with a business store (users, rooms, follows).
    pub fn with_store(mut self, store: Store) -> Self {
        self.store = Some(store);
        self
    }

    /// The business store, if there is one.
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    fn require_store(&self) -> Result<&Store, ApiError> {
        self.store.as_ref().ok_or(ApiError::NoStore)
    }

    /// The coordinator.
    pub fn coordinator(&self) -> &Arc<dyn Coordinator> {
        &self.coordinator
    }

    /// The settings applied now from the config center.
    pub fn live_config(&self) -> LiveConfig {
        self.live.get()
    }

    /// The CDNs' health as this replica last read it.
    pub fn cdn_health_cell(&self) -> &CdnHealthCell {
        &self.cdn_health
    }

    /// Starts what runs beside the API: the config watch, which applies
    /// every change of the config center without a restart, and the reader
    /// of the CDNs' health (aborting the handle stops both).
    pub fn spawn_background(&self) -> tokio::task::JoinHandle<()> {
        let config =
            crate::config_center::watch(Arc::clone(&self.coordinator), Arc::clone(&self.live));
        let health = cdn::watch_health(Arc::clone(&self.coordinator), Arc::clone(&self.cdn_health));
        tokio::spawn(async move {
            tokio::join!(config, health);
        })
    }

    /// The settings.
    pub fn config(&self) -> &ControlConfig {
        &self.config
    }

    /// The token issuer (its verifier is what nodes need).
    pub fn tokens(&self) -> &TokenIssuer {
        &self.tokens
    }

    /// Whether the coordinator and the store answer (for `/readyz`).
    pub async fn ready(&self) -> Result<(), ApiError> {
        with_timeout(self.coordinator.nodes()).await?;
        if let Some(store) = &self.store {
            store.ping().await?;
        }
        Ok(())
    }

    /// Where a streamer should publish `room`, with a publish token.
    pub async fn assign_publisher(
        &self,
        rid: &RequestId,
        room: &str,
    ) -> Result<Assignment, ApiError> {
        observe("AssignPublisher", rid, async {
            let room = parse_room(room)?;
            let (view, degraded) = self.view().await?;
            let live = self.live.get();
            // A room's publisher lands on one version while the weights stay.
            let snapshot = view.snapshot(&live, stable_draw(room.as_str()));
            let node = scheduler::rank_for_publisher(&snapshot, &room)
                .into_iter()
                .next()
                .ok_or_else(|| ApiError::NoNode {
                    room: room.clone(),
                    role: "publisher",
                })?;
            let endpoints = vec![endpoint(EndpointKind::Whip, node, &room)];
            let owner = self.owner_of(&room).await?;
            let minted = self.mint(&room, Mode::Publish, &owner, None)?;
            Ok(Assignment {
                room,
                endpoints,
                token: minted.token,
                token_expires_unix: minted.expires_unix,
                degraded,
            })
        })
        .await
    }

    /// Ranked places where a viewer can play `room`, with a play token:
    /// WHEP on nodes (rollout weights honoured; `viewer` is the client's
    /// own id, which keeps it on one version, empty for none), then HLS on
    /// the configured CDNs, failing ones last.
    pub async fn assign_viewer(
        &self,
        rid: &RequestId,
        room: &str,
        region: &str,
        viewer: &str,
    ) -> Result<Assignment, ApiError> {
        observe("AssignViewer", rid, async {
            let room = parse_room(room)?;
            if region.len() > 64 {
                return Err(ApiError::invalid("region", "longer than 64 bytes"));
            }
            if viewer.len() > 128 || !viewer.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ApiError::invalid(
                    "viewer_id",
                    "must be at most 128 visible ASCII characters",
                ));
            }
            let (view, degraded) = self.view().await?;
            let live = self.live.get();
            let draw = if viewer.is_empty() {
                random_draw()
            } else {
                stable_draw(viewer)
            };
            let snapshot = view.snapshot(&live, draw);
            let region = Some(region).filter(|r| !r.is_empty());
            let mut endpoints: Vec<Endpoint> = scheduler::rank_for_viewer(&snapshot, &room, region)
                .into_iter()
                .map(|node| endpoint(EndpointKind::Whep, node, &room))
                .collect();
            // CDNs pull the room from its nodes: offered while some node can
            // serve the room (or its origin is live, only full).
            if !endpoints.is_empty() || scheduler::has_live_origin(&snapshot, &room) {
                let health = self.cdn_health.get();
                endpoints.extend(
                    cdn::rank_cdns(&live.cdns, &health, draw)
                        .into_iter()
                        .map(|c| Endpoint {
                            kind: EndpointKind::Hls,
                            url: c.url_for(&room),
                            node_id: None,
                            cdn: Some(c.name.clone()),
                        }),
                );
            }
            if endpoints.is_empty() {
                return Err(ApiError::NoNode {
                    room,
                    role: "viewer",
                });
            }
            let minted = self.mint(&room, Mode::Play, &anonymous("viewer"), None)?;
            Ok(Assignment {
                room,
                endpoints,
                token: minted.token,
                token_expires_unix: minted.expires_unix,
                degraded,
            })
        })
        .await
    }

    /// Rooms the cluster carries, sorted by room id.
    pub async fn list_rooms(&self, rid: &RequestId) -> Result<Vec<RoomSummary>, ApiError> {
        observe("ListRooms", rid, async {
            let cluster = self.read_cluster().await?;
            Ok(scheduler::room_summaries(&cluster.nodes, &cluster.origins))
        })
        .await
    }

    /// Mints a token on request, when the config allows it.
    pub async fn mint_token(
        &self,
        rid: &RequestId,
        req: MintRequest,
    ) -> Result<IssuedToken, ApiError> {
        observe("MintToken", rid, async {
            if !self.config.allow_token_minting {
                return Err(ApiError::MintingDisabled);
            }
            let room = parse_room(&req.room)?;
            let mode = Mode::from_str(&req.mode).map_err(|e| ApiError::invalid("mode", e))?;
            let subject = match req.subject.as_str() {
                "" if mode == Mode::Publish => self.owner_of(&room).await?,
                "" => anonymous("anon"),
                s => {
                    validate_subject(s)?;
                    s.to_owned()
                }
            };
            let ttl = match req.ttl_seconds {
                0 => None,
                s if Duration::from_secs(s) > MAX_TOKEN_TTL => {
                    return Err(ApiError::invalid(
                        "ttl_seconds",
                        format!(
                            "{s} is more than the longest allowed, {} (7 days)",
                            MAX_TOKEN_TTL.as_secs()
                        ),
                    ));
                }
                s => Some(Duration::from_secs(s)),
            };
            let minted = self.mint(&room, mode, &subject, ttl)?;
            Ok(IssuedToken {
                room,
                mode,
                subject,
                token: minted.token,
                expires_unix: minted.expires_unix,
            })
        })
        .await
    }

    /// Who publishes `room`: its owner in the store; for a room the store
    /// does not know (or with no store), the configured default owner, so
    /// ad-hoc rooms (`weir dev`, tests) keep working. An ended room takes no
    /// publisher.
    async fn owner_of(&self, room: &RoomId) -> Result<String, ApiError> {
        let Some(store) = &self.store else {
            return Ok(self.config.default_owner.clone());
        };
        match store.find_room(room).await? {
            Some(r) if r.status == RoomStatus::Ended => Err(ApiError::FailedPrecondition(format!(
                "room {room} has ended; create a new room to publish"
            ))),
            Some(r) => Ok(r.owner.into()),
            None => Ok(self.config.default_owner.clone()),
        }
    }

    fn mint(
        &self,
        room: &RoomId,
        mode: Mode,
        subject: &str,
        ttl: Option<Duration>,
    ) -> Result<crate::tokens::MintedToken, ApiError> {
        let ttl = ttl.or(Some(self.live.get().token_default_ttl));
        self.tokens
            .mint(room, mode, subject, ttl)
            .map_err(|e| match e {
                TokenIssueError::TtlTooLong { .. } => ApiError::invalid("ttl_seconds", e),
                TokenIssueError::SubjectTooLong { .. } | TokenIssueError::SubjectEmpty => {
                    ApiError::invalid("subject", e)
                }
                TokenIssueError::ReadKey { .. }
                | TokenIssueError::WriteKey { .. }
                | TokenIssueError::BadKey { .. } => ApiError::Internal(e.to_string()),
            })
    }

    async fn read_cluster(&self) -> Result<Arc<ClusterState>, ApiError> {
        Ok(with_timeout(self.coordinator.cluster_view()).await?)
    }

    /// The cluster now, or the last good view (degraded) when the coordinator
    /// does not answer and that view is recent enough.
    async fn view(&self) -> Result<(Arc<ClusterView>, bool), ApiError> {
        match self.read_cluster().await {
            Ok(cluster) => {
                let view = Arc::new(ClusterView {
                    cluster,
                    taken_at_ms: unix_ms(),
                    taken_at: Instant::now(),
                });
                *self.lock_view() = Some(Arc::clone(&view));
                Ok((view, false))
            }
            Err(err) => {
                let last = self.lock_view().clone();
                match last {
                    Some(view) if view.taken_at.elapsed() <= self.config.stale_view_max_age => {
                        tracing::warn!(error = %err, "coordinator unavailable, answering from the last view");
                        metrics::counter!("weir_control_degraded_answers_total").increment(1);
                        Ok((view, true))
                    }
                    _ => Err(err),
                }
            }
        }
    }

    /// Drops the last view so the next assignment reads the cluster afresh.
    fn forget_view(&self) {
        *self.lock_view() = None;
    }

    fn lock_view(&self) -> std::sync::MutexGuard<'_, Option<Arc<ClusterView>>> {
        // Only ever holds a swap of one Arc: a poisoned lock still has good data.
        self.last_view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ClusterView {
    /// The view judged as of when it was taken: a degraded answer sends
    /// clients where the cluster last said they could go.
    fn snapshot<'a>(&'a self, live: &'a LiveConfig, draw: u64) -> Snapshot<'a> {
        Snapshot {
            flags: &self.cluster.flags,
            report_max_age_ms: live.report_max_age_ms,
            max_load_permille: live.max_load_permille,
            rollout: &live.rollout,
            draw,
            ..Snapshot::new(&self.cluster.nodes, &self.cluster.origins, self.taken_at_ms)
        }
    }
}

/// A coordinator call that gives up after [`COORDINATOR_TIMEOUT`].
async fn with_timeout<T>(
    call: impl Future<Output = Result<T, CoordError>>,
) -> Result<T, CoordError> {
    tokio::time::timeout(COORDINATOR_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(CoordError::Unavailable(format!(
                "no answer within {COORDINATOR_TIMEOUT:?}"
            )))
        })
}

/// Parses the room and, once valid, records it on the request's span.
fn parse_room(room: &str) -> Result<RoomId, ApiError> {
    let room = RoomId::parse(room).map_err(|e| ApiError::invalid("room", e))?;
    tracing::Span::current().record("room", room.as_str());
    Ok(room)
}

fn validate_subject(subject: &str) -> Result<(), ApiError> {
    if subject.chars().count() > MAX_SUBJECT_LEN {
        return Err(ApiError::invalid(
            "subject",
            format!("longer than {MAX_SUBJECT_LEN} characters"),
        ));
    }
    if subject.chars().any(char::is_control) {
        return Err(ApiError::invalid("subject", "contains control characters"));
    }
    Ok(())
}

fn endpoint(kind: EndpointKind, node: &NodeInfo, room: &RoomId) -> Endpoint {
    let path = match kind {
        EndpointKind::Whip => format!("whip/{room}"),
        EndpointKind::Whep => format!("whep/{room}"),
        EndpointKind::Hls => format!("hls/{room}/master.m3u8"),
    };
    Endpoint {
        kind,
        url: format!("{}/{path}", node.http_url.trim_end_matches('/')),
        node_id: Some(node.id.clone()),
        cdn: None,
    }
}

/// `<prefix>-<16 random hex digits>`, a subject for someone without an account.
fn anonymous(prefix: &str) -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &hex[..16])
}

fn unix_ms() -> u64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// Runs one API call inside a span carrying the request id, and counts it.
async fn observe<T>(
    method: &'static str,
    rid: &RequestId,
    call: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    let span = tracing::info_span!(
        "request",
        request_id = %rid,
        method,
        room = tracing::field::Empty
    );
    let started = Instant::now();
    let result = call.instrument(span.clone()).await;
    let code = match &result {
        Ok(_) => "ok",
        Err(e) => e.kind().as_str(),
    };
    metrics::counter!("weir_control_requests_total", "method" => method, "code" => code)
        .increment(1);
    metrics::histogram!("weir_control_request_seconds", "method" => method)
        .record(started.elapsed().as_secs_f64());
    span.in_scope(|| match &result {
        Ok(_) => tracing::debug!(code, "request done"),
        Err(e) if e.kind() == ErrorKind::Internal => {
            tracing::error!(code, error = %e, "request failed")
        }
        Err(e) => tracing::info!(code, error = %e, "request refused"),
    });
    result
}
