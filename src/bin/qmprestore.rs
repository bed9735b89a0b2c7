//! qmprestore: restore qmpbackup chains natively (no qemu-img or any other program).

use anyhow::Result;
use clap::Parser;
use qmpbackup::progress::Reporting;
use qmpbackup::report;
use qmpbackup::restore::commands as restore;
use qmpbackup::restore::merge::{self, MergeOptions};
use qmpbackup::restore::options::{CheckOptions, Common, DirOptions};
use qmpbackup::restore::verify_metrics::verify_metrics;
use qmpbackup::serve::serve;
use qmpbackup::store::prune::{prune, PruneOptions};
use qmpbackup::store::vm::parse_point_time;
use std::process::ExitCode;
use std::time::SystemTime;

use qmpbackup::cli::qmprestore::{Cli, Command};

fn common(source: DirOptions, until: Option<String>, check: CheckOptions) -> Common {
    Common {
        source,
        until,
        check,
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    report::set_quiet(cli.quiet);
    let quiet = cli.quiet;
    let reporting = |json: bool, stdout_is_data: bool| Reporting {
        json,
        stdout_is_data,
        quiet,
    };
    let check = cli.check;
    match cli.command {
        Command::Rebase {
            dir,
            until,
            dry_run,
        } => restore::rebase(&common(dir, until.until, check), dry_run)?,
        Command::Commit(a) => restore::commit(
            &common(a.dir, a.until.until, check),
            a.rate.bytes_per_second()?,
            &reporting(a.json, false),
        )?,
        Command::Merge {
            dir,
            filter,
            until,
            targetfile,
            vm_dir,
            targetdir,
            format,
            in_place,
            no_zero,
            manifest,
            no_reflink,
            rate: r,
            json,
        } => {
            let to_stdout = targetfile.as_deref() == Some(std::path::Path::new("-"));
            let opts = MergeOptions {
                format,
                in_place,
                zero: !no_zero,
                share_blocks: !no_reflink,
                rate_limit: r.bytes_per_second()?,
                manifest,
                reporting: reporting(json, to_stdout),
            };
            match (vm_dir, targetdir, dir, targetfile) {
                (Some(vm_dir), Some(out), _, _) => {
                    let until = until.as_deref().map(parse_point_time).transpose()?;
                    merge::merge_vm(&vm_dir, &out, until, &check, &opts)?;
                }
                (_, _, Some(dir), Some(target)) => {
                    let source = DirOptions { dir, filter };
                    merge::merge(&common(source, until, check), &target, &opts)?;
                }
                _ => anyhow::bail!("give --dir and --targetfile, or --vm-dir and --targetdir"),
            }
        }
        Command::Snapshotrebase(a) => restore::snapshotrebase(
            &common(a.dir, a.until.until, check),
            a.rate.bytes_per_second()?,
            &reporting(a.json, false),
        )?,
        Command::Verify { dir, json, metrics } => {
            let started = SystemTime::now();
            let verify_dir = dir.dir.clone();
            let results = restore::verify(&common(dir, None, check));
            if let Some(path) = &metrics.metrics_file {
                let m = verify_metrics(
                    metrics.label(),
                    &verify_dir,
                    started,
                    SystemTime::now(),
                    results.as_deref().ok(),
                );
                if let Err(e) = m.write(path) {
                    report::error(format!("qmprestore: {e:#}"));
                }
            }
            let results = results?;
            let bad = results.iter().filter(|r| !r.ok).count();
            if json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            }
            for r in &results {
                match &r.problem {
                    Some(p) => eprintln!("FAILED {}: {p}", r.file),
                    None => report::info(format!(
                        "ok     {}{}",
                        r.file,
                        if r.manifest {
                            " (data verified against its manifest)"
                        } else {
                            " (structure only: no manifest)"
                        }
                    )),
                }
            }
            if bad > 0 {
                eprintln!("qmprestore: {bad} problem(s) found");
                return Ok(ExitCode::from(1));
            }
        }
        Command::Serve(opts) => serve(&opts, check)?,
        Command::Prune {
            dir,
            keep,
            dry_run,
            resume,
            rate: r,
            json,
        } => {
            let opts = PruneOptions {
                policy: keep.policy(),
                zone: keep.zone(),
                dry_run,
                resume_only: resume && keep.policy().is_empty(),
                check,
                rate_limit: r.bytes_per_second()?,
                disks: None,
            };
            let report = prune(&dir, &opts, &reporting(false, false), |plan| {
                if json {
                    match serde_json::to_string_pretty(plan) {
                        Ok(j) => println!("{j}"),
                        Err(e) => report::error(format!("cannot print the plan: {e}")),
                    }
                } else {
                    print!("{}", plan.human());
                }
            })?;
            for m in &report.removed_folders {
                report::info(format!("removed {} (no backups left)", m.display()));
            }
            if report.failed() {
                eprintln!("qmprestore: some disks were not pruned (see above)");
                return Ok(ExitCode::from(1));
            }
        }
        Command::List { dir, json } => {
            let l = restore::list(&common(dir, None, check))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                print!("{}", l.human());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qmprestore: {e:#}");
            ExitCode::from(1)
        }
    }
}
