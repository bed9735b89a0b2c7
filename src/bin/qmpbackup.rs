//! qmpbackup: live full, incremental, auto and copy backups of running QEMU VMs over QMP.

use anyhow::{Context, Result};
use clap::Parser;
use qmpbackup::backup::metrics::{backup_metrics, Outcome};
use qmpbackup::backup::run::{Abort, AbortFlag, Notes};
use qmpbackup::backup::{self, BackupOptions, Summary};
use qmpbackup::metrics::MetricsOptions;
use qmpbackup::qmp::client::Qmp;
use qmpbackup::report;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use qmpbackup::cli::qmpbackup::{Cli, Command, Show};

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

/// The log file and syslog, and the invocation as the log's first lines (QEMU's version
/// follows once connected).
fn start_logging(cli: &Cli) -> Result<()> {
    if let Some(l) = &cli.logfile {
        report::set_logfile(l).with_context(|| format!("{}: cannot open log file", l.display()))?;
    }
    if cli.syslog {
        if let Err(e) = report::set_syslog() {
            report::warn(format!("syslog not available: {e}"));
        }
    }
    let args: Vec<String> = std::env::args().collect();
    report::log_only(format!("Arguments: {}", report::masked_command_line(&args)));
    report::log_only(format!("qmpbackup {}", env!("CARGO_PKG_VERSION")));
    Ok(())
}

/// Writes a backup run's metrics; a file that cannot be written is an error in the log.
fn write_metrics(
    metrics: &MetricsOptions,
    target: &Path,
    started: SystemTime,
    outcome: &Outcome,
    code: u8,
) {
    let Some(path) = &metrics.metrics_file else {
        return;
    };
    let m = backup_metrics(
        metrics.label(),
        target,
        started,
        SystemTime::now(),
        outcome,
        code,
    );
    if let Err(e) = m.write(path) {
        report::error(format!("qmpbackup: {e:#}"));
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    report::set_debug(cli.debug);
    let logging = start_logging(&cli);
    match cli.command {
        Command::Backup(a) => {
            let opts = &a.opts;
            if let Some(name) = &opts.metrics.name {
                report::log_only(format!("Name: {name}"));
            }
            let started = SystemTime::now();
            let mut made = None;
            let result = match logging {
                Ok(()) => {
                    backup_command(&cli.socket, cli.agent_socket.as_deref(), opts, &mut made).await
                }
                Err(e) => Err(e),
            };
            let code = *result.as_ref().unwrap_or(&1);
            let outcome = match &made {
                Some((summary, pruned)) => Outcome::Made {
                    summary,
                    pruned: *pruned,
                },
                None => Outcome::Failed,
            };
            write_metrics(&opts.metrics, &opts.target.target, started, &outcome, code);
            return result.map(ExitCode::from);
        }
        Command::Info { show } => {
            logging?;
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
            logging?;
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

/// `backup`: the exit status (0, or 3 when the backup was made and its prune failed), and
/// in `made` the summary and the prune's outcome once the backup exists.
async fn backup_command(
    socket: &Option<String>,
    agent_socket: Option<&str>,
    opts: &BackupOptions,
    made: &mut Option<(Summary, Option<bool>)>,
) -> Result<u8> {
    // Refused before connecting, as any other invalid argument.
    opts.speed_limit_bytes()?;
    if opts.target.no_timestamp && !opts.keep.policy().is_empty() {
        anyhow::bail!(
            "--keep-* prunes by the time in the backups' names, which --no-timestamp leaves out: use one or the other"
        );
    }
    let abort: AbortFlag = Abort::new();
    install_signals(abort.clone(), opts.cancel_timeout());
    let qmp = connect(socket).await?;
    qmp.follow_deadline(abort.deadline());
    let mut notes = Notes::new(opts.json);
    let agent = backup::connect_agent(agent_socket, opts, &mut notes).await?;
    let s = match backup::backup(&qmp, opts, agent.as_ref(), &abort, &mut notes).await {
        Ok(s) => s,
        Err(e) => {
            if opts.json {
                println!("{}", json!({"event": "error", "error": format!("{e:#}")}));
            }
            return Err(e);
        }
    };
    if opts.json {
        println!("{}", json!({"event": "summary", "summary": s}));
    } else {
        eprint!("{}", s.human());
    }
    report::info("backup finished");
    if opts.keep.policy().is_empty() {
        *made = Some((s, None));
        return Ok(0);
    }
    // The backup's signal handling (cancel and clean up in QEMU) has nothing to do here: a
    // prune may be stopped anywhere (its journal lets the next run finish it), so a signal
    // ends the process as usual.
    // SAFETY: restoring the default disposition of two signals.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
    }
    let pruned = backup::prune_after_backup(opts, &s);
    *made = Some((s, Some(pruned.is_ok())));
    if let Err(e) = pruned {
        if opts.json {
            println!(
                "{}",
                json!({"event": "prune-error", "error": format!("{e:#}")})
            );
        }
        report::error(format!("qmpbackup: prune failed: {e:#}"));
        return Ok(3);
    }
    Ok(0)
}

/// A usage error in a backup run's arguments (a typo in a unit's configuration) still
/// leaves metrics saying so, when --metrics-file can be read from the raw arguments.
fn usage_error_metrics(args: &[String]) {
    if !args.iter().any(|a| a == "backup") {
        return;
    }
    let value = |long: &str, short: Option<&str>| -> Option<String> {
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == long || Some(a.as_str()) == short {
                return it.next().cloned();
            }
            if let Some(v) = a.strip_prefix(long).and_then(|r| r.strip_prefix('=')) {
                return Some(v.to_string());
            }
        }
        None
    };
    let metrics = MetricsOptions {
        name: value("--name", None),
        metrics_file: value("--metrics-file", None).map(PathBuf::from),
    };
    let target = value("--target", Some("-t")).map(PathBuf::from);
    write_metrics(
        &metrics,
        target.as_deref().unwrap_or(Path::new("/nonexistent")),
        SystemTime::now(),
        &Outcome::Failed,
        2,
    );
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if e.use_stderr() {
                usage_error_metrics(&std::env::args().collect::<Vec<_>>());
            }
            e.exit();
        }
    };
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
