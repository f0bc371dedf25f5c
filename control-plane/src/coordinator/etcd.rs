//! The [`Coordinator`] on an etcd cluster (v3 API, etcd 3.4 and later), with
//! the key layout of `weir_protocol::coordinator`:
//!
//! - `/weir/v1/nodes/{node}` → the node's [`NodeInfo`] as JSON, attached to
//!   the node's lease: [`Coordinator::register_node`] grants the lease and
//!   puts the key, [`Coordinator::keep_alive`] sends one keep-alive request and
//!   puts the key again with the new load, [`Coordinator::revoke`] revokes the
//!   lease (etcd deletes every key attached to it).
//! - `/weir/v1/rooms/{room}/origin` → the origin node's id, created by a
//!   transaction that succeeds only while the key is absent and attached to
//!   the claimer's lease; released by a transaction that deletes the key only
//!   if it still holds the releasing node's id.
//!
//! # Endpoints and failures
//!
//! Each configured endpoint gets a client of its own (one HTTP/2 connection,
//! opened lazily) instead of one client balancing over all of them: a dead
//! member left in a balanced client's list makes a share of the requests fail
//! for as long as it stays dead. Calls go to the endpoint that answered last;
//! when it fails (transport error, timeout, `Unavailable` from the server such
//! as "no leader" or "leader changed") its connection is dropped and the call
//! moves on to the next endpoint, round after round, until it succeeds or its
//! time budget ([`EtcdConfig::call_timeout`], 2 s by default, for the whole
//! trait call even when it makes two requests) is spent. So
//! calls keep succeeding while a majority of members lives, and a restarted
//! etcd is reached again by the next call, without restarting the process.
//! A call that runs out of time fails with [`CoordError::Unavailable`]; a lease
//! that etcd does not know (expired or revoked) gives
//! [`CoordError::LeaseExpired`], so a node's agent registers again.
//!
//! - `/weir/v1/node-flags/{node}` → the operator's [`NodeFlags`] as JSON,
//!   bound to no lease (a cordon outlives a node restart); deleted on uncordon.
//! - `/weir/v1/config/{key}` → the key's [`ConfigValue`] as JSON; its version
//!   is etcd's own per-key version (1 on the first write, one more per
//!   change), which [`Coordinator::set_config`] compares in the transaction
//!   that writes, so concurrent writers never lose an update.
//!   `/weir/v1/config-history/{key}/{version}` keeps the last
//!   [`CONFIG_HISTORY_KEPT`] values, written in the same transaction.
//!
//! # The cluster mirror
//!
//! [`Coordinator::cluster_view`], which the scheduler calls on every
//! assignment, is answered from a watch-fed copy of the nodes, origins and
//! node flags instead of a read of every key: one background task (started
//! on first use, connections of its own) reads the three prefixes in one
//! transaction and then watches `/weir/v1/` from the next revision. The
//! copy is used only while its watch is live and has been heard from within
//! [`MIRROR_QUIET_LIMIT`] (a quiet watch is asked for a progress report);
//! otherwise, and until a write this process made has come back through
//! the watch, `cluster_view` reads etcd directly. So a process always sees
//! its own writes, and other processes' writes a few milliseconds late.
//!
//! The config watch ([`Coordinator::next_config`]) is one background task per
//! coordinator, started on first use, on connections of its own: it reads
//! the config, then watches the prefix from the next revision, and on any
//! failure (a member killed, compaction, a cancelled watch) moves to the next
//! endpoint and reads again, so no change is missed and none is applied twice.
//!
//! Retried writes are safe to repeat: a claim that landed but whose answer was
//! lost finds the node's own id on the retry; a lease granted by a lost
//! attempt just expires; a revoke retried after it landed reports the lease
//! as expired.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::watch;
use weir_protocol::coordinator::{
    CONFIG_HISTORY_KEPT, CdnHealth, ClusterState, ConfigSnapshot, ConfigValue, ConfigWrite,
    CoordError, Coordinator, KEY_PREFIX, LeaseId, NodeFlags, NodeInfo, cdn_health_key,
    config_history_key, config_key, election_key, node_flags_key, node_key, room_edge_key,
    room_origin_key,
};

use crate::election::ElectionBackend;
use weir_protocol::{NodeId, RoomId};

/// Default time budget of one coordinator call, retries included.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Default longest wait for one request to one endpoint.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default longest wait for a TCP connection to an endpoint.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// etcd's default client port, used when an endpoint names none.
pub const DEFAULT_PORT: u16 = 2379;

/// Pause after every endpoint failed once, before the next round.
const ROUND_PAUSE: Duration = Duration::from_millis(100);

/// Where etcd is and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs of the members, `http://host:port` (see [`parse_endpoints`]).
    pub endpoints: Vec<String>,
    /// Time budget of one coordinator call, retries over endpoints included.
    pub call_timeout: Duration,
    /// Longest wait for one request to one endpoint.
    pub attempt_timeout: Duration,
    /// Longest wait for a TCP connection to one endpoint.
    pub connect_timeout: Duration,
}

impl EtcdConfig {
    /// The default timeouts with these endpoints.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// Why an etcd configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdConfigError {
    /// The endpoint list is empty.
    #[error("no etcd endpoint given (expected URL[,URL...], e.g. http://127.0.0.1:2379)")]
    NoEndpoints,
    /// One endpoint is not an `http://host[:port]` URL.
    #[error("etcd endpoint {endpoint:?}: {reason}")]
    BadEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A timeout is zero.
    #[error("etcd {0} must be more than zero")]
    ZeroTimeout(&'static str),
}

/// Parses a comma-separated list of etcd client URLs (`--etcd`): each
/// `http://host[:port]` or `host[:port]`, port 2379 when absent. Returns them
/// normalized to `http://host:port`, without duplicates, in the given order.
pub fn parse_endpoints(list: &str) -> Result<Vec<String>, EtcdConfigError> {
    if list.trim().is_empty() {
        return Err(EtcdConfigError::NoEndpoints);
    }
    let mut out: Vec<String> = Vec::new();
    for raw in list.split(',') {
        let endpoint = normalize_endpoint(raw.trim())?;
        if !out.contains(&endpoint) {
            out.push(endpoint);
        }
    }
    if out.is_empty() {
        return Err(EtcdConfigError::NoEndpoints);
    }
    Ok(out)
}

fn normalize_endpoint(raw: &str) -> Result<String, EtcdConfigError> {
    let bad = |reason: &str| EtcdConfigError::BadEndpoint {
        endpoint: raw.to_owned(),
        reason: reason.to_owned(),
    };
    if raw.is_empty() {
        return Err(bad("empty entry"));
    }
    let with_scheme = if raw.contains("://") {
        raw.to_owned()
    } else {
        format!("http://{raw}")
    };
    let uri: http::Uri = with_scheme
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(bad("TLS (https) is not supported yet; use http://")),
        _ => return Err(bad("the scheme must be http://")),
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("user info in the URL is not supported"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("a client URL has no path or query"));
    }
    let host = authority.host();
    if host.is_empty() {
        return Err(bad("no host"));
    }
    // `Authority::port` is `None` for a port that is not a u16: read it here.
    let port = match authority.as_str().strip_prefix(host) {
        Some("") => DEFAULT_PORT,
        Some(rest) => match rest.strip_prefix(':').map(str::parse::<u16>) {
            Some(Ok(port)) if port != 0 => port,
            _ => return Err(bad("the port must be a number from 1 to 65535")),
        },
        None => return Err(bad("cannot read the port")),
    };
    Ok(format!("http://{host}:{port}"))
}

