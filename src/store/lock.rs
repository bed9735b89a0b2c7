//! The lock a command holds while it changes a backup directory, so two runs never change
//! one directory at once (a backup adding an INC while `qmprestore commit` folds the chain
//! away, two backups writing one uuid file).
//!
//! An exclusive `flock` on `<dir>/.lock`, taken without waiting: a second writer is refused
//! at once with the holder's pid, rather than left hanging behind a backup that may run for
//! hours. The kernel drops the lock when its holder exits, however it exits; the file is
//! removed when the lock is released and a leftover one (after a kill) is simply reused. It
//! is a dot file, which directory scans never take for a backup.
//!
//! Commands that only read (`merge`, `verify`, `list`, `rebase --dry-run`) take no lock: they
//! must work on read-only media, where no lock file can be created.

use crate::fsutil::{self, Dir};
use crate::store::name::LOCK_FILE;
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};

/// How often the lock file is opened anew when its holder removed it meanwhile.
const ATTEMPTS: usize = 10;

/// Holds the lock of one directory until dropped.
#[derive(Debug)]
pub struct DirLock {
    dir: Dir,
    file: File,
}

impl DirLock {
    /// Takes the lock of the open directory `dir`, or fails at once when another process
    /// holds it.
    pub fn acquire(dir: &Dir) -> Result<DirLock> {
        let path = dir.join(LOCK_FILE);
        for _ in 0..ATTEMPTS {
            let Some(file) = open_lock_file(dir)? else {
                continue;
            };
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    bail!(
                        "another qmpbackup/qmprestore is working on {} ({}); nothing was changed: run again when it is done",
                        dir.path().display(),
                        holder(&file)
                    );
                }
                return Err(e).with_context(|| format!("{}: cannot lock", path.display()));
            }
            // The holder before us removes the file when it is done: a lock on a file no
            // longer at that name excludes nobody, so open the name again.
            let ours = fsutil::identity(&file)?;
            let named = dir.lstat(LOCK_FILE)?.map(|st| (st.st_dev, st.st_ino));
            if named != Some(ours) {
                continue;
            }
            let lock = DirLock {
                dir: dir.try_clone()?,
                file,
            };
            lock.record_pid();
            return Ok(lock);
        }
        bail!(
            "{}: the lock file keeps changing; is another qmpbackup/qmprestore starting and stopping on {}?",
            path.display(),
            dir.path().display()
        )
    }

    /// Writes our pid into the lock file, for the message a second writer gets (best
    /// effort: the lock works without it).
    fn record_pid(&self) {
        let _ = self.file.set_len(0);
        let _ = (&self.file).write_all(format!("{}\n", std::process::id()).as_bytes());
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Removed while still held, so nobody can lock the name we remove; the lock goes
        // with the descriptor right after.
        let ours = fsutil::identity(&self.file).ok();
        let named = self
            .dir
            .lstat(LOCK_FILE)
            .ok()
            .flatten()
            .map(|st| (st.st_dev, st.st_ino));
        if ours.is_some() && named == ours {
            let _ = self.dir.remove(LOCK_FILE);
        }
    }
}

/// Opens `<dir>/.lock`, creating it if missing. Only a regular file with no other link is
/// used: a symlink, a FIFO or a hard link to some other file planted there is refused, so
/// the pid we write cannot land anywhere else. None when it vanished between our looking
/// and our opening (its holder removed it): try again.
fn open_lock_file(dir: &Dir) -> Result<Option<File>> {
    let path = dir.join(LOCK_FILE);
    let file = match dir.create_new(LOCK_FILE) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            match dir.open_existing(LOCK_FILE) {
                Ok(f) => f,
                // Gone meanwhile (its holder removed it): the next attempt creates it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => {
                    return Err(refused(&path, e));
                }
            }
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "{}: cannot create the lock file (is the directory writable?)",
                    path.display()
                )
            })
        }
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
    anyhow::anyhow!(
        "{}: not a lock file this tool made ({why}); nothing was changed: remove it and run again",
        path.display()
    )
}

/// Who holds the lock, as far as the lock file tells.
fn holder(file: &File) -> String {
    let mut buf = [0u8; 32];
    let n = file.read_at(&mut buf, 0).unwrap_or(0);
    match std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    {
        Some(pid) => format!("pid {pid}"),
        None => "pid unknown".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use crate::fsutil::Dir;
    use crate::store::lock::DirLock;

    #[test]
    fn a_second_writer_is_refused_while_the_first_holds_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let first = DirLock::acquire(&dir).unwrap();
        let lock_file = tmp.path().join(".lock");
        assert_eq!(
            std::fs::read_to_string(&lock_file).unwrap(),
            format!("{}\n", std::process::id())
        );
        // flock is per open file: a second acquire in this process is a second writer.
        let e = DirLock::acquire(&dir).unwrap_err().to_string();
        assert!(
            e.contains("another qmpbackup/qmprestore is working on")
                && e.contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        drop(first);
        assert!(!lock_file.exists(), "released locks leave no file");
        let again = DirLock::acquire(&dir).unwrap();
        drop(again);
    }

    #[test]
    fn a_leftover_lock_file_is_reused() {
        // What a killed holder leaves: the file, without the lock.
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(".lock"), "12345\n").unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let lock = DirLock::acquire(&dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(tmp.path().join(".lock")).unwrap(),
            format!("{}\n", std::process::id())
        );
        drop(lock);
        assert!(!tmp.path().join(".lock").exists());
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
        let e = DirLock::acquire(&dir).unwrap_err().to_string();
        assert!(e.contains("not a lock file this tool made"), "{e}");
        std::fs::remove_file(d.join(".lock")).unwrap();
        std::fs::hard_link(&victim, d.join(".lock")).unwrap();
        let e = DirLock::acquire(&dir).unwrap_err().to_string();
        assert!(e.contains("not a lock file this tool made"), "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        std::fs::remove_file(d.join(".lock")).unwrap();
        std::fs::create_dir(d.join(".lock")).unwrap();
        assert!(DirLock::acquire(&dir).is_err());
    }

    #[test]
    fn a_lock_in_a_missing_directory_fails_cleanly() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        std::fs::remove_dir(tmp.path()).unwrap();
        let e = format!("{:#}", DirLock::acquire(&dir).unwrap_err());
        assert!(e.contains("cannot create the lock file"), "{e}");
    }
}
