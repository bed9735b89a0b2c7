//! A rate limiter for copy loops, which can also tell a progress meter what was done.

use std::time::{Duration, Instant};

/// Told how many more bytes a copy has done.
pub type Meter = Box<dyn FnMut(u64) + Send>;

pub struct Throttle {
    rate: u64,
    start: Instant,
    bytes: u64,
    meter: Option<Meter>,
}

impl Throttle {
    /// `rate` in bytes per second; 0 disables limiting.
    pub fn new(rate: u64) -> Self {
        Throttle {
            rate,
            start: Instant::now(),
            bytes: 0,
            meter: None,
        }
    }

    /// Also tells `meter` every amount accounted.
    pub fn with_meter(mut self, meter: Meter) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Records `n` bytes done and sleeps as long as the average is above the rate.
    pub fn account(&mut self, n: u64) {
        if let Some(m) = &mut self.meter {
            m(n);
        }
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