/// The coordinator on etcd (see the module docs).
pub struct EtcdCoordinator {
    config: EtcdConfig,
    /// One tonic endpoint per configured member, in `config.endpoints` order.
    targets: Vec<tonic::transport::Endpoint>,
    conn: Mutex<Connections>,
    /// The config as the watch task last saw it (started on first use).
    config_watch: OnceLock<watch::Receiver<Arc<ConfigSnapshot>>>,
    /// The watch tasks run while this lives.
    alive: Arc<()>,
    /// The watch-fed copy of nodes, origins and flags.
    mirror: Arc<Mirror>,
    /// Whether the mirror's task was started.
    mirror_started: OnceLock<()>,
    /// The etcd revision of this process's last write to a mirrored key.
    last_write: AtomicI64,
}

/// A mirror heard from less recently than this is not trusted.
pub const MIRROR_QUIET_LIMIT: Duration = Duration::from_secs(5);
/// How long `cluster_view` waits for the mirror to catch up with this
/// process's own write before reading etcd directly.
const MIRROR_CATCH_UP: Duration = Duration::from_millis(500);

/// The cluster as the watch last showed it.
#[derive(Debug, Default)]
struct MirrorState {
    /// The watch is connected and caught up.
    synced: bool,
    /// Last etcd revision applied.
    revision: i64,
    /// When the watch last delivered anything (events or progress).
    heard_at: Option<Instant>,
    nodes: BTreeMap<NodeId, NodeInfo>,
    origins: BTreeMap<RoomId, NodeId>,
    flags: BTreeMap<NodeId, NodeFlags>,
    /// The state as handed out, with the revision and time it was built
    /// at; rebuilt on read after a change, at most every [`MIRROR_REBUILD`]
    /// unless a caller needs a newer revision (its own write).
    shared: Option<(Arc<ClusterState>, i64, Instant)>,
}

/// The longest a handed-out view lags behind the mirror. Load reports
/// change every node's entry every second; rebuilding the view (every
/// origin cloned) on each would cost more than the lag is worth.
const MIRROR_REBUILD: Duration = Duration::from_millis(50);

/// The mirror and a channel that announces its revision.
#[derive(Debug)]
struct Mirror {
    state: Mutex<MirrorState>,
    revision: watch::Sender<i64>,
}

impl Mirror {
    fn lock(&self) -> MutexGuard<'_, MirrorState> {
        // Plain maps updated between statements: a poisoned lock is harmless.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The state when trusted and at least at `revision`.
    fn view(&self, revision: i64) -> Option<Arc<ClusterState>> {
        let mut st = self.lock();
        let fresh = st
            .heard_at
            .is_some_and(|t| t.elapsed() < MIRROR_QUIET_LIMIT);
        if !st.synced || !fresh || st.revision < revision {
            return None;
        }
        let usable = st.shared.as_ref().is_some_and(|(_, built_rev, built_at)| {
            *built_rev >= revision
                && (*built_rev == st.revision || built_at.elapsed() < MIRROR_REBUILD)
        });
        if !usable {
            let view = Arc::new(ClusterState {
                nodes: st.nodes.values().cloned().collect(),
                origins: st
                    .origins
                    .iter()
                    .map(|(r, n)| (r.clone(), n.clone()))
                    .collect(),
                flags: st.flags.clone(),
            });
            st.shared = Some((view, st.revision, Instant::now()));
        }
        st.shared.as_ref().map(|(view, _, _)| Arc::clone(view))
    }

    fn unsynced(&self) {
        self.lock().synced = false;
    }
}

/// Clients per endpoint (`None`: connect on next use) and the one to try first.
struct Connections {
    clients: Vec<Option<Client>>,
    preferred: usize,
}

impl std::fmt::Debug for EtcdCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCoordinator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How one failed request is handled.
#[derive(Debug, PartialEq, Eq)]
enum Class {
    /// etcd does not know the lease: expired or revoked.
    LeaseGone,
    /// Worth another endpoint or another try.
    Retry,
    /// Another try would fail the same way.
    Fatal,
}

/// Why a call failed, before it is tied to a lease.
#[derive(Debug)]
enum Failure {
    LeaseGone,
    Unavailable(String),
}

impl Failure {
    fn into_coord(self, lease: Option<LeaseId>) -> CoordError {
        match (self, lease) {
            (Failure::LeaseGone, Some(lease)) => CoordError::LeaseExpired(lease),
            (Failure::LeaseGone, None) => {
                CoordError::Unavailable("etcd: unexpected 'lease not found'".into())
            }
            (Failure::Unavailable(msg), _) => CoordError::Unavailable(msg),
        }
    }
}

fn classify(e: &etcd_client::Error) -> Class {
    use etcd_client::Error as E;
    use tonic::Code;
    match e {
        E::GRpcStatus(s) => match s.code() {
            Code::NotFound if s.message().contains("lease not found") => Class::LeaseGone,
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Internal => Class::Retry,
            _ => Class::Fatal,
        },
        // `lease_keep_alive` reports a lease etcd does not know this way.
        E::LeaseKeepAliveError(m) if m.contains("lease not found") => Class::LeaseGone,
        E::TransportError(_) | E::IoError(_) | E::LeaseKeepAliveError(_) | E::WatchError(_) => {
            Class::Retry
        }
        _ => Class::Fatal,
    }
}

/// Whole seconds for etcd, rounded up, at least 1. (etcd raises a TTL below
/// its minimum, 2 s with the default election timeout, to that minimum.)
fn ttl_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

fn nodes_prefix() -> String {
    format!("{KEY_PREFIX}nodes/")
}

fn rooms_prefix() -> String {
    format!("{KEY_PREFIX}rooms/")
}

