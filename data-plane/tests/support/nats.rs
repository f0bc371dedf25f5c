//! Real NATS JetStream servers for tests: Debian's `nats-server` (2.9)
//! started as child processes on free loopback ports, with their JetStream
//! store under a fresh temp dir, killed (SIGKILL) and removed on drop. One
//! server ([`Nats::start`]) or a cluster of three ([`NatsCluster::start`],
//! R3 streams work there). Standard library only, so any test crate can
//! include this file (`#[path = ".../support/nats.rs"] mod nats;`).
//!
//! There is no skipping: when the binary is missing the test panics and says
//! how to install it. `WEIR_NATS_BIN` overrides where the binary is looked for.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a fresh or restarted server may take to report healthy.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The nats-server binary, or a panic that says how to get one.
pub fn nats_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WEIR_NATS_BIN").map(PathBuf::from) {
        assert!(
            path.is_file(),
            "WEIR_NATS_BIN={} is not a file; unset it or point it at nats-server 2.9+",
            path.display()
        );
        return path;
    }
    let mut candidates = vec![
        PathBuf::from("/usr/sbin/nats-server"),
        PathBuf::from("/usr/bin/nats-server"),
    ];
    if let Some(paths) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&paths).map(|p| p.join("nats-server")));
    }
    candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "this test needs a real nats-server and none was found (looked at $WEIR_NATS_BIN, \
             /usr/sbin, /usr/bin and $PATH). Install Debian's nats-server: \
             `deploy/setup.sh --test` (or `apt-get install nats-server`)."
        )
    })
}

fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "weir-nats-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temp dir for nats-server");
    dir
}

/// Distinct free loopback TCP ports (bound to 0, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// One nats-server process with JetStream on.
pub struct Nats {
    pub name: String,
    pub client_port: u16,
    pub monitor_port: u16,
    /// `Some` in a cluster: this server's route port and every route URL.
    cluster: Option<(u16, Vec<String>)>,
    /// A WebSocket listener (for side-by-side benchmarks), if asked for.
    pub websocket_port: Option<u16>,
    dir: PathBuf,
    child: Option<Child>,
    owns_dir: bool,
}

impl Nats {
    /// A single JetStream server, healthy when this returns.
    pub fn start() -> Self {
        Self::start_with_websocket(false)
    }

    /// A single JetStream server, with a plain WebSocket listener too when
    /// `websocket` is set.
    pub fn start_with_websocket(websocket: bool) -> Self {
        let mut last = String::new();
        for _ in 0..3 {
            let ports = free_ports(3);
            let mut nats = Self {
                name: "solo".into(),
                client_port: ports[0],
                monitor_port: ports[1],
                cluster: None,
                websocket_port: websocket.then_some(ports[2]),
                dir: temp_dir("single"),
                child: None,
                owns_dir: true,
            };
            nats.spawn();
            match nats.wait_healthy(START_TIMEOUT) {
                Ok(()) => return nats,
                Err(e) => last = e,
            }
        }
        panic!("nats-server did not start: {last}");
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) {
        let store = self.dir.join(&self.name);
        std::fs::create_dir_all(&store).expect("create the JetStream store dir");
        let config = self.dir.join(format!("{}.conf", self.name));
        let mut text = format!(
            "server_name: {name}\nhost: 127.0.0.1\nport: {port}\nhttp_port: {mon}\n\
             jetstream {{\n  store_dir: \"{store}\"\n}}\n",
            name = self.name,
            port = self.client_port,
            mon = self.monitor_port,
            store = store.display(),
        );
        if let Some((route_port, routes)) = &self.cluster {
            text.push_str(&format!(
                "cluster {{\n  name: weir-test\n  listen: \"127.0.0.1:{route_port}\"\n  routes: [\n{}\n  ]\n}}\n",
                routes
                    .iter()
                    .map(|r| format!("    \"{r}\""))
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
        }
        if let Some(ws) = self.websocket_port {
            // The block must span lines (the one-line form fails to parse).
            text.push_str(&format!(
                "websocket {{\n  listen: \"127.0.0.1:{ws}\"\n  no_tls: true\n}}\n"
            ));
        }
        std::fs::write(&config, text).expect("write nats-server config");
        let log = std::fs::File::create(self.dir.join(format!("{}.log", self.name)))
            .expect("create nats-server log");
        let child = Command::new(nats_binary())
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
    }

    /// Waits until `/healthz?js-enabled-only=true` answers ok.
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "nats-server {} exited with {status}; log: {}",
                    self.name,
                    self.log_tail()
                ));
            }
            match http_get(self.monitor_port, "/healthz?js-enabled-only=true") {
                Ok(body) if body.contains("\"ok\"") => return Ok(()),
                Ok(body) => last = body,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("not healthy after {timeout:?}: {last}"))
    }

    /// The last lines the server logged.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{}.log", self.name)))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGKILL, keeping the store for a restart.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Three JetStream servers routed into one cluster.
pub struct NatsCluster {
    pub servers: Vec<Nats>,
    dir: PathBuf,
}

impl NatsCluster {
    /// A 3-server cluster with a JetStream meta leader, ready when this returns.
    pub fn start() -> Self {
        let dir = temp_dir("cluster");
        let ports = free_ports(9);
        let routes: Vec<String> = (0..3)
            .map(|i| format!("nats-route://127.0.0.1:{}", ports[i * 3 + 2]))
            .collect();
        let mut servers: Vec<Nats> = (0..3)
            .map(|i| Nats {
                name: format!("n{i}"),
                client_port: ports[i * 3],
                monitor_port: ports[i * 3 + 1],
                cluster: Some((ports[i * 3 + 2], routes.clone())),
                websocket_port: None,
                dir: dir.clone(),
                child: None,
                owns_dir: false,
            })
            .collect();
        for s in &mut servers {
            s.spawn();
        }
        for s in &mut servers {
            if let Err(e) = s.wait_healthy(START_TIMEOUT) {
                panic!("nats cluster server {} did not start: {e}", s.name);
            }
        }
        Self { servers, dir }
    }

    /// Every client URL, comma separated (what `--nats` takes).
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(Nats::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            s.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn http_get(port: u16, path: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut body = String::new();
    stream.read_to_string(&mut body).map_err(|e| e.to_string())?;
    Ok(body)
}
