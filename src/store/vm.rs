//! A whole VM's backups: every disk under a backup target and the chain to restore each
//! from, all at one point in time (`qmprestore merge --vm-dir TARGET --until TIME`). This
//! module only plans (it reads directory listings and, like [`DiskDir::scan`], manifests of
//! `--no-timestamp` backups; never an image); the caller restores.
//!
//! The disks are found in every layout a target can have (target.rs):
//!
//! ```text
//! <target>/<disk>/<backups>              a directory per disk
//! <target>/<backups of every disk>       --no-subdir: told apart by their disk part
//! <target>/YYYY-MM/<disk>/<backups>      --monthly (and <target>/current, a symlink)
//! <target>/YYYY-MM/<backups>             --monthly --no-subdir
//! ```
//!
//! A disk is named by its directory (with `--no-subdir`, by the disk part of its files'
//! names, [`BackupFile::disk_part`]); a name found in several month folders is one disk
//! with a chain per month. Symlinks are never followed (`current` points at a month folder
//! read anyway), other non-directories are skipped, and a directory holding no backups is
//! not a disk. Each qmpbackup run gives every disk it backs up the same time, so a run is a
//! time at which disks have a chain point (a FULL or an INC; COPYs are not chain points).

use crate::humanize::{days_from_civil, format_utc};
use crate::report;
use crate::store::chain::BackupChain;
use crate::store::disk_dir::DiskDir;
use crate::store::file::BackupFile;
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One disk of the VM and the chain to restore it from, cut at the chosen point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmDiskPoint {
    /// The disk's directory name (with `--no-subdir`, the disk part of its files' names).
    pub disk: String,
    /// The directory holding the chain (with `--monthly`, in the chain's month folder).
    pub dir: PathBuf,
    /// The chain, its last file the chosen point.
    pub chain: BackupChain,
}

impl VmDiskPoint {
    /// The time of the chosen point (its last file's).
    pub fn time(&self) -> u64 {
        self.chain.newest().timestamp
    }
}

/// The forms [`parse_point_time`] accepts, for messages.
const POINT_FORMS: &str = "a unix time (digits, e.g. 1767323045) or a UTC time YYYY-MM-DDTHH:MM:SSZ (e.g. 2026-01-02T03:04:05Z)";

/// A point in time as `--until` gives it for whole-VM restores: a unix time (digits) or a
/// UTC time `YYYY-MM-DDTHH:MM:SSZ`.
pub fn parse_point_time(s: &str) -> Result<u64> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map_err(|_| anyhow!("{s:?}: too large for a unix time; give {POINT_FORMS}"));
    }
    parse_utc(s).map_err(|why| anyhow!("{s:?}: {why}; give {POINT_FORMS}"))
}

/// `YYYY-MM-DDTHH:MM:SSZ` (a lower-case `t` or `z` too, as RFC 3339 allows) to a unix time.
fn parse_utc(s: &str) -> std::result::Result<u64, String> {
    let b = s.as_bytes();
    let shaped = b.len() == 20
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b'-',
            10 => c == b'T' || c == b't',
            13 | 16 => c == b':',
            19 => c == b'Z' || c == b'z',
            _ => c.is_ascii_digit(),
        });
    if !shaped {
        return Err("not a point in time".to_string());
    }
    let num = |at: usize, len: usize| {
        b[at..at + len]
            .iter()
            .fold(0u32, |n, c| n * 10 + u32::from(c - b'0'))
    };
    let (y, mo, d) = (num(0, 4), num(5, 2), num(8, 2));
    let (h, mi, sec) = (num(11, 2), num(14, 2), num(17, 2));
    if y < 1970 {
        return Err(format!(
            "year {y:04} is before 1970, where unix time starts"
        ));
    }
    if !(1..=12).contains(&mo) {
        return Err(format!("month {mo:02} is out of range (01-12)"));
    }
    let y = i64::from(y);
    let (ny, nm) = if mo == 12 { (y + 1, 1) } else { (y, mo + 1) };
    let days_in_month = days_from_civil(ny, nm, 1) - days_from_civil(y, mo, 1);
    if d < 1 || i64::from(d) > days_in_month {
        return Err(format!(
            "day {d:02} is out of range for {y:04}-{mo:02} (01-{days_in_month})"
        ));
    }
    if h > 23 {
        return Err(format!("hour {h:02} is out of range (00-23)"));
    }
    if mi > 59 {
        return Err(format!("minute {mi:02} is out of range (00-59)"));
    }
    if sec > 59 {
        return Err(format!("second {sec:02} is out of range (00-59)"));
    }
    let days = days_from_civil(y, mo, d) as u64;
    Ok(days * 86_400 + u64::from(h * 3600 + mi * 60 + sec))
}

