//! qmpbackup's orchestration: discover the disks, plan each one's level and files, create
//! the target images natively, run the QMP sequence, then publish the files (rename,
//! manifest, config, uuid) only when every job succeeded.

pub mod discover;
pub mod level;
pub mod metrics;
pub mod run;

use crate::backup::discover::Disk;
use crate::backup::level::{chain_uuid, decide_level, DiskFacts, RequestedLevel};
use crate::backup::run::{AbortFlag, AgentRef, Notes, Planned, RunOptions};
use crate::fsutil::{self, Dir};
use crate::metrics::MetricsOptions;
use crate::qmp::agent::Agent;
use crate::qmp::client::Qmp;
use crate::qmp::types::{StatusInfo, VersionInfo};
use crate::report;
use crate::store::disk_dir::DiskDir;
use crate::store::level::BackupLevel;
use crate::store::manifest;
use crate::store::name::{config_name, fleece_name, partial_name};
use crate::store::prune::{prune, PruneOptions};
use crate::store::retention::KeepOptions;
use crate::store::target::{Target, TargetOptions};
use crate::store::uuid::{bitmap_name, check_uuid, new_uuid};
use anyhow::{anyhow, bail, Context, Result};
use qcow2::create::{init_qcow2, CreateOptions};
use qcow2::storage::FileStorage;
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;

/// What a backup run does, as `qmpbackup backup` takes it.
#[derive(Debug, Clone, clap::Args)]
pub struct BackupOptions {
    /// full: a new chain (new bitmap); inc: changes since the last backup of the chain;
    /// auto: full where no chain can continue, else inc; copy: a standalone full copy that
    /// leaves the chain alone.
    #[arg(short = 'l', long, value_enum)]
    pub level: RequestedLevel,
    #[command(flatten)]
    pub target: TargetOptions,
    /// Only these disks (comma-separated device ids, drive ids or node names).
    #[arg(short = 'i', long, value_delimiter = ',')]
    pub include: Vec<String>,
    /// Not these disks (comma-separated).
    #[arg(short = 'e', long, value_delimiter = ',')]
    pub exclude: Vec<String>,
    /// Also back up raw disks (their change tracking lasts only while QEMU runs).
    #[arg(long)]
    pub include_raw: bool,
    /// Pause the VM for the milliseconds in which the point in time is set.
    #[arg(long)]
    pub pause: bool,
    /// Bytes per second per disk (K/M/G suffixes allowed); 0 = unlimited.
    #[arg(long, default_value = "0")]
    pub speed_limit: String,
    /// Seconds between progress lines when not on a terminal.
    #[arg(long, default_value_t = 5)]
    pub progress_interval: u64,
    /// Seconds a guest write may wait for its copy-before-write before the backup (not the
    /// guest) fails.
    #[arg(long, default_value_t = 45)]
    pub cbw_timeout: u64,
    /// Freeze the guest's filesystems (guest agent, --agent-socket) around the point in time.
    /// An agent that cannot be reached or cannot freeze gives a warning and a
    /// crash-consistent backup (marked not quiesced in the summary).
    #[arg(long, alias = "quisce")]
    pub quiesce: bool,
    /// Like --quiesce, but a guest that cannot be quiesced fails the backup.
    #[arg(long)]
    pub quiesce_required: bool,
    /// Compress the backup's clusters.
    #[arg(long)]
    pub compress: bool,
    /// Use this uuid for a new chain's bitmap name (qmpbackup-<uuid>).
    #[arg(long)]
    pub uuid: Option<String>,
    /// Seconds to wait before removing the temporary nodes.
    #[arg(long, default_value_t = 0)]
    pub remove_delay: u64,
    /// Open targets with O_DIRECT (not on tmpfs).
    #[arg(long = "blockdev-disable-cache")]
    pub disable_cache: bool,
    /// AIO mode for the targets.
    #[arg(
        long = "blockdev-aio",
        value_enum,
        default_value = "threads",
        value_name = "BLOCKDEV_AIO"
    )]
    pub aio: Aio,
    /// Directory for the temporary fleece images (default: beside the backups).
    #[arg(long)]
    pub fleece_dir: Option<PathBuf>,
    /// Print progress events and the summary as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
    /// After a successful backup, prune each backed-up disk's points across the target
    /// (month folders included) with these keep options, as `qmprestore prune` does; never
    /// after a failed one. Exit code 3: the backup succeeded but the prune did not.
    #[command(flatten)]
    pub keep: KeepOptions,
    #[command(flatten)]
    pub metrics: MetricsOptions,
    /// Cancel the backup (and fail) when a disk's job has made no progress for this many
    /// seconds: a stuck storage or QEMU never keeps the run waiting forever.
    #[arg(long, default_value_t = 1800, value_name = "SECONDS")]
    pub stall_timeout: u64,
    /// After SIGINT/SIGTERM (or a stall), how many seconds QEMU gets to cancel the jobs and
    /// the run to undo its changes; then it leaves, saying what it left (`qmpbackup
    /// cleanup` removes it). A second signal leaves at once.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub cancel_timeout: u64,
}

