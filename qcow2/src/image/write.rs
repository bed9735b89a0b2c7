//! The write path of one image: cluster allocation, copy-on-write from the current view,
//! zero clusters, discard, compressed clusters, L1/L2 growth and the ordered flush
//! (data, then refcounts, then L2, then L1 and header; frees last).

use super::state::RwState;
use super::tables::read_header;
use super::{Backing, Qcow2};
use crate::alloc::Refcounts;
use crate::compress;
use crate::error::{Error, IoContext, Result};
use crate::format::entry::{
    CompressedDesc, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
};
use crate::format::header::{self, Header, AUTOCLEAR_KNOWN};
use crate::mapping::ExtentKind;
use crate::storage::{FileStorage, Storage};
use byteorder::{BigEndian as BE, ByteOrder};
use std::path::Path;
use std::sync::Arc;

/// Dirty L2 tables kept before a metadata flush is forced.
const MAX_DIRTY_L2: usize = 2048;
/// Clusters allocated in one piece at most (bounds one contiguous run).
const MAX_CLUSTERS_PER_ALLOCATION: u64 = 4096;

/// How [`Qcow2::map_for_write`] treats what a range maps to already.
#[derive(Clone, Copy)]
pub enum WriteMapping<'a> {
    /// Write in place where the image owns the cluster alone; elsewhere copy on write,
    /// partial clusters filled from the image's current view over `backing`.
    CopyOnWrite(Option<&'a dyn Backing>),
    /// The range is unallocated in a new image: allocate only, refuse anything mapped.
    Fresh,
}

/// A guest range and the host range of the image file that holds its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRun {
    pub guest: u64,
    pub host: u64,
    pub len: u64,
}

/// Appends a run, merging it into the last one when both continue each other.
fn push_run(runs: &mut Vec<HostRun>, guest: u64, host: u64, len: u64) {
    match runs.last_mut() {
        Some(l) if l.guest + l.len == guest && l.host + l.len == host => l.len += len,
        _ => runs.push(HostRun { guest, host, len }),
    }
}
/// Extended L2 bitmaps: every subcluster allocated / every subcluster zero.
const BITMAP_ALL_ALLOC: u64 = 0x0000_0000_ffff_ffff;
const BITMAP_ALL_ZERO: u64 = 0xffff_ffff_0000_0000;

#[derive(Debug, Clone, Copy, Default)]
pub struct OpenRwOptions {
    /// Allow opening an image whose refcounts are not trusted (dirty bit, corrupt bit);
    /// only for repair.
    pub for_repair: bool,
}

impl Qcow2 {
    /// Opens an image for writing. Refuses images marked corrupt or dirty (run a repair
    /// first), encrypted images and images with an external data file.
    pub fn open_rw(path: &Path, opts: OpenRwOptions) -> Result<Qcow2> {
        let display = path.display().to_string();
        let storage = FileStorage::open(path, true).on_file(&display, "cannot open for writing")?;
        crate::lock::lock_for_write(storage.file(), &display)?;
        let storage: Arc<dyn Storage> = Arc::new(storage);
        let header = read_header(storage.as_ref(), &display)?;
        if !opts.for_repair {
            if header.is_corrupt() {
                return Err(Error::invalid(
                    &display,
                    "image is marked corrupt; repair it first with `qcow2 check -r all`",
                ));
            }
            if header.is_dirty() {
                return Err(Error::invalid(
                    &display,
                    "image was not closed cleanly (lazy refcounts dirty bit); repair it first with `qcow2 check -r all`",
                ));
            }
        }
        if header.has_data_file() {
            return Err(Error::unsupported(
                &display,
                "writing to images with an external data file",
            ));
        }
        let mut img = Qcow2::open_storage(storage, &display, path.parent())?;
        img.make_writable()?;
        Ok(img)
    }

