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
