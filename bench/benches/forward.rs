//! The SFU's forwarding path per publisher frame: receive and decrypt the
//! publisher's packets, depacketize, route, and packetize + encrypt + queue
//! for every subscriber, plus the RTCP and timers that come with it. Real
//! str0m peers on the in-memory network of `weir_sfu::sim`; only the time
//! spent inside the SFU is counted (`Net::sfu_busy`), not the peers'.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use weir_sfu::sim::{Net, drive_publisher};

fn forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("sfu_frame_to_subscribers");
    group.sample_size(20);
    for subscribers in [1usize, 10, 100] {
        let mut net = Net::new();
        let (p, _) = net.publish("bench", "alice").unwrap();
        for _ in 0..subscribers {
            net.subscribe("bench");
        }
        let mut drive = drive_publisher(p);
        let t = net.now + Duration::from_secs(2);
        net.run_until(t, &mut drive);
        // One element = one video frame (~800 bytes, one packet) and the
        // audio of its 30 ms, to each subscriber.
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(subscribers),
            &subscribers,
            |b, _| {
                b.iter_custom(|iters| {
                    let before = net.sfu_busy;
                    for _ in 0..iters {
                        let t = net.now + Duration::from_millis(30);
                        net.run_until(t, &mut drive);
                    }
                    net.sfu_busy - before
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
