//! Whole-tree refcount updates (what snapshots and emptying need): add or drop one
//! reference along an L1 table, and recompute the COPIED flags of the active tables.

use super::Qcow2;
use crate::error::{IoContext, Result};
use crate::format::entry::{
    CompressedDesc, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
};

/// When a decrement takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// Now (nothing on disk refers through the table any more).
    Now,
    /// After the next metadata flush.
    Deferred,
}

impl Qcow2 {
    /// The host clusters one L2 entry references (data, or every cluster a compressed
    /// extent touches).
    pub(crate) fn entry_clusters(&self, word: u64) -> Vec<u64> {
        let geo = self.geometry;
        if word & OFLAG_COMPRESSED != 0 {
            CompressedDesc::decode(word, geo.cluster_bits)
                .host_clusters(geo.cluster_bits)
                .collect()
        } else {
            let host = word & L2E_OFFSET_MASK;
            if host == 0 {
                Vec::new()
            } else {
                vec![geo.cluster_index(host)]
            }
        }
    }

    fn l2_words(&self, l2: u64) -> Result<Vec<u64>> {
        let t = self.l2_table(l2)?;
        let ext = self.header.extended_l2();
        Ok(if ext {
            t.iter().step_by(2).copied().collect()
        } else {
            t.to_vec()
        })
    }

    /// Adds one reference to every L2 table and data cluster reachable from `l1`.
    pub(crate) fn tree_increment(&mut self, l1: &[u64]) -> Result<()> {
        let geo = self.geometry;
        for &e in l1 {
            let l2 = e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let words = self.l2_words(l2)?;
            let (s, rc) = self.refcounts_mut()?;
            rc.increment(s, geo.cluster_index(l2))?;
            for w in words {
                for c in self.entry_clusters(w) {
                    let (s, rc) = self.refcounts_mut()?;
                    rc.increment(s, c)?;
                }
            }
        }
        Ok(())
    }

    /// Drops one reference from every L2 table and data cluster reachable from `l1`.
    pub(crate) fn tree_decrement(&mut self, l1: &[u64], timing: Timing) -> Result<()> {
        let geo = self.geometry;
        for &e in l1 {
            let l2 = e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let words = self.l2_words(l2)?;
            let mut clusters = vec![geo.cluster_index(l2)];
            for w in words {
                clusters.extend(self.entry_clusters(w));
            }
            let (s, rc) = self.refcounts_mut()?;
            for c in clusters {
                match timing {
                    Timing::Now => {
                        rc.decrement_now(s, c)?;
                    }
                    Timing::Deferred => rc.decrement_later(c),
                }
            }
        }
        Ok(())
    }

    /// Sets COPIED on active L1 and L2 entries exactly where the refcount is 1.
    pub(crate) fn recompute_copied(&mut self) -> Result<()> {
        let geo = self.geometry;
        let ext = self.header.extended_l2();
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let l2 = e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let l2_rc = {
                let (s, rc) = self.refcounts_mut()?;
                rc.get(s, geo.cluster_index(l2))?
            };
            let new_e = if l2_rc == 1 { l2 | OFLAG_COPIED } else { l2 };
            if new_e != e {
                self.set_l1_entry(i, new_e)?;
            }
            // A table shared with a snapshot is rewritten in place too, as QEMU does: COPIED
            // bits are only meaningful in the active tables.
            let mut table = self.l2_table_copy(l2)?;
            let mut changed = false;
            let step = if ext { 2 } else { 1 };
            for j in (0..table.len()).step_by(step) {
                let w = table[j];
                if w & OFLAG_COMPRESSED != 0 {
                    continue;
                }
                let host = w & L2E_OFFSET_MASK;
                if host == 0 {
                    continue;
                }
                let r = {
                    let (s, rc) = self.refcounts_mut()?;
                    rc.get(s, geo.cluster_index(host))?
                };
                let nw = if r == 1 {
                    w | OFLAG_COPIED
                } else {
                    w & !OFLAG_COPIED
                };
                if nw != w {
                    table[j] = nw;
                    changed = true;
                }
            }
            if changed {
                self.put_l2_table(l2, table)?;
            }
        }
        Ok(())
    }

    /// Drops every guest cluster of the active L1 (the image then reads entirely from its
    /// backing file) and gives the space back; the file is truncated where possible.
    pub fn make_empty(&mut self) -> Result<()> {
        let l1 = self.l1.clone();
        for (i, &e) in l1.iter().enumerate() {
            if e & L1E_OFFSET_MASK != 0 {
                self.set_l1_entry(i, 0)?;
            }
        }
        self.tree_decrement(&l1, Timing::Deferred)?;
        self.flush()?;
        self.truncate_to_used()
    }

    /// Cuts the file after the last cluster in use.
    pub fn truncate_to_used(&mut self) -> Result<()> {
        let cs = self.cluster_size();
        let highest = {
            let (s, rc) = self.refcounts_mut()?;
            rc.highest_used(s)?
        };
        if let Some(h) = highest {
            let end = (h + 1) * cs;
            if end < self.file_len()? {
                self.storage
                    .set_len(end)
                    .at(&self.path, "truncating", end)?;
            }
        }
        Ok(())
    }
}
