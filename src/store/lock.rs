//! The locks commands hold on a backup directory, so no command changes files another one
//! is reading or changing (a backup adding an INC while `commit` folds the chain away, two
//! backups writing one uuid file, `prune` removing a point `serve` is serving).
//!
//! Three modes, as `flock`s taken without waiting (a refused command says at once who is in
//! the way rather than hanging behind a backup that may run for hours):
//!
//! | mode        | held by                                   | `.append.lock` | `.lock` |
//! |-------------|-------------------------------------------|----------------|---------|
//! | shared      | `serve`, `merge`, `verify`, `list`        | —              | shared  |
//! | append      | `qmpbackup` adding a FULL/INC/COPY        | exclusive      | shared  |
//! | exclusive   | `commit`, `rebase`, `snapshotrebase`, `prune` | —          | exclusive |
//!
//! So readers coexist with each other and with one backup (a new file changes no point
//! that is being read), two backups exclude each other, and a command that rewrites files
//! excludes everyone. The kernel drops a lock when its holder exits, however it exits, so
//! the lock of a dead process is simply taken over. The files stay (removing a file others
//! may hold shared locks on would let two holders lock different files); they are dot
//! files, which directory scans never take for backups.
//!
//! On read-only media, where no lock file can be created, the shared commands run without a
//! lock and say so.

use crate::fsutil::{self, Dir};
use crate::report;
use crate::store::name::{APPEND_LOCK_FILE, LOCK_FILE};
use anyhow::{anyhow, Context, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What a command does to a directory, which decides whom it coexists with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Reads only: coexists with other readers and with one appending backup.
    Shared,
    /// Adds new backup files: coexists with readers, excludes another append.
    Append,
    /// Rewrites or removes backup files: excludes everyone.
    Exclusive,
}

/// Holds a directory's lock until dropped. Holds nothing when a shared lock could not be
/// taken on read-only media.
#[derive(Debug)]
pub struct DirLock {
    held: Vec<File>,
}

impl DirLock {
    /// Takes `mode`'s lock of the open directory `dir`, or fails at once naming who holds
    /// a conflicting one.
    pub fn acquire(dir: &Dir, mode: LockMode) -> Result<DirLock> {
        let steps: &[(&str, libc::c_int)] = match mode {
            LockMode::Shared => &[(LOCK_FILE, libc::LOCK_SH)],
            // The append lock first: a second backup is told a backup is running, not
            // that the directory is in use by readers it could coexist with.
            LockMode::Append => &[
                (APPEND_LOCK_FILE, libc::LOCK_EX),
                (LOCK_FILE, libc::LOCK_SH),
            ],
            LockMode::Exclusive => &[(LOCK_FILE, libc::LOCK_EX)],
        };
        let mut held = Vec::new();
        for &(name, op) in steps {
            let Some(file) = open_lock_file(dir, name, mode)? else {
                report::warn(format!(
                    "{} is read-only: reading it without a lock (a command changing it meanwhile would go unnoticed)",
                    dir.path().display()
                ));
                return Ok(DirLock { held: Vec::new() });
            };
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Err(busy(dir, mode, name, &file));
                }
                return Err(e)
                    .with_context(|| format!("{}: cannot lock", dir.join(name).display()));
            }
            held.push(file);
        }
        Ok(DirLock { held })
    }

    /// Whether a lock is held (false on read-only media).
    pub fn is_held(&self) -> bool {
        !self.held.is_empty()
    }
}

/// Opens the backup directory `path` and takes `mode`'s lock of it.
pub fn lock_dir(path: &Path, mode: LockMode) -> Result<DirLock> {
    let dir = Dir::open(path)
        .with_context(|| format!("{}: cannot read the backup directory", path.display()))?;
    DirLock::acquire(&dir, mode)
}

/// The refusal: who holds the lock in the way and what to do.
fn busy(dir: &Dir, mode: LockMode, name: &str, file: &File) -> anyhow::Error {
    let holders = fsutil::identity(file)
        .map(|(dev, ino)| holders(dev, ino))
        .unwrap_or_default();
    let who = if holders.is_empty() {
        "another qmpbackup/qmprestore".to_string()
    } else {
        holders.join(", ")
    };
    let what = match (mode, name == APPEND_LOCK_FILE) {
        (_, true) => "is adding a backup to",
        (LockMode::Exclusive, false) => "is using",
        _ => "is changing",
    };
    anyhow!(
        "{who} {what} {}; nothing was changed: run again when it is done",
        dir.path().display()
    )
}

