//! A backup target: `<target>[/YYYY-MM]/<disk name>/<LEVEL>-<unix time>-<disk name>`,
//! written as `.partial` and renamed when the job succeeded; the chain's bitmap uuid in
//! `<target>[/YYYY-MM]/uuid`; with `--monthly`, `<target>/current` points at the month's
//! folder.
//!
//! The target is the user's choice (symlinks in its path are followed); every directory we
//! create below it is opened without following a symlink, and every file is created and
//! replaced relative to an open directory ([`Dir`]), so nothing planted there can redirect
//! a write.

use crate::fsutil::Dir;
use crate::store::disk_dir::DiskDir;
use crate::store::level::BackupLevel;
use crate::store::lock::{DirLock, LockMode};
use crate::store::name::{self, backup_file_name, CURRENT_LINK};
use crate::store::uuid;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Where a run's backups go.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TargetOptions {
    /// Target directory; each disk gets <target>/<disk file name>/.
    #[arg(short = 't', long)]
    pub target: PathBuf,
    /// Monthly chains in <target>/YYYY-MM (a new month starts a new chain with auto).
    #[arg(long)]
    pub monthly: bool,
    /// Put every disk's files directly in the target directory.
    #[arg(long)]
    pub no_subdir: bool,
    /// Name a full or copy backup as the disk's own file (<disk>/disk1.qcow2, with a symlink
    /// FULL-disk1.qcow2 or COPY-disk1.qcow2 beside it); incrementals keep their
    /// INC-<time>-<disk> names. The full's time is kept in its manifest. A directory holds one
    /// such full: a new chain needs a new --target (or --monthly).
    #[arg(long)]
    pub no_timestamp: bool,
    /// Make no symlinks: neither FULL-<disk> with --no-timestamp nor <target>/current with
    /// --monthly.
    #[arg(long)]
    pub no_symlink: bool,
}

/// The month folder name for a Unix time: `YYYY-MM` (UTC).
pub fn month_of(ts: u64) -> String {
    let (y, m, _) = crate::humanize::civil_from_days((ts / 86400) as i64);
    format!("{y:04}-{m:02}")
}

/// A backup target opened for one run at one point in time.
pub struct Target {
    pub opts: TargetOptions,
    /// `<target>`, opened.
    target: Dir,
    /// The chain root: `<target>` or `<target>/YYYY-MM`, opened.
    root: Dir,
    /// The month folder of the chain root, with --monthly.
    month: Option<String>,
    /// The run's point in time: the time in its file names. Set by the caller when it must
    /// follow a newer point already in the directory.
    pub timestamp: u64,
}

impl Target {
    /// Creates (if needed) and opens the target and, with --monthly, the month folder.
    pub fn open(opts: TargetOptions, timestamp: u64) -> Result<Target> {
        let target = Dir::create_all(&opts.target).with_context(|| {
            format!(
                "{}: cannot create the backup directory (is the target writable?)",
                opts.target.display()
            )
        })?;
        let month = opts.monthly.then(|| month_of(timestamp));
        let root = match &month {
            Some(month) => target
                .child_dir(month, true)
                .with_context(|| format!("{}: cannot open", target.join(month).display()))?,
            None => Dir::open(target.path())?,
        };
        Ok(Target {
            opts,
            target,
            root,
            month,
            timestamp,
        })
    }

    /// The chain root: `<target>` or `<target>/YYYY-MM`.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The chain root, opened.
    pub fn root_dir(&self) -> &Dir {
        &self.root
    }

