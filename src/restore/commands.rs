//! The restore commands: rebase, commit, merge, snapshotrebase, verify, list.

use crate::fsutil::Dir;
use crate::progress::{Meter, Reporting};
use crate::report;
use crate::restore::options::{CheckOptions, Common};
use crate::store::chain::BackupChain;
use crate::store::disk_dir::DiskDir;
use crate::store::file::BackupFile;
use crate::store::fold::{
    self, check_before_commit, commit_inc, interrupted_hint, open_alone, open_full_for_writing,
    preflight, preflight_files, preflight_writable, refuse_in_use, tolerable_stale_flags,
};
use crate::store::level::BackupLevel;
use crate::store::lock::{self, DirLock, LockMode};
use crate::store::manifest;
use crate::store::manifest::edit::{self, FullEdit};
use crate::store::manifest::verify::verify_manifest;
use anyhow::{bail, Context, Result};
use qcow2::ops::rebase::{rebase as qcow2_rebase, RebaseOptions};
use qcow2::{check, Format, Qcow2};
use serde::Serialize;
use std::sync::Arc;

/// The chain a command works on: the newest FULL and its INCs, cut at `--until`.
pub fn select_chain(c: &Common) -> Result<(DiskDir, BackupChain)> {
    let dir = DiskDir::scan(&c.source.dir, c.source.filter.as_deref())?;
    if c.until.is_some() {
        let chain = dir.chain_until(c.until.as_deref())?;
        return Ok((dir, chain));
    }
    let latest = dir.latest()?.clone();
    if dir.chains.len() > 1 {
        report::info(format!(
            "{} holds {} chains; using the newest, {} and the {} incremental(s) after it",
            c.source.dir.display(),
            dir.chains.len(),
            latest.full.name,
            latest.incs.len()
        ));
    }
    Ok((dir, latest))
}

/// Locks the backup directory: `Exclusive` for a command that changes its files in place,
/// `Shared` for one that reads them.
fn lock_dir(c: &Common, mode: LockMode) -> Result<DirLock> {
    lock::lock_dir(&c.source.dir, mode)
}

/// `rebase`: each INC's backing file set to its predecessor (no data copied); a symlink
/// `image` points at the newest point.
pub fn rebase(c: &Common, dry_run: bool) -> Result<()> {
    let _lock = lock_dir(
        c,
        if dry_run {
            LockMode::Shared
        } else {
            LockMode::Exclusive
        },
    )?;
    let (_, chain) = select_chain(c)?;
    preflight(&chain, &c.check)?;
    let files = chain.files();
    let link = c.source.dir.join("image");
    let dir = Dir::open(&c.source.dir)
        .with_context(|| format!("{}: cannot open", c.source.dir.display()))?;
    if !dry_run {
        preflight_writable(&files[1..])?;
        if let Some(st) = dir.lstat("image")? {
            if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
                bail!(
                    "{}: exists and is not a symlink; not replacing it (nothing was changed)",
                    link.display()
                );
            }
        }
    }
    for pair in files.windows(2) {
        let (prev, cur) = (pair[0], pair[1]);
        report::info(format!("{}: backing file -> {}", cur.name, prev.name));
        if !dry_run {
            qcow2_rebase(
                &cur.path,
                &RebaseOptions {
                    backing: prev.name.clone(),
                    format: Some(Format::Qcow2),
                    unsafe_mode: true,
                },
            )
            .context("rebase failed")?;
        }
    }
    let newest = chain.newest();
    report::info(format!("{} -> {}", link.display(), newest.name));
    if !dry_run {
        // A new link renamed over the old one: never a moment without it, never followed.
        dir.replace_symlink(&newest.name, "image")
            .with_context(|| format!("{}: cannot create symlink", link.display()))?;
    }
    Ok(())
}

/// `commit`: the INCs committed into the FULL in place, in order; each INC file is removed
/// once its data is safely in the FULL.
pub fn commit(c: &Common, rate_limit: u64, reporting: &Reporting) -> Result<()> {
    let _lock = lock_dir(c, LockMode::Exclusive)?;
    let (_, chain) = select_chain(c)?;
    let checked = preflight(&chain, &c.check)?;
    let incs: Vec<&BackupFile> = chain.incs.iter().collect();
    check_before_commit(&chain.full, &incs, !c.check.ignore_checksums)?;
    let meter = commit_meter(&chain.full, &incs, reporting)?;
    let mut full = open_full_for_writing(&chain.full, checked)?;
    let mut edit = FullEdit::open(&chain.full.path)?;
    for inc in &chain.incs {
        report::info(format!("committing {} into {}", inc.name, chain.full.name));
        commit_inc(&mut full, edit.as_mut(), inc, rate_limit, &meter)
            .with_context(|| interrupted_hint(&chain.full, inc, "commit"))?;
        std::fs::remove_file(&inc.path)
            .with_context(|| format!("{}: cannot remove", inc.path.display()))?;
        let _ = std::fs::remove_file(manifest::manifest_path(&inc.path));
    }
    drop(full);
    finish_commit(&chain.full, &meter, reporting);
    report::info(format!(
        "{} holds the restored disk",
        chain.full.path.display()
    ));
    Ok(())
}