fn node_flags_prefix() -> String {
    format!("{KEY_PREFIX}node-flags/")
}

fn cdn_health_prefix() -> String {
    format!("{KEY_PREFIX}cdn-health/")
}

fn config_prefix() -> String {
    format!("{KEY_PREFIX}config/")
}

fn unix_ms() -> u64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

fn parse_nodes(kvs: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<NodeInfo> {
    let mut nodes: Vec<NodeInfo> = kvs
        .into_iter()
        .filter_map(|(key, value)| match serde_json::from_slice(&value) {
            Ok(info) => Some(info),
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(&key), error = %e, "etcd: skipping an unreadable node entry");
                None
            }
        })
        .collect();
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    nodes
}

/// `rooms/{room}/edges/{node}` keys as (room, edge node) pairs, sorted.
fn parse_edges(kvs: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(RoomId, NodeId)> {
    let prefix = rooms_prefix();
    let mut edges: Vec<(RoomId, NodeId)> = kvs
        .into_iter()
        .filter_map(|(key, _)| {
            let key = String::from_utf8(key).ok()?;
            let (room, node) = key.strip_prefix(&prefix)?.split_once("/edges/")?;
            Some((RoomId::parse(room).ok()?, NodeId::parse(node).ok()?))
        })
        .collect();
    edges.sort();
    edges
}

fn parse_origins(kvs: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(RoomId, NodeId)> {
    let prefix = rooms_prefix();
    let mut origins: Vec<(RoomId, NodeId)> = kvs
        .into_iter()
        .filter_map(|(key, value)| {
            let key = String::from_utf8(key).ok()?;
            // Only `rooms/{room}/origin`; other keys under a room
            // (edges, later) are not origins.
            let room = key.strip_prefix(&prefix)?.strip_suffix("/origin")?;
            let parsed = RoomId::parse(room).ok().zip(
                std::str::from_utf8(&value)
                    .ok()
                    .and_then(|v| NodeId::parse(v).ok()),
            );
            if parsed.is_none() {
                tracing::warn!(%key, "etcd: skipping an unreadable room origin");
            }
            parsed
        })
        .collect();
    origins.sort();
    origins
}

fn parse_flags(kvs: Vec<(Vec<u8>, Vec<u8>)>) -> BTreeMap<NodeId, NodeFlags> {
    let prefix = node_flags_prefix();
    kvs.into_iter()
        .filter_map(|(key, value)| {
            let key = String::from_utf8(key).ok()?;
            let node = NodeId::parse(key.strip_prefix(&prefix)?).ok();
            let flags = serde_json::from_slice::<NodeFlags>(&value).ok();
            if node.is_none() || flags.is_none() {
                tracing::warn!(%key, "etcd: skipping unreadable node flags");
            }
            node.zip(flags)
        })
        .collect()
}

/// A config key and value from etcd, its version being etcd's own.
fn parse_config_kv(kv: &KeyValue) -> Option<(String, ConfigValue)> {
    let key = kv
        .key_str()
        .ok()?
        .strip_prefix(&config_prefix())?
        .to_owned();
    match serde_json::from_slice::<ConfigValue>(kv.value()) {
        Ok(mut value) => {
            value.version = u64::try_from(kv.version()).unwrap_or(0);
            Some((key, value))
        }
        Err(e) => {
            tracing::warn!(%key, error = %e, "etcd: skipping an unreadable config value");
            None
        }
    }
}

fn revision(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

impl EtcdCoordinator {
    /// Checks the configuration; connects lazily, on the first call, so an
    /// etcd that is down at start-up is no error here.
    pub fn new(config: EtcdConfig) -> Result<Self, EtcdConfigError> {
        if config.endpoints.is_empty() {
            return Err(EtcdConfigError::NoEndpoints);
        }
        for (name, t) in [
            ("call timeout", config.call_timeout),
            ("attempt timeout", config.attempt_timeout),
            ("connect timeout", config.connect_timeout),
        ] {
            if t.is_zero() {
                return Err(EtcdConfigError::ZeroTimeout(name));
            }
        }
        let mut targets = Vec::with_capacity(config.endpoints.len());
        for endpoint in &config.endpoints {
            let normalized = normalize_endpoint(endpoint)?;
            let target = tonic::transport::Endpoint::from_shared(normalized)
                .map_err(|e| EtcdConfigError::BadEndpoint {
                    endpoint: endpoint.clone(),
                    reason: e.to_string(),
                })?
                .connect_timeout(config.connect_timeout)
                .tcp_nodelay(true);
            targets.push(target);
        }
        let clients = vec![None; targets.len()];
        Ok(Self {
            config,
            targets,
            conn: Mutex::new(Connections {
                clients,
                preferred: 0,
            }),
            config_watch: OnceLock::new(),
            alive: Arc::new(()),
            mirror: Arc::new(Mirror {
                state: Mutex::new(MirrorState::default()),
                revision: watch::Sender::new(0),
            }),
            mirror_started: OnceLock::new(),
            last_write: AtomicI64::new(0),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, Connections> {
        // The guarded data is a vector of optional clients and an index,
        // always consistent between statements: a poisoned lock is harmless.
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The client of endpoint `idx`, connecting (lazily) if it has none.
    async fn client(&self, idx: usize) -> Result<Client, etcd_client::Error> {
        if let Some(c) = self.lock().clients.get(idx).and_then(Clone::clone) {
            return Ok(c);
        }
        let channel = self
            .targets
            .get(idx)
            .ok_or_else(|| etcd_client::Error::Internal(format!("no etcd endpoint #{idx}")))?
            .connect_lazy();
        let client = Client::from_channel(
            etcd_client::Channel::Tonic(channel),
            // A member without a leader refuses at once instead of waiting,
            // so the call moves on to another member.
            Some(ConnectOptions::new().with_require_leader(true)),
        )
        .await?;
        if let Some(slot) = self.lock().clients.get_mut(idx) {
            *slot = Some(client.clone());
        }
        Ok(client)
    }

    fn succeeded(&self, idx: usize) {
        let mut conn = self.lock();
        if conn.preferred != idx {
            tracing::info!(endpoint = %self.config.endpoints[idx], "etcd: now using this endpoint");
            conn.preferred = idx;
        }
    }

    fn failed(&self, idx: usize, op: &'static str, error: &str) {
        metrics::counter!("weir_etcd_request_failures_total", "op" => op).increment(1);
        tracing::debug!(endpoint = %self.config.endpoints[idx], op, error, "etcd request failed");
        let mut conn = self.lock();
        // Reconnect on the next use: a connection to a restarted or replaced
        // member starts fresh.
        if let Some(slot) = conn.clients.get_mut(idx) {
            *slot = None;
        }
        if conn.preferred == idx {
            conn.preferred = (idx + 1) % self.targets.len();
        }
    }

    /// When a trait call starting now must be answered: one budget for all
    /// the requests it makes.
    fn deadline(&self) -> Instant {
        Instant::now() + self.config.call_timeout
    }

    /// Runs `attempt` against the preferred endpoint, then the others in
    /// turn, until it succeeds, fails for good, or `deadline` passes.
    async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        deadline: Instant,
        mut attempt: F,
    ) -> Result<T, Failure>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.targets.len();
        let mut last_error = String::from("no attempt made");
        let mut attempts = 0u32;
        loop {
            let first = self.lock().preferred;
            for i in 0..n {
                let idx = (first + i) % n;
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    break;
                };
                if left.is_zero() {
                    break;
                }
                let budget = left.min(self.config.attempt_timeout);
                attempts += 1;
                let outcome = tokio::time::timeout(budget, async {
                    let client = self.client(idx).await?;
                    attempt(client).await
                })
                .await;
                let error = match outcome {
                    Ok(Ok(value)) => {
                        self.succeeded(idx);
                        return Ok(value);
                    }
                    Ok(Err(e)) => match classify(&e) {
                        Class::LeaseGone => {
                            self.succeeded(idx);
                            return Err(Failure::LeaseGone);
                        }
                        Class::Fatal => {
                            return Err(Failure::Unavailable(format!("etcd {op}: {e}")));
                        }
                        Class::Retry => e.to_string(),
                    },
                    Err(_) => format!("no answer within {budget:?}"),
                };
                self.failed(idx, op, &error);
                last_error = format!("{}: {error}", self.config.endpoints[idx]);
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            if left.is_zero() {
                break;
            }
            tokio::time::sleep(left.min(ROUND_PAUSE)).await;
        }
        Err(Failure::Unavailable(format!(
            "etcd {op}: no answer within the call's {:?} after {attempts} attempts (last: {last_error})",
            self.config.call_timeout
        )))
    }

    async fn put_node(
        &self,
        lease: LeaseId,
        info: &NodeInfo,
        deadline: Instant,
    ) -> Result<(), CoordError> {
        let key = node_key(&info.id);
        let value = serde_json::to_vec(info)
            .map_err(|e| CoordError::Unavailable(format!("cannot encode node info: {e}")))?;
        self.call("put_node", deadline, |mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease.0)))
                    .await
                    .map(drop)
            }
        })
        .await
        .map_err(|f| f.into_coord(Some(lease)))
    }

    /// Every key and value under `prefix`.
    async fn list(
        &self,
        op: &'static str,
        prefix: String,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, CoordError> {
        self.call(op, self.deadline(), |mut c| {
            let prefix = prefix.clone();
            async move {
                let mut resp = c.get(prefix, Some(GetOptions::new().with_prefix())).await?;
                Ok(resp
                    .take_kvs()
                    .into_iter()
                    .map(|kv| kv.into_key_value())
                    .collect())
            }
        })
        .await
        .map_err(|f| f.into_coord(None))
    }
}

#[async_trait]
impl Coordinator for EtcdCoordinator {
    async fn register_node(&self, info: NodeInfo, ttl: Duration) -> Result<LeaseId, CoordError> {
        let seconds = ttl_seconds(ttl);
        let deadline = self.deadline();
        let lease = self
            .call("lease_grant", deadline, |mut c| async move {
                c.lease_grant(seconds, None).await.map(|r| r.id())
            })
            .await
            .map(LeaseId)
            .map_err(|f| f.into_coord(None))?;
        // If this put fails the lease is left to expire on its own.
        self.put_node(lease, &info, deadline).await?;
        Ok(lease)
    }

    async fn keep_alive(&self, lease: LeaseId, info: NodeInfo) -> Result<(), CoordError> {
        let deadline = self.deadline();
        self.call("lease_keep_alive", deadline, |mut c| async move {
            // One request on a keep-alive stream, closed again on drop; a
            // lease etcd does not know comes back as "lease not found".
            c.lease_keep_alive(lease.0).await.map(drop)
        })
        .await
        .map_err(|f| f.into_coord(Some(lease)))?;
        self.put_node(lease, &info, deadline).await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), CoordError> {
        self.call("lease_revoke", self.deadline(), |mut c| async move {
            c.lease_revoke(lease.0).await.map(drop)
        })
        .await
        .map_err(|f| f.into_coord(Some(lease)))
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, CoordError> {
        Ok(parse_nodes(self.list("list_nodes", nodes_prefix()).await?))
    }

    async fn claim_room(
        &self,
        room: &RoomId,
        node: &NodeId,
        lease: LeaseId,
    ) -> Result<NodeId, CoordError> {
        let key = room_origin_key(room);
        let holder = self
            .call("claim_room", self.deadline(), |mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        key.clone(),
                        node.as_str(),
                        Some(PutOptions::new().with_lease(lease.0)),
                    )])
                    .or_else([TxnOp::get(key.clone(), None)]);
                async move {
                    let resp = c.txn(txn).await?;
                    if resp.succeeded() {
                        return Ok(None);
                    }
                    let value = resp.op_responses().into_iter().find_map(|r| match r {
                        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                        _ => None,
                    });
                    Ok(Some(value))
                }
            })
            .await
            .map_err(|f| f.into_coord(Some(lease)))?;
        match holder {
            None => Ok(node.clone()),
            Some(Some(value)) => std::str::from_utf8(&value)
                .ok()
                .and_then(|s| NodeId::parse(s).ok())
                .ok_or_else(|| {
                    CoordError::Unavailable(format!(
                        "etcd: {key} holds {:?}, not a node id",
                        String::from_utf8_lossy(&value)
                    ))
                }),
            // Unreachable: the transaction read the key it found present.
            Some(None) => Err(CoordError::Unavailable(format!(
                "etcd: {key} vanished inside a transaction"
            ))),
        }
    }

    async fn release_room(&self, room: &RoomId, node: &NodeId) -> Result<(), CoordError> {
        let key = room_origin_key(room);
        self.call("release_room", self.deadline(), |mut c| {
            let txn = Txn::new()
                .when([Compare::value(key.clone(), CompareOp::Equal, node.as_str())])
                .and_then([TxnOp::delete(key.clone(), None)]);
            async move { c.txn(txn).await.map(drop) }
        })
        .await
        .map_err(|f| f.into_coord(None))
    }

    async fn register_edge(
        &self,
        room: &RoomId,
        node: &NodeId,
        lease: LeaseId,
    ) -> Result<(), CoordError> {
        let key = room_edge_key(room, node);
        self.call("register_edge", self.deadline(), |mut c| {
            let key = key.clone();
            let value = node.as_str().to_owned();
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease.0)))
                    .await
                    .map(drop)
            }
        })
        .await
        .map_err(|f| f.into_coord(Some(lease)))
    }

    async fn release_edge(&self, room: &RoomId, node: &NodeId) -> Result<(), CoordError> {
        let key = room_edge_key(room, node);
        self.call("release_edge", self.deadline(), |mut c| {
            let key = key.clone();
            async move { c.delete(key, None).await.map(drop) }
        })
        .await
        .map_err(|f| f.into_coord(None))
    }

    async fn room_edges(&self) -> Result<Vec<(RoomId, NodeId)>, CoordError> {
        Ok(parse_edges(self.list("list_edges", rooms_prefix()).await?))
    }

    async fn room_origins(&self) -> Result<Vec<(RoomId, NodeId)>, CoordError> {
        Ok(parse_origins(
            self.list("list_origins", rooms_prefix()).await?,
        ))
    }

    async fn cluster(&self) -> Result<ClusterState, CoordError> {
        let (ranges, _) = self.read_cluster_ranges().await?;
        let [nodes, origins, flags] = ranges;
        Ok(ClusterState {
            nodes: parse_nodes(nodes),
            origins: parse_origins(origins),
            flags: parse_flags(flags),
        })
    }

    async fn cluster_view(&self) -> Result<Arc<ClusterState>, CoordError> {
        self.start_mirror();
        let wanted = self.last_write.load(Ordering::SeqCst);
        if let Some(view) = self.mirror.view(wanted) {
            return Ok(view);
        }
        // Synced but behind this process's own write: wait a moment.
        if self.mirror.lock().synced {
            let mut rx = self.mirror.revision.subscribe();
            let caught_up =
                tokio::time::timeout(MIRROR_CATCH_UP, rx.wait_for(|r| *r >= wanted)).await;
            if matches!(caught_up, Ok(Ok(_)))
                && let Some(view) = self.mirror.view(wanted)
            {
                return Ok(view);
            }
        }
        Ok(Arc::new(self.cluster().await?))
    }

    async fn set_node_flags(&self, node: &NodeId, flags: NodeFlags) -> Result<(), CoordError> {
        let key = node_flags_key(node);
        let value = serde_json::to_vec(&flags)
            .map_err(|e| CoordError::Unavailable(format!("cannot encode node flags: {e}")))?;
        let revision = self
            .call("set_node_flags", self.deadline(), |mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move {
                    Ok(if flags.excludes() {
                        c.put(key, value, None)
                            .await?
                            .header()
                            .map(|h| h.revision())
                    } else {
                        c.delete(key, None).await?.header().map(|h| h.revision())
                    })
                }
            })
            .await
            .map_err(|f| f.into_coord(None))?;
        // The mirror must show this write before it answers again.
        self.last_write
            .fetch_max(revision.unwrap_or(i64::MAX), Ordering::SeqCst);
        Ok(())
    }

    async fn node_flags(&self) -> Result<BTreeMap<NodeId, NodeFlags>, CoordError> {
        Ok(parse_flags(
            self.list("list_node_flags", node_flags_prefix()).await?,
        ))
    }

    async fn put_cdn_health(&self, health: &CdnHealth) -> Result<(), CoordError> {
        let key = cdn_health_key(&health.name);
        let value = serde_json::to_vec(health)
            .map_err(|e| CoordError::Unavailable(format!("cannot encode CDN health: {e}")))?;
        self.call("put_cdn_health", self.deadline(), |mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move { c.put(key, value, None).await.map(drop) }
        })
        .await
        .map_err(|f| f.into_coord(None))
    }

    async fn cdn_health(&self) -> Result<Vec<CdnHealth>, CoordError> {
        let kvs = self.list("list_cdn_health", cdn_health_prefix()).await?;
        Ok(kvs
            .into_iter()
            .filter_map(|(key, value)| {
                let health = serde_json::from_slice::<CdnHealth>(&value).ok();
                if health.is_none() {
                    tracing::warn!(key = %String::from_utf8_lossy(&key), "etcd: skipping unreadable CDN health");
                }
                health
            })
            .collect())
    }

    async fn config(&self) -> Result<ConfigSnapshot, CoordError> {
        self.read_config().await.map(|(snapshot, _)| snapshot)
    }

    async fn set_config(
        &self,
        writes: &[ConfigWrite],
        updated_by: &str,
    ) -> Result<ConfigSnapshot, CoordError> {
        let mut seen = std::collections::BTreeSet::new();
        if let Some(w) = writes.iter().find(|w| !seen.insert(w.key.as_str())) {
            return Err(CoordError::Conflict(format!(
                "config key {} is written twice in one change",
                w.key
            )));
        }
        if writes.is_empty() {
            return Coordinator::config(self).await;
        }
        let now = unix_ms();
        let mut compares = Vec::with_capacity(writes.len());
        let mut ops = Vec::with_capacity(writes.len() * 3);
        for w in writes {
            let key = config_key(&w.key);
            let version = w.expected_version + 1;
            let value = serde_json::to_vec(&ConfigValue {
                value: w.value.clone(),
                version,
                updated_ms: now,
                updated_by: updated_by.to_owned(),
            })
            .map_err(|e| CoordError::Unavailable(format!("cannot encode a config value: {e}")))?;
            let expected = i64::try_from(w.expected_version).unwrap_or(i64::MAX);
            compares.push(Compare::version(key.clone(), CompareOp::Equal, expected));
            ops.push(TxnOp::put(key, value.clone(), None));
            ops.push(TxnOp::put(config_history_key(&w.key, version), value, None));
            if version > CONFIG_HISTORY_KEPT {
                ops.push(TxnOp::delete(
                    config_history_key(&w.key, version - CONFIG_HISTORY_KEPT),
                    None,
                ));
            }
        }
        let applied = self
            .call("set_config", self.deadline(), |mut c| {
                let txn = Txn::new().when(compares.clone()).and_then(ops.clone());
                async move { c.txn(txn).await.map(|r| r.succeeded()) }
            })
            .await
            .map_err(|f| f.into_coord(None))?;
        // A retried transaction that had landed fails its compare: the
        // caller reads the config and sees its own write.
        if !applied {
            return Err(CoordError::Conflict(
                "a config key changed since it was read".into(),
            ));
        }
        Coordinator::config(self).await
    }

    async fn config_history(
        &self,
        key: &str,
        limit: usize,
    ) -> Result<Vec<ConfigValue>, CoordError> {
        let prefix = format!("{KEY_PREFIX}config-history/{key}/");
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let kvs = self
            .call("config_history", self.deadline(), |mut c| {
                let prefix = prefix.clone();
                async move {
                    let options = GetOptions::new()
                        .with_prefix()
                        .with_sort(
                            etcd_client::SortTarget::Key,
                            etcd_client::SortOrder::Descend,
                        )
                        .with_limit(limit);
                    let mut resp = c.get(prefix, Some(options)).await?;
                    Ok(resp.take_kvs())
                }
            })
            .await
            .map_err(|f| f.into_coord(None))?;
        Ok(kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<ConfigValue>(kv.value()).ok())
            .collect())
    }

    async fn next_config(&self, after_revision: u64) -> Result<ConfigSnapshot, CoordError> {
        let mut rx = self.config_watch()?;
        let snapshot = rx
            .wait_for(|s| s.revision > after_revision)
            .await
            .map_err(|_| CoordError::Unavailable("the config watch stopped".into()))?;
        Ok(ConfigSnapshot::clone(&snapshot))
    }
}

