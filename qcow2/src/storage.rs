//! Where bytes live. Everything that touches a file goes through [`Storage`], so tests can use
//! memory and fault-injecting backends.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

pub trait Storage: Send + Sync {
    /// Fills `buf` from `offset`. Bytes past the end of the storage read as zeros (QEMU's
    /// file driver zero-fills short reads, and images legitimately end mid-cluster).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    /// Bytes actually allocated on the host (st_blocks * 512), when known.
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
    /// Hint that a range is no longer needed (may punch a hole). Default: nothing.
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// The open file behind this storage, where there is one (for [`clone_range`]).
    fn as_file(&self) -> Option<&File> {
        None
    }
    /// Makes `[offset, offset+len)` read as zeros. Storage that can do better than writing
    /// zero buffers (a hole punched in a file, BLKZEROOUT on a device) does.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros(self, offset, len)
    }
}

/// A mebibyte of zeros, for writers that must write zeros as bytes (zero pages, no cost
/// until read).
pub static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// Writes `len` zero bytes at `offset`, a mebibyte at a time.
pub fn write_zeros<S: Storage + ?Sized>(s: &S, offset: u64, len: u64) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let n = (ZEROS.len() as u64).min(len - done);
        s.write_at(&ZEROS[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// How a [`clone_range`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneOutcome {
    /// The range now shares the source's blocks: nothing was copied.
    Cloned,
    /// This range cannot be shared (not aligned to the filesystem's blocks): write it.
    NotThisRange,
    /// These files cannot share blocks (another filesystem, or one without reflinks, or
    /// storage that is not a file): write the data, and do not ask again for this source.
    Unsupported,
}

/// Makes `len` bytes of `dst` at `dst_off` share the blocks of `src` at `src_off`, as
/// `cp --reflink` does (FICLONERANGE: XFS, btrfs, OpenZFS 2.2, bcachefs). The data is not
/// read or written, the output takes no space of its own, and a later write to either
/// file is copy-on-write. A clone is all or nothing: on any failure the caller writes the
/// bytes itself.
pub fn clone_range(
    src: &dyn Storage,
    src_off: u64,
    dst: &dyn Storage,
    dst_off: u64,
    len: u64,
) -> io::Result<CloneOutcome> {
    use std::os::unix::io::AsRawFd;
    let (Some(s), Some(d)) = (src.as_file(), dst.as_file()) else {
        return Ok(CloneOutcome::Unsupported);
    };
    fault::before_write()?;
    let range = libc::file_clone_range {
        src_fd: s.as_raw_fd() as i64,
        src_offset: src_off,
        src_length: len,
        dest_offset: dst_off,
    };
    // SAFETY: FICLONERANGE reads the struct we pass; both fds are open for the call.
    let rc = unsafe { libc::ioctl(d.as_raw_fd(), libc::FICLONERANGE, &range) };
    if rc == 0 {
        return Ok(CloneOutcome::Cloned);
    }
    let err = io::Error::last_os_error();
    Ok(match err.raw_os_error() {
        Some(libc::EINVAL) => CloneOutcome::NotThisRange,
        // A real write error (the destination is full, say) shows itself on the write
        // that follows; here every failure means "write it instead".
        _ => CloneOutcome::Unsupported,
    })
}

/// The kind of a file, for messages ("FIFO", "socket", "block device", …).
pub fn kind_of(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_file() {
        "regular file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

/// A plain file or a block device, using positioned I/O so readers can share it.
pub struct FileStorage {
    file: File,
    writable: bool,
    /// A block device's size (its length is not in its metadata); None for a file.
    device_size: Option<u64>,
    /// The same file opened `O_DIRECT`, for aligned writes (see
    /// [`FileStorage::with_direct_writes`]).
    direct: Option<File>,
    /// Cleared when the kernel refuses a direct write (EINVAL): buffered from then on.
    direct_ok: AtomicBool,
}

/// Whether `file` lives on a memory filesystem (tmpfs, ramfs): there the page cache is
/// the storage, and direct I/O only adds work (measured: twice the time on tmpfs).
fn in_memory(file: &File) -> bool {
    use std::os::unix::io::AsRawFd;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    // SAFETY: fstatfs fills the struct we pass, valid for the call.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
        return false;
    }
    let kind = fs.f_type as i64;
    kind == TMPFS_MAGIC || kind == RAMFS_MAGIC
}

/// The size of the block device open as `file` (BLKGETSIZE64).
pub fn block_device_size(file: &File) -> io::Result<u64> {
    use std::os::unix::io::AsRawFd;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// `_IOR(0x12, 114, size_t)` and `_IO(0x12, 127)` (linux/fs.h), which libc does not export
/// for every target.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// The device size when `file`, of type `t`, is a block device.
fn device_size_of(file: &File, t: &std::fs::FileType) -> io::Result<Option<u64>> {
    use std::os::unix::fs::FileTypeExt;
    if t.is_block_device() {
        Ok(Some(block_device_size(file)?))
    } else {
        Ok(None)
    }
}

impl FileStorage {
    /// Opens an image file. A FIFO, socket or character device is refused without blocking
    /// on it (opened `O_NONBLOCK`, its type checked on the descriptor); regular files and
    /// block devices are images.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        use std::os::unix::io::AsRawFd;
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        let t = file.metadata()?.file_type();
        if !(t.is_file() || t.is_block_device()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a {}, not an image file", kind_of(&t)),
            ));
        }
        // Blocking I/O from here on (a block device honours O_NONBLOCK for nothing we do,
        // but be plain about it).
        // SAFETY: fcntl on a descriptor we own, with integer arguments.
        unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if fl >= 0 {
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
        }
        let device_size = device_size_of(&file, &t)?;
        Ok(FileStorage::new(file, writable, device_size))
    }

    /// Creates a new file; fails if anything exists at the path (a symlink included: it is
    /// never followed).
    pub fn create_new(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o666)
            .open(path)?;
        Ok(FileStorage::new(file, true, None))
    }

    /// Storage on a file opened by the caller (a block device's size is read here).
    pub fn from_file(file: File, writable: bool) -> io::Result<Self> {
        let device_size = device_size_of(&file, &file.metadata()?.file_type())?;
        Ok(FileStorage::new(file, writable, device_size))
    }

    fn new(file: File, writable: bool, device_size: Option<u64>) -> FileStorage {
        FileStorage {
            file,
            writable,
            device_size,
            direct: None,
            direct_ok: AtomicBool::new(false),
        }
    }

    /// Writes aligned buffers ([`crate::buffer::is_direct_aligned`]) with direct I/O from
    /// here on, through a second descriptor of the same file opened `O_DIRECT`: bulk
    /// writes of a restore then skip the page cache (no copy into it, no fresh pages to
    /// find, no writeback afterwards), which on a device or a disk-backed file is several
    /// times faster than buffered writes plus the final flush. Everything else (unaligned
    /// writes, reads, metadata) stays buffered; the kernel keeps the two coherent. Where
    /// the file cannot be reopened so, or the first direct write is refused, writes stay
    /// buffered: this is a speed-up, never a requirement.
    pub fn with_direct_writes(mut self) -> FileStorage {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        // A device node lives on devtmpfs: only a regular file's filesystem tells.
        if !self.writable || (self.device_size.is_none() && in_memory(&self.file)) {
            return self;
        }
        // /proc/self/fd/N reopens this very file (not whatever its path names now).
        let fd_path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        self.direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(fd_path)
            .ok();
        self.direct_ok = AtomicBool::new(self.direct.is_some());
        self
    }

    /// Whether aligned writes go around the page cache.
    pub fn writes_direct(&self) -> bool {
        self.direct_ok.load(Ordering::Relaxed)
    }

    /// Writes the direct-aligned head of `buf` with direct I/O, when on; returns how many
    /// bytes it wrote (0: write it all buffered).
    fn write_direct_head(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        use crate::buffer::{is_direct_aligned, DIRECT_ALIGN};
        let (Some(direct), true) = (&self.direct, self.writes_direct()) else {
            return Ok(0);
        };
        let head = buf.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        if head == 0 || !is_direct_aligned(&buf[..head], offset) {
            return Ok(0);
        }
        match direct.write_all_at(&buf[..head], offset) {
            Ok(()) => Ok(head),
            // This file or device takes no direct I/O after all (or not at this
            // alignment): rewrite buffered, and do not try again.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.direct_ok.store(false, Ordering::Relaxed);
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    /// The block device's size, when this is one.
    pub fn device_size(&self) -> Option<u64> {
        self.device_size
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        fault::before_write()?;
        let done = self.write_direct_head(buf, offset)?;
        if done < buf.len() {
            self.file.write_all_at(&buf[done..], offset + done as u64)?;
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        match self.device_size {
            Some(size) => Ok(size),
            None => Ok(self.file.metadata()?.len()),
        }
    }

    /// A block device keeps its size: asking for no more than it holds is a no-op.
    fn set_len(&self, len: u64) -> io::Result<()> {
        fault::before_write()?;
        match self.device_size {
            Some(size) if len <= size => Ok(()),
            Some(size) => Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("the device holds {size} bytes; {len} are needed"),
            )),
            None => self.file.set_len(len),
        }
    }

    fn flush(&self) -> io::Result<()> {
        if self.writable {
            self.file.sync_data()
        } else {
            Ok(())
        }
    }

    fn allocated_bytes(&self) -> Option<u64> {
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }

    fn as_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::io::AsRawFd;
        // SAFETY: fallocate on a valid fd with plain integer arguments.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        // Punching holes is only an optimisation: a filesystem that cannot do it is fine.
        let _ = rc;
        Ok(())
    }

    /// A device: BLKZEROOUT (the device zeroes, or the kernel writes its zero page; no
    /// buffers from here). A file: a hole punched, else the range zeroed by fallocate, else
    /// zeros written.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::io::AsRawFd;
        if len == 0 {
            return Ok(());
        }
        fault::before_write()?;
        let fd = self.file.as_raw_fd();
        if self.device_size.is_some() {
            let range: [u64; 2] = [offset, len];
            // SAFETY: BLKZEROOUT reads two u64s through the pointer, valid for the call.
            if unsafe { libc::ioctl(fd, BLKZEROOUT, &range) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) && e.raw_os_error() != Some(libc::ENOTTY)
            {
                return Err(e);
            }
            return write_zeros(self, offset, len);
        }
        for mode in [
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        ] {
            // SAFETY: fallocate on a valid fd with plain integer arguments.
            let rc =
                unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(e);
            }
        }
        write_zeros(self, offset, len)
    }
}

