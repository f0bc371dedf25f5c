//! Debian's nginx as a caching HTTP proxy, run as a child process of the
//! test on a loopback port of its own: a stand-in for a CDN in front of a
//! node. Its prefix, config, pid file, logs, temp files and cache all live
//! in a temp dir; the system config is never read. Stopped by its PID.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian installs nginx (`NGINX` overrides).
pub fn nginx_path() -> String {
    std::env::var("NGINX").unwrap_or_else(|_| "/usr/sbin/nginx".into())
}

/// Panics with an install hint when nginx is missing.
pub fn require_nginx() {
    let ok = Command::new(nginx_path())
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "nginx is missing at {}: run deploy/setup.sh --test (or apt-get install nginx-light), or set NGINX",
        nginx_path()
    );
}

/// A free loopback TCP port (free when asked; nginx binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One nginx master (with its worker) proxying to an upstream.
pub struct Nginx {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    upstream: String,
}

impl Nginx {
    /// Starts nginx on `127.0.0.1:port` in front of `upstream`
    /// (`host:port`): `/hls/` cached briefly (live playlists change every
    /// segment), everything else (`/healthz`) passed through.
    pub fn start(port: u16, upstream: &str, dir: PathBuf) -> Self {
        let mut nginx = Self {
            child: None,
            port,
            dir,
            upstream: upstream.to_owned(),
        };
        nginx.restart();
        nginx
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn config(&self) -> String {
        let d = self.dir.display();
        // As root, workers would run as `nobody` and could not write the
        // temp dir; they stay root like the test.
        let user = if running_as_root() {
            "user root;\n"
        } else {
            ""
        };
        format!(
            "{user}daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    proxy_cache_path {d}/cache levels=1:2 keys_zone=weir:1m max_size=64m inactive=1m use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        location /hls/ {{
            proxy_pass http://{upstream};
            proxy_cache weir;
            proxy_cache_valid 200 1s;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
        location / {{
            proxy_pass http://{upstream};
        }}
    }}
}}
",
            port = self.port,
            upstream = self.upstream,
        )
    }

    /// (Re)starts the process with the same port and config; waits until
    /// the port accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "nginx on {} is running", self.port);
        std::fs::create_dir_all(self.dir.join("tmp")).unwrap();
        let conf = self.dir.join("nginx.conf");
        std::fs::write(&conf, self.config()).unwrap();
        let child = Command::new(nginx_path())
            .arg("-p")
            .arg(&self.dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(self.dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.join("stderr.log")).unwrap(),
            ))
            .spawn()
            .expect("nginx starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "nginx on {} exited with {status}: {}",
                    self.port,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nginx on {} did not listen within 10 s: {}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops nginx (SIGTERM to its master, which stops its worker) and
    /// waits for it to exit; the port then refuses connections.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// nginx's error log and stderr.
    pub fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        format!("{}{}", read("stderr.log"), read("error.log"))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether the test runs as root (`id -u` says 0).
fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
