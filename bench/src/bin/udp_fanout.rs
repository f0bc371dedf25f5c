//! The raw limit of UDP fan-out on this machine: a forwarder with no WebRTC
//! at all (no ICE, DTLS, SRTP, RTP) that sends every datagram it receives to
//! N destinations, through the same batched I/O the node's shards use
//! (`weir_data_plane::udp`). Weir's forwarding is measured against it:
//! CPU time per forwarded datagram, on one core.
//!
//! Datagrams come in bursts, as a video frame's packets do (every
//! `--keyframe-every`th burst as large as a keyframe). The forwarder waits
//! for a burst's last datagram, as a shard waits for a frame's, then sends
//! each destination the whole burst back to back (what a shard sends a
//! viewer), so GSO groups them as it does in the node, however the burst's
//! datagrams happened to be woken for. With `--audio-pps`, that many of the
//! datagrams are small and sent one at a time between the bursts, as a
//! publisher's audio frames are: each is a send of its own, in the node
//! and here.
//!
//! It also gives the delay a forwarder with no per-viewer work at all
//! cannot beat here: from when a burst was sent to when its first datagram
//! reached each destination's socket (kernel receive timestamps), as the
//! load test's arrival delay counts a video frame.
//!
//! `udp_fanout --fanout 1000 --pps 206 --audio-pps 50 --audio-size 60 --burst 5 --keyframe-every 60 --keyframe-burst 20 --size 1150 --seconds 10 --io auto`

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt,
};
use nix::time::{ClockId, clock_gettime};
use weir_data_plane::udp::{self, IoChoice};

