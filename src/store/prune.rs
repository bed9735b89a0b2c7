//! Prune: a keep-policy applied to every disk under a backup target (or one disk's
//! directory), the points it does not keep folded into the ones after them
//! ([`crate::store::prune_plan`]), crash-safe through a journal per directory
//! ([`journal`]) and resumable ([`steps`]). `qmprestore prune` and `qmpbackup --keep-*`
//! both run it.

pub mod journal;
pub mod steps;

use crate::fsutil::Dir;
use crate::progress::Reporting;
use crate::report;
use crate::store::chain::BackupChain;
use crate::store::file::BackupFile;
use crate::store::fold::{data_bytes_of, preflight, preflight_writable, CheckOptions};
use crate::store::lock::{lock_dir, DirLock, LockMode};
use crate::store::name::{
    APPEND_LOCK_FILE, CONFIG_SUFFIX, CURRENT_LINK, LOCK_FILE, MANIFEST_SUFFIX, UUID_FILE,
};
use crate::store::prune_plan::{self, Action, PrunePlan};
use crate::store::retention::{KeepPolicy, Zone};
use crate::store::vm::{find_disks_lenient, is_month_folder, layout_dirs, DiskBackups};
use anyhow::{bail, Context, Result};
use journal::Step;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use steps::StepContext;

/// What to prune and how.
#[derive(Debug, Clone, Default)]
pub struct PruneOptions {
    pub policy: KeepPolicy,
    pub zone: Zone,
    /// Print the plan, change nothing.
    pub dry_run: bool,
    /// Only finish what an interrupted prune left; plan nothing new.
    pub resume_only: bool,
    pub check: CheckOptions,
    pub rate_limit: u64,
    /// Only these disks (by name); all when None.
    pub disks: Option<Vec<String>>,
}

/// One disk's part of a prune.
#[derive(Debug, Clone, Serialize)]
pub struct DiskPrune {
    pub disk: String,
    pub dirs: Vec<PathBuf>,
    /// None when the disk is not pruned (see `note` or `error`).
    pub plan: Option<PrunePlan>,
    /// INCs with no FULL before them: left alone.
    pub orphans: Vec<PathBuf>,
    /// Unfinished backups: left alone.
    pub leftovers: Vec<PathBuf>,
    /// Why nothing is done, when that is not an error.
    pub note: Option<String>,
    /// Why this disk cannot be pruned.
    pub error: Option<String>,
}

/// A prune's report: the plan of every disk, then what was done.
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub dir: PathBuf,
    pub policy: String,
    pub utc: bool,
    pub dry_run: bool,
    /// Directories where an interrupted prune was finished first.
    pub resumed: Vec<PathBuf>,
    /// Directories an interrupted prune left unfinished (a dry run does not finish them).
    pub pending: Vec<PathBuf>,
    pub disks: Vec<DiskPrune>,
    /// Month folders removed because no point in them was kept.
    pub removed_folders: Vec<PathBuf>,
}

impl PruneReport {
    /// Whether any disk could not be pruned.
    pub fn failed(&self) -> bool {
        self.disks.iter().any(|d| d.error.is_some())
    }
}

