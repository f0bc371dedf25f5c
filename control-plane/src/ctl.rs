//! The client side of `weir ctl`: arguments, calls to the control plane's gRPC
//! API, and output for people (plain text) or scripts (`--json`).
//!
//! Exit codes follow sysexits: 0 ok, 64 bad usage or an argument the control
//! plane refused (or an unknown id), 65 a state that refuses the change
//! (exists already, room ended), 69 control plane unreachable or
//! unavailable, 75 a concurrent change (retry), 77 permission denied, 1
//! anything else.

use std::time::Duration;

use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use weir_protocol::pb;
use weir_protocol::pb::cdns_client::CdnsClient;
use weir_protocol::pb::config_client::ConfigClient;
use weir_protocol::pb::nodes_client::NodesClient;
use weir_protocol::pb::rollout_client::RolloutClient;
use weir_protocol::pb::rooms_client::RoomsClient;
use weir_protocol::pb::scheduler_client::SchedulerClient;
use weir_protocol::pb::tokens_client::TokensClient;
use weir_protocol::pb::wallet_client::WalletClient;

use crate::service::REQUEST_ID_HEADER;

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: failure of another kind.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code: bad usage or invalid argument (sysexits `EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;
/// Exit code: the thing exists already or its state refuses the change (`EX_DATAERR`).
pub const EXIT_DATAERR: i32 = 65;
/// Exit code: the control plane is unreachable or unavailable (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: i32 = 69;
/// Exit code: a concurrent change got in first; retrying may work (`EX_TEMPFAIL`).
pub const EXIT_TEMPFAIL: i32 = 75;
/// Exit code: permission denied (`EX_NOPERM`).
pub const EXIT_NOPERM: i32 = 77;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// `weir ctl`: operate a running Weir control plane.
#[derive(Debug, Clone, clap::Args)]
pub struct CtlArgs {
    /// URL of the control plane's gRPC port.
    #[arg(
        long = "control",
        env = "WEIR_CONTROL",
        default_value = "http://127.0.0.1:7000",
        global = true
    )]
    pub control: String,
    /// Print JSON instead of text meant for people.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// What `weir ctl` does.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CtlCommand {
    /// Mint a token (prints the token alone, or a JSON object with --json).
    Token(TokenArgs),
    /// Rooms of the cluster.
    Rooms {
        #[command(subcommand)]
        command: RoomsCommand,
    },
    /// Media nodes: list, cordon, drain, uncordon.
    Nodes {
        #[command(subcommand)]
        command: NodesCommand,
    },
    /// The config center: get, set, history.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Wallets and gifts: grant, the gift catalogue, a room's leaderboard.
    Wallet {
        #[command(subcommand)]
        command: WalletCommand,
    },
    /// Rollout weights per node version: get, set, clear.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// CDNs for HLS and their health (configure them with
    /// `weir ctl config set cdn.endpoints=…`).
    Cdns {
        #[command(subcommand)]
        command: CdnsCommand,
    },
    /// Live view of nodes, top rooms and CDNs, redrawn every second until
    /// Ctrl-C, or printed --once / --iterations N times (with --json: one
    /// JSON object per view, one per line).
    Top(TopArgs),
}

/// `weir ctl wallet …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum WalletCommand {
    /// Credit a user from the mint (the control plane must allow grants).
    Grant {
        /// The user id.
        user: String,
        /// How much, in the wallet's smallest unit (1 to 10^12).
        amount: i64,
        /// Idempotency key: running the command again with the same key
        /// credits nothing more. Default: a new random key (printed).
        #[arg(long)]
        key: Option<String>,
    },
    /// The gift catalogue, cheapest first.
    Gifts,
    /// A room's top senders by amount.
    Leaderboard {
        /// The room id.
        room: String,
        /// At most this many (default 10, at most 100).
        #[arg(long, default_value_t = 10)]
        limit: u32,
    },
}

/// `weir ctl rollout …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum RolloutCommand {
    /// The weights in force and each version's nodes and share of new
    /// assignments.
    Get,
    /// Set the weights, e.g. `v1=90,v2=10` (canary) or `blue=100,green=0`
    /// (blue-green; roll back by flipping). Versions not named get 0.
    Set {
        /// `VERSION=WEIGHT`, comma-separated or as separate arguments;
        /// weights 0 to 1000000, at least one above 0.
        #[arg(required = true, value_name = "VERSION=WEIGHT")]
        weights: Vec<String>,
        /// Who makes the change (recorded in the config history).
        #[arg(long, env = "USER", default_value = "weir-ctl")]
        by: String,
        /// Apply only if `rollout.weights` is at this version now.
        #[arg(long, value_name = "VERSION")]
        expect_version: Option<u64>,
    },
    /// Remove the weights: every version alike again.
    Clear {
        /// Who makes the change (recorded in the config history).
        #[arg(long, env = "USER", default_value = "weir-ctl")]
        by: String,
    },
}

/// `weir ctl cdns …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CdnsCommand {
    /// Every configured CDN with its breaker state (closed: healthy; open:
    /// failing, offered last; half_open: trial probe due; unknown: not
    /// probed yet).
    List,
}

/// Arguments of `weir ctl top`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TopArgs {
    /// Print one view and exit.
    #[arg(long, conflicts_with = "iterations")]
    pub once: bool,
    /// Print this many views, one a second, and exit.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub iterations: Option<u32>,
    /// Rooms shown, most viewers first.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub rooms: usize,
}

/// `weir ctl nodes …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum NodesCommand {
    /// Every node: alive ones with their load, and flagged ones that are away.
    List,
    /// No new sessions for the node; what it carries stays.
    Cordon {
        /// The node id.
        node: String,
    },
    /// Cordon the node and move its viewers away: room-event clients at
    /// once, WebRTC viewers in paced batches (see `weir node
    /// --drain-batch`), those of rooms published there too (the nodes they
    /// move to pull the room from it over the relay). Publishers are not
    /// ended.
    Drain {
        /// The node id.
        node: String,
    },
    /// Clear cordon and drain (viewers stop being moved).
    Uncordon {
        /// The node id.
        node: String,
    },
}

