//! One opened qcow2 image: header, L1 table, caches, and the per-layer mapping of guest ranges
//! to host locations.

use crate::cache::LruCache;
use crate::compress;
use crate::error::{Error, FormatError, Result};
use crate::format::bitmap::{self, BitmapEntry};
use crate::format::entry::{self, ClusterKind, CompressedDesc, L2Entry, SUBCLUSTERS};
use crate::format::header::{self, Header};
use crate::format::snapshot::{self, Snapshot};
use crate::storage::{FileStorage, Storage};
use byteorder::{BigEndian as BE, ByteOrder};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Memory the L2 cache may use per image.
pub const DEFAULT_L2_CACHE_BYTES: u64 = 32 << 20;

/// What a guest range of one layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// Not allocated here: the backing file decides.
    Unallocated,
    /// Reads as zeros; `host` is the owned cluster of a ZERO_ALLOC entry (at the run's start).
    Zero { host: Option<u64> },
    /// Data at this host offset (of the run's first byte); in the data file if the image has one.
    Data { host: u64 },
    /// A compressed cluster; `offset_in_cluster` is where the run starts within it.
    Compressed {
        desc: CompressedDesc,
        offset_in_cluster: u64,
    },
}

pub struct Qcow2 {
    pub(crate) path: String,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) data_file: Option<Arc<dyn Storage>>,
    pub(crate) header: Header,
    pub(crate) l1: Vec<u64>,
    pub(crate) l2_cache: Mutex<LruCache<Vec<u64>>>,
    pub(crate) last_decompressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// Present when the image is open for writing.
    pub(crate) rw: Option<Box<crate::write::RwState>>,
}

fn fmt_err(path: &str) -> impl Fn(FormatError) -> Error + '_ {
    move |e| Error::invalid(path, e.0)
}

impl Qcow2 {
    /// Opens an image file read-only.
    pub fn open(path: &Path) -> Result<Qcow2> {
        let display = path.display().to_string();
        let storage =
            FileStorage::open(path, false).map_err(|e| Error::file(&display, "cannot open", e))?;
        Self::open_storage(Arc::new(storage), &display, path.parent())
    }