#[async_trait]
impl ElectionBackend for EtcdCoordinator {
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, CoordError> {
        let seconds = ttl_seconds(ttl);
        self.call("lease_grant", self.deadline(), |mut c| async move {
            c.lease_grant(seconds, None).await.map(|r| r.id())
        })
        .await
        .map(LeaseId)
        .map_err(|f| f.into_coord(None))
    }

    async fn refresh_lease(&self, lease: LeaseId) -> Result<(), CoordError> {
        self.call("lease_keep_alive", self.deadline(), |mut c| async move {
            c.lease_keep_alive(lease.0).await.map(drop)
        })
        .await
        .map_err(|f| f.into_coord(Some(lease)))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), CoordError> {
        Coordinator::revoke(self, lease).await
    }

    async fn try_lead(
        &self,
        name: &str,
        candidate: &str,
        lease: LeaseId,
    ) -> Result<String, CoordError> {
        let key = election_key(name);
        let holder = self
            .call("try_lead", self.deadline(), |mut c| {
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        key.clone(),
                        candidate,
                        Some(PutOptions::new().with_lease(lease.0)),
                    )])
                    .or_else([TxnOp::get(key.clone(), None)]);
                async move {
                    let resp = c.txn(txn).await?;
                    if resp.succeeded() {
                        return Ok(None);
                    }
                    Ok(resp.op_responses().into_iter().find_map(|r| match r {
                        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                        _ => None,
                    }))
                }
            })
            .await
            .map_err(|f| f.into_coord(Some(lease)))?;
        match holder {
            None => Ok(candidate.to_owned()),
            Some(value) => Ok(String::from_utf8_lossy(&value).into_owned()),
        }
    }

    async fn leader(&self, name: &str) -> Result<Option<String>, CoordError> {
        let key = election_key(name);
        self.call("election_leader", self.deadline(), |mut c| {
            let key = key.clone();
            async move {
                let resp = c.get(key, None).await?;
                Ok(resp
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
            }
        })
        .await
        .map_err(|f| f.into_coord(None))
    }

    async fn resign(&self, name: &str, candidate: &str) -> Result<(), CoordError> {
        let key = election_key(name);
        self.call("election_resign", self.deadline(), |mut c| {
            let txn = Txn::new()
                .when([Compare::value(key.clone(), CompareOp::Equal, candidate)])
                .and_then([TxnOp::delete(key.clone(), None)]);
            async move { c.txn(txn).await.map(drop) }
        })
        .await
        .map_err(|f| f.into_coord(None))
    }
}

