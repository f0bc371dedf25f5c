//! Real etcd servers for tests: Debian's `etcd-server` (3.4) started as child
//! processes on free loopback ports, with their data under a fresh temp dir,
//! killed (SIGKILL) and removed on drop. One member ([`Etcd::start`]) or a
//! cluster ([`EtcdCluster::start`]). Standard library only, so any test crate
//! can include this file (`#[path = ".../support/etcd.rs"] mod etcd;`).
//!
//! There is no skipping: when the binary is missing the test panics and says
//! how to install it. `WEIR_ETCD_BIN` overrides where the binary is looked for.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a fresh or restarted member may take to report healthy.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The etcd binary, or a panic that says how to get one.
pub fn etcd_binary() -> PathBuf {
    let mut candidates = vec![PathBuf::from("/usr/bin/etcd")];
    if let Some(paths) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&paths).map(|p| p.join("etcd")));
    }
    let chosen = std::env::var_os("WEIR_ETCD_BIN").map(PathBuf::from);
    find_etcd(chosen, &candidates).unwrap_or_else(|msg| panic!("{msg}"))
}

/// `chosen` (from `WEIR_ETCD_BIN`) if set, else the first candidate that
/// exists; the error says what to install.
pub fn find_etcd(chosen: Option<PathBuf>, candidates: &[PathBuf]) -> Result<PathBuf, String> {
    if let Some(path) = chosen {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "WEIR_ETCD_BIN={} is not a file; unset it or point it at an etcd 3.4+ binary",
                path.display()
            ))
        };
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            "this test needs a real etcd and none was found (looked at $WEIR_ETCD_BIN, \
         /usr/bin/etcd and $PATH). Install Debian's etcd-server: \
         `deploy/setup.sh --test` (or `apt-get install etcd-server`)."
                .to_owned()
        })
}

fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "weir-etcd-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temp dir for etcd");
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

/// One etcd member process.
pub struct Etcd {
    name: String,
    client_port: u16,
    peer_port: u16,
    initial_cluster: String,
    cluster_token: String,
    dir: PathBuf,
    child: Option<Child>,
    /// Whether this value owns `dir` (a cluster's members share the cluster's).
    owns_dir: bool,
}

impl Etcd {
    /// A single-member etcd, healthy when this returns.
    pub fn start() -> Self {
        let mut last = String::new();
        // A port picked as free may be taken again before etcd binds it:
        // try with new ports a few times.
        for _ in 0..3 {
            let dir = temp_dir("single");
            let ports = free_ports(2);
            let mut etcd = Self::member(
                "solo",
                ports[0],
                ports[1],
                format!("solo=http://127.0.0.1:{}", ports[1]),
                dir,
                true,
            );
            etcd.spawn();
            match etcd.wait_healthy(START_TIMEOUT) {
                Ok(()) => return etcd,
                Err(e) => last = e,
            }
        }
        panic!("etcd did not start: {last}");
    }

    /// A single member with its ports and data dir chosen but not started
    /// ([`Etcd::restart`] starts it): for tests of processes that start
    /// before etcd does.
    pub fn reserve() -> Self {
        let dir = temp_dir("single");
        let ports = free_ports(2);
        Self::member(
            "solo",
            ports[0],
            ports[1],
            format!("solo=http://127.0.0.1:{}", ports[1]),
            dir,
            true,
        )
    }

    fn member(
        name: &str,
        client_port: u16,
        peer_port: u16,
        initial_cluster: String,
        dir: PathBuf,
        owns_dir: bool,
    ) -> Self {
        let cluster_token = format!(
            "weir-test-{}-{}",
            std::process::id(),
            dir.file_name().unwrap().to_string_lossy()
        );
        Self {
            name: name.to_owned(),
            client_port,
            peer_port,
            initial_cluster,
            cluster_token,
            dir,
            child: None,
            owns_dir,
        }
    }

    /// The client URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The member's name (`--name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where its log goes (appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    /// The tail of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let start = log.len().saturating_sub(4000);
        let start = (start..log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(log.len());
        log[start..].to_owned()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join(format!("{}.etcd", self.name))
    }

    fn spawn(&mut self) {
        assert!(
            self.child.is_none(),
            "etcd {} is already running",
            self.name
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the etcd log");
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(etcd_binary())
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.cluster_token])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone the log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", etcd_binary().display()));
        self.child = Some(child);
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits until `/health` says true (the member has a leader and serves).
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if healthy(self.client_port) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "etcd {} exited ({status}); log:\n{}",
                    self.name,
                    self.log_tail()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd {} not healthy within {timeout:?}; log:\n{}",
                    self.name,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9`, and waits for the process to be gone. Data stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the member (again, after [`Etcd::kill`]) on the same ports and
    /// data dir; returns without waiting for health.
    pub fn restart(&mut self) {
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Blocking `GET /health`: true when the member answers `"health":"true"`.
pub fn healthy(client_port: u16) -> bool {
    let addr = format!("127.0.0.1:{client_port}");
    let Ok(mut s) = TcpStream::connect_timeout(
        &addr.parse().expect("a socket address"),
        Duration::from_millis(500),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let req = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    s.write_all(req.as_bytes()).is_ok()
        && s.read_to_string(&mut out).is_ok()
        && out.starts_with("HTTP/1.1 200")
        && out.replace(' ', "").contains("\"health\":\"true\"")
}

/// A cluster of etcd members on loopback, all healthy when
/// [`EtcdCluster::start`] returns.
pub struct EtcdCluster {
    dir: PathBuf,
    members: Vec<Etcd>,
}

impl EtcdCluster {
    /// Starts `n` members (`m0`, `m1`, …) forming one cluster.
    pub fn start(n: usize) -> Self {
        let mut last = String::new();
        for _ in 0..3 {
            let dir = temp_dir("cluster");
            let ports = free_ports(2 * n);
            let initial_cluster = (0..n)
                .map(|i| format!("m{i}=http://127.0.0.1:{}", ports[2 * i + 1]))
                .collect::<Vec<_>>()
                .join(",");
            let mut members: Vec<Etcd> = (0..n)
                .map(|i| {
                    Etcd::member(
                        &format!("m{i}"),
                        ports[2 * i],
                        ports[2 * i + 1],
                        initial_cluster.clone(),
                        dir.clone(),
                        false,
                    )
                })
                .collect();
            for m in &mut members {
                m.spawn();
            }
            let mut cluster = Self { dir, members };
            let failed = cluster
                .members
                .iter_mut()
                .map(|m| m.wait_healthy(START_TIMEOUT))
                .find_map(Result::err);
            match failed {
                None => return cluster,
                Some(e) => last = e,
            }
        }
        panic!("etcd cluster did not start: {last}");
    }

    /// Client URLs of every member, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Etcd::endpoint).collect()
    }

    /// Member `i`.
    pub fn member(&mut self, i: usize) -> &mut Etcd {
        &mut self.members[i]
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The logs of every member, for failure messages.
    pub fn log_tails(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("--- {} ---\n{}", m.name, m.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Where the members' data and logs live.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
