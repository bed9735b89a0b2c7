//! The `qcow2` command line (clap): parsed by the binary, and read by the man page and
//! completion generator (`examples/gen-docs.rs`).

use clap::{Parser, Subcommand, ValueEnum};
use qcow2::Format;
use std::path::PathBuf;

/// What the exit status says (also in the man pages).
pub const EXIT_CODES: &str = "Exit status follows qemu-img: 0 success; 1 error (a usage error \
too); check: 2 corruptions, 3 leaks only; compare: 1 different, 2 error.";

/// Inspect and convert qcow2 images and backing chains without QEMU.
#[derive(Parser)]
#[command(version, propagate_version = true, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Human,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Repair {
    Leaks,
    All,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Fmt {
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
pub enum Command {
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
