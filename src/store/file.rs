//! One backup file found in a disk directory.

use crate::store::level::BackupLevel;
use crate::store::name::parse_backup_name;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackupFile {
    pub path: PathBuf,
    pub name: String,
    pub level: BackupLevel,
    pub timestamp: u64,
    /// Written with `--no-timestamp`: the time is not in the name but from its manifest (or
    /// the file's modification time), and the name is the disk's own (`disk1.qcow2`) or,
    /// as older versions wrote it, `FULL-disk1.qcow2`.
    #[serde(skip)]
    pub untimestamped: bool,
}

impl BackupFile {
    /// The backup at `path`, from its file name; None for files that are not backups.
    pub fn parse(path: &Path) -> Option<BackupFile> {
        let name = path.file_name()?.to_str()?;
        let parsed = parse_backup_name(name)?;
        Some(BackupFile {
            path: path.to_path_buf(),
            name: name.to_string(),
            level: parsed.level,
            timestamp: parsed.timestamp,
            untimestamped: false,
        })
    }

    /// A `--no-timestamp` backup at `path` (its name the disk's own, or `<LEVEL>-<disk>`),
    /// of a level and time known from elsewhere (its manifest or symlink, its file time).
    pub fn untimestamped(path: &Path, level: BackupLevel, timestamp: u64) -> Option<BackupFile> {
        Some(BackupFile {
            path: path.to_path_buf(),
            name: path.file_name()?.to_str()?.to_string(),
            level,
            timestamp,
            untimestamped: true,
        })
    }

    /// The disk's name part: what follows `<LEVEL>-<unix time>-` (for a `--no-timestamp`
    /// backup, its name without a `<LEVEL>-` prefix).
    pub fn disk_part(&self) -> &str {
        if self.untimestamped {
            let prefix = self.level.prefix();
            return self
                .name
                .strip_prefix(prefix)
                .and_then(|r| r.strip_prefix('-'))
                .unwrap_or(&self.name);
        }
        parse_backup_name(&self.name).map_or("", |p| p.disk_part)
    }

    /// The name without its extension (".qcow2").
    pub fn stem(&self) -> &str {
        self.name.rsplit_once('.').map_or(&self.name, |(s, _)| s)
    }

    /// Whether `--until` names this file: the file name, the name without extension, or
    /// the `<LEVEL>-<ts>` prefix (for a `--no-timestamp` backup also `<LEVEL>-<name>`, its
    /// symlink's name).
    pub fn matches_point(&self, point: &str) -> bool {
        let point = point.trim_end_matches('/');
        let point = Path::new(point)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(point);
        self.name == point
            || self.stem() == point
            || format!("{}-{}", self.level.prefix(), self.timestamp) == point
            || (self.untimestamped && format!("{}-{}", self.level.prefix(), self.name) == point)
    }

    /// The timestamp as `YYYY-MM-DD-HH:MM:SS` (UTC), the snapshot name snapshotrebase uses.
    pub fn snapshot_name(&self) -> String {
        crate::humanize::format_utc(self.timestamp as i64).replace(' ', "-")
    }
}

#[cfg(test)]
mod tests {
    use crate::store::file::BackupFile;
    use crate::store::level::BackupLevel;
    use std::path::Path;

    fn file(name: &str) -> BackupFile {
        BackupFile::parse(&Path::new("/b/d").join(name)).unwrap()
    }

    #[test]
    fn parse_keeps_path_name_level_and_time() {
        let f = file("INC-1706260646-disk.qcow2");
        assert_eq!(f.path, Path::new("/b/d/INC-1706260646-disk.qcow2"));
        assert_eq!(f.name, "INC-1706260646-disk.qcow2");
        assert_eq!((f.level, f.timestamp), (BackupLevel::Inc, 1706260646));
        assert_eq!(f.disk_part(), "disk.qcow2");
        assert_eq!(f.stem(), "INC-1706260646-disk");
        assert!(BackupFile::parse(Path::new("/b/d/disk.qcow2")).is_none());
        assert!(BackupFile::parse(Path::new("/")).is_none());
    }

    #[test]
    fn until_points_name_a_file_three_ways() {
        let f = file("INC-1706260646-disk.qcow2");
        for point in [
            "INC-1706260646-disk.qcow2",
            "INC-1706260646-disk",
            "INC-1706260646",
            "/somewhere/else/INC-1706260646-disk.qcow2",
            "INC-1706260646/",
        ] {
            assert!(f.matches_point(point), "{point}");
        }
        for point in [
            "INC-170626064",
            "FULL-1706260646",
            "1706260646",
            "",
            "disk.qcow2",
        ] {
            assert!(!f.matches_point(point), "{point}");
        }
    }

    #[test]
    fn snapshot_names_are_utc_times() {
        assert_eq!(file("INC-0-d").snapshot_name(), "1970-01-01-00:00:00");
        assert_eq!(
            file("INC-1706260646-d").snapshot_name(),
            "2024-01-26-09:17:26"
        );
    }
}
