//! The QMP sequence of one backup run, and the teardown that always follows it.
//!
//! Order (fleecing, QEMU ≥ 7.1), chosen so no guest write is lost:
//! 1. targets and fleece images are attached (blockdev-add);
//! 2. the bitmaps are cut in one transaction: FULL adds the chain's bitmap; INC freezes the
//!    bitmap's content into a disabled `-f` copy and clears the live one, which keeps
//!    recording; nothing is lost whatever happens next, since the copy is merged back on failure;
//! 3. per disk: copy-before-write filter (INC: limited to the frozen bitmap), `qom-set` of the
//!    device onto it — the disk's point in time — and a snapshot-access node;
//! 4. one transaction starts every backup job (INC: the frozen bits are copied onto the
//!    snapshot node's bitmap, `sync=incremental`).
//!
//! Writes between 2 and 3 land both in the backup and in the live bitmap: duplicated in the
//! next INC, never lost. Disks without a QOM path (pflash) and QEMU < 7.1 use a plain
//! `blockdev-backup` from the disk node, whose point in time is its transaction.

use crate::backup::discover::{Disk, NODE_PREFIX};
use crate::qmp::agent::Agent;
use crate::qmp::client::{Qmp, QmpError};
use crate::qmp::types::BlockInfo;
use crate::report;
use crate::store::level::BackupLevel;
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One disk's part of a run.
#[derive(Debug, Clone)]
pub struct Planned {
    pub disk: Disk,
    pub level: BackupLevel,
    pub fleecing: bool,
    pub persistent: bool,
    /// Remove an existing bitmap of the same name in the cut (new FULL over a broken chain).
    pub replace_bitmap: bool,
    pub final_path: PathBuf,
    pub partial_path: PathBuf,
    pub fleece_path: Option<PathBuf>,
    /// (device, inode) of the target and fleece files we created, to check that QEMU
    /// opened those very files by their paths.
    pub target_identity: Option<(u64, u64)>,
    pub fleece_identity: Option<(u64, u64)>,
    pub tgt: String,
    pub flc: String,
    pub cbw: String,
    pub snap: String,
    pub job: String,
}

