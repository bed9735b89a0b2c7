//! Where backups go: `<target>[/YYYY-MM]/<disk file name>/<LEVEL>-<unix time>-<disk file
//! name>`, written as `.partial` and renamed when the job succeeded; the chain's bitmap uuid
//! in `<target>[/YYYY-MM]/uuid`; the source image's info in `<disk dir>/<name>.config`.

use crate::restore::discover::{Directory, Level};
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
    let (y, m, _) = qcow2::ops::info::civil_from_days((ts / 86400) as i64);
    format!("{y:04}-{m:02}")
}

pub struct Layout {
    pub opts: LayoutOptions,
    /// `<target>` or `<target>/YYYY-MM`.
    pub root: PathBuf,
    pub timestamp: u64,
}

impl Layout {
    pub fn new(opts: LayoutOptions, timestamp: u64) -> Layout {
        let root = if opts.monthly {
            opts.target.join(month_of(timestamp))
        } else {
            opts.target.clone()
        };
        Layout {
            opts,
            root,
            timestamp,
        }
    }

    pub fn disk_dir(&self, disk_name: &str) -> PathBuf {
        if self.opts.no_subdir {
            self.root.clone()
        } else {
            self.root.join(disk_name)
        }
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
        match std::fs::read_to_string(self.uuid_file()) {
            Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => {
                Err(e).with_context(|| format!("{}: cannot read", self.uuid_file().display()))
            }
        }
    }

    pub fn write_uuid(&self, uuid: &str) -> Result<()> {
        let p = self.uuid_file();
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, format!("{uuid}\n"))
            .and_then(|_| std::fs::rename(&tmp, &p))
            .with_context(|| format!("{}: cannot write", p.display()))
    }

    /// Whether a disk's directory holds a FULL this chain can continue from.
    pub fn has_full(&self, disk_name: &str) -> Result<bool> {
        let dir = self.disk_dir(disk_name);
        if !dir.is_dir() {
            return Ok(false);
        }
        let filter = self.opts.no_subdir.then_some(disk_name);
        // Leftover .partial files are moved aside by the caller first; any other error is real.
        let d = Directory::scan(&dir, filter)?;
        Ok(!d.chains.is_empty())
    }

    /// Moves `.partial` files left by an interrupted run aside (`.partial` → `.failed-<ts>`),
    /// so they neither count as backups nor block the next one. Returns what was moved.
    pub fn move_aside_partials(&self, disk_name: &str) -> Result<Vec<PathBuf>> {
        let dir = self.disk_dir(disk_name);
        let mut moved = Vec::new();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(moved);
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".partial") && name.contains(disk_name) {
                let to = dir.join(format!("{name}.failed-{}", self.timestamp));
                std::fs::rename(e.path(), &to)
                    .with_context(|| format!("{}: cannot move aside", e.path().display()))?;
                moved.push(to);
            }
        }
        Ok(moved)
    }

    /// After a successful monthly backup: `<target>/current` → `YYYY-MM`.
    pub fn update_symlink(&self) -> Result<()> {
        if !self.opts.monthly || self.opts.no_symlink {
            return Ok(());
        }
        let link = self.opts.target.join("current");
        let month = month_of(self.timestamp);
        match std::fs::symlink_metadata(&link) {
            Ok(m) if m.file_type().is_symlink() => {
                std::fs::remove_file(&link)?;
            }
            Ok(_) => bail!("{}: exists and is not a symlink", link.display()),
            Err(_) => {}
        }
        std::os::unix::fs::symlink(&month, &link)
            .with_context(|| format!("{}: cannot create symlink", link.display()))
    }
}

/// Creates a directory (and parents), with a clear error.
pub fn ensure_dir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).with_context(|| {
        format!(
            "{}: cannot create the backup directory (is the target writable?)",
            p.display()
        )
    })
}
