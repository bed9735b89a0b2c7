//! Messages for people: always on stderr, so stdout carries only what was asked for.

use std::sync::atomic::{AtomicBool, Ordering};

use std::io::Write;
use std::sync::Mutex;

static QUIET: AtomicBool = AtomicBool::new(false);
static LOGFILE: Mutex<Option<std::fs::File>> = Mutex::new(None);
static SYSLOG: Mutex<Option<std::os::unix::net::UnixDatagram>> = Mutex::new(None);

/// Also append every message to `path` (its directory is created if missing).
pub fn set_logfile(path: &std::path::Path) -> std::io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
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

/// A line for the log file and syslog only (not the terminal): the invocation, versions.
pub fn log_only(msg: impl AsRef<str>) {
    mirror("INFO", 6, msg.as_ref());
}

/// The command line as it goes into a log: the values of options that look like secrets
/// (password, secret, token, passphrase, key) masked, as `--opt=VALUE` or `--opt VALUE`
/// and as `password=VALUE` inside an argument (a URI's query, a QEMU option string).
pub fn masked_command_line(args: &[String]) -> String {
    const SECRET: [&str; 5] = ["password", "secret", "token", "passphrase", "key"];
    let secret = |name: &str| {
        let n = name.to_ascii_lowercase();
        SECRET.iter().any(|s| n.contains(s))
    };
    let mut out = Vec::new();
    let mut mask_next = false;
    for a in args {
        if mask_next {
            out.push("***".to_string());
            mask_next = false;
            continue;
        }
        if let Some(opt) = a.strip_prefix("--") {
            match opt.split_once('=') {
                Some((name, _)) if secret(name) => {
                    out.push(format!("--{name}=***"));
                    continue;
                }
                None if secret(opt) => {
                    out.push(a.clone());
                    mask_next = true;
                    continue;
                }
                _ => {}
            }
        }
        // key=value pairs inside one argument, separated by , & ; or ?
        let mut masked = String::new();
        let mut rest = a.as_str();
        while let Some(i) = rest.find('=') {
            let (head, tail) = rest.split_at(i);
            masked.push_str(head);
            masked.push('=');
            let name = head
                .rsplit([',', '&', ';', '?', ' '])
                .next()
                .unwrap_or(head);
            let end = tail[1..]
                .find([',', '&', ';', ' '])
                .map_or(tail.len(), |e| e + 1);
            if secret(name) {
                masked.push_str("***");
            } else {
                masked.push_str(&tail[1..end]);
            }
            rest = &tail[end..];
        }
        masked.push_str(rest);
        out.push(masked);
    }
    out.join(" ")
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

#[cfg(test)]
mod tests {
    use crate::report::masked_command_line;

    fn line(args: &[&str]) -> String {
        masked_command_line(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn secrets_are_masked_and_the_rest_kept() {
        assert_eq!(
            line(&[
                "qmpbackup",
                "--socket",
                "/run/q.sock",
                "backup",
                "--level",
                "full"
            ]),
            "qmpbackup --socket /run/q.sock backup --level full"
        );
        assert_eq!(
            line(&["x", "--password", "hunter2", "--api-token=abc", "-t", "/b"]),
            "x --password *** --api-token=*** -t /b"
        );
        assert_eq!(
            line(&["x", "nbd://h/e?tls-creds=c&password=p1,user=u", "a=b"]),
            "x nbd://h/e?tls-creds=c&password=***,user=u a=b"
        );
        assert_eq!(line(&["x", "key-secret=1,id=2"]), "x key-secret=***,id=2");
    }
}