/// `weir ctl config …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ConfigCommand {
    /// Values in force (all keys, or the ones named), with versions.
    Get {
        /// Keys to show; none: every key.
        keys: Vec<String>,
    },
    /// Validate and write `KEY=VALUE` pairs, all at once or none.
    Set {
        /// `KEY=VALUE`, one or more.
        #[arg(required = true, value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        /// Who makes the change (recorded in the history).
        #[arg(long, env = "USER", default_value = "weir-ctl")]
        by: String,
        /// Apply only if the (single) key is at this version now.
        #[arg(long, value_name = "VERSION")]
        expect_version: Option<u64>,
    },
    /// Past values of a key, newest first.
    History {
        /// The key.
        key: String,
        /// At most this many entries (default 20, at most 100).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

/// Arguments of `weir ctl token`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The room the token is for.
    #[arg(long)]
    pub room: String,
    /// What the token allows.
    #[arg(long, value_enum)]
    pub mode: CtlMode,
    /// Who the token is for (default: the room's owner for publish, an
    /// anonymous id otherwise).
    #[arg(long)]
    pub subject: Option<String>,
    /// Lifetime in seconds (default 3600, at most 604800).
    #[arg(long, value_name = "SECONDS")]
    pub ttl: Option<u32>,
}

/// Token modes as the CLI spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CtlMode {
    Publish,
    Play,
    Chat,
}

impl CtlMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Play => "play",
            Self::Chat => "chat",
        }
    }
}

/// `weir ctl rooms …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum RoomsCommand {
    /// List the rooms the cluster's nodes carry.
    List,
    /// A stored room: owner, title, status, times, and where it is carried.
    Show {
        /// The room id.
        room: String,
    },
    /// End a stored room (it cannot go live again).
    End {
        /// The room id.
        room: String,
    },
}

/// What a command printed and how it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The exit code.
    pub code: i32,
    /// Text for standard output.
    pub stdout: String,
    /// Text for standard error.
    pub stderr: String,
}

impl Outcome {
    fn ok(stdout: String) -> Self {
        Self {
            code: EXIT_OK,
            stdout,
            stderr: String::new(),
        }
    }

    fn fail(code: i32, message: impl std::fmt::Display) -> Self {
        Self {
            code,
            stdout: String::new(),
            stderr: format!("error: {message}\n"),
        }
    }
}

/// Runs a `weir ctl` command, prints its output and returns the exit code.
pub async fn run(args: CtlArgs) -> anyhow::Result<i32> {
    use std::io::{IsTerminal, Write};
    if let CtlCommand::Top(top_args) = &args.command {
        // Printed frame by frame; on a terminal each frame replaces the last.
        let channel = match connect(&args.control).await {
            Ok(channel) => channel,
            Err(outcome) => {
                std::io::stderr().write_all(outcome.stderr.as_bytes())?;
                return Ok(outcome.code);
            }
        };
        let clear = !args.json && std::io::stdout().is_terminal();
        let outcome = top(channel, &args.control, top_args, args.json, |frame| {
            let mut out = std::io::stdout().lock();
            if clear {
                let _ = out.write_all(b"\x1b[H\x1b[2J");
            }
            let _ = out.write_all(frame.as_bytes());
            let _ = out.flush();
        })
        .await;
        std::io::stderr().write_all(outcome.stderr.as_bytes())?;
        return Ok(outcome.code);
    }
    let outcome = execute(args).await;
    std::io::stdout().write_all(outcome.stdout.as_bytes())?;
    std::io::stderr().write_all(outcome.stderr.as_bytes())?;
    Ok(outcome.code)
}

/// Runs a `weir ctl` command and returns what it would print.
pub async fn execute(args: CtlArgs) -> Outcome {
    let channel = match connect(&args.control).await {
        Ok(channel) => channel,
        Err(outcome) => return outcome,
    };
    let result = match &args.command {
        CtlCommand::Token(token) => mint_token(channel, token, args.json).await,
        CtlCommand::Rooms { command } => match command {
            RoomsCommand::List => list_rooms(channel, args.json).await,
            RoomsCommand::Show { room } => show_room(channel, room, args.json).await,
            RoomsCommand::End { room } => end_room(channel, room, args.json).await,
        },
        CtlCommand::Nodes { command } => nodes(channel, command, args.json).await,
        CtlCommand::Config { command } => config(channel, command, args.json).await,
        CtlCommand::Wallet { command } => wallet(channel, command, args.json).await,
        CtlCommand::Rollout { command } => rollout(channel, command, args.json).await,
        CtlCommand::Cdns { command } => match command {
            CdnsCommand::List => list_cdns(channel, args.json).await,
        },
        CtlCommand::Top(top_args) => {
            let mut stdout = String::new();
            let mut outcome = top(channel, &args.control, top_args, args.json, |frame| {
                stdout.push_str(frame)
            })
            .await;
            outcome.stdout = stdout;
            return outcome;
        }
    };
    result.unwrap_or_else(|status| status_outcome(&args.control, &status))
}

async fn connect(url: &str) -> Result<Channel, Outcome> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| {
            Outcome::fail(
                EXIT_USAGE,
                format_args!("invalid --control URL {url:?}: {e}"),
            )
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    endpoint.connect().await.map_err(|e| {
        Outcome::fail(
            EXIT_UNAVAILABLE,
            format_args!(
                "cannot reach the control plane at {url}: {}",
                error_chain(&e)
            ),
        )
    })
}

/// An error with its sources, `: `-separated.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn status_outcome(url: &str, status: &tonic::Status) -> Outcome {
    use tonic::Code;
    let code = match status.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::NotFound => EXIT_USAGE,
        Code::AlreadyExists | Code::FailedPrecondition => EXIT_DATAERR,
        Code::Aborted => EXIT_TEMPFAIL,
        Code::Unavailable | Code::DeadlineExceeded => EXIT_UNAVAILABLE,
        Code::PermissionDenied | Code::Unauthenticated => EXIT_NOPERM,
        _ => EXIT_FAILURE,
    };
    let mut message = format!("{} (from {url}, {:?})", status.message(), status.code());
    if let Some(rid) = status
        .metadata()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        message.push_str(&format!(" [request id {rid}]"));
    }
    Outcome::fail(code, message)
}

#[derive(Serialize)]
struct TokenJson<'a> {
    room: &'a str,
    mode: &'a str,
    token: &'a str,
    expires_unix: i64,
}

async fn mint_token(
    channel: Channel,
    args: &TokenArgs,
    json: bool,
) -> Result<Outcome, tonic::Status> {
    let request = pb::MintTokenRequest {
        room: args.room.clone(),
        mode: args.mode.as_str().to_owned(),
        subject: args.subject.clone().unwrap_or_default(),
        ttl_seconds: args.ttl.unwrap_or(0),
    };
    let response = TokensClient::new(channel)
        .mint_token(request)
        .await?
        .into_inner();
    let stdout = if json {
        to_json_line(&TokenJson {
            room: &args.room,
            mode: args.mode.as_str(),
            token: &response.token,
            expires_unix: response.expires_unix,
        })
    } else {
        format!("{}\n", response.token)
    };
    Ok(Outcome::ok(stdout))
}

