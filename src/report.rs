//! Messages for people: always on stderr, so stdout carries only what was asked for.

use std::sync::atomic::{AtomicBool, Ordering};

static QUIET: AtomicBool = AtomicBool::new(false);
static DEBUG: AtomicBool = AtomicBool::new(false);

pub fn set_quiet(q: bool) {
    QUIET.store(q, Ordering::Relaxed);
}

pub fn set_debug(d: bool) {
    DEBUG.store(d, Ordering::Relaxed);
}

pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

pub fn info(msg: impl AsRef<str>) {
    if !QUIET.load(Ordering::Relaxed) {
        eprintln!("{}", msg.as_ref());
    }
}

pub fn warn(msg: impl AsRef<str>) {
    eprintln!("warning: {}", msg.as_ref());
}

pub fn debug(msg: impl AsRef<str>) {
    if debug_enabled() {
        eprintln!("debug: {}", msg.as_ref());
    }
}

/// Bytes in a human unit (KiB, MiB, GiB...).
pub fn bytes(n: u64) -> String {
    qcow2::ops::info::human_size(n)
}
