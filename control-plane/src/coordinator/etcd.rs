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
//! Retried writes are safe to repeat: a claim that landed but whose answer was
//! lost finds the node's own id on the retry; a lease granted by a lost
//! attempt just expires; a revoke retried after it landed reports the lease
//! as expired.

use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use weir_protocol::coordinator::{
    CoordError, Coordinator, KEY_PREFIX, LeaseId, NodeInfo, node_key, room_origin_key,
};
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
        let mut nodes: Vec<NodeInfo> = self
            .list("list_nodes", nodes_prefix())
            .await?
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
        Ok(nodes)
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

    async fn room_origins(&self) -> Result<Vec<(RoomId, NodeId)>, CoordError> {
        let prefix = rooms_prefix();
        let mut origins: Vec<(RoomId, NodeId)> = self
            .list("list_origins", prefix.clone())
            .await?
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
        Ok(origins)
    }
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
