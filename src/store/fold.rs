//! Changing backup files in place, safely: the checks every command that changes (or
//! reads) a chain makes before its first write, and the commit of an INC into the file
//! below it with its manifest kept true (by CRC deltas, see `manifest::delta`). Shared by
//! the restore commands and prune (which `qmpbackup` runs too).

use crate::progress::Meter;
use crate::report;
use crate::store::chain::BackupChain;
use crate::store::file::BackupFile;
use crate::store::manifest;
use crate::store::manifest::check::ManifestCheck;
use crate::store::manifest::edit::{self, FullEdit};
use crate::store::manifest::runs::allocated_spans;
use crate::store::manifest::verify::verify_manifest;
use anyhow::{bail, Context, Result};
use qcow2::ops::commit::{commit_alone_into, commit_into_except};
use qcow2::ops::copy::source::for_each_gap;
use qcow2::ops::throttle::Throttle;
use qcow2::repair::{repair, RepairMode};
use qcow2::OpenRwOptions;
use qcow2::{check, Format, OpenOptions, Qcow2};
use std::sync::Arc;

/// How backup files are checked before they are used (flags of every command).
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct CheckOptions {
    /// Skip the structural check of each image before restoring (faster; not advised).
    #[arg(long, global = true)]
    pub skip_check: bool,
    /// Read backup files even while another process (a running QEMU, qemu-img) holds them
    /// open for writing. Without it such a file is refused: it could be read torn.
    #[arg(long, global = true)]
    pub force_share: bool,
    /// Restore without checking backup data against its checksum manifests: for a rescue
    /// when a backup is known damaged and its data is wanted as it is. Rot in the backups
    /// then goes into the restored disk unnoticed.
    #[arg(long, global = true)]
    pub ignore_checksums: bool,
}

pub fn open_alone(f: &BackupFile) -> Result<qcow2::Chain> {
    qcow2::Chain::open(
        &f.path,
        &OpenOptions {
            format: Some(Format::Qcow2),
            no_backing: true,
        },
    )
    .context("cannot open backup file")
}

/// Stale COPIED flags (what an interrupted snapshot operation leaves, as QEMU's does) do not
/// affect reading: warned about, not a reason to stop. Commands that change the file repair
/// them first.
pub fn tolerable_stale_flags(f: &BackupFile, r: &check::CheckReport) -> bool {
    let stale = r.only_stale_copied_flags();
    if stale {
        report::warn(format!(
            "{}: {} stale COPIED flag(s), as an interrupted snapshot operation leaves them: harmless for reading; commands that change the file repair them first",
            f.path.display(),
            r.corruptions
        ));
    }
    stale
}

/// Checks every file of the chain before anything is written: each must open and pass a
/// structural check, virtual sizes must not shrink, and manifests (where present) must name
/// the same bitmap uuid. Returns the FULL's check report (None with `skip_check`), so a
/// command that changes the FULL need not check it again.
pub fn preflight(chain: &BackupChain, opts: &CheckOptions) -> Result<Option<check::CheckReport>> {
    for f in chain.files() {
        refuse_in_use(f, opts.force_share)?;
    }
    preflight_files(chain, opts.skip_check, opts.ignore_checksums)
}

/// [`preflight`] without the in-use check. With `tolerate_bad_manifests`, a manifest that
/// cannot be read does not stop it (verify reports it for its file).
pub fn preflight_files(
    chain: &BackupChain,
    skip_check: bool,
    tolerate_bad_manifests: bool,
) -> Result<Option<check::CheckReport>> {
    let mut full_report = None;
    let mut prev_size = 0u64;
    let mut uuid: Option<(String, String)> = None;
    for f in chain.files() {
        let c = open_alone(f)?;
        let size = c.virtual_size();
        if size < prev_size {
            bail!(
                "{}: virtual size {size} is smaller than the previous backup's ({prev_size}); the chain is inconsistent",
                f.path.display()
            );
        }
        prev_size = size;
        if !skip_check {
            let q = c.top().as_qcow2().expect("qcow2");
            let r = check::check(q).context("cannot check")?;
            if (r.corruptions > 0 || r.check_errors > 0) && !tolerable_stale_flags(f, &r) {
                bail!(
                    "{}: damaged image ({} errors: {}); nothing was changed. Restore up to the previous point with --until, or check the file with `qcow2 check`",
                    f.path.display(),
                    r.corruptions + r.check_errors,
                    r.messages.first().cloned().unwrap_or_default()
                );
            }
            if r.leaks > 0 {
                report::warn(format!(
                    "{}: {} leaked clusters (wasted space, no harm to data)",
                    f.path.display(),
                    r.leaks
                ));
            }
            if full_report.is_none() {
                full_report = Some(r);
            }
        }
        let m = match manifest::read_manifest(&f.path) {
            Err(_) if tolerate_bad_manifests => None,
            other => other?,
        };
        if let Some(m) = m {
            if let Some(u) = m.uuid {
                match &uuid {
                    Some((first, name)) if *first != u => bail!(
                        "{}: taken with bitmap uuid {u}, but {name} with {first}: these files are not one chain",
                        f.path.display()
                    ),
                    Some(_) => {}
                    None => uuid = Some((u, f.name.clone())),
                }
            }
        }
    }
    Ok(full_report)
}

