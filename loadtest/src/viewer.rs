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
    /// capture time, in microseconds (publisher and viewer share a clock),
    /// taken when the viewer read the packet.
    pub delays_us: Vec<u64>,
    /// The same delay taken when the packet reached the viewer's socket
    /// (the kernel's receive timestamp, light viewers only): what the node
    /// and the network took, without the time the packet then waited for a
    /// busy load generator to read it.
    pub arrival_delays_us: Vec<u64>,
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
    run_with(target, bind, deadline, false).await
}

/// Like [`run`]; a `light` viewer reads only the clear RTP headers of the
/// media once connected (sequence numbers, marker bits, capture times) and
/// leaves SRTP unopened, so one core plays many more viewers. Loss is then
/// counted from sequence numbers (no NACKs are sent), frames from marker
/// bits, and keyframes are not told apart.
pub async fn run_with(
    target: &Target,
    bind: IpAddr,
    deadline: Instant,
    light: bool,
) -> ViewerReport {
    let mut report = ViewerReport::default();
    if let Err(e) = play(target, bind, deadline, light, &mut report).await {
        report.error = Some(format!("{e:#}"));
    }
    report
}

async fn play(
    target: &Target,
    bind: IpAddr,
    deadline: Instant,
    light: bool,
    report: &mut ViewerReport,
) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(SocketAddr::new(bind, 0)).await?;
    let local = socket.local_addr()?;
    if light {
        // Datagrams the node sent as one GSO message arrive as one (loopback
        // keeps them whole): one system call for a frame's packets. Where
        // the kernel has no UDP_GRO they arrive one by one, as before.
        let _ =
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::UdpGroSegment, &true);
        // Each datagram (or GSO message) carries the time it reached the
        // socket, for the arrival delay.
        let _ = nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimestampns,
            &true,
        );
    }
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
    let mut headers = light.then(|| HeaderCounter::new(&answer, joined_at));
    let answer = SdpAnswer::from_sdp_string(&answer).context("bad SDP answer")?;
    rtc.sdp_api().accept_answer(pending, answer)?;

    let mut buf = vec![0u8; 65_536];
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
                    Output::Event(Event::Connected) => {
                        if let Some(h) = headers.as_mut() {
                            h.connected = true;
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
                r = socket.readable() => {
                    r?;
                    // Everything waiting, up to a bound (timers still run).
                    for _ in 0..64 {
                        let (n, source, segment, arrived) = match recv_segments(&socket, &mut buf) {
                            Ok(got) => got,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(e.into()),
                        };
                        let now = Instant::now();
                        for d in buf[..n].chunks(segment.unwrap_or(n).max(1)) {
                            if let Some(h) = headers.as_mut()
                                && h.connected
                                && h.take(d, now, arrived)
                            {
                                continue;
                            }
                            let Ok(contents) = d.try_into() else { continue };
                            let input = Input::Receive(now, Receive { proto: Protocol::Udp, source, destination: local, contents });
                            if rtc.accepts(&input) {
                                rtc.handle_input(input)?;
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    rtc.handle_input(Input::Timeout(Instant::now()))?;
                }
            }
        }
    }
    .await;
    if let Some(h) = headers {
        h.report(start, report);
        session.close().await;
        return result;
    }
    if loss_n > 0 {
        report.loss_pct = Some(100.0 * loss_sum / f64::from(loss_n));
    }
    if let Some(f) = first {
        report.played = Instant::now().saturating_duration_since(f);
    }
    session.close().await;
    result
}

/// One `recvmsg`: the bytes, the sender, the segment size when the kernel
/// handed over several coalesced datagrams (UDP_GRO), and the kernel's
/// receive timestamp (SO_TIMESTAMPNS) when it gave one.
fn recv_segments(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, Option<usize>, Option<SystemTime>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
    use std::os::fd::AsRawFd;
    socket.try_io(tokio::io::Interest::READABLE, || {
        let mut iov = [std::io::IoSliceMut::new(buf)];
        let mut cmsg = nix::cmsg_space!(i32, nix::sys::time::TimeSpec);
        let msg = recvmsg::<SockaddrStorage>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT,
        )
        .map_err(std::io::Error::from)?;
        let (mut segment, mut arrived) = (None, None);
        for m in msg.cmsgs().into_iter().flatten() {
            match m {
                ControlMessageOwned::UdpGroSegments(s) => segment = usize::try_from(s).ok(),
                ControlMessageOwned::ScmTimestampns(t) => {
                    arrived = u64::try_from(t.tv_sec())
                        .ok()
                        .zip(u32::try_from(t.tv_nsec()).ok())
                        .and_then(|(s, ns)| {
                            SystemTime::UNIX_EPOCH.checked_add(Duration::new(s, ns))
                        });
                }
                _ => {}
            }
        }
        let source = msg
            .address
            .and_then(|a| {
                a.as_sockaddr_in()
                    .map(|v4| SocketAddr::V4((*v4).into()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into())))
            })
            .ok_or_else(|| std::io::Error::other("datagram without a source address"))?;
        Ok((msg.bytes, source, segment, arrived))
    })
}

