//! The writable overlay of the default export (`--overlay FILE`): a qcow2 image of our own
//! that takes the clients' writes while the backup files stay untouched. Reads look in the
//! overlay first and fall through to the point's chain where it holds nothing; a write to
//! part of a cluster copies the rest of the cluster from the chain (checked like every
//! read). The image is written in the crate's crash-safe order, so a kill loses at most the
//! writes not yet flushed and may leak clusters, never corrupts.
//!
//! The overlay records the point it sits on, by the chain's uuid and the point's time (not
//! a file name, which `prune` may change), in a header extension of its own (QEMU ignores
//! and keeps it), and refuses to sit on any other point.

use crate::fsutil::Dir;
use crate::serve::proto::{STATE_HOLE, STATE_ZERO};
use crate::serve::reads::{self, Context, Piece};
use anyhow::{bail, Context as _, Result};
use qcow2::create::{create_qcow2, CreateOptions};
use qcow2::{Chain, ExtentKind, OpenRwOptions, Qcow2};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// The header extension that holds the record ("qmpb").
pub const RECORD_EXTENSION: u32 = 0x716d_7062;
const RECORD_FORMAT: &str = "qmprestore-overlay";

/// The point an overlay sits on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub format: String,
    pub version: u32,
    /// The chain's bitmap uuid (from its FULL's manifest); None for chains without one.
    pub uuid: Option<String>,
    /// The point's time (the unix time in its file name).
    pub point_time: u64,
    /// The point's level and file name when the overlay was made, for messages only.
    pub point: String,
    pub virtual_size: u64,
}

impl Record {
    pub fn new(uuid: Option<String>, point_time: u64, point: &str, virtual_size: u64) -> Record {
        Record {
            format: RECORD_FORMAT.to_string(),
            version: 1,
            uuid,
            point_time,
            point: point.to_string(),
            virtual_size,
        }
    }

    /// Whether two records name one point (the file name may have changed).
    fn same_point(&self, other: &Record) -> bool {
        self.uuid == other.uuid && self.point_time == other.point_time
    }
}

/// An open overlay.
pub struct Overlay {
    path: PathBuf,
    image: RwLock<Qcow2>,
}

