//! `weir loadtest gifts`: paid gifts under load. N concurrent senders, each
//! a fresh user of this run with a funded wallet (`Wallet.Grant`, so the
//! control plane must allow grants) and a play token of its room (minted
//! through `Tokens.MintToken`, so it must allow minting), send gifts over
//! gRPC (`Wallet.SendGift`) to rooms this run creates, each gift with a key
//! of its own. `--retry-ratio` re-sends that share of the gifts with the
//! same key right after they were paid (the idempotent path: answered from
//! the first send, nothing charged). The run stops after `--duration`
//! seconds or `--count` gifts, whichever comes first.
//!
//! Measures committed gifts per second, send latency percentiles
//! (hdrhistogram) of paid gifts and of replays apart, and errors by gRPC
//! code. A send whose outcome is unknown (timeout, lost connection) is
//! re-sent with its key after the run, which tells whether it was paid; so
//! the run knows exactly which gifts were paid, and then checks that the
//! server agrees: every sender's balance is the grant minus what it paid,
//! its ledger holds one gift row per paid gift and sums to its balance,
//! each room's owner (a user of the run per room, like a streamer) received
//! what was paid in that room, and each room's leaderboard counts the run's
//! gifts. Last it reads the control plane's `weir_outbox_pending`
//! gauge until the outbox relay has published the run's gift events.
//!
//! It talks only to the control plane it is given, and only to users and
//! rooms it created (named `PREFIX-RUN-…`, RUN fresh per run).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use weir_protocol::pb;
use weir_protocol::pb::rooms_client::RoomsClient;
use weir_protocol::pb::tokens_client::TokensClient;
use weir_protocol::pb::users_client::UsersClient;
use weir_protocol::pb::wallet_client::WalletClient;

use crate::{Percentiles, percentiles};

/// Most senders one run may start.
pub const MAX_SENDERS: u32 = 2000;
/// Most rooms one run may create.
pub const MAX_ROOMS: u32 = 1000;
/// Longest sending phase, in seconds.
pub const MAX_DURATION_SECS: u64 = 600;
/// Most gifts one run may send.
pub const MAX_COUNT: u64 = 10_000_000;
/// Most gRPC connections one run may open.
pub const MAX_CONNECTIONS: u32 = 256;
/// Longest `--prefix`: user and room ids have at most 64 characters.
const MAX_PREFIX_LEN: usize = 32;
/// Sending phase when neither --duration nor --count is given.
const DEFAULT_DURATION_SECS: u64 = 10;
/// What each sender is granted: `Wallet.Grant`'s most (10^12), so no run
/// bounded by the limits above runs a wallet dry at any catalogue price.
const GRANT: i64 = 1_000_000_000_000;
/// Setup calls (users, grants, tokens) in flight at once.
const SETUP_CONCURRENCY: usize = 16;
/// How long connecting to the control plane may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause of a sender after a failed send, so a control plane that refuses
/// everything is not spun against.
const ERROR_PAUSE: Duration = Duration::from_millis(20);
/// Sends of unknown outcome re-sent after the run, at most (beyond that
/// the check is reported inexact).
const MAX_RESOLVE: usize = 10_000;
/// Tries per unknown send when resolving it.
const RESOLVE_TRIES: u32 = 3;
/// Error messages kept for the report.
const ERROR_SAMPLES: usize = 10;
/// The outbox wait gives up when the pending count has not moved for this long.
const OUTBOX_STALL: Duration = Duration::from_secs(5);
/// The gauge the outbox relay keeps (see control-plane/src/outbox.rs).
const OUTBOX_GAUGE: &str = "weir_outbox_pending";
/// Ledger rows per page when verifying (the API's most).
const LEDGER_PAGE: u32 = 500;
/// The leaderboard's most entries: rooms with more senders are checked
/// through the senders' ledgers only.
const MAX_LEADERBOARD: u32 = 100;