impl Planned {
    pub fn new(disk: Disk, index: usize, level: BackupLevel) -> Planned {
        let n = format!("{NODE_PREFIX}{index}");
        Planned {
            disk,
            level,
            fleecing: false,
            persistent: true,
            replace_bitmap: false,
            final_path: PathBuf::new(),
            partial_path: PathBuf::new(),
            fleece_path: None,
            target_identity: None,
            fleece_identity: None,
            tgt: format!("{n}-tgt"),
            flc: format!("{n}-flc"),
            cbw: format!("{n}-cbw"),
            snap: format!("{n}-snap"),
            job: n,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub bitmap: String,
    pub speed: u64,
    pub compress: bool,
    pub cbw_timeout: u64,
    pub pause: bool,
    pub remove_delay: u64,
    pub disable_cache: bool,
    pub aio: String,
    pub progress_interval: u64,
    pub json: bool,
    /// A job whose progress has not moved for this long is cancelled and the run fails.
    pub stall_timeout: Duration,
    /// How long QEMU gets to cancel the jobs and let the run undo its changes, after a
    /// signal or a stall; then the run leaves, saying what it left.
    pub cancel_timeout: Duration,
    /// A guest agent that cannot freeze fails the run (else it is a warning).
    pub quiesce_required: bool,
}

/// What a run has to say beside its result: warnings (each logged, a `--json` event, and
/// listed in the summary) and whether the guest was quiesced.
#[derive(Debug, Default)]
pub struct Notes {
    json: bool,
    pub warnings: Vec<String>,
    pub quiesced: bool,
}

impl Notes {
    pub fn new(json: bool) -> Notes {
        Notes {
            json,
            ..Default::default()
        }
    }

    /// Logs a warning, emits it as a `--json` event, and keeps it for the summary.
    pub fn warn(&mut self, msg: String) {
        report::warn(&msg);
        if self.json {
            println!("{}", json!({"event": "warning", "message": msg}));
        }
        self.warnings.push(msg);
    }
}

impl RunOptions {
    pub fn frozen_bitmap(&self) -> String {
        format!("{}-f", self.bitmap)
    }
}

/// What we changed in QEMU, so teardown can undo exactly that.
#[derive(Default)]
struct Undo {
    /// A freeze was asked of the guest agent: thaw right after the cut, on every path.
    guest_frozen: bool,
    added_nodes: Vec<String>,
    switched: Vec<(String, String, String)>, // (qdev, original node, cbw node)
    frozen: Vec<String>,                     // disk nodes with a frozen bitmap
    new_bitmaps: Vec<String>,                // disk nodes where this run added the chain bitmap
    jobs: Vec<String>,
    stopped: bool,
}

#[derive(Debug, Clone, Default)]
pub struct JobResult {
    pub ok: bool,
    pub error: Option<String>,
    pub bytes: u64,
    pub seconds: f64,
}

/// Why and by when a run must stop: set by the signal handler (and by a stalled job). The
/// first signal asks the run to cancel its jobs and undo its changes within the cancel
/// timeout; a second one makes it leave at once. The deadline is followed by the QMP
/// client, so no call or wait outlasts it.
pub struct Abort {
    signals: AtomicU32,
    deadline: tokio::sync::watch::Sender<Option<tokio::time::Instant>>,
}

pub type AbortFlag = Arc<Abort>;

impl Abort {
    pub fn new() -> AbortFlag {
        Arc::new(Abort {
            signals: AtomicU32::new(0),
            deadline: tokio::sync::watch::channel(None).0,
        })
    }

    /// A signal arrived: the first gives the run `grace` to clean up, the next ends every
    /// wait now. Returns how many signals have arrived.
    pub fn signal(&self, grace: Duration) -> u32 {
        let n = self.signals.fetch_add(1, Ordering::SeqCst) + 1;
        self.limit(if n == 1 { grace } else { Duration::ZERO });
        n
    }

    /// Whether a signal asked the run to stop.
    pub fn requested(&self) -> bool {
        self.signals.load(Ordering::SeqCst) > 0
    }

    /// Ends every wait for QEMU within `grace` from now (or earlier, if already set so).
    pub fn limit(&self, grace: Duration) {
        let at = tokio::time::Instant::now() + grace;
        self.deadline.send_modify(|d| {
            *d = Some(d.map_or(at, |old| old.min(at)));
        });
    }

    /// What the QMP client follows (see [`crate::qmp::client::Qmp::follow_deadline`]).
    pub fn deadline(&self) -> tokio::sync::watch::Receiver<Option<tokio::time::Instant>> {
        self.deadline.subscribe()
    }
}

fn node_args(p: &Planned, opts: &RunOptions, file: &std::path::Path, target: bool) -> Value {
    let mut file_opts =
        json!({"driver": "file", "filename": file.display().to_string(), "aio": opts.aio});
    if opts.disable_cache && target {
        file_opts["cache"] = json!({"direct": true, "no-flush": false});
    }
    let mut v = json!({
        "driver": "qcow2",
        "node-name": if target { &p.tgt } else { &p.flc },
        "file": file_opts,
    });
    if target {
        // A fleecing read of an overlay returns zeros as data; keep the target sparse.
        v["detect-zeroes"] = json!("unmap");
        v["discard"] = json!("unmap");
    }
    v
}

async fn check_abort(abort: &AbortFlag) -> Result<()> {
    if abort.requested() {
        bail!("interrupted");
    }
    Ok(())
}

/// After QEMU opened a file we created by its path: the path must still name that file,
/// else someone replaced it in between and QEMU writes elsewhere.
fn check_opened(path: &std::path::Path, identity: Option<(u64, u64)>) -> Result<()> {
    let Some(id) = identity else { return Ok(()) };
    if !crate::fsutil::path_is(path, id) {
        bail!(
            "{}: no longer the file qmpbackup created (replaced while QEMU opened it?); aborting, nothing of this run is kept",
            path.display()
        );
    }
    Ok(())
}

/// The guest agent, when the run quiesces the guest.
pub type AgentRef<'a> = Option<&'a tokio::sync::Mutex<Agent>>;

/// What a run left in QEMU because QEMU did not let it undo everything in time (empty
/// when everything was undone).
pub type Leftovers = Vec<String>;

/// Runs the backup of `disks`. With an agent, the guest's filesystems are frozen just before
/// the bitmap cut and thawed right after the jobs start — and on every error path. Returns
/// per-disk results, and what could not be undone in QEMU; teardown has run.
pub async fn run(
    qmp: &Qmp,
    disks: &[Planned],
    opts: &RunOptions,
    abort: &AbortFlag,
    agent: AgentRef<'_>,
    notes: &mut Notes,
) -> (Result<Vec<JobResult>>, Leftovers) {
    let mut undo = Undo::default();
    let started = run_setup(qmp, disks, opts, abort, &mut undo, agent, notes).await;
    if undo.guest_frozen {
        if let Some(a) = agent {
            match a.lock().await.thaw().await {
                Ok(n) => report::info(format!("guest filesystems thawed ({n})")),
                Err(e) => report::warn(format!("thawing the guest filesystems failed: {e}")),
            }
        }
    }
    if undo.stopped {
        if let Err(e) = qmp.execute("cont", json!({})).await {
            report::warn(format!("resuming the VM failed: {e}"));
        }
        undo.stopped = false;
    }
    let results = match started {
        Ok(()) => wait_jobs(qmp, disks, opts, abort, &mut undo).await,
        Err(e) => Err(e),
    };
    let ok = matches!(&results, Ok(r) if r.iter().all(|j| j.ok));
    if !ok {
        // However the run failed, undoing it must not wait on QEMU forever.
        abort.limit(opts.cancel_timeout);
    }
    let left = teardown(qmp, opts, &mut undo, ok).await;
    (results, left)
}

async fn run_setup(
    qmp: &Qmp,
    disks: &[Planned],
    opts: &RunOptions,
    abort: &AbortFlag,
    undo: &mut Undo,
    agent: AgentRef<'_>,
    notes: &mut Notes,
) -> Result<()> {
    // 1. targets and fleece images
    for p in disks {
        check_abort(abort).await?;
        qmp.execute("blockdev-add", node_args(p, opts, &p.partial_path, true))
            .await
            .map_err(|e| {
                anyhow!(
                    "attaching target {}: {}",
                    p.partial_path.display(),
                    e.desc()
                )
            })?;
        undo.added_nodes.push(p.tgt.clone());
        check_opened(&p.partial_path, p.target_identity)?;
        if let (true, Some(f)) = (p.fleecing, &p.fleece_path) {
            qmp.execute("blockdev-add", node_args(p, opts, f, false))
                .await
                .map_err(|e| anyhow!("attaching fleece image {}: {}", f.display(), e.desc()))?;
            undo.added_nodes.push(p.flc.clone());
            check_opened(f, p.fleece_identity)?;
        }
    }
    // A new FULL over a chain that cannot continue: its bitmap (inconsistent, or with no
    // FULL behind it) is useless, and QEMU cannot remove and re-add one name within a
    // single transaction, so it goes first.
    for p in disks
        .iter()
        .filter(|p| p.level == BackupLevel::Full && p.replace_bitmap)
    {
        qmp.execute(
            "block-dirty-bitmap-remove",
            json!({"node": p.disk.node, "name": opts.bitmap}),
        )
        .await
        .map_err(|e| {
            anyhow!(
                "{}: removing the old bitmap {}: {}",
                p.disk.label(),
                opts.bitmap,
                e.desc()
            )
        })?;
    }
    check_abort(abort).await?;
    // Quiesce and/or pause exactly around the point in time.
    if let Some(a) = agent {
        let mut a = a.lock().await;
        // Set before the call: a freeze that timed out may still have happened.
        undo.guest_frozen = true;
        match a.freeze().await {
            Ok(n) => {
                report::info(format!("guest filesystems frozen ({n})"));
                notes.quiesced = true;
            }
            Err(e) if opts.quiesce_required => bail!("quiescing the guest: {e}"),
            // Thawed after the cut all the same: a freeze that failed late may have held.
            Err(e) => notes.warn(format!(
                "quiescing the guest failed ({e}): this backup is NOT quiesced (crash-consistent, as after a power cut); --quiesce-required makes this an error"
            )),
        }
    }
    if opts.pause {
        qmp.execute("stop", json!({})).await?;
        undo.stopped = true;
    }
    // 2. the bitmap cut
    let frozen = opts.frozen_bitmap();
    let mut cut = Vec::new();
    for p in disks {
        match p.level {
            BackupLevel::Full => {
                cut.push(json!({"type": "block-dirty-bitmap-add", "data": {"node": p.disk.node, "name": opts.bitmap, "persistent": p.persistent}}));
            }
            BackupLevel::Inc => {
                cut.push(json!({"type": "block-dirty-bitmap-add", "data": {"node": p.disk.node, "name": frozen, "persistent": false, "disabled": true}}));
                cut.push(json!({"type": "block-dirty-bitmap-merge", "data": {"node": p.disk.node, "target": frozen, "bitmaps": [opts.bitmap]}}));
                cut.push(json!({"type": "block-dirty-bitmap-clear", "data": {"node": p.disk.node, "name": opts.bitmap}}));
            }
            BackupLevel::Copy => {}
        }
    }
    if !cut.is_empty() {
        qmp.execute("transaction", json!({"actions": cut}))
            .await
            .map_err(|e| anyhow!("cutting the dirty bitmaps: {}", e.desc()))?;
        for p in disks {
            match p.level {
                BackupLevel::Full => undo.new_bitmaps.push(p.disk.node.clone()),
                BackupLevel::Inc => undo.frozen.push(p.disk.node.clone()),
                BackupLevel::Copy => {}
            }
        }
    }
    // 3. filters: the device switches to copy-before-write (its point in time)
    for p in disks.iter().filter(|p| p.fleecing) {
        check_abort(abort).await?;
        let mut cbw = json!({
            "driver": "copy-before-write", "node-name": p.cbw, "file": p.disk.node,
            "target": p.flc, "on-cbw-error": "break-snapshot", "cbw-timeout": opts.cbw_timeout,
        });
        if p.level == BackupLevel::Inc {
            cbw["bitmap"] = json!({"node": p.disk.node, "name": frozen});
        }
        qmp.execute("blockdev-add", cbw).await.map_err(|e| {
            anyhow!(
                "adding the copy-before-write filter for {}: {}",
                p.disk.label(),
                e.desc()
            )
        })?;
        undo.added_nodes.push(p.cbw.clone());
        let qdev = p.disk.qdev.clone().expect("fleecing needs a qdev");
        qmp.execute(
            "qom-set",
            json!({"path": qdev, "property": "drive", "value": p.cbw}),
        )
        .await
        .map_err(|e| anyhow!("switching {} to the filter: {}", p.disk.label(), e.desc()))?;
        undo.switched
            .push((qdev, p.disk.node.clone(), p.cbw.clone()));
        qmp.execute(
            "blockdev-add",
            json!({"driver": "snapshot-access", "node-name": p.snap, "file": p.cbw}),
        )
        .await
        .map_err(|e| {
            anyhow!(
                "adding the snapshot node for {}: {}",
                p.disk.label(),
                e.desc()
            )
        })?;
        undo.added_nodes.push(p.snap.clone());
    }
    // 4. the jobs, in one transaction
    let mut actions = Vec::new();
    for p in disks {
        let source = if p.fleecing { &p.snap } else { &p.disk.node };
        let mut backup = json!({
            "device": source, "target": p.tgt, "job-id": p.job,
            "speed": opts.speed, "compress": opts.compress,
        });
        match p.level {
            BackupLevel::Full | BackupLevel::Copy => backup["sync"] = json!("full"),
            BackupLevel::Inc if p.fleecing => {
                actions.push(json!({"type": "block-dirty-bitmap-add", "data": {"node": p.snap, "name": opts.bitmap, "persistent": false}}));
                actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {"node": p.snap, "target": opts.bitmap, "bitmaps": [{"node": p.disk.node, "name": frozen}]}}));
                backup["sync"] = json!("incremental");
                backup["bitmap"] = json!(opts.bitmap);
            }
            BackupLevel::Inc => {
                backup["sync"] = json!("bitmap");
                backup["bitmap"] = json!(frozen);
                backup["bitmap-mode"] = json!("never");
            }
        }
        actions.push(json!({"type": "blockdev-backup", "data": backup}));
    }
    qmp.execute("transaction", json!({"actions": actions}))
        .await
        .map_err(|e| anyhow!("starting the backup jobs: {}", e.desc()))?;
    undo.jobs = disks.iter().map(|p| p.job.clone()).collect();
    Ok(())
}

