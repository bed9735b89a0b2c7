//! Refcounts for writing: the refcount table and blocks, cluster allocation (first fit, as
//! QEMU does), increments that reach disk before the metadata using them, and decrements
//! deferred until the metadata that dropped the reference is on disk. A crash may leak
//! clusters; it never leaves a referenced cluster with a refcount of 0.

use crate::error::{Error, IoContext, Result};
use crate::format::header::MAX_REFTABLE_BYTES;
use crate::format::refcount;
use crate::storage::Storage;
use byteorder::{BigEndian as BE, ByteOrder};
use std::collections::{BTreeSet, HashMap};

pub struct Refcounts {
    path: String,
    cb: u32,
    order: u32,
    epb: u64,
    max: u64,
    /// The whole refcount table (its on-disk length), entries as stored.
    pub reftable: Vec<u64>,
    pub reftable_offset: u64,
    /// Set when the table moved or grew: the header must be rewritten after it is written.
    pub reftable_moved: bool,
    reftable_dirty: bool,
    blocks: HashMap<u64, Vec<u8>>,
    dirty_blocks: BTreeSet<u64>,
    /// Decrements to apply once the metadata no longer referencing them is on disk.
    pending_free: Vec<u64>,
    /// No cluster below this index is free.
    free_hint: u64,
    /// Counts refcounts that dropped to 0 (a freed cluster may be handed out again).
    pub frees: u64,
}

impl Refcounts {
    pub fn load(
        storage: &dyn Storage,
        path: &str,
        cluster_bits: u32,
        order: u32,
        reftable_offset: u64,
        reftable_clusters: u32,
    ) -> Result<Refcounts> {
        let cs = 1u64 << cluster_bits;
        let n = (reftable_clusters as u64 * cs / 8) as usize;
        let mut raw = vec![0u8; n * 8];
        storage.read_at(&mut raw, reftable_offset).at(
            path,
            "reading refcount table",
            reftable_offset,
        )?;
        let mut reftable = vec![0u64; n];
        BE::read_u64_into(&raw, &mut reftable);
        Ok(Refcounts {
            path: path.to_string(),
            cb: cluster_bits,
            order,
            epb: cs * 8 / (1u64 << order),
            max: refcount::max_value(order),
            reftable,
            reftable_offset,
            reftable_moved: false,
            reftable_dirty: false,
            blocks: HashMap::new(),
            dirty_blocks: BTreeSet::new(),
            pending_free: Vec::new(),
            free_hint: 0,
            frees: 0,
        })
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cb
    }

    pub fn reftable_clusters(&self) -> u32 {
        ((self.reftable.len() as u64 * 8).div_ceil(self.cluster_size())) as u32
    }

    pub fn max_refcount(&self) -> u64 {
        self.max
    }

    fn block_offset(&self, ri: usize) -> Option<u64> {
        let off = self.reftable.get(ri).copied().unwrap_or(0) & !0x1ff;
        (off != 0).then_some(off)
    }

    fn load_block(&mut self, storage: &dyn Storage, off: u64) -> Result<()> {
        if !self.blocks.contains_key(&off) {
            if !off.is_multiple_of(self.cluster_size()) {
                return Err(Error::invalid(
                    &self.path,
                    format!("refcount block offset {off:#x} is not cluster aligned"),
                ));
            }
            let mut b = vec![0u8; self.cluster_size() as usize];
            storage
                .read_at(&mut b, off)
                .at(&self.path, "reading refcount block", off)?;
            self.blocks.insert(off, b);
        }
        Ok(())
    }

    /// The refcount of cluster `idx`.
    pub fn get(&mut self, storage: &dyn Storage, idx: u64) -> Result<u64> {
        let ri = (idx / self.epb) as usize;
        let Some(off) = self.block_offset(ri) else {
            return Ok(0);
        };
        self.load_block(storage, off)?;
        Ok(refcount::get(
            &self.blocks[&off],
            self.order,
            idx % self.epb,
        ))
    }