impl EtcdCoordinator {
    /// Nodes, origins and flags as raw key-values, read in one transaction,
    /// with the revision they were read at.
    async fn read_cluster_ranges(&self) -> Result<([Vec<(Vec<u8>, Vec<u8>)>; 3], i64), CoordError> {
        let prefixes = [nodes_prefix(), rooms_prefix(), node_flags_prefix()];
        let (ranges, header) = self
            .call("read_cluster", self.deadline(), |mut c| {
                let txn = Txn::new().and_then(
                    prefixes
                        .clone()
                        .map(|p| TxnOp::get(p, Some(GetOptions::new().with_prefix()))),
                );
                async move {
                    let resp = c.txn(txn).await?;
                    let header = resp.header().map_or(0, |h| h.revision());
                    let ranges: Vec<Vec<(Vec<u8>, Vec<u8>)>> = resp
                        .op_responses()
                        .into_iter()
                        .map(|r| match r {
                            TxnOpResponse::Get(mut get) => get
                                .take_kvs()
                                .into_iter()
                                .map(KeyValue::into_key_value)
                                .collect(),
                            _ => Vec::new(),
                        })
                        .collect();
                    Ok((ranges, header))
                }
            })
            .await
            .map_err(|f| f.into_coord(None))?;
        let mut ranges = ranges.into_iter();
        let mut next = || ranges.next().unwrap_or_default();
        Ok(([next(), next(), next()], header))
    }

