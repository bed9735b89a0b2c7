//! `merge`: a point's content restored where the disk lives — a new qcow2 or raw file, an
//! existing block device or file written in place, or a raw stream on standard output —
//! for one disk, or for every disk of a VM at one point in time. The backups are only read.

use crate::fsutil;
use crate::progress::Reporting;
use crate::report;
use crate::restore::commands::{full_cluster_size, open_stack, select_chain};
use crate::restore::options::{CheckOptions, Common};
use crate::store::chain::BackupChain;
use crate::store::fold::preflight;
use crate::store::lock::{lock_dir, LockMode};
use crate::store::manifest;
use crate::store::manifest::runs::{block_size_for, RunBuilder};
use crate::store::vm::{select_vm_points, VmDiskPoint};
use anyhow::{bail, Context, Result};
use qcow2::device::{open_in_place, InPlaceTarget};
use qcow2::ops::convert::{self, Qcow2ConvertOptions, RawOutput};
use qcow2::ops::copy::sinks::CopyStats;
use qcow2::ops::map::data_bytes;
use qcow2::ops::throttle::Throttle;
use serde::Serialize;
use serde_json::json;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The format of a restored disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetFormat {
    #[default]
    Qcow2,
    Raw,
}

/// How `merge` writes.
#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    pub format: TargetFormat,
    /// Write over an existing device or file.
    pub in_place: bool,
    /// Zero what reads as zero when writing in place (off: the target is known zero).
    pub zero: bool,
    /// Share the backups' blocks where the filesystem can (new qcow2 files).
    pub share_blocks: bool,
    /// Bytes per second, 0 = unlimited.
    pub rate_limit: u64,
    /// Where the manifest goes when not beside a new file (or instead of beside it).
    pub manifest: Option<PathBuf>,
    pub reporting: Reporting,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct MergeSummary {
    pub disk: String,
    /// The backup file of the point restored.
    pub point: String,
    pub target: String,
    pub format: TargetFormat,
    pub virtual_size: u64,
    /// Guest bytes of data written.
    pub bytes_written: u64,
    /// Guest bytes zeroed by range (in place).
    pub bytes_zeroed: u64,
    pub seconds: f64,
}

impl MergeSummary {
    pub fn human(&self) -> String {
        let zeroed = if self.bytes_zeroed > 0 {
            format!(", {} zeroed", report::bytes(self.bytes_zeroed))
        } else {
            String::new()
        };
        format!(
            "{}: {} restored to {} ({:?}): {} of data written{zeroed} in {:.1} s",
            self.disk,
            self.point,
            self.target,
            self.format,
            report::bytes(self.bytes_written),
            self.seconds
        )
    }
}

/// Where one disk is restored to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Destination {
    NewFile(PathBuf),
    InPlace(PathBuf),
    Stdout,
}

/// `merge` of one disk directory, to `target` (`-`: standard output).
pub fn merge(c: &Common, target: &Path, opts: &MergeOptions) -> Result<MergeSummary> {
    let dest = destination(target, opts)?;
    let _lock = lock_dir(&c.source.dir, LockMode::Shared)?;
    let (_, chain) = select_chain(c)?;
    preflight(&chain, &c.check)?;
    let label = disk_label(&c.source.dir);
    let summary = restore_chain(&chain, &c.check, &dest, opts, &label)?;
    Ok(summary)
}

/// The disk's name for messages: its backup directory's name.
fn disk_label(dir: &Path) -> String {
    std::fs::canonicalize(dir)
        .ok()
        .as_deref()
        .unwrap_or(dir)
        .file_name()
        .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into())
}

/// Decides where `target` is and refuses what cannot be, before anything is read.
fn destination(target: &Path, opts: &MergeOptions) -> Result<Destination> {
    if target.as_os_str() == "-" {
        if opts.in_place {
            bail!("--in-place does not apply to standard output (--targetfile -)");
        }
        if opts.format != TargetFormat::Raw {
            bail!(
                "a qcow2 image cannot be written to a stream: pass --format raw for a raw stream on standard output, or give --targetfile a file"
            );
        }
        use std::io::IsTerminal;
        if std::io::stdout().is_terminal() {
            bail!(
                "standard output is a terminal: send the raw stream somewhere (| ssh host dd of=/dev/vg/disk bs=4M, | zstd > disk.raw.zst), or give --targetfile a file"
            );
        }
        return Ok(Destination::Stdout);
    }
    if opts.in_place {
        return Ok(Destination::InPlace(target.to_path_buf()));
    }
    if let Ok(meta) = std::fs::metadata(target) {
        if meta.file_type().is_block_device() {
            bail!(
                "{}: is a block device: pass --in-place to write over it (it is checked first: size, mounts, users)",
                target.display()
            );
        }
    }
    if target.symlink_metadata().is_ok() {
        bail!(
            "{}: target exists; not overwriting it (choose another --targetfile or remove it; --in-place writes over it, as when restoring a VM's own disk)",
            target.display()
        );
    }
    let beside = manifest::manifest_path(target);
    if opts.manifest.is_none() && beside.symlink_metadata().is_ok() {
        bail!(
            "{}: exists (the manifest of an earlier restore?); not overwriting it (choose another --targetfile or remove it)",
            beside.display()
        );
    }
    Ok(Destination::NewFile(target.to_path_buf()))
}