    /// Sets the refcount of cluster `idx`, creating refcount blocks (and growing the table)
    /// as needed.
    pub fn set(&mut self, storage: &dyn Storage, idx: u64, value: u64) -> Result<()> {
        if value > self.max {
            return Err(Error::usage(
                &self.path,
                format!(
                    "refcount of cluster {idx} would exceed {} (refcount_bits too small)",
                    self.max
                ),
            ));
        }
        let ri = (idx / self.epb) as usize;
        let off = match self.block_offset(ri) {
            Some(o) => o,
            None => {
                if value == 0 {
                    return Ok(());
                }
                self.new_block(storage, ri)?
            }
        };
        self.load_block(storage, off)?;
        let b = self.blocks.get_mut(&off).expect("loaded");
        refcount::set(b, self.order, idx % self.epb, value);
        self.dirty_blocks.insert(off);
        if value == 0 {
            self.frees += 1;
            if idx < self.free_hint {
                self.free_hint = idx;
            }
        }
        Ok(())
    }

    pub fn increment(&mut self, storage: &dyn Storage, idx: u64) -> Result<u64> {
        let v = self.get(storage, idx)? + 1;
        self.set(storage, idx, v)?;
        Ok(v)
    }

    /// Drops one reference now (for clusters no metadata on disk refers to yet).
    pub fn decrement_now(&mut self, storage: &dyn Storage, idx: u64) -> Result<u64> {
        let v = self.get(storage, idx)?;
        if v == 0 {
            return Err(Error::invalid(
                &self.path,
                format!("refcount of cluster {idx} is already 0 (image is corrupt; run check)"),
            ));
        }
        self.set(storage, idx, v - 1)?;
        Ok(v - 1)
    }

    /// Drops one reference after the next metadata flush.
    pub fn decrement_later(&mut self, idx: u64) {
        self.pending_free.push(idx);
    }

    pub fn has_pending(&self) -> bool {
        !self.pending_free.is_empty()
    }

    /// Creates a refcount block for table entry `ri`, placed in the first free cluster.
    fn new_block(&mut self, storage: &dyn Storage, ri: usize) -> Result<u64> {
        if ri >= self.reftable.len() {
            self.grow_table(storage, ri + 1)?;
            if let Some(o) = self.block_offset(ri) {
                return Ok(o);
            }
        }
        loop {
            let c = self.find_free(storage, 1)?;
            let rc = (c / self.epb) as usize;
            if rc != ri && self.block_offset(rc).is_none() {
                // The free cluster is itself undescribed: describe its range first.
                self.new_block(storage, rc)?;
                continue;
            }
            let off = c << self.cb;
            self.blocks
                .insert(off, vec![0u8; self.cluster_size() as usize]);
            self.dirty_blocks.insert(off);
            self.reftable[ri] = off;
            self.reftable_dirty = true;
            self.set(storage, c, 1)?;
            return Ok(off);
        }
    }

    /// Replaces the refcount table by a larger one at a new place.
    fn grow_table(&mut self, storage: &dyn Storage, min_entries: usize) -> Result<()> {
        let cs = self.cluster_size();
        let per_cluster = (cs / 8) as usize;
        let want = min_entries.max(self.reftable.len() * 2).max(per_cluster);
        let new_len = want.div_ceil(per_cluster) * per_cluster;
        if new_len as u64 * 8 > MAX_REFTABLE_BYTES {
            return Err(Error::usage(
                &self.path,
                format!(
                    "refcount table would exceed {} MiB (image too large for its cluster size)",
                    MAX_REFTABLE_BYTES >> 20
                ),
            ));
        }
        let old_offset = self.reftable_offset;
        let old_clusters = self.reftable_clusters() as u64;
        self.reftable.resize(new_len, 0);
        let n = (new_len as u64 * 8).div_ceil(cs);
        let first = self.alloc(storage, n)?;
        self.reftable_offset = first << self.cb;
        self.reftable_moved = true;
        self.reftable_dirty = true;
        for c in 0..old_clusters {
            self.decrement_later((old_offset >> self.cb) + c);
        }
        Ok(())
    }