/// A backup file another process is writing (QEMU's write lock is held on it) would be read
/// torn: refused unless `--force-share`.
pub fn refuse_in_use(f: &BackupFile, force_share: bool) -> Result<()> {
    if !qcow2::lock::path_has_writer(&f.path) {
        return Ok(());
    }
    if force_share {
        report::warn(format!(
            "{}: in use for writing by another process; reading it anyway (--force-share)",
            f.path.display()
        ));
        return Ok(());
    }
    bail!(
        "{}: in use for writing by another process (a running QEMU, qemu-img or qemu-io?); reading it now could give a torn image. Nothing was changed: wait until it is done, or pass --force-share to read it anyway",
        f.path.display()
    )
}

/// A backup file that a command changes in place must be a regular file in the backup
/// directory, not a symlink to a file elsewhere (which someone with write access to the
/// directory could have planted).
pub fn refuse_symlink(f: &BackupFile) -> Result<()> {
    let m = std::fs::symlink_metadata(&f.path)
        .with_context(|| format!("{}: cannot read", f.path.display()))?;
    if !m.file_type().is_file() {
        bail!(
            "{}: not a regular file (a symlink?); this command changes backup files in place and only does so to files in the backup directory itself. Nothing was changed",
            f.path.display()
        );
    }
    Ok(())
}

/// Before a command changes `f` in place: it must be writable as an image (not flagged
/// corrupt, no external data file), so the command cannot stop half-way for a reason known
/// in advance.
pub fn refuse_unwritable(f: &BackupFile, img: &Qcow2) -> Result<()> {
    let h = img.header();
    if h.is_corrupt() {
        bail!(
            "{}: marked corrupt; nothing was changed. Repair it first with `qcow2 check -r all {}`, or restore with `qmprestore merge`, which only reads",
            f.path.display(),
            f.path.display()
        );
    }
    if h.has_data_file() {
        bail!(
            "{}: has an external data file, which this command cannot change in place; nothing was changed (use `qmprestore merge`)",
            f.path.display()
        );
    }
    Ok(())
}

/// [`refuse_unwritable`] for each of `files`, all before the first change.
pub fn preflight_writable(files: &[&BackupFile]) -> Result<()> {
    for f in files {
        refuse_symlink(f)?;
        let img = Qcow2::open(&f.path).context("cannot open backup file")?;
        refuse_unwritable(f, &img)?;
    }
    Ok(())
}

/// Opens the FULL for an in-place change, refusing one that cannot be written. What an
/// interrupted earlier run may have left — leaked clusters, the lazy-refcounts dirty bit,
/// stale COPIED flags — is repaired first, as QEMU repairs a dirty image when it opens it,
/// so the finished FULL checks clean. `checked` is preflight's report of the FULL, if any.
pub fn open_full_for_writing(
    full: &BackupFile,
    checked: Option<check::CheckReport>,
) -> Result<Qcow2> {
    let path = &full.path;
    refuse_symlink(full)?;
    let (dirty, leaks, stale_flags) = {
        let img = Qcow2::open(path).context("cannot open backup file")?;
        refuse_unwritable(full, &img)?;
        let report = match checked {
            Some(r) => r,
            None => check::check(&img).context("cannot check")?,
        };
        (
            img.header().is_dirty(),
            report.leaks,
            report.only_stale_copied_flags(),
        )
    };
    if dirty || leaks > 0 || stale_flags {
        let mode = if dirty || stale_flags {
            RepairMode::All
        } else {
            RepairMode::Leaks
        };
        let r = repair(path, mode).context("repair failed")?;
        report::info(format!(
            "{}: repaired what an interrupted run left ({} leaked cluster(s){})",
            full.name,
            r.leaks_fixed,
            if dirty || stale_flags {
                ", refcounts and COPIED flags recomputed"
            } else {
                ""
            }
        ));
    }
    Ok(Qcow2::open_rw(path, OpenRwOptions::default())?)
}

/// Says loudly that checksums are off (`--ignore-checksums`).
pub fn warn_unchecked() {
    report::warn(
        "--ignore-checksums: backup data is NOT checked against its checksum manifests; bit rot in the backups goes into the result unnoticed",
    );
}

/// Says that `file` is read without checks: it has no manifest.
pub fn warn_no_manifest(file: &str) {
    report::warn(format!(
        "{file}: no checksum manifest (a backup made before manifests existed?): its data is not checked"
    ));
}