/// Fault injection for the crash and full-disk tests, off unless the environment asks for
/// it: `QCOW2_FAULT_AFTER_WRITES=N` makes the Nth file write (or resize) of the process fail;
/// `QCOW2_FAULT_KIND=kill` (the default) sends the process SIGKILL at that point, as a crash
/// would, and `enospc` makes that write and every later one fail with ENOSPC, as a full
/// filesystem would. One relaxed atomic per write when on, one load when off.
pub mod fault {
    use std::io;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    #[derive(Clone, Copy)]
    enum Kind {
        Kill,
        NoSpace,
    }

    static PLAN: OnceLock<Option<(u64, Kind)>> = OnceLock::new();
    static WRITES: AtomicU64 = AtomicU64::new(0);

    fn plan() -> Option<(u64, Kind)> {
        *PLAN.get_or_init(|| {
            let n = std::env::var("QCOW2_FAULT_AFTER_WRITES")
                .ok()?
                .parse()
                .ok()?;
            let kind = match std::env::var("QCOW2_FAULT_KIND").as_deref() {
                Ok("enospc") => Kind::NoSpace,
                _ => Kind::Kill,
            };
            Some((n, kind))
        })
    }

    /// A point where a crash is tested: callers outside this crate (renames, removals)
    /// count as writes too, so a kill loop stops there as well. Never fails: a full
    /// filesystem does not stop renames and removals.
    pub fn checkpoint() {
        if matches!(plan(), Some((_, Kind::Kill))) {
            let _ = before_write();
        }
    }

