//! Weir's benchmarks: criterion micro-benchmarks of the per-packet path and
//! the side-by-side macro benchmarks (`weir node` against `weir loadtest`
//! and a raw UDP fan-out forwarder). Results with machine and command go to
//! `bench/RESULTS.md`. The benchmarks arrive with the shard work (issue 3);
//! this crate is where they live.
