//! qmpbackup: live full, incremental, auto and copy backups of running QEMU VMs over QMP.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use qmpbackup::backup::layout::LayoutOptions;
use qmpbackup::backup::run::Abort;
use qmpbackup::backup::run::AbortFlag;
use qmpbackup::backup::{self, BackupOptions, LevelArg};
use qmpbackup::qmp::agent::Agent;
use qmpbackup::qmp::Qmp;
use qmpbackup::report;
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Live backups of running QEMU VMs over QMP: full, incremental (dirty bitmaps), auto and
/// copy, all disks at once, with image fleecing on QEMU ≥ 7.1.
///
/// Start QEMU with a QMP socket reserved for backups (QMP serves one client at a time):
///   -qmp unix:/run/vm1-backup.qmp,server=on,wait=off
/// Restore with qmprestore (no QEMU needed).
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    /// QMP socket: a unix socket path, or tcp:HOST:PORT.
    #[arg(long, global = true)]
    socket: Option<String>,
    /// Guest agent socket (for --quiesce).
    #[arg(long, global = true)]
    agent_socket: Option<String>,
    /// Print every QMP message.
    #[arg(long, global = true)]
    debug: bool,
    /// Also write the log to this file.
    #[arg(short = 'L', long, global = true)]
    logfile: Option<PathBuf>,
    /// Also log to syslog.
    #[arg(long, global = true)]
    syslog: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LevelOpt {
    Full,
    Inc,
    Auto,
    Copy,
}

#[derive(Clone, Copy, ValueEnum)]
enum Aio {
    Threads,
    #[value(name = "io_uring")]
    IoUring,
}

#[derive(Clone, Copy, ValueEnum)]
enum Show {
    Blockdev,
    Bitmaps,
}

#[derive(Args)]
struct BackupArgs {
    /// full: a new chain (new bitmap); inc: changes since the last backup of the chain;
    /// auto: full where no chain can continue, else inc; copy: a standalone full copy that
    /// leaves the chain alone.
    #[arg(short = 'l', long, value_enum)]
    level: LevelOpt,
    /// Target directory; each disk gets <target>/<disk file name>/.
    #[arg(short = 't', long)]
    target: PathBuf,
    /// Only these disks (comma-separated device ids, drive ids or node names).
    #[arg(short = 'i', long, value_delimiter = ',')]
    include: Vec<String>,
    /// Not these disks (comma-separated).
    #[arg(short = 'e', long, value_delimiter = ',')]
    exclude: Vec<String>,
    /// Also back up raw disks (their change tracking lasts only while QEMU runs).
    #[arg(long)]
    include_raw: bool,
    /// Monthly chains in <target>/YYYY-MM (a new month starts a new chain with auto).
    #[arg(long)]
    monthly: bool,
    /// Put every disk's files directly in the target directory.
    #[arg(long)]
    no_subdir: bool,
    /// Name files <LEVEL>-<disk> without the time (qmprestore needs the time to order chains).
    #[arg(long)]
    no_timestamp: bool,
    /// With --monthly, do not point <target>/current at the month's directory.
    #[arg(long)]
    no_symlink: bool,
    /// Freeze the guest's filesystems (guest agent) around the point in time.
    #[arg(long, alias = "quisce")]
    quiesce: bool,
    /// Pause the VM for the milliseconds in which the point in time is set.
    #[arg(long)]
    pause: bool,
    /// Bytes per second per disk (K/M/G suffixes allowed); 0 = unlimited.
    #[arg(long, default_value = "0")]
    speed_limit: String,
    /// Seconds between progress lines when not on a terminal.
    #[arg(long, default_value_t = 5)]
    progress_interval: u64,
    /// Seconds a guest write may wait for its copy-before-write before the backup (not the
    /// guest) fails.
    #[arg(long, default_value_t = 45)]
    cbw_timeout: u64,
    /// Compress the backup's clusters.
    #[arg(long)]
    compress: bool,
    /// Use this uuid for a new chain's bitmap name (qmpbackup-<uuid>).
    #[arg(long)]
    uuid: Option<String>,
    /// Seconds to wait before removing the temporary nodes.
    #[arg(long, default_value_t = 0)]
    remove_delay: u64,
    /// Open targets with O_DIRECT (not on tmpfs).
    #[arg(long)]
    blockdev_disable_cache: bool,
    /// AIO mode for the targets.
    #[arg(long, value_enum, default_value = "threads")]
    blockdev_aio: Aio,
    /// Directory for the temporary fleece images (default: beside the backups).
    #[arg(long)]
    fleece_dir: Option<PathBuf>,
    /// Print progress events and the summary as JSON lines on stdout.
    #[arg(long)]
    json: bool,
    /// Cancel the backup (and fail) when a disk's job has made no progress for this many
    /// seconds: a stuck storage or QEMU never keeps the run waiting forever.
    #[arg(long, default_value_t = 1800, value_name = "SECONDS")]
    stall_timeout: u64,
    /// After SIGINT/SIGTERM (or a stall), how many seconds QEMU gets to cancel the jobs and
    /// the run to undo its changes; then it leaves, saying what it left (`qmpbackup
    /// cleanup` removes it). A second signal leaves at once.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    cancel_timeout: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Back up the VM's disks.
    ///
    /// Example: qmpbackup --socket /run/vm1-backup.qmp backup --level auto --target /backup/vm1
    Backup(Box<BackupArgs>),
    /// Show the VM's disks or their dirty bitmaps.
    ///
    /// Example: qmpbackup --socket /run/vm1-backup.qmp info --show bitmaps
    Info {
        #[arg(long, value_enum)]
        show: Show,
    },
    /// Remove what an interrupted run left in QEMU (block jobs and nodes; the changes held
    /// by a frozen bitmap are merged back into its chain's bitmap, so none is lost); with
    /// --remove-bitmap, also qmpbackup's dirty bitmaps (all chains, or one with --uuid),
    /// which ends those chains.
    ///
    /// Example: qmpbackup --socket /run/vm1-backup.qmp cleanup
    Cleanup {
        /// Also remove the dirty bitmaps (the next backup of each chain must be a full).
        #[arg(long, alias = "remove-bitmaps")]
        remove_bitmap: bool,
        /// With --remove-bitmap: only this chain's bitmap (qmpbackup-<uuid>).
        #[arg(long, requires = "remove_bitmap")]
        uuid: Option<String>,
    },
}