/// Opens the lock file `name` in `dir`, creating it if missing. Only a regular file with
/// no other link is used: a symlink, a FIFO or a hard link to some other file planted there
/// is refused. None when a shared lock meets read-only media.
fn open_lock_file(dir: &Dir, name: &str, mode: LockMode) -> Result<Option<File>> {
    let path = dir.join(name);
    let file = match dir.open_existing_readonly(name) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match dir.create_new(name) {
            Ok(f) => f,
            // Created by someone else meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => dir
                .open_existing_readonly(name)
                .map_err(|e| refused(&path, e))?,
            Err(e)
                if mode == LockMode::Shared
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EROFS | libc::EACCES | libc::EPERM)
                    ) =>
            {
                return Ok(None)
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "{}: cannot create the lock file (is the directory writable?)",
                        path.display()
                    )
                })
            }
        },
        Err(e) => return Err(refused(&path, e)),
    };
    let meta = file
        .metadata()
        .with_context(|| format!("{}: cannot read", path.display()))?;
    if !meta.file_type().is_file() || meta.nlink() != 1 {
        return Err(refused(
            &path,
            format!(
                "a {} with {} link(s)",
                fsutil::kind_of(&meta.file_type()),
                meta.nlink()
            ),
        ));
    }
    Ok(Some(file))
}

fn refused(path: &std::path::Path, why: impl std::fmt::Display) -> anyhow::Error {
    anyhow!(
        "{}: not a lock file this tool made ({why}); nothing was changed: remove it and run again",
        path.display()
    )
}

/// Who holds flocks on the file `(dev, ino)`, from `/proc/locks`: `qmprestore serve (pid
/// 123)`. Empty when that cannot be told.
fn holders(dev: u64, ino: u64) -> Vec<String> {
    let Ok(Some(text)) = fsutil::read_small(std::path::Path::new("/proc/locks"), 16 << 20) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&text);
    let mut pids: Vec<u32> = locks_on(&text, dev, ino);
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter()
        .map(|pid| format!("{} (pid {pid})", command_of(pid)))
        .collect()
}

/// The pids of the FLOCK lines of `/proc/locks` text on the file `(dev, ino)`. A line reads
/// `1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF`, the device as hex major:minor; lines
/// of waiters (`1: -> FLOCK …`) are skipped.
fn locks_on(text: &str, dev: u64, ino: u64) -> Vec<u32> {
    let (major, minor) = (libc::major(dev) as u64, libc::minor(dev) as u64);
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(1) != Some(&"FLOCK") || f.len() < 6 {
                return None;
            }
            let id: Vec<&str> = f[5].split(':').collect();
            let [ma, mi, i] = id[..] else { return None };
            let same = u64::from_str_radix(ma, 16).ok() == Some(major)
                && u64::from_str_radix(mi, 16).ok() == Some(minor)
                && i.parse::<u64>().ok() == Some(ino);
            if !same {
                return None;
            }
            f[4].parse::<u32>().ok()
        })
        .collect()
}

/// `qmprestore serve` for a process started as `/usr/bin/qmprestore serve --dir …`: the
/// program's name and its first argument when that is a subcommand.
fn command_of(pid: u32) -> String {
    let Ok(Some(raw)) = fsutil::read_small(
        std::path::Path::new(&format!("/proc/{pid}/cmdline")),
        1 << 20,
    ) else {
        return "a process".to_string();
    };
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let Some(program) = args.first() else {
        return "a process".to_string();
    };
    let program = program.rsplit('/').next().unwrap_or(program).to_string();
    match args.get(1) {
        Some(sub) if !sub.starts_with('-') && !sub.contains('/') && sub.len() <= 20 => {
            format!("{program} {sub}")
        }
        _ => program,
    }
}

#[cfg(test)]
mod tests {
    use crate::fsutil::Dir;
    use crate::store::lock::{locks_on, DirLock, LockMode};