    /// Opens an image from any storage. `dir` resolves a relative external data file name.
    pub fn open_storage(
        storage: Arc<dyn Storage>,
        path: &str,
        dir: Option<&Path>,
    ) -> Result<Qcow2> {
        let header = read_header(storage.as_ref(), path)?;
        let data_file = match header.data_file() {
            Some(name) if header.has_data_file() => {
                let p = resolve_relative(dir, name);
                let s = FileStorage::open(&p, false).map_err(|e| {
                    Error::file(p.display().to_string(), "cannot open external data file", e)
                })?;
                Some(Arc::new(s) as Arc<dyn Storage>)
            }
            _ => None,
        };
        let file_len = storage
            .len()
            .map_err(|e| Error::io(path, "getting file length", 0, e))?;
        let l1 = read_table(
            storage.as_ref(),
            path,
            "reading L1 table",
            header.l1_table_offset,
            header.l1_size as u64,
            file_len,
        )?;
        check_l1(&l1, &header, path)?;
        let cache_entries = (DEFAULT_L2_CACHE_BYTES / header.cluster_size()).max(16) as usize;
        Ok(Qcow2 {
            path: path.to_string(),
            storage,
            data_file,
            header,
            l1,
            l2_cache: Mutex::new(LruCache::new(cache_entries)),
            last_decompressed: Mutex::new(None),
            rw: None,
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub fn l1(&self) -> &[u64] {
        &self.l1
    }

    pub fn virtual_size(&self) -> u64 {
        self.header.virtual_size()
    }

    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    pub fn file_len(&self) -> Result<u64> {
        self.storage
            .len()
            .map_err(|e| Error::io(&self.path, "getting file length", 0, e))
    }

    /// The unit of allocation: a cluster, or a subcluster with extended L2 entries.
    pub fn unit_bits(&self) -> u32 {
        if self.header.extended_l2() {
            self.header.cluster_bits - 5
        } else {
            self.header.cluster_bits
        }
    }

    /// Reads (through the cache) the L2 table at `offset`, as raw 64-bit words. A table
    /// past the end of the file reads as all zeros (unallocated), as QEMU would see it.
    pub fn l2_table(&self, offset: u64) -> Result<Arc<Vec<u64>>> {
        if let Some(t) = self.rw.as_ref().and_then(|rw| rw.dirty_l2.get(&offset)) {
            return Ok(t.clone());
        }
        if let Some(t) = self.lock_l2().get(offset) {
            return Ok(t);
        }
        if !offset.is_multiple_of(self.cluster_size()) {
            return Err(Error::invalid(
                &self.path,
                format!("L2 table offset {offset:#x} is not cluster aligned"),
            ));
        }
        let words = (self.cluster_size() / 8) as usize;
        if offset >= self.file_len()? {
            return Ok(Arc::new(vec![0u64; words]));
        }
        let mut raw = vec![0u8; words * 8];
        self.storage
            .read_at(&mut raw, offset)
            .map_err(|e| Error::io(&self.path, "reading L2 table", offset, e))?;
        let mut words = vec![0u64; words];
        BE::read_u64_into(&raw, &mut words);
        let t = Arc::new(words);
        self.lock_l2().insert(offset, t.clone());
        Ok(t)
    }

    pub(crate) fn lock_l2(&self) -> std::sync::MutexGuard<'_, LruCache<Vec<u64>>> {
        self.l2_cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn forget_decompressed(&self) {
        *self
            .last_decompressed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Drops cached metadata (after the file was changed behind our back).
    pub fn invalidate_caches(&self) {
        self.lock_l2().clear();
        *self
            .last_decompressed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Entry `index` of an L2 table given as raw words.
    pub fn l2_entry(&self, table: &[u64], index: usize) -> L2Entry {
        if self.header.extended_l2() {
            L2Entry {
                word: table[index * 2],
                bitmap: Some(table[index * 2 + 1]),
            }
        } else {
            L2Entry {
                word: table[index],
                bitmap: None,
            }
        }
    }

    /// The longest run starting at `guest` (at most `max_len` bytes, not crossing one L2
    /// table) whose units are all of one kind, with contiguous host offsets for data.
    pub fn block_status(&self, guest: u64, max_len: u64) -> Result<(u64, Run)> {
        let h = &self.header;
        let cb = h.cluster_bits;
        let unit_bits = self.unit_bits();
        let unit = 1u64 << unit_bits;
        let l2_entries = h.l2_entries();
        let cluster = guest >> cb;
        let l1_index = cluster / l2_entries;
        let l2_span = l2_entries << cb;
        let table_end = (l1_index + 1) * l2_span;
        let limit = max_len.min(table_end - guest);
        if limit == 0 {
            return Err(Error::Request("zero-length block status".into()));
        }
        let l1e = self.l1.get(l1_index as usize).copied().unwrap_or(0);
        let l2_offset = entry::l1_l2_offset(l1e);
        if l2_offset == 0 {
            return Ok((limit, Run::Unallocated));
        }
        let table = self.l2_table(l2_offset)?;
        let units_per_cluster = 1u64 << (cb - unit_bits);
        let first_unit = (guest - l1_index * l2_span) >> unit_bits;
        let unit_kind = |u: u64| -> Result<ClusterKind> {
            let e = self.l2_entry(&table, (u / units_per_cluster) as usize);
            e.kind(
                (u % units_per_cluster) as u32,
                cb,
                h.version >= 3,
                h.has_data_file(),
            )
            .map_err(|err| {
                Error::invalid(
                    &self.path,
                    format!(
                        "{} (L2 table at {l2_offset:#x}, guest offset {:#x})",
                        err.0,
                        l1_index * l2_span + (u << unit_bits)
                    ),
                )
            })
        };
        let first = unit_kind(first_unit)?;
        let in_unit = guest & (unit - 1);
        let (run, mut len) = match first {
            ClusterKind::Unallocated => (Run::Unallocated, unit - in_unit),
            ClusterKind::Zero { host } => (
                Run::Zero {
                    host: host.map(|x| x + in_unit),
                },
                unit - in_unit,
            ),
            ClusterKind::Data { host } => (
                Run::Data {
                    host: host + in_unit,
                },
                unit - in_unit,
            ),
            ClusterKind::Compressed(desc) => {
                let in_cluster = guest & (h.cluster_size() - 1);
                let len = (h.cluster_size() - in_cluster).min(limit);
                return Ok((
                    len,
                    Run::Compressed {
                        desc,
                        offset_in_cluster: in_cluster,
                    },
                ));
            }
        };
        let mut u = first_unit + 1;
        while len < limit {
            let next = unit_kind(u)?;
            let same = match (first, next) {
                (ClusterKind::Unallocated, ClusterKind::Unallocated) => true,
                (ClusterKind::Zero { host: None }, ClusterKind::Zero { host: None }) => true,
                (ClusterKind::Zero { host: Some(a) }, ClusterKind::Zero { host: Some(b) }) => {
                    b == a + ((u - first_unit) << unit_bits)
                }
                (ClusterKind::Data { host: a }, ClusterKind::Data { host: b }) => {
                    b == a + ((u - first_unit) << unit_bits)
                }
                _ => false,
            };
            if !same {
                break;
            }
            len += unit;
            u += 1;
        }
        Ok((len.min(limit), run))
    }

    /// Reads guest data that `block_status` reported as `Data` at `host`.
    /// Where the guest data lives: the external data file, or the image itself.
    pub fn data_storage(&self) -> &Arc<dyn Storage> {
        self.data_file.as_ref().unwrap_or(&self.storage)
    }

    pub fn read_data(&self, buf: &mut [u8], host: u64) -> Result<()> {
        self.data_storage()
            .read_at(buf, host)
            .map_err(|e| Error::io(&self.path, "reading data", host, e))
    }

    /// Reads part of a compressed cluster.
    pub fn read_compressed(
        &self,
        buf: &mut [u8],
        desc: CompressedDesc,
        offset_in_cluster: u64,
    ) -> Result<()> {
        let cluster = self.decompress_cluster(desc)?;
        let start = offset_in_cluster as usize;
        buf.copy_from_slice(&cluster[start..start + buf.len()]);
        Ok(())
    }

    /// The whole decompressed cluster for a descriptor (the last one is cached).
    pub fn decompress_cluster(&self, desc: CompressedDesc) -> Result<Arc<Vec<u8>>> {
        {
            let last = self
                .last_decompressed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some((off, data)) = last.as_ref() {
                if *off == desc.host_offset {
                    return Ok(data.clone());
                }
            }
        }
        let mut input = vec![0u8; desc.len as usize];
        self.storage
            .read_at(&mut input, desc.host_offset)
            .map_err(|e| {
                Error::io(
                    &self.path,
                    "reading compressed cluster",
                    desc.host_offset,
                    e,
                )
            })?;
        let mut out = vec![0u8; self.cluster_size() as usize];
        compress::decompress(self.header.compression_type, &input, &mut out).map_err(|e| {
            Error::invalid(
                &self.path,
                format!(
                    "compressed cluster at host offset {:#x}: {e}",
                    desc.host_offset
                ),
            )
        })?;
        let out = Arc::new(out);
        *self
            .last_decompressed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((desc.host_offset, out.clone()));
        Ok(out)
    }

    /// The internal snapshot table.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        read_snapshot_table(self.storage.as_ref(), &self.header, &self.path)
    }

    /// The persistent bitmap directory.
    pub fn bitmaps(&self) -> Result<Vec<BitmapEntry>> {
        let Some(ext) = self.header.bitmaps() else {
            return Ok(Vec::new());
        };
        let file_len = self.file_len()?;
        if ext.directory_offset.saturating_add(ext.directory_size) > file_len {
            return Err(Error::invalid(
                &self.path,
                "bitmap directory lies past the end of the file",
            ));
        }
        let mut dir = vec![0u8; ext.directory_size as usize];
        self.storage
            .read_at(&mut dir, ext.directory_offset)
            .map_err(|e| {
                Error::io(
                    &self.path,
                    "reading bitmap directory",
                    ext.directory_offset,
                    e,
                )
            })?;
        bitmap::parse_directory(&dir, ext.nb_bitmaps).map_err(fmt_err(&self.path))
    }
}

/// Reads a table of big-endian u64 entries. Only the part inside the file is read and kept:
/// entries past the end of the file are zero, so callers treat missing entries as 0. This
/// bounds memory by the file's real size whatever the header claims.
pub fn read_table(
    storage: &dyn Storage,
    path: &str,
    what: &'static str,
    offset: u64,
    entries: u64,
    file_len: u64,
) -> Result<Vec<u64>> {
    let in_file = file_len.saturating_sub(offset) / 8;
    let n = entries.min(in_file) as usize;
    let mut raw = vec![0u8; n * 8];
    storage
        .read_at(&mut raw, offset)
        .map_err(|e| Error::io(path, what, offset, e))?;
    let mut out = vec![0u64; n];
    BE::read_u64_into(&raw, &mut out);
    Ok(out)
}

/// Rejects an active L1 table whose entries point into the header or share one L2 table:
/// never valid, and a hostile image could otherwise make one small L2 table stand for an
/// enormous disk.
fn check_l1(l1: &[u64], h: &Header, path: &str) -> Result<()> {
    let mut seen = std::collections::HashMap::new();
    for (i, &e) in l1.iter().enumerate() {
        let off = entry::l1_l2_offset(e);
        if off == 0 {
            continue;
        }
        if off < h.cluster_size() {
            return Err(Error::invalid(
                path,
                format!("L1 entry {i} points into the header (L2 table offset {off:#x})"),
            ));
        }
        if let Some(j) = seen.insert(off, i) {
            return Err(Error::invalid(
                path,
                format!("L1 entries {j} and {i} share the L2 table at {off:#x} (image is corrupt)"),
            ));
        }
    }
    Ok(())
}

/// Reads and parses cluster 0.
pub fn read_header(storage: &dyn Storage, path: &str) -> Result<Header> {
    let file_len = storage
        .len()
        .map_err(|e| Error::io(path, "getting file length", 0, e))?;
    let mut first = [0u8; header::V3_HEADER_LEN as usize];
    storage
        .read_at(&mut first, 0)
        .map_err(|e| Error::io(path, "reading header", 0, e))?;
    if file_len < header::V2_HEADER_LEN as u64 {
        return Err(Error::invalid(
            path,
            format!("file too short for a qcow2 header ({file_len} bytes)"),
        ));
    }
    let cluster_bits = Header::peek_cluster_bits(&first).map_err(fmt_err(path))?;
    let mut cluster0 = vec![0u8; 1 << cluster_bits];
    storage
        .read_at(&mut cluster0, 0)
        .map_err(|e| Error::io(path, "reading header", 0, e))?;
    let h = Header::parse(&cluster0).map_err(|e| {
        // Name unknown incompatible features from the image's own feature table.
        Error::invalid(path, e.0)
    })?;
    Ok(h)
}

fn read_snapshot_table(storage: &dyn Storage, h: &Header, path: &str) -> Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    if h.nb_snapshots == 0 {
        return Ok(out);
    }
    let file_len = storage
        .len()
        .map_err(|e| Error::io(path, "getting file length", 0, e))?;
    let mut pos = h.snapshots_offset;
    for i in 0..h.nb_snapshots {
        if i > 0 {
            pos = pos.div_ceil(8) * 8;
        }
        if pos - h.snapshots_offset > snapshot::MAX_TABLE_BYTES {
            return Err(Error::invalid(path, "snapshot table too large"));
        }
        if pos + snapshot::FIXED_LEN as u64 > file_len {
            return Err(Error::invalid(
                path,
                format!("snapshot table entry {i} lies past the end of the file"),
            ));
        }
        let mut fixed = [0u8; snapshot::FIXED_LEN];
        storage
            .read_at(&mut fixed, pos)
            .map_err(|e| Error::io(path, "reading snapshot table", pos, e))?;
        let (extra, id_len, name_len) = Snapshot::parse_fixed(&fixed).map_err(fmt_err(path))?;
        let total = snapshot::FIXED_LEN + extra as usize + id_len as usize + name_len as usize;
        let mut entry = vec![0u8; total];
        storage
            .read_at(&mut entry, pos)
            .map_err(|e| Error::io(path, "reading snapshot table", pos, e))?;
        let s = Snapshot::parse(&entry).map_err(fmt_err(path))?;
        if h.version >= 3 && s.extra.len() < 16 {
            return Err(Error::invalid(
                path,
                format!("snapshot {} has too little extra data for a v3 image", s.id),
            ));
        }
        if s.l1_size as u64 * 8 > header::MAX_L1_BYTES || s.l1_table_offset % h.cluster_size() != 0
        {
            return Err(Error::invalid(
                path,
                format!("snapshot {} has an invalid L1 table", s.id),
            ));
        }
        out.push(s);
        pos += total as u64;
    }
    Ok(out)
}

/// Resolves a name stored in an image (backing or data file) against the directory of the
/// image that names it, as QEMU does (a plain join, no normalisation).
pub fn resolve_relative(dir: Option<&Path>, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match dir {
        Some(d) if !d.as_os_str().is_empty() => d.join(p),
        _ => p.to_path_buf(),
    }
}

/// Number of subclusters per cluster with extended L2 entries.
pub const fn subclusters() -> u32 {
    SUBCLUSTERS
}
