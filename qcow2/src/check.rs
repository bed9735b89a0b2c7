//! Structural check of one image, with qemu-img check's classification: a reference count
//! higher on disk than the metadata accounts for is a leak, lower is a corruption; bad
//! entries and COPIED flags are corruptions.

use crate::cache::LruCache;
use crate::error::{IoContext, Result};
use crate::format::entry::{
    self, CompressedDesc, L1E_RESERVED_MASK, L2E_OFFSET_MASK, L2E_RESERVED_MASK, OFLAG_COMPRESSED,
    OFLAG_COPIED, OFLAG_ZERO,
};
use crate::format::refcount;
use crate::format::snapshot;
use crate::image::tables::read_table;
use crate::image::Qcow2;
use serde::Serialize;
use std::sync::Arc;

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    pub filename: String,
    pub format: String,
    pub check_errors: u64,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub fragmented_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub compressed_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions_fixed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks_fixed: u64,
    /// One line per problem found, in qemu-img's wording where it has one.
    #[serde(skip)]
    pub messages: Vec<String>,
    /// Leaked clusters (index, on-disk refcount, computed refcount), for repair.
    #[serde(skip)]
    pub leaked: Vec<(u64, u64, u64)>,
    /// Clusters whose on-disk refcount is below the computed one.
    #[serde(skip)]
    pub undercounted: Vec<(u64, u64, u64)>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl CheckReport {
    /// True when the only corruptions are COPIED flags that disagree with refcounts that
    /// are not too low: what an interrupted snapshot create or delete leaves (QEMU's own has
    /// the same window). Reading is unaffected; `check -r all` recomputes the flags.
    pub fn only_stale_copied_flags(&self) -> bool {
        let copied = self
            .messages
            .iter()
            .filter(|m| m.starts_with("ERROR OFLAG_COPIED"))
            .count() as u64;
        self.corruptions > 0
            && self.corruptions == copied
            && self.check_errors == 0
            && self.undercounted.is_empty()
    }

    /// qemu-img check's exit code: 0 clean, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.corruptions > 0 || self.check_errors > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// The summary qemu-img prints on stdout.
    pub fn human(&self) -> String {
        let mut s = String::new();
        if self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 {
            s.push_str("No errors were found on the image.\n");
        } else {
            if self.corruptions > 0 {
                s.push_str(&format!(
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                    self.corruptions
                ));
            }
            if self.leaks > 0 {
                s.push_str(&format!(
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                    self.leaks
                ));
            }
            if self.check_errors > 0 {
                s.push_str(&format!(
                    "\n{} internal errors have occurred during the check.\n",
                    self.check_errors
                ));
            }
        }
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            let pct = |n: u64, d: u64| 100.0 * n as f64 / d as f64;
            s.push_str(&format!(
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
                self.allocated_clusters,
                self.total_clusters,
                pct(self.allocated_clusters, self.total_clusters),
                pct(self.fragmented_clusters, self.allocated_clusters),
                pct(self.compressed_clusters, self.allocated_clusters),
            ));
        }
        if self.image_end_offset > 0 {
            s.push_str(&format!("Image end offset: {}\n", self.image_end_offset));
        }
        s
    }
}

/// Reads on-disk refcounts through a small cache.
pub struct RefcountReader<'a> {
    img: &'a Qcow2,
    reftable: Vec<u64>,
    blocks: LruCache<Vec<u8>>,
}

impl<'a> RefcountReader<'a> {
    pub fn new(img: &'a Qcow2) -> Result<Self> {
        let h = img.header();
        let n = h.refcount_table_clusters as u64 * h.cluster_size() / 8;
        let reftable = read_table(
            img.storage().as_ref(),
            img.path(),
            "reading refcount table",
            h.refcount_table_offset,
            n,
            img.file_len()?,
        )?;
        Ok(RefcountReader {
            img,
            reftable,
            blocks: LruCache::new(64),
        })
    }

    pub fn reftable(&self) -> &[u64] {
        &self.reftable
    }

    pub fn entries_per_block(&self) -> u64 {
        let h = self.img.header();
        h.cluster_size() * 8 / h.refcount_bits() as u64
    }

    /// The refcount block at `offset` (no validation).
    pub fn block(&mut self, offset: u64) -> Result<Arc<Vec<u8>>> {
        if let Some(b) = self.blocks.get(offset) {
            return Ok(b);
        }
        let mut raw = vec![0u8; self.img.cluster_size() as usize];
        self.img.storage().read_at(&mut raw, offset).at(
            self.img.path(),
            "reading refcount block",
            offset,
        )?;
        let b = Arc::new(raw);
        self.blocks.insert(offset, b.clone());
        Ok(b)
    }

