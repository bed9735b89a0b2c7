//! qmpbackup's orchestration: discover the disks, plan each one's level and files, create
//! the target images natively, run the QMP sequence, then publish the files (rename,
//! manifest, config, uuid) only when every job succeeded.

pub mod discover;
pub mod layout;
pub mod run;

use crate::fsutil::{self, Dir};
use crate::manifest;
use crate::qmp::types::{StatusInfo, VersionInfo};
use crate::qmp::Qmp;
use crate::report;
use crate::restore::discover::Level;
use anyhow::{anyhow, bail, Context, Result};
use discover::Disk;
use layout::{Layout, LayoutOptions};
use qcow2::create::{init_qcow2, CreateOptions};
use qcow2::storage::FileStorage;
use run::{AbortFlag, AgentRef, Planned, RunOptions};
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelArg {
    Full,
    Inc,
    Auto,
    Copy,
}

#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub level: LevelArg,
    pub layout: LayoutOptions,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub include_raw: bool,
    pub pause: bool,
    pub speed_limit: u64,
    pub progress_interval: u64,
    pub cbw_timeout: u64,
    pub compress: bool,
    pub uuid: Option<String>,
    pub remove_delay: u64,
    pub disable_cache: bool,
    pub aio: String,
    pub fleece_dir: Option<PathBuf>,
    pub json: bool,
    pub stall_timeout: std::time::Duration,
    pub cancel_timeout: std::time::Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskSummary {
    pub disk: String,
    pub level: Level,
    pub file: String,
    pub bytes: u64,
    pub seconds: f64,
    pub bytes_per_second: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub uuid: String,
    pub timestamp: u64,
    pub disks: Vec<DiskSummary>,
}

fn new_uuid() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The disks a run covers, after --include/--exclude and the raw/read-only rules.
pub fn select_disks(all: Vec<Disk>, opts: &BackupOptions) -> Result<Vec<Disk>> {
    for id in &opts.include {
        if !all.iter().any(|d| d.matches(id)) {
            bail!(
                "--include {id}: no such disk (see `qmpbackup info --show blockdev` for device ids, drive ids and node names)"
            );
        }
    }
    let mut out = Vec::new();
    for d in all {
        let label = d.label();
        if !opts.include.is_empty() && !opts.include.iter().any(|i| d.matches(i)) {
            continue;
        }
        if opts.exclude.iter().any(|i| d.matches(i)) {
            report::info(format!("{label}: excluded"));
            continue;
        }
        if d.read_only && !d.pflash {
            report::info(format!("{label}: read-only medium, skipped"));
            continue;
        }
        if d.is_raw() && !d.pflash && !opts.include_raw && opts.include.is_empty() {
            report::info(format!(
                "{label}: raw disk skipped (use --include-raw to back it up)"
            ));
            continue;
        }
        if !matches!(d.format.as_str(), "qcow2" | "raw") {
            report::warn(format!(
                "{label}: format {} not supported, skipped",
                d.format
            ));
            continue;
        }
        out.push(d);
    }
    if out.is_empty() {
        bail!("no disks to back up (raw disks are skipped unless --include-raw; see `qmpbackup info --show blockdev`)");
    }
    Ok(out)
}