struct Progress {
    bars: Option<(indicatif::MultiProgress, Vec<indicatif::ProgressBar>)>,
    last_log: Instant,
}

impl Progress {
    fn new(disks: &[Planned], json: bool) -> Progress {
        use std::io::IsTerminal;
        let bars = (!json && std::io::stderr().is_terminal()).then(|| {
            let mp = indicatif::MultiProgress::new();
            let style = crate::progress::bar_style();
            let bars = disks
                .iter()
                .map(|p| {
                    let b = mp.add(indicatif::ProgressBar::new(p.disk.virtual_size));
                    b.set_style(style.clone());
                    b.set_prefix(p.disk.label());
                    b
                })
                .collect();
            (mp, bars)
        });
        Progress {
            bars,
            last_log: Instant::now(),
        }
    }
}

/// Per job: its last reported progress and when it last moved.
struct Watch {
    progress: u64,
    moved: Instant,
}

/// Marks every job without a result as failed with `why`.
fn fail_remaining(results: &mut HashMap<String, JobResult>, disks: &[Planned], why: &str) {
    for p in disks {
        results.entry(p.job.clone()).or_insert(JobResult {
            ok: false,
            error: Some(why.to_string()),
            ..Default::default()
        });
    }
}

async fn cancel_jobs(qmp: &Qmp, jobs: &[String]) {
    for j in jobs {
        let _ = qmp
            .execute("block-job-cancel", json!({"device": j, "force": true}))
            .await;
    }
}

