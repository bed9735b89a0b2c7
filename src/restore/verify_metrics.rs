//! The metrics a `qmprestore verify` run leaves (`--metrics-file`).

use crate::metrics::{seconds_between, unix_seconds, Metrics};
use crate::restore::commands::VerifiedFile;
use std::path::Path;
use std::time::SystemTime;

/// The gauges of one verify of `dir`: `results` is None when verify could not run at all
/// (no backups, a lock held, a prune to finish), which counts as a failure.
pub fn verify_metrics(
    name: &str,
    dir: &Path,
    started: SystemTime,
    ended: SystemTime,
    results: Option<&[VerifiedFile]>,
) -> Metrics {
    let mut m = Metrics::default();
    let dir = dir.display().to_string();
    let labels = [("name", name), ("dir", dir.as_str())];
    m.gauge(
        "qmprestore_last_verify_timestamp_seconds",
        "When the last verify of the directory ended (Unix time).",
        &labels,
        unix_seconds(ended),
    );
    m.gauge(
        "qmprestore_last_verify_duration_seconds",
        "How long the last verify of the directory took.",
        &labels,
        seconds_between(started, ended),
    );
    let problems = results.map(|r| r.iter().filter(|f| !f.ok).count());
    m.gauge(
        "qmprestore_last_verify_success",
        "1 when the last verify found every backup sound, else 0.",
        &labels,
        if problems == Some(0) { 1.0 } else { 0.0 },
    );
    if let Some(results) = results {
        m.gauge(
            "qmprestore_last_verify_problems",
            "Files (or chains) the last verify found damaged.",
            &labels,
            problems.unwrap_or(0) as f64,
        );
        m.gauge(
            "qmprestore_last_verify_files",
            "Backup files the last verify checked.",
            &labels,
            results.len() as f64,
        );
        m.gauge(
            "qmprestore_last_verify_manifest_files",
            "Backup files whose data the last verify checked against a checksum manifest.",
            &labels,
            results.iter().filter(|f| f.manifest).count() as f64,
        );
    }
    m
}
