//! The `qmprestore` command line (clap): parsed by the binary, and read by the man page and
//! completion generator (`examples/gen-docs.rs`).

use crate::metrics::MetricsOptions;
use crate::restore::merge::TargetFormat;
use crate::restore::options::{CheckOptions, DirOptions, RateOption, UntilOption};
use crate::serve::ServeOptions;
use crate::store::retention::KeepOptions;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// What the exit status says (also in README and the man pages).
pub const EXIT_CODES: &str = "Exit status: 0 success; 1 failure (nothing changed unless the \
message says so; verify: problems found); 2 usage error.";

/// Restore FULL+INC backup chains natively: rebase, commit, merge, snapshotrebase, verify,
/// list, serve, prune. Works on hosts without QEMU. Every command checks the whole chain before its first
/// write; a damaged file anywhere stops it with nothing changed.
///
/// A backup directory holds one disk's backups: FULL-<unix time>-<name>, INC-<unix
/// time>-<name>, COPY-<unix time>-<name>, ordered by the time in their names. With several
/// FULLs, commands use the newest FULL and the INCs after it.
#[derive(Parser)]
#[command(version, propagate_version = true, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(flatten)]
    pub check: CheckOptions,
    /// Print only errors.
    #[arg(long, short = 'q', global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// What the commands that rewrite the chain in place (commit, snapshotrebase) take.
