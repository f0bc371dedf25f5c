//! The SFU's per-packet path: one publisher packet received, decrypted,
//! depacketized, routed and written (packetized + encrypted) for every
//! subscriber, with the resulting datagrams queued. Measured with real str0m
//! peers on the in-memory network of `weir_sfu::sim`; only the SFU's work is
//! timed.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use str0m::format::Codec;
use str0m::media::{Frequency, MediaTime};
use weir_sfu::sim::{Net, SFU_ADDR, drive_publisher};
use weir_sfu::{Input, Output};

fn forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("sfu_forward_packet");
    for subscribers in [1usize, 10, 100] {
        let mut net = Net::new();
        let (p, _) = net.publish("bench", "alice").unwrap();
        for _ in 0..subscribers {
            net.subscribe("bench");
        }
        let t = net.now + Duration::from_secs(2);
        net.run_until(t, drive_publisher(p));
        let sfu_addr = SFU_ADDR.parse().unwrap();
        let mut frame = 10_000u64;
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(subscribers),
            &subscribers,
            |b, _| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        // The publisher sends one ~1000-byte VP8 delta frame (one packet).
                        frame += 1;
                        net.now += Duration::from_millis(1);
                        let now = net.now;
                        {
                            let peer = &mut net.peers[p];
                            let mid = peer.video.unwrap();
                            let w = peer.rtc.writer(mid).unwrap();
                            let pt = w
                                .payload_params()
                                .find(|x| x.spec().codec == Codec::Vp8)
                                .unwrap()
                                .pt();
                            let mut data = vec![0x55u8; 1000];
                            data[0] = 0x11;
                            w.write(
                                pt,
                                now,
                                MediaTime::new(frame * 3000, Frequency::NINETY_KHZ),
                                data,
                            )
                            .unwrap();
                            peer.rtc.handle_input(str0m::Input::Timeout(now)).unwrap();
                        }
                        net.drain_peer(p);
                        let packets: Vec<_> = net
                            .wire
                            .drain(..)
                            .filter(|(_, _, to, _)| *to == sfu_addr)
                            .collect();
                        let start = Instant::now();
                        let mut sent = 0usize;
                        for (_, from, to, bytes) in &packets {
                            net.sfu.handle_input(Input::Receive {
                                now,
                                source: *from,
                                destination: *to,
                                contents: bytes,
                            });
                            loop {
                                match net.sfu.poll_output() {
                                    Output::Transmit(t) => sent += black_box(t.contents.len()),
                                    Output::Event(_) => {}
                                    Output::Timeout(_) => break,
                                }
                            }
                        }
                        total += start.elapsed();
                        black_box(sent);
                    }
                    total
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
