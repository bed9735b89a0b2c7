//! A backing chain: the top image and everything below it, opened read-only, mapped and read
//! as one virtual disk.

use crate::error::{Error, IoContext, Result};
use crate::format::header::MAGIC;
use crate::image::{resolve_relative, Backing, Qcow2};
use crate::mapping::{Extent, ExtentKind};
use crate::storage::{FileStorage, Storage};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longest chain we follow: generous for long incremental chains, finite for loops we miss.
pub const MAX_CHAIN_DEPTH: usize = 4096;
/// Extents collected per internal mapping step (bounds the memory of one mapping call).
pub const MAP_BATCH: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "qcow2" => Some(Format::Qcow2),
            "raw" => Some(Format::Raw),
            _ => None,
        }
    }
}

/// A raw image: guest offset = file offset.
pub struct Raw {
    path: String,
    storage: Arc<dyn Storage>,
    size: u64,
}

impl Raw {
    pub fn open(path: &Path) -> Result<Raw> {
        let display = path.display().to_string();
        let s = FileStorage::open(path, false).on_file(&display, "cannot open")?;
        let size = s.len().at(&display, "getting file length", 0)?;
        Ok(Raw {
            path: display,
            storage: Arc::new(s),
            size,
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
}

pub enum Layer {
    Qcow2(Box<Qcow2>),
    Raw(Raw),
}

impl Layer {
    pub fn path(&self) -> &str {
        match self {
            Layer::Qcow2(q) => q.path(),
            Layer::Raw(r) => &r.path,
        }
    }

    pub fn virtual_size(&self) -> u64 {
        match self {
            Layer::Qcow2(q) => q.virtual_size(),
            Layer::Raw(r) => r.size,
        }
    }

    pub fn format(&self) -> Format {
        match self {
            Layer::Qcow2(_) => Format::Qcow2,
            Layer::Raw(_) => Format::Raw,
        }
    }

    pub fn as_qcow2(&self) -> Option<&Qcow2> {
        match self {
            Layer::Qcow2(q) => Some(q),
            Layer::Raw(_) => None,
        }
    }

    /// The storage a data extent of this layer points into.
    pub fn data_storage(&self) -> &Arc<dyn Storage> {
        match self {
            Layer::Qcow2(q) => q.data_storage(),
            Layer::Raw(r) => &r.storage,
        }
    }

    fn block_status(&self, guest: u64, max_len: u64) -> Result<(u64, ExtentKind)> {
        match self {
            Layer::Qcow2(q) => q.block_status(guest, max_len),
            Layer::Raw(_) => Ok((max_len, ExtentKind::Data { host: guest })),
        }
    }

    fn read_data(&self, buf: &mut [u8], host: u64) -> Result<()> {
        match self {
            Layer::Qcow2(q) => q.read_data(buf, host),
            Layer::Raw(r) => r
                .storage
                .read_at(buf, host)
                .at(&r.path, "reading data", host),
        }
    }
}

/// Detects the format from the first bytes: qcow2 by its magic, anything else is raw.
pub fn probe_format(path: &Path) -> Result<Format> {
    let display = path.display().to_string();
    let s = FileStorage::open(path, false).on_file(&display, "cannot open")?;
    let mut magic = [0u8; 4];
    s.read_at(&mut magic, 0).at(&display, "reading header", 0)?;
    Ok(if u32::from_be_bytes(magic) == MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

pub struct Chain {
    layers: Vec<Layer>,
    check: Option<Arc<dyn ReadCheck>>,
}

/// A stretch of guest bytes a chain read resolved to one layer, handed to a [`ReadCheck`].
#[derive(Debug, Clone, Copy)]
pub struct ResolvedRead<'a> {
    /// Guest offset of the first byte.
    pub start: u64,
    pub len: u64,
    /// The layer it came from (0 = top). When `allocated` is false, no layer at or above
    /// `depth` holds the range (it reads as zeros).
    pub depth: usize,
    /// Held by layer `depth` (data, compressed or a zero flag).
    pub allocated: bool,
    /// The guest bytes when they were read; None when the range reads as zeros and the
    /// reader did not read it.
    pub data: Option<&'a [u8]>,
}

/// Checks what a chain reads before it is used (against checksums recorded when the layers
/// were written, say). An error fails the read that was checked.
pub trait ReadCheck: Send + Sync {
    /// Called for every stretch a read resolved. `chain` reads a layer alone
    /// ([`Chain::read_layer`]) for whatever the check needs beyond the bytes read.
    fn check(&self, chain: &Chain, read: &ResolvedRead<'_>) -> Result<()>;
}

#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The top image's format; probed when None.
    pub format: Option<Format>,
    /// Open only the top image (ignore its backing file).
    pub no_backing: bool,
}

impl Chain {
    /// Opens `path` and its whole backing chain, read-only.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Chain> {
        let mut layers = Vec::new();
        let mut seen = HashSet::new();
        let mut next: Option<(PathBuf, Option<Format>)> = Some((path.to_path_buf(), opts.format));
        while let Some((p, fmt)) = next.take() {
            let canon =
                std::fs::canonicalize(&p).on_file(&p.display().to_string(), "cannot open")?;
            if !seen.insert(canon) {
                return Err(Error::invalid(
                    p.display().to_string(),
                    "backing chain loop: this file is its own backing file",
                ));
            }
            if layers.len() >= MAX_CHAIN_DEPTH {
                return Err(Error::invalid(
                    path.display().to_string(),
                    format!("backing chain deeper than {MAX_CHAIN_DEPTH} images"),
                ));
            }
            let fmt = match fmt {
                Some(f) => f,
                None => probe_format(&p)?,
            };
            let layer = match fmt {
                Format::Raw => Layer::Raw(Raw::open(&p)?),
                Format::Qcow2 => Layer::Qcow2(Box::new(Qcow2::open(&p)?)),
            };
            if let (Layer::Qcow2(q), false) = (&layer, opts.no_backing) {
                if let Some(name) = &q.header().backing_file {
                    if name.starts_with("json:") {
                        return Err(Error::unsupported(
                            q.path(),
                            format!("backing file name {name:?} (json: pseudo-protocol)"),
                        ));
                    }
                    let bfmt = match q.header().backing_format() {
                        Some(f) => Some(Format::parse(f).ok_or_else(|| {
                            Error::unsupported(q.path(), format!("backing file format {f:?}"))
                        })?),
                        None => None,
                    };
                    next = Some((resolve_relative(p.parent(), name), bfmt));
                }
            }
            layers.push(layer);
        }
        Ok(Chain {
            layers,
            check: None,
        })
    }

    pub fn from_layers(layers: Vec<Layer>) -> Result<Chain> {
        if layers.is_empty() {
            return Err(Error::bad_request("a chain needs at least one image"));
        }
        Ok(Chain {
            layers,
            check: None,
        })
    }

    /// Every read from now on is checked by `check` (see [`ReadCheck`]).
    pub fn set_read_check(&mut self, check: Arc<dyn ReadCheck>) {
        self.check = Some(check);
    }

    /// Reads layer `depth` alone at guest `offset`: its own clusters, zeros where it holds
    /// nothing or past its end. Not checked.
    pub fn read_layer(&self, depth: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        let layer = self.layers.get(depth).ok_or_else(|| {
            Error::internal(
                self.top().path(),
                format!("layer {depth} of a {}-image chain", self.layers.len()),
            )
        })?;
        match layer {
            Layer::Qcow2(q) => q.read_view(buf, offset, None),
            Layer::Raw(r) => {
                let keep = r.size.saturating_sub(offset).min(buf.len() as u64) as usize;
                buf[keep..].fill(0);
                if keep == 0 {
                    return Ok(());
                }
                r.storage
                    .read_at(&mut buf[..keep], offset)
                    .at(&r.path, "reading data", offset)
            }
        }
    }

    /// Hands a range that reads as zeros, mapped but not read, to the read check (if any),
    /// so what is *not* there is checked too.
    pub fn check_unread(&self, e: &Extent) -> Result<()> {
        self.run_check(e, e.start, e.len, None)
    }

    fn run_check(&self, e: &Extent, start: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        let Some(check) = &self.check else {
            return Ok(());
        };
        check.check(
            self,
            &ResolvedRead {
                start,
                len,
                depth: e.depth,
                allocated: e.present(),
                data,
            },
        )
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    pub fn top(&self) -> &Layer {
        &self.layers[0]
    }

    pub fn virtual_size(&self) -> u64 {
        self.layers[0].virtual_size()
    }

    /// Maps `[start, start+len)` (clipped to the virtual size) into extents, merged where
    /// they continue each other. Large disks are better walked with
    /// [`Chain::for_each_extent`], which bounds memory.
    pub fn map(&self, start: u64, len: u64) -> Result<Vec<Extent>> {
        let end = start.saturating_add(len).min(self.virtual_size());
        let mut out = Vec::new();
        let mut off = start;
        while off < end {
            off = self.map_batch(off, end - off, usize::MAX, self.layers.len(), &mut out)?;
        }
        Ok(out)
    }

    /// Maps from `start` until `len` bytes or about `limit` extents are covered; returns
    /// the guest offset reached.
    /// Layers at `stop_at` and below are not consulted: what falls through to them comes
    /// back as unallocated at depth `stop_at`.
    fn map_batch(
        &self,
        start: u64,
        len: u64,
        limit: usize,
        stop_at: usize,
        out: &mut Vec<Extent>,
    ) -> Result<u64> {
        self.map_layer(0, start, len, limit, stop_at, out)?;
        Ok(out.last().map_or(start + len, |e| e.end()))
    }

    fn map_layer(
        &self,
        depth: usize,
        mut off: u64,
        mut len: u64,
        limit: usize,
        stop_at: usize,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        if depth >= stop_at {
            push_merged(
                out,
                Extent {
                    start: off,
                    len,
                    depth,
                    kind: ExtentKind::Unallocated,
                },
            );
            return Ok(());
        }
        let layer = &self.layers[depth];
        while len > 0 && out.len() < limit {
            let size = layer.virtual_size();
            if off >= size {
                // Past this backing file's end: zeros, resolved by the overlay above.
                push_merged(
                    out,
                    Extent {
                        start: off,
                        len,
                        depth: depth.saturating_sub(1),
                        kind: ExtentKind::Unallocated,
                    },
                );
                return Ok(());
            }
            let (n, kind) = layer.block_status(off, len.min(size - off))?;
            let n = n.min(len);
            match kind {
                ExtentKind::Unallocated if depth + 1 < self.layers.len() => {
                    self.map_layer(depth + 1, off, n, limit, stop_at, out)?;
                    if out.last().is_some_and(|e| e.end() < off + n) {
                        return Ok(()); // the limit stopped the lower layer
                    }
                }
                _ => {
                    push_merged(
                        out,
                        Extent {
                            start: off,
                            len: n,
                            depth,
                            kind,
                        },
                    );
                }
            }
            off += n;
            len -= n;
        }
        Ok(())
    }

    /// Calls `f` for every extent of `[start, start+len)` in order, mapping in batches so
    /// memory stays bounded; extents are merged across batches.
    pub fn for_each_extent(
        &self,
        start: u64,
        len: u64,
        f: impl FnMut(&Extent) -> Result<()>,
    ) -> Result<()> {
        self.for_each_extent_above(start, len, self.layers.len(), f)
    }

    /// [`Chain::for_each_extent`] over the layers above `stop_at` only: ranges that fall
    /// through to layer `stop_at` come back as unallocated at depth `stop_at`, and that
    /// layer and those below it are never read (commit writes into one of them meanwhile).
    pub fn for_each_extent_above(
        &self,
        start: u64,
        len: u64,
        stop_at: usize,
        mut f: impl FnMut(&Extent) -> Result<()>,
    ) -> Result<()> {
        let end = start.saturating_add(len).min(self.virtual_size());
        let mut pending: Option<Extent> = None;
        let mut off = start;
        // Grown as needed: a small range (a copy window) maps to a few extents, and a large
        // up-front allocation per call would cost more than the mapping.
        let mut batch = Vec::new();
        while off < end {
            batch.clear();
            off = self.map_batch(off, end - off, MAP_BATCH, stop_at, &mut batch)?;
            for e in batch.drain(..) {
                if pending.as_mut().is_some_and(|p| p.try_merge(&e)) {
                    continue;
                }
                if let Some(p) = pending.replace(e) {
                    f(&p)?;
                }
            }
        }
        if let Some(p) = pending {
            f(&p)?;
        }
        Ok(())
    }

    /// Reads the guest content of one extent (or the part `[from, from+buf.len())` of it).
    /// Checked by the chain's read check, if it has one.
    pub fn read_extent(&self, e: &Extent, from: u64, buf: &mut [u8]) -> Result<()> {
        self.read_extent_unchecked(e, from, buf)?;
        self.run_check(e, from, buf.len() as u64, Some(buf))
    }

    fn read_extent_unchecked(&self, e: &Extent, from: u64, buf: &mut [u8]) -> Result<()> {
        debug_assert!(from >= e.start && from + buf.len() as u64 <= e.end());
        let delta = from - e.start;
        match e.kind {
            ExtentKind::Zero { .. } | ExtentKind::Unallocated => {
                buf.fill(0);
                Ok(())
            }
            ExtentKind::Data { host } => self.layers[e.depth].read_data(buf, host + delta),
            ExtentKind::Compressed {
                desc,
                offset_in_cluster,
            } => {
                let q = self.layers[e.depth].as_qcow2().ok_or_else(|| {
                    Error::internal(
                        self.layers[e.depth].path(),
                        "compressed extent in a raw layer",
                    )
                })?;
                q.read_compressed(buf, desc, offset_in_cluster + delta)
            }
        }
    }

    /// Reads guest bytes at `offset`; the range must lie within the virtual size.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        if offset
            .checked_add(len)
            .is_none_or(|e| e > self.virtual_size())
        {
            return Err(Error::usage(
                self.top().path(),
                format!(
                    "read of {len} bytes at {offset:#x} is past the end of the disk ({} bytes)",
                    self.virtual_size()
                ),
            ));
        }
        self.read_mapped(&self.map(offset, len)?, buf, offset)
    }

    /// Reads guest bytes at `offset` through extents already mapped by [`Chain::map`] over
    /// a range that holds this one (so a caller that needs the mapping anyway maps once).
    pub fn read_mapped(&self, extents: &[Extent], buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        for e in extents.iter().filter(|e| e.end() > offset && e.start < end) {
            let (s, t) = (e.start.max(offset), e.end().min(end));
            let b = &mut buf[(s - offset) as usize..(t - offset) as usize];
            self.read_extent(e, s, b)?;
        }
        Ok(())
    }
}

/// A chain that may be absent, as what an image's writes see below it.
pub fn as_backing(chain: Option<&Chain>) -> Option<&dyn Backing> {
    chain.map(|c| c as &dyn Backing)
}

impl Backing for Chain {
    fn virtual_size(&self) -> u64 {
        Chain::virtual_size(self)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Chain::read_at(self, buf, offset)
    }
}

fn push_merged(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut() {
        if last.try_merge(&e) {
            return;
        }
    }
    out.push(e);
}

/// Opens the backing chain an image names (None when it has no backing file).
pub fn open_backing_of(img: &Qcow2) -> Result<Option<Chain>> {
    let Some(name) = img.header().backing_file.clone() else {
        return Ok(None);
    };
    let dir = Path::new(img.path()).parent();
    let format = match img.header().backing_format() {
        Some(f) => Some(
            Format::parse(f)
                .ok_or_else(|| Error::unsupported(img.path(), format!("backing format {f:?}")))?,
        ),
        None => None,
    };
    Chain::open(
        &resolve_relative(dir, &name),
        &OpenOptions {
            format,
            no_backing: false,
        },
    )
    .map(Some)
}

impl Chain {
    /// Index of the chain member `base` names, matched as qemu-img does: the backing name
    /// stored in the image above it, literally, or the same file once both are resolved
    /// against that image's directory.
    pub fn find_member(&self, base: &str) -> Option<usize> {
        for i in 1..self.layers.len() {
            let above = &self.layers[i - 1];
            let Some(q) = above.as_qcow2() else { continue };
            if q.header().backing_file.as_deref() == Some(base) {
                return Some(i);
            }
            let dir = Path::new(above.path()).parent();
            let cand = resolve_relative(dir, base);
            if let (Ok(a), Ok(b)) = (
                std::fs::canonicalize(&cand),
                std::fs::canonicalize(self.layers[i].path()),
            ) {
                if a == b {
                    return Some(i);
                }
            }
        }
        None
    }
}
