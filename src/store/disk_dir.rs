//! A disk directory: one disk's backup files, ordered into chains by the Unix timestamp in
//! their names (never by file times).

use crate::fsutil::kind_of;
use crate::report;
use crate::store::chain::BackupChain;
use crate::store::file::BackupFile;
use crate::store::level::BackupLevel;
use crate::store::manifest;
use crate::store::name::{
    backup_of_partial, is_side_file, looks_like_backup, MANIFEST_SUFFIX, MOVED_ASIDE_INFIX,
    PARTIAL_SUFFIX, PRUNE_JOURNAL,
};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Everything found in a disk directory.
#[derive(Debug, Clone, Serialize)]
pub struct DiskDir {
    pub dir: PathBuf,
    /// All chains, oldest first.
    pub chains: Vec<BackupChain>,
    pub copies: Vec<BackupFile>,
    /// INC files older than every FULL (no chain to belong to).
    pub orphans: Vec<BackupFile>,
    /// What interrupted backups left: `.partial` files and those moved aside
    /// (`.partial.failed-<time>`), by name. Only [`DiskDir::scan_lenient`] returns any.
    #[serde(skip)]
    pub leftovers: Vec<String>,
}

impl DiskDir {
    /// Reads a directory. `filter` keeps only file names containing it. Unfinished
    /// (`.partial`) backups are an error: they are not backups. Side files (manifests,
    /// configs, the lock file), our temporaries and moved-aside partials are never taken for
    /// backups; a FIFO, socket or device named like a backup is skipped with a warning,
    /// never opened. A `--no-timestamp` backup (see [`DiskDir::untimestamped`]) takes its
    /// time from its manifest.
    ///
    /// A directory an interrupted prune is changing (it holds the prune's journal) is an
    /// error too, until prune finishes.
    pub fn scan(dir: &Path, filter: Option<&str>) -> Result<DiskDir> {
        if dir.join(PRUNE_JOURNAL).symlink_metadata().is_ok() {
            bail!(
                "{}: an interrupted prune is folding backups here, so some points may not restore right yet; run `qmprestore prune --dir {} --resume` to finish it",
                dir.display(),
                dir.display()
            );
        }
        let d = DiskDir::scan_lenient(dir, filter)?;
        let mut partial: Vec<&String> = d
            .leftovers
            .iter()
            .filter(|n| n.ends_with(PARTIAL_SUFFIX))
            .collect();
        if !partial.is_empty() {
            partial.sort();
            bail!(
                "{}: unfinished backup files ({}): a backup was interrupted; move them aside or delete them (they are not backups) and run again",
                dir.display(),
                partial.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            );
        }
        Ok(d)
    }

