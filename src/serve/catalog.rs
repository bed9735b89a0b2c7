//! The exports of a backup directory: every point in time (each FULL, INC and COPY, older
//! chains included), named by its file name, opened on first use. Start-up reads only the
//! directory; a point's chain is opened, checked and given its manifests' read check when a
//! client first asks for it, so a directory with hundreds of points starts at once.

use crate::report;
use crate::restore::commands::{full_cluster_size, open_stack};
use crate::restore::options::CheckOptions;
use crate::serve::overlay::{Overlay, Record};
use crate::serve::reads::{self, Context, Piece};
use crate::store::chain::BackupChain;
use crate::store::disk_dir::DiskDir;
use crate::store::file::BackupFile;
use crate::store::fold::preflight;
use anyhow::{Context as _, Result};
use qcow2::Chain;
use std::path::{Path, PathBuf};
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
    /// The default export's writable overlay (`--overlay`).
    pub overlay: Option<Overlay>,
}

impl Export {
    pub fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    /// Reads (see [`reads::read`]), through the overlay if there is one.
    pub fn read(&self, offset: u64, buf: &mut [u8], fill_holes: bool) -> qcow2::Result<Vec<Piece>> {
        match &self.overlay {
            Some(o) => o.read(&self.chain, offset, buf, fill_holes),
            None => reads::read(&self.chain, offset, buf, fill_holes),
        }
    }

    /// Block status (see [`reads::block_status`]), the overlay as depth 1 if there is one.
    pub fn block_status(
        &self,
        ctx: Context,
        offset: u64,
        len: u64,
        one: bool,
    ) -> qcow2::Result<Vec<(u32, u32)>> {
        match &self.overlay {
            Some(o) => o.block_status(&self.chain, ctx, offset, len, one),
            None => reads::block_status(&self.chain, ctx, offset, len, one),
        }
    }
}

/// Every export of a directory, and which one the empty name means.
pub struct Catalog {
    pub points: Vec<Point>,
    /// Index of the default export (empty name).
    pub default: usize,
    checks: CheckOptions,
    /// The overlay file the default export writes to (`--overlay`), and that writable
    /// export once opened. The default point under its file name stays read-only.
    overlay: Option<PathBuf>,
    writable: OnceLock<std::result::Result<Arc<Export>, String>>,
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
            overlay: None,
            writable: OnceLock::new(),
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

    /// Makes the default export writable through the overlay `path` (created when
    /// missing); set before the default export is opened.
    pub fn with_overlay(mut self, path: Option<PathBuf>) -> Catalog {
        self.overlay = path;
        self
    }

    /// The default export's overlay, if it has one and is open.
    pub fn overlay(&self) -> Option<&Overlay> {
        self.writable
            .get()
            .and_then(|o| o.as_ref().ok())
            .and_then(|e| e.overlay.as_ref())
    }

    /// Whether the default export is writable.
    pub fn has_overlay(&self) -> bool {
        self.overlay.is_some()
    }

    /// The export a name names, opened: the point [`Catalog::find`] gives, except that
    /// the empty name gives the writable default export when there is an overlay.
    pub fn open_export(
        &self,
        name: &str,
    ) -> Option<(&Point, std::result::Result<Arc<Export>, String>)> {
        let p = self.find(name)?;
        let export = match (&self.overlay, name.is_empty()) {
            (Some(path), true) => self
                .writable
                .get_or_init(|| opened(p, open_point(p, &self.checks, Some(path))))
                .clone(),
            _ => self.open(p),
        };
        Some((p, export))
    }

    /// Opens a point read-only (once; later calls share the result). The error is a
    /// message for the client and the log.
    pub fn open(&self, p: &Point) -> std::result::Result<Arc<Export>, String> {
        p.opened
            .get_or_init(|| opened(p, open_point(p, &self.checks, None)))
            .clone()
    }
}

/// Logs the outcome of opening `p`; the error becomes a message for the client.
fn opened(p: &Point, r: Result<Export>) -> std::result::Result<Arc<Export>, String> {
    match r {
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
fn open_point(p: &Point, checks: &CheckOptions, overlay: Option<&Path>) -> Result<Export> {
    preflight(&p.chain, checks)?;
    let chain = open_stack(&p.chain, checks)?;
    let overlay = match overlay {
        Some(path) => {
            // The chain is named by its uuid and the point by its time: a file name may
            // change (prune renames a FULL it folds INCs into).
            let uuid = p.chain.uuid()?;
            let record = Record::new(uuid, p.file.timestamp, &p.file.name, chain.virtual_size());
            Some(Overlay::open(path, &record)?)
        }
        None => None,
    };
    Ok(Export {
        name: p.file.name.clone(),
        size: chain.virtual_size(),
        preferred: full_cluster_size(&chain).clamp(4096, 2 << 20) as u32,
        chain,
        overlay,
    })
}