/// Every disk under `target` and its chain at the chosen time, sorted by disk name.
///
/// With `until`, each disk's newest chain point at or before it (a chain of an older month
/// as well), and an error naming every disk without one. Without, the newest time at
/// which every disk has a chain point (the newest run that backed up every disk), and an
/// error when there is none. Each chain is cut after its point. A warning says when the
/// disks' points differ in time, or when newer backups of some disks are left out.
pub fn select_vm_points(target: &Path, until: Option<u64>) -> Result<Vec<VmDiskPoint>> {
    let disks = find_disks(target)?;
    if disks.is_empty() {
        bail!(
            "{}: holds no disk backup directories (no FULL, INC or COPY files in it, in its subdirectories or in its YYYY-MM month folders); point --vm-dir at the qmpbackup --target directory",
            target.display()
        );
    }
    let chainless: Vec<(&String, &DiskBackups)> =
        disks.iter().filter(|(_, d)| d.chains.is_empty()).collect();
    if !chainless.is_empty() {
        bail!(
            "{}: no chain to restore {} from: no full backup in {} (only copies, or incrementals without their full); a whole-VM restore needs a chain for every disk: restore the others one at a time (qmprestore merge --dir DIR --targetfile FILE)",
            target.display(),
            list(chainless.iter().map(|(n, _)| n.to_string())),
            list(chainless.iter().flat_map(|(_, d)| &d.dirs).map(|p| p.display().to_string()))
        );
    }
    let at = match until {
        Some(t) => t,
        None => newest_common_time(target, &disks)?,
    };
    let mut points = Vec::new();
    let mut missing = Vec::new();
    for (disk, d) in &disks {
        match d.newest_at_or_before(at) {
            Some(p) => points.push(VmDiskPoint {
                disk: disk.clone(),
                dir: p.dir.to_path_buf(),
                chain: p.cut(),
            }),
            None => missing.push((disk, d)),
        }
    }
    if !missing.is_empty() {
        // Only with --until: without, `at` is a point of every disk.
        let oldest = |d: &DiskBackups| d.points().first().map_or(0, |p| p.time);
        let earliest_for_all = disks.values().map(oldest).max().unwrap_or(0);
        bail!(
            "{}: no backup of {} at or before {}; their oldest points: {}; choose a later --until (every disk has a point at or before {})",
            target.display(),
            list(missing.iter().map(|(n, _)| n.to_string())),
            when(at),
            list(missing.iter().map(|(n, d)| format!("{n} {}", when(oldest(d))))),
            when(earliest_for_all)
        );
    }
    warn_about_mixed_times(&disks, &points, at, until.is_some());
    Ok(points)
}

/// Warns when the chosen points differ in time (with `--until`, a disk missed by the
/// newest run before it), or newer backups of some disks are not restored.
fn warn_about_mixed_times(
    disks: &BTreeMap<String, DiskBackups>,
    points: &[VmDiskPoint],
    at: u64,
    until_given: bool,
) {
    let newest = points.iter().map(VmDiskPoint::time).max().unwrap_or(0);
    if points.iter().any(|p| p.time() != newest) {
        report::warn(format!(
            "the disks' points differ in time (the run of {} did not back up every disk): {}",
            when(newest),
            list(
                points
                    .iter()
                    .map(|p| format!("{} {}", p.disk, when(p.time())))
            )
        ));
    }
    if until_given {
        return;
    }
    let newer: Vec<String> = disks
        .iter()
        .filter_map(|(n, d)| {
            let t = d.points().last()?.time;
            (t > at).then(|| format!("{n} {}", when(t)))
        })
        .collect();
    if !newer.is_empty() {
        report::warn(format!(
            "newer backups are not restored: {}; {} is the newest run that backed up every disk (choose another point with --until)",
            list(newer),
            when(at)
        ));
    }
}