/// A meter over the data of the INCs a commit writes into `full`.
fn commit_meter(
    full: &BackupFile,
    incs: &[&BackupFile],
    reporting: &Reporting,
) -> Result<Arc<Meter>> {
    let total = fold::data_bytes_of(incs.iter().copied())?;
    Ok(Arc::new(reporting.meter(&full.name, total)))
}

/// The meter completed and the summary event given.
fn finish_commit(full: &BackupFile, meter: &Meter, reporting: &Reporting) {
    let (bytes, seconds) = meter.finish();
    reporting.event(serde_json::json!({"event": "summary", "summary": {
        "full": full.name, "bytes_written": bytes, "seconds": seconds}}));
}

/// The chain's files as one disk, newest on top, every read checked against the files'
/// manifests (unless `--ignore-checksums`): what merge and serve read.
pub fn open_stack(chain: &BackupChain, checks: &CheckOptions) -> Result<qcow2::Chain> {
    let mut stack = fold::open_stack(chain.files().into_iter().rev())?;
    fold::check_reads(&mut stack, !checks.ignore_checksums)?;
    Ok(stack)
}

/// The cluster size of a stack's FULL (its bottom layer).
pub fn full_cluster_size(stack: &qcow2::Chain) -> u64 {
    stack
        .layers()
        .last()
        .and_then(|l| l.as_qcow2())
        .map_or(65536, |q| q.cluster_size())
}

pub const FULL_SNAPSHOT: &str = "FULL-BACKUP";