#[derive(Serialize)]
struct RoomJson<'a> {
    room: &'a str,
    origin_node: Option<&'a str>,
    live: bool,
    subscribers: u32,
}

#[derive(Serialize)]
struct RoomsJson<'a> {
    rooms: Vec<RoomJson<'a>>,
}

async fn list_rooms(channel: Channel, json: bool) -> Result<Outcome, tonic::Status> {
    let response = SchedulerClient::new(channel)
        .list_rooms(pb::ListRoomsRequest {})
        .await?
        .into_inner();
    let stdout = if json {
        to_json_line(&RoomsJson {
            rooms: response
                .rooms
                .iter()
                .map(|r| RoomJson {
                    room: &r.room,
                    origin_node: Some(r.origin_node.as_str()).filter(|n| !n.is_empty()),
                    live: r.live,
                    subscribers: r.subscribers,
                })
                .collect(),
        })
    } else {
        rooms_table(&response.rooms)
    };
    Ok(Outcome::ok(stdout))
}

fn to_json_line(value: &impl Serialize) -> String {
    // Serializing structs of strings, numbers and bools cannot fail.
    let mut text = serde_json::to_string(value).unwrap_or_default();
    text.push('\n');
    text
}

/// An aligned table: a header line, then the rows, cells two spaces apart.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]], empty: &str) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header = header.map(str::to_owned);
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str(empty);
        out.push('\n');
    }
    out
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

/// Unix ms as `2026-11-24T06:11:31Z`, `-` for none.
fn when(ms: Option<i64>) -> String {
    match ms.filter(|ms| *ms > 0) {
        None => "-".to_owned(),
        Some(ms) => {
            let secs = ms / 1000;
            let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
            let (y, m, d) = civil_from_days(days);
            format!(
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
                rest / 3600,
                rest % 3600 / 60,
                rest % 60
            )
        }
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn status_name(status: i32) -> &'static str {
    match pb::RoomStatus::try_from(status) {
        Ok(pb::RoomStatus::Scheduled) => "scheduled",
        Ok(pb::RoomStatus::Live) => "live",
        Ok(pb::RoomStatus::Ended) => "ended",
        _ => "unknown",
    }
}

#[derive(Serialize)]
struct StoredRoomJson<'a> {
    room: &'a str,
    owner: &'a str,
    title: &'a str,
    status: &'static str,
    scheduled_start_unix_ms: Option<i64>,
    started_unix_ms: Option<i64>,
    ended_unix_ms: Option<i64>,
    created_unix_ms: i64,
    updated_unix_ms: i64,
    origin_node: Option<&'a str>,
    live_on_node: bool,
    subscribers: u32,
}

fn room_text(room: &pb::Room, carried: Option<&pb::RoomSummary>) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<16}{v}\n"));
    line("room", room.id.clone());
    line("owner", room.owner.clone());
    line("title", room.title.clone());
    line("status", status_name(room.status).to_owned());
    line("scheduled start", when(room.scheduled_start_unix_ms));
    line("started", when(room.started_unix_ms));
    line("ended", when(room.ended_unix_ms));
    line("created", when(Some(room.created_unix_ms)));
    line(
        "origin node",
        carried
            .map(|c| c.origin_node.clone())
            .filter(|o| !o.is_empty())
            .unwrap_or_else(|| "-".to_owned()),
    );
    line(
        "subscribers",
        carried.map_or(0, |c| c.subscribers).to_string(),
    );
    out
}

fn room_json(room: &pb::Room, carried: Option<&pb::RoomSummary>) -> String {
    to_json_line(&StoredRoomJson {
        room: &room.id,
        owner: &room.owner,
        title: &room.title,
        status: status_name(room.status),
        scheduled_start_unix_ms: room.scheduled_start_unix_ms,
        started_unix_ms: room.started_unix_ms,
        ended_unix_ms: room.ended_unix_ms,
        created_unix_ms: room.created_unix_ms,
        updated_unix_ms: room.updated_unix_ms,
        origin_node: carried
            .map(|c| c.origin_node.as_str())
            .filter(|o| !o.is_empty()),
        live_on_node: carried.is_some_and(|c| c.live),
        subscribers: carried.map_or(0, |c| c.subscribers),
    })
}

async fn show_room(channel: Channel, room: &str, json: bool) -> Result<Outcome, tonic::Status> {
    let stored = RoomsClient::new(channel.clone())
        .get_room(pb::GetRoomRequest {
            id: room.to_owned(),
        })
        .await?
        .into_inner();
    // Where the room is carried now, when the cluster can say.
    let carried = SchedulerClient::new(channel)
        .list_rooms(pb::ListRoomsRequest {})
        .await
        .ok()
        .and_then(|r| r.into_inner().rooms.into_iter().find(|r| r.room == room));
    Ok(Outcome::ok(if json {
        room_json(&stored, carried.as_ref())
    } else {
        room_text(&stored, carried.as_ref())
    }))
}

async fn end_room(channel: Channel, room: &str, json: bool) -> Result<Outcome, tonic::Status> {
    let ended = RoomsClient::new(channel)
        .end_room(pb::GetRoomRequest {
            id: room.to_owned(),
        })
        .await?
        .into_inner();
    Ok(Outcome::ok(if json {
        room_json(&ended, None)
    } else {
        format!("room {} ended\n", ended.id)
    }))
}

#[derive(Serialize)]
struct NodeJson<'a> {
    id: &'a str,
    region: &'a str,
    zone: &'a str,
    http_url: &'a str,
    version: &'a str,
    capacity: u32,
    sessions: u32,
    egress_bps: u64,
    rooms: u32,
    reported_unix_ms: i64,
    alive: bool,
    schedulable: bool,
    cordoned: bool,
    draining: bool,
    self_draining: bool,
}

fn node_json(n: &pb::NodeStatus) -> NodeJson<'_> {
    NodeJson {
        id: &n.id,
        region: &n.region,
        zone: &n.zone,
        http_url: &n.http_url,
        version: &n.version,
        capacity: n.capacity,
        sessions: n.sessions,
        egress_bps: n.egress_bps,
        rooms: n.rooms,
        reported_unix_ms: n.reported_unix_ms,
        alive: n.alive,
        schedulable: n.schedulable,
        cordoned: n.cordoned,
        draining: n.draining,
        self_draining: n.self_draining,
    }
}