/// Before a commit changes the FULL: every INC to be committed is re-read whole and checked
/// against its manifest (a pre-pass, small next to the FULL), so rot in an INC never
/// reaches the FULL; then the FULL's blocks the INCs change in part, so rot there is not
/// blessed with a new checksum. What an interrupted commit left is repaired first.
pub fn check_before_commit(full: &BackupFile, incs: &[&BackupFile], checks: bool) -> Result<()> {
    recover_manifest(full)?;
    if !checks {
        warn_unchecked();
        return Ok(());
    }
    for inc in incs {
        match verify_manifest(&inc.path) {
            Ok(Some(_)) => {}
            Ok(None) => warn_no_manifest(&inc.name),
            Err(e) => {
                return Err(e.context(format!(
                    "{} failed its checksum check; the full backup was not changed. `qmprestore verify` lists every damaged file; --until stops before this point, and --ignore-checksums commits the data as it is",
                    inc.name
                )))
            }
        }
    }
    let chains = incs
        .iter()
        .map(|f| open_alone(f))
        .collect::<Result<Vec<_>>>()?;
    edit::check_full(&full.path, &chains).with_context(|| {
        format!(
            "{}: checksum check failed. `qmprestore verify` reports every damaged file; --ignore-checksums commits anyway",
            full.name
        )
    })
}

/// Commits one INC into the FULL, keeping the FULL's manifest (`edit`, when it has one)
/// true (only what changes is read); a FULL grown by the commit reads zeros past its old
/// size, as the linked chain does.
pub fn commit_inc(
    full: &mut Qcow2,
    edit: Option<&mut FullEdit>,
    inc: &BackupFile,
    rate_limit: u64,
    meter: &Arc<Meter>,
) -> Result<()> {
    commit_inc_over(full, None, edit, inc, rate_limit, meter)
}

/// [`commit_inc`] into a file that is itself above `backing` (an INC): what a partial
/// cluster write into it does not cover comes from there.
pub fn commit_inc_over(
    full: &mut Qcow2,
    backing: Option<&qcow2::Chain>,
    mut edit: Option<&mut FullEdit>,
    inc: &BackupFile,
    rate_limit: u64,
    meter: &Arc<Meter>,
) -> Result<()> {
    let inc_chain = open_alone(inc)?;
    if let Some(edit) = edit.as_deref_mut() {
        edit.begin(&inc_chain, full.virtual_size(), full.cluster_size())?;
    }
    full.grow_zeroing_tail(inc_chain.virtual_size())?;
    let meter = meter.clone();
    let mut throttle = Throttle::new(rate_limit).with_meter(Box::new(move |n| meter.add(n)));
    commit_alone_into(
        full,
        qcow2::chain::as_backing(backing),
        &inc_chain,
        &mut throttle,
    )
    .with_context(|| format!("committing {} into the file below it", inc.name))?;
    full.flush()?;
    if let Some(edit) = edit {
        edit.finish()?;
    }
    Ok(())
}

/// What an interrupted commit left in the FULL's manifest is repaired before anything else.
pub fn recover_manifest(full: &BackupFile) -> Result<()> {
    if let Some(bytes) = edit::recover(&full.path)? {
        report::warn(format!(
            "{}: an interrupted commit had changed some blocks; their checksums ({}) were recomputed from the file as it is now",
            full.name,
            report::bytes(bytes)
        ));
    }
    Ok(())
}

pub fn interrupted_hint(full: &BackupFile, inc: &BackupFile, cmd: &str) -> String {
    format!(
        "{} now holds part of {}; the remaining INC files are untouched: run `qmprestore {cmd}` with the same arguments again to finish",
        full.name, inc.name
    )
}