/// `weir loadtest gifts` options.
#[derive(Debug, Clone, clap::Args)]
pub struct GiftsArgs {
    /// Control plane gRPC URL (`http://HOST:PORT`). It must allow grants and
    /// token minting: `weir control --allow-grants --allow-token-minting`
    /// (or `weir dev`).
    #[arg(long, env = "WEIR_CONTROL", default_value = "http://127.0.0.1:7000")]
    pub control: String,
    /// Concurrent senders, each a user of its own with a funded wallet
    /// (at most 2000).
    #[arg(long, default_value_t = 64)]
    pub senders: u32,
    /// Rooms the gifts go to (sender i gives in room i mod ROOMS), each
    /// owned by a user of its own, whose balance every gift in the room
    /// credits (at most 1000 and at most --senders).
    #[arg(long, default_value_t = 1)]
    pub rooms: u32,
    /// Seconds of sending (at most 600; 10 when --count is not given either).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Stop after this many gifts in all (retries not counted; at most 10^7).
    #[arg(long)]
    pub count: Option<u64>,
    /// Catalogue gift to send (default: the cheapest).
    #[arg(long)]
    pub gift: Option<String>,
    /// Items per gift (1 to 9999).
    #[arg(long, default_value_t = 1)]
    pub gift_count: u32,
    /// Share of paid gifts re-sent at once with the same idempotency key,
    /// to measure the idempotent path (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub retry_ratio: f64,
    /// HTTP/2 connections the senders share (sender i uses i mod N).
    #[arg(long, default_value_t = 4)]
    pub connections: u32,
    /// How long one send may take before its outcome counts as unknown, ms.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// Start of the names of this run's users and rooms (`PREFIX-RUN-…`).
    #[arg(long, default_value = "ltg")]
    pub prefix: String,
    /// Do not check the server's balances, ledgers and leaderboards afterwards.
    #[arg(long)]
    pub no_verify: bool,
    /// Seconds to wait after the run for the outbox relay to publish every
    /// pending gift event (0: do not wait; it stops earlier when nothing
    /// moves for 5 s, as without a room bus).
    #[arg(long, default_value_t = 30)]
    pub outbox_wait: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The checked shape of a run.
#[derive(Debug, Clone)]
struct Plan {
    duration: Duration,
    count: Option<u64>,
    timeout: Duration,
}

impl GiftsArgs {
    /// Checks every bound before any traffic.
    fn plan(&self) -> anyhow::Result<Plan> {
        if self.senders == 0 || self.senders > MAX_SENDERS {
            bail!("--senders must be between 1 and {MAX_SENDERS}");
        }
        if self.rooms == 0 || self.rooms > MAX_ROOMS || self.rooms > self.senders {
            bail!("--rooms must be between 1 and min({MAX_ROOMS}, --senders)");
        }
        let duration = match (self.duration, self.count) {
            (Some(d), _) if d == 0 || d > MAX_DURATION_SECS => {
                bail!("--duration must be between 1 and {MAX_DURATION_SECS} seconds")
            }
            (Some(d), _) => d,
            // A count alone is still bounded in time.
            (None, Some(_)) => MAX_DURATION_SECS,
            (None, None) => DEFAULT_DURATION_SECS,
        };
        if let Some(c) = self.count
            && (c == 0 || c > MAX_COUNT)
        {
            bail!("--count must be between 1 and {MAX_COUNT}");
        }
        if !(self.retry_ratio.is_finite() && (0.0..=1.0).contains(&self.retry_ratio)) {
            bail!("--retry-ratio must be between 0 and 1");
        }
        if self.gift_count == 0 || self.gift_count > 9999 {
            bail!("--gift-count must be between 1 and 9999");
        }
        if let Some(g) = &self.gift
            && (g.is_empty() || g.len() > 64)
        {
            bail!("--gift: a catalogue gift id (`weir ctl wallet gifts` lists them)");
        }
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            bail!("--connections must be between 1 and {MAX_CONNECTIONS}");
        }
        if self.timeout_ms == 0 || self.timeout_ms > 60_000 {
            bail!("--timeout-ms must be between 1 and 60000");
        }
        if self.outbox_wait > MAX_DURATION_SECS {
            bail!("--outbox-wait must be at most {MAX_DURATION_SECS} seconds");
        }
        if self.prefix.is_empty()
            || self.prefix.len() > MAX_PREFIX_LEN
            || !self
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("--prefix: 1 to {MAX_PREFIX_LEN} of A-Z a-z 0-9 - _");
        }
        if !self.control.starts_with("http://") && !self.control.starts_with("https://") {
            bail!("--control: the control plane's gRPC URL, http://HOST:PORT");
        }
        Ok(Plan {
            duration: Duration::from_secs(duration),
            count: self.count,
            timeout: Duration::from_millis(self.timeout_ms),
        })
    }
}

/// The outcome of the sends whose answer was lost, resolved after the run
/// by re-sending them with their keys.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ResolveReport {
    /// Sends whose outcome was unknown during the run.
    pub unknown: u64,
    /// Of them: paid during the run (the re-send was a replay).
    pub paid_in_run: u64,
    /// Paid only by the re-send (so after the measured phase; not in
    /// `committed`).
    pub paid_on_resolve: u64,
    /// Refused by the re-send: never paid.
    pub not_paid: u64,
    /// Still unknown after the re-sends: the check below cannot be exact.
    pub still_unknown: u64,
}

/// What the outbox relay did after the run, from the control plane's
/// `weir_outbox_pending` gauge (all pending gift events, not only this run's).
#[derive(Debug, Clone, Serialize, Default)]
pub struct OutboxReport {
    /// Pending right after the sending phase (None: no gauge to read).
    pub pending_at_end: Option<u64>,
    /// Time from the end of the sending phase until none was pending.
    pub drained_ms: Option<u64>,
    /// Pending when the wait ended.
    pub pending_after_wait: Option<u64>,
}

