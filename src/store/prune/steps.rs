//! Taking a prune's steps in one directory. Each step works out from the files how far it
//! got, so running it again after an interruption finishes it; and at every instant every
//! point the policy keeps reads exactly as before:
//! - folding into the FULL commits INCs that stay on top of it until it has all of them
//!   (a commit changes only what the INCs above overwrite anyway); the FULL takes the last
//!   INC's name (its manifest first, then the image), and only then does that INC go;
//! - folding under the next kept INC only fills what that INC does not hold, with what the
//!   stack below reads there; the folded INCs go once it is complete and flushed;
//! - removals take the newest file first, so a chain cut short is still a chain.
//!
//! Data is flushed before manifests are replaced, and a file is removed only after what
//! replaces it is on disk.

use super::journal::{crash_point, Step};
use crate::fsutil::Dir;
use crate::progress::Meter;
use crate::store::disk_dir::DiskDir;
use crate::store::file::BackupFile;
use crate::store::fold::{
    check_before_commit, check_reads, commit_inc, commit_inc_over, fold_under,
    open_full_for_writing, open_stack, recover_manifest,
};
use crate::store::manifest::edit::{pending_name, FullEdit};
use crate::store::manifest::{load_manifest, manifest_name, store, Origin};
use anyhow::{anyhow, bail, Context, Result};

use std::sync::Arc;

/// What every step needs besides its files.
pub struct StepContext<'a> {
    /// Check data against manifests before it goes anywhere (not `--ignore-checksums`).
    pub checks: bool,
    pub rate_limit: u64,
    pub meter: &'a Arc<Meter>,
}

/// Takes `step` in `dir`, from whatever state an earlier interrupted run left.
pub fn take(dir: &Dir, step: &Step, ctx: &StepContext<'_>) -> Result<()> {
    match step {
        Step::FoldIntoFull {
            full,
            incs,
            renamed_to,
        } => fold_into_full(dir, full, incs, renamed_to, ctx),
        Step::FoldIntoNext {
            removed,
            into,
            by_commit: false,
        } => fold_into_next(dir, removed, into, ctx),
        Step::FoldIntoNext {
            removed,
            into,
            by_commit: true,
        } => commit_into_removed(dir, removed, into, ctx),
        Step::Remove { files } => {
            for f in files {
                remove_backup(dir, f)?;
            }
            dir.sync();
            Ok(())
        }
    }
}

fn backup(dir: &Dir, name: &str) -> Result<BackupFile> {
    BackupFile::parse(&dir.join(name))
        .ok_or_else(|| anyhow!("{}: not a backup file name", dir.join(name).display()))
}

fn exists(dir: &Dir, name: &str) -> Result<bool> {
    dir.exists(name)
        .with_context(|| format!("{}: cannot read", dir.join(name).display()))
}

/// Removes the file `name` (a missing one is not an error): a crash point.
fn remove(dir: &Dir, name: &str) -> Result<()> {
    crash_point();
    dir.remove(name)
        .with_context(|| format!("{}: cannot remove", dir.join(name).display()))
}

/// Removes a backup file, then its manifest and what an interrupted commit into it left.
fn remove_backup(dir: &Dir, name: &str) -> Result<()> {
    for n in [name.to_string(), manifest_name(name), pending_name(name)] {
        remove(dir, &n)?;
    }
    Ok(())
}

fn fold_into_full(
    dir: &Dir,
    full: &str,
    incs: &[String],
    renamed_to: &str,
    ctx: &StepContext<'_>,
) -> Result<()> {
    if exists(dir, full)? {
        let full_f = backup(dir, full)?;
        let mut present = Vec::new();
        for i in incs {
            if exists(dir, i)? {
                present.push(backup(dir, i)?);
            }
        }
        if present.is_empty() {
            recover_manifest(&full_f)?;
        } else {
            let refs: Vec<&BackupFile> = present.iter().collect();
            check_before_commit(&full_f, &refs, ctx.checks)?;
            let mut img = open_full_for_writing(&full_f, None)?;
            let mut edit = FullEdit::open(&full_f.path)?;
            for inc in &present {
                commit_inc(&mut img, edit.as_mut(), inc, ctx.rate_limit, ctx.meter)
                    .with_context(|| format!("folding {} into {}", inc.name, full))?;
                // The last INC stays until the FULL carries its name: until then it is
                // the point's only file of that name.
                if Some(&inc.name) != incs.last() {
                    remove_backup(dir, &inc.name)?;
                }
            }
        }
        crash_point();
        relabel_manifest(dir, &full_f, renamed_to)?;
        crash_point();
        dir.rename_noreplace(full, renamed_to).with_context(|| {
            format!(
                "{}: cannot rename to {renamed_to}",
                dir.join(full).display()
            )
        })?;
        dir.sync();
    } else if !exists(dir, renamed_to)? {
        bail!(
            "{}: neither {full} nor {renamed_to} is here any more (removed by hand?); the prune cannot finish this step",
            dir.path().display()
        );
    }
    remove(dir, &manifest_name(full))?;
    for i in incs {
        remove_backup(dir, i)?;
    }
    dir.sync();
    Ok(())
}

