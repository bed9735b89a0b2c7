//! Where backups go: `<target>[/YYYY-MM]/<disk name>/<LEVEL>-<unix time>-<disk name>`,
//! written as `.partial` and renamed when the job succeeded; the chain's bitmap uuid in
//! `<target>[/YYYY-MM]/uuid`; the source image's info in `<disk dir>/<name>.config`.
//!
//! The target is the user's choice (symlinks in its path are followed); every directory we
//! create below it is opened without following a symlink, and every file is created and
//! replaced relative to an open directory ([`Dir`]), so nothing planted there can redirect
//! a write.

use crate::fsutil::Dir;
use crate::restore::discover::{BackupFile, Directory, Level};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct LayoutOptions {
    pub target: PathBuf,
    pub monthly: bool,
    pub no_subdir: bool,
    pub no_timestamp: bool,
    pub no_symlink: bool,
}

/// The month directory name for a Unix time: `YYYY-MM` (UTC).
pub fn month_of(ts: u64) -> String {
    let (y, m, _) = crate::humanize::civil_from_days((ts / 86400) as i64);
    format!("{y:04}-{m:02}")
}

/// The largest uuid file we read: a uuid is 36 bytes.
const MAX_UUID_FILE: u64 = 4096;

/// Checks a chain uuid (from `--uuid` or the uuid file): it becomes part of a bitmap name.
pub fn check_uuid(uuid: &str) -> Result<()> {
    if uuid.is_empty()
        || uuid.len() > 64
        || !uuid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!(
            "invalid chain uuid {uuid:?}: use 1 to 64 letters, digits, '-' or '_' (a uuid such as 3f1c…-…)"
        );
    }
    Ok(())
}

pub struct Layout {
    pub opts: LayoutOptions,
    /// `<target>`, opened.
    target: Dir,
    /// `<target>` or `<target>/YYYY-MM`, opened.
    root: Dir,
    pub timestamp: u64,
}

impl Layout {
    /// Creates (if needed) and opens the target and, with --monthly, the month directory.
    pub fn open(opts: LayoutOptions, timestamp: u64) -> Result<Layout> {
        let target = Dir::create_all(&opts.target).with_context(|| {
            format!(
                "{}: cannot create the backup directory (is the target writable?)",
                opts.target.display()
            )
        })?;
        let root = if opts.monthly {
            let month = month_of(timestamp);
            target
                .child_dir(&month, true)
                .with_context(|| format!("{}: cannot open", target.join(&month).display()))?
        } else {
            Dir::open(target.path())?
        };
        Ok(Layout {
            opts,
            target,
            root,
            timestamp,
        })
    }

    /// `<target>` or `<target>/YYYY-MM`.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn disk_dir(&self, disk_name: &str) -> PathBuf {
        if self.opts.no_subdir {
            self.root.path().to_path_buf()
        } else {
            self.root.join(disk_name)
        }
    }

    /// Opens a disk's directory, creating it if `create`; a symlink in its place is refused.
    pub fn open_disk_dir(&self, disk_name: &str, create: bool) -> Result<Dir> {
        let dir = if self.opts.no_subdir {
            Dir::open(self.root.path())
        } else {
            self.root.child_dir(disk_name, create)
        };
        dir.with_context(|| {
            format!(
                "{}: cannot create the backup directory (is the target writable?)",
                self.disk_dir(disk_name).display()
            )
        })
    }

    pub fn file_name(&self, level: Level, disk_name: &str) -> String {
        if self.opts.no_timestamp {
            format!("{}-{disk_name}", level.prefix())
        } else {
            format!("{}-{}-{disk_name}", level.prefix(), self.timestamp)
        }
    }

    pub fn uuid_file(&self) -> PathBuf {
        self.root.join("uuid")
    }

    pub fn read_uuid(&self) -> Result<Option<String>> {
        let read = self
            .root
            .read_small("uuid", MAX_UUID_FILE)
            .with_context(|| format!("{}: cannot read", self.uuid_file().display()))?;
        let Some(bytes) = read else { return Ok(None) };
        let text = String::from_utf8_lossy(&bytes);
        let uuid = text.trim();
        if uuid.is_empty() {
            return Ok(None);
        }
        check_uuid(uuid).with_context(|| {
            format!(
                "{}: does not hold a chain uuid; remove it to start a new chain",
                self.uuid_file().display()
            )
        })?;
        Ok(Some(uuid.to_string()))
    }

    pub fn write_uuid(&self, uuid: &str) -> Result<()> {
        self.root
            .write_atomic("uuid", format!("{uuid}\n").as_bytes())
            .with_context(|| format!("{}: cannot write", self.uuid_file().display()))
    }

    /// The backups of one disk in its directory: with --no-subdir, only the files whose
    /// name part is exactly this disk's.
    fn scan_disk(&self, disk_name: &str) -> Result<Option<Directory>> {
        let dir = self.disk_dir(disk_name);
        if !dir.is_dir() {
            return Ok(None);
        }
        let mut d = Directory::scan(&dir, None)?;
        if self.opts.no_subdir {
            d.retain(|f| f.disk_part() == disk_name);
        }
        Ok(Some(d))
    }

    /// Whether a disk's directory holds a FULL this chain can continue from.
    pub fn has_full(&self, disk_name: &str) -> Result<bool> {
        // Leftover .partial files are moved aside by the caller first; any other error is real.
        Ok(self
            .scan_disk(disk_name)?
            .is_some_and(|d| !d.chains.is_empty()))
    }

    /// Moves `.partial` files left by an interrupted run aside (`.partial` → `.failed-<ts>`),
    /// so they neither count as backups nor block the next one. Returns what was moved.
    pub fn move_aside_partials(&self, disk_name: &str) -> Result<Vec<PathBuf>> {
        let mut moved = Vec::new();
        let Ok(dir) = self.open_disk_dir(disk_name, false) else {
            return Ok(moved);
        };
        let Ok(entries) = std::fs::read_dir(dir.path()) else {
            return Ok(moved);
        };
        for e in entries.flatten() {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            let Some(backup) = name.strip_suffix(".partial") else {
                continue;
            };
            let ours = BackupFile::parse(Path::new(backup))
                .is_some_and(|f| !self.opts.no_subdir || f.disk_part() == disk_name);
            if ours {
                let to = format!("{name}.failed-{}", self.timestamp);
                dir.rename(&name, &to)
                    .with_context(|| format!("{}: cannot move aside", dir.join(&name).display()))?;
                moved.push(dir.join(&to));
            }
        }
        Ok(moved)
    }

    /// After a successful monthly backup: `<target>/current` → `YYYY-MM`.
    pub fn update_symlink(&self) -> Result<()> {
        if !self.opts.monthly || self.opts.no_symlink {
            return Ok(());
        }
        self.target
            .replace_symlink(&month_of(self.timestamp), "current")
            .with_context(|| {
                format!(
                    "{}: cannot point it at this month",
                    self.target.join("current").display()
                )
            })
    }
}
