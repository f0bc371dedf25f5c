//! CDNs for HLS and their failover.
//!
//! The operator configures CDNs (`cdn.endpoints` in the config center: a
//! name, a client-facing URL template with `{room}`, a weight and a health
//! probe URL). One elected control-plane replica runs the prober
//! ([`run_prober`], a singleton worker): every [`PROBE_EVERY`] it GETs each
//! CDN's probe URL with a short timeout and feeds the result to the CDN's
//! circuit breaker ([`Breaker`]):
//!
//! - **closed** → **open** after [`FAILURES_TO_OPEN`] failed probes in a row;
//! - **open** → **half-open** once [`COOL_DOWN`] has passed (no probes before);
//! - **half-open** → **closed** after one passing probe, back to **open**
//!   (a new cool-down) after a failing one.
//!
//! The prober stores each CDN's [`CdnHealth`] in the coordinator
//! (`/weir/v1/cdn-health/{name}`), and every replica reads it back every
//! [`HEALTH_READ_EVERY`] ([`watch_health`]), so all replicas rank CDNs
//! alike. `AssignViewer` appends one HLS endpoint per configured CDN after
//! the WHEP endpoints ([`rank_cdns`]): CDNs with a closed breaker first,
//! ordered by weight (a weighted shuffle driven by the viewer's draw, so one
//! viewer keeps its order), then CDNs whose breaker is open or half-open,
//! by weight. A CDN the prober has not judged yet counts as closed.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use weir_protocol::RoomId;
use weir_protocol::coordinator::{BreakerState, CdnHealth, Coordinator};

use crate::rollout::{RolloutWeights, stable_draw};
use crate::service::ControlState;

/// How often each CDN is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for a probe's answer (connect and response head).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// Failed probes in a row that open a breaker.
pub const FAILURES_TO_OPEN: u32 = 3;
/// How long an open breaker waits before the half-open probe.
pub const COOL_DOWN: Duration = Duration::from_secs(3);
/// How often every replica reads the CDNs' health from the coordinator.
pub const HEALTH_READ_EVERY: Duration = Duration::from_millis(500);
/// The prober stores a CDN's health at least this often, changed or not.
pub const STORE_AT_LEAST_EVERY: Duration = Duration::from_secs(10);
/// Most CDNs.
pub const MAX_CDNS: usize = 16;
/// Longest URL (template or probe).
pub const MAX_URL_LEN: usize = 512;

/// One configured CDN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdnConfig {
    /// Its name: 1 to 32 of `[a-z0-9-]`.
    pub name: String,
    /// Where viewers play a room: an `http://` or `https://` URL with
    /// `{room}` where the room id goes.
    pub url: String,
    /// Its share among healthy CDNs, 1 to 1000.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// An `http://` URL that answers 2xx while the CDN works.
    pub probe: String,
}

fn default_weight() -> u32 {
    1
}

impl CdnConfig {
    /// The CDN's URL for `room`.
    pub fn url_for(&self, room: &RoomId) -> String {
        self.url.replace("{room}", room.as_str())
    }
}

fn check_url(what: &str, url: &str, schemes: &[&str]) -> Result<(), String> {
    if url.len() > MAX_URL_LEN {
        return Err(format!("{what} is longer than {MAX_URL_LEN} bytes"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{what} {url:?} contains spaces or control characters"
        ));
    }
    let rest = schemes
        .iter()
        .find_map(|s| url.strip_prefix(s))
        .ok_or_else(|| format!("{what} {url:?} must start with {}", schemes.join(" or ")))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() {
        return Err(format!("{what} {url:?} names no host"));
    }
    Ok(())
}

/// Parses and checks the value of `cdn.endpoints` (a JSON list).
pub fn parse_cdns(text: &str) -> Result<Vec<CdnConfig>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let cdns: Vec<CdnConfig> = serde_json::from_str(text).map_err(|e| {
        format!("not a JSON list of {{\"name\", \"url\", \"weight\", \"probe\"}} objects: {e}")
    })?;
    if cdns.len() > MAX_CDNS {
        return Err(format!("at most {MAX_CDNS} CDNs, got {}", cdns.len()));
    }
    let mut names = std::collections::BTreeSet::new();
    for c in &cdns {
        let good_name = !c.name.is_empty()
            && c.name.len() <= 32
            && c.name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !good_name {
            return Err(format!(
                "CDN name {:?} must be 1 to 32 of a-z 0-9 -",
                c.name
            ));
        }
        if !names.insert(c.name.as_str()) {
            return Err(format!("CDN {} is given twice", c.name));
        }
        check_url(
            &format!("url of {}", c.name),
            &c.url,
            &["http://", "https://"],
        )?;
        if !c.url.contains("{room}") {
            return Err(format!(
                "url of {} must contain {{room}} where the room id goes, e.g. https://cdn.example/hls/{{room}}/master.m3u8",
                c.name
            ));
        }
        // The prober speaks plain HTTP: probe the CDN's health URL over http://.
        check_url(&format!("probe of {}", c.name), &c.probe, &["http://"])?;
        if !(1..=1000).contains(&c.weight) {
            return Err(format!(
                "weight of {} must be 1 to 1000, got {}",
                c.name, c.weight
            ));
        }
    }
    Ok(cdns)
}

