//! Which level each disk's backup gets: what the user asked for (`--level`), the chain in
//! the target and the chain's bitmap on the disk decide it.

use crate::qmp::types::DirtyBitmap;
use crate::store::level::BackupLevel;
use anyhow::{bail, Result};
use std::path::Path;

/// The level asked for on the command line; `auto` is resolved per disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RequestedLevel {
    Full,
    Inc,
    Auto,
    Copy,
}

/// The uuid of the chain this run continues or starts: a full starts a new chain (with
/// `--uuid`'s name if given); anything else continues the target's chain, if there is one.
/// `new_uuid` makes a fresh one.
pub fn chain_uuid(
    requested: RequestedLevel,
    target_uuid: Option<&str>,
    given_uuid: Option<&str>,
    chain_root: &Path,
    new_uuid: impl FnOnce() -> String,
) -> Result<String> {
    Ok(match (requested, target_uuid, given_uuid) {
        (RequestedLevel::Full, _, Some(u)) => u.to_string(),
        (RequestedLevel::Full, _, None) => new_uuid(),
        (RequestedLevel::Inc, None, _) => bail!(
            "no full backup in {}: run a full backup first (qmpbackup backup --level full)",
            chain_root.display()
        ),
        (_, Some(u), _) => u.to_string(),
        (_, None, Some(u)) => u.to_string(),
        (_, None, None) => new_uuid(),
    })
}

/// What is known of one disk when its level is chosen.
pub struct DiskFacts<'a> {
    /// How messages name the disk.
    pub label: &'a str,
    /// The chain's bitmap name, `qmpbackup-<uuid>`.
    pub bitmap_name: &'a str,
    /// That bitmap on the disk, if it has it.
    pub bitmap: Option<&'a DirtyBitmap>,
    /// The uuid in the target's uuid file, if any.
    pub target_uuid: Option<&'a str>,
    /// The uuid of the chain this run continues or starts.
    pub run_uuid: &'a str,
    /// The disk's directory, for messages.
    pub disk_dir: &'a Path,
}

/// The level chosen for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelChoice {
    pub level: BackupLevel,
    /// With `auto`, why the disk gets a full rather than an INC.
    pub why_full: Option<String>,
}

/// Chooses one disk's level. `has_full` scans the disk's directory for a FULL; it is only
/// called when the answer matters (a scan can fail on a directory a full does not need).
pub fn decide_level(
    requested: RequestedLevel,
    facts: &DiskFacts,
    mut has_full: impl FnMut() -> Result<bool>,
) -> Result<LevelChoice> {
    let DiskFacts {
        label,
        bitmap_name: bitmap,
        ..
    } = *facts;
    let chain_ok = facts.target_uuid == Some(facts.run_uuid)
        && facts.bitmap.is_some_and(|b| !b.inconsistent)
        && has_full()?;
    let (level, why_full) = match requested {
        RequestedLevel::Full => (BackupLevel::Full, None),
        RequestedLevel::Copy => (BackupLevel::Copy, None),
        RequestedLevel::Inc => {
            match facts.bitmap {
                None => bail!("bitmap {bitmap} is missing on {label}: the chain cannot continue, run a full backup"),
                Some(b) if b.inconsistent => bail!(
                    "bitmap {bitmap} on {label} is inconsistent (QEMU was not shut down cleanly): the chain cannot continue, run a full backup"
                ),
                Some(b) if b.busy => bail!("bitmap {bitmap} on {label} is in use: is another backup running?"),
                _ => {}
            }
            if !has_full()? {
                bail!(
                    "no full backup in {}: run a full backup first",
                    facts.disk_dir.display()
                );
            }
            (BackupLevel::Inc, None)
        }
        RequestedLevel::Auto if chain_ok => (BackupLevel::Inc, None),
        RequestedLevel::Auto => {
            let why = if facts.target_uuid.is_none() {
                "no chain in the target yet".to_string()
            } else if facts.bitmap.is_none() {
                format!("bitmap {bitmap} is missing (new disk, or QEMU restarted)")
            } else if facts.bitmap.is_some_and(|b| b.inconsistent) {
                format!("bitmap {bitmap} is inconsistent")
            } else {
                "no full backup for it in the target".to_string()
            };
            (BackupLevel::Full, Some(why))
        }
    };
    if level == BackupLevel::Inc && facts.bitmap.is_some_and(|b| b.busy) {
        bail!("bitmap {bitmap} on {label} is in use: is another backup running?");
    }
    Ok(LevelChoice { level, why_full })
}

#[cfg(test)]
mod tests {
    use crate::backup::level::*;
    use crate::qmp::types::DirtyBitmap;
    use std::cell::Cell;

    fn bitmap(inconsistent: bool, busy: bool) -> DirtyBitmap {
        serde_json::from_value(serde_json::json!({
            "name": "qmpbackup-u1", "inconsistent": inconsistent, "busy": busy
        }))
        .unwrap()
    }

    /// Decides with the given facts; `has_full` answers `full_on_disk` and counts its calls.
    fn decide(
        requested: RequestedLevel,
        target_uuid: Option<&str>,
        bitmap: Option<&DirtyBitmap>,
        full_on_disk: bool,
    ) -> (Result<LevelChoice>, usize) {
        let calls = Cell::new(0);
        let facts = DiskFacts {
            label: "vda",
            bitmap_name: "qmpbackup-u1",
            bitmap,
            target_uuid,
            run_uuid: "u1",
            disk_dir: Path::new("/t/vda.qcow2"),
        };
        let r = decide_level(requested, &facts, || {
            calls.set(calls.get() + 1);
            Ok(full_on_disk)
        });
        (r, calls.get())
    }