/// Waits for every job to end, with progress. A signal cancels the jobs; so does a job
/// whose progress has not moved for the stall timeout. Either way, once the cancel timeout
/// has passed the wait ends with the jobs still unconfirmed (they stay in `undo.jobs`).
async fn wait_jobs(
    qmp: &Qmp,
    disks: &[Planned],
    opts: &RunOptions,
    abort: &AbortFlag,
    undo: &mut Undo,
) -> Result<Vec<JobResult>> {
    let start = Instant::now();
    let mut results: HashMap<String, JobResult> = HashMap::new();
    let mut progress = Progress::new(disks, opts.json);
    let mut cancelled: Option<String> = None;
    let interval = Duration::from_secs(opts.progress_interval.max(1));
    let mut watch: HashMap<String, Watch> = disks
        .iter()
        .map(|p| {
            (
                p.job.clone(),
                Watch {
                    progress: 0,
                    moved: Instant::now(),
                },
            )
        })
        .collect();
    let mut last_poll = Instant::now();
    while results.len() < disks.len() {
        if !qmp.is_connected() {
            let why = match qmp.failure() {
                Some(f) => format!("QEMU's QMP connection broke: {f}"),
                None => "QEMU went away during the backup".to_string(),
            };
            fail_remaining(&mut results, disks, &why);
            break;
        }
        if cancelled.is_none() {
            let stalled = watch.iter().find(|(job, w)| {
                !results.contains_key(*job) && w.moved.elapsed() >= opts.stall_timeout
            });
            if abort.requested() {
                report::info("interrupted: cancelling the backup jobs");
                cancelled = Some("cancelled".into());
            } else if let Some((job, _)) = stalled {
                let label = disks
                    .iter()
                    .find(|p| &p.job == job)
                    .map_or(job.clone(), |p| p.disk.label());
                let why = format!(
                    "{label}: no progress for {} s (--stall-timeout): the backup was cancelled",
                    opts.stall_timeout.as_secs()
                );
                report::warn(&why);
                cancelled = Some(why);
            }
            if cancelled.is_some() {
                abort.limit(opts.cancel_timeout);
                let pending: Vec<String> = undo
                    .jobs
                    .iter()
                    .filter(|j| !results.contains_key(*j))
                    .cloned()
                    .collect();
                cancel_jobs(qmp, &pending).await;
            }
        }
        if qmp.past_deadline() {
            let why = format!(
                "{}; QEMU did not confirm the cancel within {} s",
                cancelled.as_deref().unwrap_or("interrupted"),
                opts.cancel_timeout.as_secs()
            );
            fail_remaining(&mut results, disks, &why);
            // The jobs without an end stay in `undo.jobs` for teardown to report.
            undo.jobs.retain(|j| {
                results
                    .get(j)
                    .is_some_and(|r| r.error.as_deref() == Some(&why))
            });
            return Ok(finish(disks, results, &progress));
        }
        if let Some(ev) = qmp.next_event(Duration::from_millis(250)).await {
            let dev = ev.data["device"].as_str().unwrap_or("").to_string();
            if !disks.iter().any(|p| p.job == dev) {
                continue;
            }
            let bytes = ev.data["offset"].as_u64().unwrap_or(0);
            match ev.name.as_str() {
                "BLOCK_JOB_COMPLETED" => {
                    let err = ev
                        .data
                        .get("error")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    results.insert(
                        dev.clone(),
                        JobResult {
                            ok: err.is_none() && cancelled.is_none(),
                            error: err.or_else(|| cancelled.clone()),
                            bytes,
                            seconds: start.elapsed().as_secs_f64(),
                        },
                    );
                }
                "BLOCK_JOB_CANCELLED" => {
                    results.insert(
                        dev.clone(),
                        JobResult {
                            ok: false,
                            error: Some(cancelled.clone().unwrap_or_else(|| "cancelled".into())),
                            bytes,
                            seconds: start.elapsed().as_secs_f64(),
                        },
                    );
                }
                "BLOCK_JOB_ERROR" => report::warn(format!(
                    "{}: I/O error during {} ({})",
                    dev, ev.data["operation"], ev.data["action"]
                )),
                _ => {}
            }
        }
        let due = progress.last_log.elapsed() >= interval;
        // Polled at least every second: the stall timeout needs to see progress.
        let poll = last_poll.elapsed() >= Duration::from_secs(1);
        if progress.bars.is_some() || due || opts.json || poll {
            last_poll = Instant::now();
            if let Ok(jobs) = qmp.execute("query-jobs", json!({})).await {
                for j in jobs.as_array().cloned().unwrap_or_default() {
                    let id = j["id"].as_str().unwrap_or("");
                    let Some(i) = disks.iter().position(|p| p.job == id) else {
                        continue;
                    };
                    let (cur, total) = (
                        j["current-progress"].as_u64().unwrap_or(0),
                        j["total-progress"].as_u64().unwrap_or(0),
                    );
                    if let Some(w) = watch.get_mut(id) {
                        if cur != w.progress {
                            w.progress = cur;
                            w.moved = Instant::now();
                        }
                    }
                    if let Some((_, bars)) = &progress.bars {
                        bars[i].set_length(total.max(1));
                        bars[i].set_position(cur);
                    } else if due {
                        let pct = (cur * 100).checked_div(total).unwrap_or(0);
                        if opts.json {
                            println!(
                                "{}",
                                json!({"event": "progress", "disk": disks[i].disk.label(), "done": cur, "total": total})
                            );
                        } else {
                            report::info(format!(
                                "{}: {pct}% ({} of {})",
                                disks[i].disk.label(),
                                report::bytes(cur),
                                report::bytes(total)
                            ));
                        }
                    }
                }
            }
            if due {
                progress.last_log = Instant::now();
            }
        }
    }
    undo.jobs.clear();
    Ok(finish(disks, results, &progress))
}