#[derive(Parser)]
struct Args {
    /// Destinations each datagram goes to.
    #[arg(long, default_value_t = 1000)]
    fanout: usize,
    /// Datagrams per second into the forwarder.
    #[arg(long, default_value_t = 200)]
    pps: u32,
    /// Datagrams sent back to back each time (a video frame's packets).
    #[arg(long, default_value_t = 1)]
    burst: u32,
    /// Every this many bursts one is a keyframe's (0: none).
    #[arg(long, default_value_t = 0)]
    keyframe_every: u32,
    /// Datagrams of a keyframe's burst (default: --burst).
    #[arg(long)]
    keyframe_burst: Option<u32>,
    /// Datagram size in bytes.
    #[arg(long, default_value_t = 1100)]
    size: usize,
    /// Of --pps, audio datagrams: sent one at a time between the bursts, as
    /// a publisher's 20 ms audio frames are (0: none).
    #[arg(long, default_value_t = 0)]
    audio_pps: u32,
    /// Audio datagram size in bytes.
    #[arg(long, default_value_t = 60)]
    audio_size: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// auto, io_uring or epoll.
    #[arg(long, default_value = "auto")]
    io: IoChoice,
    /// GSO sends (true/false), as the node's --udp-gso.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    gso: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn thread_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.fanout > 0 && args.fanout <= 20_000,
        "--fanout 1..=20000"
    );
    anyhow::ensure!(
        args.size > 0 && args.size <= udp::MAX_DATAGRAM,
        "--size 1..=2048"
    );
    anyhow::ensure!(args.seconds > 0 && args.seconds <= 600, "--seconds 1..=600");
    anyhow::ensure!(
        args.burst > 0 && args.burst <= 64 && args.burst <= args.pps.max(1),
        "--burst 1..=64, at most --pps"
    );
    let keyframe_burst = args.keyframe_burst.unwrap_or(args.burst);
    anyhow::ensure!(
        (1..=64).contains(&keyframe_burst),
        "--keyframe-burst 1..=64"
    );
    anyhow::ensure!(
        args.size >= STAMP && args.audio_size >= STAMP && args.audio_size <= udp::MAX_DATAGRAM,
        "--size and --audio-size at least {STAMP} (the send time and position ride in the datagram)"
    );
    anyhow::ensure!(args.audio_pps < args.pps, "--audio-pps below --pps");

    // Sinks: one socket per destination, drained by one thread; each
    // datagram carries the time it reached its socket.
    let sinks: Vec<UdpSocket> = (0..args.fanout)
        .map(|_| UdpSocket::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .context("binding sink sockets (raise the open-file limit?)")?;
    for s in &sinks {
        setsockopt(s, sockopt::ReceiveTimestampns, &true).context("SO_TIMESTAMPNS")?;
    }
    let dests: Vec<SocketAddr> = sinks
        .iter()
        .map(|s| s.local_addr())
        .collect::<Result<_, _>>()?;
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sink_thread = {
        let received = received.clone();
        let stop = stop.clone();
        std::thread::spawn(move || -> Histogram<u64> {
            let mut delays = Histogram::<u64>::new(3).expect("3 significant digits");
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let mut got = 0;
                for s in &sinks {
                    while let Some((n, arrived)) = recv_stamped(s, &mut buf) {
                        got += 1;
                        // The first datagram of a burst, as the load test
                        // counts a frame at its first packet.
                        if n >= STAMP
                            && buf[8] == 0
                            && buf[10] == VIDEO
                            && let Some(arrived) = arrived
                        {
                            let sent = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
                            let _ = delays.record(arrived.saturating_sub(sent) / 1000);
                        }
                    }
                }
                received.fetch_add(got, Ordering::Relaxed);
                if got == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            delays
        })
    };

    // The forwarder, on its own thread, timed by its own CPU clock.
    let fwd_socket = UdpSocket::bind("127.0.0.1:0")?;
    let fwd_addr = fwd_socket.local_addr()?;
    let (mut io, _waker) = udp::open(fwd_socket, args.io, args.gso)?;
    let backend = io.backend();
    let forwarded = Arc::new(AtomicU64::new(0));
    let fwd_thread = {
        let forwarded = forwarded.clone();
        let stop = stop.clone();
        std::thread::spawn(move || -> anyhow::Result<Duration> {
            let cpu0 = thread_cpu();
            let mut batch: Vec<Vec<u8>> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let mut complete = false;
                io.poll(
                    Instant::now() + Duration::from_millis(50),
                    &mut |_, data| {
                        // The burst is complete at its last datagram.
                        complete |= data.len() < STAMP || data[8].wrapping_add(1) >= data[9];
                        batch.push(data.to_vec());
                    },
                )?;
                if !complete {
                    continue;
                }
                for dest in &dests {
                    for d in &batch {
                        io.queue(*dest, d);
                    }
                }
                forwarded.fetch_add((dests.len() * batch.len()) as u64, Ordering::Relaxed);
                batch.clear();
                io.flush()?;
            }
            Ok(thread_cpu() - cpu0)
        })
    };

    // The sender, paced; each datagram carries its burst's send time and
    // its place in the burst.
    let sender = UdpSocket::bind("127.0.0.1:0")?;
    let mut payload = vec![0xabu8; args.size];
    payload[10] = VIDEO;
    let mut audio = vec![0xcdu8; args.audio_size];
    (audio[8], audio[9], audio[10]) = (0, 1, AUDIO);
    let start = Instant::now();
    let interval = Duration::from_secs(1) * args.burst / (args.pps - args.audio_pps);
    let audio_interval = (args.audio_pps > 0).then(|| Duration::from_secs(1) / args.audio_pps);
    let mut next = start;
    let mut next_audio = start;
    let mut sent = 0u64;
    let mut bursts = 0u32;
    while start.elapsed() < Duration::from_secs(args.seconds) {
        let due = if audio_interval.is_some() {
            next.min(next_audio)
        } else {
            next
        };
        let now = Instant::now();
        if now < due {
            std::thread::sleep(due - now);
        }
        if let Some(every) = audio_interval
            && next_audio <= next
        {
            audio[..8].copy_from_slice(&unix_ns(SystemTime::now()).to_be_bytes());
            sender.send_to(&audio, fwd_addr)?;
            sent += 1;
            next_audio += every;
            continue;
        }
        let burst = if args.keyframe_every > 0 && bursts.is_multiple_of(args.keyframe_every) {
            keyframe_burst
        } else {
            args.burst
        };
        bursts = bursts.wrapping_add(1);
        payload[..8].copy_from_slice(&unix_ns(SystemTime::now()).to_be_bytes());
        payload[9] = burst as u8;
        for i in 0..burst {
            payload[8] = i as u8;
            sender.send_to(&payload, fwd_addr)?;
        }
        sent += u64::from(burst);
        next += interval;
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let cpu = fwd_thread
        .join()
        .map_err(|_| anyhow::anyhow!("forwarder panicked"))??;
    let delays = sink_thread
        .join()
        .map_err(|_| anyhow::anyhow!("sink panicked"))?;
    let ms = |q: f64| delays.value_at_quantile(q) as f64 / 1000.0;
    let wall = start.elapsed().as_secs_f64();
    let out = forwarded.load(Ordering::Relaxed);
    let got = received.load(Ordering::Relaxed);
    let ns_per = cpu.as_nanos() as f64 / out.max(1) as f64;
    let result = serde_json::json!({
        "io": backend.as_str(),
        "gso": args.gso,
        "burst": args.burst,
        "fanout": args.fanout,
        "size": args.size,
        "audio_pps": args.audio_pps,
        "audio_size": args.audio_size,
        "pps_in": args.pps,
        "sent_in": sent,
        "forwarded": out,
        "received": got,
        "loss_pct": 100.0 * (1.0 - got as f64 / out.max(1) as f64),
        "forwarder_cpu_s": cpu.as_secs_f64(),
        "cpu_ns_per_datagram": ns_per,
        "max_pps_per_core": 1e9 / ns_per.max(1.0),
        "pps_out": out as f64 / wall,
        "keyframe_every": args.keyframe_every,
        "keyframe_burst": keyframe_burst,
        "delay_ms": {
            "count": delays.len(),
            "p50": ms(0.5),
            "p90": ms(0.9),
            "p99": ms(0.99),
            "max": delays.max() as f64 / 1000.0,
        },
    });
    if args.json {
        println!("{result}");
    } else {
        println!("{}", serde_json::to_string_pretty(&result)?);
    }
    Ok(())
}

/// Bytes at the head of each datagram: the burst's send time (ns since the
/// Unix epoch, big-endian), the datagram's place in its burst, the burst's
/// length, and its kind ([`VIDEO`] or [`AUDIO`]).
const STAMP: usize = 11;
const VIDEO: u8 = 0;
const AUDIO: u8 = 1;

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One datagram without blocking, with when it reached the socket (ns
/// since the Unix epoch) when the kernel said.
fn recv_stamped(s: &UdpSocket, buf: &mut [u8]) -> Option<(usize, Option<u64>)> {
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
    let msg = recvmsg::<SockaddrStorage>(
        s.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .ok()?;
    let arrived = msg.cmsgs().into_iter().flatten().find_map(|m| match m {
        ControlMessageOwned::ScmTimestampns(t) => Some(
            u64::try_from(t.tv_sec()).ok()? * 1_000_000_000 + u64::try_from(t.tv_nsec()).ok()?,
        ),
        _ => None,
    });
    Some((msg.bytes, arrived))
}
