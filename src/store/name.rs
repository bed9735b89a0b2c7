//! File names in a backup target, both ways: what `backup` writes and what `restore` (and
//! the next backup) parses back. A backup file is `<LEVEL>-<unix time>-<disk name>`
//! (`<LEVEL>-<disk name>` with `--no-timestamp`); everything else beside it is a side file.

use crate::store::level::BackupLevel;

/// Written while the job runs; renamed to the backup's name when it succeeded.
pub const PARTIAL_SUFFIX: &str = ".partial";
/// Checksums of the backup file of the same name without it.
pub const MANIFEST_SUFFIX: &str = ".manifest";
/// The source image's info, `<disk name>.config`.
pub const CONFIG_SUFFIX: &str = ".config";
/// What a `.partial` of an interrupted run is renamed to: `<name>.partial.failed-<time>`.
pub const MOVED_ASIDE_INFIX: &str = ".partial.failed-";
/// The chain's bitmap uuid, in the chain root (`<target>` or `<target>/YYYY-MM`).
pub const UUID_FILE: &str = "uuid";
/// With `--monthly`: `<target>/current` points at the newest month's folder.
pub const CURRENT_LINK: &str = "current";
/// The lock file every command on a directory holds, shared or exclusive (lock.rs; a dot
/// file: never a backup).
pub const LOCK_FILE: &str = ".lock";
/// Held by the one backup adding files to a directory (lock.rs).
pub const APPEND_LOCK_FILE: &str = ".append.lock";
/// What an unfinished prune leaves in a directory it is changing: its remaining steps.
pub const PRUNE_JOURNAL: &str = ".prune-journal";

/// The name of a new backup file. `timestamp` is None with `--no-timestamp`.
pub fn backup_file_name(level: BackupLevel, timestamp: Option<u64>, disk_name: &str) -> String {
    match timestamp {
        Some(ts) => format!("{}-{ts}-{disk_name}", level.prefix()),
        None => format!("{}-{disk_name}", level.prefix()),
    }
}

/// The name a backup is written under until its job succeeded.
pub fn partial_name(backup_name: &str) -> String {
    format!("{backup_name}{PARTIAL_SUFFIX}")
}

/// The name a `.partial` left by an interrupted run is moved aside to.
pub fn moved_aside_name(partial_name: &str, timestamp: u64) -> String {
    format!("{partial_name}.failed-{timestamp}")
}

/// `<disk name>.config`.
pub fn config_name(disk_name: &str) -> String {
    format!("{disk_name}{CONFIG_SUFFIX}")
}

/// The temporary fleece image of a disk (a dot file, so never taken for a backup).
pub fn fleece_name(disk_name: &str, timestamp: u64) -> String {
    format!(".{disk_name}.fleece-{timestamp}.qcow2")
}

/// What a backup file's name says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedName<'a> {
    pub level: BackupLevel,
    pub timestamp: u64,
    /// What follows `<LEVEL>-<unix time>-`: the disk's name (and nothing else, when the
    /// file is this tool's).
    pub disk_part: &'a str,
}

/// Parses `<LEVEL>-<unix time>-<disk part>`; None for a name that is not a backup with a
/// timestamp (a `--no-timestamp` name, a side file, anything else).
pub fn parse_backup_name(name: &str) -> Option<ParsedName<'_>> {
    let (prefix, rest) = name.split_once('-')?;
    let level = BackupLevel::from_prefix(prefix)?;
    let (ts, disk_part) = rest.split_once('-')?;
    let timestamp = ts.parse().ok()?;
    Some(ParsedName {
        level,
        timestamp,
        disk_part,
    })
}

/// Whether `name` is a backup of the disk `disk_name` (its disk part exactly that name):
/// with `--no-subdir` every disk's files share one directory, and `FULL-1-disk` must not be
/// taken for a backup of `isk` or of `disk.qcow2`.
pub fn is_backup_of(name: &str, disk_name: &str) -> bool {
    parse_backup_name(name).is_some_and(|p| p.disk_part == disk_name)
}

/// Whether a name starts like a backup file (`FULL-`, `INC-`, `COPY-`), timestamp or not.
pub fn looks_like_backup(name: &[u8]) -> bool {
    BackupLevel::ALL.iter().any(|l| {
        name.strip_prefix(l.prefix().as_bytes())
            .is_some_and(|rest| rest.first() == Some(&b'-'))
    })
}