/// What a light viewer counts from clear RTP headers.
struct HeaderCounter {
    connected: bool,
    /// Payload types of audio (from the answer's `a=rtpmap:PT opus/...`).
    audio_pts: Vec<u8>,
    joined_at: SystemTime,
    /// Video: first and highest extended sequence number, packets.
    video_seq: Option<(u64, u64)>,
    video_packets: u64,
    frames: u64,
    audio_packets: u64,
    bytes: u64,
    first: Option<Instant>,
    last_frame: Option<Instant>,
    freezes: u64,
    delays_us: Vec<u64>,
    arrival_delays_us: Vec<u64>,
    /// RTP timestamp of the last frame whose delay was counted.
    delay_ts: Option<u32>,
}

impl HeaderCounter {
    fn new(answer_sdp: &str, joined_at: SystemTime) -> Self {
        let audio_pts = answer_sdp
            .lines()
            .filter_map(|l| l.trim().strip_prefix("a=rtpmap:"))
            .filter(|l| l.to_ascii_lowercase().contains(" opus/"))
            .filter_map(|l| l.split(' ').next()?.parse().ok())
            .collect();
        Self {
            connected: false,
            audio_pts,
            joined_at,
            video_seq: None,
            video_packets: 0,
            frames: 0,
            audio_packets: 0,
            bytes: 0,
            first: None,
            last_frame: None,
            freezes: 0,
            delays_us: Vec::new(),
            arrival_delays_us: Vec::new(),
            delay_ts: None,
        }
    }

    /// Counts an RTP datagram; false when it is not RTP (STUN, DTLS, RTCP
    /// go to str0m as usual). `arrived`: when it reached the socket.
    fn take(&mut self, d: &[u8], now: Instant, arrived: Option<SystemTime>) -> bool {
        let Some(h) = RtpHeader::parse(d) else {
            return false;
        };
        self.bytes += d.len() as u64;
        if self.audio_pts.contains(&h.pt) {
            self.audio_packets += 1;
            return true;
        }
        self.video_packets += 1;
        let seq = match self.video_seq {
            None => u64::from(h.seq) + (1 << 16),
            Some((_, high)) => extend_seq(high, h.seq),
        };
        self.video_seq = Some(match self.video_seq {
            None => (seq, seq),
            Some((first, high)) => (first.min(seq), high.max(seq)),
        });
        if h.marker {
            self.first.get_or_insert(now);
            if self.last_frame.is_some_and(|l| now - l > FREEZE_GAP) {
                self.freezes += 1;
            }
            self.last_frame = Some(now);
            self.frames += 1;
        }
        // A frame's capture time rides on its packets (Weir puts it on
        // every one, others on the first): its delay is counted once per RTP
        // timestamp, at the first packet that carries it.
        if let Some(capture) = h.capture_time
            && self.delay_ts != Some(h.ts)
        {
            self.delay_ts = Some(h.ts);
            if capture >= self.joined_at {
                if let Ok(delay) = SystemTime::now().duration_since(capture) {
                    self.delays_us.push(delay.as_micros() as u64);
                }
                if let Some(Ok(delay)) = arrived.map(|a| a.duration_since(capture)) {
                    self.arrival_delays_us.push(delay.as_micros() as u64);
                }
            }
        }
        true
    }

    fn report(self, start: Instant, r: &mut ViewerReport) {
        r.first_frame = self.first.map(|f| f - start);
        r.video_frames = self.frames;
        r.audio_frames = self.audio_packets;
        r.media_bytes = self.bytes;
        r.freezes = self.freezes;
        r.delays_us = self.delays_us;
        r.arrival_delays_us = self.arrival_delays_us;
        r.video_packets = self.video_packets;
        r.played = self.first.map_or(Duration::ZERO, |f| {
            Instant::now().saturating_duration_since(f)
        });
        if let Some((first, high)) = self.video_seq {
            let expected = high - first + 1;
            let lost = expected.saturating_sub(self.video_packets);
            r.loss_pct = Some(100.0 * lost as f64 / expected as f64);
        }
    }
}