    pub(super) fn before_write() -> io::Result<()> {
        let Some((n, kind)) = plan() else {
            return Ok(());
        };
        let count = WRITES.fetch_add(1, Ordering::Relaxed) + 1;
        if count < n {
            return Ok(());
        }
        match kind {
            Kind::Kill => {
                // SAFETY: signalling our own process.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
                Ok(())
            }
            Kind::NoSpace => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
        }
    }
}

/// An in-memory storage, for tests and fuzzing.
#[derive(Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
}

impl MemStorage {
    pub fn new(data: Vec<u8>) -> Self {
        MemStorage {
            data: RwLock::new(data),
        }
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.data.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let len = data.len() as u64;
        if offset >= len {
            buf.fill(0);
            return Ok(());
        }
        let start = offset as usize;
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= (1u64 << 40))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write too far"))?;
        if data.len() < end as usize {
            data.resize(end as usize, 0);
        }
        data[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > (1u64 << 40) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "too large"));
        }
        self.data
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(len as usize, 0);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A new output file written under a temporary name in the destination's directory and
/// renamed into place by [`PendingFile::commit`]; dropped uncommitted, it is removed.
pub struct PendingFile {
    tmp: std::path::PathBuf,
    dest: std::path::PathBuf,
    overwrite: bool,
    done: bool,
}