    fn level(r: Result<LevelChoice>) -> BackupLevel {
        r.unwrap().level
    }

    #[test]
    fn auto_continues_a_sound_chain_with_an_inc() {
        let b = bitmap(false, false);
        let (r, _) = decide(RequestedLevel::Auto, Some("u1"), Some(&b), true);
        assert_eq!(
            r.unwrap(),
            LevelChoice {
                level: BackupLevel::Inc,
                why_full: None
            }
        );
    }

    #[test]
    fn auto_takes_a_full_and_says_why() {
        let ok = bitmap(false, false);
        let bad = bitmap(true, false);
        for (target_uuid, bm, full, why) in [
            (None, Some(&ok), true, "no chain in the target yet"),
            (Some("u1"), None, true, "bitmap qmpbackup-u1 is missing"),
            (
                Some("u1"),
                Some(&bad),
                true,
                "bitmap qmpbackup-u1 is inconsistent",
            ),
            (
                Some("u1"),
                Some(&ok),
                false,
                "no full backup for it in the target",
            ),
        ] {
            let (r, _) = decide(RequestedLevel::Auto, target_uuid, bm, full);
            let c = r.unwrap();
            assert_eq!(c.level, BackupLevel::Full);
            assert!(c.why_full.as_deref().unwrap().contains(why), "{c:?}");
        }
    }

    #[test]
    fn inc_without_a_chain_is_an_error() {
        let e = chain_uuid(
            RequestedLevel::Inc,
            None,
            None,
            Path::new("/t"),
            || unreachable!(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no full backup in /t"), "{e}");
        let ok = bitmap(false, false);
        let (r, _) = decide(RequestedLevel::Inc, Some("u1"), Some(&ok), false);
        let e = r.unwrap_err().to_string();
        assert!(e.contains("no full backup in /t/vda.qcow2"), "{e}");
        let (r, _) = decide(RequestedLevel::Inc, Some("u1"), None, true);
        assert!(r.unwrap_err().to_string().contains("is missing on vda"));
        let bad = bitmap(true, false);
        let (r, _) = decide(RequestedLevel::Inc, Some("u1"), Some(&bad), true);
        assert!(r.unwrap_err().to_string().contains("inconsistent"));
    }

    #[test]
    fn a_busy_bitmap_stops_an_inc_but_not_a_full() {
        let busy = bitmap(false, true);
        for requested in [RequestedLevel::Inc, RequestedLevel::Auto] {
            let (r, _) = decide(requested, Some("u1"), Some(&busy), true);
            assert!(r.unwrap_err().to_string().contains("is in use"));
        }
        let (r, _) = decide(RequestedLevel::Full, Some("u1"), Some(&busy), true);
        assert_eq!(level(r), BackupLevel::Full);
    }

    #[test]
    fn full_and_copy_are_taken_as_asked() {
        let ok = bitmap(false, false);
        for (requested, expected) in [
            (RequestedLevel::Full, BackupLevel::Full),
            (RequestedLevel::Copy, BackupLevel::Copy),
        ] {
            for bm in [None, Some(&ok)] {
                for target_uuid in [None, Some("u1"), Some("other")] {
                    let (r, _) = decide(requested, target_uuid, bm, false);
                    assert_eq!(level(r), expected);
                }
            }
        }
    }

    #[test]
    fn the_directory_is_scanned_only_when_it_matters() {
        // A full for a new chain never looks at the disk's directory (which may hold files
        // a scan refuses, such as --no-timestamp names).
        let ok = bitmap(false, false);
        let (_, calls) = decide(RequestedLevel::Full, Some("old"), Some(&ok), true);
        assert_eq!(calls, 0);
        let (_, calls) = decide(RequestedLevel::Auto, None, Some(&ok), true);
        assert_eq!(calls, 0);
        let (_, calls) = decide(RequestedLevel::Auto, Some("u1"), Some(&ok), true);
        assert_eq!(calls, 1);
    }

    #[test]
    fn the_chain_uuid_is_new_for_a_full_and_kept_otherwise() {
        let root = Path::new("/t");
        let new = || "fresh".to_string();
        let uuid = |r, old, given| chain_uuid(r, old, given, root, new).unwrap();
        assert_eq!(uuid(RequestedLevel::Full, Some("old"), None), "fresh");
        assert_eq!(
            uuid(RequestedLevel::Full, Some("old"), Some("mine")),
            "mine"
        );
        assert_eq!(uuid(RequestedLevel::Auto, Some("old"), Some("mine")), "old");
        assert_eq!(uuid(RequestedLevel::Auto, None, Some("mine")), "mine");
        assert_eq!(uuid(RequestedLevel::Auto, None, None), "fresh");
        assert_eq!(uuid(RequestedLevel::Inc, Some("old"), None), "old");
        assert_eq!(uuid(RequestedLevel::Copy, Some("old"), None), "old");
        assert_eq!(uuid(RequestedLevel::Copy, None, None), "fresh");
    }
}