    /// The disk directories share the chain root (`--no-subdir`).
    pub fn shares_root(&self) -> bool {
        self.opts.no_subdir
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

    /// Takes the chain root's append lock (its uuid file, and with --no-subdir every
    /// disk's files) for this run: readers go on, another backup is refused.
    pub fn lock_root(&self) -> Result<DirLock> {
        DirLock::acquire(&self.root, LockMode::Append)
    }

    /// Takes the append lock of the opened directory `dir` of the disk `disk_name`, unless it is the chain root
    /// (--no-subdir), which [`Target::lock_root`] locks.
    pub fn lock_disk_dir(&self, dir: &Dir) -> Result<Option<DirLock>> {
        if self.opts.no_subdir {
            return Ok(None);
        }
        DirLock::acquire(dir, LockMode::Append).map(Some)
    }

    /// The name of this run's backup of a disk: `<LEVEL>-<time>-<disk>`, or with
    /// --no-timestamp the disk's own name for a full or copy.
    pub fn file_name(&self, level: BackupLevel, disk_name: &str) -> String {
        if self.opts.no_timestamp && level != BackupLevel::Inc {
            return disk_name.to_string();
        }
        backup_file_name(level, Some(self.timestamp), disk_name)
    }

    /// The symlink `<LEVEL>-<disk>` → `<disk>` a --no-timestamp full or copy gets (unless
    /// --no-symlink): what names its level for people and older tools.
    pub fn level_link(&self, level: BackupLevel, disk_name: &str) -> Option<String> {
        (self.opts.no_timestamp && !self.opts.no_symlink && level != BackupLevel::Inc)
            .then(|| backup_file_name(level, None, disk_name))
    }

    pub fn uuid_file(&self) -> PathBuf {
        self.root.join(name::UUID_FILE)
    }

    /// The uuid of the chain in the chain root, if any.
    pub fn read_uuid(&self) -> Result<Option<String>> {
        uuid::read_uuid(&self.root)
    }

    pub fn write_uuid(&self, uuid: &str) -> Result<()> {
        uuid::write_uuid(&self.root, uuid)
    }

    /// The backups of one disk in its directory: with --no-subdir, only the files whose
    /// name part is exactly this disk's.
    pub fn scan_disk(&self, disk_name: &str) -> Result<Option<DiskDir>> {
        let dir = self.disk_dir(disk_name);
        if !dir.is_dir() {
            return Ok(None);
        }
        let mut d = DiskDir::scan(&dir, None)?;
        if self.opts.no_subdir {
            d.retain(|f| f.disk_part() == disk_name);
        }
        Ok(Some(d))
    }

    /// Whether a disk's directory holds a FULL this chain can continue from.
    pub fn has_full(&self, disk_name: &str) -> Result<bool> {
        // Leftover .partial files are moved aside by the caller first; any other error is real.
        Ok(self.scan_disk(disk_name)?.is_some_and(|d| d.has_full()))
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
            let Ok(partial) = e.file_name().into_string() else {
                continue;
            };
            let ours = match name::backup_of_partial(&partial) {
                Some(backup) => !self.opts.no_subdir || name::is_backup_of(backup, disk_name),
                // A --no-timestamp full or copy: `<disk>.partial`.
                None => partial == name::partial_name(disk_name),
            };
            if ours {
                let to = name::moved_aside_name(&partial, self.timestamp);
                dir.rename(&partial, &to).with_context(|| {
                    format!("{}: cannot move aside", dir.join(&partial).display())
                })?;
                moved.push(dir.join(&to));
            }
        }
        Ok(moved)
    }

