//! The `qcow2` command: qemu-img-like verbs over the native library, for hosts without
//! qemu-img. Argument parsing, wiring and exit codes only.

use clap::Parser;
use qcow2::create::{self, parse_size, CreateOptions};
use qcow2::device;
use qcow2::ops::throttle::Throttle;
use qcow2::ops::{commit, compare, convert, info, map, rebase};
use qcow2::repair::{self, RepairMode};
use qcow2::OpenRwOptions;
use qcow2::Qcow2;
use qcow2::{check, Chain, Format, OpenOptions};
use qmpbackup::image_text;
use std::io::Write;
use std::process::ExitCode;

use qmpbackup::cli::qcow2::{Cli, Command, Fmt, Output, Repair};

fn open(path: &std::path::Path, fmt: Option<Fmt>) -> qcow2::Result<Chain> {
    Chain::open(
        path,
        &OpenOptions {
            format: fmt.map(Into::into),
            no_backing: false,
        },
    )
}

/// The inspection verbs read images in use, as `qemu-img -U` does, but say so.
fn warn_if_in_use(path: &std::path::Path) {
    if qcow2::lock::path_has_writer(path) {
        eprintln!(
            "qcow2: warning: {} is in use for writing by another process (a running QEMU?); reading it as it is now, which may change while it is read",
            path.display()
        );
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match cli.command {
        Command::Info {
            output,
            backing_chain,
            format,
            file,
        } => {
            warn_if_in_use(&file);
            let chain = open(&file, format)?;
            let n = if backing_chain {
                chain.layers().len()
            } else {
                1
            };
            let infos = (0..n)
                .map(|i| info::layer_info(&chain, i))
                .collect::<qcow2::Result<Vec<_>>>()?;
            match output {
                Output::Json if backing_chain => {
                    writeln!(out, "{}", serde_json::to_string_pretty(&infos)?)?
                }
                Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&infos[0])?)?,
                Output::Human => {
                    let text: Vec<String> = infos.iter().map(image_text::human).collect();
                    write!(out, "{}", text.join("\n"))?;
                }
            }
        }
        Command::Map {
            output,
            format,
            file,
        } => {
            warn_if_in_use(&file);
            let chain = open(&file, format)?;
            match output {
                Output::Json => map::write_json(&chain, &mut out)?,
                Output::Human => map::write_human(&chain, &mut out)?,
            }
        }
        Command::Check {
            output,
            repair: Some(mode),
            file,
        } => {
            let mode = match mode {
                Repair::Leaks => RepairMode::Leaks,
                Repair::All => RepairMode::All,
            };
            let r = repair::repair(&file, mode)?;
            for m in &r.before.messages {
                eprintln!("{m}");
            }
            let mut after = r.after.clone();
            after.leaks_fixed = r.leaks_fixed;
            after.corruptions_fixed = r.corruptions_fixed;
            match output {
                Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&after)?)?,
                Output::Human => {
                    if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
                        writeln!(
                            out,
                            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
                            r.leaks_fixed, r.corruptions_fixed
                        )?;
                    }
                    write!(out, "{}", after.human())?;
                }
            }
            return Ok(ExitCode::from(after.exit_code() as u8));
        }
        Command::Check {
            output,
            repair: None,
            file,
        } => {
            warn_if_in_use(&file);
            let chain = Chain::open(
                &file,
                &OpenOptions {
                    format: Some(Format::Qcow2),
                    no_backing: true,
                },
            )?;
            let img = chain
                .top()
                .as_qcow2()
                .ok_or_else(|| anyhow::anyhow!("not a qcow2 image"))?;
            let report = check::check(img)?;
            for m in &report.messages {
                eprintln!("{m}");
            }
            match output {
                Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?,
                Output::Human => write!(out, "{}", report.human())?,
            }
            return Ok(ExitCode::from(report.exit_code() as u8));
        }
        Command::Compare {
            format_a,
            format_b,
            a,
            b,
        } => {
            warn_if_in_use(&a);
            warn_if_in_use(&b);
            let result = (|| -> qcow2::Result<compare::Comparison> {
                let ca = open(&a, format_a)?;
                let cb = open(&b, format_b)?;
                compare::compare(&ca, &cb)
            })();
            return Ok(match result {
                Ok(compare::Comparison::Identical { size_mismatch }) => {
                    if size_mismatch {
                        writeln!(out, "Warning: Image size mismatch!")?;
                    }
                    writeln!(out, "Images are identical.")?;
                    ExitCode::SUCCESS
                }
                Ok(compare::Comparison::Differ {
                    offset,
                    size_mismatch,
                }) => {
                    if size_mismatch {
                        writeln!(out, "Warning: Image size mismatch!")?;
                    }
                    writeln!(out, "Content mismatch at offset {offset}!")?;
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("qcow2: {e}");
                    ExitCode::from(2)
                }
            });
        }
        Command::Convert {
            format,
            output_format,
            compress,
            copy_offload,
            options,
            force,
            in_place,
            no_zero,
            src,
            dst,
        } => {
            if compress && copy_offload {
                anyhow::bail!(
                    "-C and -c exclude each other: compressed clusters cannot share blocks"
                );
            }
            let chain = open(&src, format)?;
            match output_format {
                Fmt::Raw => {
                    if compress || copy_offload || options.is_some() {
                        anyhow::bail!("-c, -C and -o apply to qcow2 output only");
                    }
                    if in_place {
                        let target = device::open_in_place(&dst, chain.virtual_size())?;
                        let out = convert::RawOutput::InPlace {
                            target: &target,
                            zero: !no_zero,
                        };
                        convert::to_raw_observed(
                            &chain,
                            out,
                            &mut Throttle::new(0),
                            &mut |_, _| {},
                        )?;
                    } else {
                        convert::to_raw(&chain, &dst, force)?;
                    }
                }
                Fmt::Qcow2 => {
                    let mut create = CreateOptions::default();
                    if let Some(o) = &options {
                        create.apply_list(o)?;
                    }
                    let opts = convert::Qcow2ConvertOptions {
                        create,
                        compress,
                        overwrite: force,
                        rate_limit: 0,
                        share_blocks: copy_offload,
                    };
                    if in_place {
                        if copy_offload {
                            anyhow::bail!("-C does not apply with --in-place");
                        }
                        let needed = convert::qcow2_size_bound(&chain, &opts.create)?;
                        let target = device::open_in_place(&dst, needed)?;
                        convert::to_qcow2_in_place_observed(
                            &chain,
                            &target,
                            &opts,
                            &mut |_, _| {},
                        )?;
                    } else {
                        convert::to_qcow2(&chain, &dst, &opts)?;
                    }
                }
            }
        }
        Command::Commit {
            base,
            drop,
            rate_limit,
            file,
        } => {
            let rate_limit = match rate_limit {
                Some(r) => parse_size(&r).ok_or_else(|| anyhow::anyhow!("invalid rate {r:?}"))?,
                None => 0,
            };
            commit::commit(
                &file,
                &commit::CommitOptions {
                    base,
                    drop,
                    rate_limit,
                },
            )?;
            writeln!(out, "Image committed.")?;
        }
        Command::Rebase {
            unsafe_mode,
            backing,
            backing_format,
            file,
        } => {
            rebase::rebase(
                &file,
                &rebase::RebaseOptions {
                    backing,
                    format: backing_format.map(Into::into),
                    unsafe_mode,
                },
            )?;
        }
        Command::Snapshot {
            list,
            create,
            apply,
            delete,
            file,
        } => {
            if let Some(name) = create {
                let mut img = Qcow2::open_rw(&file, OpenRwOptions::default())?;
                img.snapshot_create(&name)?;
            } else if let Some(name) = apply {
                let mut img = Qcow2::open_rw(&file, OpenRwOptions::default())?;
                img.snapshot_apply(&name)?;
            } else if let Some(name) = delete {
                let mut img = Qcow2::open_rw(&file, OpenRwOptions::default())?;
                img.snapshot_delete(&name)?;
            } else {
                let _ = list;
                let chain = Chain::open(
                    &file,
                    &OpenOptions {
                        format: Some(Format::Qcow2),
                        no_backing: true,
                    },
                )?;
                let i = info::layer_info(&chain, 0)?;
                if !i.snapshots.is_empty() {
                    write!(
                        out,
                        "Snapshot list:\n{}",
                        image_text::snapshot_table(&i.snapshots)
                    )?;
                }
            }
        }
        Command::Create {
            format,
            options,
            backing,
            backing_format,
            file,
            size,
        } => {
            let mut opts = CreateOptions::default();
            if let Some(o) = &options {
                opts.apply_list(o)?;
            }
            let size = match &size {
                Some(s) => {
                    let n = parse_size(s).ok_or_else(|| {
                        anyhow::anyhow!(
                            "invalid size {s:?} (bytes, or with a suffix K, M, G, T, P, E)"
                        )
                    })?;
                    qcow2::create::check_image_size(n)?;
                    Some(n)
                }
                None => None,
            };
            match format {
                Fmt::Raw => {
                    if backing.is_some() {
                        anyhow::bail!("raw images cannot have a backing file");
                    }
                    let size = size.ok_or_else(|| anyhow::anyhow!("a size is needed"))?;
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&file)
                        .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", file.display()))?;
                    if let Err(e) = f.set_len(size) {
                        drop(f);
                        let _ = std::fs::remove_file(&file);
                        anyhow::bail!("{}: cannot make it {size} bytes: {e}", file.display());
                    }
                }
                Fmt::Qcow2 => {
                    if let Some(b) = &backing {
                        let dir = file.parent();
                        let resolved = qcow2::image::resolve_relative(dir, b);
                        let bfmt = match backing_format {
                            Some(f) => Format::from(f),
                            None => qcow2::chain::probe_format(&resolved)?,
                        };
                        let bchain = Chain::open(
                            &resolved,
                            &OpenOptions {
                                format: Some(bfmt),
                                no_backing: false,
                            },
                        )?;
                        opts.size = size.unwrap_or(bchain.virtual_size());
                        opts.backing = Some((b.clone(), bfmt.name().to_string()));
                    } else {
                        opts.size = size.ok_or_else(|| anyhow::anyhow!("a size is needed"))?;
                    }
                    let mut img = create::create_qcow2(&file, &opts)?;
                    img.flush()?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // As qemu-img: a usage error exits 1 (2 is check's "corruptions", compare's "error").
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qcow2: {e:#}");
            ExitCode::from(1)
        }
    }
}