async fn connect(socket: &Option<String>) -> Result<Qmp> {
    let s = socket
        .as_deref()
        .context("--socket is required (the VM's QMP socket)")?;
    Ok(Qmp::connect(s, Duration::from_secs(60)).await?)
}

fn install_signals(abort: AbortFlag, grace: Duration) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            if abort.signal(grace) > 1 {
                report::warn("second signal: leaving now, reporting what is left");
            } else {
                report::warn(format!(
                    "signal received: cancelling the backup and cleaning up (at most {} s; a second signal leaves at once)",
                    grace.as_secs()
                ));
            }
        }
    });
}

async fn run(cli: Cli) -> Result<ExitCode> {
    report::set_debug(cli.debug);
    if let Some(l) = &cli.logfile {
        report::set_logfile(l).with_context(|| format!("{}: cannot open log file", l.display()))?;
    }
    if cli.syslog {
        if let Err(e) = report::set_syslog() {
            report::warn(format!("syslog not available: {e}"));
        }
    }
    match cli.command {
        Command::Backup(a) => {
            let speed = qcow2::create::parse_size(&a.speed_limit)
                .with_context(|| format!("invalid --speed-limit {:?}", a.speed_limit))?;
            let opts = BackupOptions {
                level: match a.level {
                    LevelOpt::Full => LevelArg::Full,
                    LevelOpt::Inc => LevelArg::Inc,
                    LevelOpt::Auto => LevelArg::Auto,
                    LevelOpt::Copy => LevelArg::Copy,
                },
                layout: LayoutOptions {
                    target: a.target.clone(),
                    monthly: a.monthly,
                    no_subdir: a.no_subdir,
                    no_timestamp: a.no_timestamp,
                    no_symlink: a.no_symlink,
                },
                include: a.include.clone(),
                exclude: a.exclude.clone(),
                include_raw: a.include_raw,
                pause: a.pause,
                speed_limit: speed,
                progress_interval: a.progress_interval,
                cbw_timeout: a.cbw_timeout,
                compress: a.compress,
                uuid: a.uuid.clone(),
                remove_delay: a.remove_delay,
                disable_cache: a.blockdev_disable_cache,
                aio: match a.blockdev_aio {
                    Aio::Threads => "threads".into(),
                    Aio::IoUring => "io_uring".into(),
                },
                fleece_dir: a.fleece_dir.clone(),
                json: a.json,
                stall_timeout: Duration::from_secs(a.stall_timeout.max(1)),
                cancel_timeout: Duration::from_secs(a.cancel_timeout),
            };
            let abort: AbortFlag = Abort::new();
            install_signals(abort.clone(), opts.cancel_timeout);
            let qmp = connect(&cli.socket).await?;
            qmp.follow_deadline(abort.deadline());
            let agent = if a.quiesce {
                let path = cli
                    .agent_socket
                    .as_deref()
                    .context("--quiesce needs --agent-socket (the guest agent's socket)")?;
                let mut ag = Agent::connect(path, Duration::from_secs(10)).await?;
                let fs = ag.freeze_support().await?;
                if !fs.supported || !fs.enabled {
                    anyhow::bail!("the guest agent cannot freeze filesystems (guest-fsfreeze-freeze not supported or disabled)");
                }
                let st = ag.status().await?;
                if st == "frozen" {
                    report::warn("guest filesystems were frozen already; thawing them first");
                    ag.thaw().await?;
                }
                Some(tokio::sync::Mutex::new(ag))
            } else {
                None
            };
            let result = backup::backup(&qmp, &opts, agent.as_ref(), &abort).await;
            match result {
                Ok(s) => {
                    if a.json {
                        println!("{}", json!({"event": "summary", "summary": s}));
                    } else {
                        eprint!("{}", s.human());
                    }
                    report::info("backup finished");
                }
                Err(e) => {
                    if a.json {
                        println!("{}", json!({"event": "error", "error": format!("{e:#}")}));
                    }
                    return Err(e);
                }
            }
        }
        Command::Info { show } => {
            let qmp = connect(&cli.socket).await?;
            let disks = backup::discover::discover(&qmp).await?;
            match show {
                Show::Blockdev => println!("{}", serde_json::to_string_pretty(&disks)?),
                Show::Bitmaps => {
                    let v: Vec<_> = disks
                        .iter()
                        .map(|d| json!({"disk": d.label(), "node": d.node, "bitmaps": d.bitmaps}))
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
            }
        }
        Command::Cleanup {
            remove_bitmap,
            uuid,
        } => {
            let qmp = connect(&cli.socket).await?;
            let done = if remove_bitmap {
                backup::remove_bitmaps(&qmp, uuid.as_deref()).await?
            } else {
                backup::repair(&qmp).await?
            };
            if done.is_empty() {
                report::info("nothing of qmpbackup's was left in QEMU");
            }
            for m in done {
                report::info(m);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qmpbackup: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(c) => c,
        Err(e) => {
            report::error(format!("qmpbackup: {e:#}"));
            ExitCode::from(1)
        }
    }
}
