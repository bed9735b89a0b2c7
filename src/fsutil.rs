//! File operations that a planted symlink or a special file cannot redirect.
//!
//! Backup directories may be writable by other local users, and these tools run as root, so
//! every file we create is created with `O_CREAT|O_EXCL|O_NOFOLLOW` relative to a directory
//! we opened (`openat`), replaced only by `renameat`, and never truncated through an existing
//! path. Directories we create below the user's target are opened with `O_NOFOLLOW`, so a
//! symlink planted in their place is refused rather than followed. Files we read are opened
//! with `O_NONBLOCK` and their type checked on the descriptor, so a FIFO cannot hang us.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

fn cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a path with a NUL byte cannot be used",
        )
    })
}

/// Checks that `name` is one plain path component (not empty, `.`, `..`, no `/`).
fn component(name: &str) -> io::Result<CString> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    cstr(OsStr::new(name))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Takes ownership of a descriptor an `open`/`openat` call returned (or its error).
fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: a non-negative fd was just returned to us by the kernel and is owned by
    // nobody else.
    check(fd).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

pub use qcow2::storage::kind_of;

/// An open directory: files are created, replaced and removed relative to it, so a path
/// component swapped for a symlink after we opened it changes nothing.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Opens a directory the user named (symlinks in the path are the user's choice).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let c = cstr(path.as_os_str())?;
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
        // SAFETY: open with a valid C string.
        let fd = owned(unsafe { libc::open(c.as_ptr(), flags) })?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Creates a directory the user named (and its parents) if missing, and opens it.
    pub fn create_all(path: &Path) -> io::Result<Dir> {
        std::fs::create_dir_all(path)?;
        Dir::open(path)
    }

    /// Opens (and with `create`, first creates) the directory `name` inside this one. A
    /// symlink or anything else that is not a directory at that name is refused.
    pub fn child_dir(&self, name: &str, create: bool) -> io::Result<Dir> {
        let c = component(name)?;
        if create {
            // SAFETY: mkdirat with our directory descriptor and a valid C string.
            let rc = unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), 0o777) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::AlreadyExists {
                    return Err(e);
                }
            }
        }
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let fd = self.openat(&c, flags, 0).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not a directory (a symlink or file in its place is never followed): remove it or choose another target",
                    self.path.join(name).display()
                ),
            ),
            _ => e,
        })?;
        Ok(Dir {
            fd,
            path: self.path.join(name),
        })
    }

    fn openat(
        &self,
        name: &CString,
        flags: libc::c_int,
        mode: libc::c_uint,
    ) -> io::Result<OwnedFd> {
        // SAFETY: openat with our directory descriptor and a valid C string.
        owned(unsafe { libc::openat(self.fd.as_raw_fd(), name.as_ptr(), flags, mode) })
    }

    /// The directory's path, for messages and for programs that open by path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` in this directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Creates the new file `name` (`O_CREAT|O_EXCL|O_NOFOLLOW`): fails if anything,
    /// a symlink included, exists at that name.
    pub fn create_new(&self, name: &str) -> io::Result<File> {
        let flags =
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        Ok(File::from(self.openat(&component(name)?, flags, 0o666)?))
    }

    /// Opens the existing file `name` for reading and writing, without following a symlink
    /// and without blocking on a FIFO; nothing is created or truncated.
    pub fn open_existing(&self, name: &str) -> io::Result<File> {
        let flags = libc::O_RDWR | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
        Ok(File::from(self.openat(&component(name)?, flags, 0)?))
    }

    /// Opens the existing file `name` for reading only, without following a symlink and
    /// without blocking on a FIFO.
    pub fn open_existing_readonly(&self, name: &str) -> io::Result<File> {
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
        Ok(File::from(self.openat(&component(name)?, flags, 0)?))
    }

    /// A second handle on the same open directory.
    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// Metadata of `name` without following a symlink; None when nothing is there.
    pub fn lstat(&self, name: &str) -> io::Result<Option<libc::stat>> {
        let c = component(name)?;
        // SAFETY: fstatat fills the zeroed struct we pass.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::NotFound {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(st))
    }

    /// Whether anything (a dangling symlink included) exists at `name`.
    pub fn exists(&self, name: &str) -> io::Result<bool> {
        Ok(self.lstat(name)?.is_some())
    }

    /// Removes the file (or symlink) `name`; a missing file is not an error.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        let c = component(name)?;
        // SAFETY: unlinkat with our directory descriptor and a valid C string.
        let rc = unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::NotFound {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Renames `from` to `to` in this directory, replacing whatever entry `to` is (a
    /// symlink there is replaced, never followed).
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (f, t) = (component(from)?, component(to)?);
        let fd = self.fd.as_raw_fd();
        // SAFETY: renameat within one directory descriptor, valid C strings.
        check(unsafe { libc::renameat(fd, f.as_ptr(), fd, t.as_ptr()) })?;
        Ok(())
    }

    /// Renames `from` to `to`, failing with `AlreadyExists` if `to` exists.
    pub fn rename_noreplace(&self, from: &str, to: &str) -> io::Result<()> {
        let (f, t) = (component(from)?, component(to)?);
        let fd = self.fd.as_raw_fd();
        // SAFETY: renameat2 within one directory descriptor, valid C strings.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                fd,
                f.as_ptr(),
                fd,
                t.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // A filesystem without RENAME_NOREPLACE: check, then rename.
            Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                if self.exists(to)? {
                    return Err(io::Error::from(io::ErrorKind::AlreadyExists));
                }
                self.rename(from, to)
            }
            _ => Err(e),
        }
    }

    /// Writes `name` whole, atomically: into `<name>.tmp` (any leftover or planted file
    /// there is removed first, never written through), flushed, then renamed over `name`.
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let tmp = format!("{name}.tmp");
        self.write_atomic_via(name, &tmp, |f| f.write_all(bytes))
    }

    /// [`Dir::write_atomic`] with the content written by `fill`, through the temporary
    /// name `tmp`.
    pub fn write_atomic_via(
        &self,
        name: &str,
        tmp: &str,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> io::Result<()> {
        self.remove(tmp)?;
        let mut f = self.create_new(tmp)?;
        let res = fill(&mut f)
            .and_then(|_| f.sync_all())
            .and_then(|_| self.rename(tmp, name));
        if res.is_err() {
            let _ = self.remove(tmp);
        }
        res?;
        self.sync();
        Ok(())
    }

    /// Points the symlink `name` at `target`, replacing an existing symlink atomically. A
    /// file or directory at `name` is never replaced.
    pub fn replace_symlink(&self, target: &str, name: &str) -> io::Result<()> {
        if let Some(st) = self.lstat(name)? {
            if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a symlink; not replacing it",
                        self.join(name).display()
                    ),
                ));
            }
        }
        let tmp = format!(".{name}.tmp{}", std::process::id());
        self.remove(&tmp)?;
        let (t, c) = (cstr(OsStr::new(target))?, component(&tmp)?);
        // SAFETY: symlinkat with our directory descriptor and valid C strings.
        check(unsafe { libc::symlinkat(t.as_ptr(), self.fd.as_raw_fd(), c.as_ptr()) })?;
        let res = self.rename(&tmp, name);
        if res.is_err() {
            let _ = self.remove(&tmp);
        }
        res
    }

    /// Reads the regular file `name` (not through a symlink), at most `max` bytes; None
    /// when it does not exist.
    pub fn read_small(&self, name: &str, max: u64) -> io::Result<Option<Vec<u8>>> {
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
        let path = self.join(name);
        let fd = match self.openat(&component(name)?, flags, 0) {
            Ok(fd) => fd,
            Err(e) => {
                return match e.raw_os_error() {
                    Some(libc::ENOENT) => Ok(None),
                    Some(libc::ELOOP) => Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{} is a symlink, which is never followed here: remove it",
                            path.display()
                        ),
                    )),
                    _ => Err(e),
                }
            }
        };
        let f = File::from(fd);
        let size = regular_size(&f, &path)?;
        read_bounded(f, size, &path, max).map(Some)
    }

    /// Flushes the directory itself (new names, renames) to disk; best effort.
    pub fn sync(&self) {
        // SAFETY: fsync on our own descriptor.
        unsafe {
            libc::fsync(self.fd.as_raw_fd());
        }
    }
}

