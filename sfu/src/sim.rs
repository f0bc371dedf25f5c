//! A simulated network for driving an [`Sfu`] with real str0m peers in
//! memory, on a virtual clock: no sockets, no sleeping. The SFU's tests and
//! benchmarks use it; latency and per-peer loss are deterministic.
#![allow(clippy::unwrap_used, missing_docs, clippy::missing_panics_doc)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::format::CodecExtra;
use str0m::media::{Direction, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event as RtcEvent, Rtc};
use weir_protocol::{RoomId, SessionId};

use crate::{Event, Input, Output, Sfu, SfuConfig, SfuError};

pub const SFU_ADDR: &str = "127.0.0.1:7100";
pub const LATENCY: Duration = Duration::from_millis(5);

/// A str0m client peer on the simulated network.
pub struct Peer {
    pub addr: SocketAddr,
    pub rtc: Rtc,
    pub next: Instant,
    /// Received media: (kind, keyframe, time received).
    pub media: Vec<(MediaKind, bool, Instant)>,
    /// Received video frames as sent on the wire: first and last RTP
    /// sequence number, RTP time, VP8 picture id.
    pub video_wire: Vec<(u64, u64, u64, Option<u64>)>,
    pub keyframe_requests: usize,
    pub connected: bool,
    /// The SFU closed the session in-band (DTLS close_notify arrived).
    pub closed: bool,
    pub audio: Option<Mid>,
    pub video: Option<Mid>,
    /// Whether this peer still takes part in the network.
    pub online: bool,
    /// Share of datagrams to this peer the network loses (0.0 to 1.0).
    pub loss: f64,
    /// Datagrams to this peer the network lost.
    pub lost: usize,
    /// Capacity of the link towards this peer (bits/s); `None` is unlimited.
    pub cap_bps: Option<u64>,
    /// When the capped link is free again.
    pub link_free_at: Instant,
    /// Simulcast layers this peer publishes (empty: one stream).
    pub rids: Vec<&'static str>,
    /// The data channel this peer opened, once open.
    pub channel: Option<str0m::channel::ChannelId>,
    /// Messages received on it: (binary, bytes).
    pub channel_messages: Vec<(bool, Vec<u8>)>,
}

/// An [`Sfu`] and its peers on a simulated network with a virtual clock.
pub struct Net {
    pub now: Instant,
    pub sfu: Sfu,
    pub peers: Vec<Peer>,
    /// (deliver at, from, to, bytes)
    pub wire: VecDeque<(Instant, SocketAddr, SocketAddr, Vec<u8>)>,
    pub events: Vec<Event>,
    pub sfu_next: Instant,
    /// Deterministic randomness for the simulated network (xorshift).
    pub seed: u64,
    /// Real time spent inside the SFU (its inputs and draining its output),
    /// for benchmarks; the peers' work is not in it.
    pub sfu_busy: Duration,
    /// Frames the SFU output for other shards (tapped rooms).
    pub relayed: usize,
}

/// The real clock, read only to measure the SFU's work (`sfu_busy`), never
/// to drive it.
#[allow(clippy::disallowed_methods)]
fn wall_clock() -> Instant {
    Instant::now()
}

/// A room id from a literal.
pub fn room(name: &str) -> RoomId {
    RoomId::parse(name).unwrap()
}

impl Default for Net {
    fn default() -> Self {
        Self::new()
    }
}

impl Net {
    pub fn new() -> Self {
        Self::with_config(SfuConfig::default())
    }

    pub fn with_config(config: SfuConfig) -> Self {
        crate::install_crypto_provider();
        // The one real clock reading: the origin of virtual time.
        #[allow(clippy::disallowed_methods)]
        let now = Instant::now();
        let config = SfuConfig {
            local_addrs: vec![SFU_ADDR.parse().unwrap()],
            ..config
        };
        Self {
            now,
            sfu: Sfu::new(config, now),
            peers: Vec::new(),
            wire: VecDeque::new(),
            events: Vec::new(),
            sfu_next: now,
            seed: 0x2545_f491_4f6c_dd1d,
            sfu_busy: Duration::ZERO,
            relayed: 0,
        }
    }