/// Runs a prune of `dir`: finishes interrupted prunes, plans every disk, hands the plan to
/// `show` (before any change), then carries it out. Disks that cannot be pruned are
/// reported in the plan and skipped; an error stops the prune at once.
pub fn prune(
    dir: &Path,
    opts: &PruneOptions,
    reporting: &Reporting,
    show: impl FnOnce(&PruneReport),
) -> Result<PruneReport> {
    if !opts.resume_only && opts.policy.is_empty() {
        bail!(
            "no keep option given: a prune would remove every point but the newest. Say what to keep, e.g. --keep-daily 7 --keep-weekly 4 --keep-monthly 6 (or --keep-last N)"
        );
    }
    let layout = layout_dirs(dir)?;
    let mode = if opts.dry_run {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    let _locks = lock_all(&layout, mode)?;
    let mut report = PruneReport {
        dir: dir.to_path_buf(),
        policy: opts.policy.describe(),
        utc: opts.zone == Zone::Utc,
        dry_run: opts.dry_run,
        resumed: Vec::new(),
        pending: Vec::new(),
        disks: Vec::new(),
        removed_folders: Vec::new(),
    };
    let meter_total = Arc::new(reporting.meter("prune", 0));
    let ctx = StepContext {
        checks: !opts.check.ignore_checksums,
        rate_limit: opts.rate_limit,
        meter: &meter_total,
    };
    for (path, _) in &layout {
        let d = open_dir(path)?;
        let Some(steps) = journal::read(&d)? else {
            continue;
        };
        if opts.dry_run {
            report.pending.push(path.clone());
            continue;
        }
        report::info(format!(
            "{}: finishing an interrupted prune ({} step(s))",
            path.display(),
            steps.len()
        ));
        for s in &steps {
            steps::take(&d, s, &ctx).with_context(|| resume_hint(dir))?;
        }
        journal::remove(&d)?;
        report.resumed.push(path.clone());
    }
    if opts.resume_only {
        show(&report);
        return Ok(report);
    }
    let disks = find_disks_lenient(dir)?;
    for (name, backups) in disks {
        if opts
            .disks
            .as_ref()
            .is_some_and(|only| !only.contains(&name))
        {
            continue;
        }
        let pending = backups.dirs.iter().any(|d| report.pending.contains(d));
        let mut planned = plan_disk(name, backups, opts);
        if pending {
            planned.plan = None;
            planned.note = Some(
                "an interrupted prune is unfinished here: the plan is shown once it is finished (run without --dry-run, or with --resume)".into(),
            );
        }
        report.disks.push(planned);
    }
    show(&report);
    if opts.dry_run {
        return Ok(report);
    }
    for d in &report.disks {
        let Some(plan) = d.plan.as_ref().filter(|p| !p.is_noop()) else {
            continue;
        };
        carry_out(dir, plan, opts, reporting, &ctx)?;
    }
    meter_total.finish();
    report.removed_folders = remove_emptied_months(dir, &layout)?;
    Ok(report)
}

fn resume_hint(dir: &Path) -> String {
    format!(
        "the prune stopped part-way; every kept point still restores right, and the directories it was changing are refused by other commands until `qmprestore prune --dir {} --resume` (or any prune of it) finishes the job",
        dir.display()
    )
}

fn open_dir(path: &Path) -> Result<Dir> {
    Dir::open(path).with_context(|| format!("{}: cannot open", path.display()))
}

/// Locks the chain roots and every directory holding backups (or a journal), all before
/// anything is read for the plan; the first one held by someone else stops the prune.
fn lock_all(layout: &[(PathBuf, bool)], mode: LockMode) -> Result<Vec<DirLock>> {
    let mut locks = Vec::new();
    for (path, is_root) in layout {
        if *is_root || holds_backup_files(path)? {
            locks.push(lock_dir(path, mode)?);
        }
    }
    Ok(locks)
}

/// Whether `dir` holds anything named like a backup, or a prune journal.
fn holds_backup_files(dir: &Path) -> Result<bool> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot read", dir.display()))?;
    for e in entries.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if crate::store::name::looks_like_backup(n.as_bytes())
            || n == crate::store::name::PRUNE_JOURNAL
            || n.ends_with(MANIFEST_SUFFIX)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// One disk's plan, or why it has none.
fn plan_disk(disk: String, b: DiskBackups, opts: &PruneOptions) -> DiskPrune {
    let mut out = DiskPrune {
        disk,
        dirs: b.dirs.clone(),
        plan: None,
        orphans: b.orphans.iter().map(|f| f.path.clone()).collect(),
        leftovers: b.leftovers.clone(),
        note: None,
        error: None,
    };
    let untimed: Vec<String> = b
        .chains
        .iter()
        .flat_map(|(_, c)| c.files())
        .chain(b.copies.iter())
        .filter(|f| f.untimestamped)
        .map(|f| f.path.display().to_string())
        .collect();
    if !untimed.is_empty() {
        out.error = Some(format!(
            "{}: written with --no-timestamp, so the time of the point is not in the name; prune keeps points by the time in their names and leaves this disk alone. Remove old backups of it by hand, or start a new target without --no-timestamp",
            untimed.join(", ")
        ));
        return out;
    }
    let mut chains: Vec<BackupChain> = b.chains.into_iter().map(|(_, c)| c).collect();
    chains.sort_by_key(|c| (c.full.timestamp, c.full.name.clone()));
    if chains.is_empty() && b.copies.is_empty() {
        out.note = Some("no FULL backup: nothing to prune".into());
        return out;
    }
    match snapshotted_full(&chains) {
        Ok(Some(full)) => {
            out.note = Some(format!(
                "{full} holds its points as internal snapshots (after snapshotrebase): nothing to prune here; prune works on FULL+INC chains"
            ));
            return out;
        }
        Ok(None) => {}
        Err(e) => {
            out.error = Some(format!("{e:#}"));
            return out;
        }
    }
    let mut copies = b.copies;
    copies.sort_by_key(|f| (f.timestamp, f.name.clone()));
    let plan = prune_plan::plan(&chains, &copies, &opts.policy, opts.zone);
    if !plan.is_noop() {
        if let Err(e) = preflight_plan(&chains, &plan, &opts.check) {
            out.error = Some(format!("{e:#}"));
            return out;
        }
    }
    out.plan = Some(plan);
    out
}

/// The FULL (by name) of a chain whose FULL holds internal snapshots, if any.
fn snapshotted_full(chains: &[BackupChain]) -> Result<Option<String>> {
    for c in chains {
        let q = qcow2::Qcow2::open(&c.full.path)
            .with_context(|| format!("{}: cannot open", c.full.path.display()))?;
        if q.header().nb_snapshots > 0 {
            return Ok(Some(c.full.name.clone()));
        }
    }
    Ok(None)
}

/// Before anything is written: the chains a fold changes pass the checks every command
/// makes (structure, sizes, one bitmap uuid), and the files changed in place can be.
fn preflight_plan(chains: &[BackupChain], plan: &PrunePlan, check: &CheckOptions) -> Result<()> {
    for a in &plan.actions {
        let changed: &BackupFile = match a {
            Action::FoldIntoFull { full, .. } => full,
            Action::FoldIntoNext { into, .. } => into,
            Action::Remove { .. } => continue,
        };
        let chain = chains
            .iter()
            .find(|c| c.files().iter().any(|f| f.path == changed.path))
            .expect("planned from these chains");
        preflight(chain, check)?;
        preflight_writable(&[changed])?;
    }
    Ok(())
}

/// The steps of a plan, by directory (in the plan's order within each).
fn steps_by_dir(plan: &PrunePlan) -> Result<BTreeMap<PathBuf, Vec<Step>>> {
    let mut out: BTreeMap<PathBuf, Vec<Step>> = BTreeMap::new();
    let dir_of = |f: &BackupFile| f.path.parent().map(Path::to_path_buf).unwrap_or_default();
    for a in &plan.actions {
        match a {
            Action::FoldIntoFull {
                full,
                incs,
                renamed_to,
            } => out
                .entry(dir_of(full))
                .or_default()
                .push(Step::FoldIntoFull {
                    full: full.name.clone(),
                    incs: incs.iter().map(|f| f.name.clone()).collect(),
                    renamed_to: renamed_to.clone(),
                }),
            Action::FoldIntoNext { removed, into } => {
                out.entry(dir_of(into))
                    .or_default()
                    .push(Step::FoldIntoNext {
                        removed: removed.iter().map(|f| f.name.clone()).collect(),
                        into: into.name.clone(),
                        by_commit: commit_writes_less(removed, into)?,
                    })
            }
            Action::Remove { files } => {
                let mut by_dir: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
                for f in files.iter().rev() {
                    by_dir.entry(dir_of(f)).or_default().push(f.name.clone());
                }
                for (d, files) in by_dir {
                    out.entry(d).or_default().push(Step::Remove { files });
                }
            }
        }
    }
    Ok(out)
}

/// Whether folding `removed` into `into` writes less the other way round: committing the
/// INCs after the oldest removed one (`into` included) into it, against filling `into`
/// with what the removed INCs hold and it does not.
fn commit_writes_less(removed: &[BackupFile], into: &BackupFile) -> Result<bool> {
    // The oldest removed INC is changed in place then: it must be writable (checked now,
    // as the plan's files were), and must not cost the kept point its manifest.
    let oldest = &removed[0];
    let has_manifest = |f: &BackupFile| crate::store::manifest::manifest_path(&f.path).exists();
    if preflight_writable(&[oldest]).is_err() || (has_manifest(into) && !has_manifest(oldest)) {
        return Ok(false);
    }
    let refs: Vec<&BackupFile> = removed.iter().collect();
    let fill = crate::store::fold::fold_under_bytes(into, &refs)?;
    let commit = data_bytes_of(removed[1..].iter().chain(std::iter::once(into)))?;
    Ok(commit < fill)
}

/// Carries out one disk's plan: every directory's journal written first, then each
/// directory's steps, its journal removed when they are done.
fn carry_out(
    top: &Path,
    plan: &PrunePlan,
    opts: &PruneOptions,
    reporting: &Reporting,
    ctx: &StepContext<'_>,
) -> Result<()> {
    let by_dir = steps_by_dir(plan)?;
    let total = fold_bytes(plan)?;
    let meter = Arc::new(reporting.meter("prune", total));
    let ctx = StepContext {
        checks: ctx.checks,
        rate_limit: opts.rate_limit,
        meter: &meter,
    };
    let mut dirs = Vec::new();
    for (path, steps) in &by_dir {
        let d = open_dir(path)?;
        journal::write(&d, steps).with_context(|| resume_hint(top))?;
        dirs.push((d, steps));
    }
    for (d, steps) in &dirs {
        for s in steps.iter() {
            describe(d.path(), s);
            steps::take(d, s, &ctx).with_context(|| resume_hint(top))?;
        }
        journal::remove(d).with_context(|| resume_hint(top))?;
    }
    let (bytes, seconds) = meter.finish();
    reporting.event(serde_json::json!({"event": "summary", "summary": {
        "bytes_written": bytes, "seconds": seconds}}));
    Ok(())
}

fn describe(dir: &Path, s: &Step) {
    let msg = match s {
        Step::FoldIntoFull {
            full,
            incs,
            renamed_to,
        } => format!(
            "folding {} into {full}, renamed {renamed_to}",
            incs.join(", ")
        ),
        Step::FoldIntoNext {
            removed,
            into,
            by_commit: false,
        } => format!("folding {} into {into}", removed.join(", ")),
        Step::FoldIntoNext {
            removed,
            into,
            by_commit: true,
        } => format!(
            "folding {} into {into} (committing the newer ones into {}, which writes less, then renaming it {into})",
            removed.join(", "),
            removed[0]
        ),
        Step::Remove { files } => format!("removing {}", files.join(", ")),
    };
    report::info(format!("{}: {msg}", dir.display()));
}

/// The data a plan's folds move, for the progress meter.
fn fold_bytes(plan: &PrunePlan) -> Result<u64> {
    let mut total = 0;
    for a in &plan.actions {
        total += match a {
            Action::FoldIntoFull { incs, .. } => data_bytes_of(incs)?,
            Action::FoldIntoNext { removed, .. } => data_bytes_of(removed)?,
            Action::Remove { .. } => 0,
        };
    }
    Ok(total)
}

/// Month folders of a target left without any backup (but the newest, which a running
/// chain may be about to use): their side files (uuid, locks, configs, stray manifests)
/// and empty disk directories removed, then the folder; `current` pointed at the newest
/// month if it pointed at a removed one. A folder holding anything else is left, with a
/// warning.
fn remove_emptied_months(target: &Path, layout: &[(PathBuf, bool)]) -> Result<Vec<PathBuf>> {
    let months: Vec<&PathBuf> = layout
        .iter()
        .filter(|(p, root)| {
            *root
                && p.as_path() != target
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_month_folder)
        })
        .map(|(p, _)| p)
        .collect();
    let mut removed = Vec::new();
    let Some((newest, older)) = months.split_last() else {
        return Ok(removed);
    };
    for m in older {
        if !std::fs::symlink_metadata(m).is_ok_and(|s| s.is_dir()) {
            continue;
        }
        match emptied(m)? {
            Some(true) => {
                remove_side_tree(m)?;
                report::info(format!("{}: no backups left; removed", m.display()));
                removed.push(m.to_path_buf());
            }
            Some(false) => report::warn(format!(
                "{}: no backups left, but it holds other files; left as it is",
                m.display()
            )),
            None => {}
        }
    }
    if !removed.is_empty() {
        let t = open_dir(target)?;
        if let Ok(link) = std::fs::read_link(target.join(CURRENT_LINK)) {
            if !target.join(&link).exists() {
                let name = newest.file_name().and_then(|n| n.to_str()).unwrap_or("");
                t.replace_symlink(name, CURRENT_LINK).with_context(|| {
                    format!("{}: cannot update", target.join(CURRENT_LINK).display())
                })?;
            }
        }
    }
    Ok(removed)
}