/// The results in disk order; the progress bars finished or abandoned.
fn finish(
    disks: &[Planned],
    mut results: HashMap<String, JobResult>,
    progress: &Progress,
) -> Vec<JobResult> {
    if let Some((_, bars)) = &progress.bars {
        for (i, b) in bars.iter().enumerate() {
            if results.get(&disks[i].job).is_some_and(|r| r.ok) {
                b.finish();
            } else {
                b.abandon();
            }
        }
    }
    disks
        .iter()
        .map(|p| results.remove(&p.job).unwrap_or_default())
        .collect()
}

/// Current device → node mapping (to never `qom-set` a device onto its current node).
async fn device_nodes(qmp: &Qmp) -> HashMap<String, String> {
    let blocks: Vec<BlockInfo> = qmp
        .query("query-block", json!({}))
        .await
        .unwrap_or_default();
    blocks
        .into_iter()
        .filter_map(|b| Some((b.qdev?, b.inserted?.node_name?)))
        .collect()
}

/// Waits (bounded) until QEMU no longer lists the job; false when it still does.
async fn job_gone(qmp: &Qmp, job: &str) -> bool {
    for _ in 0..100 {
        let Ok(jobs) = qmp.execute("query-jobs", json!({})).await else {
            return false;
        };
        if !jobs
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["id"] == job))
        {
            return true;
        }
        if qmp.past_deadline() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Undoes everything this run added, whatever state it got to. On failure the frozen