/// Folds the INCs `removed` (oldest first), which lie directly under the INC `into`, into
/// it: `into` takes every change of theirs it does not overwrite itself (data as data,
/// zero clusters as zero clusters), so that on `below` (the chain's files under them,
/// FULL first) it alone reads as the whole stack did. `into`'s own clusters are never
/// written, so at any instant it reads the same as before on the stack (a crash may leak
/// clusters, never change what it reads); its manifest is kept true from what is
/// written. The caller removes the folded files afterwards. Running it again after an
/// interruption writes only what is still missing.
pub fn fold_under(
    into: &BackupFile,
    removed: &[&BackupFile],
    below: &[&BackupFile],
    checks: bool,
    rate_limit: u64,
    meter: &Arc<Meter>,
) -> Result<()> {
    recover_manifest(into)?;
    let mut stack = open_stack(removed.iter().rev().chain(below.iter().rev()).copied())?;
    let keep = own_allocation(into)?;
    let changed = changes_above(&stack, removed.len(), &keep)?;
    if changed.is_empty() {
        return Ok(());
    }
    // Every block read from the stack is checked against its file's manifest as it is
    // read, by the commit and by the manifest's update alike.
    check_reads(&mut stack, checks)?;
    let by_delta = whole_clusters(&stack, removed.len(), into)?;
    if checks && by_delta {
        edit::check_recorded_allocation(&into.path, &changed)?;
    } else if checks {
        edit::check_blocks(&into.path, &changed)?;
    }
    let mut img = open_full_for_writing(into, None)?;
    let mut edit = FullEdit::open(&into.path)?;
    if let Some(edit) = edit.as_mut() {
        if by_delta {
            let spans: Vec<(u64, u64, bool)> =
                changed.iter().map(|r| (r.start, r.end, true)).collect();
            edit.begin_changes(&spans, |pos, buf| Ok(stack.read_at(buf, pos)?))?;
        } else {
            edit.begin_ranges(&changed, img.virtual_size())?;
        }
    }
    let meter = meter.clone();
    let mut throttle = Throttle::new(rate_limit).with_meter(Box::new(move |n| meter.add(n)));
    commit_into_except(
        &mut img,
        qcow2::chain::as_backing(Some(&stack)),
        &stack,
        removed.len(),
        &keep,
        &mut throttle,
    )
    .with_context(|| format!("folding into {}", into.name))?;
    img.flush()?;
    drop(img);
    if let Some(edit) = edit.as_mut() {
        edit.finish()?;
    }
    Ok(())
}

/// Whether the folded layers (the top `above` of `stack`) and `into` share one cluster
/// size without subclusters: the fold then writes whole clusters of `into` where it had
/// none, and its manifest is updated from the data written alone.
fn whole_clusters(stack: &qcow2::Chain, above: usize, into: &BackupFile) -> Result<bool> {
    let target = open_alone(into)?;
    Ok(stack.layers()[..above].iter().all(|l| {
        manifest::delta::applies_layers(l, target.top())
            && l.virtual_size() == target.virtual_size()
    }))
}

/// What the top `above` layers of `stack` hold (data and zero clusters) outside `keep`
/// (sorted, disjoint), merged.
fn changes_above(
    stack: &qcow2::Chain,
    above: usize,
    keep: &[std::ops::Range<u64>],
) -> Result<Vec<std::ops::Range<u64>>> {
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    stack.for_each_extent_above(0, stack.virtual_size(), above, |e| {
        if e.depth < above && e.present() {
            for_each_gap(keep, e.start, e.end(), |a, b| {
                match out.last_mut() {
                    Some(l) if l.end == a => l.end = b,
                    _ => out.push(a..b),
                }
                Ok(())
            })?;
        }
        Ok(())
    })?;
    Ok(out)
}

/// The files (newest first) as one stack, each opened alone and layered in that order.
pub fn open_stack<'a>(files: impl Iterator<Item = &'a BackupFile>) -> Result<qcow2::Chain> {
    let mut layers = Vec::new();
    for f in files {
        let q = Qcow2::open(&f.path).context("cannot open backup file")?;
        layers.push(qcow2::chain::Layer::Qcow2(Box::new(q)));
    }
    Ok(qcow2::Chain::from_layers(layers)?)
}

/// Makes every block read from a stack of backup files checked against the file's
/// manifest (`checks`; else says loudly that nothing is checked). Files without one are
/// named in a warning.
pub fn check_reads(stack: &mut qcow2::Chain, checks: bool) -> Result<()> {
    if !checks {
        warn_unchecked();
        return Ok(());
    }
    let (check, unchecked) = ManifestCheck::for_chain(stack)?;
    for path in unchecked {
        warn_no_manifest(&path);
    }
    stack.set_read_check(Arc::new(check));
    Ok(())
}

/// The guest data bytes the files hold themselves: what committing or folding them moves.
pub fn data_bytes_of<'a>(files: impl IntoIterator<Item = &'a BackupFile>) -> Result<u64> {
    let mut total = 0;
    for f in files {
        total += qcow2::ops::map::data_bytes(&open_alone(f)?)?;
    }
    Ok(total)
}

/// What a backup file holds itself (data and zero clusters), merged.
fn own_allocation(f: &BackupFile) -> Result<Vec<std::ops::Range<u64>>> {
    let alone = open_alone(f)?;
    allocated_spans(&alone, 0, alone.virtual_size())
}

/// What [`fold_under`] would write into `into` for `removed` (newest first).
pub fn fold_under_bytes(into: &BackupFile, removed: &[&BackupFile]) -> Result<u64> {
    let stack = open_stack(removed.iter().rev().copied())?;
    let keep = own_allocation(into)?;
    Ok(changes_above(&stack, removed.len(), &keep)?
        .iter()
        .map(|r| r.end - r.start)
        .sum())
}
