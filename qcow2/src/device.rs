//! Writing over an existing target in place: a block device (an LVM volume, a zvol, a
//! mapped RBD image, a loop device) or an existing file (a VM's own disk). Before the first
//! write it must be safe to overwrite: big enough, not mounted, not held by device-mapper,
//! RAID or anyone with `O_EXCL`, and not open in a QEMU (which does not use `O_EXCL` but
//! holds its lock bytes on what it opens).

use crate::error::{Error, Result};
use crate::storage::{kind_of, FileStorage};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What is being written over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InPlaceKind {
    BlockDevice,
    RegularFile,
}

/// An existing target opened for writing in place, after the checks.
pub struct InPlaceTarget {
    pub storage: Arc<FileStorage>,
    pub path: PathBuf,
    pub kind: InPlaceKind,
}

impl InPlaceTarget {
    /// The device's size; None for a file (which is resized as needed).
    pub fn device_size(&self) -> Option<u64> {
        self.storage.device_size()
    }

    pub fn display(&self) -> String {
        self.path.display().to_string()
    }
}

/// Opens `path` to be overwritten, refusing (with the reason) a device smaller than
/// `needed` bytes, mounted, held by another block layer or opened exclusively, and any
/// target a QEMU has open.
pub fn open_in_place(path: &Path, needed: u64) -> Result<InPlaceTarget> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Error::usage(
            &shown,
            "does not exist: --in-place writes over an existing device or file (leave it out to create a new file)",
        ),
        _ => Error::io(&shown, "cannot inspect the target", 0, e),
    })?;
    let t = meta.file_type();
    let kind = if t.is_block_device() {
        InPlaceKind::BlockDevice
    } else if t.is_file() {
        InPlaceKind::RegularFile
    } else {
        return Err(Error::usage(
            &shown,
            format!(
                "a {}: only a block device or a regular file can be written in place",
                kind_of(&t)
            ),
        ));
    };
    if kind == InPlaceKind::BlockDevice {
        let (major, minor) = (dev_major(meta.rdev()), dev_minor(meta.rdev()));
        if let Some(at) = mount_point_of(major, minor) {
            return Err(Error::usage(
                &shown,
                format!("is mounted at {at}: unmount it first (nothing was written)"),
            ));
        }
        let holders = holders_of(major, minor);
        if !holders.is_empty() {
            return Err(Error::usage(
                &shown,
                format!(
                    "is in use by {} (device-mapper, LVM or RAID built on it): stop that first (nothing was written)",
                    holders.join(", ")
                ),
            ));
        }
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true);
    if kind == InPlaceKind::BlockDevice {
        // On a block device O_EXCL claims it: refused while a filesystem, a block layer or
        // another program holds it so, and keeps them out while we write.
        opts.custom_flags(libc::O_EXCL);
    }
    let file = opts.open(path).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => Error::usage(
            &shown,
            "is opened exclusively by another process (a filesystem, LVM, RAID, or a program using O_EXCL): stop it first (nothing was written)",
        ),
        _ => Error::io(&shown, "cannot open the target for writing", 0, e),
    })?;
    if let Some(what) = crate::lock::qemu_user(&file) {
        return Err(Error::usage(
            &shown,
            format!(
                "is in use by a QEMU process ({what}: a running VM, qemu-nbd, qemu-img or qemu-io has it open): stop it first (nothing was written)"
            ),
        ));
    }
    // Bulk writes over a device or a disk go around the page cache (see
    // `with_direct_writes`).
    let storage = FileStorage::from_file(file, true)
        .map_err(|e| Error::io(&shown, "cannot read the device size", 0, e))?
        .with_direct_writes();
    if let Some(size) = storage.device_size() {
        if size < needed {
            return Err(Error::usage(
                &shown,
                format!(
                    "is too small: it holds {size} bytes and the restore needs {needed} (nothing was written)"
                ),
            ));
        }
    }
    Ok(InPlaceTarget {
        storage: Arc::new(storage),
        path: path.to_path_buf(),
        kind,
    })
}

fn dev_major(rdev: u64) -> u64 {
    ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff)
}

fn dev_minor(rdev: u64) -> u64 {
    ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff)
}

/// Where the device `major:minor` is mounted, per this process's mount table.
fn mount_point_of(major: u64, minor: u64) -> Option<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = format!("{major}:{minor}");
    table.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let dev = fields.nth(2)?;
        let at = fields.nth(1)?;
        (dev == want).then(|| at.replace("\\040", " "))
    })
}

/// The block devices built on `major:minor` (its holders in sysfs: dm-3, md0).
fn holders_of(major: u64, minor: u64) -> Vec<String> {
    let dir = format!("/sys/dev/block/{major}:{minor}/holders");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::io::AsRawFd;

    #[test]
    fn device_numbers_split_as_glibc_does() {
        // makedev(7, 3) and makedev(259, 65536)
        assert_eq!((dev_major(0x703), dev_minor(0x703)), (7, 3));
        // makedev(259, 65536) as glibc encodes it.
        let rdev: u64 = (259 << 8) | (256 << 20);
        assert_eq!((dev_major(rdev), dev_minor(rdev)), (259, 65536));
    }

    #[test]
    fn a_missing_or_special_target_is_refused_with_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let e = open_in_place(&tmp.path().join("nope"), 0).err().unwrap();
        assert!(
            e.to_string().contains("leave it out to create a new file"),
            "{e}"
        );
        let e = open_in_place(tmp.path(), 0).err().unwrap();
        assert!(e.to_string().contains("a directory"), "{e}");
        let e = open_in_place(Path::new("/dev/null"), 0).err().unwrap();
        assert!(e.to_string().contains("character device"), "{e}");
    }

    #[test]
    fn a_file_with_qemu_locks_on_it_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("disk.raw");
        std::fs::write(&p, [1u8; 4096]).unwrap();
        assert!(open_in_place(&p, 0).is_ok());
        // As a QEMU opening it read-only would: a shared lock on "I use consistent read".
        let other = File::open(&p).unwrap();
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_RDLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = 100;
        fl.l_len = 1;
        assert_eq!(
            unsafe { libc::fcntl(other.as_raw_fd(), libc::F_OFD_SETLK, &fl) },
            0
        );
        let e = open_in_place(&p, 0).err().unwrap();
        assert!(e.to_string().contains("in use by a QEMU process"), "{e}");
        drop(other);
        assert!(open_in_place(&p, 0).is_ok());
    }
}