/// Writes the manifest of `full` (read beside its name, whether the image is still there or
/// renamed already) under the name `renamed_to`, with that point's time.
fn relabel_manifest(dir: &Dir, full: &BackupFile, renamed_to: &str) -> Result<()> {
    let Some(mut m) = load_manifest(&full.path)? else {
        return Ok(());
    };
    m.header.file = renamed_to.to_string();
    if let Some(o) = m.header.origin.as_mut() {
        let b = backup(dir, renamed_to)?;
        *o = Origin {
            level: o.level,
            time: b.timestamp,
        };
    }
    store(&dir.join(renamed_to), &m)
}

fn fold_into_next(dir: &Dir, removed: &[String], into: &str, ctx: &StepContext<'_>) -> Result<()> {
    let mut all_present = true;
    for r in removed {
        all_present &= exists(dir, r)?;
    }
    if all_present && !removed.is_empty() {
        let below = files_below(dir, into, &removed[0])?;
        let below: Vec<&BackupFile> = below.iter().collect();
        let removed_f: Vec<BackupFile> = removed
            .iter()
            .map(|r| backup(dir, r))
            .collect::<Result<_>>()?;
        let refs: Vec<&BackupFile> = removed_f.iter().collect();
        fold_under(
            &backup(dir, into)?,
            &refs,
            &below,
            ctx.checks,
            ctx.rate_limit,
            ctx.meter,
        )?;
    }
    for r in removed.iter().rev() {
        remove_backup(dir, r)?;
    }
    dir.sync();
    Ok(())
}

/// The files of `into`'s chain in `dir` below `first` (FULL first), as they are now.
fn files_below(dir: &Dir, into: &str, first: &str) -> Result<Vec<BackupFile>> {
    let scanned = DiskDir::scan_lenient(dir.path(), None)?;
    let chain = scanned
        .chains
        .iter()
        .find(|c| c.incs.iter().any(|f| f.name == into))
        .ok_or_else(|| {
            anyhow!(
                "{}: {into} is not in a chain here any more; the prune cannot finish this step",
                dir.path().display()
            )
        })?;
    let files = chain.files();
    let at = files
        .iter()
        .position(|f| f.name == first)
        .ok_or_else(|| anyhow!("{}: {first} is not in {into}'s chain", dir.path().display()))?;
    Ok(files[..at].iter().map(|&f| f.clone()).collect())
}

/// Folding the other way round: the INCs after the oldest removed one (`into` last) are
/// committed into it, which then takes `into`'s name (renamed over it: at every instant
/// the name holds the old or the new file, both reading as the point did), its manifest
/// after it; then the other removed INCs go.
fn commit_into_removed(
    dir: &Dir,
    removed: &[String],
    into: &str,
    ctx: &StepContext<'_>,
) -> Result<()> {
    let Some(oldest) = removed.first() else {
        return Ok(());
    };
    if exists(dir, oldest)? {
        let base = backup(dir, oldest)?;
        let above: Vec<BackupFile> = removed[1..]
            .iter()
            .chain(std::iter::once(&into.to_string()))
            .map(|n| backup(dir, n))
            .collect::<Result<_>>()?;
        let refs: Vec<&BackupFile> = above.iter().collect();
        let below = files_below(dir, into, oldest)?;
        let mut backing = open_stack(below.iter().rev())?;
        // What partial clusters are completed with is read from the older files: checked
        // against their manifests as it is read, as every other read of a fold (the
        // warning for --ignore-checksums was given by check_before_commit).
        if ctx.checks {
            check_reads(&mut backing, true)?;
        }
        check_before_commit(&base, &refs, ctx.checks)?;
        let mut img = open_full_for_writing(&base, None)?;
        let mut edit = FullEdit::open(&base.path)?;
        for inc in &above {
            commit_inc_over(
                &mut img,
                Some(&backing),
                edit.as_mut(),
                inc,
                ctx.rate_limit,
                ctx.meter,
            )
            .with_context(|| format!("committing {} into {oldest}", inc.name))?;
        }
        drop(img);
        if !exists(dir, &manifest_name(oldest))? {
            // The result has no manifest: the kept INC's must not describe it.
            remove(dir, &manifest_name(into))?;
        }
        crash_point();
        dir.rename(oldest, into)
            .with_context(|| format!("{}: cannot rename to {into}", dir.join(oldest).display()))?;
        dir.sync();
    }
    // Renamed: the manifest follows (an interrupted run left it under the old name).
    if exists(dir, &manifest_name(oldest))? {
        crash_point();
        relabel_manifest(dir, &backup(dir, oldest)?, into)?;
        remove(dir, &manifest_name(oldest))?;
    }
    for r in removed[1..].iter().rev() {
        remove_backup(dir, r)?;
    }
    dir.sync();
    Ok(())
}