    /// Switches an image opened on writable storage to read-write mode.
    pub fn make_writable(&mut self) -> Result<()> {
        let h = &self.header;
        let refcounts = Refcounts::load(
            self.storage.as_ref(),
            &self.path,
            h.cluster_bits,
            h.refcount_order,
            h.refcount_table_offset,
            h.refcount_table_clusters,
        )?;
        // The L1 as read may be cut at the end of the file; writing needs all of it.
        self.l1.resize(h.l1_size as usize, 0);
        let mut header_dirty = false;
        if h.autoclear_features & !AUTOCLEAR_KNOWN != 0 {
            // Unknown autoclear features: a writer that does not understand them clears them.
            self.header.autoclear_features &= AUTOCLEAR_KNOWN;
            header_dirty = true;
        }
        let has_bitmaps = self.header.bitmaps().is_some();
        self.rw = Some(Box::new(RwState::new(refcounts, header_dirty, has_bitmaps)));
        Ok(())
    }

    pub fn is_writable(&self) -> bool {
        self.rw.is_some()
    }

    fn rw(&mut self) -> Result<&mut RwState> {
        match self.rw.as_deref_mut() {
            Some(rw) => Ok(rw),
            None => Err(Error::internal(&self.path, "image is not open for writing")),
        }
    }

    fn check_data_writes_allowed(&mut self) -> Result<()> {
        if self.rw()?.has_bitmaps {
            return Err(Error::unsupported(
                &self.path,
                "writing guest data to an image with persistent dirty bitmaps (they would go stale); remove the bitmaps first",
            ));
        }
        Ok(())
    }

    pub(crate) fn refcounts_mut(&mut self) -> Result<(&dyn Storage, &mut Refcounts)> {
        let storage = self.storage.as_ref();
        match self.rw.as_deref_mut() {
            Some(rw) => Ok((storage, &mut rw.refcounts)),
            None => Err(Error::internal(&self.path, "image is not open for writing")),
        }
    }

