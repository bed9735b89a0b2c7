//! The `qcow2` command: qemu-img-like verbs over the native library, for hosts without
//! qemu-img. Argument parsing, wiring and exit codes only.

use clap::{Parser, Subcommand, ValueEnum};
use qcow2::ops::{compare, convert, info, map};
use qcow2::{check, Chain, Format, OpenOptions};
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
    /// Flatten a disk (the whole backing chain) into a new file.
    ///
    /// Example: qcow2 convert -O raw disk.qcow2 disk.raw
    Convert {
        /// Source format (probed when omitted).
        #[arg(short = 'f', value_enum)]
        format: Option<Fmt>,
        /// Output format.
        #[arg(short = 'O', value_enum)]
        output_format: Fmt,
        /// Replace DST if it exists.
        #[arg(long)]
        force: bool,
        src: PathBuf,
        dst: PathBuf,
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
                    let text: Vec<String> = infos.iter().map(info::human).collect();
                    write!(out, "{}", text.join("\n"))?;
                }
            }
        }
        Command::Map {
            output,
            format,
            file,
        } => {
            let chain = open(&file, format)?;
            match output {
                Output::Json => map::write_json(&chain, &mut out)?,
                Output::Human => map::write_human(&chain, &mut out)?,
            }
        }
        Command::Check { output, file } => {
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
            force,
            src,
            dst,
        } => {
            let chain = open(&src, format)?;
            match output_format {
                Fmt::Raw => {
                    convert::to_raw(&chain, &dst, force)?;
                }
                Fmt::Qcow2 => anyhow::bail!("convert -O qcow2 is not implemented yet; use -O raw"),
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
