//! The exports of a backup directory: every point in time (each FULL, INC and COPY, older
//! chains included), named by its file name, opened on first use. Start-up reads only the
//! directory; a point's chain is opened, checked and given its manifests' read check when a
//! client first asks for it, so a directory with hundreds of points starts at once.

use crate::report;
use crate::restore::commands::{full_cluster_size, open_stack, preflight};
use crate::restore::options::CheckOptions;
use crate::store::chain::BackupChain;
use crate::store::disk_dir::DiskDir;
use crate::store::file::BackupFile;
use anyhow::{Context, Result};
use qcow2::Chain;
use std::sync::{Arc, OnceLock};

/// The largest request payload we take and advertise: 32 MiB.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// One point of the directory as an export.
pub struct Point {
    /// The backup file of the point: the export's name is its file name.
    pub file: BackupFile,
    /// The chain up to and including this point (a COPY is a chain of its own).
    pub chain: BackupChain,
    /// For `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`: level and UTC time.
    pub description: String,
    opened: OnceLock<std::result::Result<Arc<Export>, String>>,
}

/// An opened point: what the transmission phase reads.
pub struct Export {
    pub name: String,
    pub chain: Chain,
    pub size: u64,
    /// Preferred block size: the point's cluster size (at least 4 KiB, at most 2 MiB).
    pub preferred: u32,
}

/// Every export of a directory, and which one the empty name means.
pub struct Catalog {
    pub points: Vec<Point>,
    /// Index of the default export (empty name).
    pub default: usize,
    checks: CheckOptions,
}

impl Catalog {
    /// The points of the disk directory `dir` (`filter` as in the restore commands); the
    /// default export is the point `until` names, else the newest point of the newest chain.
    pub fn scan(
        dir: &std::path::Path,
        filter: Option<&str>,
        until: Option<&str>,
        checks: CheckOptions,
    ) -> Result<Catalog> {
        let d = DiskDir::scan(dir, filter)?;
        let default_chain = d.chain_until(until)?;
        let default_file = default_chain.newest().clone();
        let mut points = Vec::new();
        for c in &d.chains {
            for (i, f) in c.files().into_iter().enumerate() {
                let chain = BackupChain {
                    full: c.full.clone(),
                    incs: c.incs[..i].to_vec(),
                };
                points.push(Point::new(f.clone(), chain));
            }
        }
        for copy in &d.copies {
            let chain = BackupChain {
                full: copy.clone(),
                incs: Vec::new(),
            };
            points.push(Point::new(copy.clone(), chain));
        }
        let default = points
            .iter()
            .position(|p| p.file.path == default_file.path)
            .context("internal: the default point is not in the directory")?;
        Ok(Catalog {
            points,
            default,
            checks,
        })
    }

    /// The point an export name names: empty for the default, else the file name, the
    /// name without extension or `<LEVEL>-<time>` (as `--until` takes them).
    pub fn find(&self, name: &str) -> Option<&Point> {
        if name.is_empty() {
            return self.points.get(self.default);
        }
        // An exact file name first: `FULL-1` could otherwise match another spelling.
        self.points
            .iter()
            .find(|p| p.file.name == name)
            .or_else(|| {
                self.points
                    .iter()
                    .rev()
                    .find(|p| p.file.matches_point(name))
            })
    }

    /// Opens a point (once; later calls share the result). The error is a message for the
    /// client and the log.
    pub fn open(&self, p: &Point) -> std::result::Result<Arc<Export>, String> {
        p.opened
            .get_or_init(|| match open_point(p, &self.checks) {
                Ok(e) => {
                    report::info(format!(
                        "export {}: opened ({} file(s), {} bytes)",
                        p.file.name,
                        p.chain.files().len(),
                        e.size
                    ));
                    Ok(Arc::new(e))
                }
                Err(e) => {
                    let msg = format!("{}: cannot be served: {e:#}", p.file.name);
                    report::error(&msg);
                    Err(msg)
                }
            })
            .clone()
    }
}

impl Point {
    fn new(file: BackupFile, chain: BackupChain) -> Point {
        let description = format!(
            "{} backup of {} UTC",
            file.level.prefix(),
            crate::humanize::format_utc(file.timestamp as i64)
        );
        Point {
            file,
            chain,
            description,
            opened: OnceLock::new(),
        }
    }
}

/// Opens a point's chain: checked as the restore commands check it, and read through its
/// manifests (unless `--ignore-checksums`), as merge reads it.
fn open_point(p: &Point, checks: &CheckOptions) -> Result<Export> {
    preflight(&p.chain, checks)?;
    let chain = open_stack(&p.chain, checks)?;
    Ok(Export {
        name: p.file.name.clone(),
        size: chain.virtual_size(),
        preferred: full_cluster_size(&chain).clamp(4096, 2 << 20) as u32,
        chain,
    })
}