/// Whether a month folder holds no backups: None when it does, Some(true) when only side
/// files remain (removable), Some(false) when other files remain.
fn emptied(month: &Path) -> Result<Option<bool>> {
    let mut only_side = true;
    for e in
        std::fs::read_dir(month).with_context(|| format!("{}: cannot read", month.display()))?
    {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let t = e.file_type()?;
        if t.is_dir() {
            match emptied(&e.path())? {
                None => return Ok(None),
                Some(false) => only_side = false,
                Some(true) => {}
            }
        } else if crate::store::name::looks_like_backup(name.as_bytes()) {
            return Ok(None);
        } else if !is_removable_side_file(&name) {
            only_side = false;
        }
    }
    Ok(Some(only_side))
}

fn is_removable_side_file(name: &str) -> bool {
    name == UUID_FILE
        || name == LOCK_FILE
        || name == APPEND_LOCK_FILE
        || name.ends_with(CONFIG_SUFFIX)
        || name.ends_with(MANIFEST_SUFFIX)
}

/// Removes a directory tree holding only side files (checked by [`emptied`]).
fn remove_side_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot read", dir.display()))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            remove_side_tree(&e.path())?;
        } else {
            std::fs::remove_file(e.path())
                .with_context(|| format!("{}: cannot remove", e.path().display()))?;
        }
    }
    std::fs::remove_dir(dir).with_context(|| format!("{}: cannot remove", dir.display()))
}

