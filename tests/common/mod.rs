//! Shared helpers of the end-to-end tests: a `weir dev` process on free
//! loopback ports, and small HTTP helpers.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

pub mod ffmpeg;
pub mod nginx;
pub mod proc;
pub mod ws;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use weir_loadtest::http::{Response, request};

/// A `weir dev` process; stopped (SIGTERM, then SIGKILL) on drop.
pub struct DevServer {
    child: Child,
    pub node: String,
    pub control: String,
    pub udp: SocketAddr,
    /// The SRT listener (`weir dev` prints `SRT publish   srt://HOST:PORT?...`).
    pub srt: SocketAddr,
    pub dir: PathBuf,
    /// What `weir dev` printed on start.
    printed: Vec<String>,
}

/// `weir ctl --control CONTROL ARGS…` (ignoring any `WEIR_CONTROL` of the
/// environment), with its exit status and output.
pub fn ctl(control: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["ctl", "--control", control])
        .args(args)
        .env_remove("WEIR_CONTROL")
        .output()
        .unwrap()
}

/// POSTs `body` as JSON to `base` + `path` and asserts a 200 answer.
pub async fn post_json_ok(base: &str, path: &str, body: &serde_json::Value) {
    let r = request(
        "POST",
        &format!("{base}{path}"),
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "POST {path}: {}", r.text());
}

/// A fresh directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "weir-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl DevServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// `weir dev` with extra arguments (after the test's own).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = temp_dir("dev");
        let log = std::fs::File::create(dir.join("weir.log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args([
                "--log-format",
                "json",
                "dev",
                "--http",
                "127.0.0.1:0",
                "--grpc",
                "127.0.0.1:0",
            ])
            .args(["--udp", "127.0.0.1:0", "--srt", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("data"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("weir binary runs");
        let stdout = child.stdout.take().unwrap();
        let (mut node, mut control, mut udp, mut srt) = (None, None, None, None);
        let mut printed = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            printed.push(line.clone());
            let value = line
                .split_whitespace()
                .last()
                .unwrap_or_default()
                .to_owned();
            if line.starts_with("metrics ") {
                node = Some(value.trim_end_matches("/metrics").to_owned());
            } else if line.starts_with("control API") {
                control = line
                    .split_whitespace()
                    .find(|w| w.starts_with("http://"))
                    .map(str::to_owned);
            } else if line.starts_with("WebRTC UDP") {
                udp = value.parse().ok();
            } else if line.starts_with("SRT publish") {
                srt = value
                    .strip_prefix("srt://")
                    .and_then(|v| v.split('?').next())
                    .and_then(|v| v.parse().ok());
            } else if line.starts_with("Press Ctrl-C") {
                break;
            }
        }
        let server = Self {
            child,
            node: node.expect("weir dev printed its metrics URL"),
            control: control.expect("weir dev printed its control URL"),
            udp: udp.expect("weir dev printed its UDP address"),
            srt: srt.expect("weir dev printed its SRT URL"),
            dir,
            printed,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = self.node.trim_start_matches("http://").to_owned();
        while Instant::now() < deadline {
            if ready(&addr) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("weir dev did not become ready; log: {}", self.log());
    }

    /// The lines `weir dev` printed on start.
    pub fn stdout_lines(&self) -> &[String] {
        &self.printed
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("weir.log")).unwrap_or_default()
    }

    /// Mints a token through the control plane's JSON gateway.
    pub async fn token(&self, room: &str, mode: &str, subject: &str) -> String {
        let body =
            serde_json::json!({ "room": room, "mode": mode, "subject": subject }).to_string();
        let r = request(
            "POST",
            &format!("{}/v1/tokens", self.control),
            &[("Content-Type", "application/json")],
            body.as_bytes(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        v["token"].as_str().unwrap().to_owned()
    }

    /// Value of an unlabelled metric (or the sum over its labelled series).
    pub async fn metric(&self, name: &str) -> f64 {
        let r = request(
            "GET",
            &format!("{}/metrics", self.node),
            &[],
            b"",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        r.text()
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl DevServer {
    /// Sum of a metric's series whose labels contain `labels` (e.g.
    /// `reason="token"`).
    pub async fn metric_with(&self, name: &str, labels: &str) -> f64 {
        let r = request(
            "GET",
            &format!("{}/metrics", self.node),
            &[],
            b"",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        r.text()
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
            .filter(|l| l.split('}').next().is_some_and(|h| h.contains(labels)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Blocking `GET /readyz`: usable before or outside any runtime.
fn ready(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    s.write_all(req.as_bytes()).is_ok()
        && s.read_to_string(&mut out).is_ok()
        && out.starts_with("HTTP/1.1 200")
}

impl Drop for DevServer {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WebRTC offer from a str0m peer: recvonly (a viewer) or sendonly (a publisher).
pub fn offer(send: bool) -> String {
    use str0m::media::{Direction, MediaKind};
    weir_data_plane::install_crypto_provider();
    let mut rtc = str0m::Rtc::builder().build(Instant::now());
    rtc.add_local_candidate(str0m::Candidate::host("127.0.0.1:9".parse().unwrap(), "udp").unwrap());
    let dir = if send {
        Direction::SendOnly
    } else {
        Direction::RecvOnly
    };
    let mut change = rtc.sdp_api();
    change.add_media(MediaKind::Audio, dir, None, None, None);
    change.add_media(MediaKind::Video, dir, None, None, None);
    change.apply().unwrap().0.to_sdp_string()
}
