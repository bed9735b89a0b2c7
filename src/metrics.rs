//! Prometheus text-format files for node_exporter's textfile collector: gauges of the last
//! run only (no counters, which would need state between runs), written under a temporary
//! name and renamed into place, so the collector never reads half a file.

use crate::fsutil::open_parent;
use anyhow::{Context, Result};
use clap::Args;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Options of the commands that can leave a metrics file.
#[derive(Args, Debug, Clone, Default)]
pub struct MetricsOptions {
    /// A name for this VM or job: logged, and the `name` label of every metric (the
    /// systemd units pass the instance name; required with --metrics-file, so two VMs'
    /// files never look alike).
    #[arg(long)]
    pub name: Option<String>,
    /// Write the run's outcome as Prometheus gauges to this file (atomically), for
    /// node_exporter's textfile collector (e.g. /var/lib/prometheus/node-exporter/qmpbackup-vm1.prom).
    #[arg(long, value_name = "PATH", requires = "name")]
    pub metrics_file: Option<PathBuf>,
}

impl MetricsOptions {
    /// The `name` label's value: the given name, else empty (still a valid label).
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }
}

struct Family {
    name: String,
    help: String,
    samples: Vec<(String, f64)>,
}

/// Gauges, grouped by metric name in the order first given.
#[derive(Default)]
pub struct Metrics {
    families: Vec<Family>,
}

fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

impl Metrics {
    /// Adds one sample of the gauge `name` (snake_case, with its unit as suffix).
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        let labels = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect::<Vec<_>>()
            .join(",");
        let i = match self.families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.families.push(Family {
                    name: name.to_string(),
                    help: help.to_string(),
                    samples: Vec::new(),
                });
                self.families.len() - 1
            }
        };
        self.families[i].samples.push((labels, value));
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help.replace('\n', " "));
            let _ = writeln!(out, "# TYPE {} gauge", f.name);
            for (labels, value) in &f.samples {
                let _ = writeln!(out, "{}{{{labels}}} {value}", f.name);
            }
        }
        out
    }

    /// Writes the file under a temporary name in its directory, then renames it into place.
    /// The temporary name is the writer's own (two runs pointed at one file never write
    /// through each other's), and does not end in `.prom`, so the collector skips it. The
    /// file is world-readable whatever the umask: node_exporter runs as another user.
    pub fn write(&self, path: &Path) -> Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::PermissionsExt;
        let (dir, name) = open_parent(path)?;
        let tmp = format!(".{name}.tmp-{}", std::process::id());
        dir.write_atomic_via(&name, &tmp, |f| {
            f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
            f.write_all(self.render().as_bytes())
        })
        .with_context(|| format!("{}: cannot write the metrics", path.display()))
    }
}

/// Seconds from `started` to `ended` (0 if the clock went back), as durations are given.
pub fn seconds_between(started: std::time::SystemTime, ended: std::time::SystemTime) -> f64 {
    ended
        .duration_since(started)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Seconds since the epoch, as metrics give times.
pub fn unix_seconds(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn families_group_their_samples_and_labels_are_escaped() {
        let mut m = Metrics::default();
        m.gauge("a_bytes", "A.", &[("name", "vm\"1"), ("disk", "d\\1")], 5.0);
        m.gauge("b_success", "B.", &[("name", "x\ny")], 1.0);
        m.gauge("a_bytes", "A.", &[("name", "vm2"), ("disk", "d2")], 0.5);
        assert_eq!(
            m.render(),
            "# HELP a_bytes A.\n# TYPE a_bytes gauge\na_bytes{name=\"vm\\\"1\",disk=\"d\\\\1\"} 5\n\
             a_bytes{name=\"vm2\",disk=\"d2\"} 0.5\n\
             # HELP b_success B.\n# TYPE b_success gauge\nb_success{name=\"x\\ny\"} 1\n"
        );
    }

    #[test]
    fn the_file_is_replaced_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.prom");
        std::fs::write(&path, "old").unwrap();
        let mut m = Metrics::default();
        m.gauge("x_seconds", "X.", &[("name", "")], 1.5);
        m.write(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "# HELP x_seconds X.\n# TYPE x_seconds gauge\nx_seconds{name=\"\"} 1.5\n"
        );
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }
}