    /// Creates a client peer with an offer for `dir` audio+video; returns its
    /// index, the offer SDP and the pending state.
    pub fn client(&mut self, dir: Direction) -> (usize, String, SdpPendingOffer) {
        self.client_with_layers(dir, &[])
    }

    /// A client whose video is sent as simulcast layers `rids` (for a
    /// sending `dir`).
    pub fn client_with_layers(
        &mut self,
        dir: Direction,
        rids: &[&'static str],
    ) -> (usize, String, SdpPendingOffer) {
        self.client_full(dir, rids, None)
    }

    /// A client with simulcast layers `rids` and, with `channel`, a data
    /// channel of that label in its offer.
    pub fn client_full(
        &mut self,
        dir: Direction,
        rids: &[&'static str],
        channel: Option<&str>,
    ) -> (usize, String, SdpPendingOffer) {
        let addr: SocketAddr = format!("127.0.0.1:{}", 20000 + self.peers.len())
            .parse()
            .unwrap();
        // abs-capture-time, as the load test's peers offer it, so frames'
        // capture times reach viewers here too.
        let mut rtc = Rtc::builder()
            .set_extension(7, str0m::rtp::Extension::AbsoluteCaptureTime)
            .build(self.now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        let mut change = rtc.sdp_api();
        let audio = change.add_media(MediaKind::Audio, dir, None, None, None);
        let simulcast = (!rids.is_empty()).then(|| {
            let mut sc = str0m::media::Simulcast::new();
            for rid in rids {
                sc.add_send_layer(str0m::media::SimulcastLayer::new(rid));
            }
            sc
        });
        let video = change.add_media(MediaKind::Video, dir, None, None, simulcast);
        if let Some(label) = channel {
            change.add_channel(label.to_owned());
        }
        let (offer, pending) = change.apply().unwrap();
        self.peers.push(Peer {
            addr,
            rtc,
            next: self.now,
            media: Vec::new(),
            video_wire: Vec::new(),
            keyframe_requests: 0,
            connected: false,
            closed: false,
            audio: Some(audio),
            video: Some(video),
            online: true,
            loss: 0.0,
            lost: 0,
            cap_bps: None,
            link_free_at: self.now,
            rids: rids.to_vec(),
            channel: None,
            channel_messages: Vec::new(),
        });
        (self.peers.len() - 1, offer.to_sdp_string(), pending)
    }

    pub fn finish(&mut self, peer: usize, pending: SdpPendingOffer, answer: &str) {
        let answer = SdpAnswer::from_sdp_string(answer).unwrap();
        self.peers[peer]
            .rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .unwrap();
    }

    pub fn publish(
        &mut self,
        room_name: &str,
        owner: &str,
    ) -> Result<(usize, SessionId), SfuError> {
        self.publish_layers(room_name, owner, &[])
    }

    /// A publisher sending simulcast layers `rids` (the first one big).
    pub fn publish_layers(
        &mut self,
        room_name: &str,
        owner: &str,
        rids: &[&'static str],
    ) -> Result<(usize, SessionId), SfuError> {
        let (i, offer, pending) = self.client_with_layers(Direction::SendOnly, rids);
        let accepted = self
            .sfu
            .accept_publisher(self.now, room(room_name), owner, &offer)?;
        self.finish(i, pending, &accepted.answer_sdp);
        self.drain_sfu();
        Ok((i, accepted.session))
    }

    pub fn subscribe(&mut self, room_name: &str) -> (usize, SessionId) {
        let (i, offer, pending) = self.client(Direction::RecvOnly);
        let accepted = self
            .sfu
            .accept_subscriber(self.now, room(room_name), "viewer", &offer)
            .unwrap();
        self.finish(i, pending, &accepted.answer_sdp);
        self.drain_sfu();
        (i, accepted.session)
    }

    /// A viewer whose offer also opens a data channel `label`.
    pub fn subscribe_with_channel(&mut self, room_name: &str, label: &str) -> (usize, SessionId) {
        let (i, offer, pending) = self.client_full(Direction::RecvOnly, &[], Some(label));
        let accepted = self
            .sfu
            .accept_subscriber(self.now, room(room_name), "viewer", &offer)
            .unwrap();
        self.finish(i, pending, &accepted.answer_sdp);
        self.drain_sfu();
        (i, accepted.session)
    }

    /// Peer `i` writes `data` on its data channel; false if it has none open
    /// yet or the channel's buffer is full.
    pub fn peer_send(&mut self, i: usize, binary: bool, data: &[u8]) -> bool {
        let p = &mut self.peers[i];
        let Some(id) = p.channel else {
            return false;
        };
        let written = p
            .rtc
            .channel(id)
            .is_some_and(|mut ch| ch.write(binary, data).unwrap_or(false));
        self.drain_peer(i);
        written
    }

    pub fn drain_sfu(&mut self) {
        loop {
            // Only the SFU's own call is timed, not this network's bookkeeping.
            let started = wall_clock();
            let output = self.sfu.poll_output();
            self.sfu_busy += started.elapsed();
            match output {
                Output::Transmit(t) => {
                    let mut at = self.now + LATENCY;
                    if let Some(p) = self.peers.iter_mut().find(|p| p.addr == t.destination)
                        && let Some(cap) = p.cap_bps
                    {
                        // A bottleneck link: serialized at `cap`, queue at most 200 ms.
                        let start = p.link_free_at.max(self.now);
                        let done = start
                            + Duration::from_nanos(
                                t.contents.len() as u64 * 8 * 1_000_000_000 / cap,
                            );
                        if done - self.now > Duration::from_millis(200) {
                            p.lost += 1;
                            continue;
                        }
                        p.link_free_at = done;
                        at = done + LATENCY;
                    }
                    let i = self.wire.partition_point(|(t0, ..)| *t0 <= at);
                    self.wire
                        .insert(i, (at, t.source, t.destination, t.contents));
                }
                Output::Event(e) => self.events.push(e),
                Output::Relay { .. } => self.relayed += 1,
                Output::Timeout(at) => {
                    self.sfu_next = at;
                    break;
                }
            }
        }
    }

    pub fn drain_peer(&mut self, i: usize) {
        let now = self.now;
        let p = &mut self.peers[i];
        if !p.online {
            return;
        }
        loop {
            match p.rtc.poll_output() {
                Ok(str0m::Output::Transmit(t)) => {
                    self.wire
                        .push_back((now + LATENCY, t.source, t.destination, t.contents.into()))
                }
                Ok(str0m::Output::Timeout(at)) => {
                    p.next = at;
                    break;
                }
                Ok(str0m::Output::Event(e)) => match e {
                    RtcEvent::Connected => p.connected = true,
                    RtcEvent::MediaData(d) => {
                        let kind = if Some(d.mid) == p.video {
                            MediaKind::Video
                        } else {
                            MediaKind::Audio
                        };
                        p.media.push((kind, d.is_keyframe(), now));
                        if kind == MediaKind::Video {
                            let picture_id = match d.codec_extra {
                                CodecExtra::Vp8(e) => e.picture_id,
                                _ => None,
                            };
                            p.video_wire.push((
                                **d.seq_range.start(),
                                **d.seq_range.end(),
                                d.time.numer(),
                                picture_id,
                            ));
                        }
                    }
                    RtcEvent::KeyframeRequest(_) => p.keyframe_requests += 1,
                    RtcEvent::ChannelOpen(id, _) => p.channel = Some(id),
                    RtcEvent::ChannelData(d) => p.channel_messages.push((d.binary, d.data)),
                    RtcEvent::Closed => p.closed = true,
                    _ => {}
                },
                Err(e) => panic!("peer {i} failed: {e}"),
            }
        }
    }

    /// Gives peer `i` its timeout now (str0m packetizes what was written to
    /// it then) and puts what it sends on the wire.
    pub fn peer_timeout(&mut self, i: usize) {
        let now = self.now;
        self.peers[i]
            .rtc
            .handle_input(str0m::Input::Timeout(now))
            .unwrap();
        self.drain_peer(i);
    }

    /// Advances virtual time to `until`, delivering packets and timeouts.
    pub fn run_until(&mut self, until: Instant, mut on_tick: impl FnMut(&mut Net)) {
        let tick = Duration::from_millis(10);
        let mut next_tick = self.now;
        loop {
            let mut next = until.min(self.sfu_next).min(next_tick);
            for p in self.peers.iter().filter(|p| p.online) {
                next = next.min(p.next);
            }
            if let Some((at, ..)) = self.wire.front() {
                next = next.min(*at);
            }
            self.now = self.now.max(next);
            if self.now >= until {
                return;
            }
            if self.now >= next_tick {
                next_tick = self.now + tick;
                on_tick(self);
            }
            while self.wire.front().is_some_and(|(at, ..)| *at <= self.now) {
                let (_, from, to, bytes) = self.wire.pop_front().unwrap();
                self.deliver(from, to, &bytes);
            }
            if self.sfu_next <= self.now {
                let started = wall_clock();
                self.sfu.handle_input(Input::Timeout(self.now));
                self.sfu_busy += started.elapsed();
                self.drain_sfu();
            }
            for i in 0..self.peers.len() {
                if self.peers[i].online && self.peers[i].next <= self.now {
                    self.peer_timeout(i);
                }
            }
        }
    }

    pub fn deliver(&mut self, from: SocketAddr, to: SocketAddr, bytes: &[u8]) {
        if to == SFU_ADDR.parse::<SocketAddr>().unwrap() {
            let started = wall_clock();
            self.sfu.handle_input(Input::Receive {
                now: self.now,
                source: from,
                destination: to,
                contents: bytes,
            });
            self.sfu_busy += started.elapsed();
            self.drain_sfu();
        } else if let Some(i) = self.peers.iter().position(|p| p.addr == to && p.online) {
            if self.peers[i].loss > 0.0 {
                self.seed ^= self.seed << 13;
                self.seed ^= self.seed >> 7;
                self.seed ^= self.seed << 17;
                if (self.seed % 10_000) as f64 / 10_000.0 < self.peers[i].loss {
                    self.peers[i].lost += 1;
                    return;
                }
            }
            let input = str0m::Input::Receive(
                self.now,
                Receive {
                    proto: Protocol::Udp,
                    source: from,
                    destination: to,
                    contents: bytes.try_into().unwrap(),
                },
            );
            self.peers[i].rtc.handle_input(input).unwrap();
            self.drain_peer(i);
        }
    }

    /// Writes one audio frame and, every third tick, one video frame from a
    /// publisher. Keyframes only when asked for (`keyframe`).
    pub fn send_media(&mut self, i: usize, frame: u64, keyframe: bool) {
        let now = self.now;
        let p = &mut self.peers[i];
        if !p.connected || !p.online {
            return;
        }
        if let Some(mid) = p.audio {
            let w = p.rtc.writer(mid).unwrap();
            let pt = w
                .payload_params()
                .find(|pp| pp.spec().codec == Codec::Opus)
                .unwrap()
                .pt();
            w.write(
                pt,
                now,
                MediaTime::new(frame * 480, str0m::media::Frequency::FORTY_EIGHT_KHZ),
                vec![0xfc; 60],
            )
            .unwrap();
        }
        if frame.is_multiple_of(3)
            && let Some(mid) = p.video
        {
            // One stream, or every simulcast layer: the first layer is the
            // big one (six times the bytes of the others).
            let layers: Vec<Option<&'static str>> = if p.rids.is_empty() {
                vec![None]
            } else {
                p.rids.iter().map(|r| Some(*r)).collect()
            };
            for (n, rid) in layers.into_iter().enumerate() {
                let mut w = p.rtc.writer(mid).unwrap();
                let pt = w
                    .payload_params()
                    .find(|pp| pp.spec().codec == Codec::Vp8)
                    .unwrap()
                    .pt();
                if let Some(rid) = rid {
                    w = w.rid(rid.into());
                }
                let scale = if rid.is_some() && n == 0 { 6 } else { 1 };
                // VP8: bit 0 of the first byte clear marks a keyframe.
                let mut data = vec![0x55u8; scale * if keyframe { 3000 } else { 800 }];
                data[0] = if keyframe { 0x10 } else { 0x11 };
                w.write(
                    pt,
                    now,
                    MediaTime::new(frame * 900, str0m::media::Frequency::NINETY_KHZ),
                    data,
                )
                .unwrap();
            }
        }
        self.drain_peer(i);
    }

    /// A publisher in `room_name` and `viewers` subscribers, played for
    /// two seconds so that every session is connected and video flows;
    /// returns the publisher's index and the viewers'.
    pub fn live_room(&mut self, room_name: &str, viewers: usize) -> (usize, Vec<usize>) {
        let (p, _) = self.publish(room_name, "alice").unwrap();
        let subs = (0..viewers).map(|_| self.subscribe(room_name).0).collect();
        let t = self.now + Duration::from_secs(2);
        self.run_until(t, drive_publisher(p));
        (p, subs)
    }

    /// Publisher `p` sends media `frame` (see [`Net::send_media`]); returns
    /// its datagrams to the SFU, taken off the wire (which is cleared first)
    /// and not yet delivered.
    pub fn frame_to_sfu(
        &mut self,
        p: usize,
        frame: u64,
        keyframe: bool,
    ) -> Vec<(Instant, SocketAddr, SocketAddr, Vec<u8>)> {
        self.wire.clear();
        self.send_media(p, frame, keyframe);
        // str0m packetizes the publisher's frame at its next timeout.
        self.peer_timeout(p);
        let sfu: SocketAddr = SFU_ADDR.parse().unwrap();
        self.wire.drain(..).filter(|w| w.2 == sfu).collect()
    }

    pub fn video_received(&self, i: usize) -> Vec<bool> {
        self.peers[i]
            .media
            .iter()
            .filter(|m| m.0 == MediaKind::Video)
            .map(|m| m.1)
            .collect()
    }

    /// Where peer `i`'s received video is not one continuous stream on the
    /// wire: a sequence number skipped or repeated between frames, RTP time
    /// not moving forward, or a VP8 picture id not one more than the last.
    /// Empty when it is continuous. Frames before `from` are left out (a
    /// stretch with loss).
    pub fn video_breaks(&self, i: usize, from: usize) -> Vec<String> {
        let wire = self.peers[i].video_wire.get(from..).unwrap_or_default();
        let mut breaks = Vec::new();
        for (n, w) in wire.windows(2).enumerate() {
            let n = n + from;
            let ((_, last_seq, t0, id0), (first_seq, _, t1, id1)) = (w[0], w[1]);
            if first_seq != last_seq + 1 {
                breaks.push(format!("frame {n}: seq {last_seq} then {first_seq}"));
            }
            if t1 <= t0 {
                breaks.push(format!("frame {n}: time {t0} then {t1}"));
            }
            if let (Some(a), Some(b)) = (id0, id1)
                && b != a + 1
            {
                breaks.push(format!("frame {n}: picture id {a} then {b}"));
            }
        }
        breaks
    }

    pub fn audio_received(&self, i: usize) -> usize {
        self.peers[i]
            .media
            .iter()
            .filter(|m| m.0 == MediaKind::Audio)
            .count()
    }
}

/// A publisher that answers keyframe requests (and starts with a keyframe).
pub fn drive_publisher(publisher: usize) -> impl FnMut(&mut Net) {
    let mut frame = 0u64;
    let mut answered = 0usize;
    move |net: &mut Net| {
        if !net.peers[publisher].connected {
            return;
        }
        let asked = net.peers[publisher].keyframe_requests;
        let keyframe = frame == 0 || asked > answered;
        if keyframe && !frame.is_multiple_of(3) {
            // Keyframes go on video ticks; come back next tick.
        } else {
            if keyframe {
                answered = asked;
            }
            net.send_media(publisher, frame, keyframe);
        }
        frame += 1;
    }
}