/// The node's state in one word for the table.
fn node_state(n: &pb::NodeStatus) -> &'static str {
    match (
        n.alive,
        n.draining,
        n.cordoned,
        n.self_draining,
        n.schedulable,
    ) {
        (false, ..) => "away",
        (_, true, ..) => "draining",
        (_, _, true, ..) => "cordoned",
        (_, _, _, true, _) => "stopping",
        (.., true) => "ready",
        _ => "unhealthy",
    }
}

fn nodes_table(nodes: &[pb::NodeStatus]) -> String {
    let rows: Vec<[String; 7]> = nodes
        .iter()
        .map(|n| {
            [
                n.id.clone(),
                node_state(n).to_owned(),
                if n.region.is_empty() {
                    "-".to_owned()
                } else {
                    n.region.clone()
                },
                format!("{}/{}", n.sessions, n.capacity),
                n.rooms.to_string(),
                format!("{:.1}", n.egress_bps as f64 / 1e6),
                if n.version.is_empty() {
                    "-".to_owned()
                } else {
                    n.version.clone()
                },
            ]
        })
        .collect();
    table(
        [
            "NODE",
            "STATE",
            "REGION",
            "SESSIONS",
            "ROOMS",
            "EGRESS_MBPS",
            "VERSION",
        ],
        &rows,
        "(no nodes)",
    )
}

async fn nodes(
    channel: Channel,
    command: &NodesCommand,
    json: bool,
) -> Result<Outcome, tonic::Status> {
    let mut client = NodesClient::new(channel);
    let (node, verb) = match command {
        NodesCommand::List => {
            let list = client
                .list_nodes(pb::ListNodesRequest {})
                .await?
                .into_inner();
            return Ok(Outcome::ok(if json {
                to_json_line(&serde_json::json!({
                    "nodes": list.nodes.iter().map(node_json).collect::<Vec<_>>()
                }))
            } else {
                nodes_table(&list.nodes)
            }));
        }
        NodesCommand::Cordon { node } => (node, "cordoned"),
        NodesCommand::Drain { node } => (node, "draining"),
        NodesCommand::Uncordon { node } => (node, "uncordoned"),
    };
    let request = pb::NodeRequest { id: node.clone() };
    let status = match command {
        NodesCommand::Cordon { .. } => client.cordon_node(request).await?,
        NodesCommand::Drain { .. } => client.drain_node(request).await?,
        _ => client.uncordon_node(request).await?,
    }
    .into_inner();
    Ok(Outcome::ok(if json {
        to_json_line(&node_json(&status))
    } else {
        format!("node {} {verb}\n", status.id)
    }))
}

#[derive(Serialize)]
struct ConfigEntryJson<'a> {
    key: &'a str,
    value: &'a str,
    version: u64,
    updated_unix_ms: i64,
    updated_by: &'a str,
    default_value: &'a str,
}

fn entry_json(e: &pb::ConfigEntry) -> ConfigEntryJson<'_> {
    ConfigEntryJson {
        key: &e.key,
        value: &e.value,
        version: e.version,
        updated_unix_ms: e.updated_unix_ms,
        updated_by: &e.updated_by,
        default_value: &e.default_value,
    }
}

fn config_table(entries: &[pb::ConfigEntry]) -> String {
    let rows: Vec<[String; 5]> = entries
        .iter()
        .map(|e| {
            [
                e.key.clone(),
                e.value.clone(),
                if e.version == 0 {
                    "default".to_owned()
                } else {
                    e.version.to_string()
                },
                when(Some(e.updated_unix_ms)),
                if e.updated_by.is_empty() {
                    "-".to_owned()
                } else {
                    e.updated_by.clone()
                },
            ]
        })
        .collect();
    table(
        ["KEY", "VALUE", "VERSION", "UPDATED", "BY"],
        &rows,
        "(no keys)",
    )
}

/// `KEY=VALUE` split; the value may contain `=`.
fn parse_pair(pair: &str) -> Result<(String, String), Outcome> {
    match pair.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(Outcome::fail(
            EXIT_USAGE,
            format_args!("expected KEY=VALUE, got {pair:?}"),
        )),
    }
}

async fn config(
    channel: Channel,
    command: &ConfigCommand,
    json: bool,
) -> Result<Outcome, tonic::Status> {
    let mut client = ConfigClient::new(channel);
    let entries = match command {
        ConfigCommand::Get { keys } => {
            let state = client
                .get_config(pb::GetConfigRequest { keys: keys.clone() })
                .await?
                .into_inner();
            if json {
                return Ok(Outcome::ok(to_json_line(&serde_json::json!({
                    "revision": state.revision,
                    "entries": state.entries.iter().map(entry_json).collect::<Vec<_>>(),
                }))));
            }
            state.entries
        }
        ConfigCommand::Set {
            pairs,
            by,
            expect_version,
        } => {
            if expect_version.is_some() && pairs.len() != 1 {
                return Ok(Outcome::fail(
                    EXIT_USAGE,
                    "--expect-version applies to a single KEY=VALUE",
                ));
            }
            let mut changes = Vec::with_capacity(pairs.len());
            for pair in pairs {
                match parse_pair(pair) {
                    Ok((key, value)) => changes.push(pb::ConfigChange {
                        key,
                        value,
                        expected_version: *expect_version,
                    }),
                    Err(outcome) => return Ok(outcome),
                }
            }
            let keys: Vec<String> = changes.iter().map(|c| c.key.clone()).collect();
            let state = client
                .set_config(pb::SetConfigRequest {
                    changes,
                    updated_by: by.clone(),
                })
                .await?
                .into_inner();
            let set: Vec<pb::ConfigEntry> = state
                .entries
                .into_iter()
                .filter(|e| keys.contains(&e.key))
                .collect();
            if json {
                return Ok(Outcome::ok(to_json_line(&serde_json::json!({
                    "revision": state.revision,
                    "entries": set.iter().map(entry_json).collect::<Vec<_>>(),
                }))));
            }
            set
        }
        ConfigCommand::History { key, limit } => {
            let history = client
                .config_history(pb::ConfigHistoryRequest {
                    key: key.clone(),
                    limit: *limit,
                })
                .await?
                .into_inner();
            if json {
                return Ok(Outcome::ok(to_json_line(&serde_json::json!({
                    "entries": history.entries.iter().map(entry_json).collect::<Vec<_>>(),
                }))));
            }
            history.entries
        }
    };
    Ok(Outcome::ok(config_table(&entries)))
}