/// The sequence number `seq` extended to 64 bits near `high`.
fn extend_seq(high: u64, seq: u16) -> u64 {
    let cycle = high & !0xffff;
    let candidates = [cycle.wrapping_sub(1 << 16), cycle, cycle + (1 << 16)];
    candidates
        .iter()
        .map(|c| c + u64::from(seq))
        .min_by_key(|v| v.abs_diff(high))
        .unwrap_or(high)
}

/// The clear part of an SRTP packet's header (RFC 3550; abs-capture-time
/// as header extension 7, one-byte form, RFC 8285).
#[derive(Debug, PartialEq)]
struct RtpHeader {
    pt: u8,
    marker: bool,
    seq: u16,
    ts: u32,
    capture_time: Option<SystemTime>,
}

impl RtpHeader {
    fn parse(d: &[u8]) -> Option<Self> {
        if d.len() < 12 || d[0] >> 6 != 2 {
            return None;
        }
        let pt = d[1] & 0x7f;
        if (64..=95).contains(&pt) {
            return None; // RTCP (RFC 5761)
        }
        let marker = d[1] & 0x80 != 0;
        let seq = u16::from_be_bytes([d[2], d[3]]);
        let ts = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
        let csrcs = usize::from(d[0] & 0x0f);
        let mut at = 12 + 4 * csrcs;
        let mut capture_time = None;
        if d[0] & 0x10 != 0 {
            let profile = u16::from_be_bytes([*d.get(at)?, *d.get(at + 1)?]);
            let words = usize::from(u16::from_be_bytes([*d.get(at + 2)?, *d.get(at + 3)?]));
            at += 4;
            let ext = d.get(at..at + 4 * words)?;
            if profile == 0xbede {
                let mut i = 0;
                while i < ext.len() {
                    let b = ext[i];
                    if b == 0 {
                        i += 1;
                        continue;
                    }
                    let (id, len) = (b >> 4, usize::from(b & 0x0f) + 1);
                    if id == 15 {
                        break;
                    }
                    let value = ext.get(i + 1..i + 1 + len)?;
                    if id == 7 && len >= 8 {
                        let ntp = u64::from_be_bytes(value[..8].try_into().ok()?);
                        capture_time = ntp_to_system(ntp);
                    }
                    i += 1 + len;
                }
            }
        }
        Some(Self {
            pt,
            marker,
            seq,
            ts,
            capture_time,
        })
    }
}

