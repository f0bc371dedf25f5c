//! Weir's benchmarks. `src/bin/udp_fanout.rs` measures the raw UDP fan-out
//! limit of the machine through the node's own batched I/O; `run-forwarding.sh`
//! runs `weir node` and `weir loadtest` side by side against that limit;
//! results, with machine and commands, go to `bench/RESULTS.md`.
