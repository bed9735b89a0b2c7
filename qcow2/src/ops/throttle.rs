//! A simple rate limiter for copy loops.

use std::time::{Duration, Instant};

pub struct Throttle {
    rate: u64,
    start: Instant,
    bytes: u64,
}

impl Throttle {
    /// `rate` in bytes per second; 0 disables limiting.
    pub fn new(rate: u64) -> Self {
        Throttle {
            rate,
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// Records `n` bytes done and sleeps as long as the average is above the rate.
    pub fn account(&mut self, n: u64) {
        if self.rate == 0 {
            return;
        }
        self.bytes += n;
        let due = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}