#[derive(Args)]
pub struct InPlaceArgs {
    #[command(flatten)]
    pub dir: DirOptions,
    #[command(flatten)]
    pub until: UntilOption,
    #[command(flatten)]
    pub rate: RateOption,
    /// Progress events and a summary as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// CHANGES THE BACKUP FILES: set each INC's backing file to its predecessor (no data is
    /// copied) and point a symlink `image` in the directory at the newest point, which QEMU
    /// or `qcow2` can then open as the restored disk.
    ///
    /// Example: qmprestore rebase --dir /backup/disk1 --until INC-1706260646
    Rebase {
        #[command(flatten)]
        dir: DirOptions,
        #[command(flatten)]
        until: UntilOption,
        /// Show what would change and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// CHANGES THE BACKUP FILES: commit the INCs into the FULL in place, in order, and remove
    /// each INC once its data is in. An interrupted run is finished by running it again.
    ///
    /// Example: qmprestore commit --dir /backup/disk1
    Commit(InPlaceArgs),
    /// Restore a point in time where the disk lives; the backup files are only read.
    ///
    /// Targets:
    ///   a new file (--format qcow2, the default, or raw: sparse, zeros left as holes),
    ///     written under a temporary name and renamed when complete; an existing file is
    ///     never overwritten; a checksum manifest is written beside it;
    ///   an existing block device or file with --in-place (an LVM volume, a zvol, a mapped
    ///     RBD image, the VM's own disk): refused when it is too small, mounted, held by
    ///     device-mapper/RAID or an O_EXCL opener, or open in a QEMU; ranges that read as
    ///     zero are zeroed by range (--no-zero skips that for a target known to be zero);
    ///     flushed before success. Interrupted: run it again;
    ///   standard output with --targetfile - and --format raw: the whole disk in order.
    /// --vm-dir restores every disk of a backup target at one point in time into
    /// --targetdir, one file per disk directory.
    ///
    /// Examples:
    ///   qmprestore merge --dir /backup/vm1/disk1 --targetfile /restore/disk1.qcow2
    ///   qmprestore merge --dir /backup/vm1/disk1 --format raw --targetfile /dev/vg0/vm1-disk1 --in-place
    ///   qmprestore merge --dir /backup/vm1/disk1 --format raw --targetfile - | ssh host dd of=/dev/vg0/disk1 bs=4M
    ///   qmprestore merge --vm-dir /backup/vm1 --targetdir /restore/vm1 --until 2026-01-31T23:00:00Z
    #[command(verbatim_doc_comment)]
    Merge {
        /// The disk's backup directory (e.g. /backup/vm1/disk1).
        #[arg(long, required_unless_present = "vm_dir", conflicts_with = "vm_dir")]
        dir: Option<PathBuf>,
        /// Use only files whose name contains this string.
        #[arg(long, conflicts_with = "vm_dir")]
        filter: Option<String>,
        /// Restore up to this point. With --dir: a file name, the name without extension,
        /// or INC-<time>. With --vm-dir: a time, unix or UTC (2026-01-31T23:00:00Z); each
        /// disk is restored at its newest point not after it.
        #[arg(long)]
        until: Option<String>,
        /// The target: a new file, an existing device or file with --in-place, or - for
        /// standard output (--format raw).
        #[arg(long, required_unless_present = "vm_dir", conflicts_with = "vm_dir")]
        targetfile: Option<PathBuf>,
        /// Restore every disk under this qmpbackup target (its --target directory; month
        /// folders included), all at one point in time: the newest backup run that covers
        /// every disk, or --until's.
        #[arg(long, requires = "targetdir")]
        vm_dir: Option<PathBuf>,
        /// Where --vm-dir puts the disks: <targetdir>/<disk directory name> (with
        /// --format raw, .raw is appended unless the name ends in .raw or .img).
        #[arg(long, requires = "vm_dir")]
        targetdir: Option<PathBuf>,
        /// qcow2 (default) or raw.
        #[arg(long, value_enum, default_value = "qcow2")]
        format: TargetFormat,
        /// Write over the existing --targetfile: a block device or a file.
        #[arg(long)]
        in_place: bool,
        /// With --in-place: the target already reads as zeros (a fresh thin LV), so ranges
        /// that read as zero are left alone.
        #[arg(long, requires = "in_place")]
        no_zero: bool,
        /// Write the checksum manifest of the restored disk here (for a device, an in-place
        /// file or a stream, which get none otherwise; a new file gets one beside it).
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Give the new image blocks of its own. By default, where the target is on the
        /// backups' filesystem and it can share blocks (XFS, btrfs), the image shares the
        /// backups' data blocks copy-on-write, as `cp --reflink=auto` does: almost no
        /// writing and no extra space. Use this for a copy that must not depend on the
        /// backups' blocks (to guard against a media error hitting both).
        #[arg(long)]
        no_reflink: bool,
        #[command(flatten)]
        rate: RateOption,
        /// Progress events and a summary as JSON lines on stdout (on stderr when stdout
        /// carries the raw stream).
        #[arg(long)]
        json: bool,
    },
    /// CHANGES THE BACKUP FILES: snapshot the FULL as `FULL-BACKUP`, then commit each INC into
    /// it and snapshot each point as YYYY-MM-DD-HH:MM:SS (UTC, from the INC's name). The
    /// INC files are removed at the end. Interrupted: run again (done points are skipped), or
    /// roll back with `qcow2 snapshot -a FULL-BACKUP <FULL file>`.
    ///
    /// Example: qmprestore snapshotrebase --dir /backup/disk1
    Snapshotrebase(InPlaceArgs),
    /// Check every backup in the directory: structure, chain continuity, and every data
    /// cluster against the file's checksum manifest where there is one. Exit 0 when sound.
    ///
    /// Example: qmprestore verify --dir /backup/disk1
    Verify {
        #[command(flatten)]
        dir: DirOptions,
        /// Print the results as JSON on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        metrics: MetricsOptions,
    },
    /// Serve every point in time of the directory over NBD, read straight from the backup
    /// files (nothing is merged first; every block served is checked against its file's
    /// manifest, a mismatch answers that read with EIO). The default export (empty name) is
    /// the newest point, or --until's; every point is also an export named by its backup
    /// file name (nbdinfo --list shows them). Runs in the foreground and prints the URI to
    /// connect to; SIGINT/SIGTERM stop it after answering the requests in flight. With
    /// --overlay the default export is writable and writes go into that file, never into
    /// the backups. With --tls-cert/--tls-key clients must use TLS; --tls-ca makes them
    /// present a certificate signed by that CA (do this when listening beyond this host).
    /// Backups may add points while the directory is served (seen after a restart);
    /// commit, rebase and snapshotrebase are refused while it is served.
    ///
    /// Examples:
    ///   qmprestore serve --dir /backup/vm1/disk1 --socket /run/disk1.nbd
    ///   qemu-img convert -O qcow2 'nbd+unix:///INC-1706260646-disk1.qcow2?socket=/run/disk1.nbd' copy.qcow2
    ///   nbdfuse /mnt/nbd/disk 'nbd+unix:///?socket=/run/disk1.nbd' & mount -o loop,ro /mnt/nbd/disk /mnt/disk1
    ///   qmprestore serve --dir /backup/vm1/disk1 --socket /run/disk1.nbd --overlay /var/lib/vm1/changes.qcow2
    ///   qmprestore serve --dir /backup/vm1/disk1 --listen 192.0.2.10:10809 --tls-cert cert.pem --tls-key key.pem --tls-ca ca.pem
    #[command(verbatim_doc_comment)]
    Serve(ServeOptions),
    /// CHANGES THE BACKUP FILES: keep the points a keep-policy names and remove the others,
    /// folding each removed point's data into the next kept one, so every kept point
    /// restores exactly as before.
    ///
    /// --dir is a disk's backup directory or a whole backup target (every disk, across
    /// its YYYY-MM month folders: a month none of whose points is kept goes whole). Rules
    /// run in the order last, hourly, daily, weekly, monthly, yearly, newest point first,
    /// as in Proxmox Backup Server and borg: each keeps the newest point of each of its N
    /// newest periods not already kept by an earlier rule. Periods are in local time (TZ)
    /// unless --utc; a point's time is the one in its file name. The newest point is
    /// always kept: the next incremental continues from it. COPY backups are kept or
    /// removed by the same rules among themselves.
    ///
    /// The plan is printed first (--dry-run: only the plan). A FULL's point removed: the
    /// INCs up to the next kept point are committed into the FULL, which takes that
    /// point's name. Points between kept ones: folded into the next kept INC. Chains with
    /// no kept point: removed. Manifests are updated from the changed data alone.
    ///
    /// Interrupted (killed, disk full): every kept point still restores right; the
    /// directories being changed hold a journal (.prune-journal), other commands refuse
    /// them until a prune (or prune --resume) finishes the job.
    ///
    /// Examples:
    ///   qmprestore prune --dir /backup/vm1 --keep-daily 7 --keep-weekly 4 --keep-monthly 6 --dry-run
    ///   qmprestore prune --dir /backup/vm1/disk1 --keep-last 10
    ///   qmprestore prune --dir /backup/vm1 --resume
    #[command(verbatim_doc_comment)]
    Prune {
        /// A disk's backup directory, or a backup target (qmpbackup's --target).
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        keep: KeepOptions,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only finish what an interrupted prune left (no keep options needed).
        #[arg(long, conflicts_with = "dry_run")]
        resume: bool,
        #[command(flatten)]
        rate: RateOption,
        /// Print the plan as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List the chains in the directory with their points in time and sizes.
    ///
    /// Example: qmprestore list --dir /backup/disk1 --json
    List {
        #[command(flatten)]
        dir: DirOptions,
        #[arg(long)]
        json: bool,
    },
}
