//! QEMU's image locking protocol (shared OFD locks on single bytes: 100+p "I use permission
//! p", 200+p "I forbid others p"). Writers take the locks so that a running VM and this
//! tool never write the same image at once; read-only opens take none (like `-U`), so an
//! image in use by QEMU can always be read.

use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::io::AsRawFd;

const PERM_CONSISTENT_READ: i64 = 0;
const PERM_WRITE: i64 = 1;
const USE_BASE: i64 = 100;
const FORBID_BASE: i64 = 200;

fn ofd_lock(file: &File, byte: i64, kind: i32) -> std::io::Result<()> {
    // SAFETY: zeroed flock is a valid value; fcntl with F_OFD_SETLK reads it.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Takes the locks of a read-write opener, after checking that nobody else writes the
/// image or forbids writing it.
pub fn lock_for_write(file: &File, path: &str) -> Result<()> {
    for byte in [USE_BASE + PERM_WRITE, FORBID_BASE + PERM_WRITE] {
        if ofd_lock(file, byte, libc::F_WRLCK).is_err() {
            return Err(Error::invalid(
                path,
                "image is in use by another process (a running QEMU?): cannot get the write lock",
            ));
        }
        let _ = ofd_lock(file, byte, libc::F_UNLCK);
    }
    for byte in [
        USE_BASE + PERM_CONSISTENT_READ,
        USE_BASE + PERM_WRITE,
        FORBID_BASE + PERM_WRITE,
    ] {
        // Filesystems without OFD locks: proceed without them.
        if let Err(e) = ofd_lock(file, byte, libc::F_RDLCK) {
            if e.raw_os_error() == Some(libc::EAGAIN) || e.raw_os_error() == Some(libc::EACCES) {
                return Err(Error::invalid(
                    path,
                    "image is in use by another process (a running QEMU?): cannot get the write lock",
                ));
            }
        }
    }
    Ok(())
}

/// The first byte in `[start, start+len)` on which another open file description holds a
/// lock (OFD locks, which QEMU uses); None when there is none, or the filesystem has no
/// OFD locks.
fn locked_byte(file: &File, start: i64, len: i64) -> Option<i64> {
    // SAFETY: zeroed flock is a valid value; F_OFD_GETLK fills it in.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    (rc == 0 && fl.l_type != libc::F_UNLCK as libc::c_short).then_some(fl.l_start as i64)
}

/// Whether another open file description holds QEMU's "I use write permission" lock on
/// the image: a running QEMU (or qemu-img, qemu-io, qemu-nbd) writing it. Filesystems
/// without OFD locks answer false.
pub fn writer_present(file: &File) -> bool {
    locked_byte(file, USE_BASE + PERM_WRITE, 1).is_some()
}

/// Whether a QEMU process (a VM, qemu-nbd, qemu-img, qemu-io) has the file open at all: it
/// holds some of its lock bytes (100..=299) there, reading or writing. Says which when it
/// can: its write lock, or its other image locks.
pub fn qemu_user(file: &File) -> Option<&'static str> {
    let byte = locked_byte(file, USE_BASE, 2 * (FORBID_BASE - USE_BASE))?;
    Some(
        if byte == USE_BASE + PERM_WRITE || byte == FORBID_BASE + PERM_WRITE {
            "it holds QEMU's write lock"
        } else {
            "it holds QEMU's image locks"
        },
    )
}

/// [`writer_present`] for a path (opened read-only, without blocking on a FIFO); false
/// when it cannot be opened.
pub fn path_has_writer(path: &std::path::Path) -> bool {
    crate::storage::FileStorage::open(path, false).is_ok_and(|s| writer_present(s.file()))
}