/// `VERSION=WEIGHT` items (each argument may hold several, comma-separated).
fn parse_weights(args: &[String]) -> Result<Vec<pb::VersionWeight>, Outcome> {
    let mut weights = Vec::new();
    for item in args.iter().flat_map(|a| a.split(',')) {
        let item = item.trim();
        let parsed = item.split_once('=').and_then(|(v, w)| {
            let w = w.trim();
            let number = w.bytes().all(|b| b.is_ascii_digit()) && !w.is_empty();
            Some((v.trim(), w.parse::<u32>().ok().filter(|_| number)?))
        });
        match parsed {
            Some((version, weight)) => weights.push(pb::VersionWeight {
                version: version.to_owned(),
                weight,
            }),
            None => {
                return Err(Outcome::fail(
                    EXIT_USAGE,
                    format_args!(
                        "expected VERSION=WEIGHT with a whole number from 0 to 1000000, got {item:?}"
                    ),
                ));
            }
        }
    }
    Ok(weights)
}

#[derive(Serialize)]
struct VersionJson<'a> {
    version: &'a str,
    weight: u32,
    nodes: u32,
    schedulable_nodes: u32,
    share: f64,
}

fn rollout_json(state: &pb::RolloutState) -> String {
    let weights: serde_json::Map<String, serde_json::Value> = state
        .weights
        .iter()
        .map(|w| (w.version.clone(), w.weight.into()))
        .collect();
    to_json_line(&serde_json::json!({
        "weights": weights,
        "version": state.version,
        "updated_unix_ms": state.updated_unix_ms,
        "updated_by": state.updated_by,
        "versions": state.versions.iter().map(|v| VersionJson {
            version: &v.version,
            weight: v.weight,
            nodes: v.nodes,
            schedulable_nodes: v.schedulable_nodes,
            share: v.share,
        }).collect::<Vec<_>>(),
    }))
}

fn rollout_text(state: &pb::RolloutState) -> String {
    let rows: Vec<[String; 5]> = state
        .versions
        .iter()
        .map(|v| {
            [
                v.version.clone(),
                if state.weights.is_empty() {
                    "-".to_owned()
                } else {
                    v.weight.to_string()
                },
                format!("{:.1}%", v.share * 100.0),
                v.nodes.to_string(),
                v.schedulable_nodes.to_string(),
            ]
        })
        .collect();
    let mut out = table(
        ["VERSION", "WEIGHT", "SHARE", "NODES", "SCHEDULABLE"],
        &rows,
        "(no versions: no weights and no nodes)",
    );
    if state.weights.is_empty() {
        out.push_str("weights: none (every version alike)\n");
    } else {
        let weights: Vec<String> = state
            .weights
            .iter()
            .map(|w| format!("{}={}", w.version, w.weight))
            .collect();
        out.push_str(&format!(
            "weights: {} (version {}, set {} by {})\n",
            weights.join(","),
            state.version,
            when(Some(state.updated_unix_ms)),
            if state.updated_by.is_empty() {
                "-"
            } else {
                &state.updated_by
            }
        ));
    }
    out
}

async fn rollout(
    channel: Channel,
    command: &RolloutCommand,
    json: bool,
) -> Result<Outcome, tonic::Status> {
    let mut client = RolloutClient::new(channel);
    let state = match command {
        RolloutCommand::Get => client.get_rollout(pb::GetRolloutRequest {}).await?,
        RolloutCommand::Set {
            weights,
            by,
            expect_version,
        } => {
            let weights = match parse_weights(weights) {
                Ok(w) => w,
                Err(outcome) => return Ok(outcome),
            };
            client
                .set_rollout(pb::SetRolloutRequest {
                    weights,
                    updated_by: by.clone(),
                    expected_version: *expect_version,
                })
                .await?
        }
        RolloutCommand::Clear { by } => {
            client
                .set_rollout(pb::SetRolloutRequest {
                    weights: Vec::new(),
                    updated_by: by.clone(),
                    expected_version: None,
                })
                .await?
        }
    }
    .into_inner();
    Ok(Outcome::ok(if json {
        rollout_json(&state)
    } else {
        rollout_text(&state)
    }))
}

#[derive(Serialize)]
struct CdnJson<'a> {
    name: &'a str,
    url: &'a str,
    weight: u32,
    probe: &'a str,
    state: &'a str,
    consecutive_failures: u32,
    changed_unix_ms: i64,
    probed_unix_ms: i64,
    last_error: &'a str,
}

fn cdn_json(c: &pb::CdnStatus) -> CdnJson<'_> {
    CdnJson {
        name: &c.name,
        url: &c.url,
        weight: c.weight,
        probe: &c.probe,
        state: &c.state,
        consecutive_failures: c.consecutive_failures,
        changed_unix_ms: c.changed_unix_ms,
        probed_unix_ms: c.probed_unix_ms,
        last_error: &c.last_error,
    }
}

fn cdns_table(cdns: &[pb::CdnStatus]) -> String {
    let rows: Vec<[String; 6]> = cdns
        .iter()
        .map(|c| {
            [
                c.name.clone(),
                c.state.clone(),
                c.weight.to_string(),
                c.consecutive_failures.to_string(),
                c.url.clone(),
                if c.last_error.is_empty() {
                    "-".to_owned()
                } else {
                    c.last_error.chars().take(60).collect()
                },
            ]
        })
        .collect();
    table(
        ["CDN", "STATE", "WEIGHT", "FAILURES", "URL", "LAST_ERROR"],
        &rows,
        "(no CDNs configured; see `weir ctl config get cdn.endpoints`)",
    )
}

async fn list_cdns(channel: Channel, json: bool) -> Result<Outcome, tonic::Status> {
    let list = CdnsClient::new(channel)
        .list_cdns(pb::ListCdnsRequest {})
        .await?
        .into_inner();
    Ok(Outcome::ok(if json {
        to_json_line(&serde_json::json!({
            "cdns": list.cdns.iter().map(cdn_json).collect::<Vec<_>>()
        }))
    } else {
        cdns_table(&list.cdns)
    }))
}

/// How often `weir ctl top` refreshes.
const TOP_EVERY: Duration = Duration::from_secs(1);

