//! Finding the backup chains in a disk's backup directory: FULL-, INC- and COPY- files,
//! ordered by the Unix timestamp in their names (never by file times).

use crate::report;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Level {
    #[serde(rename = "FULL")]
    Full,
    #[serde(rename = "INC")]
    Inc,
    #[serde(rename = "COPY")]
    Copy,
}

impl Level {
    pub fn prefix(self) -> &'static str {
        match self {
            Level::Full => "FULL",
            Level::Inc => "INC",
            Level::Copy => "COPY",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupFile {
    pub path: PathBuf,
    pub name: String,
    pub level: Level,
    pub timestamp: u64,
}

impl BackupFile {
    /// Parses `<LEVEL>-<unix ts>-<rest>`; None for files that are not backups.
    pub fn parse(path: &Path) -> Option<BackupFile> {
        let name = path.file_name()?.to_str()?.to_string();
        let (level, rest) = if let Some(r) = name.strip_prefix("FULL-") {
            (Level::Full, r)
        } else if let Some(r) = name.strip_prefix("INC-") {
            (Level::Inc, r)
        } else if let Some(r) = name.strip_prefix("COPY-") {
            (Level::Copy, r)
        } else {
            return None;
        };
        let (ts, _) = rest.split_once('-')?;
        let timestamp = ts.parse().ok()?;
        Some(BackupFile {
            path: path.to_path_buf(),
            name,
            level,
            timestamp,
        })
    }

    /// The disk's name part: what follows `<LEVEL>-<unix time>-`.
    pub fn disk_part(&self) -> &str {
        self.name
            .split_once('-')
            .and_then(|(_, r)| r.split_once('-'))
            .map_or("", |(_, disk)| disk)
    }

    /// The name without its extension (".qcow2").
    pub fn stem(&self) -> &str {
        self.name.rsplit_once('.').map_or(&self.name, |(s, _)| s)
    }

    /// Whether `--until` names this file: the file name, the name without extension, or
    /// the `<LEVEL>-<ts>` prefix.
    pub fn matches_point(&self, point: &str) -> bool {
        let point = point.trim_end_matches('/');
        let point = Path::new(point)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(point);
        self.name == point
            || self.stem() == point
            || format!("{}-{}", self.level.prefix(), self.timestamp) == point
    }

    /// The timestamp as `YYYY-MM-DD-HH:MM:SS` (UTC), the snapshot name snapshotrebase uses.
    pub fn snapshot_name(&self) -> String {
        crate::humanize::format_utc(self.timestamp as i64).replace(' ', "-")
    }
}

/// A FULL and the INCs after it, in order.
#[derive(Debug, Clone, Serialize)]
pub struct Chain {
    pub full: BackupFile,
    pub incs: Vec<BackupFile>,
}

impl Chain {
    /// FULL first, then the INCs.
    pub fn files(&self) -> Vec<&BackupFile> {
        std::iter::once(&self.full)
            .chain(self.incs.iter())
            .collect()
    }

    /// The chain cut after the point `until` names.
    pub fn until(&self, until: &str) -> Result<Chain> {
        if self.full.matches_point(until) {
            return Ok(Chain {
                full: self.full.clone(),
                incs: Vec::new(),
            });
        }
        match self.incs.iter().position(|f| f.matches_point(until)) {
            Some(i) => Ok(Chain {
                full: self.full.clone(),
                incs: self.incs[..=i].to_vec(),
            }),
            None => bail!(
                "--until {until:?} names no point of this chain; points: {}",
                self.files()
                    .iter()
                    .map(|f| f.stem().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    pub fn newest(&self) -> &BackupFile {
        self.incs.last().unwrap_or(&self.full)
    }
}

/// Everything found in a directory.
#[derive(Debug, Clone, Serialize)]
pub struct Directory {
    pub dir: PathBuf,
    /// All chains, oldest first.
    pub chains: Vec<Chain>,
    pub copies: Vec<BackupFile>,
    /// INC files older than every FULL (no chain to belong to).
    pub orphans: Vec<BackupFile>,
}

impl Directory {
    /// Reads a directory. `filter` keeps only file names containing it. Unfinished
    /// (`.partial`) backups are an error: they are not backups. Side files (manifests,
    /// configs), our temporaries and moved-aside partials are never taken for backups; a
    /// FIFO, socket or device named like a backup is skipped with a warning, never opened.
    pub fn scan(dir: &Path, filter: Option<&str>) -> Result<Directory> {
        use std::os::unix::ffi::OsStrExt;
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot read the backup directory", dir.display()))?;
        let mut files = Vec::new();
        let mut partial = Vec::new();
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
            if let Some(f) = filter {
                if !name.contains(f) {
                    continue;
                }
            }
            if is_side_file(name) {
                continue;
            }
            if name.ends_with(".partial") {
                if BackupFile::parse(&path).is_some() {
                    partial.push(name.to_string());
                }
                continue;
            }
            if !looks_like_backup(name.as_bytes()) {
                continue;
            }
            // The type without opening the file: lstat, and stat for a symlink.
            let file_type = match e.file_type() {
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
                        crate::fsutil::kind_of(&t)
                    ));
                    continue;
                }
                Err(err) => {
                    report::warn(format!("{}: skipped: {err}", path.display()));
                    continue;
                }
            }
            if let Some(b) = BackupFile::parse(&path) {
                files.push(b);
            } else if name.starts_with("FULL-") || name.starts_with("INC-") {
                bail!(
                    "{}: backup file name has no timestamp (FULL-<unix time>-<name>), so the chain order is unknown",
                    path.display()
                );
            }
        }
        if !partial.is_empty() {
            partial.sort();
            bail!(
                "{}: unfinished backup files ({}): a backup was interrupted; move them aside or delete them (they are not backups) and run again",
                dir.display(),
                partial.join(", ")
            );
        }
        Ok(Directory::from_files(dir.to_path_buf(), files))
    }

    /// Orders backup files into chains (by the time in their names), copies and orphans.
    fn from_files(dir: PathBuf, mut files: Vec<BackupFile>) -> Directory {
        files.sort_by(|a, b| (a.timestamp, a.level, &a.name).cmp(&(b.timestamp, b.level, &b.name)));
        let mut chains: Vec<Chain> = Vec::new();
        let mut copies = Vec::new();
        let mut orphans = Vec::new();
        for f in files {
            match f.level {
                Level::Full => chains.push(Chain {
                    full: f,
                    incs: Vec::new(),
                }),
                Level::Inc => match chains.last_mut() {
                    Some(c) => c.incs.push(f),
                    None => orphans.push(f),
                },
                Level::Copy => copies.push(f),
            }
        }
        Directory {
            dir,
            chains,
            copies,
            orphans,
        }
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
        let rebuilt = Directory::from_files(self.dir.clone(), files);
        *self = rebuilt;
    }

    /// The newest chain (the one restore commands work on).
    pub fn latest(&self) -> Result<&Chain> {
        self.chains.last().ok_or_else(|| {
            anyhow::anyhow!(
                "no full backup in {}: run a full backup first (or point --dir at a disk's backup directory)",
                self.dir.display()
            )
        })
    }
}

/// Whether a name starts like a backup file (`FULL-`, `INC-`, `COPY-`).
fn looks_like_backup(name: &[u8]) -> bool {
    [&b"FULL-"[..], b"INC-", b"COPY-"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Files beside the backups that are never backups themselves: manifests, configs, the
/// temporaries they are written through, and partials moved aside by a later run.
pub fn is_side_file(name: &str) -> bool {
    [".manifest", ".config", ".manifest.tmp", ".config.tmp"]
        .iter()
        .any(|s| name.ends_with(s))
        || name.contains(".partial.failed-")
        || name.starts_with('.')
}