    /// The on-disk refcount of cluster `index` (0 where no block describes it).
    pub fn get(&mut self, index: u64) -> Result<u64> {
        let epb = self.entries_per_block();
        let ri = (index / epb) as usize;
        let Some(&e) = self.reftable.get(ri) else {
            return Ok(0);
        };
        let off = e & !0x1ff;
        if off == 0 || off % self.img.cluster_size() != 0 {
            return Ok(0);
        }
        let b = self.block(off)?;
        Ok(refcount::get(
            &b,
            self.img.header().refcount_order,
            index % epb,
        ))
    }
}

struct Checker<'a> {
    img: &'a Qcow2,
    cs: u64,
    cb: u32,
    nb_clusters: u64,
    computed: Vec<u16>,
    report: CheckReport,
    /// (l1 index, L1 entry) of the active table, for the COPIED pass.
    active_l1: Vec<(usize, u64)>,
    /// L2 entries of the active tables that own a host cluster, for the COPIED pass.
    active_data: Vec<u64>,
    /// Clusters of the refcount table and blocks (a rebuild replaces them).
    refcount_meta: Vec<u64>,
}

/// A check's report plus what a repair needs: the refcounts the metadata implies.
pub struct CheckDetail {
    pub report: CheckReport,
    /// Computed refcount per cluster of the file (saturating).
    pub computed: Vec<u16>,
    /// Clusters holding the refcount table and blocks.
    pub refcount_meta: Vec<u64>,
}

impl Checker<'_> {
    fn corruption(&mut self, msg: String) {
        self.report.corruptions += 1;
        self.report.messages.push(msg);
    }

    /// Counts one reference to each cluster of `[offset, offset+len)`.
    fn inc(&mut self, offset: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cb;
        let last = (offset + len - 1) >> self.cb;
        for c in first..=last {
            if c >= self.nb_clusters {
                self.corruption(format!(
                    "ERROR {what} at offset {:#x} lies beyond the end of the image file",
                    c << self.cb
                ));
                return;
            }
            let v = &mut self.computed[c as usize];
            *v = v.saturating_add(1);
        }
    }

    fn check_l1(&mut self, l1_offset: u64, l1_size: u32, active: bool) -> Result<()> {
        let what = if active {
            "L1 table"
        } else {
            "snapshot L1 table"
        };
        self.inc(l1_offset, l1_size as u64 * 8, what);
        let l1 = read_table(
            self.img.storage().as_ref(),
            self.img.path(),
            "reading L1 table",
            l1_offset,
            l1_size as u64,
            self.nb_clusters << self.cb,
        )?;
        for (i, &l1e) in l1.iter().enumerate() {
            if l1e == 0 {
                continue;
            }
            if l1e & L1E_RESERVED_MASK != 0 {
                self.corruption(format!(
                    "ERROR found L1 entry with reserved bits set: {l1e:x}"
                ));
            }
            let l2 = entry::l1_l2_offset(l1e);
            if l2 == 0 {
                continue;
            }
            if !l2.is_multiple_of(self.cs) {
                self.corruption(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                continue;
            }
            if (l2 >> self.cb) >= self.nb_clusters {
                self.corruption(format!(
                    "ERROR l2_offset={l2:x}: L2 table lies beyond the end of the image file"
                ));
                continue;
            }
            self.inc(l2, self.cs, "L2 table");
            if l2 == 0 || l2 < self.cs {
                self.corruption(format!(
                    "ERROR l2_offset={l2:x}: L2 table overlaps the header"
                ));
            }
            if active {
                self.active_l1.push((i, l1e));
            }
            self.check_l2(l2, active)?;
        }
        Ok(())
    }

    fn check_l2(&mut self, l2_offset: u64, active: bool) -> Result<()> {
        let table = self.img.l2_table(l2_offset)?;
        let h = self.img.header();
        let n = h.l2_entries() as usize;
        let ext = h.extended_l2();
        let data_file = h.has_data_file();
        let mut next_contiguous = 0u64;
        for i in 0..n {
            let e = self.img.l2_entry(&table, i);
            let word = e.word;
            if word & OFLAG_COMPRESSED != 0 {
                if data_file {
                    self.corruption(format!(
                        "ERROR compressed cluster {word:x} in an image with an external data file"
                    ));
                    continue;
                }
                if word & OFLAG_COPIED != 0 {
                    self.corruption(format!(
                        "ERROR: coffset={:#x}: Compressed cluster has the COPIED flag set",
                        word & !(OFLAG_COPIED | OFLAG_COMPRESSED)
                    ));
                }
                if ext && e.bitmap != Some(0) {
                    self.corruption(format!(
                        "ERROR compressed cluster {word:x} has a non-zero subcluster bitmap"
                    ));
                }
                let d = CompressedDesc::decode(word, self.cb);
                self.inc(
                    d.host_offset & !511,
                    d.host_offset + d.len - (d.host_offset & !511),
                    "compressed cluster",
                );
                if active {
                    self.report.allocated_clusters += 1;
                    self.report.compressed_clusters += 1;
                    self.report.fragmented_clusters += 1;
                }
                continue;
            }
            if word & L2E_RESERVED_MASK != 0 || (ext && word & OFLAG_ZERO != 0) {
                self.corruption(format!(
                    "ERROR found L2 entry with reserved bits set: {word:x}"
                ));
            }
            let host = word & L2E_OFFSET_MASK;
            if let Some(bm) = e.bitmap {
                if (bm as u32) & ((bm >> 32) as u32) != 0 {
                    self.corruption(format!(
                        "ERROR invalid subcluster allocation bitmap: {bm:x} (allocated and zero)"
                    ));
                }
                if host == 0 && bm as u32 != 0 {
                    self.corruption(
                        "ERROR Unallocated cluster has non-zero subcluster allocation map"
                            .to_string(),
                    );
                }
            }
            let identity_zero = data_file && host == 0 && word & OFLAG_COPIED != 0;
            if host == 0 && !identity_zero {
                continue;
            }
            if !host.is_multiple_of(self.cs) {
                self.corruption(format!(
                    "ERROR offset={host:x}: Data cluster is not properly aligned; L2 entry corrupted."
                ));
                continue;
            }
            if active {
                self.report.allocated_clusters += 1;
                if next_contiguous != 0 && host != next_contiguous && !identity_zero {
                    self.report.fragmented_clusters += 1;
                }
                next_contiguous = host + self.cs;
                self.active_data.push(word);
            }
            if !data_file {
                self.inc(host, self.cs, "data cluster");
            }
        }
        Ok(())
    }
}