/// A 64-bit NTP timestamp (seconds since 1900, UQ32.32) as wall-clock time.
fn ntp_to_system(ntp: u64) -> Option<SystemTime> {
    const NTP_UNIX: u64 = 2_208_988_800;
    let secs = (ntp >> 32).checked_sub(NTP_UNIX)?;
    let nanos = ((ntp & 0xffff_ffff) * 1_000_000_000) >> 32;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos as u32))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn clear_rtp_headers_give_sequence_marker_and_capture_time() {
        let capture = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let since = capture.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        let ntp = ((since.as_secs() + 2_208_988_800) << 32)
            | ((u64::from(since.subsec_nanos()) << 32) / 1_000_000_000);
        let mut p = vec![0x90, 0x80 | 96, 0x12, 0x34, 0, 0, 0, 1, 0, 0, 0, 2];
        p.extend_from_slice(&[0xbe, 0xde, 0, 3]);
        p.push(0x77); // id 7, 8 bytes
        p.extend_from_slice(&ntp.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0]); // padding to 3 words
        p.extend_from_slice(&[0xaa; 100]); // encrypted payload
        let h = RtpHeader::parse(&p).unwrap();
        assert_eq!((h.pt, h.marker, h.seq), (96, true, 0x1234));
        let got = h.capture_time.unwrap();
        let diff = got.duration_since(capture).unwrap_or_else(|e| e.duration());
        assert!(diff < Duration::from_micros(1), "{diff:?}");
        // RTCP, STUN, DTLS and short junk are not RTP.
        assert!(RtpHeader::parse(&[0x80, 200, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0]).is_none());
        assert!(RtpHeader::parse(&[0, 1, 0, 0]).is_none());
        assert!(RtpHeader::parse(&[22, 254, 253, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_none());
        // A truncated extension is refused, not read past the end.
        assert!(RtpHeader::parse(&p[..18]).is_none());
    }

    #[test]
    fn sequence_numbers_extend_across_wraps_and_loss_is_counted() {
        assert_eq!(extend_seq(70_000, 4_465), 70_001);
        assert_eq!(extend_seq((1 << 16) + 65_535, 0), 2 << 16);
        assert_eq!(extend_seq(2 << 16, 65_535), (1 << 16) + 65_535);
        let mut c = HeaderCounter::new("a=rtpmap:111 opus/48000/2\r\n", SystemTime::now());
        c.connected = true;
        let now = Instant::now();
        let packet = |seq: u16, pt: u8| {
            let mut p = vec![0x80, 0x80 | pt];
            p.extend_from_slice(&seq.to_be_bytes());
            p.extend_from_slice(&[0; 8]);
            p
        };
        for seq in [65_534u16, 65_535, 1, 2] {
            assert!(c.take(&packet(seq, 96), now, None));
        }
        assert!(c.take(&packet(7, 111), now, None));
        let mut r = ViewerReport::default();
        c.report(now, &mut r);
        assert_eq!((r.video_packets, r.video_frames, r.audio_frames), (4, 4, 1));
        // 65534..=2 is 5 numbers, 4 arrived: 0 is lost.
        assert!((r.loss_pct.unwrap() - 20.0).abs() < 1e-9, "{r:?}");
    }

    /// A video packet (pt 96) whose abs-capture-time extension says `capture`.
    fn captured_packet(seq: u16, capture: SystemTime) -> Vec<u8> {
        let since = capture.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        let ntp = ((since.as_secs() + 2_208_988_800) << 32)
            | ((u64::from(since.subsec_nanos()) << 32) / 1_000_000_000);
        let mut p = vec![0x90, 0x80 | 96];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 9, 0, 0, 0, 2, 0xbe, 0xde, 0, 3, 0x77]);
        p.extend_from_slice(&ntp.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0]);
        p.extend_from_slice(&[0xaa; 100]);
        p
    }

    #[test]
    fn arrival_delay_counts_from_the_socket_and_read_delay_from_the_read() {
        let joined = SystemTime::now() - Duration::from_secs(1);
        let mut c = HeaderCounter::new("", joined);
        c.connected = true;
        let capture = SystemTime::now() - Duration::from_millis(100);
        let arrived = capture + Duration::from_millis(2);
        assert!(c.take(&captured_packet(1, capture), Instant::now(), Some(arrived)));
        // Another packet of the same frame is not counted again; a packet
        // without a kernel timestamp counts only for the read delay.
        assert!(c.take(&captured_packet(2, capture), Instant::now(), Some(arrived)));
        let later = capture + Duration::from_millis(1);
        let mut next = captured_packet(3, later);
        next[7] = 10; // another RTP timestamp: another frame
        assert!(c.take(&next, Instant::now(), None));
        let mut r = ViewerReport::default();
        c.report(Instant::now(), &mut r);
        assert_eq!(r.arrival_delays_us, vec![2_000]);
        assert_eq!(r.delays_us.len(), 2);
        assert!(
            r.delays_us.iter().all(|d| *d >= 99_000),
            "{:?}",
            r.delays_us
        );
    }

    #[tokio::test]
    async fn the_kernel_stamps_when_a_datagram_reached_the_socket_not_when_it_was_read() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        nix::sys::socket::setsockopt(&rx, nix::sys::socket::sockopt::ReceiveTimestampns, &true)
            .unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 64];
        // Linux turns receive stamping on in a deferred work item when the
        // first socket asks; until then a datagram is stamped when read
        // (the delay then counts as the read delay, never less). So the
        // first tries may see that; a stamp taken on arrival must come.
        let mut seen = Vec::new();
        for _ in 0..20 {
            let before = SystemTime::now();
            tx.send_to(b"media", rx.local_addr().unwrap())
                .await
                .unwrap();
            // The reader is late, as a busy load generator would be.
            tokio::time::sleep(Duration::from_millis(50)).await;
            rx.readable().await.unwrap();
            let (n, source, segment, arrived) = recv_segments(&rx, &mut buf).unwrap();
            let read = SystemTime::now();
            assert_eq!(
                (&buf[..n], source, segment),
                (&b"media"[..], tx.local_addr().unwrap(), None)
            );
            let arrived = arrived.expect("SO_TIMESTAMPNS gave no timestamp");
            assert!(
                arrived + Duration::from_millis(1) >= before,
                "{arrived:?} < {before:?}"
            );
            assert!(arrived <= read, "{arrived:?} after the read {read:?}");
            if arrived + Duration::from_millis(40) <= read {
                return;
            }
            seen.push(read.duration_since(arrived).unwrap_or_default());
        }
        panic!("no datagram was stamped on arrival; read this long after: {seen:?}");
    }
}