/// Runs one backup. The caller owns the QMP connection, the agent and the abort flag.
pub async fn backup(
    qmp: &Qmp,
    opts: &BackupOptions,
    agent: AgentRef<'_>,
    abort: &AbortFlag,
) -> Result<Summary> {
    let version: VersionInfo = qmp.query("query-version", json!({})).await?;
    let fleecing_ok = version.at_least(7, 1);
    report::info(format!(
        "QEMU {} ({})",
        version.text(),
        if fleecing_ok {
            "image fleecing"
        } else {
            "plain blockdev-backup: QEMU < 7.1 has no fleecing"
        }
    ));
    let status: StatusInfo = qmp.query("query-status", json!({})).await?;
    if !matches!(status.status.as_str(), "running" | "paused" | "prelaunch") {
        bail!(
            "the VM is in state '{}': backups need a running, paused or prelaunch VM",
            status.status
        );
    }
    for msg in run::repair_leftovers(qmp).await? {
        report::warn(msg);
    }
    let disks = select_disks(discover::discover(qmp).await?, opts)?;
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    if let Some(u) = &opts.uuid {
        layout::check_uuid(u).context("--uuid")?;
    }
    let layout = Layout::open(opts.layout.clone(), timestamp)?;
    let old_uuid = layout.read_uuid()?;

    // Levels and the chain's uuid.
    let uuid = match (opts.level, &old_uuid, &opts.uuid) {
        (LevelArg::Full, _, Some(u)) => u.clone(),
        (LevelArg::Full, _, None) => new_uuid(),
        (LevelArg::Inc, None, _) => bail!(
            "no full backup in {}: run a full backup first (qmpbackup backup --level full)",
            layout.root().display()
        ),
        (_, Some(u), _) => u.clone(),
        (_, None, Some(u)) => u.clone(),
        (_, None, None) => new_uuid(),
    };
    let bitmap = format!("qmpbackup-{uuid}");
    let mut planned = Vec::new();
    // Per planned disk: its backup directory and the fleece image's, opened.
    let mut dirs: Vec<(Dir, Option<Dir>)> = Vec::new();
    for (i, d) in disks.into_iter().enumerate() {
        for m in layout.move_aside_partials(&d.name)? {
            report::warn(format!(
                "{}: an interrupted backup's file was moved aside to {}",
                d.label(),
                m.display()
            ));
        }
        let existing = d.bitmap(&bitmap).cloned();
        let chain_ok = old_uuid.as_deref() == Some(uuid.as_str())
            && existing.as_ref().is_some_and(|b| !b.inconsistent)
            && layout.has_full(&d.name)?;
        let level = match opts.level {
            LevelArg::Full => Level::Full,
            LevelArg::Copy => Level::Copy,
            LevelArg::Inc => {
                let label = d.label();
                match &existing {
                    None => bail!("bitmap {bitmap} is missing on {label}: the chain cannot continue, run a full backup"),
                    Some(b) if b.inconsistent => bail!(
                        "bitmap {bitmap} on {label} is inconsistent (QEMU was not shut down cleanly): the chain cannot continue, run a full backup"
                    ),
                    Some(b) if b.busy => bail!("bitmap {bitmap} on {label} is in use: is another backup running?"),
                    _ => {}
                }
                if !layout.has_full(&d.name)? {
                    bail!(
                        "no full backup in {}: run a full backup first",
                        layout.disk_dir(&d.name).display()
                    );
                }
                Level::Inc
            }
            LevelArg::Auto => {
                if chain_ok {
                    Level::Inc
                } else {
                    let why = if old_uuid.is_none() {
                        "no chain in the target yet".to_string()
                    } else if existing.is_none() {
                        format!("bitmap {bitmap} is missing (new disk, or QEMU restarted)")
                    } else if existing.as_ref().is_some_and(|b| b.inconsistent) {
                        format!("bitmap {bitmap} is inconsistent")
                    } else {
                        "no full backup for it in the target".to_string()
                    };
                    report::info(format!("{}: full backup ({why})", d.label()));
                    Level::Full
                }
            }
        };
        if level == Level::Inc && existing.as_ref().is_some_and(|b| b.busy) {
            bail!(
                "bitmap {bitmap} on {} is in use: is another backup running?",
                d.label()
            );
        }
        let mut p = Planned::new(d, i, level);
        p.replace_bitmap = level == Level::Full && existing.is_some();
        p.persistent = p.disk.can_persist_bitmaps();
        if level == Level::Full && !p.persistent {
            report::warn(format!(
                "{}: {} image cannot hold a persistent bitmap; tracking changes only while QEMU runs (after a restart `auto` takes a new full)",
                p.disk.label(),
                if p.disk.is_raw() { "raw" } else { "qcow2 v2" }
            ));
        }
        p.fleecing = fleecing_ok && p.disk.qdev.is_some() && !p.disk.pflash;
        let dir = layout.open_disk_dir(&p.disk.name, true)?;
        let name = layout.file_name(level, &p.disk.name);
        p.final_path = dir.join(&name);
        p.partial_path = dir.join(&format!("{name}.partial"));
        if dir.exists(&name)? {
            bail!(
                "{}: exists already (--no-timestamp?); not overwriting a backup",
                p.final_path.display()
            );
        }
        let mut fleece_dir = None;
        if p.fleecing {
            let fdir = match &opts.fleece_dir {
                Some(f) => Dir::create_all(f).with_context(|| {
                    format!("{}: cannot create the fleece directory", f.display())
                })?,
                None => layout.open_disk_dir(&p.disk.name, false)?,
            };
            p.fleece_path = Some(fdir.join(&fleece_name(&p.disk.name, timestamp)));
            fleece_dir = Some(fdir);
        }
        planned.push(p);
        dirs.push((dir, fleece_dir));
    }

    // Target and fleece images, created natively: qcow2 v3 always (a zeroed range must be
    // recordable), the source's cluster size and lazy-refcount setting. Created with
    // O_EXCL|O_NOFOLLOW in the opened directories; QEMU then opens them by path, and the run
    // checks that the path still names the file created here.
    let result: Result<()> = (|| {
        for (p, (dir, fdir)) in planned.iter_mut().zip(&dirs) {
            let copts = CreateOptions {
                size: p.disk.virtual_size,
                cluster_size: p.disk.cluster_size.unwrap_or(65536),
                lazy_refcounts: p.disk.lazy_refcounts,
                ..Default::default()
            };
            p.target_identity = Some(create_image(dir, &p.partial_path, &copts)?);
            if let (Some(fdir), Some(f)) = (fdir, &p.fleece_path) {
                p.fleece_identity = Some(create_image(fdir, f, &copts)?);
            }
        }
        Ok(())
    })();
    let (result, leftovers) = match result {
        Err(e) => (Err(e), Vec::new()),
        Ok(()) => {
            let run_opts = RunOptions {
                bitmap: bitmap.clone(),
                speed: opts.speed_limit,
                compress: opts.compress,
                cbw_timeout: opts.cbw_timeout,
                pause: opts.pause,
                remove_delay: opts.remove_delay,
                disable_cache: opts.disable_cache,
                aio: opts.aio.clone(),
                progress_interval: opts.progress_interval,
                json: opts.json,
                stall_timeout: opts.stall_timeout,
                cancel_timeout: opts.cancel_timeout,
            };
            for p in &planned {
                report::info(format!(
                    "{}: {} backup to {}",
                    p.disk.label(),
                    p.level.prefix(),
                    p.final_path.display()
                ));
            }
            run::run(qmp, &planned, &run_opts, abort, agent).await
        }
    };
    let mut kept_files = Vec::new();
    for (p, (_, fdir)) in planned.iter().zip(&dirs) {
        if let (Some(fdir), Some(f)) = (fdir, &p.fleece_path) {
            if fdir.remove(&file_name_of(f)).is_err() {
                kept_files.push(f.display().to_string());
            }
        }
    }
    let ran_ok = matches!(&result, Ok(r) if r.iter().all(|j| j.ok));
    if !ran_ok {
        kept_files.extend(remove_partials(&planned, &dirs));
    }
    let tail = failure_tail(&leftovers, &kept_files);
    let results = match result {
        Ok(r) => r,
        Err(e) => return Err(e.context(format!("backup failed; {tail}"))),
    };
    let failed: Vec<String> = planned
        .iter()
        .zip(&results)
        .filter(|(_, r)| !r.ok)
        .map(|(p, r)| {
            format!(
                "{}: {}",
                p.disk.label(),
                r.error.clone().unwrap_or_else(|| "failed".into())
            )
        })
        .collect();
    if !failed.is_empty() {
        bail!("backup failed ({}); {tail}", failed.join("; "));
    }

    // Publish: rename, read back natively into a manifest, config, uuid.
    let mut summary = Summary {
        uuid: uuid.clone(),
        timestamp,
        disks: Vec::new(),
    };
    for ((p, r), (dir, _)) in planned.iter().zip(&results).zip(&dirs) {
        let name = file_name_of(&p.final_path);
        dir.rename_noreplace(&file_name_of(&p.partial_path), &name)
            .with_context(|| format!("{}: cannot rename into place", p.partial_path.display()))?;
        manifest::write_manifest_in(dir, &name, Some(&uuid)).with_context(|| {
            format!(
                "{}: the new backup cannot be read back",
                p.final_path.display()
            )
        })?;
        write_config(p, dir);
        summary.disks.push(DiskSummary {
            disk: p.disk.label(),
            level: p.level,
            file: p.final_path.display().to_string(),
            bytes: r.bytes,
            seconds: r.seconds,
            bytes_per_second: if r.seconds > 0.0 {
                r.bytes as f64 / r.seconds
            } else {
                0.0
            },
        });
    }
    let starts_chain = planned.iter().any(|p| p.level == Level::Full) || old_uuid.is_none();
    if starts_chain && planned.iter().all(|p| p.level != Level::Copy) {
        layout.write_uuid(&uuid)?;
    }
    if let Some(old) = old_uuid.filter(|o| *o != uuid) {
        // The previous chain in this target ended: its bitmaps only slow the guest down.
        if planned.iter().all(|p| p.level == Level::Full) {
            let old_bitmap = format!("qmpbackup-{old}");
            for p in &planned {
                if p.disk.bitmap(&old_bitmap).is_some() {
                    let _ = qmp
                        .execute(
                            "block-dirty-bitmap-remove",
                            json!({"node": p.disk.node, "name": old_bitmap}),
                        )
                        .await;
                }
            }
        }
    }
    layout.update_symlink()?;
    Ok(summary)
}