/// One view of the cluster for `top`.
struct TopFrame {
    at_unix_ms: i64,
    nodes: Vec<pb::NodeStatus>,
    rooms: Vec<pb::RoomSummary>,
    rooms_total: usize,
    cdns: Vec<pb::CdnStatus>,
}

async fn top_frame(channel: &Channel, rooms: usize) -> Result<TopFrame, tonic::Status> {
    let nodes = NodesClient::new(channel.clone())
        .list_nodes(pb::ListNodesRequest {})
        .await?
        .into_inner()
        .nodes;
    let mut all_rooms = SchedulerClient::new(channel.clone())
        .list_rooms(pb::ListRoomsRequest {})
        .await?
        .into_inner()
        .rooms;
    // An older control plane without the Cdns service still gets a view.
    let cdns = match CdnsClient::new(channel.clone())
        .list_cdns(pb::ListCdnsRequest {})
        .await
    {
        Ok(r) => r.into_inner().cdns,
        Err(s) if s.code() == tonic::Code::Unimplemented => Vec::new(),
        Err(s) => return Err(s),
    };
    let rooms_total = all_rooms.len();
    all_rooms.sort_by(|a, b| {
        b.subscribers
            .cmp(&a.subscribers)
            .then_with(|| a.room.cmp(&b.room))
    });
    all_rooms.truncate(rooms);
    let at_unix_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(i64::MAX);
    Ok(TopFrame {
        at_unix_ms,
        nodes,
        rooms: all_rooms,
        rooms_total,
        cdns,
    })
}

fn top_json(f: &TopFrame) -> String {
    to_json_line(&serde_json::json!({
        "at_unix_ms": f.at_unix_ms,
        "nodes": f.nodes.iter().map(node_json).collect::<Vec<_>>(),
        "rooms": f.rooms.iter().map(|r| RoomJson {
            room: &r.room,
            origin_node: Some(r.origin_node.as_str()).filter(|n| !n.is_empty()),
            live: r.live,
            subscribers: r.subscribers,
        }).collect::<Vec<_>>(),
        "rooms_total": f.rooms_total,
        "cdns": f.cdns.iter().map(cdn_json).collect::<Vec<_>>(),
    }))
}

fn top_text(control: &str, f: &TopFrame) -> String {
    let alive = f.nodes.iter().filter(|n| n.alive).count();
    let schedulable = f.nodes.iter().filter(|n| n.schedulable).count();
    let sessions: u64 = f.nodes.iter().map(|n| u64::from(n.sessions)).sum();
    let capacity: u64 = f.nodes.iter().map(|n| u64::from(n.capacity)).sum();
    let viewers: u64 = f.rooms.iter().map(|r| u64::from(r.subscribers)).sum();
    let mut out = format!(
        "weir top  {}  control {control}\nnodes {alive} alive, {schedulable} schedulable  sessions {sessions}/{capacity}  rooms {}\n\n",
        when(Some(f.at_unix_ms)),
        f.rooms_total,
    );
    let rows: Vec<[String; 8]> = f
        .nodes
        .iter()
        .map(|n| {
            let load = if n.capacity > 0 {
                format!(
                    "{:.0}%",
                    f64::from(n.sessions) * 100.0 / f64::from(n.capacity)
                )
            } else {
                "-".to_owned()
            };
            [
                n.id.clone(),
                node_state(n).to_owned(),
                if n.version.is_empty() {
                    "-".to_owned()
                } else {
                    n.version.clone()
                },
                format!("{}/{}", n.sessions, n.capacity),
                load,
                n.rooms.to_string(),
                format!("{:.1}", n.egress_bps as f64 / 1e6),
                yes_no(n.draining || n.self_draining),
            ]
        })
        .collect();
    out.push_str(&table(
        [
            "NODE",
            "STATE",
            "VERSION",
            "SESSIONS",
            "LOAD",
            "ROOMS",
            "EGRESS_MBPS",
            "DRAINING",
        ],
        &rows,
        "(no nodes)",
    ));
    out.push('\n');
    out.push_str(&format!(
        "top rooms by viewers ({} shown, {viewers} viewers)\n",
        f.rooms.len()
    ));
    out.push_str(&rooms_table(&f.rooms));
    if !f.cdns.is_empty() {
        out.push('\n');
        out.push_str(&cdns_table(&f.cdns));
    }
    out
}

/// `weir ctl top`: frames handed to `emit` one a second. The first failure
/// ends it with the call's exit code; with no end set (a person watching)
/// later failures are shown and the view keeps trying.
async fn top(
    channel: Channel,
    control: &str,
    args: &TopArgs,
    json: bool,
    mut emit: impl FnMut(&str),
) -> Outcome {
    let frames = if args.once { Some(1) } else { args.iterations };
    let mut shown = 0u32;
    let mut tick = tokio::time::interval(TOP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match top_frame(&channel, args.rooms).await {
            Ok(frame) => emit(&if json {
                top_json(&frame)
            } else {
                top_text(control, &frame)
            }),
            Err(status) if shown == 0 || frames.is_some() => {
                return status_outcome(control, &status);
            }
            Err(status) => {
                let failed = status_outcome(control, &status);
                emit(&format!("{}(retrying every second)\n", failed.stderr));
            }
        }
        shown += 1;
        if frames.is_some_and(|n| shown >= n) {
            return Outcome::ok(String::new());
        }
    }
}

/// Rooms as an aligned table with a header line.
fn rooms_table(rooms: &[pb::RoomSummary]) -> String {
    let rows: Vec<[String; 4]> = rooms
        .iter()
        .map(|r| {
            [
                r.room.clone(),
                if r.origin_node.is_empty() {
                    "-".to_owned()
                } else {
                    r.origin_node.clone()
                },
                yes_no(r.live),
                r.subscribers.to_string(),
            ]
        })
        .collect();
    table(
        ["ROOM", "ORIGIN", "LIVE", "SUBSCRIBERS"],
        &rows,
        "(no rooms)",
    )
}

#[derive(Serialize)]
struct GrantJson<'a> {
    id: &'a str,
    user: &'a str,
    amount: i64,
    balance_after: i64,
    idempotency_key: &'a str,
    replayed: bool,
}

#[derive(Serialize)]
struct CatalogueGiftJson<'a> {
    id: &'a str,
    name: &'a str,
    price: i64,
}

#[derive(Serialize)]
struct LeaderboardEntryJson<'a> {
    user: &'a str,
    amount: i64,
    gifts: u64,
}