/// A target written in place must not be one of the backups being read.
fn refuse_backup_file(target: &InPlaceTarget, chain: &BackupChain) -> Result<()> {
    let opened = fsutil::identity(target.storage.file())?;
    for f in chain.files() {
        if let Ok(m) = std::fs::metadata(&f.path) {
            if (m.dev(), m.ino()) == opened {
                bail!(
                    "{}: is the backup file {} itself; restore somewhere else",
                    target.path.display(),
                    f.name
                );
            }
        }
    }
    Ok(())
}

/// The directory a new target goes into, created if missing.
fn create_parent(target: &Path) -> Result<()> {
    if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("{}: cannot create directory", parent.display()))?;
    }
    Ok(())
}

/// Restores `chain` (already preflighted) to `dest`.
fn restore_chain(
    chain: &BackupChain,
    checks: &CheckOptions,
    dest: &Destination,
    opts: &MergeOptions,
    label: &str,
) -> Result<MergeSummary> {
    let stack = open_stack(chain, checks)?;
    let size = stack.virtual_size();
    let cluster_size = full_cluster_size(&stack);
    let block = block_size_for(cluster_size);
    let mut runs = RunBuilder::new(block);
    let meter = opts.reporting.meter(label, data_bytes(&stack)?);
    let mut throttle = Throttle::new(opts.rate_limit);
    let mut observer = |off: u64, data: &[u8]| {
        runs.feed(off, data);
        meter.add(data.len() as u64);
    };
    let create = qcow2::create::CreateOptions {
        cluster_size,
        ..Default::default()
    };
    let qcow2_opts = Qcow2ConvertOptions {
        create: create.clone(),
        compress: false,
        overwrite: false,
        rate_limit: opts.rate_limit,
        share_blocks: opts.share_blocks,
    };
    let shown = match dest {
        Destination::NewFile(p) | Destination::InPlace(p) => p.display().to_string(),
        Destination::Stdout => "standard output".to_string(),
    };
    report::info(format!(
        "{label}: restoring {} ({} file(s), {} .. {}) to {shown} as {:?}",
        chain.newest().name,
        chain.files().len(),
        chain.full.name,
        chain.newest().name,
        opts.format
    ));
    let result: Result<CopyStats> = match (dest, opts.format) {
        (Destination::NewFile(p), TargetFormat::Qcow2) => {
            create_parent(p)?;
            convert::to_qcow2_observed(&stack, p, &qcow2_opts, &mut observer)
                .with_context(|| format!("{shown}: restore failed; no target was left behind"))
        }
        (Destination::NewFile(p), TargetFormat::Raw) => {
            create_parent(p)?;
            let out = RawOutput::NewFile {
                dest: p,
                overwrite: false,
            };
            convert::to_raw_observed(&stack, out, &mut throttle, &mut observer)
                .with_context(|| format!("{shown}: restore failed; no target was left behind"))
        }
        (Destination::InPlace(p), format) => {
            let needed = match format {
                TargetFormat::Raw => size,
                TargetFormat::Qcow2 => convert::qcow2_size_bound(&stack, &create)?,
            };
            let target = open_in_place(p, needed)?;
            refuse_backup_file(&target, chain)?;
            let copied = match format {
                TargetFormat::Raw => {
                    let out = RawOutput::InPlace {
                        target: &target,
                        zero: opts.zero,
                    };
                    convert::to_raw_observed(&stack, out, &mut throttle, &mut observer)
                }
                TargetFormat::Qcow2 => {
                    convert::to_qcow2_in_place_observed(&stack, &target, &qcow2_opts, &mut observer)
                }
            };
            copied.with_context(|| {
                format!(
                    "{shown}: the restore stopped part-way and the target holds part of the point; run the same command again to restore it whole"
                )
            })
        }
        (Destination::Stdout, _) => {
            use std::os::fd::AsFd;
            let fd = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .context("standard output: cannot use it")?;
            let mut out = std::fs::File::from(fd);
            let stream = RawOutput::Stream {
                out: &mut out,
                name: shown.clone(),
            };
            convert::to_raw_observed(&stack, stream, &mut throttle, &mut observer)
                .map_err(anyhow::Error::from)
        }
    };
    let stats = result?;
    let (_, seconds) = meter.finish();
    let uuid = chain.uuid()?;
    let manifest_at = match (dest, &opts.manifest) {
        (_, Some(m)) => Some(m.clone()),
        (Destination::NewFile(p), None) => Some(manifest::manifest_path(p)),
        _ => None,
    };
    if let Some(at) = manifest_at {
        let image_name = match dest {
            Destination::NewFile(p) | Destination::InPlace(p) => p
                .file_name()
                .map_or_else(|| shown.clone(), |n| n.to_string_lossy().into()),
            Destination::Stdout => "-".to_string(),
        };
        manifest::write_manifest_at(
            &at,
            &image_name,
            uuid.as_deref(),
            size,
            block,
            runs.finish(),
        )?;
    }
    let summary = MergeSummary {
        disk: label.to_string(),
        point: chain.newest().name.clone(),
        target: shown,
        format: opts.format,
        virtual_size: size,
        bytes_written: stats.bytes_written,
        bytes_zeroed: stats.bytes_zeroed,
        seconds,
    };
    opts.reporting
        .event(json!({"event": "summary", "summary": summary}));
    if !opts.reporting.json {
        report::info(summary.human());
    }
    Ok(summary)
}