    /// Starts the mirror's task on first use.
    fn start_mirror(&self) {
        if self.mirror_started.set(()).is_err() {
            return;
        }
        match EtcdCoordinator::new(self.config.clone()) {
            Ok(reader) => {
                tokio::spawn(mirror_cluster(
                    reader,
                    Arc::clone(&self.mirror),
                    Arc::downgrade(&self.alive),
                ));
            }
            Err(e) => tracing::warn!(error = %e, "cannot start the cluster mirror"),
        }
    }

    /// The config and the etcd revision it was read at.
    async fn read_config(&self) -> Result<(ConfigSnapshot, i64), CoordError> {
        let (kvs, header) = self
            .call("get_config", self.deadline(), |mut c| async move {
                let mut resp = c
                    .get(config_prefix(), Some(GetOptions::new().with_prefix()))
                    .await?;
                let header = resp.header().map_or(0, |h| h.revision());
                Ok((resp.take_kvs(), header))
            })
            .await
            .map_err(|f| f.into_coord(None))?;
        let mut snapshot = ConfigSnapshot::default();
        for kv in &kvs {
            snapshot.revision = snapshot.revision.max(revision(kv.mod_revision()));
            if let Some((key, value)) = parse_config_kv(kv) {
                snapshot.values.insert(key, value);
            }
        }
        Ok((snapshot, header))
    }