/// The newest time at which every disk has a chain point; an error saying why not when
/// there is none. Every disk has a chain.
fn newest_common_time(target: &Path, disks: &BTreeMap<String, DiskBackups>) -> Result<u64> {
    let mut common: Option<BTreeSet<u64>> = None;
    for d in disks.values() {
        let times: BTreeSet<u64> = d.points().iter().map(|p| p.time).collect();
        common = Some(match common {
            None => times,
            Some(c) => c.intersection(&times).copied().collect(),
        });
    }
    if let Some(t) = common.as_ref().and_then(|c| c.last()) {
        return Ok(*t);
    }
    let newest = |d: &DiskBackups| d.points().last().map_or(0, |p| p.time);
    let newest_run = disks.values().map(newest).max().unwrap_or(0);
    let (with, without): (Vec<_>, Vec<_>) = disks
        .iter()
        .partition(|(_, d)| d.points().iter().any(|p| p.time == newest_run));
    bail!(
        "{}: no backup run covers every disk: the newest, at {}, backed up {} but not {}; each disk's newest point: {}; choose a point in time with --until ({POINT_FORMS}): each disk is then restored from its newest backup at or before it",
        target.display(),
        when(newest_run),
        list(with.iter().map(|(n, _)| n.to_string())),
        list(without.iter().map(|(n, _)| n.to_string())),
        list(disks.iter().map(|(n, d)| format!("{n} {}", when(newest(d)))))
    )
}

/// One disk's backups, gathered from every folder it appears in.
#[derive(Default)]
pub struct DiskBackups {
    /// Its chains, each with the directory holding it, in the order found.
    pub chains: Vec<(PathBuf, BackupChain)>,
    /// The directories its backups were found in (copies and orphans included).
    pub dirs: Vec<PathBuf>,
    pub copies: Vec<BackupFile>,
    /// INCs with no FULL before them in their directory.
    pub orphans: Vec<BackupFile>,
    /// What interrupted backups left (only with a lenient scan).
    pub leftovers: Vec<PathBuf>,
}

/// A chain point: the `index`th file of `chain` (0 its FULL, `i` its `i`th INC).
struct Point<'a> {
    time: u64,
    dir: &'a Path,
    chain: &'a BackupChain,
    index: usize,
}

impl Point<'_> {
    /// The chain cut after this point.
    fn cut(&self) -> BackupChain {
        BackupChain {
            full: self.chain.full.clone(),
            incs: self.chain.incs[..self.index].to_vec(),
        }
    }
}

impl DiskBackups {
    fn add(&mut self, d: DiskDir) {
        if !self.dirs.contains(&d.dir) {
            self.dirs.push(d.dir.clone());
        }
        let dir = d.dir;
        self.chains
            .extend(d.chains.into_iter().map(|c| (dir.clone(), c)));
        self.copies.extend(d.copies);
        self.orphans.extend(d.orphans);
        self.leftovers
            .extend(d.leftovers.iter().map(|n| dir.join(n)));
    }

    /// Every chain point, oldest first (at one time, a later chain's, then a later file's
    /// of the chain, last).
    fn points(&self) -> Vec<Point<'_>> {
        let mut points: Vec<Point<'_>> = self
            .chains
            .iter()
            .flat_map(|(dir, chain)| {
                chain
                    .files()
                    .into_iter()
                    .enumerate()
                    .map(move |(index, f)| Point {
                        time: f.timestamp,
                        dir,
                        chain,
                        index,
                    })
            })
            .collect();
        points.sort_by(|a, b| {
            (a.time, a.chain.full.timestamp, a.dir, a.index).cmp(&(
                b.time,
                b.chain.full.timestamp,
                b.dir,
                b.index,
            ))
        });
        points
    }

    fn newest_at_or_before(&self, t: u64) -> Option<Point<'_>> {
        self.points().into_iter().rev().find(|p| p.time <= t)
    }
}