    /// [`DiskDir::scan`] for prune: unfinished backups are listed in `leftovers`, not an
    /// error, and a prune journal is not looked at.
    pub fn scan_lenient(dir: &Path, filter: Option<&str>) -> Result<DiskDir> {
        use std::os::unix::ffi::OsStrExt;
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot read the backup directory", dir.display()))?;
        let mut files = Vec::new();
        let mut partial = Vec::new();
        let mut untimed = Untimed::default();
        for e in entries {
            let e =
                e.with_context(|| format!("{}: cannot read the backup directory", dir.display()))?;
            let path = e.path();
            let raw = e.file_name();
            let Some(name) = raw.to_str() else {
                if looks_like_backup(raw.as_bytes()) {
                    bail!(
                        "{}: the file name is not valid UTF-8; rename it (backup file names are recorded in the chain as text)",
                        path.display()
                    );
                }
                continue;
            };
            if name.ends_with(MANIFEST_SUFFIX) {
                untimed.manifests.insert(name.to_string());
            }
            if let Some(f) = filter {
                if !name.contains(f) {
                    continue;
                }
            }
            if name.contains(MOVED_ASIDE_INFIX) {
                partial.push(name.to_string());
            }
            if is_side_file(name) {
                continue;
            }
            if name.ends_with(PARTIAL_SUFFIX) {
                if backup_of_partial(name).is_some() {
                    partial.push(name.to_string());
                }
                continue;
            }
            let lstat = e.file_type();
            if !looks_like_backup(name.as_bytes()) {
                if matches!(&lstat, Ok(t) if t.is_file()) {
                    untimed.others.push(name.to_string());
                }
                continue;
            }
            let timed = BackupFile::parse(&path);
            if timed.is_none() {
                if let Ok(t) = &lstat {
                    if t.is_symlink() {
                        // `FULL-disk1.qcow2` -> `disk1.qcow2`: names the level of the file.
                        if let Some(target) = plain_link_target(&path) {
                            let level = name.split('-').next().and_then(BackupLevel::from_prefix);
                            untimed.links.extend(level.map(|l| (target, l)));
                        }
                        continue;
                    }
                }
            }
            // The type without opening the file: lstat, and stat for a symlink.
            let file_type = match lstat {
                Ok(t) if t.is_symlink() => std::fs::metadata(&path).map(|m| m.file_type()),
                other => other,
            };
            match file_type {
                Ok(t) if t.is_file() => {}
                Ok(t) if t.is_dir() => continue,
                Ok(t) => {
                    report::warn(format!(
                        "{}: a {}, not a backup file: skipped",
                        path.display(),
                        kind_of(&t)
                    ));
                    continue;
                }
                Err(err) => {
                    report::warn(format!("{}: skipped: {err}", path.display()));
                    continue;
                }
            }
            match timed {
                Some(b) => files.push(b),
                None if name.starts_with("INC-") => bail!(
                    "{}: incremental backup file name has no timestamp (INC-<unix time>-<name>), so its place in the chain is unknown",
                    path.display()
                ),
                // `FULL-disk1.qcow2`, as older versions wrote `--no-timestamp` backups.
                None => untimed.prefixed.push(name.to_string()),
            }
        }
        files.extend(untimed.resolve(dir)?);
        let mut d = DiskDir::from_files(dir.to_path_buf(), files);
        partial.sort();
        d.leftovers = partial;
        Ok(d)
    }

    /// Orders backup files into chains (by the time in their names), copies and orphans.
    pub fn from_files(dir: PathBuf, mut files: Vec<BackupFile>) -> DiskDir {
        files.sort_by(|a, b| (a.timestamp, a.level, &a.name).cmp(&(b.timestamp, b.level, &b.name)));
        let mut chains: Vec<BackupChain> = Vec::new();
        let mut copies = Vec::new();
        let mut orphans = Vec::new();
        for f in files {
            match f.level {
                BackupLevel::Full => chains.push(BackupChain {
                    full: f,
                    incs: Vec::new(),
                }),
                BackupLevel::Inc => match chains.last_mut() {
                    Some(c) => c.incs.push(f),
                    None => orphans.push(f),
                },
                BackupLevel::Copy => copies.push(f),
            }
        }
        DiskDir {
            dir,
            chains,
            copies,
            orphans,
            leftovers: Vec::new(),
        }
    }

    /// Whether a chain can continue here: there is a FULL.
    pub fn has_full(&self) -> bool {
        !self.chains.is_empty()
    }

    /// The time of the newest backup here (chains, copies and orphans alike).
    pub fn newest_time(&self) -> Option<u64> {
        self.chains
            .iter()
            .flat_map(|c| c.files())
            .chain(self.copies.iter())
            .chain(self.orphans.iter())
            .map(|f| f.timestamp)
            .max()
    }

    /// Keeps only the backups `keep` accepts, and rebuilds the chains from them.
    pub fn retain(&mut self, keep: impl Fn(&BackupFile) -> bool) {
        let mut files: Vec<BackupFile> = Vec::new();
        for c in self.chains.drain(..) {
            files.push(c.full);
            files.extend(c.incs);
        }
        files.append(&mut self.copies);
        files.append(&mut self.orphans);
        files.retain(|f| keep(f));
        let mut rebuilt = DiskDir::from_files(self.dir.clone(), files);
        rebuilt.leftovers = std::mem::take(&mut self.leftovers);
        *self = rebuilt;
    }

    /// The newest chain (the one restore commands work on).
    pub fn latest(&self) -> Result<&BackupChain> {
        self.chains.last().ok_or_else(|| {
            anyhow::anyhow!(
                "no full backup in {}: run a full backup first (or point --dir at a disk's backup directory)",
                self.dir.display()
            )
        })
    }

