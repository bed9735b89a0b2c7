//! Messages for people: always on stderr, so stdout carries only what was asked for.

use std::sync::atomic::{AtomicBool, Ordering};

use std::io::Write;
use std::sync::Mutex;

static QUIET: AtomicBool = AtomicBool::new(false);
static LOGFILE: Mutex<Option<std::fs::File>> = Mutex::new(None);
static SYSLOG: Mutex<Option<std::os::unix::net::UnixDatagram>> = Mutex::new(None);

/// Also append every message to `path`.
pub fn set_logfile(path: &std::path::Path) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    *LOGFILE.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    Ok(())
}

/// Also send every message to the local syslog (/dev/log).
pub fn set_syslog() -> std::io::Result<()> {
    let s = std::os::unix::net::UnixDatagram::unbound()?;
    s.connect("/dev/log")?;
    *SYSLOG.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
    Ok(())
}

fn mirror(level: &str, prio: u8, msg: &str) {
    if let Some(f) = LOGFILE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let _ = writeln!(
            f,
            "{} {level} {msg}",
            crate::humanize::format_utc(ts as i64)
        );
    }
    if let Some(s) = SYSLOG.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        // facility user (1), so priority = 8 + severity
        let _ =
            s.send(format!("<{}>qmpbackup[{}]: {msg}", 8 + prio, std::process::id()).as_bytes());
    }
}
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
    mirror("INFO", 6, msg.as_ref());
}

pub fn warn(msg: impl AsRef<str>) {
    eprintln!("warning: {}", msg.as_ref());
    mirror("WARNING", 4, msg.as_ref());
}

pub fn error(msg: impl AsRef<str>) {
    eprintln!("{}", msg.as_ref());
    mirror("ERROR", 3, msg.as_ref());
}

pub fn debug(msg: impl AsRef<str>) {
    if debug_enabled() {
        eprintln!("debug: {}", msg.as_ref());
        mirror("DEBUG", 7, msg.as_ref());
    }
}

/// Bytes in a human unit (KiB, MiB, GiB...).
pub fn bytes(n: u64) -> String {
    crate::humanize::human_size(n)
}
