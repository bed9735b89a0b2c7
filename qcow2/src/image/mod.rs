//! One opened qcow2 image: its header, L1 table and caches. The type's behaviour is split by
//! job over the child modules: [`tables`] reads the metadata, [`read`] maps and reads guest
//! ranges, [`write`] (with [`state`]) allocates and writes, [`tree`] and [`snapshot`] update
//! whole trees of references. What lies below the image (its backing file) is reached only
//! through the [`Backing`] trait, so this module knows nothing of chains.

pub mod read;
pub mod snapshot;
pub mod state;
pub mod tables;
pub mod tree;
pub mod write;

#[cfg(test)]
mod tests;

use crate::cache::LruCache;
use crate::error::{Error, IoContext, Result};
use crate::format::entry::L2Entry;
use crate::format::geometry::Geometry;
use crate::format::header::Header;
use crate::storage::{FileStorage, Storage};
use byteorder::{BigEndian as BE, ByteOrder};
use state::RwState;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Memory the L2 cache may use per image.
pub const DEFAULT_L2_CACHE_BYTES: u64 = 32 << 20;

/// What lies below an image: the guest content its unallocated clusters show. A backing
/// chain implements it; copy-on-write and reads through an image's own view use it.
pub trait Backing {
    /// Guest bytes the backing covers; past it, reads are zeros.
    fn virtual_size(&self) -> u64;
    /// Reads guest bytes at `offset`; the range lies within [`Backing::virtual_size`].
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

pub struct Qcow2 {
    pub(crate) path: String,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) data_file: Option<Arc<dyn Storage>>,
    pub(crate) header: Header,
    pub(crate) geometry: Geometry,
    pub(crate) l1: Vec<u64>,
    pub(crate) l2_cache: Mutex<LruCache<Vec<u64>>>,
    pub(crate) last_decompressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// Present when the image is open for writing.
    pub(crate) rw: Option<Box<RwState>>,
}

impl Qcow2 {
    /// Opens an image file read-only.
    pub fn open(path: &Path) -> Result<Qcow2> {
        let display = path.display().to_string();
        let storage = FileStorage::open(path, false).on_file(&display, "cannot open")?;
        Self::open_storage(Arc::new(storage), &display, path.parent())
    }

    /// Opens an image from any storage. `dir` resolves a relative external data file name.
    pub fn open_storage(
        storage: Arc<dyn Storage>,
        path: &str,
        dir: Option<&Path>,
    ) -> Result<Qcow2> {
        let header = tables::read_header(storage.as_ref(), path)?;
        let data_file = match header.data_file() {
            Some(name) if header.has_data_file() => {
                let p = resolve_relative(dir, name);
                let s = FileStorage::open(&p, false)
                    .on_file(&p.display().to_string(), "cannot open external data file")?;
                Some(Arc::new(s) as Arc<dyn Storage>)
            }
            _ => None,
        };
        let file_len = storage.len().at(path, "getting file length", 0)?;
        let l1 = tables::read_table(
            storage.as_ref(),
            path,
            "reading L1 table",
            header.l1_table_offset,
            header.l1_size as u64,
            file_len,
        )?;
        tables::check_l1(&l1, &header, path)?;
        let cache_entries = (DEFAULT_L2_CACHE_BYTES / header.cluster_size()).max(16) as usize;
        Ok(Qcow2 {
            path: path.to_string(),
            storage,
            data_file,
            geometry: header.geometry(),
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

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The data of the header extension `kind` that this crate does not interpret (an
    /// application's own record, kept byte for byte by QEMU and by us), if the image has
    /// one.
    pub fn app_extension(&self, kind: u32) -> Option<&[u8]> {
        self.header.extensions.iter().find_map(|e| match e {
            crate::format::header::Extension::Unknown { kind: k, data } if *k == kind => {
                Some(data.as_slice())
            }
            _ => None,
        })
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Where the guest data lives: the external data file, or the image itself.
    pub fn data_storage(&self) -> &Arc<dyn Storage> {
        self.data_file.as_ref().unwrap_or(&self.storage)
    }

    pub fn l1(&self) -> &[u64] {
        &self.l1
    }

    pub fn virtual_size(&self) -> u64 {
        self.header.virtual_size()
    }

    pub fn cluster_size(&self) -> u64 {
        self.geometry.cluster_size()
    }

    pub fn file_len(&self) -> Result<u64> {
        self.storage.len().at(&self.path, "getting file length", 0)
    }

    /// The unit of allocation: a cluster, or a subcluster with extended L2 entries.
    pub fn unit_bits(&self) -> u32 {
        self.geometry.unit_bits()
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
        if !self.geometry.is_cluster_aligned(offset) {
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
            .at(&self.path, "reading L2 table", offset)?;
        let mut words = vec![0u64; words];
        BE::read_u64_into(&raw, &mut words);
        let t = Arc::new(words);
        self.lock_l2().insert(offset, t.clone());
        Ok(t)
    }

    pub(crate) fn lock_l2(&self) -> MutexGuard<'_, LruCache<Vec<u64>>> {
        self.l2_cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn lock_decompressed(&self) -> MutexGuard<'_, Option<(u64, Arc<Vec<u8>>)>> {
        self.last_decompressed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn forget_decompressed(&self) {
        *self.lock_decompressed() = None;
    }

    /// Drops cached metadata (after the file was changed behind our back).
    pub fn invalidate_caches(&self) {
        self.lock_l2().clear();
        self.forget_decompressed();
    }

    /// Entry `index` of an L2 table given as raw words.
    pub fn l2_entry(&self, table: &[u64], index: usize) -> L2Entry {
        if self.geometry.extended_l2 {
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
