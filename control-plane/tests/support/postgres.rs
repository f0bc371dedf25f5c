//! A real PostgreSQL for tests: Debian's PostgreSQL 15 binaries
//! (`/usr/lib/postgresql/15/bin`: `initdb`, `postgres`, `pg_isready`)
//! started as a child process on a free loopback port with its data in a
//! fresh temp dir, stopped and removed on drop. Standard library only.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root (CI, the
//! dev machines) the server runs as the `postgres` system user the Debian
//! package creates. There is no skipping: a missing installation panics with
//! what to install. `WEIR_PG_BIN` overrides the binaries' folder.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long initdb plus start-up may take on a slow CI machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The folder of PostgreSQL's server binaries, or a panic saying how to get them.
pub fn pg_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WEIR_PG_BIN").map(PathBuf::from) {
        assert!(
            dir.join("postgres").is_file(),
            "WEIR_PG_BIN={} has no `postgres` binary",
            dir.display()
        );
        return dir;
    }
    for version in ["15", "16", "17", "14", "13"] {
        let dir = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
        if dir.join("postgres").is_file() && dir.join("initdb").is_file() {
            return dir;
        }
    }
    panic!(
        "this test needs a real PostgreSQL and none was found (looked at $WEIR_PG_BIN and \
         /usr/lib/postgresql/*/bin). Install Debian's PostgreSQL: `deploy/setup.sh --test` \
         (or `apt-get install postgresql`)."
    );
}

/// uid and gid of the `postgres` user when this process is root, else `None`
/// (run as ourselves).
fn run_as() -> Option<(u32, u32)> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid_is_root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0");
    if !uid_is_root {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let entry = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .unwrap_or_else(|| {
            panic!(
                "running as root, PostgreSQL needs an unprivileged user and there is no \
                 `postgres` user; install Debian's postgresql package (`deploy/setup.sh --test`)"
            )
        });
    let fields: Vec<&str> = entry.split(':').collect();
    Some((fields[2].parse().unwrap(), fields[3].parse().unwrap()))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running PostgreSQL server.
pub struct Postgres {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Postgres {
    /// initdb in a temp dir, then start the server; ready when this returns.
    pub fn start() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let bin = pg_bin_dir();
        let owner = run_as();
        let dir = std::env::temp_dir().join(format!(
            "weir-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        let log = dir.join("postgres.log");
        let command = |name: &str| {
            let mut c = Command::new(bin.join(name));
            if let Some((uid, gid)) = owner {
                c.uid(uid).gid(gid);
            }
            c.current_dir(&dir).stdin(Stdio::null());
            c
        };
        let out = command("initdb")
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-U", "weir", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run initdb: {e}"));
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut last = String::new();
        // A port chosen free may be taken before the server binds it.
        for _ in 0..3 {
            let port = free_port();
            let log_file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap();
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&log, Some(uid), Some(gid)).unwrap();
            }
            let child = command("postgres")
                .arg("-D")
                .arg(dir.join("data"))
                .args(["-p", &port.to_string(), "-k"])
                .arg(&dir)
                .args([
                    "-c",
                    "listen_addresses=127.0.0.1",
                    // A throwaway database: durability buys nothing here.
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                ])
                .stdout(Stdio::from(log_file.try_clone().unwrap()))
                .stderr(Stdio::from(log_file))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run postgres: {e}"));
            let mut pg = Self {
                dir: dir.clone(),
                port,
                child: Some(child),
            };
            match pg.wait_ready(&bin) {
                Ok(()) => return pg,
                Err(e) => {
                    last = e;
                    pg.stop();
                    // Keep the dir for the next try: forget it here.
                    pg.dir = PathBuf::new();
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("PostgreSQL did not start: {last}");
    }

    fn wait_ready(&mut self, bin: &Path) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "weir",
                ])
                .args(["-d", "postgres", "-t", "2"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "postgres exited ({status}); log:\n{}",
                    self.log_tail()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "postgres not ready within {START_TIMEOUT:?}; log:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `postgres://weir@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://weir@127.0.0.1:{}/postgres", self.port)
    }

    /// The tail of the server log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Fast shutdown (SIGINT), then SIGKILL if it lingers.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
