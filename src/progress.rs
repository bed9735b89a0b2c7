//! Progress of long copies, for people and for programs: a bar on a terminal, a log line
//! every few seconds otherwise, JSON lines with `--json`, nothing with `--quiet`. The same
//! convention for every command: with `--json`, events go to stdout, or to stderr when
//! stdout carries the data itself (a raw stream).

use crate::report;
use serde_json::{json, Value};
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds between progress log lines (and JSON progress events).
const LOG_EVERY: Duration = Duration::from_secs(5);

/// How a command reports progress and results.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reporting {
    /// Events and the summary as JSON lines.
    pub json: bool,
    /// Stdout carries data: JSON goes to stderr.
    pub stdout_is_data: bool,
    /// No progress (errors and warnings still show).
    pub quiet: bool,
}

impl Reporting {
    /// One JSON event line, where `--json` output goes; nothing without `--json`.
    pub fn event(&self, value: Value) {
        if !self.json {
            return;
        }
        let line = format!("{value}\n");
        if self.stdout_is_data {
            let _ = std::io::stderr().write_all(line.as_bytes());
        } else {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
        }
    }

    /// A meter for `total` bytes of work on `label` (a disk, a file).
    pub fn meter(&self, label: &str, total: u64) -> Meter {
        let bar = (!self.json && !self.quiet && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(total.max(1));
            b.set_style(bar_style());
            b.set_prefix(label.to_string());
            b
        });
        Meter {
            reporting: *self,
            label: label.to_string(),
            total,
            bar,
            state: Mutex::new(State {
                done: 0,
                start: Instant::now(),
                last: Instant::now(),
            }),
        }
    }
}

/// How every progress bar looks: the disk, the bar, bytes done of the total, rate, ETA.
pub fn bar_style() -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(
        "{prefix:>16} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ")
}

struct State {
    done: u64,
    start: Instant,
    last: Instant,
}

/// Progress of one piece of work: bytes done of a total known up front.
pub struct Meter {
    reporting: Reporting,
    label: String,
    total: u64,
    bar: Option<indicatif::ProgressBar>,
    state: Mutex<State>,
}

impl Meter {
    /// `n` more bytes done.
    pub fn add(&self, n: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.done += n;
        if let Some(b) = &self.bar {
            b.set_position(s.done.min(self.total));
            return;
        }
        if s.last.elapsed() < LOG_EVERY {
            return;
        }
        s.last = Instant::now();
        self.report(&s);
    }

    fn report(&self, s: &State) {
        let r = &self.reporting;
        if r.json {
            r.event(json!({"event": "progress", "disk": self.label, "done": s.done, "total": self.total}));
        } else if !r.quiet {
            let secs = s.start.elapsed().as_secs_f64().max(1e-3);
            report::info(format!(
                "{}: {}% ({} of {}, {}/s)",
                self.label,
                (s.done.min(self.total) * 100)
                    .checked_div(self.total)
                    .unwrap_or(100),
                report::bytes(s.done),
                report::bytes(self.total),
                report::bytes((s.done as f64 / secs) as u64)
            ));
        }
    }

    /// The work is done: the bar completed; returns the bytes done and the seconds taken.
    pub fn finish(&self) -> (u64, f64) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = &self.bar {
            b.set_position(self.total);
            b.finish();
        }
        (s.done, s.start.elapsed().as_secs_f64())
    }
}

/// Work that stopped before the end leaves its bar where it was.
impl Drop for Meter {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            if !b.is_finished() {
                b.abandon();
            }
        }
    }
}