    /// The receiver of the config watch, starting the task on first use.
    fn config_watch(&self) -> Result<watch::Receiver<Arc<ConfigSnapshot>>, CoordError> {
        if let Some(rx) = self.config_watch.get() {
            return Ok(rx.clone());
        }
        // Connections of its own, so a long watch never holds up calls.
        let watcher = EtcdCoordinator::new(self.config.clone())
            .map_err(|e| CoordError::Unavailable(e.to_string()))?;
        let (tx, rx) = watch::channel(Arc::new(ConfigSnapshot::default()));
        match self.config_watch.set(rx.clone()) {
            Ok(()) => {
                tokio::spawn(watch_config(watcher, tx, Arc::downgrade(&self.alive)));
                Ok(rx)
            }
            // Another caller started it first.
            Err(_) => self
                .config_watch
                .get()
                .cloned()
                .ok_or_else(|| CoordError::Unavailable("config watch not started".into())),
        }
    }
}

/// How often the watch task checks that its coordinator still lives and
/// that a quiet watch is still connected.
const WATCH_TICK: Duration = Duration::from_secs(2);
/// A watch that brought nothing for this long is read again from scratch,
/// in case its connection died without an error.
const WATCH_RESYNC: Duration = Duration::from_secs(30);

/// Keeps `tx` up to date with the config in etcd until `alive` is gone.
async fn watch_config(
    etcd: EtcdCoordinator,
    tx: watch::Sender<Arc<ConfigSnapshot>>,
    alive: Weak<()>,
) {
    let mut failures = 0u32;
    while alive.strong_count() > 0 {
        match watch_config_once(&etcd, &tx, &alive).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::warn!(error = %e, failures, "etcd config watch failed; reading again");
                }
                tokio::time::sleep(Duration::from_millis(200).min(WATCH_TICK)).await;
            }
        }
    }
}

/// One read and one watch of the config, until the watch fails, goes quiet
/// for too long, or the coordinator is dropped.
async fn watch_config_once(
    etcd: &EtcdCoordinator,
    tx: &watch::Sender<Arc<ConfigSnapshot>>,
    alive: &Weak<()>,
) -> Result<(), String> {
    let (mut snapshot, header) = etcd.read_config().await.map_err(|e| e.to_string())?;
    publish(tx, &snapshot);
    let idx = etcd.lock().preferred;
    let mut client = etcd.client(idx).await.map_err(|e| e.to_string())?;
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(header + 1);
    let mut stream = match tokio::time::timeout(
        etcd.config.attempt_timeout,
        client.watch(config_prefix(), Some(options)),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            etcd.failed(idx, "watch_config", &e.to_string());
            return Err(e.to_string());
        }
        Err(_) => {
            etcd.failed(idx, "watch_config", "no answer");
            return Err("watch: no answer".into());
        }
    };
    let mut quiet = Duration::ZERO;
    loop {
        if alive.strong_count() == 0 {
            return Ok(());
        }
        let message = match tokio::time::timeout(WATCH_TICK, stream.message()).await {
            Err(_) => {
                quiet += WATCH_TICK;
                if quiet >= WATCH_RESYNC {
                    return Ok(());
                }
                continue;
            }
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None)) => return Err("the watch stream ended".into()),
            Ok(Err(e)) => {
                etcd.failed(idx, "watch_config", &e.to_string());
                return Err(e.to_string());
            }
        };
        quiet = Duration::ZERO;
        if message.canceled() || message.compact_revision() > 0 {
            return Err(format!(
                "the watch was cancelled ({})",
                message.cancel_reason()
            ));
        }
        let mut changed = false;
        for event in message.events() {
            let Some(kv) = event.kv() else { continue };
            snapshot.revision = snapshot.revision.max(revision(kv.mod_revision()));
            changed = true;
            match event.event_type() {
                EventType::Put => {
                    if let Some((key, value)) = parse_config_kv(kv) {
                        snapshot.values.insert(key, value);
                    }
                }
                EventType::Delete => {
                    if let Some(key) = kv
                        .key_str()
                        .ok()
                        .and_then(|k| k.strip_prefix(&config_prefix()))
                    {
                        snapshot.values.remove(key);
                    }
                }
            }
        }
        if changed {
            publish(tx, &snapshot);
        }
    }
}