    /// After a successful monthly backup: `<target>/current` → `YYYY-MM`.
    pub fn update_current_link(&self) -> Result<()> {
        let Some(month) = self.month.as_deref().filter(|_| !self.opts.no_symlink) else {
            return Ok(());
        };
        self.target
            .replace_symlink(month, CURRENT_LINK)
            .with_context(|| {
                format!(
                    "{}: cannot point it at this month",
                    self.target.join(CURRENT_LINK).display()
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use crate::store::level::BackupLevel;
    use crate::store::target::{month_of, Target, TargetOptions};
    use std::path::Path;

    /// 2024-01-26 09:17:26 UTC.
    const TS: u64 = 1706260646;

    fn open(base: &Path, f: impl FnOnce(&mut TargetOptions)) -> Target {
        let mut opts = TargetOptions {
            target: base.join("t"),
            ..Default::default()
        };
        f(&mut opts);
        Target::open(opts, TS).unwrap()
    }

    #[test]
    fn months_are_utc_year_and_month() {
        assert_eq!(month_of(0), "1970-01");
        assert_eq!(month_of(TS), "2024-01");
        // The last second of February in a leap year, and the first of March.
        assert_eq!(month_of(1709251199), "2024-02");
        assert_eq!(month_of(1709251200), "2024-03");
    }

    #[test]
    fn monthly_roots_and_the_current_link() {
        let tmp = tempfile::tempdir().unwrap();
        let t = open(tmp.path(), |o| o.monthly = true);
        assert_eq!(t.root(), tmp.path().join("t/2024-01"));
        assert!(t.root().is_dir());
        assert_eq!(t.disk_dir("vda"), tmp.path().join("t/2024-01/vda"));
        t.update_current_link().unwrap();
        let link = tmp.path().join("t/current");
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("2024-01"));
        // Replaced, not followed, when it points elsewhere.
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink("/", &link).unwrap();
        t.update_current_link().unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("2024-01"));
    }

    #[test]
    fn no_current_link_without_monthly_or_with_no_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let t = open(tmp.path(), |o| {
            o.monthly = true;
            o.no_symlink = true;
        });
        t.update_current_link().unwrap();
        let t2 = open(tmp.path(), |_| {});
        t2.update_current_link().unwrap();
        assert!(tmp.path().join("t/current").symlink_metadata().is_err());
        assert_eq!(t2.root(), tmp.path().join("t"));
    }

    #[test]
    fn a_symlink_in_place_of_the_month_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("t")).unwrap();
        std::os::unix::fs::symlink(tmp.path(), tmp.path().join("t/2024-01")).unwrap();
        let opts = TargetOptions {
            target: tmp.path().join("t"),
            monthly: true,
            ..Default::default()
        };
        assert!(Target::open(opts, TS).is_err());
    }

    #[test]
    fn file_names_with_and_without_time() {
        let tmp = tempfile::tempdir().unwrap();
        let t = open(tmp.path(), |_| {});
        assert_eq!(
            t.file_name(BackupLevel::Inc, "vda"),
            format!("INC-{TS}-vda")
        );
        let t = open(tmp.path(), |o| o.no_timestamp = true);
        assert_eq!(t.file_name(BackupLevel::Copy, "vda"), "vda");
        assert_eq!(t.file_name(BackupLevel::Full, "vda"), "vda");
        assert_eq!(
            t.file_name(BackupLevel::Inc, "vda"),
            format!("INC-{TS}-vda")
        );
        assert_eq!(
            t.level_link(BackupLevel::Full, "vda").as_deref(),
            Some("FULL-vda")
        );
        assert_eq!(t.level_link(BackupLevel::Inc, "vda"), None);
        let t = open(tmp.path(), |o| {
            o.no_timestamp = true;
            o.no_symlink = true
        });
        assert_eq!(t.level_link(BackupLevel::Full, "vda"), None);
    }

    #[test]
    fn has_full_with_no_subdir_counts_only_this_disks_files() {
        let tmp = tempfile::tempdir().unwrap();
        let t = open(tmp.path(), |o| o.no_subdir = true);
        std::fs::write(t.root().join("FULL-1-vdb"), b"x").unwrap();
        std::fs::write(t.root().join("FULL-1-vda.qcow2"), b"x").unwrap();
        assert!(t.has_full("vdb").unwrap());
        assert!(t.has_full("vda.qcow2").unwrap());
        assert!(!t.has_full("vda").unwrap());
        assert_eq!(t.disk_dir("vda"), t.root());
        let t = open(tmp.path(), |_| {});
        assert!(!t.has_full("vda").unwrap(), "no directory: no full");
    }

    #[test]
    fn partials_are_moved_aside_only_for_this_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let t = open(tmp.path(), |o| o.no_subdir = true);
        for n in ["INC-5-vda.partial", "INC-5-vdb.partial", "notes.partial"] {
            std::fs::write(t.root().join(n), b"x").unwrap();
        }
        let moved = t.move_aside_partials("vda").unwrap();
        assert_eq!(
            moved,
            [t.root().join(format!("INC-5-vda.partial.failed-{TS}"))]
        );
        assert!(t.root().join("INC-5-vdb.partial").exists());
        assert!(t.root().join("notes.partial").exists());
        assert!(t.move_aside_partials("vdc").unwrap().is_empty());
    }

    #[test]
    fn the_uuid_lives_in_the_chain_root() {
        let tmp = tempfile::tempdir().unwrap();
        let t = open(tmp.path(), |o| o.monthly = true);
        assert_eq!(t.read_uuid().unwrap(), None);
        t.write_uuid("u-1").unwrap();
        assert_eq!(t.uuid_file(), tmp.path().join("t/2024-01/uuid"));
        assert_eq!(t.read_uuid().unwrap().as_deref(), Some("u-1"));
    }
}
