//! The `qmpbackup` command line (clap): parsed by the binary, and read by the man page and
//! completion generator (`examples/gen-docs.rs`).

use crate::backup::BackupOptions;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// What the exit status says (also in README and the man pages).
pub const EXIT_CODES: &str = "Exit status: 0 success; 1 failure (the backup was not made, or not \
completely: see the log); 2 usage error; 3 the backup was made but pruning after it failed \
(--keep-*: finish with qmprestore prune --resume).";

/// Live backups of running QEMU VMs over QMP: full, incremental (dirty bitmaps), auto and
/// copy, all disks at once, with image fleecing on QEMU ≥ 7.1.
///
/// Start QEMU with a QMP socket reserved for backups (QMP serves one client at a time):
///   -qmp unix:/run/vm1-backup.qmp,server=on,wait=off
/// Restore with qmprestore (no QEMU needed).
#[derive(Parser)]
#[command(version, propagate_version = true, after_help = EXIT_CODES)]
pub struct Cli {
    /// QMP socket: a unix socket path, or tcp:HOST:PORT.
    #[arg(long, global = true)]
    pub socket: Option<String>,
    /// Guest agent socket (for --quiesce).
    #[arg(long, global = true)]
    pub agent_socket: Option<String>,
    /// Print every QMP message.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Also write the log to this file.
    #[arg(short = 'L', long, global = true)]
    pub logfile: Option<PathBuf>,
    /// Also log to syslog.
    #[arg(long, global = true)]
    pub syslog: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Show {
    Blockdev,
    Bitmaps,
}

#[derive(Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub opts: BackupOptions,
}

#[derive(Subcommand)]
pub enum Command {
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
