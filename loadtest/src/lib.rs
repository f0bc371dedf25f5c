//! `weir loadtest`: synthetic WebRTC publishers (WHIP, sending a real VP8
//! clip) and viewers (WHEP), on str0m, measuring join time, time to first
//! frame, received media, freezes and end-to-end delay, reported as
//! percentiles (hdrhistogram) in a table or JSON. Bounded in count and time;
//! it sends only to the addresses the control plane it is given hands out.
//!
//! `weir loadtest events` loads a node's room events WebSocket instead
//! (module [`events`]), or nats-server's own WebSocket as the peer to
//! compare with ([`nats_ws`]).
//!
//! `weir loadtest gifts` loads the control plane's wallet instead (module
//! [`gifts`]): concurrent senders paying gifts over gRPC, committed gifts
//! per second and latency, then a check of the server's balances and ledgers.

pub mod clip;
pub mod events;
pub mod gifts;
pub mod http;
pub mod nats_ws;
pub mod publisher;
pub mod viewer;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::Serialize;

pub use clip::Clip;
pub use publisher::{PublishTarget, PublisherReport};
pub use viewer::{Target, ViewerReport};

/// Most publishers one run may start.
pub const MAX_PUBLISHERS: u32 = 200;

/// Most viewers one run may start.
pub const MAX_VIEWERS: u32 = 5000;
/// Longest run.
pub const MAX_DURATION_SECS: u64 = 3600;

/// `weir loadtest`: WebRTC viewers (the options below), or a mode.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LoadtestCommand {
    #[command(subcommand)]
    pub mode: Option<LoadtestMode>,
    #[command(flatten)]
    pub viewers: Option<LoadtestArgs>,
}

/// What else `weir loadtest` can load.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum LoadtestMode {
    /// Room events: WebSocket subscribers over rooms of a node, chatters
    /// sending danmaku at a rate; deliveries/s, delivery latency, gaps,
    /// disconnects, mass reconnect with recovery. Or the same load on
    /// nats-server's own WebSocket (--target nats-ws).
    Events(events::EventsArgs),
    /// Gifts: concurrent senders (each a funded user of the run) paying
    /// gifts over gRPC to a control plane; committed gifts/s, latency
    /// percentiles, errors by gRPC code, an idempotent-retry share, and a
    /// check of balances, ledgers and leaderboards afterwards.
    Gifts(gifts::GiftsArgs),
}

/// Entry point of `weir loadtest [events|gifts]`; returns the exit code.
pub async fn run_command(command: LoadtestCommand) -> anyhow::Result<i32> {
    match (command.mode, command.viewers) {
        (Some(LoadtestMode::Events(args)), _) => events::run(args).await,
        (Some(LoadtestMode::Gifts(args)), _) => gifts::run(args).await,
        (None, Some(args)) => run(args).await,
        (None, None) => {
            bail!(
                "give --room ROOM for WebRTC viewers, or a mode (`weir loadtest events --help`, `weir loadtest gifts --help`)"
            )
        }
    }
}

/// `weir loadtest` options (WebRTC viewers).
#[derive(Debug, Clone, clap::Args)]
pub struct LoadtestArgs {
    /// Control plane to ask for the WHEP endpoint and a play token.
    #[arg(long, env = "WEIR_CONTROL", default_value = "http://127.0.0.1:7000")]
    pub control: String,
    /// Room to play; with several publishers, rooms ROOM-0, ROOM-1, ...
    #[arg(long)]
    pub room: String,
    /// Synthetic publishers to start (0: play a room someone else publishes).
    #[arg(long, default_value_t = 0)]
    pub publishers: u32,
    /// VP8 clip (IVF) the publishers send; generated with ffmpeg when absent.
    #[arg(long)]
    pub clip: Option<std::path::PathBuf>,
    /// Bit rate of the generated clip, kbit/s.
    #[arg(long, default_value_t = 1500)]
    pub clip_kbps: u32,
    /// Number of viewers (at most 5000).
    #[arg(long, default_value_t = 10)]
    pub viewers: u32,
    /// How long each viewer plays, in seconds (at most 3600).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Pause between starting two viewers, in milliseconds.
    #[arg(long, default_value_t = 10)]
    pub ramp_ms: u64,
    /// Local address the viewers' UDP sockets bind to.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Light viewers: once connected, read only the clear RTP headers
    /// (sequence numbers, marker bits, capture times) and leave SRTP
    /// unopened, so that one core plays many more viewers; loss is counted
    /// from sequence numbers (no NACKs sent), frames from marker bits.
    #[arg(long)]
    pub light: bool,
}

