//! The ffmpeg CLI as a publisher: a small test pattern with a tone, pushed
//! as MPEG-TS over SRT in real time.

use std::process::{Child, Command, Stdio};

/// Panics with an install hint when ffmpeg is missing.
pub fn require_ffmpeg() {
    let ok = Command::new("ffmpeg")
        .arg("-version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "the ffmpeg CLI is missing: run deploy/setup.sh --test");
}

/// ffmpeg pushing 320x240 testsrc2 + sine for up to 5 minutes; killed on drop.
pub struct Publisher(Child);

impl Publisher {
    pub fn push(srt: std::net::SocketAddr, room: &str, token: &str) -> Self {
        let url = format!("srt://{srt}?streamid=#!::r={room},m=publish,t={token}");
        let child = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-re"])
            .args(["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25"])
            .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
            .args([
                "-pix_fmt",
                "yuv420p",
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
            ])
            .args(["-g", "25", "-c:a", "aac", "-b:a", "64k"])
            .args(["-t", "300", "-f", "mpegts", &url])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ffmpeg runs");
        Self(child)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
