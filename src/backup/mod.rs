//! qmpbackup's orchestration: discover the disks, plan each one's level and files, create
//! the target images natively, run the QMP sequence, then publish the files (rename,
//! manifest, config, uuid) only when every job succeeded.

pub mod discover;
pub mod layout;
pub mod run;

use crate::manifest;
use crate::qmp::types::{StatusInfo, VersionInfo};
use crate::qmp::Qmp;
use crate::report;
use crate::restore::discover::Level;
use anyhow::{anyhow, bail, Context, Result};
use discover::Disk;
use layout::{ensure_dir, Layout, LayoutOptions};
use qcow2::create::{create_qcow2, CreateOptions};
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
    let layout = Layout::new(opts.layout.clone(), timestamp);
    ensure_dir(&layout.root)?;
    let old_uuid = layout.read_uuid()?;

    // Levels and the chain's uuid.
    let uuid = match (opts.level, &old_uuid, &opts.uuid) {
        (LevelArg::Full, _, Some(u)) => u.clone(),
        (LevelArg::Full, _, None) => new_uuid(),
        (LevelArg::Inc, None, _) => bail!(
            "no full backup in {}: run a full backup first (qmpbackup backup --level full)",
            layout.root.display()
        ),
        (_, Some(u), _) => u.clone(),
        (_, None, Some(u)) => u.clone(),
        (_, None, None) => new_uuid(),
    };
    let bitmap = format!("qmpbackup-{uuid}");
    let mut planned = Vec::new();
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
        p.dir = layout.disk_dir(&p.disk.name);
        ensure_dir(&p.dir)?;
        let name = layout.file_name(level, &p.disk.name);
        p.final_path = p.dir.join(&name);
        p.partial_path = p.dir.join(format!("{name}.partial"));
        if p.final_path.exists() {
            bail!(
                "{}: exists already (--no-timestamp?); not overwriting a backup",
                p.final_path.display()
            );
        }
        if p.fleecing {
            let fdir = opts.fleece_dir.clone().unwrap_or_else(|| p.dir.clone());
            ensure_dir(&fdir)?;
            p.fleece_path = Some(fdir.join(format!(".{}.fleece-{timestamp}.qcow2", p.disk.name)));
        }
        planned.push(p);
    }

    // Target and fleece images, created natively: qcow2 v3 always (a zeroed range must be
    // recordable), the source's cluster size and lazy-refcount setting.
    let mut created: Vec<PathBuf> = Vec::new();
    let result = async {
        for p in &planned {
            let copts = CreateOptions {
                size: p.disk.virtual_size,
                cluster_size: p.disk.cluster_size.unwrap_or(65536),
                lazy_refcounts: p.disk.lazy_refcounts,
                ..Default::default()
            };
            for path in std::iter::once(&p.partial_path).chain(p.fleece_path.iter()) {
                let mut img = create_qcow2(path, &copts).with_context(|| {
                    format!("{}: cannot create the target image", path.display())
                })?;
                img.flush()?;
                created.push(path.clone());
            }
        }
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
    .await;
    for p in &planned {
        if let Some(f) = &p.fleece_path {
            let _ = std::fs::remove_file(f);
        }
    }
    let results = match result {
        Ok(r) => r,
        Err(e) => {
            remove_partials(&planned);
            return Err(e.context("backup failed; no file of this run was kept, and the next backup will hold every change"));
        }
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
        remove_partials(&planned);
        bail!(
            "backup failed ({}); no file of this run was kept, and the next backup will hold every change",
            failed.join("; ")
        );
    }

    // Publish: rename, read back natively into a manifest, config, uuid.
    let mut summary = Summary {
        uuid: uuid.clone(),
        timestamp,
        disks: Vec::new(),
    };
    for (p, r) in planned.iter().zip(&results) {
        std::fs::rename(&p.partial_path, &p.final_path)
            .with_context(|| format!("{}: cannot rename into place", p.partial_path.display()))?;
        manifest::write_manifest(&p.final_path, Some(&uuid)).with_context(|| {
            format!(
                "{}: the new backup cannot be read back",
                p.final_path.display()
            )
        })?;
        write_config(p);
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

fn remove_partials(planned: &[Planned]) {
    for p in planned {
        let _ = std::fs::remove_file(&p.partial_path);
    }
}

/// `<name>.config`: the source image's info as `qemu-img info --output json` shows it.
fn write_config(p: &Planned) {
    let path = p.dir.join(format!("{}.config", p.disk.name));
    let res = (|| -> Result<()> {
        let chain =
            qcow2::Chain::open(std::path::Path::new(&p.disk.filename), &Default::default())?;
        let info = qcow2::ops::info::layer_info(&chain, 0)?;
        std::fs::write(&path, serde_json::to_vec_pretty(&info)?)?;
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