/// bitmap goes back into the live one, so the next INC still holds every change. Every
/// call is bounded by the run's deadline; what could not be undone is returned.
async fn teardown(qmp: &Qmp, opts: &RunOptions, undo: &mut Undo, ok: bool) -> Leftovers {
    let mut left = Leftovers::new();
    if !qmp.is_connected() {
        return left;
    }
    if opts.remove_delay > 0 && !qmp.past_deadline() {
        tokio::time::sleep(Duration::from_secs(opts.remove_delay)).await;
    }
    for j in std::mem::take(&mut undo.jobs) {
        let _ = qmp
            .execute("block-job-cancel", json!({"device": j, "force": true}))
            .await;
        if !job_gone(qmp, &j).await {
            left.push(format!("block job {j} (cancel not confirmed)"));
        }
    }
    // Snapshot nodes first, then the devices go back to their own nodes.
    let snaps: Vec<String> = undo
        .added_nodes
        .iter()
        .filter(|n| n.ends_with("-snap"))
        .cloned()
        .collect();
    for n in &snaps {
        if !del_node(qmp, n).await {
            left.push(format!("node {n}"));
        }
    }
    let current = device_nodes(qmp).await;
    for (qdev, orig, cbw) in std::mem::take(&mut undo.switched) {
        if current.get(&qdev).map(String::as_str) != Some(cbw.as_str())
            && current.contains_key(&qdev)
        {
            continue;
        }
        if let Err(e) = qmp
            .execute(
                "qom-set",
                json!({"path": qdev, "property": "drive", "value": orig}),
            )
            .await
        {
            if !qmp.past_deadline() {
                report::warn(format!("could not switch {qdev} back to {orig}: {e}"));
            }
            left.push(format!(
                "device {qdev} still on filter {cbw} (its own node is {orig})"
            ));
        }
    }
    for n in undo.added_nodes.iter().rev() {
        if !n.ends_with("-snap") && !del_node(qmp, n).await {
            left.push(format!("node {n}"));
        }
    }
    undo.added_nodes.clear();
    let frozen = opts.frozen_bitmap();
    for node in std::mem::take(&mut undo.frozen) {
        if !ok {
            if let Err(e) = qmp
                .execute(
                    "block-dirty-bitmap-merge",
                    json!({"node": node, "target": opts.bitmap, "bitmaps": [frozen]}),
                )
                .await
            {
                if !qmp.past_deadline() {
                    report::warn(format!(
                        "could not return the changes to bitmap {} on {node} yet: {e}",
                        opts.bitmap
                    ));
                }
                left.push(format!(
                    "bitmap {frozen} on node {node} (holds changes the next backup needs: `qmpbackup cleanup` merges them back)"
                ));
                continue;
            }
        }
        if qmp
            .execute(
                "block-dirty-bitmap-remove",
                json!({"node": node, "name": frozen}),
            )
            .await
            .is_err()
            && ok
        {
            left.push(format!("bitmap {frozen} on node {node}"));
        }
    }
    let new_bitmaps = std::mem::take(&mut undo.new_bitmaps);
    if !ok {
        // A failed FULL: its bitmap would let an INC build on a backup that does not exist.
        for node in new_bitmaps {
            if qmp
                .execute(
                    "block-dirty-bitmap-remove",
                    json!({"node": node, "name": opts.bitmap}),
                )
                .await
                .is_err()
            {
                left.push(format!(
                    "bitmap {} on node {node} (of the full backup that failed: `qmpbackup cleanup --remove-bitmap --uuid {}` removes it)",
                    opts.bitmap,
                    opts.bitmap.trim_start_matches("qmpbackup-")
                ));
            }
        }
    }
    left
}

