//! The client side of `weir ctl`: arguments, calls to the control plane's gRPC
//! API, and output for people (plain text) or scripts (`--json`).
//!
//! Exit codes follow sysexits: 0 ok, 64 bad usage or an argument the control
//! plane refused, 69 control plane unreachable or unavailable, 77 permission
//! denied, 1 anything else.

use std::time::Duration;

use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use weir_protocol::pb;
use weir_protocol::pb::scheduler_client::SchedulerClient;
use weir_protocol::pb::tokens_client::TokensClient;

use crate::service::REQUEST_ID_HEADER;

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: failure of another kind.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code: bad usage or invalid argument (sysexits `EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;
/// Exit code: the control plane is unreachable or unavailable (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: i32 = 69;
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
    use std::io::Write;
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
        CtlCommand::Rooms {
            command: RoomsCommand::List,
        } => list_rooms(channel, args.json).await,
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

fn error_chain(err: &dyn std::error::Error) -> String {
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
                if r.live {
                    "yes".to_owned()
                } else {
                    "no".to_owned()
                },
                r.subscribers.to_string(),
            ]
        })
        .collect();
    let header = ["ROOM", "ORIGIN", "LIVE", "SUBSCRIBERS"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(no rooms)\n");
    }
    out
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
    fn statuses_map_to_exit_codes() {
        let cases = [
            (tonic::Status::invalid_argument("x"), EXIT_USAGE),
            (tonic::Status::unavailable("x"), EXIT_UNAVAILABLE),
            (tonic::Status::permission_denied("x"), EXIT_NOPERM),
            (tonic::Status::internal("x"), EXIT_FAILURE),
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
