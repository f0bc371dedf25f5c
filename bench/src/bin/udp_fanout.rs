//! The raw limit of UDP fan-out on this machine: a forwarder with no WebRTC
//! at all (no ICE, DTLS, SRTP, RTP) that sends every datagram it receives to
//! N destinations, through the same batched I/O the node's shards use
//! (`weir_data_plane::udp`). Weir's forwarding is measured against it:
//! CPU time per forwarded datagram, on one core.
//!
//! Datagrams come in bursts, as a video frame's packets do, and each
//! destination gets a burst's datagrams back to back (what a shard sends a
//! viewer), so GSO groups them as it does in the node.
//!
//! `udp_fanout --fanout 1000 --pps 200 --burst 5 --size 1100 --seconds 10 --io auto`

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
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
    /// Datagram size in bytes.
    #[arg(long, default_value_t = 1100)]
    size: usize,
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

    // Sinks: one socket per destination, drained by one thread.
    let sinks: Vec<UdpSocket> = (0..args.fanout)
        .map(|_| UdpSocket::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .context("binding sink sockets (raise the open-file limit?)")?;
    let dests: Vec<SocketAddr> = sinks
        .iter()
        .map(|s| s.local_addr())
        .collect::<Result<_, _>>()?;
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sink_thread = {
        let received = received.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            for s in &sinks {
                let _ = s.set_nonblocking(true);
            }
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let mut got = 0;
                for s in &sinks {
                    while s.recv(&mut buf).is_ok() {
                        got += 1;
                    }
                }
                received.fetch_add(got, Ordering::Relaxed);
                if got == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
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
                io.poll(
                    Instant::now() + Duration::from_millis(50),
                    &mut |_, data| batch.push(data.to_vec()),
                )?;
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

    // The sender, paced.
    let sender = UdpSocket::bind("127.0.0.1:0")?;
    let payload = vec![0xabu8; args.size];
    let start = Instant::now();
    let interval = Duration::from_secs(1) * args.burst / args.pps.max(1);
    let mut next = start;
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(args.seconds) {
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        for _ in 0..args.burst {
            sender.send_to(&payload, fwd_addr)?;
        }
        sent += u64::from(args.burst);
        next += interval;
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let cpu = fwd_thread
        .join()
        .map_err(|_| anyhow::anyhow!("forwarder panicked"))??;
    let _ = sink_thread.join();
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
        "pps_in": args.pps,
        "sent_in": sent,
        "forwarded": out,
        "received": got,
        "loss_pct": 100.0 * (1.0 - got as f64 / out.max(1) as f64),
        "forwarder_cpu_s": cpu.as_secs_f64(),
        "cpu_ns_per_datagram": ns_per,
        "max_pps_per_core": 1e9 / ns_per.max(1.0),
        "pps_out": out as f64 / wall,
    });
    if args.json {
        println!("{result}");
    } else {
        println!("{}", serde_json::to_string_pretty(&result)?);
    }
    Ok(())
}