/// Files beside the backups that are never backups themselves: manifests, configs, the
/// temporaries they are written through, partials moved aside by a later run, and dot
/// files (fleece images, the lock file, our temporaries).
pub fn is_side_file(name: &str) -> bool {
    [
        MANIFEST_SUFFIX,
        CONFIG_SUFFIX,
        ".manifest.tmp",
        ".config.tmp",
    ]
    .iter()
    .any(|s| name.ends_with(s))
        || name.contains(MOVED_ASIDE_INFIX)
        || name.starts_with('.')
}

/// The backup a `.partial` name stands for, if it is one.
pub fn backup_of_partial(name: &str) -> Option<&str> {
    name.strip_suffix(PARTIAL_SUFFIX)
        .filter(|b| parse_backup_name(b).is_some())
}

#[cfg(test)]
mod tests {
    use crate::store::level::BackupLevel;
    use crate::store::name::*;

    #[test]
    fn built_names_parse_back() {
        for level in BackupLevel::ALL {
            for disk in ["disk.qcow2", "a-b-c", "-", "x"] {
                let name = backup_file_name(level, Some(1_700_000_000), disk);
                let p = parse_backup_name(&name).unwrap();
                assert_eq!(
                    (p.level, p.timestamp, p.disk_part),
                    (level, 1_700_000_000, disk)
                );
                assert!(is_backup_of(&name, disk));
                assert!(looks_like_backup(name.as_bytes()));
                assert!(!is_side_file(&name));
            }
        }
    }

    #[test]
    fn no_timestamp_names_look_like_backups_but_do_not_parse() {
        let name = backup_file_name(BackupLevel::Full, None, "disk.qcow2");
        assert_eq!(name, "FULL-disk.qcow2");
        assert!(looks_like_backup(name.as_bytes()));
        assert_eq!(parse_backup_name(&name), None);
    }

    #[test]
    fn odd_names_are_refused() {
        for name in [
            "",
            "FULL",
            "FULL-",
            "FULL-123",
            "FULL--disk",
            "FULL-12x-disk",
            "FULL--1-disk",
            "FULL-99999999999999999999999-disk",
            "full-123-disk",
            "DIFF-123-disk",
            "INC_123-disk",
            "FULLY-123-disk",
            "disk.qcow2",
        ] {
            assert_eq!(parse_backup_name(name), None, "{name:?}");
        }
        assert!(!looks_like_backup(b"FULLY-1-disk"));
        assert!(!looks_like_backup(b"INC"));
    }

    #[test]
    fn an_empty_disk_part_still_parses() {
        // What the scan always accepted: the name's order is known from its timestamp.
        let p = parse_backup_name("INC-5-").unwrap();
        assert_eq!(
            (p.level, p.timestamp, p.disk_part),
            (BackupLevel::Inc, 5, "")
        );
    }

    #[test]
    fn no_subdir_match_is_exact() {
        let name = "FULL-1700000000-disk.qcow2";
        assert!(is_backup_of(name, "disk.qcow2"));
        for other in [
            "disk",
            "isk.qcow2",
            "disk.qcow2.old",
            "",
            "1700000000-disk.qcow2",
        ] {
            assert!(!is_backup_of(name, other), "{other:?}");
        }
        // A disk whose name has dashes and digits of its own.
        assert!(is_backup_of("INC-1-2-3", "2-3"));
        assert!(!is_backup_of("INC-1-2-3", "3"));
    }

    #[test]
    fn side_files_are_never_backups() {
        for name in [
            "FULL-1-d.manifest",
            "FULL-1-d.manifest.tmp",
            "d.config",
            "d.config.tmp",
            "FULL-1-d.partial.failed-17",
            ".lock",
            ".d.fleece-1.qcow2",
        ] {
            assert!(is_side_file(name), "{name}");
        }
        assert!(is_side_file(LOCK_FILE));
        assert!(is_side_file(&config_name("d")));
        assert!(is_side_file(&fleece_name("d", 3)));
        assert!(is_side_file(&moved_aside_name(
            &partial_name("FULL-1-d"),
            9
        )));
    }

    #[test]
    fn partials_name_their_backup() {
        let p = partial_name("INC-7-d");
        assert_eq!(p, "INC-7-d.partial");
        assert_eq!(backup_of_partial(&p), Some("INC-7-d"));
        assert_eq!(backup_of_partial("INC-d.partial"), None);
        assert_eq!(backup_of_partial("notes.partial"), None);
        assert_eq!(backup_of_partial("INC-7-d"), None);
    }
}