/// The server's state against what the run knows it paid.
#[derive(Debug, Clone, Serialize, Default)]
pub struct VerifyReport {
    /// True when every check below held (and no outcome stayed unknown).
    pub consistent: bool,
    pub senders_checked: u32,
    /// Sum of the senders' balances (expected: grants minus paid).
    pub senders_balance: i64,
    /// What the rooms' owners hold together (expected: all paid; they
    /// start at 0).
    pub owners_balance: i64,
    /// Gift rows in the senders' ledgers (expected: gifts paid).
    pub ledger_gift_rows: u64,
    /// Rooms whose leaderboard was compared (those with at most 100 senders).
    pub leaderboards_checked: u32,
    /// What did not match, at most 20.
    pub mismatches: Vec<String>,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct GiftsReport {
    pub control: String,
    /// The names of this run's users and rooms start with `PREFIX-RUN-`.
    pub run: String,
    pub senders: u32,
    pub rooms: u32,
    pub connections: u32,
    pub gift: String,
    pub price: i64,
    pub gift_count: u32,
    pub retry_ratio: f64,
    /// Length of the sending phase, seconds.
    pub duration_s: f64,
    /// "duration" or "count".
    pub stopped_by: String,
    /// Gifts sent with a new key.
    pub attempts: u64,
    /// Of them, paid (answered, or resolved as paid in the run).
    pub committed: u64,
    pub committed_per_s: f64,
    /// Total charged for the committed gifts.
    pub amount: i64,
    /// Send latency of gifts answered as paid, ms.
    pub latency_ms: Option<Percentiles>,
    /// Re-sends with a used key (--retry-ratio) answered as replays.
    pub replays: u64,
    pub replay_latency_ms: Option<Percentiles>,
    /// Re-sends that were not answered as the first send (paid again, or
    /// another gift id): a bug of the idempotent path.
    pub replay_mismatches: u64,
    /// New keys answered as replays: a bug, or a key used before.
    pub unexpected_replays: u64,
    /// Failed sends by gRPC code (client-side timeouts as DEADLINE_EXCEEDED).
    pub errors: BTreeMap<String, u64>,
    pub error_samples: Vec<String>,
    pub resolve: ResolveReport,
    pub outbox: OutboxReport,
    pub verify: Option<VerifyReport>,
}

impl GiftsReport {
    /// No failed send, no idempotency bug, and the server agrees.
    pub fn clean(&self) -> bool {
        self.errors.is_empty()
            && self.replay_mismatches == 0
            && self.unexpected_replays == 0
            && self.verify.as_ref().is_none_or(|v| v.consistent)
    }
}

/// One sender's identity.
#[derive(Debug, Clone)]
struct Sender {
    user: String,
    room: String,
    /// `Bearer <play token of room>`.
    bearer: MetadataValue<tonic::metadata::Ascii>,
}

/// A send whose outcome the sender did not learn.
#[derive(Debug, Clone)]
struct Unknown {
    sender: usize,
    key: String,
}

/// What one sender did.
#[derive(Debug)]
struct SenderOutcome {
    attempts: u64,
    committed: u64,
    amount: i64,
    replays: u64,
    replay_mismatches: u64,
    unexpected_replays: u64,
    latency: Histogram<u64>,
    replay_latency: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    error_samples: Vec<String>,
    unknown: Vec<Unknown>,
}

impl SenderOutcome {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            attempts: 0,
            committed: 0,
            amount: 0,
            replays: 0,
            replay_mismatches: 0,
            unexpected_replays: 0,
            latency: latency_histogram()?,
            replay_latency: latency_histogram()?,
            errors: BTreeMap::new(),
            error_samples: Vec::new(),
            unknown: Vec::new(),
        })
    }

    fn error(&mut self, code: tonic::Code, message: &str) {
        *self.errors.entry(code_name(code)).or_default() += 1;
        if self.error_samples.len() < ERROR_SAMPLES {
            self.error_samples
                .push(format!("{}: {message}", code_name(code)));
        }
    }
}

/// Microseconds from 1 µs to a minute (beyond: counted as a minute).
fn latency_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// The gRPC code as the protocol spells it (`DEADLINE_EXCEEDED`).
fn code_name(code: tonic::Code) -> String {
    let camel = format!("{code:?}");
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Whether a failed send may still have been paid: everything but the
/// answers the server gives before writing anything.
fn outcome_unknown(code: tonic::Code) -> bool {
    use tonic::Code::*;
    !matches!(
        code,
        InvalidArgument
            | NotFound
            | AlreadyExists
            | PermissionDenied
            | Unauthenticated
            | FailedPrecondition
            | OutOfRange
            | Unimplemented
            | ResourceExhausted
    )
}

/// A fresh run id: 8 hex digits from the clock and the process id.
fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let mixed = nanos ^ (u64::from(std::process::id()) << 32);
    format!("{:08x}", (mixed ^ (mixed >> 29)) as u32)
}

fn bearer(token: &str) -> anyhow::Result<MetadataValue<tonic::metadata::Ascii>> {
    format!("Bearer {token}")
        .parse()
        .context("the minted token is not a valid header value")
}

/// `req` with the sender's token and a deadline.
fn authorized<T>(
    message: T,
    bearer: &MetadataValue<tonic::metadata::Ascii>,
    timeout: Duration,
) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert("authorization", bearer.clone());
    req.set_timeout(timeout);
    req
}

/// A failed setup call, with a hint where the control plane's flags are why.
fn setup_error(what: &str, status: tonic::Status) -> anyhow::Error {
    let hint = match (status.code(), what) {
        (tonic::Code::PermissionDenied, w) if w.starts_with("grant") => {
            " (start the control plane with --allow-grants, or use `weir dev`)"
        }
        (tonic::Code::PermissionDenied, w) if w.starts_with("mint") => {
            " (start the control plane with --allow-token-minting, or use `weir dev`)"
        }
        (tonic::Code::FailedPrecondition | tonic::Code::Unavailable, _) => {
            " (the control plane needs its business store)"
        }
        _ => "",
    };
    anyhow::anyhow!(
        "{what}: {} {}{hint}",
        code_name(status.code()),
        status.message()
    )
}

