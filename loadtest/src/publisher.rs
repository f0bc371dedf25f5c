//! One synthetic WHIP publisher: a str0m peer that sends a VP8 clip in a
//! loop (and Opus silence) at the clip's pace, stamping every frame with its
//! capture time so viewers can measure end-to-end delay.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use str0m::change::SdpAnswer;
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{AbsCaptureTime, Extension};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;

use crate::clip::Clip;
use crate::http;

/// Where and how to publish.
#[derive(Debug, Clone)]
pub struct PublishTarget {
    pub whip_url: String,
    pub token: String,
}

/// What one publisher did.
#[derive(Debug, Default, Clone)]
pub struct PublisherReport {
    pub video_frames: u64,
    pub bytes: u64,
    pub keyframe_requests: u64,
    pub error: Option<String>,
}

/// Opus silence (a 20 ms DTX frame).
const OPUS_SILENCE: [u8; 3] = [0xf8, 0xff, 0xfe];

/// Publishes `clip` until `deadline`, then leaves with `DELETE`.
pub async fn run(
    target: &PublishTarget,
    clip: &Clip,
    bind: IpAddr,
    deadline: Instant,
) -> PublisherReport {
    let mut report = PublisherReport::default();
    if let Err(e) = publish(target, clip, bind, deadline, &mut report).await {
        report.error = Some(format!("{e:#}"));
    }
    report
}

async fn publish(
    target: &PublishTarget,
    clip: &Clip,
    bind: IpAddr,
    deadline: Instant,
    report: &mut PublisherReport,
) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(SocketAddr::new(bind, 0)).await?;
    let local = socket.local_addr()?;
    let start = Instant::now();
    let mut rtc = Rtc::builder()
        .set_extension(7, Extension::AbsoluteCaptureTime)
        .build(start);
    rtc.add_local_candidate(Candidate::host(local, "udp")?);
    let mut change = rtc.sdp_api();
    let audio = change.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    let video = change.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
    let (offer, pending) = change.apply().context("no offer")?;
    let (session, answer) = http::WebRtcSession::open(
        "WHIP",
        &target.whip_url,
        &target.token,
        &offer.to_sdp_string(),
    )
    .await?;
    rtc.sdp_api().accept_answer(
        pending,
        SdpAnswer::from_sdp_string(&answer).context("bad SDP answer")?,
    )?;

    let frame_interval = Duration::from_secs(1) / clip.fps;
    let mut next_video = start;
    let mut next_audio = start;
    let mut video_n = 0u64;
    let mut audio_n = 0u64;
    let mut connected = false;
    let mut buf = vec![0u8; 2048];
    let result: anyhow::Result<()> = async {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            if connected {
                let capture = AbsCaptureTime {
                    capture_time: SystemTime::now(),
                    clock_offset: None,
                };
                while next_video <= now {
                    let f = &clip.frames[(video_n as usize) % clip.frames.len()];
                    let w = rtc.writer(video).context("no video writer")?;
                    let pt = w.payload_params().find(|p| p.spec().codec == Codec::Vp8).map(|p| p.pt());
                    let pt = pt.context("the node did not accept VP8")?;
                    let time = MediaTime::new(video_n * 90_000 / u64::from(clip.fps), Frequency::NINETY_KHZ);
                    w.abs_capture_time(capture).write(pt, now, time, f.data.clone())?;
                    // str0m packetizes a written frame at its next timeout:
                    // now, not at the runtime's next timer tick (up to a
                    // millisecond later), which the delay would count.
                    rtc.handle_input(Input::Timeout(now))?;
                    report.video_frames += 1;
                    report.bytes += f.data.len() as u64;
                    video_n += 1;
                    next_video += frame_interval;
                }
                while next_audio <= now {
                    let w = rtc.writer(audio).context("no audio writer")?;
                    let pt = w.payload_params().find(|p| p.spec().codec == Codec::Opus).map(|p| p.pt());
                    if let Some(pt) = pt {
                        let time = MediaTime::new(audio_n * 960, Frequency::FORTY_EIGHT_KHZ);
                        w.write(pt, now, time, OPUS_SILENCE.to_vec())?;
                        rtc.handle_input(Input::Timeout(now))?;
                    }
                    audio_n += 1;
                    next_audio += Duration::from_millis(20);
                }
            } else {
                next_video = now;
                next_audio = now;
            }
            let timeout = loop {
                match rtc.poll_output()? {
                    Output::Transmit(t) => {
                        let _ = socket.send_to(&t.contents, t.destination).await;
                    }
                    Output::Timeout(t) => break t,
                    Output::Event(Event::Connected) => connected = true,
                    Output::Event(Event::KeyframeRequest(_)) => report.keyframe_requests += 1,
                    Output::Event(Event::IceConnectionStateChange(str0m::IceConnectionState::Disconnected)) => {
                        bail!("ICE disconnected");
                    }
                    Output::Event(_) => {}
                }
            };
            let mut wake = timeout.min(deadline);
            if connected {
                wake = wake.min(next_video).min(next_audio);
            }
            let wake = wake.max(Instant::now());
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
    session.close().await;
    result
}