impl PendingFile {
    /// Reserves a temporary name for `dest` (nothing is created yet). Fails if `dest`
    /// exists and `overwrite` is false.
    pub fn new(dest: &Path, overwrite: bool) -> io::Result<PendingFile> {
        if !overwrite && dest.symlink_metadata().is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the output file exists (refusing to overwrite it)",
            ));
        }
        let name = dest
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
        let mut prefix = std::ffi::OsString::from(".");
        prefix.push(name);
        prefix.push(".tmp");
        remove_stale_temporaries(dest, &prefix);
        let mut tmp_name = prefix;
        tmp_name.push(std::process::id().to_string());
        let tmp = dest.with_file_name(tmp_name);
        let _ = std::fs::remove_file(&tmp);
        Ok(PendingFile {
            tmp,
            dest: dest.to_path_buf(),
            overwrite,
            done: false,
        })
    }

    /// Creates the temporary file and opens it.
    pub fn create_storage(&self) -> io::Result<FileStorage> {
        FileStorage::create_new(&self.tmp)
    }

    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// Flushes the file to disk and renames it into place.
    pub fn commit(mut self) -> io::Result<()> {
        File::open(&self.tmp)?.sync_all()?;
        if !self.overwrite && self.dest.symlink_metadata().is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the output file appeared while writing (refusing to overwrite it)",
            ));
        }
        std::fs::rename(&self.tmp, &self.dest)?;
        self.done = true;
        let dir = match self.dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Removes `<prefix><pid>` files beside `dest` whose writer process is gone: what a run
/// killed before its rename left behind. A live writer's file is never touched.
fn remove_stale_temporaries(dest: &Path, prefix: &std::ffi::OsStr) {
    use std::os::unix::ffi::OsStrExt;
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = prefix.as_bytes();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .as_bytes()
            .strip_prefix(prefix)
            .and_then(|p| std::str::from_utf8(p).ok())
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only asks whether the process exists.
        let gone = pid > 0
            && unsafe { libc::kill(pid, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{AlignedBuf, DIRECT_ALIGN};

    /// /var/tmp is on a disk where /tmp may be tmpfs (which may not take O_DIRECT).
    fn disk_tempdir() -> tempfile::TempDir {
        tempfile::tempdir_in("/var/tmp")
            .or_else(|_| tempfile::tempdir())
            .unwrap()
    }

    /// Whatever mix of aligned and unaligned writes goes through the direct descriptor or
    /// the buffered one, reads (buffered) see every byte as written.
    #[test]
    fn direct_and_buffered_writes_mix_coherently() {
        let dir = disk_tempdir();
        let s = FileStorage::create_new(&dir.path().join("f"))
            .unwrap()
            .with_direct_writes();
        let mut model = vec![0u8; 64 * DIRECT_ALIGN];
        let mut put = |s: &FileStorage, data: &[u8], at: usize| {
            s.write_at(data, at as u64).unwrap();
            model[at..at + data.len()].copy_from_slice(data);
        };
        let mut big = AlignedBuf::new(16 * DIRECT_ALIGN);
        big.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 251) as u8);
        put(&s, &big, 0); // aligned: direct where the filesystem takes it
        put(&s, &[7u8; 100], 10); // buffered, inside what was written directly
        put(&s, &big[..DIRECT_ALIGN + 300], 8 * DIRECT_ALIGN); // aligned head, buffered tail
        put(&s, &big[1..DIRECT_ALIGN + 1], 20 * DIRECT_ALIGN); // unaligned memory
        put(&s, &big[..2 * DIRECT_ALIGN], 2 * DIRECT_ALIGN); // direct over buffered bytes
        let mut back = vec![0u8; model.len()];
        s.read_at(&mut back, 0).unwrap();
        assert!(back == model, "read back differs from what was written");
        s.flush().unwrap();
        let on_disk = std::fs::read(dir.path().join("f")).unwrap();
        assert!(on_disk[..] == model[..on_disk.len()]);
    }

    #[test]
    fn read_only_storage_never_opens_a_direct_descriptor() {
        let dir = disk_tempdir();
        let p = dir.path().join("f");
        std::fs::write(&p, [1u8; 4096]).unwrap();
        let s = FileStorage::open(&p, false).unwrap().with_direct_writes();
        assert!(!s.writes_direct());
    }
}