/// Percentiles of one measure.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub room: String,
    pub viewers: u32,
    pub failed: u32,
    pub errors: Vec<String>,
    pub join_ms: Option<Percentiles>,
    pub first_frame_ms: Option<Percentiles>,
    pub video_fps: Option<Percentiles>,
    pub received_kbps: Option<Percentiles>,
    pub freezes: u64,
    pub viewers_without_video: u32,
    /// Capture-to-arrival delay of video frames (publisher to viewer), when
    /// the viewer read them.
    pub delay_ms: Option<Percentiles>,
    /// The same delay when the frames reached the viewers' sockets (kernel
    /// receive timestamps; light viewers only): without the wait for a busy
    /// load generator.
    pub arrival_delay_ms: Option<Percentiles>,
    /// Per-viewer video packet loss before retransmission, percent.
    pub loss_pct: Option<Percentiles>,
    pub video_packets: u64,
    pub nacks: u64,
    pub publishers: u32,
    pub publishers_failed: u32,
}

pub(crate) fn percentiles(h: &Histogram<u64>, scale: f64) -> Option<Percentiles> {
    (!h.is_empty()).then(|| Percentiles {
        count: h.len(),
        p50: h.value_at_quantile(0.5) as f64 / scale,
        p90: h.value_at_quantile(0.9) as f64 / scale,
        p99: h.value_at_quantile(0.99) as f64 / scale,
        p999: h.value_at_quantile(0.999) as f64 / scale,
        max: h.max() as f64 / scale,
    })
}

/// Folds viewer reports into percentiles.
pub fn summarize(room: &str, reports: &[ViewerReport]) -> anyhow::Result<Summary> {
    let mut join = Histogram::<u64>::new(3)?;
    let mut first = Histogram::<u64>::new(3)?;
    let mut fps = Histogram::<u64>::new(3)?;
    let mut kbps = Histogram::<u64>::new(3)?;
    let mut delay = Histogram::<u64>::new(3)?;
    let mut arrival = Histogram::<u64>::new(3)?;
    let mut loss = Histogram::<u64>::new(3)?;
    let mut errors = Vec::new();
    let mut without_video = 0;
    for r in reports {
        if let Some(e) = &r.error
            && errors.len() < 10
        {
            errors.push(e.clone());
        }
        if let Some(j) = r.join {
            join.record(j.as_micros() as u64)?;
        }
        match r.first_frame {
            Some(f) => first.record(f.as_micros() as u64)?,
            None => without_video += 1,
        }
        if let Some(l) = r.loss_pct {
            // Hundredths of a percent.
            loss.record((l * 100.0) as u64)?;
        }
        for d in &r.delays_us {
            delay.record(*d)?;
        }
        for d in &r.arrival_delays_us {
            arrival.record(*d)?;
        }
        let secs = r.played.as_secs_f64();
        if secs > 0.5 {
            fps.record((r.video_frames as f64 / secs * 100.0) as u64)?;
            kbps.record((r.media_bytes as f64 * 8.0 / secs) as u64)?;
        }
    }
    Ok(Summary {
        room: room.to_owned(),
        viewers: reports.len() as u32,
        failed: reports.iter().filter(|r| r.error.is_some()).count() as u32,
        errors,
        join_ms: percentiles(&join, 1000.0),
        first_frame_ms: percentiles(&first, 1000.0),
        video_fps: percentiles(&fps, 100.0),
        received_kbps: percentiles(&kbps, 1000.0),
        freezes: reports.iter().map(|r| r.freezes).sum(),
        viewers_without_video: without_video,
        delay_ms: percentiles(&delay, 1000.0),
        arrival_delay_ms: percentiles(&arrival, 1000.0),
        loss_pct: percentiles(&loss, 100.0),
        video_packets: reports.iter().map(|r| r.video_packets).sum(),
        nacks: reports.iter().map(|r| r.nacks).sum(),
        publishers: 0,
        publishers_failed: 0,
    })
}