/// Every disk under `target`, by name.
fn find_disks(target: &Path) -> Result<BTreeMap<String, DiskBackups>> {
    let mut disks = BTreeMap::new();
    scan_chain_root(target, true, DiskDir::scan, &mut disks)?;
    Ok(disks)
}

/// Every disk under `target` (a backup target, or one disk's directory), by name, as prune
/// sees them: unfinished backups listed, not an error ([`DiskDir::scan_lenient`]).
pub fn find_disks_lenient(target: &Path) -> Result<BTreeMap<String, DiskBackups>> {
    let mut disks = BTreeMap::new();
    scan_chain_root(target, true, DiskDir::scan_lenient, &mut disks)?;
    Ok(disks)
}

/// The directories of a target's layout, chain roots first: the target, its month
/// folders, and every subdirectory of those (symlinks not followed).
pub fn layout_dirs(target: &Path) -> Result<Vec<(PathBuf, bool)>> {
    let mut out = vec![(target.to_path_buf(), true)];
    for sub in subdirs(target, "the backup target")? {
        let month = sub
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(is_month);
        if month {
            out.push((sub.clone(), true));
            for d in subdirs(&sub, "the month folder")? {
                out.push((d, false));
            }
        } else {
            out.push((sub, false));
        }
    }
    Ok(out)
}

/// The subdirectories of `dir` (not symlinks), sorted.
fn subdirs(dir: &Path, what: &str) -> Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot read {what}", dir.display()))?;
    let mut out = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("{}: cannot read {what}", dir.display()))?;
        let kind = e
            .file_type()
            .with_context(|| format!("{}: cannot read its file type", e.path().display()))?;
        if kind.is_dir() {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Whether a directory name is a month folder's (`YYYY-MM`).
pub fn is_month_folder(name: &str) -> bool {
    is_month(name)
}

/// Reads a chain root (the target, or one of its month folders): the backup files in it
/// are `--no-subdir` disks, told apart by their disk part; each subdirectory is a disk
/// directory, or at the target one named `YYYY-MM` a month folder, read as a chain root.
fn scan_chain_root(
    root: &Path,
    is_target: bool,
    scan: fn(&Path, Option<&str>) -> Result<DiskDir>,
    disks: &mut BTreeMap<String, DiskBackups>,
) -> Result<()> {
    let what = if is_target {
        "the backup target"
    } else {
        "the month folder"
    };
    // Not following symlinks: `current` (and any other link) is skipped.
    let subdirs = subdirs(root, what)?;

    let mut by_disk: BTreeMap<String, Vec<BackupFile>> = BTreeMap::new();
    let scanned = scan(root, None)?;
    let leftovers = scanned.leftovers.clone();
    for f in files_of(scanned) {
        by_disk
            .entry(f.disk_part().to_string())
            .or_default()
            .push(f);
    }
    for (disk, files) in by_disk {
        let mut d = DiskDir::from_files(root.to_path_buf(), files);
        // Leftovers of --no-subdir disks go with the disk whose name they carry.
        d.leftovers = leftovers
            .iter()
            .filter(|n| n.contains(&format!("-{disk}.partial")))
            .cloned()
            .collect();
        disks.entry(disk).or_default().add(d);
    }

    for dir in subdirs {
        let name = dir.file_name().and_then(|n| n.to_str()).map(str::to_string);
        match name {
            Some(n) if is_target && is_month(&n) => scan_chain_root(&dir, false, scan, disks)?,
            Some(n) => {
                let d = scan(&dir, None)?;
                if holds_backups(&d) {
                    disks.entry(n).or_default().add(d);
                }
            }
            None => {
                if holds_backups(&scan(&dir, None)?) {
                    bail!(
                        "{}: the directory name is not valid UTF-8; rename it (disk names are shown and recorded as text)",
                        dir.display()
                    );
                }
            }
        }
    }
    Ok(())
}

/// Every backup file of a scan: chains, copies and orphans.
fn files_of(d: DiskDir) -> Vec<BackupFile> {
    let mut files = Vec::new();
    for c in d.chains {
        files.push(c.full);
        files.extend(c.incs);
    }
    files.extend(d.copies);
    files.extend(d.orphans);
    files
}

fn holds_backups(d: &DiskDir) -> bool {
    !(d.chains.is_empty() && d.copies.is_empty() && d.orphans.is_empty())
}

/// A month folder's name: `YYYY-MM`.
fn is_month(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 7
        && b[4] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || c.is_ascii_digit())
        && (1..=12).contains(&((b[5] - b'0') * 10 + (b[6] - b'0')))
}

