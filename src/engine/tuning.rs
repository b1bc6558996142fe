//! Self-tuning batches (`batch_time => interval`): after each batch the size is set so
//! that the next one takes about `batch_time` at the rate just measured. Plain Rust.
//!
//! The rate is messages handled per second of the batch's own work (read, expand, write,
//! record), so a batch cut short by the 8 MB row limit or a chat boundary still measures
//! it. A step changes the size at most twofold, so one slow batch (a checkpoint, a lock
//! wait) or one fast one (all rows already present) does not swing it; the size stays
//! within `MIN_SIZE` .. `MAX_SIZE`.

use std::time::Duration;

pub const MIN_SIZE: usize = 100;
pub const MAX_SIZE: usize = 100_000;

#[derive(Clone, Copy, Debug)]
pub struct Tuner {
    target: Duration,
}

impl Tuner {
    pub fn new(target: Duration) -> Tuner {
        Tuner { target }
    }

    /// The size to start from: the caller's `batch_size`, kept within the range.
    pub fn start(&self, batch_size: usize) -> usize {
        batch_size.clamp(MIN_SIZE, MAX_SIZE)
    }

    /// The next batch's size after one of `current` that handled `messages` in `elapsed`.
    pub fn next(&self, current: usize, messages: usize, elapsed: Duration) -> usize {
        if messages == 0 || elapsed.is_zero() {
            return current;
        }
        let rate = messages as f64 / elapsed.as_secs_f64();
        let wanted = rate * self.target.as_secs_f64();
        let bounded = wanted.clamp(current as f64 / 2.0, current as f64 * 2.0);
        (bounded.round() as usize).clamp(MIN_SIZE, MAX_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn converges_on_the_size_that_takes_the_target_time() {
        let tuner = Tuner::new(ms(1000));
        // 20,000 messages a second: a batch of one second holds 20,000.
        let mut size = tuner.start(1000);
        for _ in 0..10 {
            let elapsed = Duration::from_secs_f64(size as f64 / 20_000.0);
            size = tuner.next(size, size, elapsed);
        }
        assert_eq!(size, 20_000);
    }

    #[test]
    fn moves_at_most_twofold_per_batch() {
        let tuner = Tuner::new(ms(1000));
        assert_eq!(tuner.next(5000, 5000, ms(1)), 10_000);
        assert_eq!(tuner.next(5000, 5000, ms(100_000)), 2500);
    }

    #[test]
    fn stays_within_its_range() {
        let tuner = Tuner::new(ms(1000));
        assert_eq!(tuner.next(150, 150, ms(60_000)), MIN_SIZE);
        assert_eq!(tuner.next(90_000, 90_000, ms(10)), MAX_SIZE);
        assert_eq!(tuner.start(1), MIN_SIZE);
        assert_eq!(tuner.start(1_000_000), MAX_SIZE);
    }

    #[test]
    fn a_short_batch_measures_the_rate_not_its_size() {
        // Cut by the row-byte limit at 500 of 5000 messages, in 100 ms: 5000 a second.
        let tuner = Tuner::new(ms(1000));
        assert_eq!(tuner.next(5000, 500, ms(100)), 5000);
    }

    #[test]
    fn an_empty_batch_changes_nothing() {
        let tuner = Tuner::new(ms(1000));
        assert_eq!(tuner.next(5000, 0, ms(100)), 5000);
        assert_eq!(tuner.next(5000, 10, Duration::ZERO), 5000);
    }
}