    /// The chain a command works on: the newest, or with `until` the chain holding that
    /// point (the newest first), cut after it.
    pub fn chain_until(&self, until: Option<&str>) -> Result<BackupChain> {
        let latest = self.latest()?;
        let Some(u) = until else {
            return Ok(latest.clone());
        };
        for ch in self.chains.iter().rev() {
            if ch.files().iter().any(|f| f.matches_point(u)) {
                let cut = ch.until(u)?;
                if ch.full.name != latest.full.name {
                    report::info(format!(
                        "{u} belongs to the older chain of {}",
                        ch.full.name
                    ));
                }
                return Ok(cut);
            }
        }
        // Not found: let the newest chain explain which points exist.
        latest.until(u)
    }
}

/// The candidates for `--no-timestamp` backups found while scanning a directory.
#[derive(Default)]
struct Untimed {
    /// Every manifest's name in the directory.
    manifests: std::collections::HashSet<String>,
    /// Regular files whose names do not look like backups: `disk1.qcow2` is one when its
    /// manifest says what it is, or a `FULL-disk1.qcow2` symlink points at it.
    others: Vec<String>,
    /// `<LEVEL>-<name>` symlinks: (the file they point at, the level).
    links: Vec<(String, BackupLevel)>,
    /// Regular files named `FULL-<name>` or `COPY-<name>`, without a time.
    prefixed: Vec<String>,
}

impl Untimed {
    /// The `--no-timestamp` backups: each with its level (from its symlink, its name or its
    /// manifest) and its time (from its manifest, else its modification time, with a
    /// warning).
    fn resolve(self, dir: &Path) -> Result<Vec<BackupFile>> {
        let mut out = Vec::new();
        let level_of_name = |n: &str| n.split('-').next().and_then(BackupLevel::from_prefix);
        let mut candidates: Vec<(String, Option<BackupLevel>)> = Vec::new();
        for n in self.prefixed {
            let l = level_of_name(&n);
            candidates.push((n, l));
        }
        for n in self.others {
            let linked = self.links.iter().find(|(t, _)| *t == n).map(|(_, l)| *l);
            if linked.is_some() || self.manifests.contains(&format!("{n}{MANIFEST_SUFFIX}")) {
                candidates.push((n, linked));
            }
        }
        for (name, level) in candidates {
            let path = dir.join(&name);
            let origin = if self.manifests.contains(&format!("{name}{MANIFEST_SUFFIX}")) {
                match manifest::read_manifest(&path) {
                    Ok(h) => h.and_then(|h| h.origin),
                    Err(e) => {
                        report::warn(format!("{e:#}"));
                        None
                    }
                }
            } else {
                None
            };
            let (level, time) = match (level, origin) {
                (Some(l), Some(o)) => (l, o.time),
                (None, Some(o)) => (o.level, o.time),
                (Some(l), None) => {
                    let mtime = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .with_context(|| format!("{}: cannot read", path.display()))?;
                    let t = mtime
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs();
                    report::warn(format!(
                        "{}: no time in its name or manifest; ordered by its modification time ({})",
                        path.display(),
                        crate::humanize::format_utc(t as i64)
                    ));
                    (l, t)
                }
                (None, None) => continue,
            };
            if level == BackupLevel::Inc {
                bail!(
                    "{}: an incremental backup without a timestamp in its name; its place in the chain is unknown",
                    path.display()
                );
            }
            out.extend(BackupFile::untimestamped(&path, level, time));
        }
        Ok(out)
    }
}

/// Where a symlink points, when that is a plain name in the same directory.
fn plain_link_target(link: &Path) -> Option<String> {
    let t = std::fs::read_link(link).ok()?;
    let t = t.to_str()?;
    (!t.is_empty() && !t.contains('/') && t != "." && t != "..").then(|| t.to_string())
}

#[cfg(test)]
mod tests {
    use crate::store::disk_dir::DiskDir;
    use std::path::Path;