/// The directory of `path`, opened, and the file name in it (for writes relative to the
/// directory: a temporary name, then a rename).
pub fn open_parent(path: &Path) -> anyhow::Result<(Dir, String)> {
    use anyhow::Context;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{}: not a file name", path.display()))?
        .to_string();
    let dir = Dir::open(parent).with_context(|| format!("{}: cannot open", parent.display()))?;
    Ok((dir, name))
}

/// Opens `path` for reading without blocking on a FIFO, and refuses anything that is not a
/// regular file.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let c = cstr(path.as_os_str())?;
    let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC;
    // SAFETY: open with a valid C string.
    let f = File::from(owned(unsafe { libc::open(c.as_ptr(), flags) })?);
    regular_size(&f, path)?;
    Ok(f)
}

/// Reads a regular file of at most `max` bytes (see [`open_regular`]); None when missing.
pub fn read_small(path: &Path, max: u64) -> io::Result<Option<Vec<u8>>> {
    match open_regular(path) {
        Ok(f) => {
            let size = f.metadata()?.len();
            read_bounded(f, size, path, max).map(Some)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The size of an opened file, which must be a regular file (checked on the descriptor).
fn regular_size(f: &File, path: &Path) -> io::Result<u64> {
    let m = f.metadata()?;
    if !m.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is a {}, not a regular file: not reading it",
                path.display(),
                kind_of(&m.file_type())
            ),
        ));
    }
    Ok(m.len())
}