impl Overlay {
    /// Opens `path` for the point `wants`, creating it when missing (written under a
    /// temporary name, renamed when complete). An existing overlay must record the same
    /// point and size.
    pub fn open(path: &Path, wants: &Record) -> Result<Overlay> {
        if std::fs::symlink_metadata(path).is_err() {
            create(path, wants)?;
        }
        let image = Qcow2::open_rw(path, OpenRwOptions::default()).with_context(|| {
            format!(
                "--overlay {}: cannot open it for writing (another server using it?)",
                path.display()
            )
        })?;
        let Some(raw) = image.app_extension(RECORD_EXTENSION) else {
            bail!(
                "--overlay {}: this image was not made by `qmprestore serve --overlay`; give a new file name (it is created)",
                path.display()
            );
        };
        let has: Record = serde_json::from_slice(raw)
            .ok()
            .filter(|r: &Record| r.format == RECORD_FORMAT)
            .with_context(|| format!("--overlay {}: its record is unreadable", path.display()))?;
        if !has.same_point(wants) {
            bail!(
                "--overlay {} holds writes over another point ({} of chain {}), not {} of chain {}: serve that point (--until {}) or give another overlay file",
                path.display(),
                has.point,
                has.uuid.as_deref().unwrap_or("without uuid"),
                wants.point,
                wants.uuid.as_deref().unwrap_or("without uuid"),
                has.point_time,
            );
        }
        if image.virtual_size() != wants.virtual_size {
            bail!(
                "--overlay {}: its size ({} bytes) is not the point's ({} bytes)",
                path.display(),
                image.virtual_size(),
                wants.virtual_size
            );
        }
        Ok(Overlay {
            path: path.to_path_buf(),
            image: RwLock::new(image),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn image(&self) -> std::sync::RwLockReadGuard<'_, Qcow2> {
        self.image.read().unwrap_or_else(|e| e.into_inner())
    }

    fn image_mut(&self) -> std::sync::RwLockWriteGuard<'_, Qcow2> {
        self.image.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads as [`reads::read`] does, the overlay over `below`.
    pub fn read(
        &self,
        below: &Chain,
        offset: u64,
        buf: &mut [u8],
        fill_holes: bool,
    ) -> qcow2::Result<Vec<Piece>> {
        let img = self.image();
        let mut pieces: Vec<Piece> = Vec::new();
        let mut add = |p: Piece| match pieces.last_mut() {
            Some(l) if l.hole == p.hole && l.at + l.len == p.at => l.len += p.len,
            _ => pieces.push(p),
        };
        for (s, n, kind) in own_extents(&img, offset, buf.len() as u64)? {
            let at = s - offset;
            let b = &mut buf[at as usize..(at + n) as usize];
            match kind {
                ExtentKind::Unallocated => {
                    for p in reads::read(below, s, b, fill_holes)? {
                        add(Piece { at: at + p.at, ..p });
                    }
                }
                ExtentKind::Zero { .. } => {
                    if fill_holes {
                        b.fill(0);
                    }
                    add(Piece {
                        at,
                        len: n,
                        hole: true,
                    });
                }
                _ => {
                    img.read_view(b, s, None)?;
                    add(Piece {
                        at,
                        len: n,
                        hole: false,
                    });
                }
            }
        }
        Ok(pieces)
    }

    /// Block status as [`reads::block_status`] gives it, the overlay as depth 1.
    pub fn block_status(
        &self,
        below: &Chain,
        ctx: Context,
        offset: u64,
        len: u64,
        one: bool,
    ) -> qcow2::Result<Vec<(u32, u32)>> {
        let img = self.image();
        let mut out: Vec<(u64, u32)> = Vec::new();
        for (s, n, kind) in own_extents(&img, offset, len)? {
            let (flags_below, own) = match (kind, ctx) {
                (ExtentKind::Unallocated, _) => (true, 0),
                (ExtentKind::Zero { .. }, Context::Allocation) => (false, STATE_HOLE | STATE_ZERO),
                (_, Context::Allocation) => (false, 0),
                (_, Context::Depth) => (false, 1),
            };
            let parts = if flags_below {
                reads::block_status(below, ctx, s, n, false)?
                    .into_iter()
                    .map(|(l, f)| {
                        let f = if ctx == Context::Depth && f != 0 {
                            f + 1
                        } else {
                            f
                        };
                        (l as u64, f)
                    })
                    .collect()
            } else {
                vec![(n, own)]
            };
            for (l, f) in parts {
                match out.last_mut() {
                    Some((ll, lf)) if *lf == f => *ll += l,
                    _ => out.push((l, f)),
                }
            }
            if one && out.len() > 1 {
                break;
            }
        }
        if one {
            out.truncate(1);
        }
        Ok(out.into_iter().map(|(l, f)| (l as u32, f)).collect())
    }

    /// Writes guest data (a partial cluster is completed from `below`).
    pub fn write(&self, below: &Chain, offset: u64, data: &[u8]) -> qcow2::Result<()> {
        self.image_mut().write_at(data, offset, Some(below))
    }

    /// Makes a range read as zeros; whole clusters become zero clusters, their space freed
    /// when `unmap`.
    pub fn write_zeroes(
        &self,
        below: &Chain,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> qcow2::Result<()> {
        self.image_mut()
            .write_zeroes(offset, len, unmap, Some(below))
    }

    /// Trim: the whole clusters of the range read as zeros afterwards and their space is
    /// freed; partial clusters are left as they are (a trim promises nothing about them).
    pub fn trim(&self, offset: u64, len: u64) -> qcow2::Result<()> {
        let mut img = self.image_mut();
        let cs = img.cluster_size();
        let size = img.virtual_size();
        let start = offset.div_ceil(cs) * cs;
        let mut end = (offset + len) / cs * cs;
        if offset + len == size {
            end = size;
        }
        if end > start {
            img.write_zeroes(start, end - start, true, None)?;
        }
        Ok(())
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> qcow2::Result<()> {
        self.image_mut().flush()
    }
}

/// The overlay's own extents over `[offset, offset + len)`: (start, length, kind).
fn own_extents(img: &Qcow2, offset: u64, len: u64) -> qcow2::Result<Vec<(u64, u64, ExtentKind)>> {
    let end = offset + len;
    let mut out: Vec<(u64, u64, ExtentKind)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let (n, kind) = img.block_status(pos, end - pos)?;
        out.push((pos, n, kind));
        pos += n;
    }
    Ok(out)
}

/// Creates the overlay: a qcow2 of the point's size holding nothing, with its record.
fn create(path: &Path, record: &Record) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("--overlay {}: not a file name", path.display()))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = Dir::open(parent)
        .with_context(|| format!("--overlay {}: cannot open its directory", path.display()))?;
    let tmp_name = format!(".{name}.creating");
    let tmp = parent.join(&tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let made = (|| -> Result<()> {
        let mut img = create_qcow2(
            &tmp,
            &CreateOptions {
                size: record.virtual_size,
                ..Default::default()
            },
        )?;
        img.set_app_extension(RECORD_EXTENSION, serde_json::to_vec(record)?)?;
        img.flush()?;
        Ok(())
    })();
    if let Err(e) = made {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("--overlay {}: cannot create it", path.display()));
    }
    dir.rename_noreplace(&tmp_name, name).with_context(|| {
        format!(
            "--overlay {}: cannot move the new overlay into place",
            path.display()
        )
    })?;
    dir.sync();
    Ok(())
}