    fn dir() -> (tempfile::TempDir, Dir) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        (tmp, dir)
    }

    // flock is per open file: a second acquire in this process is a second holder.
    #[test]
    fn readers_share_and_coexist_with_one_backup() {
        let (_tmp, d) = dir();
        let a = DirLock::acquire(&d, LockMode::Shared).unwrap();
        let b = DirLock::acquire(&d, LockMode::Shared).unwrap();
        let backup = DirLock::acquire(&d, LockMode::Append).unwrap();
        assert!(a.is_held() && b.is_held() && backup.is_held());
        let e = DirLock::acquire(&d, LockMode::Append)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is adding a backup to"), "{e}");
        let e = DirLock::acquire(&d, LockMode::Exclusive)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is using") && e.contains("nothing was changed"),
            "{e}"
        );
        drop((a, b));
        // The backup alone still keeps a rewriting command out.
        assert!(DirLock::acquire(&d, LockMode::Exclusive).is_err());
        drop(backup);
        DirLock::acquire(&d, LockMode::Exclusive).unwrap();
    }

    #[test]
    fn an_exclusive_holder_excludes_everyone_and_is_named() {
        let (tmp, d) = dir();
        let held = DirLock::acquire(&d, LockMode::Exclusive).unwrap();
        let me = format!("(pid {})", std::process::id());
        for mode in [LockMode::Shared, LockMode::Append, LockMode::Exclusive] {
            let e = DirLock::acquire(&d, mode).unwrap_err().to_string();
            assert!(e.contains(&me), "{mode:?}: {e}");
            assert!(e.contains("run again when it is done"), "{e}");
        }
        drop(held);
        // The files stay: removing one others may hold would split the lock in two.
        assert!(tmp.path().join(".lock").exists());
        DirLock::acquire(&d, LockMode::Shared).unwrap();
    }

    #[test]
    fn a_leftover_lock_file_is_reused() {
        // What a killed holder leaves: the file, without the lock.
        let (tmp, d) = dir();
        std::fs::write(tmp.path().join(".lock"), "12345\n").unwrap();
        let lock = DirLock::acquire(&d, LockMode::Exclusive).unwrap();
        assert!(lock.is_held());
        assert_eq!(
            std::fs::read_to_string(tmp.path().join(".lock")).unwrap(),
            "12345\n",
            "lock files are only locked, never written"
        );
    }

    #[test]
    fn planted_lock_files_are_refused_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let d = tmp.path().join("d");
        std::fs::create_dir(&d).unwrap();
        let dir = Dir::open(&d).unwrap();
        // A symlink, and a hard link to another file.
        std::os::unix::fs::symlink(&victim, d.join(".lock")).unwrap();
        let e = DirLock::acquire(&dir, LockMode::Exclusive)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a lock file this tool made"), "{e}");
        std::fs::remove_file(d.join(".lock")).unwrap();
        std::fs::hard_link(&victim, d.join(".lock")).unwrap();
        let e = DirLock::acquire(&dir, LockMode::Shared)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a lock file this tool made"), "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        std::fs::remove_file(d.join(".lock")).unwrap();
        std::fs::create_dir(d.join(".lock")).unwrap();
        assert!(DirLock::acquire(&dir, LockMode::Exclusive).is_err());
    }

    #[test]
    fn a_lock_in_a_missing_directory_fails_cleanly() {
        let (tmp, d) = dir();
        std::fs::remove_dir(tmp.path()).unwrap();
        let e = format!("{:#}", DirLock::acquire(&d, LockMode::Append).unwrap_err());
        assert!(e.contains("cannot create the lock file"), "{e}");
    }

    #[test]
    fn proc_locks_lines_name_the_holders_of_one_file() {
        let dev = libc::makedev(0xfd, 0x01);
        let text = "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF\n\
                    2: FLOCK  ADVISORY  READ  1235 fd:01:5678 0 EOF\n\
                    2: -> FLOCK  ADVISORY  READ  999 fd:01:5678 0 EOF\n\
                    3: POSIX  ADVISORY  WRITE 77 fd:01:5678 0 EOF\n\
                    4: FLOCK  ADVISORY  READ  88 fd:01:5679 0 EOF\n\
                    5: OFDLCK ADVISORY  READ  -1 fd:01:5678 0 EOF\n\
                    garbage\n";
        assert_eq!(locks_on(text, dev, 5678), [1234, 1235]);
        assert!(locks_on(text, libc::makedev(8, 1), 5678).is_empty());
    }
}