/// Deletes a node, retrying while it is still in use; false when it is still there.
async fn del_node(qmp: &Qmp, node: &str) -> bool {
    for attempt in 0..50 {
        match qmp
            .execute("blockdev-del", json!({"node-name": node}))
            .await
        {
            Ok(_) => return true,
            Err(QmpError::Command { desc, .. }) if desc.contains("Failed to find node") => {
                return true
            }
            Err(e) if attempt == 49 || qmp.past_deadline() || !qmp.is_connected() => {
                // Past the deadline, the run's summary lists what is left.
                if !qmp.past_deadline() {
                    report::warn(format!("could not remove node {node}: {e}"));
                }
                return false;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    false
}

/// Repairs what an interrupted run of ours left in QEMU: orphaned jobs are cancelled,
/// devices switched back from our filters, our nodes deleted, and frozen bitmaps merged back
/// into their live bitmap (so no change is lost). Returns what was done, for the log.
pub async fn repair_leftovers(qmp: &Qmp) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let jobs = qmp.execute("query-jobs", json!({})).await?;
    for j in jobs.as_array().cloned().unwrap_or_default() {
        let id = j["id"].as_str().unwrap_or("").to_string();
        if id.starts_with(NODE_PREFIX) {
            let _ = qmp
                .execute("block-job-cancel", json!({"device": id, "force": true}))
                .await;
            for _ in 0..100 {
                let js = qmp.execute("query-jobs", json!({})).await?;
                if !js
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x["id"] == id.as_str()))
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            done.push(format!("cancelled orphaned job {id}"));
        }
    }
    let leftovers = crate::backup::discover::leftover_nodes(qmp).await?;
    if !leftovers.is_empty() {
        for n in leftovers.iter().filter(|n| n.node_name.ends_with("-snap")) {
            del_node(qmp, &n.node_name).await;
        }
        let blocks: Vec<BlockInfo> = qmp.query("query-block", json!({})).await?;
        let disks = crate::backup::discover::discover(qmp).await?;
        for b in blocks {
            let (Some(qdev), Some(ins)) = (b.qdev.clone(), b.inserted.clone()) else {
                continue;
            };
            let Some(cur) = ins.node_name else { continue };
            if cur.starts_with(NODE_PREFIX) {
                if let Some(d) = disks
                    .iter()
                    .find(|d| d.qdev.as_deref() == Some(qdev.as_str()))
                {
                    if d.node != cur {
                        qmp.execute(
                            "qom-set",
                            json!({"path": qdev, "property": "drive", "value": d.node}),
                        )
                        .await?;
                        done.push(format!("switched {qdev} back to {}", d.node));
                    }
                }
            }
        }
        for suffix in ["-cbw", "-tgt", "-flc", ""] {
            for n in &leftovers {
                if n.node_name.ends_with("-snap") {
                    continue;
                }
                if suffix.is_empty() || n.node_name.ends_with(suffix) {
                    del_node(qmp, &n.node_name).await;
                }
            }
        }
        done.push(format!(
            "removed {} node(s) left by an interrupted backup",
            leftovers.len()
        ));
    }
    // Frozen bitmaps: give their bits back to the live bitmap.
    for d in crate::backup::discover::discover(qmp).await? {
        for b in &d.bitmaps {
            let Some(name) = b.name.as_deref() else {
                continue;
            };
            if let Some(live) = name
                .strip_suffix("-f")
                .filter(|l| l.starts_with("qmpbackup-"))
            {
                if d.bitmap(live).is_some() {
                    qmp.execute(
                        "block-dirty-bitmap-merge",
                        json!({"node": d.node, "target": live, "bitmaps": [name]}),
                    )
                    .await?;
                }
                qmp.execute(
                    "block-dirty-bitmap-remove",
                    json!({"node": d.node, "name": name}),
                )
                .await?;
                done.push(format!(
                    "returned the changes of interrupted bitmap {name} on {}",
                    d.label()
                ));
            }
        }
    }
    Ok(done)
}