/// A time for messages: `2026-01-02 03:04:05 UTC (1767323045)`, the number as `--until`
/// takes it.
fn when(t: u64) -> String {
    format!(
        "{} UTC ({t})",
        format_utc(i64::try_from(t).unwrap_or(i64::MAX))
    )
}

fn list(items: impl IntoIterator<Item = String>) -> String {
    items.into_iter().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use crate::store::vm::{parse_point_time, select_vm_points, VmDiskPoint};
    use std::path::Path;

    /// Empty files of these names in `dir` (created): the scan reads only names.
    fn touch(dir: &Path, names: &[&str]) {
        std::fs::create_dir_all(dir).unwrap();
        for n in names {
            std::fs::write(dir.join(n), b"").unwrap();
        }
    }

    /// The backup files of one run of these disks, each in `<root>/<disk>/`.
    fn run(root: &Path, level: &str, time: u64, disks: &[&str]) {
        for d in disks {
            touch(&root.join(d), &[&format!("{level}-{time}-{d}")]);
        }
    }

    /// (disk, the chain's file names, the chain's directory relative to `base`).
    fn summary(base: &Path, points: &[VmDiskPoint]) -> Vec<(String, Vec<String>, String)> {
        points
            .iter()
            .map(|p| {
                let files = p.chain.files().iter().map(|f| f.name.clone()).collect();
                let dir = p.dir.strip_prefix(base).unwrap().display().to_string();
                (p.disk.clone(), files, dir)
            })
            .collect()
    }

    fn row(disk: &str, files: &[&str], dir: &str) -> (String, Vec<String>, String) {
        (
            disk.to_string(),
            files.iter().map(|f| f.to_string()).collect(),
            dir.to_string(),
        )
    }

    /// Three disks; disk3 joined at the second run, the fourth run missed it.
    fn plain_target() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        run(t, "FULL", 100, &["disk1", "disk2"]);
        run(t, "INC", 200, &["disk1", "disk2"]);
        run(t, "FULL", 200, &["disk3"]);
        run(t, "INC", 300, &["disk1", "disk2", "disk3"]);
        run(t, "FULL", 400, &["disk1"]);
        run(t, "INC", 400, &["disk2"]);
        // Not chain points, not disks, not backups.
        run(t, "COPY", 350, &["disk1"]);
        touch(&t.join("disk1"), &["disk1.config", ".lock"]);
        touch(t, &["uuid", ".lock"]);
        touch(&t.join("notes"), &["readme.txt"]);
        std::fs::create_dir(t.join("empty")).unwrap();
        std::os::unix::fs::symlink(t.join("disk1"), t.join("disk1-link")).unwrap();
        tmp
    }

    #[test]
    fn without_until_the_newest_run_covering_every_disk_is_chosen() {
        let tmp = plain_target();
        let t = tmp.path();
        let points = select_vm_points(t, None).unwrap();
        assert_eq!(
            summary(t, &points),
            [
                row(
                    "disk1",
                    &["FULL-100-disk1", "INC-200-disk1", "INC-300-disk1"],
                    "disk1"
                ),
                row(
                    "disk2",
                    &["FULL-100-disk2", "INC-200-disk2", "INC-300-disk2"],
                    "disk2"
                ),
                row("disk3", &["FULL-200-disk3", "INC-300-disk3"], "disk3"),
            ]
        );
        assert!(points.iter().all(|p| p.time() == 300));
    }

    #[test]
    fn until_takes_each_disks_newest_point_at_or_before_it() {
        let tmp = plain_target();
        let t = tmp.path();
        let points = select_vm_points(t, Some(400)).unwrap();
        assert_eq!(
            summary(t, &points),
            [
                row("disk1", &["FULL-400-disk1"], "disk1"),
                row(
                    "disk2",
                    &[
                        "FULL-100-disk2",
                        "INC-200-disk2",
                        "INC-300-disk2",
                        "INC-400-disk2"
                    ],
                    "disk2"
                ),
                row("disk3", &["FULL-200-disk3", "INC-300-disk3"], "disk3"),
            ]
        );
        // Between runs, and the COPY at 350 is no point.
        let points = select_vm_points(t, Some(399)).unwrap();
        assert!(points.iter().all(|p| p.time() == 300), "{points:?}");
        let points = select_vm_points(t, Some(250)).unwrap();
        assert_eq!(
            summary(t, &points)[0],
            row("disk1", &["FULL-100-disk1", "INC-200-disk1"], "disk1")
        );
        assert_eq!(
            summary(t, &points)[2],
            row("disk3", &["FULL-200-disk3"], "disk3")
        );
    }

    #[test]
    fn until_before_some_disks_first_backup_names_them_all_in_one_error() {
        let tmp = plain_target();
        let e = select_vm_points(tmp.path(), Some(150))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no backup of disk3 at or before 1970-01-01 00:02:30 UTC (150)"),
            "{e}"
        );
        assert!(
            e.contains("their oldest points: disk3 1970-01-01 00:03:20 UTC (200)"),
            "{e}"
        );
        assert!(e.contains("choose a later --until"), "{e}");
        let e = select_vm_points(tmp.path(), Some(50))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no backup of disk1, disk2, disk3 at or before"),
            "{e}"
        );
        assert!(
            e.contains("every disk has a point at or before 1970-01-01 00:03:20 UTC (200)"),
            "{e}"
        );
        assert!(e.contains(&tmp.path().display().to_string()), "{e}");
    }

    #[test]
    fn without_a_run_covering_every_disk_the_error_names_the_missed_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        run(t, "FULL", 100, &["disk1"]);
        run(t, "INC", 200, &["disk1", "disk2"]);
        run(t, "FULL", 150, &["disk2"]);
        run(t, "FULL", 120, &["disk3"]);
        let e = select_vm_points(t, None).unwrap_err().to_string();
        assert!(
            e.contains("no backup run covers every disk: the newest, at 1970-01-01 00:03:20 UTC (200), backed up disk1, disk2 but not disk3"),
            "{e}"
        );
        assert!(e.contains("disk3 1970-01-01 00:02:00 UTC (120)"), "{e}");
        assert!(e.contains("--until"), "{e}");
        // With --until, each disk's newest point before it.
        let points = select_vm_points(t, Some(200)).unwrap();
        let times: Vec<u64> = points.iter().map(VmDiskPoint::time).collect();
        assert_eq!(times, [200, 200, 120]);
    }

    #[test]
    fn monthly_folders_are_one_disk_with_a_chain_per_month() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        // 2026-01-05, 2026-01-06; 2026-02-01, 2026-02-02.
        let (j1, j2, f1, f2) = (1767571200, 1767657600, 1769904000, 1769990400);
        let jan = t.join("2026-01");
        let feb = t.join("2026-02");
        run(&jan, "FULL", j1, &["disk1", "disk2"]);
        run(&jan, "INC", j2, &["disk1", "disk2"]);
        run(&feb, "FULL", f1, &["disk1", "disk2"]);
        run(&feb, "INC", f2, &["disk1"]);
        touch(&jan, &["uuid"]);
        touch(&feb, &["uuid", ".lock"]);
        touch(&feb.join("disk1"), &[".lock", ".append.lock"]);
        touch(t, &["uuid"]);
        std::os::unix::fs::symlink("2026-02", t.join("current")).unwrap();

        let points = select_vm_points(t, None).unwrap();
        assert_eq!(
            summary(t, &points),
            [
                row("disk1", &[&format!("FULL-{f1}-disk1")], "2026-02/disk1"),
                row("disk2", &[&format!("FULL-{f1}-disk2")], "2026-02/disk2"),
            ]
        );
        // Before February: January's chains.
        let until = parse_point_time("2026-01-31T23:59:59Z").unwrap();
        let points = select_vm_points(t, Some(until)).unwrap();
        assert_eq!(
            summary(t, &points),
            [
                row(
                    "disk1",
                    &[&format!("FULL-{j1}-disk1"), &format!("INC-{j2}-disk1")],
                    "2026-01/disk1"
                ),
                row(
                    "disk2",
                    &[&format!("FULL-{j1}-disk2"), &format!("INC-{j2}-disk2")],
                    "2026-01/disk2"
                ),
            ]
        );
        // Later than every backup: disk1's February INC, disk2's FULL.
        let points = select_vm_points(t, Some(f2 + 1)).unwrap();
        let times: Vec<u64> = points.iter().map(VmDiskPoint::time).collect();
        assert_eq!(times, [f2, f1]);
        assert_eq!(points[0].chain.incs.len(), 1);
    }

    #[test]
    fn a_disk_left_out_of_newer_runs_holds_the_vm_at_its_last_run() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        run(&t.join("2026-01"), "FULL", 1767571200, &["vda", "vdb"]);
        run(&t.join("2026-02"), "FULL", 1769904000, &["vda"]);
        let points = select_vm_points(t, None).unwrap();
        assert!(points.iter().all(|p| p.time() == 1767571200));
        assert!(points.iter().all(|p| p.dir.starts_with(t.join("2026-01"))));
    }

    #[test]
    fn no_subdir_files_are_grouped_by_their_disk_part() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        touch(
            t,
            &[
                "FULL-100-vm-disk-1.qcow2",
                "FULL-100-vm-disk-2.qcow2",
                "INC-200-vm-disk-1.qcow2",
                "INC-200-vm-disk-2.qcow2",
                "INC-300-vm-disk-1.qcow2",
                "FULL-100-vm-disk-1.qcow2.manifest",
                "vm-disk-1.qcow2.config",
                "uuid",
                ".lock",
            ],
        );
        let points = select_vm_points(t, None).unwrap();
        assert_eq!(
            summary(t, &points),
            [
                row(
                    "vm-disk-1.qcow2",
                    &["FULL-100-vm-disk-1.qcow2", "INC-200-vm-disk-1.qcow2"],
                    ""
                ),
                row(
                    "vm-disk-2.qcow2",
                    &["FULL-100-vm-disk-2.qcow2", "INC-200-vm-disk-2.qcow2"],
                    ""
                ),
            ]
        );

        // --monthly --no-subdir.
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        touch(
            &t.join("2026-01"),
            &["FULL-1767571200-a", "FULL-1767571200-b", "uuid"],
        );
        touch(
            &t.join("2026-02"),
            &["FULL-1769904000-a", "FULL-1769904000-b", "INC-1769990400-b"],
        );
        std::os::unix::fs::symlink("2026-02", t.join("current")).unwrap();
        let points = select_vm_points(t, Some(1769904000)).unwrap();
        assert_eq!(
            summary(t, &points),
            [
                row("a", &["FULL-1769904000-a"], "2026-02"),
                row("b", &["FULL-1769904000-b"], "2026-02"),
            ]
        );
        let points = select_vm_points(t, Some(1769904000 - 1)).unwrap();
        assert_eq!(
            summary(t, &points)[1],
            row("b", &["FULL-1767571200-b"], "2026-01")
        );
    }

    #[test]
    fn a_target_without_disks_and_odd_directories_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        touch(t, &["uuid", "notes.txt"]);
        touch(&t.join("photos"), &["a.jpg"]);
        std::os::unix::fs::symlink("photos", t.join("current")).unwrap();
        let e = select_vm_points(t, None).unwrap_err().to_string();
        assert!(e.contains("holds no disk backup directories"), "{e}");
        assert!(
            e.contains("point --vm-dir at the qmpbackup --target directory"),
            "{e}"
        );
        assert!(e.starts_with(&t.display().to_string()), "{e}");

        let missing = t.join("nonexistent");
        let e = select_vm_points(&missing, None).unwrap_err();
        assert!(
            format!("{e:#}").contains(&missing.display().to_string()),
            "{e:#}"
        );

        // A disk with copies only: no chain to restore it from.
        run(t, "FULL", 100, &["vda"]);
        run(t, "COPY", 100, &["vdb"]);
        let e = select_vm_points(t, None).unwrap_err().to_string();
        assert!(e.contains("no chain to restore vdb from"), "{e}");
        assert!(e.contains(&t.join("vdb").display().to_string()), "{e}");
        std::fs::remove_dir_all(t.join("vdb")).unwrap();

        // A directory whose name is not UTF-8: skipped without backups, an error with.
        use std::os::unix::ffi::OsStrExt;
        let odd = t.join(std::ffi::OsStr::from_bytes(b"disk\xff"));
        std::fs::create_dir(&odd).unwrap();
        assert_eq!(select_vm_points(t, None).unwrap().len(), 1);
        touch(&odd, &["FULL-100-disk"]);
        let e = select_vm_points(t, None).unwrap_err().to_string();
        assert!(e.contains("not valid UTF-8"), "{e}");
        std::fs::remove_dir_all(&odd).unwrap();

        // An unreadable disk directory (unless we run as root, who reads it anyway).
        use std::os::unix::fs::PermissionsExt;
        let locked = t.join("vdc");
        run(t, "FULL", 100, &["vdc"]);
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
        if std::fs::read_dir(&locked).is_err() {
            let e = select_vm_points(t, None).unwrap_err();
            assert!(
                format!("{e:#}").contains(&locked.display().to_string()),
                "{e:#}"
            );
        }
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn point_times_are_unix_times_or_utc_times() {
        assert_eq!(parse_point_time("1767323045").unwrap(), 1767323045);
        assert_eq!(parse_point_time("0").unwrap(), 0);
        assert_eq!(
            parse_point_time("2026-01-02T03:04:05Z").unwrap(),
            1767323045
        );
        assert_eq!(
            parse_point_time("2026-01-02t03:04:05z").unwrap(),
            1767323045
        );
        assert_eq!(parse_point_time("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(
            parse_point_time("2024-02-29T23:59:59Z").unwrap(),
            1709251199
        );
        assert_eq!(
            parse_point_time("2024-03-01T00:00:00Z").unwrap(),
            1709251200
        );
        for (bad, why) in [
            ("", "not a point in time"),
            ("yesterday", "not a point in time"),
            ("+5", "not a point in time"),
            ("-5", "not a point in time"),
            ("12 ", "not a point in time"),
            ("2026-01-02 03:04:05", "not a point in time"),
            ("2026-01-02T03:04:05", "not a point in time"),
            ("2026-1-02T03:04:05Z", "not a point in time"),
            ("2026-01-02T03:04:05+01:00", "not a point in time"),
            ("２026-01-02T03:04:05Z", "not a point in time"),
            ("99999999999999999999", "too large for a unix time"),
            ("1969-12-31T23:59:59Z", "year 1969 is before 1970"),
            ("2026-00-01T00:00:00Z", "month 00 is out of range (01-12)"),
            ("2026-13-01T00:00:00Z", "month 13 is out of range (01-12)"),
            (
                "2026-01-00T00:00:00Z",
                "day 00 is out of range for 2026-01 (01-31)",
            ),
            (
                "2026-02-29T00:00:00Z",
                "day 29 is out of range for 2026-02 (01-28)",
            ),
            (
                "2026-04-31T00:00:00Z",
                "day 31 is out of range for 2026-04 (01-30)",
            ),
            ("2026-01-01T24:00:00Z", "hour 24 is out of range (00-23)"),
            ("2026-01-01T00:60:00Z", "minute 60 is out of range (00-59)"),
            ("2026-01-01T00:00:60Z", "second 60 is out of range (00-59)"),
        ] {
            let e = parse_point_time(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(
                e.contains("a unix time (digits") && e.contains("YYYY-MM-DDTHH:MM:SSZ"),
                "{bad:?}: {e}"
            );
        }
    }
}