/// The canonical text of a CDN list (compact JSON, in the given order).
pub fn format_cdns(cdns: &[CdnConfig]) -> String {
    // A list of plain structs of strings and numbers always serializes.
    serde_json::to_string(cdns).unwrap_or_else(|_| "[]".to_owned())
}

/// A CDN's circuit breaker: a pure state machine, time passed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaker {
    health: CdnHealth,
    failures_to_open: u32,
    cool_down_ms: u64,
}

impl Breaker {
    /// A closed breaker for `name`, or one that goes on from stored health.
    pub fn new(name: &str, stored: Option<CdnHealth>) -> Self {
        let health = stored.unwrap_or_else(|| CdnHealth {
            name: name.to_owned(),
            ..CdnHealth::default()
        });
        Self {
            health,
            failures_to_open: FAILURES_TO_OPEN,
            cool_down_ms: COOL_DOWN.as_millis() as u64,
        }
    }

    /// The same breaker with other thresholds (tests).
    pub fn with_limits(mut self, failures_to_open: u32, cool_down: Duration) -> Self {
        self.failures_to_open = failures_to_open.max(1);
        self.cool_down_ms = cool_down.as_millis() as u64;
        self
    }

    /// What it knows now.
    pub fn health(&self) -> &CdnHealth {
        &self.health
    }

    /// Whether to probe at `now_ms`: always, except while open before the
    /// cool-down is over (then it turns half-open and probes).
    pub fn should_probe(&mut self, now_ms: u64) -> bool {
        if self.health.state == BreakerState::Open {
            if now_ms.saturating_sub(self.health.changed_ms) < self.cool_down_ms {
                return false;
            }
            self.set_state(BreakerState::HalfOpen, now_ms);
        }
        true
    }

    /// Takes a probe's result; returns whether the state changed.
    pub fn record(&mut self, now_ms: u64, result: Result<(), String>) -> bool {
        let before = self.health.state;
        self.health.probed_ms = now_ms;
        match result {
            Ok(()) => {
                self.health.consecutive_failures = 0;
                self.health.last_error.clear();
                if before != BreakerState::Closed {
                    self.set_state(BreakerState::Closed, now_ms);
                }
            }
            Err(e) => {
                self.health.consecutive_failures =
                    self.health.consecutive_failures.saturating_add(1);
                self.health.last_error = e;
                let open = match before {
                    BreakerState::Closed => {
                        self.health.consecutive_failures >= self.failures_to_open
                    }
                    // A failed trial probe opens it again for a new cool-down.
                    BreakerState::HalfOpen | BreakerState::Open => true,
                };
                if open {
                    self.set_state(BreakerState::Open, now_ms);
                }
            }
        }
        self.health.state != before
    }

    fn set_state(&mut self, state: BreakerState, now_ms: u64) {
        self.health.state = state;
        self.health.changed_ms = now_ms;
    }
}

/// The CDNs' health as this replica last read it, by name.
#[derive(Debug, Default)]
pub struct CdnHealthCell {
    current: RwLock<Arc<BTreeMap<String, CdnHealth>>>,
}

impl CdnHealthCell {
    /// The health now.
    pub fn get(&self) -> Arc<BTreeMap<String, CdnHealth>> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Replaces what is known; returns whether any breaker state changed.
    pub fn set(&self, health: impl IntoIterator<Item = CdnHealth>) -> bool {
        let next: BTreeMap<String, CdnHealth> =
            health.into_iter().map(|h| (h.name.clone(), h)).collect();
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = next.len() != current.len()
            || next
                .iter()
                .any(|(k, h)| current.get(k).map(|c| c.state) != Some(h.state));
        *current = Arc::new(next);
        changed
    }

