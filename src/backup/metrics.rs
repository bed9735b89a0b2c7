//! The metrics a `qmpbackup backup` run leaves (`--metrics-file`): the run's outcome, what
//! it backed up, and per disk of the target its newest point and chain length, read from
//! the target itself (so a failed run still says how old the newest backup is, with no
//! state kept between runs).

use crate::backup::Summary;
use crate::metrics::{seconds_between, unix_seconds, Metrics};
use crate::store::vm::find_disks_lenient;
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

/// Per disk directory of the target: its newest point in time (any level) and the points
/// of its newest chain. Nothing when the target cannot be read.
fn target_gauges(m: &mut Metrics, name: &str, target: &Path) {
    let Ok(disks) = find_disks_lenient(target) else {
        return;
    };
    for (disk, b) in &disks {
        let labels = [("name", name), ("disk", disk.as_str())];
        let newest = b
            .chains
            .iter()
            .flat_map(|(_, c)| c.files())
            .chain(b.copies.iter())
            .map(|f| f.timestamp)
            .max();
        if let Some(t) = newest {
            m.gauge(
                "qmpbackup_disk_newest_point_timestamp_seconds",
                "The newest point in time the disk's backups hold (Unix time; any level).",
                &labels,
                t as f64,
            );
        }
        if let Some((_, chain)) = b.chains.iter().max_by_key(|(_, c)| c.full.timestamp) {
            m.gauge(
                "qmpbackup_disk_chain_points",
                "Points in time in the disk's newest chain (its FULL and INCs).",
                &labels,
                chain.files().len() as f64,
            );
        }
    }
}

/// The gauges of one run against `target`. `exit_code` is what the process exits with.
pub fn backup_metrics(
    name: &str,
    target: &Path,
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
        seconds_between(started, ended),
    );
    m.gauge(
        "qmpbackup_last_run_success",
        "1 when the last run made its backup of every disk and any prune after it succeeded, else 0.",
        &run,
        if exit_code == 0 { 1.0 } else { 0.0 },
    );
    m.gauge(
        "qmpbackup_last_run_exit_code",
        "The last run's exit status: 0 success, 1 failure, 2 usage error, 3 backup made but its prune failed.",
        &run,
        f64::from(exit_code),
    );
    if let Outcome::Made { summary, pruned } = outcome {
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
            let disk = [("name", name), ("disk", d.name.as_str())];
            m.gauge(
                "qmpbackup_disk_last_backup_info",
                "The disk's last backup: its device and level (full, inc, copy).",
                &[
                    ("name", name),
                    ("disk", d.name.as_str()),
                    ("device", d.disk.as_str()),
                    ("level", &level),
                ],
                1.0,
            );
            m.gauge(
                "qmpbackup_disk_last_backup_written_bytes",
                "Guest data the disk's last backup file holds.",
                &disk,
                d.bytes as f64,
            );
            m.gauge(
                "qmpbackup_disk_last_backup_duration_seconds",
                "How long QEMU's job took for the disk's last backup.",
                &disk,
                d.seconds,
            );
        }
    }
    target_gauges(&mut m, name, target);
    m
}