/// Asks the control plane's JSON gateway (`/v1/{call}`) for `room`'s first
/// endpoint of `kind` and a token: (endpoint URL, token).
async fn assign(
    control: &str,
    call: &str,
    kind: &str,
    room: &str,
) -> anyhow::Result<(String, String)> {
    let url = format!("{}/v1/{call}", control.trim_end_matches('/'));
    let body = serde_json::json!({ "room": room }).to_string();
    let res = http::request(
        "POST",
        &url,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
        Duration::from_secs(10),
    )
    .await?;
    if res.status != 200 {
        bail!("{call} answered {}: {}", res.status, res.text().trim());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&res.body).with_context(|| format!("{call}: bad JSON"))?;
    let token = v["token"]
        .as_str()
        .with_context(|| format!("{call}: no token"))?
        .to_owned();
    let endpoint = v["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["kind"] == kind))
        .and_then(|e| e["url"].as_str())
        .with_context(|| format!("{call}: no {kind} endpoint"))?
        .to_owned();
    Ok((endpoint, token))
}

/// Asks the control plane for the room's WHEP endpoint and a play token.
pub async fn assign_viewer(control: &str, room: &str) -> anyhow::Result<Target> {
    let (whep_url, token) = assign(control, "assign-viewer", "whep", room).await?;
    Ok(Target { whep_url, token })
}

/// Asks the control plane where to publish `room`, with a publish token.
pub async fn assign_publisher(control: &str, room: &str) -> anyhow::Result<PublishTarget> {
    let (whip_url, token) = assign(control, "assign-publisher", "whip", room).await?;
    Ok(PublishTarget { whip_url, token })
}

/// Runs the viewers and returns their reports.
pub async fn run_viewers(targets: &[Target], args: &LoadtestArgs) -> Vec<ViewerReport> {
    let mut tasks = Vec::with_capacity(args.viewers as usize);
    let duration = Duration::from_secs(args.duration);
    for i in 0..args.viewers as usize {
        let target = targets[i % targets.len()].clone();
        let (bind, light) = (args.bind, args.light);
        let deadline = Instant::now() + duration;
        tasks.push(tokio::spawn(async move {
            viewer::run_with(&target, bind, deadline, light).await
        }));
        tokio::time::sleep(Duration::from_millis(args.ramp_ms)).await;
    }
    let mut reports = Vec::with_capacity(tasks.len());
    for t in tasks {
        reports.push(t.await.unwrap_or_else(|e| ViewerReport {
            error: Some(format!("viewer task failed: {e}")),
            ..ViewerReport::default()
        }));
    }
    reports
}

/// Entry point of `weir loadtest`; returns the exit code (0 when every
/// viewer played video).
pub async fn run(args: LoadtestArgs) -> anyhow::Result<i32> {
    if args.viewers == 0 || args.viewers > MAX_VIEWERS {
        bail!("--viewers must be between 1 and {MAX_VIEWERS}");
    }
    if args.duration == 0 || args.duration > MAX_DURATION_SECS {
        bail!("--duration must be between 1 and {MAX_DURATION_SECS} seconds");
    }
    if args.publishers > MAX_PUBLISHERS {
        bail!("--publishers must be at most {MAX_PUBLISHERS}");
    }
    weir_protocol::RoomId::parse(&args.room).map_err(|e| anyhow::anyhow!("--room: {e}"))?;
    str0m::crypto::from_feature_flags().install_process_default();
    let rooms: Vec<String> = match args.publishers {
        0 | 1 => vec![args.room.clone()],
        n => (0..n).map(|i| format!("{}-{i}", args.room)).collect(),
    };
    let publishers = if args.publishers > 0 {
        let clip = match &args.clip {
            Some(path) => Clip::read_ivf(path)?,
            None => Clip::read_ivf(&Clip::generate(
                &std::env::temp_dir(),
                1280,
                720,
                args.clip_kbps,
            )?)?,
        };
        let clip = std::sync::Arc::new(clip);
        // Publishers run a little longer than the viewers they feed.
        let deadline = Instant::now() + Duration::from_secs(args.duration) + Duration::from_secs(3);
        let mut tasks = Vec::new();
        for room in &rooms {
            let target = assign_publisher(&args.control, room).await?;
            let clip = clip.clone();
            let bind = args.bind;
            tasks.push(tokio::spawn(async move {
                publisher::run(&target, &clip, bind, deadline).await
            }));
        }
        // Let the rooms go live before viewers come.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tasks
    } else {
        Vec::new()
    };
    let mut targets = Vec::new();
    for room in &rooms {
        targets.push(assign_viewer(&args.control, room).await?);
    }
    let reports = run_viewers(&targets, &args).await;
    let mut summary = summarize(&args.room, &reports)?;
    summary.publishers = publishers.len() as u32;
    for t in publishers {
        let report = t.await.unwrap_or_else(|e| PublisherReport {
            error: Some(format!("publisher task failed: {e}")),
            ..PublisherReport::default()
        });
        if let Some(e) = report.error {
            summary.publishers_failed += 1;
            if summary.errors.len() < 10 {
                summary.errors.push(format!("publisher: {e}"));
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_table(&summary);
    }
    Ok(
        if summary.failed == 0 && summary.viewers_without_video == 0 {
            0
        } else {
            1
        },
    )
}

fn print_table(s: &Summary) {
    if s.publishers > 0 {
        println!(
            "{} publishers, {} failed",
            s.publishers, s.publishers_failed
        );
    }
    println!(
        "room {}: {} viewers, {} failed, {} without video, {} freezes (> {} ms)",
        s.room,
        s.viewers,
        s.failed,
        s.viewers_without_video,
        s.freezes,
        viewer::FREEZE_GAP.as_millis()
    );
    println!(
        "{:<18} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "measure", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    for (name, p) in [
        ("join (ms)", &s.join_ms),
        ("first frame (ms)", &s.first_frame_ms),
        ("video fps", &s.video_fps),
        ("received kbit/s", &s.received_kbps),
        ("delay (ms)", &s.delay_ms),
        ("arrival delay (ms)", &s.arrival_delay_ms),
        ("video loss (%)", &s.loss_pct),
    ] {
        match p {
            Some(p) => println!(
                "{:<18} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                name, p.count, p.p50, p.p90, p.p99, p.p999, p.max
            ),
            None => println!("{name:<18} {:>8}", 0),
        }
    }
    for e in &s.errors {
        println!("error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> LoadtestArgs {
        LoadtestArgs {
            // Nothing listens here: every case must fail before connecting.
            control: "http://127.0.0.1:1".into(),
            room: "r".into(),
            publishers: 0,
            clip: None,
            clip_kbps: 1500,
            viewers: 1,
            duration: 1,
            ramp_ms: 0,
            bind: "127.0.0.1".parse().unwrap_or(IpAddr::from([127, 0, 0, 1])),
            json: true,
            light: false,
        }
    }

    #[tokio::test]
    async fn bounds_and_bad_input_are_refused_before_any_traffic() {
        for (bad, want) in [
            (
                LoadtestArgs {
                    viewers: 0,
                    ..args()
                },
                "--viewers",
            ),
            (
                LoadtestArgs {
                    viewers: MAX_VIEWERS + 1,
                    ..args()
                },
                "--viewers",
            ),
            (
                LoadtestArgs {
                    duration: 0,
                    ..args()
                },
                "--duration",
            ),
            (
                LoadtestArgs {
                    duration: MAX_DURATION_SECS + 1,
                    ..args()
                },
                "--duration",
            ),
            (
                LoadtestArgs {
                    publishers: MAX_PUBLISHERS + 1,
                    ..args()
                },
                "--publishers",
            ),
            (
                LoadtestArgs {
                    room: "no spaces".into(),
                    ..args()
                },
                "--room",
            ),
        ] {
            let e = run(bad)
                .await
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(want), "{e:?} should name {want}");
        }
        // A control plane that does not answer is a clear error, not a hang.
        let e = run(args())
            .await
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("cannot connect"), "{e}");
    }
}