    /// Allocates `n` contiguous clusters; returns the host offset of the first.
    pub(crate) fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        let geo = self.geometry;
        // Space handed out again may be where a cached compressed cluster was.
        self.forget_decompressed();
        let (s, rc) = self.refcounts_mut()?;
        Ok(rc.alloc(s, n)? << geo.cluster_bits)
    }

    pub(crate) fn free_cluster_later(&mut self, host: u64) -> Result<()> {
        let geo = self.geometry;
        self.rw()?
            .refcounts
            .decrement_later(geo.cluster_index(host));
        Ok(())
    }

    pub(crate) fn replace_refcounts(&mut self, rc: Refcounts) -> Result<()> {
        self.rw()?.refcounts = rc;
        Ok(())
    }

    pub(crate) fn mark_header_dirty(&mut self) -> Result<()> {
        self.rw()?.header_dirty = true;
        Ok(())
    }

    pub(crate) fn header_mut(&mut self) -> &mut Header {
        &mut self.header
    }

    /// Frees whatever host space an L2 entry owns (after the next metadata flush).
    fn release_entry(&mut self, word: u64) -> Result<()> {
        let geo = self.geometry;
        if word & OFLAG_COMPRESSED != 0 {
            let d = CompressedDesc::decode(word, geo.cluster_bits);
            for c in d.host_clusters(geo.cluster_bits) {
                self.rw()?.refcounts.decrement_later(c);
            }
        } else {
            let host = word & L2E_OFFSET_MASK;
            if host != 0 {
                self.rw()?
                    .refcounts
                    .decrement_later(geo.cluster_index(host));
            }
        }
        Ok(())
    }

    /// The L2 table for `l1_index`, made private to the active L1 (allocated or copied on
    /// write as needed). Returns its offset.
    fn l2_for_write(&mut self, l1_index: usize) -> Result<u64> {
        if l1_index >= self.l1.len() {
            return Err(Error::usage(&self.path, "guest offset beyond the L1 table"));
        }
        let l1e = self.l1[l1_index];
        let old = l1e & L1E_OFFSET_MASK;
        if old != 0 && l1e & OFLAG_COPIED != 0 {
            return Ok(old);
        }
        let words = (self.cluster_size() / 8) as usize;
        let table = if old == 0 {
            vec![0u64; words]
        } else {
            // Shared with a snapshot: copy it; data refcounts already count both tables.
            (*self.l2_table(old)?).clone()
        };
        let new = self.alloc_clusters(1)?;
        if old != 0 {
            self.free_cluster_later(old)?;
        }
        let rw = self.rw()?;
        rw.dirty_l2.insert(new, Arc::new(table));
        rw.l1_dirty = true;
        self.l1[l1_index] = new | OFLAG_COPIED;
        Ok(new)
    }

    /// The current (word, bitmap) of a guest cluster.
    fn entry_of(&self, guest_cluster: u64) -> Result<(u64, u64)> {
        let at = self.geometry.table_indexes(guest_cluster);
        let l2 = self.l1.get(at.l1).copied().unwrap_or(0) & L1E_OFFSET_MASK;
        if l2 == 0 {
            return Ok((0, 0));
        }
        let t = self.l2_table(l2)?;
        let e = self.l2_entry(&t, at.l2);
        Ok((e.word, e.bitmap.unwrap_or(0)))
    }

    /// Sets a guest cluster's L2 entry (bitmap ignored for standard L2). The entry reaches
    /// the file at the next metadata flush; callers that write data for it do so first and
    /// then call [`Qcow2::flush_if_too_dirty`].
    fn set_entry(&mut self, guest_cluster: u64, word: u64, bitmap: u64) -> Result<()> {
        let at = self.geometry.table_indexes(guest_cluster);
        let (l1i, l2i) = (at.l1, at.l2);
        let l2 = self.l2_for_write(l1i)?;
        let ext = self.geometry.extended_l2;
        if !self.rw()?.dirty_l2.contains_key(&l2) {
            let t = self.l2_table(l2)?;
            self.rw()?.dirty_l2.insert(l2, t);
        }
        let rw = self.rw()?;
        let t = Arc::make_mut(rw.dirty_l2.get_mut(&l2).expect("inserted"));
        if ext {
            t[l2i * 2] = word;
            t[l2i * 2 + 1] = bitmap;
        } else {
            t[l2i] = word;
        }
        Ok(())
    }

    /// Writes the metadata out once too many L2 tables are dirty, which bounds memory. Only
    /// call it when every cluster mapped so far holds its data: the flush makes them visible.
    pub fn flush_if_too_dirty(&mut self) -> Result<()> {
        if self.rw()?.dirty_l2.len() > MAX_DIRTY_L2 {
            self.flush_metadata()?;
        }
        Ok(())
    }

    /// Whether writes to this cluster can go to its current host cluster.
    fn in_place_host(&self, word: u64, bitmap: u64) -> Option<u64> {
        if word & OFLAG_COMPRESSED != 0 || word & OFLAG_COPIED == 0 {
            return None;
        }
        let host = word & L2E_OFFSET_MASK;
        if host == 0 {
            return None;
        }
        if self.header.extended_l2() {
            (bitmap == BITMAP_ALL_ALLOC).then_some(host)
        } else {
            (word & OFLAG_ZERO == 0).then_some(host)
        }
    }

    /// Writes guest data. `backing` supplies the content below this image for partial
    /// clusters (copy-on-write); pass the image's backing chain, or None.
    pub fn write_at(
        &mut self,
        buf: &[u8],
        offset: u64,
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        let runs =
            self.map_for_write(offset, buf.len() as u64, WriteMapping::CopyOnWrite(backing))?;
        for run in runs {
            let from = (run.guest - offset) as usize;
            self.storage
                .write_at(&buf[from..from + run.len as usize], run.host)
                .at(&self.path, "writing data", run.host)?;
        }
        self.flush_if_too_dirty()
    }

    /// Plans a write into a new image without doing it: maps the clusters of `[offset,
    /// offset+len)` (cluster aligned; the last cluster may be cut by the end of the disk),
    /// which must all be unallocated, to newly allocated host clusters and returns the host
    /// runs. The caller writes the data there (from any thread, through [`Qcow2::storage`])
    /// before the image is flushed.
    pub fn allocate_for_write(&mut self, offset: u64, len: u64) -> Result<Vec<HostRun>> {
        if !self.geometry.is_cluster_aligned(offset) {
            return Err(Error::usage(
                &self.path,
                format!("planned write of {len} bytes at {offset:#x} is unaligned"),
            ));
        }
        self.map_for_write(offset, len, WriteMapping::Fresh)
    }

    /// The one step from a guest range to the host runs that take its data: clusters that
    /// can be written in place are, the others get new clusters (whole runs allocated at
    /// once), partial clusters are first filled from the image's current view
    /// (copy-on-write), and the space they had is freed after the next flush. The new L2
    /// entries reach the file at the next flush, so the caller writes the data first.
    pub fn map_for_write(
        &mut self,
        offset: u64,
        len: u64,
        mode: WriteMapping<'_>,
    ) -> Result<Vec<HostRun>> {
        self.check_data_writes_allowed()?;
        let size = self.virtual_size();
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= size)
            .ok_or_else(|| {
                Error::usage(
                    &self.path,
                    format!("write of {len} bytes at {offset:#x} is past the end of the disk"),
                )
            })?;
        let geo = self.geometry;
        let cs = geo.cluster_size();
        let fresh = matches!(mode, WriteMapping::Fresh);
        let mut runs: Vec<HostRun> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let gc = geo.cluster_index(pos);
            let in_c = geo.offset_in_cluster(pos);
            let n = (cs - in_c).min(end - pos);
            let (word, bitmap) = self.entry_of(gc)?;
            if fresh && (word != 0 || bitmap != 0) {
                return Err(Error::usage(
                    &self.path,
                    format!("guest cluster {gc} is allocated already"),
                ));
            }
            if let Some(host) = self.in_place_host(word, bitmap) {
                // Extend over following clusters that are in place and contiguous.
                let mut run_len = n;
                let mut next_host = host + cs;
                while pos + run_len < end {
                    let (w, b) = self.entry_of(geo.cluster_index(pos + run_len))?;
                    if self.in_place_host(w, b) != Some(next_host) {
                        break;
                    }
                    run_len += cs.min(end - pos - run_len);
                    next_host += cs;
                }
                push_run(&mut runs, pos, host + in_c, run_len);
                pos += run_len;
                continue;
            }
            // In a new image the end of the disk may cut the last cluster: it is new space
            // at the end of the file, zeros past the disk's end.
            let whole = in_c == 0 && (n == cs || (fresh && pos + n == size));
            if whole {
                // Whole clusters needing new space, up to the end of their L2 table.
                let l1i = geo.table_indexes(gc).l1;
                let mut k = 1u64;
                while k < MAX_CLUSTERS_PER_ALLOCATION
                    && geo.table_indexes(gc + k).l1 == l1i
                    && pos + k * cs < end
                    && (pos + (k + 1) * cs <= end || (fresh && end == size))
                {
                    let (w, b) = self.entry_of(gc + k)?;
                    if fresh && (w != 0 || b != 0) {
                        return Err(Error::usage(
                            &self.path,
                            format!("guest cluster {} is allocated already", gc + k),
                        ));
                    }
                    if self.in_place_host(w, b).is_some() {
                        break;
                    }
                    k += 1;
                }
                let host = self.alloc_clusters(k)?;
                for i in 0..k {
                    let (old, _) = self.entry_of(gc + i)?;
                    self.set_entry(gc + i, (host + i * cs) | OFLAG_COPIED, BITMAP_ALL_ALLOC)?;
                    self.release_entry(old)?;
                }
                let run_len = (pos + k * cs).min(end) - pos;
                push_run(&mut runs, pos, host, run_len);
                pos += run_len;
                continue;
            }
            // A partial cluster: a new cluster holding the current view, written over (in a
            // new image the view is zeros; fresh clusters may be reused space).
            let backing = match mode {
                WriteMapping::CopyOnWrite(backing) => backing,
                WriteMapping::Fresh => None,
            };
            let mut cluster = vec![0u8; cs as usize];
            self.read_view(&mut cluster, geo.cluster_offset(gc), backing)?;
            let host = self.alloc_clusters(1)?;
            self.storage
                .write_at(&cluster, host)
                .at(&self.path, "writing data", host)?;
            self.set_entry(gc, host | OFLAG_COPIED, BITMAP_ALL_ALLOC)?;
            self.release_entry(word)?;
            push_run(&mut runs, pos, host + in_c, n);
            pos += n;
        }
        Ok(runs)
    }

    /// Makes a guest range read as zeros. Whole clusters become zero clusters (v3: the ZERO
    /// flag; `unmap` frees their space); partial clusters get explicit zeros unless they
    /// already read as zero. v2 images (no ZERO flag) get zeroed data where needed.
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        unmap: bool,
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        self.check_data_writes_allowed()?;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.virtual_size())
            .ok_or_else(|| Error::usage(&self.path, "zero write past the end"))?;
        let geo = self.geometry;
        let cs = geo.cluster_size();
        let v3 = self.header.version >= 3;
        let ext = geo.extended_l2;
        let mut pos = offset;
        while pos < end {
            let gc = geo.cluster_index(pos);
            let in_c = geo.offset_in_cluster(pos);
            let n = (cs - in_c).min(end - pos);
            // The final cluster of an odd-sized disk counts as whole when covered to the end.
            let whole = in_c == 0 && (n == cs || pos + n == self.virtual_size());
            if whole && v3 {
                let (word, bitmap) = self.entry_of(gc)?;
                let keep = !unmap && self.in_place_host(word, bitmap).is_some();
                let host = word & L2E_OFFSET_MASK;
                if ext {
                    if keep {
                        self.set_entry(gc, host | OFLAG_COPIED, BITMAP_ALL_ZERO)?;
                    } else {
                        self.set_entry(gc, 0, BITMAP_ALL_ZERO)?;
                        self.release_entry(word)?;
                    }
                } else if keep {
                    self.set_entry(gc, host | OFLAG_COPIED | OFLAG_ZERO, 0)?;
                } else if word != OFLAG_ZERO {
                    self.set_entry(gc, OFLAG_ZERO, 0)?;
                    self.release_entry(word)?;
                }
            } else {
                let mut cur = vec![0u8; n as usize];
                self.read_view(&mut cur, pos, backing)?;
                if cur.iter().any(|&b| b != 0) {
                    cur.fill(0);
                    self.write_at(&cur, pos, backing)?;
                }
            }
            pos += n;
        }
        self.flush_if_too_dirty()
    }

    /// Drops whole clusters of a guest range: they read as zeros afterwards (zero clusters
    /// over a backing file on v3; unallocated otherwise). Partial clusters are left alone.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_data_writes_allowed()?;
        let cs = self.cluster_size();
        let end = offset.saturating_add(len).min(self.virtual_size());
        let first = offset.div_ceil(cs);
        let mut last = end / cs; // exclusive
        if end == self.virtual_size() && !end.is_multiple_of(cs) {
            last += 1;
        }
        let v3 = self.header.version >= 3;
        let ext = self.geometry.extended_l2;
        let has_backing = self.header.backing_file.is_some();
        for gc in first..last {
            let (word, bitmap) = self.entry_of(gc)?;
            let (new_word, new_bitmap) = match (has_backing && v3, ext) {
                (true, true) => (0, BITMAP_ALL_ZERO),
                (true, false) => (OFLAG_ZERO, 0),
                (false, _) => (0, 0),
            };
            if (word, bitmap) != (new_word, new_bitmap) {
                self.set_entry(gc, new_word, new_bitmap)?;
                self.release_entry(word)?;
            }
        }
        self.flush_if_too_dirty()
    }

    /// Writes one whole guest cluster compressed (falls back to a normal cluster when it
    /// does not compress). `data` is exactly one cluster (zero-padded at the disk's end).
    pub fn write_compressed(&mut self, guest_cluster: u64, data: &[u8]) -> Result<()> {
        if data.len() as u64 != self.cluster_size() {
            return Err(Error::internal(
                &self.path,
                "compressed writes take one whole cluster",
            ));
        }
        let packed = compress::compress(self.header.compression_type, data)
            .map_err(|e| Error::internal(&self.path, format!("compression failed: {e}")))?;
        let keep = self
            .cluster_size()
            .min(self.virtual_size() - (guest_cluster << self.geometry.cluster_bits));
        self.write_precompressed(guest_cluster, packed.as_deref(), &data[..keep as usize])
    }

    /// Stores one guest cluster already compressed with the image's compression type
    /// (`packed`), or plainly when it did not compress (`packed` None: `plain` is written,
    /// the cluster's guest bytes up to the disk's end). Compressing is left to the caller
    /// so it can happen on other threads.
    pub fn write_precompressed(
        &mut self,
        guest_cluster: u64,
        packed: Option<&[u8]>,
        plain: &[u8],
    ) -> Result<()> {
        self.check_data_writes_allowed()?;
        let cs = self.cluster_size();
        let geo = self.geometry;
        let Some(c) = packed else {
            return self.write_at(plain, geo.cluster_offset(guest_cluster), None);
        };
        if c.len() as u64 >= cs {
            return Err(Error::internal(
                &self.path,
                "a compressed cluster must be smaller than a cluster",
            ));
        }
        let clen = c.len() as u64;
        let storage = self.storage.clone();
        let rw = self.rw()?;
        let cursor = if rw.cursor_frees == rw.refcounts.frees {
            rw.compressed_cursor
        } else {
            0
        };
        let sharing = rw.refcounts.max_refcount() > 1;
        let mut start = None;
        if cursor != 0 && cursor % cs != 0 && sharing {
            // Continue in the partly used cluster, spilling into following free clusters.
            let first_c = geo.cluster_index(cursor);
            let last_c = geo.cluster_index(cursor + clen - 1);
            let s = storage.as_ref();
            let created = rw.refcounts.ensure_blocks(s, first_c, last_c)?;
            let mut ok = !created && rw.refcounts.get(s, first_c)? < rw.refcounts.max_refcount();
            for c in first_c + 1..=last_c {
                ok = ok && rw.refcounts.get(s, c)? == 0;
            }
            if ok {
                rw.refcounts.increment(s, first_c)?;
                for c in first_c + 1..=last_c {
                    rw.refcounts.set(s, c, 1)?;
                }
                start = Some(cursor);
            }
        }
        let start = match start {
            Some(s) => s,
            None => self.alloc_clusters(clen.div_ceil(cs))?,
        };
        self.forget_decompressed();
        self.storage
            .write_at(c, start)
            .at(&self.path, "writing compressed cluster", start)?;
        let rw = self.rw()?;
        rw.compressed_cursor = start + clen;
        rw.cursor_frees = rw.refcounts.frees;
        let (old, _) = self.entry_of(guest_cluster)?;
        self.set_entry(
            guest_cluster,
            CompressedDesc::encode(start, clen, geo.cluster_bits),
            0,
        )?;
        self.release_entry(old)?;
        self.flush_if_too_dirty()
    }

    /// Grows the virtual size (never shrinks), growing the L1 table if needed.
    pub fn grow(&mut self, new_size: u64) -> Result<()> {
        if new_size <= self.header.size {
            return Ok(());
        }
        let new_size = new_size.div_ceil(512) * 512;
        let old_size = self.header.size;
        self.header.size = new_size;
        let need = self.header.required_l1_entries();
        if need > self.l1.len() as u64 {
            if need * 8 > header::MAX_L1_BYTES {
                self.header.size = old_size;
                return Err(Error::usage(
                    &self.path,
                    format!("virtual size {new_size} needs an L1 table larger than 32 MiB"),
                ));
            }
            self.resize_l1(need)?;
        }
        self.rw()?.header_dirty = true;
        Ok(())
    }

    /// [`Qcow2::grow`], and the rest of the old last cluster (bytes past the old size, which
    /// an earlier shrink may have left holding data) made to read as zeros, as a chain
    /// read through this image sees them. `qemu-img commit` grows without this; qmprestore
    /// needs it so that a commit agrees with a merge. Returns the guest range zeroed.
    pub fn grow_zeroing_tail(&mut self, new_size: u64) -> Result<Option<std::ops::Range<u64>>> {
        let old_size = self.virtual_size();
        if new_size <= old_size {
            return Ok(None);
        }
        self.grow(new_size)?;
        let tail_end = old_size
            .next_multiple_of(self.cluster_size())
            .min(self.virtual_size());
        if tail_end <= old_size {
            return Ok(None);
        }
        let (_, kind) = self.block_status(old_size, tail_end - old_size)?;
        if !matches!(
            kind,
            ExtentKind::Data { .. } | ExtentKind::Compressed { .. }
        ) {
            return Ok(None);
        }
        self.write_zeroes(old_size, tail_end - old_size, false, None)?;
        Ok(Some(old_size..tail_end))
    }

    /// Moves the L1 table to new clusters with room for `entries`.
    pub(crate) fn resize_l1(&mut self, entries: u64) -> Result<()> {
        let cs = self.cluster_size();
        let old_off = self.header.l1_table_offset;
        let old_clusters = (self.header.l1_size as u64 * 8).div_ceil(cs);
        let n = (entries * 8).div_ceil(cs).max(1);
        let new_off = self.alloc_clusters(n)?;
        for c in 0..old_clusters {
            self.free_cluster_later(old_off + c * cs)?;
        }
        self.l1.resize(entries as usize, 0);
        self.header.l1_table_offset = new_off;
        self.header.l1_size = entries as u32;
        let rw = self.rw()?;
        rw.l1_dirty = true;
        rw.l1_moved = true;
        rw.header_dirty = true;
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.storage.flush().at(&self.path, "flushing", 0)
    }

    /// Writes all metadata in crash-safe order: data and refcount increments, then L2
    /// tables, then the L1 table and header, then the deferred frees.
    pub fn flush_metadata(&mut self) -> Result<()> {
        let storage = self.storage.clone();
        let s = storage.as_ref();
        let path = self.path.clone();
        {
            let rw = self.rw()?;
            if rw.refcounts.write_dirty(s)? {
                // Data and refcounts must be stable before anything points at them.
            }
        }
        self.sync()?;
        let dirty: Vec<(u64, Arc<Vec<u64>>)> = self.rw()?.dirty_l2.drain().collect();
        let mut raw = vec![0u8; self.cluster_size() as usize];
        for (off, t) in dirty {
            BE::write_u64_into(&t, &mut raw);
            s.write_at(&raw, off).at(&path, "writing L2 table", off)?;
            self.lock_l2().insert(off, t);
        }
        let (l1_dirty, l1_moved) = {
            let rw = self.rw()?;
            (rw.l1_dirty, rw.l1_moved)
        };
        if l1_dirty {
            let mut raw = vec![0u8; self.l1.len() * 8];
            BE::write_u64_into(&self.l1, &mut raw);
            s.write_at(&raw, self.header.l1_table_offset).map_err(|e| {
                Error::io(&path, "writing L1 table", self.header.l1_table_offset, e)
            })?;
        }
        let reftable_moved = self.rw()?.refcounts.reftable_moved;
        if l1_moved || reftable_moved {
            // A moved table must be on disk before the header points at it.
            self.sync()?;
        }
        let header_dirty = self.rw()?.header_dirty || l1_moved || reftable_moved;
        if header_dirty {
            let rw = self.rw.as_deref().expect("rw");
            self.header.refcount_table_offset = rw.refcounts.reftable_offset;
            self.header.refcount_table_clusters = rw.refcounts.reftable_clusters();
            self.write_header()?;
        }
        self.sync()?;
        {
            let rw = self.rw()?;
            rw.l1_dirty = false;
            rw.l1_moved = false;
            rw.header_dirty = false;
            rw.refcounts.reftable_moved = false;
        }
        if self.rw()?.refcounts.has_pending() {
            let rw = self.rw()?;
            rw.refcounts.apply_pending(s)?;
            rw.refcounts.write_dirty(s)?;
            self.sync()?;
        }
        Ok(())
    }

    /// Sets the header extension `kind` (one this crate does not interpret; see
    /// [`Qcow2::app_extension`]) to `data`, replacing it if present. Written with the
    /// header at the next flush; refused when the header would not fit its cluster.
    pub fn set_app_extension(&mut self, kind: u32, data: Vec<u8>) -> Result<()> {
        use crate::format::header::Extension;
        let known = [
            header::EXT_BACKING_FORMAT,
            header::EXT_FEATURE_TABLE,
            header::EXT_BITMAPS,
            header::EXT_DATA_FILE,
            header::EXT_CRYPTO,
            0,
        ];
        if known.contains(&kind) {
            return Err(Error::usage(
                &self.path,
                format!("header extension {kind:#010x} is one qcow2 defines"),
            ));
        }
        self.rw()?;
        let mut h = self.header.clone();
        h.extensions
            .retain(|e| !matches!(e, Extension::Unknown { kind: k, .. } if *k == kind));
        h.extensions.push(Extension::Unknown { kind, data });
        h.encode().map_err(|e| Error::invalid(&self.path, e.0))?;
        self.header = h;
        self.rw()?.header_dirty = true;
        Ok(())
    }

    /// Flushes everything (end of a command).
    pub fn flush(&mut self) -> Result<()> {
        if self.rw.is_some() {
            self.flush_metadata()?;
        }
        Ok(())
    }

    /// Rewrites cluster 0 (QEMU's full header rewrite).
    pub(crate) fn write_header(&mut self) -> Result<()> {
        let buf = self
            .header
            .encode()
            .map_err(|e| Error::invalid(&self.path, e.0))?;
        self.storage
            .write_at(&buf, 0)
            .at(&self.path, "writing header", 0)?;
        // Re-read the derived fields (backing name offset) as stored.
        self.header = crate::format::header::Header::parse(&buf)
            .map_err(|e| Error::invalid(&self.path, e.0))?;
        Ok(())
    }

    /// Replaces the L1 entry `index` (for snapshot operations).
    pub(crate) fn set_l1_entry(&mut self, index: usize, value: u64) -> Result<()> {
        self.l1[index] = value;
        self.rw()?.l1_dirty = true;
        Ok(())
    }

    /// Reads an arbitrary L2 table for rewriting; returns a private copy.
    pub(crate) fn l2_table_copy(&self, offset: u64) -> Result<Vec<u64>> {
        Ok((*self.l2_table(offset)?).clone())
    }

    /// Stores a rewritten L2 table (written at the next flush).
    pub(crate) fn put_l2_table(&mut self, offset: u64, table: Vec<u64>) -> Result<()> {
        self.lock_l2().remove(offset);
        self.rw()?.dirty_l2.insert(offset, Arc::new(table));
        Ok(())
    }
}
