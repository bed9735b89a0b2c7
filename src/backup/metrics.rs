//! The metrics a `qmpbackup backup` run leaves (`--metrics-file`): the run's outcome, and per
//! disk what was backed up and how long its chain now is.

use crate::backup::Summary;
use crate::metrics::{unix_seconds, Metrics};
use crate::store::disk_dir::DiskDir;
use std::path::Path;
use std::time::SystemTime;

/// How a run ended, as the metrics tell it.
pub enum Outcome<'a> {
    /// The backup was made; `pruned` is None without --keep-*, else whether the prune
    /// after it succeeded.
    Made {
        summary: &'a Summary,
        pruned: Option<bool>,
    },
    Failed,
}

/// The points of the chain that `file` (a backup just made) belongs to, as its directory
/// holds them now (after any prune); None when the directory cannot be read.
fn chain_points(file: &Path, disk_name: &str) -> Option<usize> {
    let dir = DiskDir::scan(file.parent()?, Some(disk_name)).ok()?;
    if file
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("COPY-"))
    {
        return Some(1);
    }
    dir.chains.last().map(|c| c.files().len())
}

/// The gauges of one run. `exit_code` is what the process exits with.
pub fn backup_metrics(
    name: &str,
    started: SystemTime,
    ended: SystemTime,
    outcome: &Outcome,
    exit_code: u8,
) -> Metrics {
    let mut m = Metrics::default();
    let run = [("name", name)];
    m.gauge(
        "qmpbackup_last_run_start_timestamp_seconds",
        "When the last qmpbackup backup run started (Unix time).",
        &run,
        unix_seconds(started),
    );
    m.gauge(
        "qmpbackup_last_run_end_timestamp_seconds",
        "When the last qmpbackup backup run ended (Unix time).",
        &run,
        unix_seconds(ended),
    );
    m.gauge(
        "qmpbackup_last_run_duration_seconds",
        "How long the last backup run took, prune included.",
        &run,
        ended
            .duration_since(started)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
    );
    let made = matches!(outcome, Outcome::Made { .. });
    m.gauge(
        "qmpbackup_last_run_success",
        "1 when the last run made its backup of every disk, else 0.",
        &run,
        if made { 1.0 } else { 0.0 },
    );
    m.gauge(
        "qmpbackup_last_run_exit_code",
        "The last run's exit status: 0 success, 1 failure, 3 backup made but its prune failed.",
        &run,
        f64::from(exit_code),
    );
    let Outcome::Made { summary, pruned } = outcome else {
        return m;
    };
    if let Some(ok) = pruned {
        m.gauge(
            "qmpbackup_last_run_prune_success",
            "1 when the prune after the last backup (--keep-*) succeeded, else 0.",
            &run,
            if *ok { 1.0 } else { 0.0 },
        );
    }
    m.gauge(
        "qmpbackup_last_backup_timestamp_seconds",
        "The point in time of the last backup made (Unix time, as in its file names).",
        &run,
        summary.timestamp as f64,
    );
    m.gauge(
        "qmpbackup_last_backup_quiesced",
        "1 when the guest's filesystems were frozen for the last backup, else 0.",
        &run,
        if summary.quiesced { 1.0 } else { 0.0 },
    );
    for d in &summary.disks {
        let level = d.level.prefix().to_ascii_lowercase();
        let labels = [("name", name), ("disk", d.disk.as_str()), ("level", &level)];
        m.gauge(
            "qmpbackup_disk_last_backup_written_bytes",
            "Guest data the disk's last backup file holds.",
            &labels,
            d.bytes as f64,
        );
        m.gauge(
            "qmpbackup_disk_last_backup_duration_seconds",
            "How long QEMU's job took for the disk's last backup.",
            &labels,
            d.seconds,
        );
        if let Some(points) = chain_points(Path::new(&d.file), &d.name) {
            m.gauge(
                "qmpbackup_disk_chain_points",
                "Points in time in the disk's current chain (its FULL and INCs; 1 for a copy).",
                &[("name", name), ("disk", d.disk.as_str())],
                points as f64,
            );
        }
    }
    m
}
