//! A `weir` child process for multi-process tests (cluster, control).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long processes may take to start and print what they serve (CI is slow).
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// A `weir` child process with its stdout lines on a channel and its
/// stderr (JSON logs) in a file; killed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    pub lines: mpsc::Receiver<String>,
}

impl Proc {
    pub fn spawn(name: &str, dir: &Path, args: &[&str]) -> Self {
        let log = dir.join(format!("{name}.log"));
        // Run inside the test's directory: whatever the process writes by
        // default (a data dir, HLS segments) stays out of the source tree.
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .current_dir(dir)
            .args(["--log-format", "json"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("the weir binary runs");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        // Drains stdout for the process's whole life, so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            name: name.to_owned(),
            child,
            log,
            lines,
        }
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The first stdout line that `pick` maps to a value.
    pub fn wait_line<T>(&self, what: &str, pick: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(v) = pick(&line) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "{} did not print {what} within {START_DEADLINE:?}; log:\n{}",
                    self.name,
                    self.log_tail()
                ),
            }
        }
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit; returns how long it took.
    pub fn terminate(&mut self) -> Duration {
        let started = Instant::now();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        while started.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(
                    status.success(),
                    "{} exited with {status}; log:\n{}",
                    self.name,
                    self.log_tail()
                );
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "{} did not stop on SIGTERM; log:\n{}",
            self.name,
            self.log_tail()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}
