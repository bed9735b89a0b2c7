//! The `qcow2` command: qemu-img-like verbs over the native library, for hosts without
//! qemu-img. Argument parsing, wiring and exit codes only.

use clap::{Parser, Subcommand, ValueEnum};
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
use std::path::PathBuf;
use std::process::ExitCode;

/// Inspect and convert qcow2 images and backing chains without QEMU.
///
/// Exit codes follow qemu-img: 0 success; 1 error; `check` 2 (corruptions) or 3 (leaks
/// only); `compare` 1 (different) or 2 (error).
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Human,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Repair {
    Leaks,
    All,
}

#[derive(Clone, Copy, ValueEnum)]
enum Fmt {
    Qcow2,
    Raw,
}

impl From<Fmt> for Format {
    fn from(f: Fmt) -> Format {
        match f {
            Fmt::Qcow2 => Format::Qcow2,
            Fmt::Raw => Format::Raw,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Show an image's format, sizes, backing file, snapshots and format details.
    ///
    /// Example: qcow2 info --output json --backing-chain disk.qcow2
    Info {
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Show every image of the backing chain, top first.
        #[arg(long, short = 'b')]
        backing_chain: bool,
        /// Image format (probed when omitted).
        #[arg(short = 'f', value_enum)]
        format: Option<Fmt>,
        file: PathBuf,
    },
    /// Show where each guest range of the disk comes from (layer, host offset, zero, data).
    ///
    /// Example: qcow2 map --output json disk.qcow2
    Map {
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        #[arg(short = 'f', value_enum)]
        format: Option<Fmt>,
        file: PathBuf,
    },
    /// Check an image's metadata: refcounts, leaks, table entries, COPIED flags.
    ///
    /// Exit 0 clean, 2 corruptions found, 3 only leaks found, 1 the check could not run.
    /// Example: qcow2 check disk.qcow2
    Check {
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Repair: `leaks` lowers refcounts that are too high; `all` also rebuilds refcounts
        /// that are too low and fixes COPIED flags (then clears the dirty/corrupt bits).
        #[arg(short = 'r', long = "repair", value_enum)]
        repair: Option<Repair>,
        file: PathBuf,
    },
    /// Write an image's data into its backing file (or into BASE further down the chain).
    ///
    /// The base grows if the image is larger; zero clusters become zeros in the base.
    /// Without -d and -b the image is emptied afterwards (it then reads through to the
    /// base). Example: qcow2 commit inc1.qcow2; qcow2 commit -b full.qcow2 inc3.qcow2
    Commit {
        /// Chain member to commit into (name as stored in the image above it, or a path
        /// relative to that image's directory). Implies -d.
        #[arg(short = 'b')]
        base: Option<String>,
        /// Leave the image unchanged after the commit.
        #[arg(short = 'd')]
        drop: bool,
        /// Limit the copy to this many bytes per second (K/M/G suffixes).
        #[arg(long)]
        rate_limit: Option<String>,
        file: PathBuf,
    },
    /// Change an image's backing file.
    ///
    /// Safe mode (default) first copies into FILE every cluster that reads differently
    /// through the old and the new backing, so FILE's content is unchanged. -u changes only
    /// the reference. -b "" removes the backing file.
    /// Example: qcow2 rebase -u -b full.qcow2 -F qcow2 inc1.qcow2
    Rebase {
        #[arg(short = 'u')]
        unsafe_mode: bool,
        #[arg(short = 'b')]
        backing: String,
        #[arg(short = 'F', value_enum)]
        backing_format: Option<Fmt>,
        file: PathBuf,
    },
    /// List, create, apply or delete internal snapshots (disk only).
    ///
    /// Example: qcow2 snapshot -c before-upgrade disk.qcow2; qcow2 snapshot -l disk.qcow2
    Snapshot {
        #[arg(short = 'l', group = "action")]
        list: bool,
        #[arg(short = 'c', group = "action", value_name = "NAME")]
        create: Option<String>,
        /// Revert the disk to a snapshot (ID or name).
        #[arg(short = 'a', group = "action", value_name = "NAME")]
        apply: Option<String>,
        /// Delete the first snapshot with this name.
        #[arg(short = 'd', group = "action", value_name = "NAME")]
        delete: Option<String>,
        file: PathBuf,
    },
    /// Compare the guest contents of two disks (or chains).
    ///
    /// Exit 0 identical, 1 different (the first differing offset is printed), 2 error.
    /// Example: qcow2 compare restored.qcow2 live.qcow2
    Compare {
        /// Format of the first image.
        #[arg(short = 'f', value_enum)]
        format_a: Option<Fmt>,
        /// Format of the second image.
        #[arg(short = 'F', value_enum)]
        format_b: Option<Fmt>,
        a: PathBuf,
        b: PathBuf,
    },
    /// Flatten a disk (the whole backing chain) into a new standalone file.
    ///
    /// Unallocated and zero ranges stay unallocated (raw: holes). The output is written
    /// under a temporary name and renamed when complete.
    /// Examples: qcow2 convert -O raw disk.qcow2 disk.raw;
    /// qcow2 convert -c -O qcow2 -o compression_type=zstd inc3.qcow2 flat.qcow2
    Convert {
        /// Source format (probed when omitted).
        #[arg(short = 'f', value_enum)]
        format: Option<Fmt>,
        /// Output format.
        #[arg(short = 'O', value_enum)]
        output_format: Fmt,
        /// Compress every data cluster (qcow2 output).
        #[arg(short = 'c')]
        compress: bool,
        /// Copy offloading, as qemu-img's -C: on a filesystem that can share blocks (XFS,
        /// btrfs) the output shares the source's data blocks copy-on-write instead of
        /// copying them (qcow2 output, not with -c).
        #[arg(short = 'C')]
        copy_offload: bool,
        /// Output options, as for create (qcow2 output).
        #[arg(short = 'o')]
        options: Option<String>,
        /// Replace DST if it exists.
        #[arg(long)]
        force: bool,
        /// Write over DST, an existing block device (LVM volume, zvol, RBD map) or file,
        /// as qemu-img convert -n: refused when it is too small, mounted, held by another
        /// block layer or O_EXCL opener, or open in a QEMU. Raw: what reads as zero is
        /// zeroed by range (BLKZEROOUT, holes); a file is resized to the disk's size.
        #[arg(short = 'n', long, conflicts_with = "force")]
        in_place: bool,
        /// With --in-place: DST is known to read as zeros (a fresh thin volume), so ranges
        /// that read as zero are not zeroed.
        #[arg(long, requires = "in_place")]
        no_zero: bool,
        src: PathBuf,
        dst: PathBuf,
    },
    /// Create a new image.
    ///
    /// Defaults as qemu-img: qcow2 v3 (compat=1.1), 64 KiB clusters, 16-bit refcounts,
    /// zlib. SIZE takes K, M, G, T suffixes; with -b it defaults to the backing size.
    /// Example: qcow2 create -f qcow2 -o cluster_size=128k disk.qcow2 10G;
    /// qcow2 create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
    Create {
        #[arg(short = 'f', value_enum, default_value = "qcow2")]
        format: Fmt,
        /// cluster_size=, compat=0.10|1.1, lazy_refcounts=on|off, refcount_bits=,
        /// extended_l2=on|off, compression_type=zlib|zstd (comma-separated).
        #[arg(short = 'o')]
        options: Option<String>,
        /// Backing file (stored as given; relative names are relative to FILE's directory).
        #[arg(short = 'b')]
        backing: Option<String>,
        /// Backing file format.
        #[arg(short = 'F', value_enum)]
        backing_format: Option<Fmt>,
        file: PathBuf,
        size: Option<String>,
    },
}

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
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qcow2: {e:#}");
            ExitCode::from(1)
        }
    }
}
