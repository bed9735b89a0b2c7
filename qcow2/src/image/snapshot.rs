//! Internal snapshots: list, create, apply (revert to) and delete, with qemu-img's
//! semantics (IDs are unique, names need not be; `-d` looks up by name).

use super::tables::read_table;
use super::tree::Timing;
use super::Qcow2;
use crate::error::{Error, IoContext, Result};
use crate::format::entry::{L1E_OFFSET_MASK, OFLAG_COPIED};
use crate::format::snapshot::{table_size, Snapshot};
use byteorder::{BigEndian as BE, ByteOrder};
use std::time::{SystemTime, UNIX_EPOCH};

fn now() -> (u32, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // QEMU stores microseconds * 1000.
    (d.as_secs() as u32, d.subsec_micros() * 1000)
}

impl Qcow2 {
    /// Writes a new snapshot table (old entries replaced by `snaps`) to fresh clusters and
    /// points the header at it; the old table's clusters are freed after the flush.
    fn store_snapshot_table(&mut self, snaps: &[Snapshot]) -> Result<()> {
        let cs = self.cluster_size();
        let old_off = self.header.snapshots_offset;
        let old_size = {
            let old: Vec<Vec<u8>> = self.snapshots()?.iter().map(Snapshot::encode).collect();
            table_size(&old)
        };
        let entries: Vec<Vec<u8>> = snaps.iter().map(Snapshot::encode).collect();
        let size = table_size(&entries);
        let mut new_off = 0;
        if !snaps.is_empty() {
            let n = size.div_ceil(cs);
            new_off = self.alloc_clusters(n)?;
            let mut buf = Vec::with_capacity(size as usize);
            for (i, e) in entries.iter().enumerate() {
                if i > 0 {
                    buf.resize(buf.len().div_ceil(8) * 8, 0);
                }
                buf.extend_from_slice(e);
            }
            self.storage.write_at(&buf, new_off).at(
                &self.path,
                "writing snapshot table",
                new_off,
            )?;
        }
        if self.header.nb_snapshots > 0 && old_off != 0 {
            for c in 0..old_size.div_ceil(cs) {
                self.free_cluster_later(old_off + c * cs)?;
            }
        }
        self.header.nb_snapshots = snaps.len() as u32;
        self.header.snapshots_offset = new_off;
        self.mark_header_dirty()
    }

    fn check_snapshots_possible(&self) -> Result<()> {
        if self.header.refcount_order == 0 {
            return Err(Error::usage(
                &self.path,
                "snapshots need refcounts wider than 1 bit (refcount_bits=1)",
            ));
        }
        Ok(())
    }

    /// Creates a disk-only internal snapshot named `name`; returns its ID.
    pub fn snapshot_create(&mut self, name: &str) -> Result<String> {
        self.check_snapshots_possible()?;
        if name.is_empty() || name.len() > 0xffff {
            return Err(Error::usage(&self.path, "a snapshot needs a name"));
        }
        let mut snaps = self.snapshots()?;
        if snaps.len() >= crate::format::header::MAX_SNAPSHOTS as usize {
            return Err(Error::usage(&self.path, "too many snapshots"));
        }
        let id = snaps
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        self.flush()?;
        // 1. a copy of the active L1 in new clusters
        let cs = self.cluster_size();
        let l1 = self.l1.clone();
        let l1_off = self.alloc_clusters(((l1.len() as u64 * 8).div_ceil(cs)).max(1))?;
        let mut raw = vec![0u8; l1.len() * 8];
        BE::write_u64_into(&l1, &mut raw);
        self.storage
            .write_at(&raw, l1_off)
            .at(&self.path, "writing snapshot L1 table", l1_off)?;
        // 2. every table and cluster it reaches gets one more reference, and the active
        // tables lose COPIED, all on disk before the snapshot becomes visible: a stale
        // COPIED on a shared cluster would let a writer overwrite the snapshot's data.
        self.tree_increment(&l1)?;
        self.recompute_copied()?;
        self.flush()?;
        // 3. the new table
        let (date_sec, date_nsec) = now();
        snaps.push(Snapshot {
            l1_table_offset: l1_off,
            l1_size: l1.len() as u32,
            id: id.to_string(),
            name: name.to_string(),
            date_sec,
            date_nsec,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.virtual_size()),
            icount: Some(0),
            extra: Vec::new(),
        });
        self.store_snapshot_table(&snaps)?;
        self.flush()?;
        Ok(id.to_string())
    }

    fn find_snapshot(&self, key: &str, by_id_first: bool) -> Result<(usize, Snapshot)> {
        let snaps = self.snapshots()?;
        let by_id = snaps.iter().position(|s| s.id == key);
        let by_name = snaps.iter().position(|s| s.name == key);
        let idx = if by_id_first {
            by_id.or(by_name)
        } else {
            by_name
        };
        idx.map(|i| (i, snaps[i].clone()))
            .ok_or_else(|| Error::usage(&self.path, format!("snapshot '{key}' not found")))
    }

    fn snapshot_l1(&self, s: &Snapshot) -> Result<Vec<u64>> {
        let mut l1 = read_table(
            self.storage.as_ref(),
            &self.path,
            "reading snapshot L1 table",
            s.l1_table_offset,
            s.l1_size as u64,
            self.file_len()?,
        )?;
        l1.resize(s.l1_size as usize, 0);
        Ok(l1)
    }

    /// Reverts the disk to snapshot `key` (ID or name).
    pub fn snapshot_apply(&mut self, key: &str) -> Result<()> {
        if self.header.bitmaps().is_some() {
            return Err(Error::usage(
                &self.path,
                "Device has active dirty bitmaps; remove them before applying a snapshot",
            ));
        }
        let (_, snap) = self.find_snapshot(key, true)?;
        let snap_l1 = self.snapshot_l1(&snap)?;
        self.flush()?;
        if snap_l1.len() > self.l1.len() {
            self.resize_l1(snap_l1.len() as u64)?;
        }
        // Phase 1: the snapshot's tree gets the active L1's reference (on disk first).
        self.tree_increment(&snap_l1)?;
        self.flush()?;
        // Phase 2: the active L1 becomes a copy of the snapshot's (no COPIED: all shared).
        let old_l1 = self.l1.clone();
        for i in 0..self.l1.len() {
            let v = snap_l1.get(i).copied().unwrap_or(0) & !OFLAG_COPIED;
            self.set_l1_entry(i, v)?;
        }
        if let Some(size) = snap.disk_size {
            self.header.size = size;
        }
        self.mark_header_dirty()?;
        // Phase 3: the old tree loses the active reference once the new L1 is on disk.
        self.tree_decrement(&old_l1, Timing::Deferred)?;
        self.flush()?;
        // Phase 4: private again where refcounts say so.
        self.recompute_copied()?;
        self.flush()
    }

    /// Deletes the first snapshot named `name`.
    pub fn snapshot_delete(&mut self, name: &str) -> Result<()> {
        let (idx, snap) = self.find_snapshot(name, false)?;
        let snap_l1 = self.snapshot_l1(&snap)?;
        self.flush()?;
        let mut snaps = self.snapshots()?;
        snaps.remove(idx);
        self.store_snapshot_table(&snaps)?;
        self.tree_decrement(&snap_l1, Timing::Deferred)?;
        let cs = self.cluster_size();
        let l1_clusters = (snap.l1_size as u64 * 8).div_ceil(cs);
        for c in 0..l1_clusters {
            self.free_cluster_later((snap.l1_table_offset & L1E_OFFSET_MASK) + c * cs)?;
        }
        self.flush()?;
        self.recompute_copied()?;
        self.flush()
    }
}
