//! qmpbackup: live full, incremental, auto and copy backups of running QEMU VMs over QMP.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use qmpbackup::backup::run::{Abort, AbortFlag, Notes};
use qmpbackup::backup::{self, BackupOptions};
use qmpbackup::qmp::client::Qmp;
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
enum Show {
    Blockdev,
    Bitmaps,
}

#[derive(Args)]
struct BackupArgs {
    #[command(flatten)]
    opts: BackupOptions,
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
    // Each run's log starts with what was run and by which version (QEMU's follows once
    // connected).
    let args: Vec<String> = std::env::args().collect();
    report::log_only(format!("Arguments: {}", report::masked_command_line(&args)));
    report::log_only(format!("qmpbackup {}", env!("CARGO_PKG_VERSION")));
    match cli.command {
        Command::Backup(a) => {
            let opts = &a.opts;
            // Refused before connecting, as any other invalid argument.
            opts.speed_limit_bytes()?;
            if opts.target.no_timestamp && !opts.keep.policy().is_empty() {
                anyhow::bail!(
                    "--keep-* prunes by the time in the backups' names, which --no-timestamp leaves out: use one or the other"
                );
            }
            let abort: AbortFlag = Abort::new();
            install_signals(abort.clone(), opts.cancel_timeout());
            let qmp = connect(&cli.socket).await?;
            qmp.follow_deadline(abort.deadline());
            let mut notes = Notes::new(opts.json);
            let agent =
                backup::connect_agent(cli.agent_socket.as_deref(), opts, &mut notes).await?;
            let result = backup::backup(&qmp, opts, agent.as_ref(), &abort, &mut notes).await;
            match result {
                Ok(s) => {
                    if opts.json {
                        println!("{}", json!({"event": "summary", "summary": s}));
                    } else {
                        eprint!("{}", s.human());
                    }
                    report::info("backup finished");
                    // The backup's signal handling (cancel and clean up in QEMU) has
                    // nothing to do here: a prune may be stopped anywhere (its journal lets
                    // the next run finish it), so a signal ends the process as usual.
                    if !opts.keep.policy().is_empty() {
                        // SAFETY: restoring the default disposition of two signals.
                        unsafe {
                            libc::signal(libc::SIGINT, libc::SIG_DFL);
                            libc::signal(libc::SIGTERM, libc::SIG_DFL);
                        }
                    }
                    if let Err(e) = backup::prune_after_backup(opts, &s) {
                        if opts.json {
                            println!(
                                "{}",
                                json!({"event": "prune-error", "error": format!("{e:#}")})
                            );
                        }
                        report::error(format!("qmpbackup: prune failed: {e:#}"));
                        return Ok(ExitCode::from(3));
                    }
                }
                Err(e) => {
                    if opts.json {
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