async fn connect(url: &str, timeout: Duration) -> anyhow::Result<Channel> {
    Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("--control: invalid URL {url:?}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to the control plane at {url}"))
}

/// Everything a run needs, created on the control plane.
struct Setup {
    run: String,
    gift: String,
    price: i64,
    /// Per room: (room, its owner, a token of the owner's).
    rooms: Vec<(String, String, MetadataValue<tonic::metadata::Ascii>)>,
    senders: Vec<Sender>,
}

async fn setup(args: &GiftsArgs, channel: &Channel) -> anyhow::Result<Setup> {
    let run = run_id();
    let base = format!("{}-{run}", args.prefix);
    let mut wallet = WalletClient::new(channel.clone());
    let catalogue = wallet
        .list_gift_catalogue(pb::ListGiftCatalogueRequest {})
        .await
        .map_err(|s| setup_error("gift catalogue", s))?
        .into_inner()
        .gifts;
    let chosen = match &args.gift {
        Some(id) => catalogue.iter().find(|g| &g.id == id).with_context(|| {
            let ids: Vec<&str> = catalogue.iter().map(|g| g.id.as_str()).collect();
            format!("--gift {id}: not in the catalogue ({})", ids.join(", "))
        })?,
        None => catalogue
            .iter()
            .min_by_key(|g| g.price)
            .context("the gift catalogue is empty")?,
    };
    let (gift, price) = (chosen.id.clone(), chosen.price);

    // Tokens outlive the run and the checks after it.
    let ttl = u32::try_from(args.duration.unwrap_or(MAX_DURATION_SECS) + 3600).unwrap_or(7200);
    let mint = |room: String, subject: String| {
        let mut tokens = TokensClient::new(channel.clone());
        async move {
            let t = tokens
                .mint_token(pb::MintTokenRequest {
                    room,
                    mode: "play".into(),
                    subject: subject.clone(),
                    ttl_seconds: ttl,
                })
                .await
                .map_err(|s| setup_error(&format!("mint a play token for {subject}"), s))?
                .into_inner()
                .token;
            bearer(&t)
        }
    };
    let rooms: Vec<(String, String, MetadataValue<tonic::metadata::Ascii>)> =
        futures::stream::iter(0..args.rooms)
            .map(|j| {
                let room = format!("{base}-r{j}");
                let owner = format!("{base}-o{j}");
                let mut users = UsersClient::new(channel.clone());
                let mut rooms = RoomsClient::new(channel.clone());
                let mint = &mint;
                let run = &run;
                async move {
                    users
                        .create_user(pb::CreateUserRequest {
                            id: owner.clone(),
                            name: format!("loadtest room owner {j}"),
                        })
                        .await
                        .map_err(|s| setup_error(&format!("create user {owner}"), s))?;
                    rooms
                        .create_room(pb::CreateRoomRequest {
                            id: room.clone(),
                            owner: owner.clone(),
                            title: format!("gifts load test {run}"),
                            scheduled_start_unix_ms: None,
                        })
                        .await
                        .map_err(|s| setup_error(&format!("create room {room}"), s))?;
                    let bearer = mint(room.clone(), owner.clone()).await?;
                    Ok::<_, anyhow::Error>((room, owner, bearer))
                }
            })
            .buffered(SETUP_CONCURRENCY)
            .try_collect()
            .await?;
    let senders: Vec<Sender> = futures::stream::iter(0..args.senders as usize)
        .map(|i| {
            let user = format!("{base}-u{i}");
            let room = rooms[i % rooms.len()].0.clone();
            let mut users = UsersClient::new(channel.clone());
            let mut wallet = WalletClient::new(channel.clone());
            let mint = &mint;
            let run = &run;
            async move {
                users
                    .create_user(pb::CreateUserRequest {
                        id: user.clone(),
                        name: format!("loadtest sender {i}"),
                    })
                    .await
                    .map_err(|s| setup_error(&format!("create user {user}"), s))?;
                wallet
                    .grant(pb::GrantRequest {
                        user: user.clone(),
                        amount: GRANT,
                        idempotency_key: format!("{run}-grant-{i}"),
                    })
                    .await
                    .map_err(|s| setup_error(&format!("grant to {user}"), s))?;
                let bearer = mint(room.clone(), user.clone()).await?;
                Ok::<_, anyhow::Error>(Sender { user, room, bearer })
            }
        })
        .buffered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    Ok(Setup {
        run,
        gift,
        price,
        rooms,
        senders,
    })
}

/// Shared state of the sending phase.
struct Phase {
    deadline: Instant,
    /// Gifts still to send when the run is bounded by a count.
    budget: Option<AtomicU64>,
    /// Set when the count is spent.
    count_reached: AtomicBool,
    timeout: Duration,
    retry_ratio: f64,
    gift: String,
    gift_count: u32,
    run: String,
}

impl Phase {
    /// Whether one more new gift may be sent.
    fn take(&self) -> bool {
        if Instant::now() >= self.deadline {
            return false;
        }
        match &self.budget {
            None => true,
            Some(left) => {
                let ok = left
                    .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                    .is_ok();
                if !ok {
                    self.count_reached.store(true, Relaxed);
                }
                ok
            }
        }
    }
}

