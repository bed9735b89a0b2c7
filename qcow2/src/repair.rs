//! `check -r leaks|all`: repair refcounts. Leaks are fixed by lowering refcounts; with
//! `all`, refcounts that are too low (or an image with the dirty bit) get a full rebuild of
//! the refcount structures, written after the end of the file before the header switches
//! to them, and the COPIED flags are recomputed.

use crate::alloc::Refcounts;
use crate::check::{check, check_detailed, CheckReport};
use crate::error::{Error, IoContext, Result};
use crate::format::header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::format::refcount;
use crate::image::write::OpenRwOptions;
use crate::image::Qcow2;
use byteorder::{BigEndian as BE, ByteOrder};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    Leaks,
    All,
}

pub struct RepairResult {
    pub before: CheckReport,
    pub after: CheckReport,
    pub leaks_fixed: u64,
    pub corruptions_fixed: u64,
}

pub fn repair(path: &Path, mode: RepairMode) -> Result<RepairResult> {
    let mut img = Qcow2::open_rw(path, OpenRwOptions { for_repair: true })?;
    let detail = check_detailed(&img)?;
    let before = detail.report.clone();
    let mut leaks_fixed = 0;
    let mut corruptions_fixed = 0;
    let needs_rebuild = !before.undercounted.is_empty() || img.header().is_dirty();
    if mode == RepairMode::All && needs_rebuild {
        rebuild_refcounts(&mut img, &detail.computed, &detail.refcount_meta)?;
        leaks_fixed = before.leaked.len() as u64;
        corruptions_fixed += before.undercounted.len() as u64;
    } else {
        for &(idx, _, computed) in &before.leaked {
            let (s, rc) = img.refcounts_mut()?;
            rc.set(s, idx, computed)?;
            leaks_fixed += 1;
        }
        img.flush()?;
    }
    if mode == RepairMode::All {
        let copied_errors = before
            .messages
            .iter()
            .filter(|m| m.contains("OFLAG_COPIED"))
            .count() as u64;
        img.recompute_copied()?;
        img.flush()?;
        corruptions_fixed += copied_errors;
    }
    let after = check(&img)?;
    // The flags may go only when the refcounts are trustworthy again.
    if after.corruptions == 0 && after.check_errors == 0 {
        let h = img.header_mut();
        if h.incompatible_features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) != 0 {
            h.incompatible_features &= !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
            img.mark_header_dirty()?;
            img.flush()?;
        }
    }
    Ok(RepairResult {
        before,
        after,
        leaks_fixed,
        corruptions_fixed,
    })
}

/// Writes new refcount blocks and a new table holding `computed` (minus the old refcount
/// structures) after the end of the file, then switches the header to them.
fn rebuild_refcounts(img: &mut Qcow2, computed: &[u16], old_meta: &[u64]) -> Result<()> {
    let h = img.header().clone();
    let cs = h.cluster_size();
    let order = h.refcount_order;
    let epb = cs * 8 / h.refcount_bits() as u64;
    let max = refcount::max_value(order);
    let mut counts: Vec<u64> = computed.iter().map(|&c| c as u64).collect();
    for &m in old_meta {
        if let Some(c) = counts.get_mut(m as usize) {
            *c = c.saturating_sub(1);
        }
    }
    if let Some((i, &c)) = counts.iter().enumerate().find(|(_, &c)| c > max) {
        return Err(Error::usage(
            &img.path,
            format!(
                "cluster {i} needs refcount {c}, more than refcount_bits={} can hold",
                h.refcount_bits()
            ),
        ));
    }
    let end = counts.len() as u64;
    // Blocks B and table T must describe [0, end + B + T).
    let (mut b, mut t) = (0u64, 0u64);
    loop {
        let nb = (end + b + t).div_ceil(epb);
        let nt = (nb * 8).div_ceil(cs);
        if (nb, nt) == (b, t) {
            break;
        }
        (b, t) = (nb, nt);
    }
    counts.resize((end + b + t) as usize, 0);
    for i in end..end + b + t {
        counts[i as usize] = 1;
    }
    let path = img.path().to_string();
    let storage = img.storage().clone();
    let mut table = vec![0u64; (t * cs / 8) as usize];
    for k in 0..b {
        let mut block = vec![0u8; cs as usize];
        for j in 0..epb {
            let idx = (k * epb + j) as usize;
            if idx < counts.len() {
                refcount::set(&mut block, order, j, counts[idx]);
            }
        }
        let off = (end + k) * cs;
        storage
            .write_at(&block, off)
            .at(&path, "writing refcount block", off)?;
        table[k as usize] = off;
    }
    let table_off = (end + b) * cs;
    let mut raw = vec![0u8; table.len() * 8];
    BE::write_u64_into(&table, &mut raw);
    storage
        .write_at(&raw, table_off)
        .at(&path, "writing refcount table", table_off)?;
    storage.flush().at(&path, "flushing", 0)?;
    {
        let hm = img.header_mut();
        hm.refcount_table_offset = table_off;
        hm.refcount_table_clusters = t as u32;
    }
    img.write_header()?;
    storage.flush().at(&path, "flushing", 0)?;
    let fresh = Refcounts::load(
        storage.as_ref(),
        &path,
        h.cluster_bits,
        order,
        table_off,
        t as u32,
    )?;
    img.replace_refcounts(fresh)?;
    Ok(())
}