/// QEMU's AIO mode for the backup targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Aio {
    Threads,
    #[value(name = "io_uring")]
    IoUring,
}

impl Aio {
    /// The name QEMU's `aio` option takes.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Aio::Threads => "threads",
            Aio::IoUring => "io_uring",
        }
    }
}

impl BackupOptions {
    /// `--speed-limit` in bytes per second (0 = unlimited).
    pub fn speed_limit_bytes(&self) -> Result<u64> {
        qcow2::create::parse_size(&self.speed_limit)
            .with_context(|| format!("invalid --speed-limit {:?}", self.speed_limit))
    }

    /// How long a job may make no progress before the run is cancelled (at least 1 s).
    pub fn stall_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.stall_timeout.max(1))
    }

    /// How long cancelling and undoing may take after a signal or a stall.
    pub fn cancel_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.cancel_timeout)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskSummary {
    pub disk: String,
    /// The disk's name in the target (its directory, or the name part of its files).
    #[serde(skip)]
    pub name: String,
    pub level: BackupLevel,
    pub file: String,
    /// Guest bytes of data the backup file holds: what was actually copied.
    pub bytes: u64,
    /// Guest bytes the job went over (the disk's size for a full backup).
    pub scanned: u64,
    pub seconds: f64,
    /// Copied bytes per second.
    pub bytes_per_second: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub uuid: String,
    pub timestamp: u64,
    pub disks: Vec<DiskSummary>,
    /// Whether the guest's filesystems were frozen for the point in time.
    pub quiesced: bool,
    /// What the run warned about (a guest not quiesced, state not backed up, …).
    pub warnings: Vec<String>,
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

/// Connects to the guest agent for `--quiesce`: None (with a warning in `notes`) when it
/// cannot be reached or cannot freeze, unless `--quiesce-required`.
pub async fn connect_agent(
    path: Option<&str>,
    opts: &BackupOptions,
    notes: &mut Notes,
) -> Result<Option<tokio::sync::Mutex<Agent>>> {
    if !opts.quiesce && !opts.quiesce_required {
        return Ok(None);
    }
    let path =
        path.context("--quiesce needs --agent-socket (the guest agent's socket, see --help)")?;
    let attempt = async {
        let mut ag = Agent::connect(path, std::time::Duration::from_secs(10)).await?;
        let fs = ag.freeze_support().await?;
        if !fs.supported || !fs.enabled {
            bail!("it cannot freeze filesystems (guest-fsfreeze-freeze not supported or disabled)");
        }
        if ag.status().await? == "frozen" {
            report::warn("guest filesystems were frozen already; thawing them first");
            ag.thaw().await?;
        }
        Ok(ag)
    };
    match attempt.await {
        Ok(ag) => Ok(Some(tokio::sync::Mutex::new(ag))),
        Err(e) if opts.quiesce_required => Err(e.context(format!(
            "--quiesce-required: the guest agent at {path} cannot quiesce the guest; nothing was backed up"
        ))),
        Err(e) => {
            notes.warn(format!(
                "guest agent at {path}: {e:#}; this backup is NOT quiesced (crash-consistent, as after a power cut); --quiesce-required makes this an error"
            ));
            Ok(None)
        }
    }
}

/// Emulated TPMs (swtpm): their state lives outside QEMU's disks, so a backup of the disks
/// does not hold it; each gets a warning.
async fn warn_about_tpms(qmp: &Qmp, notes: &mut Notes) {
    let Ok(tpms) = qmp.execute("query-tpm", json!({})).await else {
        return;
    };
    for t in tpms.as_array().into_iter().flatten() {
        let kind = t.pointer("/options/type").and_then(|v| v.as_str());
        if kind == Some("emulator") {
            let id = t.get("id").and_then(|v| v.as_str()).unwrap_or("?");
            notes.warn(format!(
                "TPM {id}: an emulated TPM (swtpm); its state is not part of this backup (back up swtpm's state directory separately)"
            ));
        }
    }
}

/// Runs one backup. The caller owns the QMP connection, the agent and the abort flag;
/// warnings go to `notes` and into the summary.
pub async fn backup(
    qmp: &Qmp,
    opts: &BackupOptions,
    agent: AgentRef<'_>,
    abort: &AbortFlag,
    notes: &mut Notes,
) -> Result<Summary> {
    let speed = opts.speed_limit_bytes()?;
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
    warn_about_tpms(qmp, notes).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    if let Some(u) = &opts.uuid {
        check_uuid(u).context("--uuid")?;
    }
    let mut target = Target::open(opts.target.clone(), now)?;
    // Held until the run returns: no other run changes these directories meanwhile.
    let mut locks = vec![target.lock_root()?];
    let old_uuid = target.read_uuid()?;

    // Each existing disk directory is locked before its leftovers are moved aside (a new
    // one once it is created) and read once; then the run's time is set after every point
    // already there.
    let mut disk_locks = Vec::new();
    let mut scans = Vec::new();
    let mut newest = None;
    for d in &disks {
        disk_locks.push(match target.open_disk_dir(&d.name, false) {
            Ok(dir) => target.lock_disk_dir(&dir)?,
            Err(_) => None,
        });
        for m in target.move_aside_partials(&d.name)? {
            report::warn(format!(
                "{}: an interrupted backup's file was moved aside to {}",
                d.label(),
                m.display()
            ));
        }
        // Unreadable: no point to follow; the level decision reports the error.
        let scan = target.scan_disk(&d.name);
        newest = newest.max(scan.as_ref().ok().and_then(|s| s.as_ref()?.newest_time()));
        scans.push(scan);
    }
    let timestamp = run_time(now, newest);
    target.timestamp = timestamp;

    // Levels and the chain's uuid.
    let uuid = chain_uuid(
        opts.level,
        old_uuid.as_deref(),
        opts.uuid.as_deref(),
        target.root(),
        new_uuid,
    )?;
    let bitmap = bitmap_name(&uuid);
    let mut planned = Vec::new();
    // Per planned disk: its backup directory and the fleece image's, opened.
    let mut dirs: Vec<(Dir, Option<Dir>)> = Vec::new();
    let per_disk = disks.into_iter().zip(disk_locks).zip(scans);
    for (i, ((d, mut disk_lock), scan)) in per_disk.enumerate() {
        let existing = d.bitmap(&bitmap).cloned();
        let label = d.label();
        let facts = DiskFacts {
            label: &label,
            bitmap_name: &bitmap,
            bitmap: existing.as_ref(),
            target_uuid: old_uuid.as_deref(),
            run_uuid: &uuid,
            disk_dir: &target.disk_dir(&d.name),
        };
        let has_full = || match &scan {
            Ok(dir) => Ok(dir.as_ref().is_some_and(DiskDir::has_full)),
            Err(e) => Err(anyhow!("{e:#}")),
        };
        let choice = decide_level(opts.level, &facts, has_full)?;
        if let Some(why) = &choice.why_full {
            report::info(format!("{label}: full backup ({why})"));
        }
        let level = choice.level;
        let mut p = Planned::new(d, i, level);
        p.replace_bitmap = level == BackupLevel::Full && existing.is_some();
        p.persistent = p.disk.can_persist_bitmaps();
        if level == BackupLevel::Full && !p.persistent {
            report::warn(format!(
                "{}: {} image cannot hold a persistent bitmap; tracking changes only while QEMU runs (after a restart `auto` takes a new full)",
                p.disk.label(),
                if p.disk.is_raw() { "raw" } else { "qcow2 v2" }
            ));
        }
        p.fleecing = fleecing_ok && p.disk.qdev.is_some() && !p.disk.pflash;
        let dir = target.open_disk_dir(&p.disk.name, true)?;
        if disk_lock.is_none() {
            disk_lock = target.lock_disk_dir(&dir)?;
        }
        locks.extend(disk_lock);
        let name = target.file_name(level, &p.disk.name);
        p.final_path = dir.join(&name);
        p.partial_path = dir.join(&partial_name(&name));
        if dir.exists(&name)? {
            if target.opts.no_timestamp && level != BackupLevel::Inc {
                bail!(
                    "{}: exists already; with --no-timestamp a directory holds one full or copy (not overwriting a backup): move it away, or use another --target or --monthly",
                    p.final_path.display()
                );
            }
            bail!(
                "{}: exists already; not overwriting a backup",
                p.final_path.display()
            );
        }
        let mut fleece_dir = None;
        if p.fleecing {
            let fdir = match &opts.fleece_dir {
                Some(f) => Dir::create_all(f).with_context(|| {
                    format!("{}: cannot create the fleece directory", f.display())
                })?,
                None => target.open_disk_dir(&p.disk.name, false)?,
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
                speed,
                compress: opts.compress,
                cbw_timeout: opts.cbw_timeout,
                pause: opts.pause,
                remove_delay: opts.remove_delay,
                disable_cache: opts.disable_cache,
                aio: opts.aio.qemu_name().into(),
                progress_interval: opts.progress_interval,
                json: opts.json,
                stall_timeout: opts.stall_timeout(),
                cancel_timeout: opts.cancel_timeout(),
                quiesce_required: opts.quiesce_required,
            };
            for p in &planned {
                report::info(format!(
                    "{}: {} backup to {}",
                    p.disk.label(),
                    p.level.prefix(),
                    p.final_path.display()
                ));
            }
            run::run(qmp, &planned, &run_opts, abort, agent, notes).await
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
        quiesced: false,
        warnings: Vec::new(),
    };
    for ((p, r), (dir, _)) in planned.iter().zip(&results).zip(&dirs) {
        let name = file_name_of(&p.final_path);
        dir.rename_noreplace(&file_name_of(&p.partial_path), &name)
            .with_context(|| format!("{}: cannot rename into place", p.partial_path.display()))?;
        let origin = manifest::Origin {
            level: p.level,
            time: timestamp,
        };
        manifest::write_manifest_in(dir, &name, Some(&uuid), Some(origin)).with_context(|| {
            format!(
                "{}: the new backup cannot be read back",
                p.final_path.display()
            )
        })?;
        if let Some(link) = target.level_link(p.level, &p.disk.name) {
            if let Err(e) = dir.replace_symlink(&name, &link) {
                report::warn(format!(
                    "{}: no symlink made: {e}",
                    dir.join(&link).display()
                ));
            }
        }
        write_config(p, dir);
        let copied = copied_bytes(&p.final_path).unwrap_or(r.bytes);
        summary.disks.push(DiskSummary {
            disk: p.disk.label(),
            name: p.disk.name.clone(),
            level: p.level,
            file: p.final_path.display().to_string(),
            bytes: copied,
            scanned: r.bytes,
            seconds: r.seconds,
            bytes_per_second: if r.seconds > 0.0 {
                copied as f64 / r.seconds
            } else {
                0.0
            },
        });
    }
    let starts_chain = planned.iter().any(|p| p.level == BackupLevel::Full) || old_uuid.is_none();
    if starts_chain && planned.iter().all(|p| p.level != BackupLevel::Copy) {
        target.write_uuid(&uuid)?;
    }
    if let Some(old) = old_uuid.filter(|o| *o != uuid) {
        // The previous chain in this target ended: its bitmaps only slow the guest down.
        if planned.iter().all(|p| p.level == BackupLevel::Full) {
            let old_bitmap = bitmap_name(&old);
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
    target.update_current_link()?;
    summary.quiesced = notes.quiesced;
    summary.warnings = notes.warnings.clone();
    Ok(summary)
}

/// The run's point in time: now, or one second after the newest point already in its
/// directories when that is not older (two runs in one second, or a clock set back), so
/// every point has its own time and the chain's order is the order of the runs.
fn run_time(now: u64, newest: Option<u64>) -> u64 {
    match newest {
        Some(n) if n >= now => {
            let t = n.saturating_add(1);
            report::info(format!(
                "a backup of {} exists already: this backup's time is {} ({t})",
                crate::humanize::format_utc(n as i64),
                crate::humanize::format_utc(t as i64)
            ));
            t
        }
        _ => now,
    }
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

/// Creates a new empty qcow2 image at `path` in `dir` (nothing may exist there, not even a
/// symlink) and returns the identity of the file created.
fn create_image(dir: &Dir, path: &std::path::Path, opts: &CreateOptions) -> Result<(u64, u64)> {
    let what = || format!("{}: cannot create the target image", path.display());
    let file = dir.create_new(&file_name_of(path)).with_context(what)?;
    let identity = fsutil::identity(&file).with_context(what)?;
    let display = path.display().to_string();
    let made = FileStorage::from_file(file, true)
        .map_err(|e| qcow2::Error::io(&display, "opening", 0, e))
        .and_then(|storage| {
            init_qcow2(
                std::sync::Arc::new(storage),
                &display,
                Some(dir.path()),
                opts,
            )
        })
        .and_then(|mut img| img.flush());
    if let Err(e) = made {
        let _ = dir.remove(&file_name_of(path));
        return Err(anyhow::Error::new(e).context(what()));
    }
    Ok(identity)
}

/// Guest bytes of data in a new backup file (read from its metadata alone).
fn copied_bytes(path: &std::path::Path) -> Result<u64> {
    let chain = qcow2::Chain::open(
        path,
        &qcow2::OpenOptions {
            format: Some(qcow2::Format::Qcow2),
            no_backing: true,
        },
    )?;
    Ok(qcow2::ops::map::data_bytes(&chain)?)
}

/// `<name>.config`: the source image's info as `qemu-img info --output json` shows it.
fn write_config(p: &Planned, dir: &Dir) {
    let name = config_name(&p.disk.name);
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
                "{:<16} {:<4} {:>10} copied of {:>10} in {:>6.1} s ({}/s)  {}\n",
                d.disk,
                d.level.prefix(),
                report::bytes(d.bytes),
                report::bytes(d.scanned),
                d.seconds,
                report::bytes(d.bytes_per_second as u64),
                d.file
            ));
        }
        for w in &self.warnings {
            s.push_str(&format!("warning: {w}\n"));
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
                Some(u) => name == bitmap_name(u),
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

/// After a successful run with keep options: prunes the disks it backed up, across the
/// whole target, with the plan on stderr (as a JSON event with `--json`). An error says
/// how to finish the prune by hand; the backup itself stands either way.
pub fn prune_after_backup(opts: &BackupOptions, summary: &Summary) -> Result<()> {
    let policy = opts.keep.policy();
    if policy.is_empty() {
        return Ok(());
    }
    let target = &opts.target.target;
    let mut names: Vec<String> = summary.disks.iter().map(|d| d.name.clone()).collect();
    names.sort();
    names.dedup();
    let popts = PruneOptions {
        policy,
        zone: opts.keep.zone(),
        disks: Some(names),
        ..Default::default()
    };
    let again = format!(
        "the backup succeeded and stays; finish the prune with `qmprestore prune --dir {} --{}{}`",
        target.display(),
        policy.describe().replace(", ", " --"),
        if opts.keep.utc { " --utc" } else { "" }
    );
    let reporting = crate::progress::Reporting {
        json: false,
        stdout_is_data: true,
        quiet: false,
    };
    let report = prune(target, &popts, &reporting, |plan| {
        if opts.json {
            println!("{}", json!({"event": "prune-plan", "plan": plan}));
        } else {
            eprint!("{}", plan.human());
        }
    })
    .with_context(|| again.clone())?;
    if report.failed() {
        bail!("some disks could not be pruned (see the plan); {again}");
    }
    Ok(())
}