/// Reads a regular file of `size` bytes whole, refusing more than `max`.
fn read_bounded(f: File, size: u64, path: &Path, max: u64) -> io::Result<Vec<u8>> {
    if size > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is {size} bytes, more than the {max} such a file can be: not reading it",
                path.display()
            ),
        ));
    }
    let mut out = Vec::with_capacity(size as usize);
    f.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} grew past {max} bytes while read", path.display()),
        ));
    }
    Ok(out)
}

/// The identity of an open file: (device, inode).
pub fn identity(f: &File) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = f.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// Whether `path` (its last component not followed) names the regular file whose
/// [`identity`] is `id`: after a program opened a file we created by its path, this tells
/// that it opened ours.
pub fn path_is(path: &Path, id: (u64, u64)) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .is_ok_and(|m| m.file_type().is_file() && (m.dev(), m.ino()) == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir() -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "fsutil-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn planted_symlinks_are_never_written_through() {
        let d = tmpdir();
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let dir = Dir::open(&d).unwrap();
        for name in ["x.manifest", "x.manifest.tmp", "new"] {
            std::os::unix::fs::symlink(&victim, d.join(name)).unwrap();
        }
        // The temporary name is removed and recreated, the final name replaced.
        dir.write_atomic("x.manifest", b"ours").unwrap();
        assert_eq!(std::fs::read(d.join("x.manifest")).unwrap(), b"ours");
        assert!(!d
            .join("x.manifest")
            .symlink_metadata()
            .unwrap()
            .is_symlink());
        // Creating a new file where a symlink is fails.
        assert!(dir.create_new("new").is_err());
        // Reading through a symlink is refused.
        assert!(dir.read_small("new", 100).is_err());
        // A symlink in place of a directory is refused.
        std::os::unix::fs::symlink(&d, d.join("sub")).unwrap();
        assert!(dir.child_dir("sub", true).is_err());
        assert!(dir.child_dir("..", true).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn fifos_are_not_read() {
        let d = tmpdir();
        let fifo = d.join("f");
        let c = cstr(fifo.as_os_str()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_small(&fifo, 100).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        let e = Dir::open(&d).unwrap().read_small("f", 100).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn symlink_replaced_but_not_a_file() {
        let d = tmpdir();
        let dir = Dir::open(&d).unwrap();
        dir.replace_symlink("a", "current").unwrap();
        dir.replace_symlink("b", "current").unwrap();
        assert_eq!(
            std::fs::read_link(d.join("current")).unwrap(),
            Path::new("b")
        );
        std::fs::write(d.join("file"), b"x").unwrap();
        assert!(dir.replace_symlink("b", "file").is_err());
        assert_eq!(std::fs::read(d.join("file")).unwrap(), b"x");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn rename_noreplace_refuses_existing() {
        let d = tmpdir();
        let dir = Dir::open(&d).unwrap();
        drop(dir.create_new("a").unwrap());
        drop(dir.create_new("b").unwrap());
        assert_eq!(
            dir.rename_noreplace("a", "b").unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        dir.rename_noreplace("a", "c").unwrap();
        assert!(dir.exists("c").unwrap() && !dir.exists("a").unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
