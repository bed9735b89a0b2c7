//! qmpbackup: live full, incremental, auto and copy backups of running QEMU VMs over QMP.

use anyhow::{Context, Result};
use clap::Parser;
use qmpbackup::backup::metrics::{backup_metrics, Outcome};
use qmpbackup::backup::run::{Abort, AbortFlag, Notes};
use qmpbackup::backup::{self, BackupOptions, Summary};
use qmpbackup::qmp::client::Qmp;
use qmpbackup::report;
use serde_json::json;
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
            if let Some(name) = &opts.metrics.name {
                report::log_only(format!("Name: {name}"));
            }
            let started = SystemTime::now();
            let mut made = None;
            let result =
                backup_command(&cli.socket, cli.agent_socket.as_deref(), opts, &mut made).await;
            if let Some(path) = &opts.metrics.metrics_file {
                let code = *result.as_ref().unwrap_or(&1);
                let outcome = match &made {
                    Some((summary, pruned)) => Outcome::Made {
                        summary,
                        pruned: *pruned,
                    },
                    None => Outcome::Failed,
                };
                let m = backup_metrics(
                    opts.metrics.label(),
                    started,
                    SystemTime::now(),
                    &outcome,
                    code,
                );
                if let Err(e) = m.write(path) {
                    report::error(format!("qmpbackup: {e:#}"));
                }
            }
            return result.map(ExitCode::from);
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