async fn wallet(
    channel: Channel,
    command: &WalletCommand,
    json: bool,
) -> Result<Outcome, tonic::Status> {
    let mut client = WalletClient::new(channel);
    match command {
        WalletCommand::Grant { user, amount, key } => {
            let key = key
                .clone()
                .unwrap_or_else(|| format!("ctl-{}", uuid::Uuid::new_v4().simple()));
            let g = client
                .grant(pb::GrantRequest {
                    user: user.clone(),
                    amount: *amount,
                    idempotency_key: key.clone(),
                })
                .await?
                .into_inner();
            Ok(Outcome::ok(if json {
                to_json_line(&GrantJson {
                    id: &g.id,
                    user: &g.user,
                    amount: g.amount,
                    balance_after: g.balance_after,
                    idempotency_key: &key,
                    replayed: g.replayed,
                })
            } else {
                let again = if g.replayed {
                    " (already granted with this key: nothing more credited)"
                } else {
                    ""
                };
                format!(
                    "granted {} to {}: balance {} (transfer {}, key {key}){again}\n",
                    g.amount, g.user, g.balance_after, g.id
                )
            }))
        }
        WalletCommand::Gifts => {
            let gifts = client
                .list_gift_catalogue(pb::ListGiftCatalogueRequest {})
                .await?
                .into_inner()
                .gifts;
            Ok(Outcome::ok(if json {
                gifts
                    .iter()
                    .map(|g| {
                        to_json_line(&CatalogueGiftJson {
                            id: &g.id,
                            name: &g.name,
                            price: g.price,
                        })
                    })
                    .collect()
            } else {
                let rows: Vec<[String; 3]> = gifts
                    .iter()
                    .map(|g| [g.id.clone(), g.name.clone(), g.price.to_string()])
                    .collect();
                table(["GIFT", "NAME", "PRICE"], &rows, "(no gifts)")
            }))
        }
        WalletCommand::Leaderboard { room, limit } => {
            let entries = client
                .gift_leaderboard(pb::GiftLeaderboardRequest {
                    room: room.clone(),
                    limit: *limit,
                })
                .await?
                .into_inner()
                .entries;
            Ok(Outcome::ok(if json {
                entries
                    .iter()
                    .map(|e| {
                        to_json_line(&LeaderboardEntryJson {
                            user: &e.user,
                            amount: e.amount,
                            gifts: e.gifts,
                        })
                    })
                    .collect()
            } else {
                let rows: Vec<[String; 3]> = entries
                    .iter()
                    .map(|e| [e.user.clone(), e.amount.to_string(), e.gifts.to_string()])
                    .collect();
                table(["USER", "AMOUNT", "GIFTS"], &rows, "(no gifts yet)")
            }))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    /// How the root binary embeds these arguments.
    #[derive(Debug, clap::Parser)]
    struct Root {
        #[command(subcommand)]
        command: RootCommand,
    }

    #[derive(Debug, clap::Subcommand)]
    enum RootCommand {
        Ctl(CtlArgs),
    }

    fn parse(args: &[&str]) -> CtlArgs {
        let RootCommand::Ctl(args) = Root::try_parse_from(args).unwrap().command;
        args
    }

    #[test]
    fn arguments_parse_as_documented() {
        Root::command().debug_assert();
        let args = parse(&["weir", "ctl", "token", "--room", "r", "--mode", "publish"]);
        assert!(!args.json);
        assert!(args.control.starts_with("http://"));
        let CtlCommand::Token(token) = args.command else {
            panic!("not a token command")
        };
        assert_eq!(
            (token.room.as_str(), token.mode, token.ttl),
            ("r", CtlMode::Publish, None)
        );

        let args = parse(&[
            "weir",
            "ctl",
            "rooms",
            "list",
            "--json",
            "--control",
            "http://h:1",
        ]);
        assert!(args.json);
        assert_eq!(args.control, "http://h:1");
        assert!(matches!(
            args.command,
            CtlCommand::Rooms {
                command: RoomsCommand::List
            }
        ));

        let args = parse(&[
            "weir",
            "ctl",
            "token",
            "--room",
            "r",
            "--mode",
            "chat",
            "--subject",
            "s",
            "--ttl",
            "60",
        ]);
        let CtlCommand::Token(token) = args.command else {
            panic!("not a token command")
        };
        assert_eq!((token.subject.as_deref(), token.ttl), (Some("s"), Some(60)));

        assert!(
            Root::try_parse_from(["weir", "ctl", "token", "--room", "r", "--mode", "x"]).is_err()
        );
    }

    #[test]
    fn table_is_aligned() {
        let rooms = vec![
            pb::RoomSummary {
                room: "lobby".into(),
                origin_node: "node-1".into(),
                live: true,
                subscribers: 12,
            },
            pb::RoomSummary {
                room: "r".into(),
                origin_node: String::new(),
                live: false,
                subscribers: 0,
            },
        ];
        assert_eq!(
            rooms_table(&rooms),
            "ROOM   ORIGIN  LIVE  SUBSCRIBERS\n\
             lobby  node-1  yes   12\n\
             r      -       no    0\n"
        );
        assert_eq!(
            rooms_table(&[]),
            "ROOM  ORIGIN  LIVE  SUBSCRIBERS\n(no rooms)\n"
        );
    }

    #[test]
    fn new_commands_parse() {
        let args = parse(&[
            "weir", "ctl", "config", "set", "a.b=1", "c.d=x=y", "--by", "ops",
        ]);
        let CtlCommand::Config {
            command:
                ConfigCommand::Set {
                    pairs,
                    by,
                    expect_version,
                },
        } = args.command
        else {
            panic!("not config set")
        };
        assert_eq!((pairs.len(), by.as_str(), expect_version), (2, "ops", None));
        assert_eq!(parse_pair("c.d=x=y").unwrap(), ("c.d".into(), "x=y".into()));
        assert!(parse_pair("novalue").is_err());
        assert!(parse_pair("=1").is_err());
        assert!(Root::try_parse_from(["weir", "ctl", "config", "set"]).is_err());
        for cmd in ["cordon", "drain", "uncordon"] {
            let args = parse(&["weir", "ctl", "nodes", cmd, "n1"]);
            assert!(matches!(args.command, CtlCommand::Nodes { .. }));
        }
        let args = parse(&["weir", "ctl", "wallet", "grant", "fan", "100", "--key", "k"]);
        let CtlCommand::Wallet {
            command: WalletCommand::Grant { user, amount, key },
        } = args.command
        else {
            panic!("not wallet grant")
        };
        assert_eq!(
            (user.as_str(), amount, key.as_deref()),
            ("fan", 100, Some("k"))
        );
        assert!(Root::try_parse_from(["weir", "ctl", "wallet", "grant", "fan", "x"]).is_err());
        let args = parse(&["weir", "ctl", "wallet", "leaderboard", "r1"]);
        assert!(matches!(
            args.command,
            CtlCommand::Wallet {
                command: WalletCommand::Leaderboard { limit: 10, .. }
            }
        ));
        let args = parse(&["weir", "ctl", "rooms", "show", "r1", "--json"]);
        assert!(matches!(
            args.command,
            CtlCommand::Rooms {
                command: RoomsCommand::Show { .. }
            }
        ));
    }

    #[test]
    fn rollout_top_and_cdns_parse() {
        let args = parse(&["weir", "ctl", "rollout", "set", "v1=90,v2=10", "v3=0"]);
        let CtlCommand::Rollout {
            command: RolloutCommand::Set { weights, .. },
        } = args.command
        else {
            panic!("not rollout set")
        };
        let parsed = parse_weights(&weights).unwrap();
        let pairs: Vec<(&str, u32)> = parsed
            .iter()
            .map(|w| (w.version.as_str(), w.weight))
            .collect();
        assert_eq!(pairs, [("v1", 90), ("v2", 10), ("v3", 0)]);
        for bad in ["v1=-1", "v1=x", "v1", "v1=1.5", "v1=", "v1=99999999999"] {
            let err = parse_weights(&[bad.to_owned()]).unwrap_err();
            assert_eq!(err.code, EXIT_USAGE, "{bad}");
            assert!(
                err.stderr.contains("VERSION=WEIGHT"),
                "{bad}: {}",
                err.stderr
            );
        }
        assert!(Root::try_parse_from(["weir", "ctl", "rollout", "set"]).is_err());
        assert!(matches!(
            parse(&["weir", "ctl", "rollout", "get", "--json"]).command,
            CtlCommand::Rollout {
                command: RolloutCommand::Get
            }
        ));
        assert!(matches!(
            parse(&["weir", "ctl", "rollout", "clear"]).command,
            CtlCommand::Rollout {
                command: RolloutCommand::Clear { .. }
            }
        ));
        assert!(matches!(
            parse(&["weir", "ctl", "cdns", "list"]).command,
            CtlCommand::Cdns {
                command: CdnsCommand::List
            }
        ));
        let CtlCommand::Top(top) = parse(&["weir", "ctl", "top", "--once", "--json"]).command
        else {
            panic!("not top")
        };
        assert!(top.once && top.iterations.is_none() && top.rooms == 10);
        let CtlCommand::Top(top) = parse(&["weir", "ctl", "top", "--iterations", "3"]).command
        else {
            panic!("not top")
        };
        assert_eq!(top.iterations, Some(3));
        assert!(Root::try_parse_from(["weir", "ctl", "top", "--iterations", "0"]).is_err());
        assert!(
            Root::try_parse_from(["weir", "ctl", "top", "--once", "--iterations", "2"]).is_err()
        );
    }

    #[test]
    fn rollout_prints_shares() {
        let state = pb::RolloutState {
            weights: vec![
                pb::VersionWeight {
                    version: "v1".into(),
                    weight: 90,
                },
                pb::VersionWeight {
                    version: "v2".into(),
                    weight: 10,
                },
            ],
            version: 2,
            updated_unix_ms: 1_000,
            updated_by: "ops".into(),
            versions: vec![
                pb::VersionStatus {
                    version: "v1".into(),
                    weight: 90,
                    nodes: 2,
                    schedulable_nodes: 2,
                    share: 0.9,
                },
                pb::VersionStatus {
                    version: "v2".into(),
                    weight: 10,
                    nodes: 1,
                    schedulable_nodes: 1,
                    share: 0.1,
                },
            ],
        };
        assert_eq!(
            rollout_text(&state),
            "VERSION  WEIGHT  SHARE  NODES  SCHEDULABLE\n\
             v1       90      90.0%  2      2\n\
             v2       10      10.0%  1      1\n\
             weights: v1=90,v2=10 (version 2, set 1970-01-01T00:00:01Z by ops)\n"
        );
        let json: serde_json::Value = serde_json::from_str(&rollout_json(&state)).unwrap();
        assert_eq!(json["weights"]["v2"], 10);
        assert_eq!(json["versions"][0]["share"], 0.9);
    }

    #[test]
    fn times_print_as_utc() {
        assert_eq!(when(None), "-");
        assert_eq!(when(Some(0)), "-");
        assert_eq!(when(Some(1_000)), "1970-01-01T00:00:01Z");
        assert_eq!(when(Some(1_795_500_691_000)), "2026-11-24T06:11:31Z");
        assert_eq!(when(Some(951_782_400_000)), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn node_states_read_plainly() {
        let mut n = pb::NodeStatus {
            alive: true,
            schedulable: true,
            ..Default::default()
        };
        assert_eq!(node_state(&n), "ready");
        n.cordoned = true;
        n.schedulable = false;
        assert_eq!(node_state(&n), "cordoned");
        n.draining = true;
        assert_eq!(node_state(&n), "draining");
        n.alive = false;
        assert_eq!(node_state(&n), "away");
    }

    #[test]
    fn statuses_map_to_exit_codes() {
        let cases = [
            (tonic::Status::invalid_argument("x"), EXIT_USAGE),
            (tonic::Status::unavailable("x"), EXIT_UNAVAILABLE),
            (tonic::Status::permission_denied("x"), EXIT_NOPERM),
            (tonic::Status::internal("x"), EXIT_FAILURE),
            (tonic::Status::already_exists("x"), EXIT_DATAERR),
            (tonic::Status::failed_precondition("x"), EXIT_DATAERR),
            (tonic::Status::aborted("x"), EXIT_TEMPFAIL),
            (tonic::Status::not_found("x"), EXIT_USAGE),
        ];
        for (status, code) in cases {
            assert_eq!(status_outcome("u", &status).code, code);
        }
    }

    #[tokio::test]
    async fn bad_urls_are_usage_errors() {
        let args = CtlArgs {
            control: "not a url".into(),
            json: false,
            command: CtlCommand::Rooms {
                command: RoomsCommand::List,
            },
        };
        let outcome = execute(args).await;
        assert_eq!(outcome.code, EXIT_USAGE, "{outcome:?}");
        assert!(outcome.stderr.contains("--control"));
    }
}
