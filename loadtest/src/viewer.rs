//! One synthetic WHEP viewer: a str0m peer on its own UDP socket that plays a
//! room for a while and records what a person would notice.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;

use crate::http;

/// A gap between video frames longer than this is a freeze.
pub const FREEZE_GAP: Duration = Duration::from_millis(500);

/// Where and how to play.
#[derive(Debug, Clone)]
pub struct Target {
    pub whep_url: String,
    pub token: String,
}

/// What one viewer saw.
#[derive(Debug, Default, Clone)]
pub struct ViewerReport {
    /// WHEP POST to 201.
    pub join: Option<Duration>,
    /// Start to first video keyframe.
    pub first_frame: Option<Duration>,
    pub video_frames: u64,
    pub audio_frames: u64,
    pub media_bytes: u64,
    pub freezes: u64,
    /// How long media was played (first frame to end).
    pub played: Duration,
    /// Capture-to-arrival delay of each video frame that carried its
    /// capture time, in microseconds (publisher and viewer share a clock).
    pub delays_us: Vec<u64>,
    /// Video RTP packets received and NACKs sent (str0m's ingress stats).
    pub video_packets: u64,
    pub nacks: u64,
    /// Mean fraction of video packets lost per stats interval (before
    /// retransmission), in percent.
    pub loss_pct: Option<f64>,
    pub error: Option<String>,
}

/// Plays `target` until `deadline`, then leaves with `DELETE`.
pub async fn run(target: &Target, bind: IpAddr, deadline: Instant) -> ViewerReport {
    let mut report = ViewerReport::default();
    if let Err(e) = play(target, bind, deadline, &mut report).await {
        report.error = Some(format!("{e:#}"));
    }
    report
}

async fn play(
    target: &Target,
    bind: IpAddr,
    deadline: Instant,
    report: &mut ViewerReport,
) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(SocketAddr::new(bind, 0)).await?;
    let local = socket.local_addr()?;
    let start = Instant::now();
    let mut rtc = Rtc::builder()
        .set_extension(7, str0m::rtp::Extension::AbsoluteCaptureTime)
        .set_stats_interval(Some(Duration::from_secs(1)))
        .build(start);
    rtc.add_local_candidate(Candidate::host(local, "udp")?);
    let mut change = rtc.sdp_api();
    change.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
    let video = change.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    let (offer, pending) = change.apply().context("no offer")?;

    let (session, answer) = http::WebRtcSession::open(
        "WHEP",
        &target.whep_url,
        &target.token,
        &offer.to_sdp_string(),
    )
    .await?;
    report.join = Some(start.elapsed());
    let joined_at = SystemTime::now();
    let answer = SdpAnswer::from_sdp_string(&answer).context("bad SDP answer")?;
    rtc.sdp_api().accept_answer(pending, answer)?;

    let mut buf = vec![0u8; 2048];
    let mut last_video: Option<Instant> = None;
    let mut first: Option<Instant> = None;
    let (mut loss_sum, mut loss_n) = (0.0f64, 0u32);
    let result: anyhow::Result<()> = async {
        loop {
            let timeout = loop {
                match rtc.poll_output()? {
                    Output::Transmit(t) => {
                        let _ = socket.send_to(&t.contents, t.destination).await;
                    }
                    Output::Timeout(t) => break t,
                    Output::Event(Event::MediaData(d)) => {
                        let now = Instant::now();
                        report.media_bytes += d.data.len() as u64;
                        if d.mid == video {
                            if first.is_none() {
                                if !d.is_keyframe() {
                                    continue;
                                }
                                first = Some(now);
                                report.first_frame = Some(now - start);
                            }
                            if last_video.is_some_and(|l| now - l > FREEZE_GAP) {
                                report.freezes += 1;
                            }
                            last_video = Some(now);
                            report.video_frames += 1;
                            // Frames captured before the viewer joined came from the
                            // node's GOP cache: their delay says nothing of forwarding.
                            if let Some(t) = d.ext_vals.abs_capture_time
                                && t.capture_time >= joined_at
                                && let Ok(delay) = SystemTime::now().duration_since(t.capture_time)
                            {
                                report.delays_us.push(delay.as_micros() as u64);
                            }
                        } else {
                            report.audio_frames += 1;
                        }
                    }
                    Output::Event(Event::IceConnectionStateChange(
                        str0m::IceConnectionState::Disconnected,
                    )) => {
                        bail!("ICE disconnected");
                    }
                    Output::Event(Event::MediaIngressStats(st)) if st.mid == video => {
                        report.video_packets = st.packets;
                        report.nacks = st.nacks;
                        if let Some(l) = st.loss {
                            loss_sum += f64::from(l);
                            loss_n += 1;
                        }
                    }
                    Output::Event(_) => {}
                }
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            let wake = timeout.min(deadline).max(now);
            tokio::select! {
                r = socket.recv_from(&mut buf) => {
                    let (n, source) = r?;
                    let Ok(contents) = buf[..n].try_into() else { continue };
                    let input = Input::Receive(Instant::now(), Receive { proto: Protocol::Udp, source, destination: local, contents });
                    if rtc.accepts(&input) {
                        rtc.handle_input(input)?;
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    rtc.handle_input(Input::Timeout(Instant::now()))?;
                }
            }
        }
    }
    .await;
    if loss_n > 0 {
        report.loss_pct = Some(100.0 * loss_sum / f64::from(loss_n));
    }
    if let Some(f) = first {
        report.played = Instant::now().saturating_duration_since(f);
    }
    session.close().await;
    result
}