/// The file name a disk gets under `--targetdir`.
fn vm_target_name(disk: &str, format: TargetFormat) -> String {
    let is_raw_name = disk.ends_with(".raw") || disk.ends_with(".img");
    match format {
        TargetFormat::Raw if !is_raw_name => format!("{disk}.raw"),
        _ => disk.to_string(),
    }
}

/// `merge --vm-dir`: every disk of the VM restored into `out_dir` at one point in time
/// (`until`: the newest point of each disk not after it; none: the newest backup run that
/// covers every disk). Every chain is checked, and every target name found free, before the
/// first disk is written.
pub fn merge_vm(
    vm_dir: &Path,
    out_dir: &Path,
    until: Option<u64>,
    checks: &CheckOptions,
    opts: &MergeOptions,
) -> Result<Vec<MergeSummary>> {
    if opts.in_place {
        bail!("--in-place restores one disk at a time (give --dir and --targetfile)");
    }
    if opts.manifest.is_some() {
        bail!("--manifest applies to one disk (each disk's manifest goes beside its file)");
    }
    let first = select_vm_points(vm_dir, until)?;
    let mut locks = Vec::new();
    for p in &first {
        locks.push(lock_dir(&p.dir, LockMode::Shared)?);
    }
    // Chosen again under the locks: nothing changes the chains while they are held.
    let points: Vec<VmDiskPoint> = select_vm_points(vm_dir, until)?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("{}: cannot create directory", out_dir.display()))?;
    let mut plan = Vec::new();
    for p in &points {
        if !first.iter().any(|f| f.dir == p.dir) {
            locks.push(lock_dir(&p.dir, LockMode::Shared)?);
        }
        let target = out_dir.join(vm_target_name(&p.disk, opts.format));
        let dest = destination(&target, opts)?;
        plan.push((p, dest));
    }
    report::info(format!(
        "restoring {} disk(s) of {} to {}: {}",
        plan.len(),
        vm_dir.display(),
        out_dir.display(),
        plan.iter()
            .map(|(p, _)| format!("{} at {}", p.disk, p.chain.newest().name))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    for (p, _) in &plan {
        preflight(&p.chain, checks).with_context(|| format!("disk {}", p.disk))?;
    }
    let mut done = Vec::new();
    for (p, dest) in &plan {
        let s = restore_chain(&p.chain, checks, dest, opts, &p.disk).with_context(|| {
            format!(
                "disk {}{}",
                p.disk,
                if done.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (restored before it: {})",
                        done.iter()
                            .map(|s: &MergeSummary| s.target.clone())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            )
        })?;
        done.push(s);
    }
    drop(locks);
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_disks_get_raw_names_unless_they_have_one() {
        assert_eq!(
            vm_target_name("disk1.qcow2", TargetFormat::Qcow2),
            "disk1.qcow2"
        );
        assert_eq!(
            vm_target_name("disk1.qcow2", TargetFormat::Raw),
            "disk1.qcow2.raw"
        );
        assert_eq!(vm_target_name("sda.img", TargetFormat::Raw), "sda.img");
        assert_eq!(vm_target_name("sdb.raw", TargetFormat::Raw), "sdb.raw");
    }

    #[test]
    fn destinations_are_decided_before_anything_is_read() {
        let tmp = tempfile::tempdir().unwrap();
        let raw = MergeOptions {
            format: TargetFormat::Raw,
            ..Default::default()
        };
        let existing = tmp.path().join("disk.raw");
        std::fs::write(&existing, b"x").unwrap();
        let e = destination(&existing, &raw).unwrap_err().to_string();
        assert!(e.contains("--in-place writes over it"), "{e}");
        let in_place = MergeOptions {
            in_place: true,
            ..raw.clone()
        };
        assert_eq!(
            destination(&existing, &in_place).unwrap(),
            Destination::InPlace(existing.clone())
        );
        let e = destination(Path::new("-"), &in_place)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--in-place does not apply"), "{e}");
        let e = destination(Path::new("-"), &MergeOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--format raw"), "{e}");
        let new = tmp.path().join("new.raw");
        assert_eq!(
            destination(&new, &raw).unwrap(),
            Destination::NewFile(new.clone())
        );
    }
}
