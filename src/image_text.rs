//! The `qcow2` command's text output in qemu-img's layout: `info` and `snapshot -l`.

use crate::humanize::{format_utc, format_vm_clock, human_size};
use qcow2::ops::info::{ImageInfo, SnapshotInfo};

/// Human output in qemu-img's layout.
pub fn human(info: &ImageInfo) -> String {
    let mut s = String::new();
    s.push_str(&format!("image: {}\n", info.filename));
    s.push_str(&format!("file format: {}\n", info.format));
    s.push_str(&format!(
        "virtual size: {} ({} bytes)\n",
        human_size(info.virtual_size),
        info.virtual_size
    ));
    s.push_str(&format!("disk size: {}\n", human_size(info.actual_size)));
    if let Some(cs) = info.cluster_size {
        s.push_str(&format!("cluster_size: {cs}\n"));
    }
    if let Some(b) = &info.backing_filename {
        s.push_str(&format!("backing file: {b}"));
        if info.full_backing_filename.as_deref() != Some(b.as_str()) {
            if let Some(f) = &info.full_backing_filename {
                s.push_str(&format!(" (actual path: {f})"));
            }
        }
        s.push('\n');
        if let Some(f) = &info.backing_filename_format {
            s.push_str(&format!("backing file format: {f}\n"));
        }
    }
    if info.dirty_flag {
        s.push_str("cleanly shut down: no\n");
    }
    if !info.snapshots.is_empty() {
        s.push_str("Snapshot list:\n");
        s.push_str(&snapshot_table(&info.snapshots));
    }
    if let Some(fs) = &info.format_specific {
        let d = &fs.data;
        s.push_str("Format specific information:\n");
        s.push_str(&format!("    compat: {}\n", d.compat));
        s.push_str(&format!("    compression type: {}\n", d.compression_type));
        if let Some(l) = d.lazy_refcounts {
            s.push_str(&format!("    lazy refcounts: {l}\n"));
        }
        if let Some(bitmaps) = &d.bitmaps {
            s.push_str("    bitmaps:\n");
            for (i, b) in bitmaps.iter().enumerate() {
                s.push_str(&format!("        [{i}]:\n            flags:\n"));
                for (j, f) in b.flags.iter().enumerate() {
                    s.push_str(&format!("                [{j}]: {f}\n"));
                }
                s.push_str(&format!(
                    "            name: {}\n            granularity: {}\n",
                    b.name, b.granularity
                ));
            }
        }
        s.push_str(&format!("    refcount bits: {}\n", d.refcount_bits));
        if let Some(df) = &d.data_file {
            s.push_str(&format!("    data file: {df}\n"));
        }
        if let Some(r) = d.data_file_raw {
            s.push_str(&format!("    data file raw: {r}\n"));
        }
        if let Some(c) = d.corrupt {
            s.push_str(&format!("    corrupt: {c}\n"));
        }
        if let Some(e) = d.extended_l2 {
            s.push_str(&format!("    extended l2: {e}\n"));
        }
    }
    s
}

/// The snapshot table as `qemu-img snapshot -l` 10.0 prints it (dates in local time are
/// not available without a time zone database, so they are printed in UTC).
pub fn snapshot_table(snaps: &[SnapshotInfo]) -> String {
    let mut s = String::from(
        "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT\n",
    );
    for sn in snaps {
        let icount = match sn.icount {
            Some(i) => i.to_string(),
            None => "--".to_string(),
        };
        s.push_str(&format!(
            "{:<7} {:<17} {:>7} {} {:>15} {:>10}\n",
            sn.id,
            sn.name,
            human_size(sn.vm_state_size),
            format_utc(sn.date_sec as i64),
            format_vm_clock(sn.vm_clock_sec * 1_000_000_000 + sn.vm_clock_nsec),
            icount
        ));
    }
    s
}
