//! The prune journal: the steps a prune still has to take in one directory, written
//! (atomically, fsynced) before its first change there and removed after its last. While
//! it exists every other command refuses the directory ([`DiskDir::scan`]), and the next
//! prune finishes it before anything else. Each step can be taken again from any state an
//! interruption leaves (see [`super::steps`]), so finishing means running them all again.
//!
//! [`DiskDir::scan`]: crate::store::disk_dir::DiskDir::scan

use crate::fsutil::Dir;
use crate::store::name::PRUNE_JOURNAL;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

const FORMAT: &str = "qmpbackup-prune-journal";
const VERSION: u32 = 1;
/// The largest journal read back: a few names per point, far more than any directory needs.
const MAX_JOURNAL_BYTES: u64 = 64 << 20;

/// A point where the crash tests may kill the prune (`qcow2::storage::fault`): every
/// journal write, rename and removal, besides the image writes the hook counts itself.
pub fn crash_point() {
    qcow2::storage::fault::checkpoint();
}

/// A file operation of a prune in one directory, files by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// Commit `incs` (oldest first) into `full`, rename it `renamed_to`, remove the INCs.
    FoldIntoFull {
        full: String,
        incs: Vec<String>,
        renamed_to: String,
    },
    /// Fold `removed` (consecutive INCs, oldest first) under `into`, then remove them.
    /// `by_commit`: the other way round, which writes less when the kept INC is the
    /// smaller: the INCs after the oldest removed one, `into` last, are committed into it,
    /// and it takes `into`'s name.
    FoldIntoNext {
        removed: Vec<String>,
        into: String,
        #[serde(default)]
        by_commit: bool,
    },
    /// Remove these files (newest first).
    Remove { files: Vec<String> },
}

#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    format: String,
    version: u32,
    steps: Vec<Step>,
}

/// Writes the journal of `dir` (replacing any).
pub fn write(dir: &Dir, steps: &[Step]) -> Result<()> {
    let j = Journal {
        format: FORMAT.into(),
        version: VERSION,
        steps: steps.to_vec(),
    };
    let bytes = serde_json::to_vec_pretty(&j)?;
    crash_point();
    dir.write_atomic(PRUNE_JOURNAL, &bytes)
        .with_context(|| format!("{}: cannot write", dir.join(PRUNE_JOURNAL).display()))
}

/// The steps of `dir`'s journal; None when there is none.
pub fn read(dir: &Dir) -> Result<Option<Vec<Step>>> {
    let path = dir.join(PRUNE_JOURNAL);
    let Some(bytes) = dir
        .read_small(PRUNE_JOURNAL, MAX_JOURNAL_BYTES)
        .with_context(|| format!("{}: cannot read", path.display()))?
    else {
        return Ok(None);
    };
    let j: Journal = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{}: damaged prune journal; the steps of the interrupted prune are unknown. Check the directory with `qmprestore verify --dir {}`, then remove the journal",
            path.display(),
            dir.path().display()
        )
    })?;
    if j.format != FORMAT || j.version != VERSION {
        bail!(
            "{}: not a prune journal this version knows ({} version {}); finish it with the version that wrote it",
            path.display(),
            j.format,
            j.version
        );
    }
    for s in &j.steps {
        let names: Vec<&String> = match s {
            Step::FoldIntoFull {
                full,
                incs,
                renamed_to,
            } => incs.iter().chain([full, renamed_to]).collect(),
            Step::FoldIntoNext { removed, into, .. } => removed.iter().chain([into]).collect(),
            Step::Remove { files } => files.iter().collect(),
        };
        if let Some(bad) = names
            .iter()
            .find(|n| n.is_empty() || n.contains('/') || n.starts_with('.'))
        {
            bail!(
                "{}: damaged prune journal (names {bad:?}, not a backup file of this directory)",
                path.display()
            );
        }
    }
    Ok(Some(j.steps))
}

/// Removes `dir`'s journal: every step is done.
pub fn remove(dir: &Dir) -> Result<()> {
    crash_point();
    dir.remove(PRUNE_JOURNAL)
        .with_context(|| format!("{}: cannot remove", dir.join(PRUNE_JOURNAL).display()))?;
    dir.sync();
    Ok(())
}

/// Whether `dir` holds a journal.
pub fn exists(dir: &Dir) -> Result<bool> {
    dir.exists(PRUNE_JOURNAL)
        .with_context(|| format!("{}: cannot read", dir.join(PRUNE_JOURNAL).display()))
}

#[cfg(test)]
mod tests {
    use super::{read, remove, write, Step};
    use crate::fsutil::Dir;
    use crate::store::name::PRUNE_JOURNAL;

    #[test]
    fn journals_round_trip_and_hostile_ones_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let d = Dir::open(tmp.path()).unwrap();
        assert_eq!(read(&d).unwrap(), None);
        let steps = vec![
            Step::FoldIntoFull {
                full: "FULL-1-d".into(),
                incs: vec!["INC-2-d".into()],
                renamed_to: "FULL-2-d".into(),
            },
            Step::FoldIntoNext {
                removed: vec!["INC-3-d".into()],
                into: "INC-4-d".into(),
                by_commit: true,
            },
            Step::Remove {
                files: vec!["COPY-1-d".into()],
            },
        ];
        write(&d, &steps).unwrap();
        assert_eq!(read(&d).unwrap(), Some(steps));
        remove(&d).unwrap();
        assert_eq!(read(&d).unwrap(), None);
        for (bad, why) in [
            (&b"{"[..], "damaged prune journal"),
            (
                br#"{"format":"qmpbackup-prune-journal","version":9,"steps":[]}"#,
                "not a prune journal this version knows",
            ),
            (
                br#"{"format":"qmpbackup-prune-journal","version":1,"steps":[{"step":"remove","files":["../../etc/passwd"]}]}"#,
                "not a backup file of this directory",
            ),
            (
                br#"{"format":"qmpbackup-prune-journal","version":1,"steps":[{"step":"remove","files":[".lock"]}]}"#,
                "not a backup file of this directory",
            ),
        ] {
            std::fs::write(tmp.path().join(PRUNE_JOURNAL), bad).unwrap();
            let e = format!("{:#}", read(&d).unwrap_err());
            assert!(e.contains(why), "{e}");
        }
    }
}