fn gift_request(phase: &Phase, room: &str, key: &str) -> pb::SendGiftRequest {
    pb::SendGiftRequest {
        room: room.to_owned(),
        gift: phase.gift.clone(),
        count: phase.gift_count,
        idempotency_key: key.to_owned(),
    }
}

/// One send: the answer, or the code and message of the failure (a
/// client-side timeout is DEADLINE_EXCEEDED).
async fn send(
    client: &mut WalletClient<Channel>,
    phase: &Phase,
    sender: &Sender,
    key: &str,
) -> Result<pb::SendGiftResponse, (tonic::Code, String)> {
    let req = authorized(
        gift_request(phase, &sender.room, key),
        &sender.bearer,
        phase.timeout,
    );
    match tokio::time::timeout(phase.timeout, client.send_gift(req)).await {
        Ok(Ok(res)) => Ok(res.into_inner()),
        Ok(Err(status)) => Err((status.code(), status.message().to_owned())),
        Err(_) => Err((
            tonic::Code::DeadlineExceeded,
            format!("no answer within {:?}", phase.timeout),
        )),
    }
}

async fn run_sender(
    index: usize,
    sender: Sender,
    channel: Channel,
    phase: Arc<Phase>,
) -> anyhow::Result<SenderOutcome> {
    let mut out = SenderOutcome::new()?;
    let mut client = WalletClient::new(channel);
    let mut retry_credit = 0.0;
    let mut seq: u64 = 0;
    while phase.take() {
        let key = format!("{}-{index}-{seq}", phase.run);
        seq += 1;
        out.attempts += 1;
        let started = Instant::now();
        match send(&mut client, &phase, &sender, &key).await {
            Ok(res) => {
                let took = started.elapsed();
                if res.replayed {
                    out.unexpected_replays += 1;
                    continue;
                }
                out.latency.saturating_record(took.as_micros() as u64);
                out.committed += 1;
                let first = res.gift.unwrap_or_default();
                out.amount += first.amount;
                retry_credit += phase.retry_ratio;
                while retry_credit >= 1.0 {
                    retry_credit -= 1.0;
                    let started = Instant::now();
                    match send(&mut client, &phase, &sender, &key).await {
                        Ok(again) => {
                            let took = started.elapsed();
                            let same = again.gift.as_ref().is_some_and(|g| g.id == first.id);
                            if again.replayed && same {
                                out.replays += 1;
                                out.replay_latency
                                    .saturating_record(took.as_micros() as u64);
                            } else {
                                out.replay_mismatches += 1;
                                if !again.replayed {
                                    // Paid twice: the check below must expect it.
                                    out.amount += again.gift.map_or(0, |g| g.amount);
                                    out.committed += 1;
                                }
                            }
                        }
                        Err((code, message)) => {
                            // The first send was paid; a lost retry changes nothing.
                            out.error(code, &format!("retry: {message}"));
                            tokio::time::sleep(ERROR_PAUSE).await;
                        }
                    }
                }
            }
            Err((code, message)) => {
                out.error(code, &message);
                if outcome_unknown(code) {
                    out.unknown.push(Unknown { sender: index, key });
                }
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    Ok(out)
}

/// Re-sends the sends of unknown outcome with their keys; adds what was
/// paid to the senders' tallies (`paid`: per sender, (gifts, amount)).
async fn resolve(
    channel: &Channel,
    phase: &Phase,
    senders: &[Sender],
    unknown: Vec<Unknown>,
    paid: &mut [(u64, i64)],
) -> (ResolveReport, u64, i64) {
    let mut report = ResolveReport {
        unknown: unknown.len() as u64,
        ..ResolveReport::default()
    };
    let (mut in_run, mut in_run_amount) = (0, 0);
    let mut client = WalletClient::new(channel.clone());
    for (n, u) in unknown.into_iter().enumerate() {
        if n >= MAX_RESOLVE {
            report.still_unknown += 1;
            continue;
        }
        let sender = &senders[u.sender];
        let mut settled = false;
        for attempt in 0..RESOLVE_TRIES {
            match send(&mut client, phase, sender, &u.key).await {
                Ok(res) => {
                    let amount = res.gift.map_or(0, |g| g.amount);
                    paid[u.sender].0 += 1;
                    paid[u.sender].1 += amount;
                    if res.replayed {
                        report.paid_in_run += 1;
                        in_run += 1;
                        in_run_amount += amount;
                    } else {
                        report.paid_on_resolve += 1;
                    }
                    settled = true;
                }
                Err((code, _)) if !outcome_unknown(code) => {
                    report.not_paid += 1;
                    settled = true;
                }
                Err(_) => {
                    if attempt + 1 < RESOLVE_TRIES {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            if settled {
                break;
            }
        }
        if !settled {
            report.still_unknown += 1;
        }
    }
    (report, in_run, in_run_amount)
}

/// The control plane's `weir_outbox_pending` gauge, from `/metrics` on its port.
async fn outbox_pending(control: &str) -> Option<u64> {
    let url = format!("{}/metrics", control.trim_end_matches('/'));
    let res = crate::http::request("GET", &url, &[], b"", Duration::from_secs(5))
        .await
        .ok()?;
    if res.status != 200 {
        return None;
    }
    res.text().lines().find_map(|l| {
        let rest = l.strip_prefix(OUTBOX_GAUGE)?;
        // The bare series: `weir_outbox_pending 12`.
        rest.starts_with(' ')
            .then(|| rest.trim().parse::<f64>().ok())
            .flatten()
            .map(|v| v.max(0.0) as u64)
    })
}

/// Waits (at most `wait`) until the outbox relay has published everything.
async fn watch_outbox(control: &str, ended: Instant, wait: Duration) -> OutboxReport {
    let mut report = OutboxReport {
        pending_at_end: outbox_pending(control).await,
        ..OutboxReport::default()
    };
    let Some(mut last) = report.pending_at_end else {
        return report;
    };
    let mut moved = Instant::now();
    let give_up = Instant::now() + wait;
    loop {
        if last == 0 {
            report.drained_ms = Some(ended.elapsed().as_millis() as u64);
            break;
        }
        if Instant::now() >= give_up || moved.elapsed() >= OUTBOX_STALL {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        match outbox_pending(control).await {
            Some(n) if n != last => {
                last = n;
                moved = Instant::now();
            }
            Some(_) => {}
            None => break,
        }
    }
    report.pending_after_wait = Some(last);
    report
}

/// Compares the server's balances, ledgers and leaderboards with what the
/// run paid (`paid`: per sender, (gifts, amount)).
async fn verify(
    channel: &Channel,
    setup: &Setup,
    paid: &[(u64, i64)],
    gift_count: u32,
    still_unknown: u64,
) -> anyhow::Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let mut mismatches = Vec::new();
    let timeout = Duration::from_secs(10);
    let checks = futures::stream::iter(setup.senders.iter().zip(paid))
        .map(|(s, &(gifts, amount))| {
            let mut wallet = WalletClient::new(channel.clone());
            async move {
                let balance = wallet
                    .get_balance(authorized(
                        pb::GetBalanceRequest {
                            user: String::new(),
                        },
                        &s.bearer,
                        timeout,
                    ))
                    .await
                    .map_err(|e| setup_error(&format!("balance of {}", s.user), e))?
                    .into_inner()
                    .balance;
                let (mut rows, mut sum, mut page_token) = (0u64, 0i64, String::new());
                loop {
                    let page = wallet
                        .list_ledger(authorized(
                            pb::LedgerQuery {
                                user: String::new(),
                                page_size: LEDGER_PAGE,
                                page_token: page_token.clone(),
                            },
                            &s.bearer,
                            timeout,
                        ))
                        .await
                        .map_err(|e| setup_error(&format!("ledger of {}", s.user), e))?
                        .into_inner();
                    for e in &page.entries {
                        sum += e.amount;
                        if e.kind == "gift" && e.amount < 0 {
                            rows += 1;
                        }
                    }
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    page_token = page.next_page_token;
                }
                let mut wrong = Vec::new();
                if balance != GRANT - amount {
                    wrong.push(format!(
                        "{}: balance {balance}, expected {} (granted {GRANT}, paid {amount})",
                        s.user,
                        GRANT - amount
                    ));
                }
                if rows != gifts {
                    wrong.push(format!(
                        "{}: {rows} gift rows in the ledger, {gifts} gifts paid",
                        s.user
                    ));
                }
                if sum != balance {
                    wrong.push(format!(
                        "{}: the ledger sums to {sum}, the balance is {balance}",
                        s.user
                    ));
                }
                Ok::<_, anyhow::Error>((balance, rows, wrong))
            }
        })
        .buffered(SETUP_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    for (balance, rows, wrong) in checks {
        report.senders_checked += 1;
        report.senders_balance += balance;
        report.ledger_gift_rows += rows;
        mismatches.extend(wrong);
    }
    let mut wallet = WalletClient::new(channel.clone());
    let rooms = setup.rooms.len();
    for (j, (room, owner, owner_bearer)) in setup.rooms.iter().enumerate() {
        let in_room: Vec<usize> = (j..setup.senders.len()).step_by(rooms).collect();
        let want_amount: i64 = in_room.iter().map(|&i| paid[i].1).sum();
        let want_items: u64 =
            in_room.iter().map(|&i| paid[i].0).sum::<u64>() * u64::from(gift_count);
        let balance = wallet
            .get_balance(authorized(
                pb::GetBalanceRequest {
                    user: String::new(),
                },
                owner_bearer,
                timeout,
            ))
            .await
            .map_err(|e| setup_error(&format!("balance of {owner}"), e))?
            .into_inner()
            .balance;
        report.owners_balance += balance;
        if balance != want_amount {
            mismatches.push(format!(
                "{owner} (owner of {room}): balance {balance}, expected {want_amount}, what was paid there"
            ));
        }
        if in_room.len() > MAX_LEADERBOARD as usize {
            continue;
        }
        let board = wallet
            .gift_leaderboard(pb::GiftLeaderboardRequest {
                room: room.clone(),
                limit: MAX_LEADERBOARD,
            })
            .await
            .map_err(|e| setup_error(&format!("leaderboard of {room}"), e))?
            .into_inner()
            .entries;
        report.leaderboards_checked += 1;
        let got_amount: i64 = board.iter().map(|e| e.amount).sum();
        let got_items: u64 = board.iter().map(|e| e.gifts).sum();
        if (got_amount, got_items) != (want_amount, want_items) {
            mismatches.push(format!(
                "room {room}: the leaderboard counts {got_items} items worth {got_amount}, \
                 the run paid {want_items} items worth {want_amount}"
            ));
        }
    }
    if still_unknown > 0 {
        mismatches.push(format!(
            "{still_unknown} sends stayed of unknown outcome: the expected figures may be short"
        ));
    }
    report.consistent = mismatches.is_empty();
    mismatches.truncate(20);
    report.mismatches = mismatches;
    Ok(report)
}

/// Sets up, runs and checks one load test.
pub async fn measure(args: &GiftsArgs) -> anyhow::Result<GiftsReport> {
    let plan = args.plan()?;
    let mut channels = Vec::with_capacity(args.connections as usize);
    for _ in 0..args.connections {
        channels.push(connect(&args.control, plan.timeout).await?);
    }
    let setup = setup(args, &channels[0]).await?;
    tracing::info!(
        run = %setup.run,
        senders = setup.senders.len(),
        rooms = setup.rooms.len(),
        gift = %setup.gift,
        "sending"
    );
    eprintln!(
        "run {}: {} senders funded, sending {} in {} rooms",
        setup.run,
        setup.senders.len(),
        setup.gift,
        setup.rooms.len()
    );
    let phase = Arc::new(Phase {
        deadline: Instant::now() + plan.duration,
        budget: plan.count.map(AtomicU64::new),
        count_reached: AtomicBool::new(false),
        timeout: plan.timeout,
        retry_ratio: args.retry_ratio,
        gift: setup.gift.clone(),
        gift_count: args.gift_count,
        run: setup.run.clone(),
    });
    let started = Instant::now();
    let tasks: Vec<_> = setup
        .senders
        .iter()
        .enumerate()
        .map(|(i, s)| {
            tokio::spawn(run_sender(
                i,
                s.clone(),
                channels[i % channels.len()].clone(),
                Arc::clone(&phase),
            ))
        })
        .collect();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await.context("a sender task failed")??);
    }
    let ended = Instant::now();
    let elapsed = ended.duration_since(started).as_secs_f64();

    let mut latency = latency_histogram()?;
    let mut replay_latency = latency_histogram()?;
    let mut errors = BTreeMap::new();
    let mut error_samples = Vec::new();
    let mut unknown = Vec::new();
    let mut paid: Vec<(u64, i64)> = Vec::with_capacity(outcomes.len());
    let (mut attempts, mut committed, mut amount) = (0, 0, 0);
    let (mut replays, mut replay_mismatches, mut unexpected_replays) = (0, 0, 0);
    for o in outcomes {
        latency.add(&o.latency)?;
        replay_latency.add(&o.replay_latency)?;
        for (code, n) in o.errors {
            *errors.entry(code).or_default() += n;
        }
        for e in o.error_samples {
            if error_samples.len() < ERROR_SAMPLES {
                error_samples.push(e);
            }
        }
        unknown.extend(o.unknown);
        paid.push((o.committed, o.amount));
        attempts += o.attempts;
        committed += o.committed;
        amount += o.amount;
        replays += o.replays;
        replay_mismatches += o.replay_mismatches;
        unexpected_replays += o.unexpected_replays;
    }
    let (resolve, in_run, in_run_amount) =
        resolve(&channels[0], &phase, &setup.senders, unknown, &mut paid).await;
    // Paid during the run though its answer was lost: it counts.
    committed += in_run;
    amount += in_run_amount;
    let outbox = if args.outbox_wait > 0 {
        watch_outbox(&args.control, ended, Duration::from_secs(args.outbox_wait)).await
    } else {
        OutboxReport::default()
    };
    let verify = if args.no_verify {
        None
    } else {
        Some(
            verify(
                &channels[0],
                &setup,
                &paid,
                args.gift_count,
                resolve.still_unknown,
            )
            .await?,
        )
    };
    Ok(GiftsReport {
        control: args.control.clone(),
        run: setup.run.clone(),
        senders: args.senders,
        rooms: args.rooms,
        connections: args.connections,
        gift: setup.gift.clone(),
        price: setup.price,
        gift_count: args.gift_count,
        retry_ratio: args.retry_ratio,
        duration_s: elapsed,
        stopped_by: if phase.count_reached.load(Relaxed) {
            "count"
        } else {
            "duration"
        }
        .into(),
        attempts,
        committed,
        committed_per_s: if elapsed > 0.0 {
            committed as f64 / elapsed
        } else {
            0.0
        },
        amount,
        latency_ms: percentiles(&latency, 1000.0),
        replays,
        replay_latency_ms: percentiles(&replay_latency, 1000.0),
        replay_mismatches,
        unexpected_replays,
        errors,
        error_samples,
        resolve,
        outbox,
        verify,
    })
}

/// Entry point of `weir loadtest gifts`; returns the exit code (0 when
/// nothing failed and the server agrees with the run).
pub async fn run(args: GiftsArgs) -> anyhow::Result<i32> {
    let report = measure(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(if report.clean() { 0 } else { 1 })
}

fn print_table(r: &GiftsReport) {
    println!(
        "run {} on {}: {} senders over {} connections, {} rooms, {} x {} (price {}), retry ratio {}",
        r.run,
        r.control,
        r.senders,
        r.connections,
        r.rooms,
        r.gift_count,
        r.gift,
        r.price,
        r.retry_ratio
    );
    println!(
        "{:.1} s (stopped by {}): {} sent, {} committed, {:.1} gifts/s, {} charged",
        r.duration_s, r.stopped_by, r.attempts, r.committed, r.committed_per_s, r.amount
    );
    println!(
        "replays {} (mismatched {}), unexpected replays {}, errors {:?}",
        r.replays, r.replay_mismatches, r.unexpected_replays, r.errors
    );
    println!(
        "{:<18} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    for (name, p) in [
        ("paid gift", &r.latency_ms),
        ("replay", &r.replay_latency_ms),
    ] {
        match p {
            Some(p) => println!(
                "{:<18} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                name, p.count, p.p50, p.p90, p.p99, p.p999, p.max
            ),
            None => println!("{name:<18} {:>9}", 0),
        }
    }
    let u = &r.resolve;
    if u.unknown > 0 {
        println!(
            "unknown outcomes {}: paid in run {}, paid on re-send {}, not paid {}, still unknown {}",
            u.unknown, u.paid_in_run, u.paid_on_resolve, u.not_paid, u.still_unknown
        );
    }
    let o = &r.outbox;
    match (o.pending_at_end, o.drained_ms) {
        (None, _) => println!("outbox: not read"),
        (Some(p), Some(ms)) => println!("outbox: {p} pending at the end, drained after {ms} ms"),
        (Some(p), None) => println!(
            "outbox: {p} pending at the end, {} still pending when the wait ended",
            o.pending_after_wait.unwrap_or(p)
        ),
    }
    if let Some(v) = &r.verify {
        println!(
            "verify: {} ({} senders, {} gift rows in their ledgers, senders hold {}, owners hold {}, {} leaderboards)",
            if v.consistent {
                "consistent"
            } else {
                "INCONSISTENT"
            },
            v.senders_checked,
            v.ledger_gift_rows,
            v.senders_balance,
            v.owners_balance,
            v.leaderboards_checked
        );
        for m in &v.mismatches {
            println!("mismatch: {m}");
        }
    }
    for e in &r.error_samples {
        println!("error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> GiftsArgs {
        GiftsArgs {
            // Nothing listens here: every case must fail before connecting.
            control: "http://127.0.0.1:1".into(),
            senders: 4,
            rooms: 1,
            duration: Some(1),
            count: None,
            gift: None,
            gift_count: 1,
            retry_ratio: 0.0,
            connections: 1,
            timeout_ms: 1000,
            prefix: "ltg".into(),
            no_verify: false,
            outbox_wait: 0,
            json: true,
        }
    }

    #[tokio::test]
    async fn bounds_and_bad_input_are_refused_before_any_traffic() {
        for (bad, want) in [
            (
                GiftsArgs {
                    senders: 0,
                    ..args()
                },
                "--senders",
            ),
            (
                GiftsArgs {
                    senders: MAX_SENDERS + 1,
                    ..args()
                },
                "--senders",
            ),
            (GiftsArgs { rooms: 5, ..args() }, "--rooms"),
            (
                GiftsArgs {
                    duration: Some(0),
                    ..args()
                },
                "--duration",
            ),
            (
                GiftsArgs {
                    duration: Some(MAX_DURATION_SECS + 1),
                    ..args()
                },
                "--duration",
            ),
            (
                GiftsArgs {
                    count: Some(0),
                    ..args()
                },
                "--count",
            ),
            (
                GiftsArgs {
                    retry_ratio: 1.5,
                    ..args()
                },
                "--retry-ratio",
            ),
            (
                GiftsArgs {
                    retry_ratio: f64::NAN,
                    ..args()
                },
                "--retry-ratio",
            ),
            (
                GiftsArgs {
                    gift_count: 10_000,
                    ..args()
                },
                "--gift-count",
            ),
            (
                GiftsArgs {
                    connections: 0,
                    ..args()
                },
                "--connections",
            ),
            (
                GiftsArgs {
                    prefix: "no spaces".into(),
                    ..args()
                },
                "--prefix",
            ),
            (
                GiftsArgs {
                    control: "127.0.0.1:7000".into(),
                    ..args()
                },
                "--control",
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
        assert!(e.contains("cannot connect"), "{e}");
    }

    #[test]
    fn codes_are_named_as_grpc_names_them() {
        assert_eq!(
            code_name(tonic::Code::DeadlineExceeded),
            "DEADLINE_EXCEEDED"
        );
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(
            code_name(tonic::Code::FailedPrecondition),
            "FAILED_PRECONDITION"
        );
        assert!(outcome_unknown(tonic::Code::Unavailable));
        assert!(outcome_unknown(tonic::Code::DeadlineExceeded));
        assert!(!outcome_unknown(tonic::Code::FailedPrecondition));
    }

    #[test]
    fn a_count_alone_is_still_bounded_in_time() {
        let plan = GiftsArgs {
            duration: None,
            count: Some(100),
            ..args()
        }
        .plan()
        .ok();
        assert_eq!(
            plan.map(|p| p.duration),
            Some(Duration::from_secs(MAX_DURATION_SECS))
        );
        let plan = GiftsArgs {
            duration: None,
            ..args()
        }
        .plan()
        .ok();
        assert_eq!(
            plan.map(|p| p.duration),
            Some(Duration::from_secs(DEFAULT_DURATION_SECS))
        );
    }
}
