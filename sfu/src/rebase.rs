//! Keeps a subscriber's outgoing RTP timeline continuous when the publisher
//! behind it changes (an encoder reconnects and takes over its room): the new
//! publisher's timestamps start where the old ones stopped, advanced by the
//! wall-clock gap, so players see neither a jump back nor a huge leap forward.

use std::time::Instant;

use str0m::media::MediaTime;

#[derive(Debug, Default)]
pub(crate) struct Rebase {
    /// Which publisher the current offset belongs to.
    generation: u64,
    /// Added to incoming media time, in the media's clock units.
    offset: i128,
    /// Last media time written out, and when.
    last_out: Option<(MediaTime, Instant)>,
}

impl Rebase {
    /// Maps a publisher's media time onto the subscriber's timeline.
    pub(crate) fn map(&mut self, generation: u64, time: MediaTime, now: Instant) -> MediaTime {
        if generation != self.generation {
            self.generation = generation;
            self.offset = match self.last_out {
                None => 0,
                Some((last, at)) => {
                    let hz = i128::from(last.denom());
                    let gap =
                        now.saturating_duration_since(at).as_micros() as i128 * hz / 1_000_000;
                    // At least one tick after the last one written.
                    let target = i128::from(last.numer()) + gap.max(1);
                    // One track keeps one clock, so both times share a frequency.
                    target - i128::from(time.numer())
                }
            };
        }
        let hz = time.frequency();
        let numer = (i128::from(time.numer()) + self.offset).clamp(0, i128::from(u64::MAX));
        let out = MediaTime::new(numer as u64, hz);
        self.last_out = Some((out, now));
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use str0m::media::Frequency;

    use super::*;

    #[test]
    fn first_publisher_passes_through_and_takeover_continues_the_timeline() {
        #[allow(clippy::disallowed_methods)] // the origin of virtual time
        let t0 = Instant::now();
        let mut r = Rebase::default();
        let hz = Frequency::NINETY_KHZ;
        assert_eq!(r.map(1, MediaTime::new(1000, hz), t0).numer(), 1000);
        assert_eq!(r.map(1, MediaTime::new(4000, hz), t0).numer(), 4000);
        // New publisher 2 s later with a random timestamp base.
        let t1 = t0 + Duration::from_secs(2);
        let a = r.map(2, MediaTime::new(9_000_000, hz), t1).numer();
        assert_eq!(a, 4000 + 180_000);
        let b = r.map(2, MediaTime::new(9_003_000, hz), t1).numer();
        assert_eq!(b, a + 3000);
        // A publisher whose timestamps are smaller than the old ones still moves forward.
        let c = r.map(3, MediaTime::new(5, hz), t1).numer();
        assert!(c > b);
    }
}