impl PruneReport {
    /// The plan (and what was finished or left), for people.
    pub fn human(&self) -> String {
        use crate::store::prune_plan::Reason;
        let mut s = String::new();
        let zone = if self.utc { "UTC" } else { "local time" };
        s.push_str(&format!(
            "{}{}: {} (periods in {zone})\n",
            if self.dry_run { "dry run: " } else { "" },
            self.dir.display(),
            if self.policy.is_empty() {
                "finishing interrupted prunes only"
            } else {
                &self.policy
            }
        ));
        for p in &self.resumed {
            s.push_str(&format!(
                "  finished the interrupted prune of {}\n",
                p.display()
            ));
        }
        for p in &self.pending {
            s.push_str(&format!(
                "  {}: an interrupted prune is unfinished here; a run without --dry-run finishes it first\n",
                p.display()
            ));
        }
        let time = |t: u64| crate::humanize::format_utc(t as i64);
        let reason = |r: Reason| match r {
            Reason::Kept(rule) => rule.option().to_string(),
            Reason::Newest => "newest (the next incremental continues from it)".to_string(),
            Reason::NotKept => String::new(),
        };
        for d in &self.disks {
            let dirs: Vec<String> = d.dirs.iter().map(|p| p.display().to_string()).collect();
            s.push_str(&format!("{} ({}):\n", d.disk, dirs.join(", ")));
            if let Some(e) = &d.error {
                s.push_str(&format!("  not pruned: {e}\n"));
            }
            if let Some(n) = &d.note {
                s.push_str(&format!("  {n}\n"));
            }
            if let Some(plan) = &d.plan {
                for p in plan.points.iter().chain(&plan.copies) {
                    s.push_str(&format!(
                        "  {:<6}  {:<4}  {} UTC  {}  {}\n",
                        if p.reason.is_kept() { "keep" } else { "remove" },
                        p.file.level.prefix(),
                        time(p.file.timestamp),
                        p.file.name,
                        reason(p.reason)
                    ));
                }
                if plan.is_noop() {
                    s.push_str("  nothing to prune: the policy keeps every point\n");
                }
                for a in &plan.actions {
                    let names = |v: &[BackupFile]| {
                        v.iter()
                            .map(|f| f.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    let line = match a {
                        Action::FoldIntoFull {
                            full,
                            incs,
                            renamed_to,
                        } => format!(
                            "fold {} into {}, which becomes {renamed_to}",
                            names(incs),
                            full.name
                        ),
                        Action::FoldIntoNext { removed, into } => {
                            format!("fold {} into {}", names(removed), into.name)
                        }
                        Action::Remove { files } => format!("remove {}", names(files)),
                    };
                    s.push_str(&format!("  - {line}\n"));
                }
            }
            for o in &d.orphans {
                s.push_str(&format!(
                    "  left alone: {} (an incremental with no FULL before it)\n",
                    o.display()
                ));
            }
            for l in &d.leftovers {
                s.push_str(&format!(
                    "  left alone: {} (what an interrupted backup left; `qmpbackup cleanup` or the next backup deals with it)\n",
                    l.display()
                ));
            }
        }
        for m in &self.removed_folders {
            s.push_str(&format!("removed {} (no backups left)\n", m.display()));
        }
        s
    }
}