    /// First index of `n` consecutive free clusters at or after the hint (not marked).
    fn find_free(&mut self, storage: &dyn Storage, n: u64) -> Result<u64> {
        let mut idx = self.free_hint;
        let mut first_free: Option<u64> = None;
        let mut start = idx;
        let mut run = 0;
        while run < n {
            if self.get(storage, idx)? == 0 {
                first_free.get_or_insert(idx);
                if run == 0 {
                    start = idx;
                }
                run += 1;
            } else {
                run = 0;
            }
            idx += 1;
        }
        // Nothing below the first free cluster seen is free.
        if let Some(f) = first_free {
            self.free_hint = f;
        }
        Ok(start)
    }

    /// Creates the refcount blocks covering clusters `first..=last`; returns whether any
    /// had to be created (which takes free clusters, possibly inside that range).
    pub fn ensure_blocks(&mut self, storage: &dyn Storage, first: u64, last: u64) -> Result<bool> {
        let mut created = false;
        for ri in first / self.epb..=last / self.epb {
            if self.block_offset(ri as usize).is_none() {
                self.new_block(storage, ri as usize)?;
                created = true;
            }
        }
        Ok(created)
    }

    /// Allocates `n` contiguous clusters (refcount 1 each); returns the first index.
    pub fn alloc(&mut self, storage: &dyn Storage, n: u64) -> Result<u64> {
        loop {
            let start = self.find_free(storage, n)?;
            // Make sure every refcount block the range needs exists first: creating one
            // takes a free cluster, possibly inside the range, and then we search again.
            if self.ensure_blocks(storage, start, start + n - 1)? {
                continue;
            }
            for i in 0..n {
                self.set(storage, start + i, 1)?;
            }
            return Ok(start);
        }
    }

    /// Writes dirty refcount blocks and the table. Returns whether anything was written.
    pub fn write_dirty(&mut self, storage: &dyn Storage) -> Result<bool> {
        let mut wrote = false;
        for off in std::mem::take(&mut self.dirty_blocks) {
            let b = &self.blocks[&off];
            storage
                .write_at(b, off)
                .at(&self.path, "writing refcount block", off)?;
            wrote = true;
        }
        if self.reftable_dirty {
            let mut raw = vec![0u8; self.reftable.len() * 8];
            BE::write_u64_into(&self.reftable, &mut raw);
            storage.write_at(&raw, self.reftable_offset).map_err(|e| {
                Error::io(
                    &self.path,
                    "writing refcount table",
                    self.reftable_offset,
                    e,
                )
            })?;
            self.reftable_dirty = false;
            wrote = true;
        }
        Ok(wrote)
    }

    /// Applies the deferred decrements (call only after the metadata is on disk).
    pub fn apply_pending(&mut self, storage: &dyn Storage) -> Result<()> {
        for idx in std::mem::take(&mut self.pending_free) {
            self.decrement_now(storage, idx)?;
        }
        Ok(())
    }

    /// Highest cluster index with a non-zero refcount, scanning loaded and on-disk blocks.
    pub fn highest_used(&mut self, storage: &dyn Storage) -> Result<Option<u64>> {
        for ri in (0..self.reftable.len()).rev() {
            let Some(off) = self.block_offset(ri) else {
                continue;
            };
            self.load_block(storage, off)?;
            let b = &self.blocks[&off];
            for j in (0..self.epb).rev() {
                if refcount::get(b, self.order, j) != 0 {
                    return Ok(Some(ri as u64 * self.epb + j));
                }
            }
        }
        Ok(None)
    }
}