/// Keeps `mirror` in step with etcd until `alive` is gone.
async fn mirror_cluster(etcd: EtcdCoordinator, mirror: Arc<Mirror>, alive: Weak<()>) {
    let mut failures = 0u32;
    while alive.strong_count() > 0 {
        let result = mirror_once(&etcd, &mirror, &alive).await;
        mirror.unsynced();
        match result {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::warn!(error = %e, failures, "etcd cluster mirror lost its watch; reading again");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Applies one watched key change to the mirror.
fn apply_event(st: &mut MirrorState, kind: EventType, kv: &KeyValue) {
    let Ok(key) = kv.key_str() else { return };
    let put = kind == EventType::Put;
    if let Some(id) = key.strip_prefix(&nodes_prefix()) {
        let Ok(id) = NodeId::parse(id) else { return };
        match serde_json::from_slice::<NodeInfo>(kv.value()) {
            Ok(info) if put => {
                st.nodes.insert(id, info);
            }
            _ => {
                st.nodes.remove(&id);
            }
        }
    } else if let Some(room) = key
        .strip_prefix(&rooms_prefix())
        .and_then(|k| k.strip_suffix("/origin"))
    {
        let Ok(room) = RoomId::parse(room) else {
            return;
        };
        match std::str::from_utf8(kv.value()).ok().map(NodeId::parse) {
            Some(Ok(node)) if put => {
                st.origins.insert(room, node);
            }
            _ => {
                st.origins.remove(&room);
            }
        }
    } else if let Some(node) = key.strip_prefix(&node_flags_prefix()) {
        let Ok(node) = NodeId::parse(node) else {
            return;
        };
        match serde_json::from_slice::<NodeFlags>(kv.value()) {
            Ok(flags) if put => {
                st.flags.insert(node, flags);
            }
            _ => {
                st.flags.remove(&node);
            }
        }
    }
}

/// One full read and one watch, until the watch fails or goes quiet.
async fn mirror_once(
    etcd: &EtcdCoordinator,
    mirror: &Mirror,
    alive: &Weak<()>,
) -> Result<(), String> {
    let ([nodes, origins, flags], header) = etcd
        .read_cluster_ranges()
        .await
        .map_err(|e| e.to_string())?;
    {
        let mut st = mirror.lock();
        st.nodes = parse_nodes(nodes)
            .into_iter()
            .map(|n| (n.id.clone(), n))
            .collect();
        st.origins = parse_origins(origins).into_iter().collect();
        st.flags = parse_flags(flags);
        st.revision = header;
        st.heard_at = Some(Instant::now());
        st.synced = true;
        st.shared = None;
    }
    mirror.revision.send_replace(header);
    let idx = etcd.lock().preferred;
    let mut client = etcd.client(idx).await.map_err(|e| e.to_string())?;
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(header + 1);
    let mut stream = match tokio::time::timeout(
        etcd.config.attempt_timeout,
        client.watch(KEY_PREFIX, Some(options)),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            etcd.failed(idx, "watch_cluster", &e.to_string());
            return Err(e.to_string());
        }
        Err(_) => {
            etcd.failed(idx, "watch_cluster", "no answer");
            return Err("watch: no answer".into());
        }
    };
    let mut progress_asked = false;
    loop {
        if alive.strong_count() == 0 {
            return Ok(());
        }
        let message = match tokio::time::timeout(Duration::from_secs(1), stream.message()).await {
            Err(_) => {
                let quiet = mirror
                    .lock()
                    .heard_at
                    .map_or(Duration::MAX, |t| t.elapsed());
                if quiet >= MIRROR_QUIET_LIMIT {
                    return Err(format!("the watch has been quiet for {quiet:?}"));
                }
                if quiet >= Duration::from_secs(2) && !progress_asked {
                    stream.request_progress().await.map_err(|e| e.to_string())?;
                    progress_asked = true;
                }
                continue;
            }
            Ok(Ok(Some(message))) => message,
            Ok(Ok(None)) => return Err("the watch stream ended".into()),
            Ok(Err(e)) => {
                etcd.failed(idx, "watch_cluster", &e.to_string());
                return Err(e.to_string());
            }
        };
        if message.canceled() || message.compact_revision() > 0 {
            return Err(format!(
                "the watch was cancelled ({})",
                message.cancel_reason()
            ));
        }
        progress_asked = false;
        let revision = {
            let mut st = mirror.lock();
            for event in message.events() {
                if let Some(kv) = event.kv() {
                    st.revision = st.revision.max(kv.mod_revision());
                    apply_event(&mut st, event.event_type(), kv);
                }
            }
            // A progress report (no events) says everything up to its
            // header's revision has been delivered.
            // (Not the creation answer: events may still follow it.)
            if message.events().is_empty()
                && !message.created()
                && let Some(h) = message.header()
            {
                st.revision = st.revision.max(h.revision());
            }
            st.heard_at = Some(Instant::now());
            st.revision
        };
        mirror.revision.send_replace(revision);
    }
}

fn publish(tx: &watch::Sender<Arc<ConfigSnapshot>>, snapshot: &ConfigSnapshot) {
    tx.send_if_modified(|current| {
        if **current == *snapshot {
            return false;
        }
        *current = Arc::new(snapshot.clone());
        true
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalized() {
        assert_eq!(
            parse_endpoints("http://127.0.0.1:2379").unwrap(),
            ["http://127.0.0.1:2379"]
        );
        assert_eq!(
            parse_endpoints(" 10.0.0.1:1 , http://etcd-2 ,10.0.0.1:1,http://[::1]:3/").unwrap(),
            ["http://10.0.0.1:1", "http://etcd-2:2379", "http://[::1]:3"]
        );
    }

    #[test]
    fn bad_endpoints_are_refused() {
        assert_eq!(parse_endpoints(" "), Err(EtcdConfigError::NoEndpoints));
        for bad in [
            "",
            "a,,b",
            "https://x:1",
            "ftp://x:1",
            "http://x:1/path",
            "http://u:p@x:1",
            "http://x:0",
            "http://x:99999",
            "http://x:",
            "http://x:abc",
            "http://",
            "not a url",
        ] {
            let err = parse_endpoints(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    EtcdConfigError::BadEndpoint { .. } | EtcdConfigError::NoEndpoints
                ),
                "{bad:?}: {err}"
            );
        }
        assert!(
            parse_endpoints("https://x:1")
                .unwrap_err()
                .to_string()
                .contains("TLS")
        );
    }

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        assert_eq!(ttl_seconds(Duration::from_secs(5)), 5);
        assert_eq!(ttl_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(ttl_seconds(Duration::from_millis(1)), 1);
        assert_eq!(ttl_seconds(Duration::ZERO), 1);
    }

    #[test]
    fn config_is_checked() {
        assert_eq!(
            EtcdCoordinator::new(EtcdConfig::new(vec![])).unwrap_err(),
            EtcdConfigError::NoEndpoints
        );
        let mut c = EtcdConfig::new(vec!["http://127.0.0.1:1".into()]);
        c.attempt_timeout = Duration::ZERO;
        assert!(matches!(
            EtcdCoordinator::new(c),
            Err(EtcdConfigError::ZeroTimeout(_))
        ));
    }

    #[test]
    fn errors_are_classified() {
        use etcd_client::Error as E;
        let lease = E::GRpcStatus(tonic::Status::not_found(
            "etcdserver: requested lease not found",
        ));
        assert_eq!(classify(&lease), Class::LeaseGone);
        assert_eq!(
            classify(&E::LeaseKeepAliveError("lease not found".into())),
            Class::LeaseGone
        );
        assert_eq!(
            classify(&E::GRpcStatus(tonic::Status::unavailable(
                "etcdserver: no leader"
            ))),
            Class::Retry
        );
        assert_eq!(
            classify(&E::GRpcStatus(tonic::Status::invalid_argument(
                "etcdserver: key is not provided"
            ))),
            Class::Fatal
        );
    }

    #[tokio::test]
    async fn an_unreachable_etcd_fails_within_the_budget() {
        // A port nothing listens on: connections are refused at once, and
        // the call gives up after its budget, not before and not much after.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut config = EtcdConfig::new(vec![format!("http://127.0.0.1:{port}")]);
        config.call_timeout = Duration::from_millis(600);
        let c = EtcdCoordinator::new(config).unwrap();
        let started = Instant::now();
        let err = c.nodes().await.unwrap_err();
        let took = started.elapsed();
        assert!(matches!(err, CoordError::Unavailable(_)), "{err}");
        assert!(took >= Duration::from_millis(500), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        // Calls that make two requests share one budget; an unknown lease
        // is not reported expired when etcd cannot say.
        let info = NodeInfo {
            id: NodeId::parse("a").unwrap(),
            region: "r".into(),
            zone: "z".into(),
            http_url: "http://a".into(),
            relay_addr: None,
            version: "v".into(),
            capacity: 1,
            draining: false,
            load: Default::default(),
        };
        let started = Instant::now();
        let err = c
            .register_node(info.clone(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, CoordError::Unavailable(_)), "{err}");
        let err = c.keep_alive(LeaseId(7), info).await.unwrap_err();
        assert!(matches!(err, CoordError::Unavailable(_)), "{err}");
        let took = started.elapsed();
        assert!(took < Duration::from_millis(2 * 600 + 800), "{took:?}");
    }
}