/// Removes the run's target files; returns those that could not be removed.
fn remove_partials(planned: &[Planned], dirs: &[(Dir, Option<Dir>)]) -> Vec<String> {
    let mut kept = Vec::new();
    for (p, (dir, _)) in planned.iter().zip(dirs) {
        if dir.remove(&file_name_of(&p.partial_path)).is_err() {
            kept.push(p.partial_path.display().to_string());
        }
    }
    kept
}

/// The end of a failed run's message: what it left, in QEMU and on disk, and what to do.
fn failure_tail(in_qemu: &[String], on_disk: &[String]) -> String {
    let mut s = if on_disk.is_empty() {
        "no file of this run was kept".to_string()
    } else {
        format!(
            "files left on disk: {} (the next backup moves a .partial aside; remove them when QEMU is done with them)",
            on_disk.join(", ")
        )
    };
    if in_qemu.is_empty() {
        s.push_str(", and the next backup will hold every change");
    } else {
        s.push_str(&format!(
            "; left in QEMU: {}. `qmpbackup cleanup` removes them (the next backup does so too) and the next backup will hold every change",
            in_qemu.join("; ")
        ));
    }
    s
}

/// The last component of a path we built from a directory and a name.
fn file_name_of(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The fleece image's name in the fleece directory.
fn fleece_name(disk_name: &str, timestamp: u64) -> String {
    format!(".{disk_name}.fleece-{timestamp}.qcow2")
}

/// Creates a new empty qcow2 image at `path` in `dir` (nothing may exist there, not even a
/// symlink) and returns the identity of the file created.
fn create_image(dir: &Dir, path: &std::path::Path, opts: &CreateOptions) -> Result<(u64, u64)> {
    let what = || format!("{}: cannot create the target image", path.display());
    let file = dir.create_new(&file_name_of(path)).with_context(what)?;
    let identity = fsutil::identity(&file).with_context(what)?;
    let display = path.display().to_string();
    let made = init_qcow2(
        std::sync::Arc::new(FileStorage::from_file(file, true)),
        &display,
        Some(dir.path()),
        opts,
    )
    .and_then(|mut img| img.flush());
    if let Err(e) = made {
        let _ = dir.remove(&file_name_of(path));
        return Err(anyhow::Error::new(e).context(what()));
    }
    Ok(identity)
}

/// `<name>.config`: the source image's info as `qemu-img info --output json` shows it.
fn write_config(p: &Planned, dir: &Dir) {
    let name = format!("{}.config", p.disk.name);
    let path = dir.join(&name);
    let res = (|| -> Result<()> {
        let chain =
            qcow2::Chain::open(std::path::Path::new(&p.disk.filename), &Default::default())?;
        let info = qcow2::ops::info::layer_info(&chain, 0)?;
        dir.write_atomic(&name, &serde_json::to_vec_pretty(&info)?)?;
        Ok(())
    })();
    if let Err(e) = res {
        report::warn(format!(
            "{}: could not record the source image's info: {e:#}",
            path.display()
        ));
    }
}

impl Summary {
    pub fn human(&self) -> String {
        let mut s = String::new();
        for d in &self.disks {
            s.push_str(&format!(
                "{:<16} {:<4} {:>10} in {:>6.1} s ({}/s)  {}\n",
                d.disk,
                d.level.prefix(),
                report::bytes(d.bytes),
                d.seconds,
                report::bytes(d.bytes_per_second as u64),
                d.file
            ));
        }
        s
    }
}

/// `cleanup`: removes what an interrupted run left in QEMU (jobs, nodes; frozen bitmaps
/// are merged back into their chain's bitmap).
pub async fn repair(qmp: &Qmp) -> Result<Vec<String>> {
    run::repair_leftovers(qmp).await
}

/// `cleanup --remove-bitmap`: removes our bitmaps (all, or one chain's) from every disk.
pub async fn remove_bitmaps(qmp: &Qmp, uuid: Option<&str>) -> Result<Vec<String>> {
    let mut done = run::repair_leftovers(qmp).await?;
    for d in discover::discover(qmp).await? {
        for b in &d.bitmaps {
            let Some(name) = b.name.as_deref() else {
                continue;
            };
            let ours = match uuid {
                Some(u) => name == format!("qmpbackup-{u}"),
                None => name.starts_with("qmpbackup-"),
            };
            if ours {
                qmp.execute(
                    "block-dirty-bitmap-remove",
                    json!({"node": d.node, "name": name}),
                )
                .await
                .map_err(|e| anyhow!("removing {name} from {}: {e}", d.label()))?;
                done.push(format!("removed bitmap {name} from {}", d.label()));
            }
        }
    }
    Ok(done)
}