/// Checks an image. Problems are counted in the report, not returned as errors; an `Err`
/// means the check itself could not run (exit code 1).
pub fn check(img: &Qcow2) -> Result<CheckReport> {
    Ok(check_detailed(img)?.report)
}

/// [`check`] with the computed refcounts, for repair.
pub fn check_detailed(img: &Qcow2) -> Result<CheckDetail> {
    let h = img.header().clone();
    let cs = h.cluster_size();
    let file_len = img.file_len()?;
    let nb_clusters = file_len.div_ceil(cs);
    // Memory for the computed refcounts is bounded by the file's own size.
    let mut c = Checker {
        img,
        cs,
        cb: h.cluster_bits,
        nb_clusters,
        computed: vec![0u16; nb_clusters as usize],
        report: CheckReport {
            filename: img.path().to_string(),
            format: "qcow2".into(),
            total_clusters: h.virtual_size().div_ceil(cs),
            ..Default::default()
        },
        active_l1: Vec::new(),
        active_data: Vec::new(),
        refcount_meta: Vec::new(),
    };

    c.inc(0, cs, "header");
    c.check_l1(h.l1_table_offset, h.l1_size, true)?;
    let snapshots = match img.snapshots() {
        Ok(s) => s,
        Err(e) => {
            c.corruption(format!("ERROR snapshot table: {e}"));
            Vec::new()
        }
    };
    for s in &snapshots {
        if (s.l1_table_offset >> c.cb) >= nb_clusters {
            c.corruption(format!(
                "ERROR snapshot {} ({}) L1 table lies beyond the end of the image file",
                s.id, s.name
            ));
            continue;
        }
        c.check_l1(s.l1_table_offset, s.l1_size, false)?;
    }
    if h.nb_snapshots > 0 {
        let mut size = 0u64;
        for (i, s) in snapshots.iter().enumerate() {
            if i > 0 {
                size = size.div_ceil(8) * 8;
            }
            size += (snapshot::FIXED_LEN + s.extra.len() + s.id.len() + s.name.len()) as u64;
        }
        c.inc(h.snapshots_offset, size, "snapshot table");
    }
    // Bitmaps: directory, tables and data clusters.
    if let Some(ext) = h.bitmaps() {
        c.inc(ext.directory_offset, ext.directory_size, "bitmap directory");
        match img.bitmaps() {
            Ok(bitmaps) => {
                for b in bitmaps {
                    let tbytes = b.table_size as u64 * 8;
                    if tbytes > 64 << 20 || b.table_offset % cs != 0 {
                        c.corruption(format!("ERROR bitmap {}: invalid bitmap table", b.name));
                        continue;
                    }
                    c.inc(b.table_offset, tbytes, "bitmap table");
                    let table = read_table(
                        img.storage().as_ref(),
                        img.path(),
                        "reading bitmap table",
                        b.table_offset,
                        b.table_size as u64,
                        file_len,
                    )?;
                    for e in table {
                        let off = e & L2E_OFFSET_MASK;
                        if off != 0 {
                            c.inc(off, cs, "bitmap data");
                        }
                    }
                }
            }
            Err(e) => c.corruption(format!("ERROR bitmap directory: {e}")),
        }
    }
    for ext in &h.extensions {
        if let crate::format::header::Extension::Crypto { offset, length } = ext {
            c.inc(*offset, *length, "encryption header");
        }
    }
    // Refcount table and blocks.
    let reftable_bytes = h.refcount_table_clusters as u64 * cs;
    c.inc(h.refcount_table_offset, reftable_bytes, "refcount table");
    for i in 0..h.refcount_table_clusters as u64 {
        c.refcount_meta.push((h.refcount_table_offset >> c.cb) + i);
    }
    let mut rc = RefcountReader::new(img)?;
    let reftable = rc.reftable().to_vec();
    let mut valid_blocks = Vec::new();
    for (i, &e) in reftable.iter().enumerate() {
        let off = e & !0x1ff;
        if off == 0 {
            continue;
        }
        if off % cs != 0 {
            c.corruption(format!(
                "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            ));
            continue;
        }
        if (off >> c.cb) >= nb_clusters {
            c.corruption(format!("ERROR refcount block {i} is outside image"));
            continue;
        }
        c.inc(off, cs, "refcount block");
        c.refcount_meta.push(off >> c.cb);
        valid_blocks.push((i as u64, off));
    }
    for &(i, off) in &valid_blocks {
        let idx = off >> c.cb;
        if c.computed[idx as usize] > 1 {
            c.corruption(format!(
                "ERROR refcount block {i} refcount={} (overlaps other metadata)",
                c.computed[idx as usize]
            ));
        }
    }

    // Compare computed against on-disk counts, block by block.
    let epb = rc.entries_per_block();
    let order = h.refcount_order;
    let mut highest: Option<u64> = None;
    let mut covered_upto = 0u64;
    let mut compare = |c: &mut Checker, idx: u64, ondisk: u64| {
        let computed = c.computed.get(idx as usize).copied().unwrap_or(0) as u64;
        if ondisk > 0 || computed > 0 {
            highest = Some(highest.map_or(idx, |h: u64| h.max(idx)));
        }
        if idx >= c.nb_clusters || ondisk == computed {
            return;
        }
        if ondisk > computed {
            c.report.leaks += 1;
            c.report.messages.push(format!(
                "Leaked cluster {idx} refcount={ondisk} reference={computed}"
            ));
            c.report.leaked.push((idx, ondisk, computed));
        } else {
            c.corruption(format!(
                "ERROR cluster {idx} refcount={ondisk} reference={computed}"
            ));
            c.report.undercounted.push((idx, ondisk, computed));
        }
    };
    for ri in 0..reftable.len() as u64 {
        let base = ri * epb;
        let off = reftable[ri as usize] & !0x1ff;
        let valid = valid_blocks.iter().any(|&(i, _)| i == ri);
        if off != 0 && valid {
            let block = rc.block(off)?;
            for j in 0..epb {
                let v = refcount::get(&block, order, j);
                compare(&mut c, base + j, v);
            }
        } else {
            for j in 0..epb {
                if base + j >= nb_clusters {
                    break;
                }
                compare(&mut c, base + j, 0);
            }
        }
        covered_upto = base + epb;
    }
    for idx in covered_upto..nb_clusters {
        compare(&mut c, idx, 0);
    }
    c.report.image_end_offset = highest.map_or(0, |i| (i + 1) * cs);

    // COPIED flags of the active tables must say "refcount is exactly 1".
    let active_l1 = std::mem::take(&mut c.active_l1);
    for (i, l1e) in active_l1 {
        let l2 = entry::l1_l2_offset(l1e);
        let r = rc.get(l2 >> c.cb)?;
        if (r == 1) != (l1e & OFLAG_COPIED != 0) {
            c.corruption(format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={r}"
            ));
        }
    }
    let active_data = std::mem::take(&mut c.active_data);
    for word in active_data {
        let host = word & L2E_OFFSET_MASK;
        let r = if h.has_data_file() {
            1
        } else {
            rc.get(host >> c.cb)?
        };
        if (r == 1) != (word & OFLAG_COPIED != 0) {
            c.corruption(format!(
                "ERROR OFLAG_COPIED data cluster: l2_entry={word:x} refcount={r}"
            ));
        }
    }
    Ok(CheckDetail {
        report: c.report,
        computed: c.computed,
        refcount_meta: c.refcount_meta,
    })
}