/// `snapshotrebase`: an internal snapshot FULL-BACKUP of the FULL, then each INC committed
/// and snapshotted under its timestamp. Resumable: points already snapshotted are skipped.
/// The INC files are removed once every point is in.
pub fn snapshotrebase(c: &Common, rate_limit: u64, reporting: &Reporting) -> Result<()> {
    let _lock = lock_dir(c, LockMode::Exclusive)?;
    let (_, chain) = select_chain(c)?;
    let existing: Vec<String> = Qcow2::open(&chain.full.path)
        .context("cannot open backup file")?
        .snapshots()?
        .into_iter()
        .map(|s| s.name)
        .collect();
    let todo: Vec<&BackupFile> = chain
        .incs
        .iter()
        .filter(|inc| !existing.contains(&inc.snapshot_name()))
        .collect();
    // The INCs already in are checked no more: the FULL holding them may have grown past
    // them, and an interrupted run may have stopped before removing them.
    let checked = preflight(
        &BackupChain {
            full: chain.full.clone(),
            incs: todo.iter().map(|&f| f.clone()).collect(),
        },
        &c.check,
    )?;
    check_before_commit(&chain.full, &todo, !c.check.ignore_checksums)?;
    let meter = commit_meter(&chain.full, &todo, reporting)?;
    let mut full = open_full_for_writing(&chain.full, checked)?;
    let mut edit = FullEdit::open(&chain.full.path)?;
    if !existing.iter().any(|n| n == FULL_SNAPSHOT) {
        full.snapshot_create(FULL_SNAPSHOT)?;
        report::info(format!("{}: snapshot {FULL_SNAPSHOT}", chain.full.name));
    }
    for inc in &chain.incs {
        let name = inc.snapshot_name();
        if existing.contains(&name) {
            report::info(format!("{}: already in (snapshot {name})", inc.name));
            continue;
        }
        report::info(format!("committing {} (snapshot {name})", inc.name));
        commit_inc(&mut full, edit.as_mut(), inc, rate_limit, &meter).with_context(|| {
            format!(
                "{}; or roll back with `qcow2 snapshot -a {FULL_SNAPSHOT} {}`",
                interrupted_hint(&chain.full, inc, "snapshotrebase"),
                chain.full.path.display()
            )
        })?;
        full.snapshot_create(&name)?;
    }
    drop(full);
    finish_commit(&chain.full, &meter, reporting);
    for inc in &chain.incs {
        if inc.path.exists() {
            std::fs::remove_file(&inc.path)
                .with_context(|| format!("{}: cannot remove", inc.path.display()))?;
            let _ = std::fs::remove_file(manifest::manifest_path(&inc.path));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifiedFile {
    pub file: String,
    pub ok: bool,
    pub manifest: bool,
    pub problem: Option<String>,
}

/// `verify`: every image of every chain (and every copy) checked structurally, each chain's
/// continuity, and every data cluster re-read against its manifest where there is one.
/// Returns the per-file results; the caller exits non-zero when any failed.
pub fn verify(c: &Common) -> Result<Vec<VerifiedFile>> {
    let _lock = lock_dir(c, LockMode::Shared)?;
    let dir = DiskDir::scan(&c.source.dir, c.source.filter.as_deref())?;
    if dir.chains.is_empty() && dir.copies.is_empty() {
        bail!("no backups in {}", c.source.dir.display());
    }
    let mut out = Vec::new();
    let mut all: Vec<&BackupFile> = Vec::new();
    for ch in &dir.chains {
        if let Err(e) = preflight_continuity(ch) {
            out.push(VerifiedFile {
                file: ch.full.name.clone(),
                ok: false,
                manifest: false,
                problem: Some(format!("{e:#}")),
            });
        }
        all.extend(ch.files());
    }
    all.extend(dir.copies.iter());
    for f in all {
        let res = (|| -> Result<bool> {
            refuse_in_use(f, c.check.force_share)?;
            let ch = open_alone(f)?;
            let q = ch.top().as_qcow2().expect("qcow2");
            let r = check::check(q)?;
            if (r.corruptions > 0 || r.check_errors > 0) && !tolerable_stale_flags(f, &r) {
                bail!(
                    "{}: structural damage: {}",
                    f.path.display(),
                    r.messages.first().cloned().unwrap_or_default()
                );
            }
            if edit::is_pending(&f.path) {
                bail!(
                    "{}: an interrupted commit or snapshotrebase left the checksums of some blocks stale; run it again to finish",
                    f.path.display()
                );
            }
            Ok(verify_manifest(&f.path)?.is_some())
        })();
        out.push(match res {
            Ok(has) => VerifiedFile {
                file: f.name.clone(),
                ok: true,
                manifest: has,
                problem: None,
            },
            Err(e) => VerifiedFile {
                file: f.name.clone(),
                ok: false,
                manifest: manifest::manifest_path(&f.path).exists(),
                problem: Some(format!("{e:#}")),
            },
        });
    }
    Ok(out)
}

fn preflight_continuity(ch: &BackupChain) -> Result<()> {
    // Structural checks are done per file by verify itself.
    preflight_files(ch, true, true).map(|_| ())
}

#[derive(Debug, Clone, Serialize)]
pub struct ListedFile {
    pub file: String,
    pub level: BackupLevel,
    pub timestamp: u64,
    pub date: String,
    pub file_size: u64,
    pub virtual_size: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub dir: String,
    pub chains: Vec<Vec<ListedFile>>,
    pub copies: Vec<ListedFile>,
}

fn listed(f: &BackupFile) -> ListedFile {
    ListedFile {
        file: f.name.clone(),
        level: f.level,
        timestamp: f.timestamp,
        date: crate::humanize::format_utc(f.timestamp as i64),
        file_size: std::fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0),
        virtual_size: open_alone(f).ok().map(|c| c.virtual_size()),
    }
}

/// `list`: the chains and their points in time.
pub fn list(c: &Common) -> Result<Listing> {
    let _lock = lock_dir(c, LockMode::Shared)?;
    let dir = DiskDir::scan(&c.source.dir, c.source.filter.as_deref())?;
    Ok(Listing {
        dir: c.source.dir.display().to_string(),
        chains: dir
            .chains
            .iter()
            .map(|ch| ch.files().into_iter().map(listed).collect())
            .collect(),
        copies: dir.copies.iter().map(listed).collect(),
    })
}

impl Listing {
    pub fn human(&self) -> String {
        let mut s = String::new();
        for (i, ch) in self.chains.iter().enumerate() {
            s.push_str(&format!("chain {} ({} points):\n", i + 1, ch.len()));
            for f in ch {
                s.push_str(&format!(
                    "  {:<5} {}  {:>10}  {}\n",
                    format!("{:?}", f.level).to_uppercase(),
                    f.date,
                    report::bytes(f.file_size),
                    f.file
                ));
            }
        }
        if !self.copies.is_empty() {
            s.push_str("copies:\n");
            for f in &self.copies {
                s.push_str(&format!(
                    "  COPY  {}  {:>10}  {}\n",
                    f.date,
                    report::bytes(f.file_size),
                    f.file
                ));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use crate::fsutil::Dir;
    use crate::progress::Reporting;
    use crate::restore::commands::{commit, rebase, snapshotrebase};
    use crate::restore::options::{Common, DirOptions};
    use crate::store::lock::{DirLock, LockMode};

    #[test]
    fn commands_that_change_the_chain_wait_for_no_one() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("FULL-1-d"), b"not an image").unwrap();
        let c = Common {
            source: DirOptions {
                dir: tmp.path().to_path_buf(),
                filter: None,
            },
            ..Default::default()
        };
        let held = DirLock::acquire(&Dir::open(tmp.path()).unwrap(), LockMode::Shared).unwrap();
        for e in [
            commit(&c, 0, &Reporting::default()).unwrap_err(),
            snapshotrebase(&c, 0, &Reporting::default()).unwrap_err(),
            rebase(&c, false).unwrap_err(),
        ] {
            let e = e.to_string();
            assert!(e.contains(&format!("(pid {})", std::process::id())), "{e}");
        }
        drop(held);
        // Released: the command gets past the lock (and stops at the bad file instead).
        let e = format!("{:#}", commit(&c, 0, &Reporting::default()).unwrap_err());
        assert!(!e.contains("run again when it is done"), "{e}");
    }
}