    /// A directory holding files of these names (a few bytes each: the scan reads names).
    fn dir_with(names: &[&str]) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        for n in names {
            std::fs::write(tmp.path().join(n), b"x").unwrap();
        }
        tmp
    }

    fn names(files: &[&crate::store::file::BackupFile]) -> Vec<String> {
        files.iter().map(|f| f.name.clone()).collect()
    }

    #[test]
    fn chains_are_ordered_by_the_time_in_the_names() {
        let tmp = dir_with(&[
            "INC-300-d",
            "FULL-100-d",
            "INC-200-d",
            "FULL-400-d",
            "INC-500-d",
            "COPY-250-d",
            "INC-50-d",
        ]);
        let d = DiskDir::scan(tmp.path(), None).unwrap();
        assert_eq!(d.chains.len(), 2);
        assert_eq!(
            names(&d.chains[0].files()),
            ["FULL-100-d", "INC-200-d", "INC-300-d"]
        );
        assert_eq!(names(&d.chains[1].files()), ["FULL-400-d", "INC-500-d"]);
        assert_eq!(d.copies[0].name, "COPY-250-d");
        assert_eq!(d.orphans[0].name, "INC-50-d");
        assert_eq!(d.latest().unwrap().full.name, "FULL-400-d");
    }

    #[test]
    fn a_full_and_an_inc_of_the_same_second_keep_their_order() {
        let tmp = dir_with(&["INC-100-d", "FULL-100-d"]);
        let d = DiskDir::scan(tmp.path(), None).unwrap();
        assert_eq!(names(&d.chains[0].files()), ["FULL-100-d", "INC-100-d"]);
    }

    #[test]
    fn side_files_and_the_lock_file_are_skipped() {
        let tmp = dir_with(&[
            "FULL-100-d",
            "FULL-100-d.manifest",
            "FULL-100-d.manifest.tmp",
            "d.config",
            ".lock",
            ".append.lock",
            ".d.fleece-100.qcow2",
            "INC-200-d.partial.failed-300",
            "notes.txt",
            "image",
        ]);
        std::fs::create_dir(tmp.path().join("INC-150-dir")).unwrap();
        let d = DiskDir::scan(tmp.path(), None).unwrap();
        assert_eq!(d.chains.len(), 1);
        assert!(d.chains[0].incs.is_empty() && d.copies.is_empty() && d.orphans.is_empty());
    }

    #[test]
    fn unfinished_and_untimed_backups_are_errors() {
        let tmp = dir_with(&["FULL-100-d", "INC-200-d.partial"]);
        let e = DiskDir::scan(tmp.path(), None).unwrap_err().to_string();
        assert!(
            e.contains("unfinished backup files (INC-200-d.partial)"),
            "{e}"
        );
        let tmp = dir_with(&["FULL-1-d", "INC-d"]);
        let e = DiskDir::scan(tmp.path(), None).unwrap_err().to_string();
        assert!(e.contains("has no timestamp"), "{e}");
    }

    /// Sets a file's modification time.
    fn set_mtime(path: &Path, secs: u64) {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
            .unwrap();
    }

    /// A manifest that says what the file `name` is (no runs: the scan reads only this).
    fn manifest_saying(dir: &Path, name: &str, level: &str, time: u64) {
        std::fs::write(
            dir.join(format!("{name}.manifest")),
            format!(
                r#"{{"format":"qmpbackup-manifest","version":2,"file":"{name}","virtual-size":1048576,"block-size":1048576,"uuid":null,"level":"{level}","time":{time},"runs":[]}}"#
            ),
        )
        .unwrap();
    }

    #[test]
    fn untimestamped_backups_take_their_time_from_the_manifest_or_the_file() {
        // With a symlink: the level from it, the time from the manifest.
        let tmp = dir_with(&["d.qcow2", "INC-200-d.qcow2", "INC-300-d.qcow2"]);
        std::os::unix::fs::symlink("d.qcow2", tmp.path().join("FULL-d.qcow2")).unwrap();
        manifest_saying(tmp.path(), "d.qcow2", "FULL", 150);
        let d = DiskDir::scan(tmp.path(), None).unwrap();
        let c = d.latest().unwrap();
        assert_eq!(
            names(&c.files()),
            ["d.qcow2", "INC-200-d.qcow2", "INC-300-d.qcow2"]
        );
        assert_eq!((c.full.timestamp, c.full.disk_part()), (150, "d.qcow2"));
        assert_eq!(c.full.path, tmp.path().join("d.qcow2"));
        for point in ["FULL-d.qcow2", "d.qcow2", "d", "FULL-150"] {
            assert!(c.full.matches_point(point), "{point}");
        }
        assert_eq!(d.newest_time(), Some(300));
        // Without the symlink (--no-symlink): the manifest alone says what it is.
        std::fs::remove_file(tmp.path().join("FULL-d.qcow2")).unwrap();
        let d = DiskDir::scan(tmp.path(), None).unwrap();
        assert_eq!(d.latest().unwrap().full.name, "d.qcow2");
        // Without either, a file is not a backup.
        std::fs::remove_file(tmp.path().join("d.qcow2.manifest")).unwrap();
        let d = DiskDir::scan(tmp.path(), None).unwrap();
        assert!(d.chains.is_empty() && d.orphans.len() == 2);
        // A symlink and no manifest: the file's modification time.
        std::os::unix::fs::symlink("d.qcow2", tmp.path().join("COPY-d.qcow2")).unwrap();
        set_mtime(&tmp.path().join("d.qcow2"), 250);
        let d = DiskDir::scan(tmp.path(), None).unwrap();
        assert_eq!(
            (d.copies[0].name.as_str(), d.copies[0].timestamp),
            ("d.qcow2", 250)
        );
        // `FULL-d` as a regular file (older versions' --no-timestamp).
        let tmp = dir_with(&["FULL-d", "INC-200-d"]);
        set_mtime(&tmp.path().join("FULL-d"), 100);
        let d = DiskDir::scan(tmp.path(), None).unwrap();
        assert_eq!(names(&d.latest().unwrap().files()), ["FULL-d", "INC-200-d"]);
        assert_eq!(d.latest().unwrap().full.disk_part(), "d");
    }

    #[test]
    fn a_special_file_named_like_a_backup_is_skipped() {
        let tmp = dir_with(&["FULL-100-d"]);
        let fifo = std::ffi::CString::new(
            tmp.path()
                .join("INC-200-d")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let d = DiskDir::scan(tmp.path(), None).unwrap();
        assert!(d.chains[0].incs.is_empty());
    }

    #[test]
    fn the_filter_and_retain_narrow_the_files() {
        let tmp = dir_with(&["FULL-100-a", "INC-200-a", "FULL-150-b", "INC-250-b"]);
        let d = DiskDir::scan(tmp.path(), Some("-b")).unwrap();
        assert_eq!(
            names(&d.latest().unwrap().files()),
            ["FULL-150-b", "INC-250-b"]
        );
        let mut d = DiskDir::scan(tmp.path(), None).unwrap();
        assert_eq!(
            names(&d.latest().unwrap().files()),
            ["FULL-150-b", "INC-200-a", "INC-250-b"]
        );
        d.retain(|f| f.disk_part() == "a");
        assert_eq!(d.chains.len(), 1);
        assert_eq!(
            names(&d.latest().unwrap().files()),
            ["FULL-100-a", "INC-200-a"]
        );
    }

    #[test]
    fn until_finds_a_point_in_an_older_chain() {
        let tmp = dir_with(&[
            "FULL-100-d",
            "INC-200-d",
            "INC-300-d",
            "FULL-400-d",
            "INC-500-d",
        ]);
        let d = DiskDir::scan(tmp.path(), None).unwrap();
        let c = d.chain_until(None).unwrap();
        assert_eq!(names(&c.files()), ["FULL-400-d", "INC-500-d"]);
        let c = d.chain_until(Some("INC-200")).unwrap();
        assert_eq!(names(&c.files()), ["FULL-100-d", "INC-200-d"]);
        let c = d.chain_until(Some("FULL-400-d")).unwrap();
        assert_eq!(names(&c.files()), ["FULL-400-d"]);
        let e = d.chain_until(Some("INC-999")).unwrap_err().to_string();
        assert!(e.contains("points: FULL-400-d, INC-500-d"), "{e}");
    }

    #[test]
    fn no_full_and_no_directory_are_errors() {
        let tmp = dir_with(&["INC-200-d", "COPY-100-d"]);
        let d = DiskDir::scan(tmp.path(), None).unwrap();
        let e = d.latest().unwrap_err().to_string();
        assert!(e.contains("no full backup in"), "{e}");
        assert!(d.chain_until(Some("INC-200")).is_err());
        let e = DiskDir::scan(Path::new("/nonexistent/d"), None).unwrap_err();
        assert!(
            e.to_string().contains("cannot read the backup directory"),
            "{e}"
        );
    }
}