    /// Replaces what is known of one CDN.
    pub fn update(&self, health: CdnHealth) {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = (**current).clone();
        next.insert(health.name.clone(), health);
        *current = Arc::new(next);
    }
}

/// The state the ranking uses: what is stored, closed when nothing is.
fn state_of(health: &BTreeMap<String, CdnHealth>, name: &str) -> BreakerState {
    health.get(name).map_or(BreakerState::Closed, |h| h.state)
}

/// The CDNs in the order a viewer should try them (see the module docs):
/// closed breakers first in a weighted order drawn from `draw`, then the
/// others by weight (then name).
pub fn rank_cdns<'c>(
    cdns: &'c [CdnConfig],
    health: &BTreeMap<String, CdnHealth>,
    draw: u64,
) -> Vec<&'c CdnConfig> {
    let (mut healthy, mut failing): (Vec<&CdnConfig>, Vec<&CdnConfig>) = cdns
        .iter()
        .partition(|c| state_of(health, &c.name) == BreakerState::Closed);
    let mut ranked = Vec::with_capacity(cdns.len());
    // A weighted shuffle: each place drawn by weight among those left.
    let mut round = 0u64;
    while !healthy.is_empty() {
        let wheel: Vec<(&str, u32)> = healthy
            .iter()
            .map(|c| (c.name.as_str(), c.weight))
            .collect();
        let d = if round == 0 {
            draw
        } else {
            stable_draw(&format!("{draw}/{round}"))
        };
        let name = RolloutWeights::pick(&wheel, d).unwrap_or(wheel[0].0);
        let at = healthy.iter().position(|c| c.name == name).unwrap_or(0);
        ranked.push(healthy.remove(at));
        round += 1;
    }
    failing.sort_by(|a, b| b.weight.cmp(&a.weight).then_with(|| a.name.cmp(&b.name)));
    ranked.extend(failing);
    ranked
}

/// Reads the CDNs' health from the coordinator into `cell` every
/// [`HEALTH_READ_EVERY`], forever (spawn it). Keeps the last reading while
/// the coordinator does not answer.
pub async fn watch_health(coordinator: Arc<dyn Coordinator>, cell: Arc<CdnHealthCell>) {
    let mut tick = tokio::time::interval(HEALTH_READ_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    loop {
        tick.tick().await;
        match tokio::time::timeout(
            crate::service::COORDINATOR_TIMEOUT,
            coordinator.cdn_health(),
        )
        .await
        {
            Ok(Ok(health)) => {
                failures = 0;
                for h in &health {
                    metrics::gauge!("weir_cdn_breaker_state", "cdn" => h.name.clone())
                        .set(state_number(h.state));
                }
                if cell.set(health) {
                    tracing::debug!("CDN health changed");
                }
            }
            Ok(Err(e)) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(120) {
                    tracing::warn!(error = %e, "cannot read CDN health; keeping the last reading");
                }
            }
            Err(_) => failures += 1,
        }
    }
}

/// The breaker state as a gauge value: 0 closed, 1 half-open, 2 open.
fn state_number(state: BreakerState) -> f64 {
    match state {
        BreakerState::Closed => 0.0,
        BreakerState::HalfOpen => 1.0,
        BreakerState::Open => 2.0,
    }
}

/// The prober's HTTP client: plain HTTP/1.1, a fresh connection per probe
/// (a pooled connection would hide a CDN that stopped accepting new ones).
type ProbeClient = Client<HttpConnector, Empty<Bytes>>;

fn probe_client() -> ProbeClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(PROBE_TIMEOUT));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector)
}

/// One probe: GET `url`, a 2xx answer within [`PROBE_TIMEOUT`] passes.
async fn probe(client: &ProbeClient, url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad probe URL: {e}"))?;
    let request = http::Request::get(uri)
        .header(http::header::USER_AGENT, "weir-cdn-prober")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad probe request: {e}"))?;
    match tokio::time::timeout(PROBE_TIMEOUT, client.request(request)).await {
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
        Ok(Err(e)) => Err(crate::ctl::error_chain(&e)),
        Ok(Ok(response)) if response.status().is_success() => Ok(()),
        Ok(Ok(response)) => Err(format!("answered HTTP {}", response.status().as_u16())),
    }
}

/// The CDN prober, run by the leader of the singleton workers until it is
/// aborted (see the module docs).
pub async fn run_prober(state: Arc<ControlState>) {
    let client = probe_client();
    let coordinator = Arc::clone(state.coordinator());
    // Go on from what the last prober stored, so a change of leader does not
    // close an open breaker.
    let stored: BTreeMap<String, CdnHealth> = coordinator
        .cdn_health()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|h| (h.name.clone(), h))
        .collect();
    let mut breakers: BTreeMap<String, Breaker> = BTreeMap::new();
    let mut last_put: BTreeMap<String, u64> = BTreeMap::new();
    let mut stored = stored;
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!("CDN prober started");
    loop {
        tick.tick().await;
        let cdns = state.live_config().cdns;
        breakers.retain(|name, _| cdns.iter().any(|c| &c.name == name));
        last_put.retain(|name, _| breakers.contains_key(name));
        let now = crate::store::unix_ms();
        let mut probes = tokio::task::JoinSet::new();
        for cdn in cdns.iter() {
            let breaker = breakers
                .entry(cdn.name.clone())
                .or_insert_with(|| Breaker::new(&cdn.name, stored.remove(&cdn.name)));
            if breaker.should_probe(now) {
                let (client, name, url) = (client.clone(), cdn.name.clone(), cdn.probe.clone());
                probes.spawn(async move { (name, probe(&client, &url).await) });
            }
        }
        while let Some(done) = probes.join_next().await {
            let Ok((name, result)) = done else { continue };
            let Some(breaker) = breakers.get_mut(&name) else {
                continue;
            };
            metrics::counter!("weir_cdn_probes_total", "cdn" => name.clone()).increment(1);
            if let Err(e) = &result {
                metrics::counter!("weir_cdn_probe_failures_total", "cdn" => name.clone())
                    .increment(1);
                tracing::debug!(cdn = %name, error = %e, "CDN probe failed");
            }
            let before = breaker.health().clone();
            let now = crate::store::unix_ms();
            if breaker.record(now, result) {
                let h = breaker.health();
                tracing::warn!(cdn = %name, state = h.state.as_str(), failures = h.consecutive_failures, error = %h.last_error, "CDN breaker changed");
            }
            // Stored when more than the probe time changed, and every
            // STORE_AT_LEAST_EVERY as a sign of life.
            let h = breaker.health().clone();
            let moved = CdnHealth {
                probed_ms: before.probed_ms,
                ..h.clone()
            } != before;
            let due = last_put.get(&name).is_none_or(|at| {
                now.saturating_sub(*at) >= STORE_AT_LEAST_EVERY.as_millis() as u64
            });
            metrics::gauge!("weir_cdn_breaker_state", "cdn" => name.clone())
                .set(state_number(h.state));
            if moved || due {
                match coordinator.put_cdn_health(&h).await {
                    Ok(()) => {
                        last_put.insert(name, now);
                    }
                    Err(e) => tracing::warn!(cdn = %name, error = %e, "cannot store CDN health"),
                }
            }
            // After the write, so this replica's next read of the
            // coordinator cannot undo it.
            state.cdn_health_cell().update(h);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cdn(name: &str, weight: u32) -> CdnConfig {
        CdnConfig {
            name: name.into(),
            url: format!("https://{name}.example/hls/{{room}}/master.m3u8"),
            weight,
            probe: format!("http://{name}.example/healthz"),
        }
    }

    #[test]
    fn the_config_is_checked_and_canonical() {
        let text = r#" [ {"name":"a","url":"https://a.example/hls/{room}/master.m3u8","probe":"http://a.example/healthz"},
            {"name":"b-2","url":"http://127.0.0.1:1/hls/{room}/master.m3u8","weight":3,"probe":"http://127.0.0.1:1/healthz"} ] "#;
        let cdns = parse_cdns(text).unwrap();
        assert_eq!(cdns.len(), 2);
        assert_eq!(cdns[0].weight, 1);
        let canonical = format_cdns(&cdns);
        assert_eq!(parse_cdns(&canonical).unwrap(), cdns);
        assert_eq!(parse_cdns("").unwrap(), vec![]);
        assert_eq!(parse_cdns("[]").unwrap(), vec![]);
        let room = RoomId::parse("lobby").unwrap();
        assert_eq!(
            cdns[0].url_for(&room),
            "https://a.example/hls/lobby/master.m3u8"
        );
        let one = |fields: &str| format!("[{{{fields}}}]");
        for (bad, want) in [
            ("{", "not a JSON list"),
            (r#"{"name":"a"}"#, "not a JSON list"),
            (
                &one(r#""name":"A","url":"http://a/{room}","probe":"http://a/""#),
                "a-z 0-9",
            ),
            (
                &one(r#""name":"a","url":"http://a/x","probe":"http://a/""#),
                "{room}",
            ),
            (
                &one(r#""name":"a","url":"ftp://a/{room}","probe":"http://a/""#),
                "must start with",
            ),
            (
                &one(r#""name":"a","url":"http://a/{room}","probe":"https://a/""#),
                "probe of a",
            ),
            (
                &one(r#""name":"a","url":"http:///{room}","probe":"http://a/""#),
                "no host",
            ),
            (
                &one(r#""name":"a","url":"http://a/{room}","probe":"http://a/","weight":0"#),
                "weight of a",
            ),
            (
                &one(r#""name":"a","url":"http://a/{room}","probe":"http://a/","extra":1"#),
                "unknown field",
            ),
            (
                &format!(
                    "[{},{}]",
                    format_cdns(&[cdn("a", 1)]).trim_matches(['[', ']']),
                    format_cdns(&[cdn("a", 1)]).trim_matches(['[', ']'])
                ),
                "given twice",
            ),
        ] {
            let err = parse_cdns(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn the_breaker_opens_cools_down_and_closes() {
        let mut b = Breaker::new("a", None).with_limits(3, Duration::from_secs(3));
        assert_eq!(b.health().state, BreakerState::Closed);
        assert!(b.should_probe(1_000));
        assert!(!b.record(1_000, Err("refused".into())));
        assert!(!b.record(2_000, Err("refused".into())));
        // A pass in between starts the count again.
        assert!(!b.record(3_000, Ok(())));
        assert!(!b.record(4_000, Err("refused".into())));
        assert!(!b.record(5_000, Err("refused".into())));
        assert!(b.record(6_000, Err("refused".into())));
        assert_eq!(b.health().state, BreakerState::Open);
        assert_eq!(b.health().consecutive_failures, 3);
        assert_eq!(b.health().last_error, "refused");
        // No probes during the cool-down.
        assert!(!b.should_probe(7_000));
        assert!(!b.should_probe(8_999));
        // Then one trial probe; it fails: open again, a new cool-down.
        assert!(b.should_probe(9_000));
        assert_eq!(b.health().state, BreakerState::HalfOpen);
        assert!(b.record(9_100, Err("timeout".into())));
        assert_eq!(b.health().state, BreakerState::Open);
        assert!(!b.should_probe(12_000));
        // The next trial passes: closed.
        assert!(b.should_probe(12_100));
        assert!(b.record(12_200, Ok(())));
        assert_eq!(b.health().state, BreakerState::Closed);
        assert_eq!(b.health().consecutive_failures, 0);
        assert!(b.health().last_error.is_empty());
        // Stored health carries on.
        let again = Breaker::new("a", Some(b.health().clone()));
        assert_eq!(again.health(), b.health());
    }

    fn health(name: &str, state: BreakerState) -> CdnHealth {
        CdnHealth {
            name: name.into(),
            state,
            ..CdnHealth::default()
        }
    }

    fn names(ranked: &[&CdnConfig]) -> Vec<String> {
        ranked.iter().map(|c| c.name.clone()).collect()
    }

    #[test]
    fn failing_cdns_go_to_the_back() {
        let cdns = [cdn("a", 5), cdn("b", 1), cdn("c", 1)];
        let mut h = BTreeMap::new();
        // Unknown health counts as closed: all three in front.
        assert_eq!(rank_cdns(&cdns, &h, 0).len(), 3);
        h.insert("a".into(), health("a", BreakerState::Open));
        h.insert("c".into(), health("c", BreakerState::HalfOpen));
        for d in [0, u64::MAX / 3, u64::MAX] {
            assert_eq!(names(&rank_cdns(&cdns, &h, d)), ["b", "a", "c"]);
        }
        h.insert("b".into(), health("b", BreakerState::Open));
        assert_eq!(names(&rank_cdns(&cdns, &h, 0)), ["a", "b", "c"]);
    }

    #[test]
    fn healthy_cdns_share_viewers_by_weight() {
        let cdns = [cdn("a", 3), cdn("b", 1)];
        let h = BTreeMap::new();
        let first_a = (0..4000)
            .filter(|i| rank_cdns(&cdns, &h, stable_draw(&format!("viewer-{i}")))[0].name == "a")
            .count();
        assert!((2800..=3200).contains(&first_a), "{first_a}");
        // One viewer, one order.
        let d = stable_draw("viewer-7");
        assert_eq!(
            names(&rank_cdns(&cdns, &h, d)),
            names(&rank_cdns(&cdns, &h, d))
        );
    }
}
