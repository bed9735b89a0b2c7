//! `info`: what qemu-img info reports, in its JSON field names.

use crate::chain::{Chain, Layer};
use crate::error::Result;
use crate::format::header::CompressionType;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_sec: u64,
    pub vm_clock_nsec: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BitmapInfo {
    pub flags: Vec<&'static str>,
    pub name: String,
    pub granularity: u64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Specific {
    pub compat: &'static str,
    pub compression_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BitmapInfo>>,
    pub refcount_bits: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FormatSpecific {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub data: Qcow2Specific,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    pub filename: String,
    pub format: &'static str,
    pub virtual_size: u64,
    pub actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    pub dirty_flag: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
}

/// Info of one layer of a chain (index 0 = top).
pub fn layer_info(chain: &Chain, index: usize) -> Result<ImageInfo> {
    let layer = &chain.layers()[index];
    let actual_size = match layer {
        Layer::Qcow2(q) => q.storage().allocated_bytes().unwrap_or(0),
        Layer::Raw(r) => r.storage().allocated_bytes().unwrap_or(0),
    };
    let mut info = ImageInfo {
        filename: layer.path().to_string(),
        format: layer.format().name(),
        virtual_size: layer.virtual_size(),
        actual_size,
        cluster_size: None,
        dirty_flag: false,
        backing_filename: None,
        full_backing_filename: None,
        backing_filename_format: None,
        snapshots: Vec::new(),
        format_specific: None,
    };
    let Layer::Qcow2(q) = layer else {
        return Ok(info);
    };
    let h = q.header();
    info.cluster_size = Some(h.cluster_size());
    info.dirty_flag = h.is_dirty();
    if let Some(b) = &h.backing_file {
        info.backing_filename = Some(b.clone());
        info.full_backing_filename = Some(match chain.layers().get(index + 1) {
            Some(l) => l.path().to_string(),
            None => {
                let dir = std::path::Path::new(q.path()).parent();
                crate::image::resolve_relative(dir, b).display().to_string()
            }
        });
        info.backing_filename_format = h.backing_format().map(str::to_string);
    }
    info.snapshots = q
        .snapshots()?
        .into_iter()
        .map(|s| SnapshotInfo {
            id: s.id,
            name: s.name,
            vm_state_size: s.vm_state_size,
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
            icount: s.icount.filter(|&i| i != -1),
        })
        .collect();
    let v3 = h.version >= 3;
    let bitmaps = if v3 && h.bitmaps().is_some() {
        Some(
            q.bitmaps()?
                .into_iter()
                .map(|b| BitmapInfo {
                    flags: b.flag_names(),
                    granularity: b.granularity(),
                    name: b.name,
                })
                .collect(),
        )
    } else {
        None
    };
    info.format_specific = Some(FormatSpecific {
        kind: "qcow2",
        data: Qcow2Specific {
            compat: if v3 { "1.1" } else { "0.10" },
            compression_type: match h.compression_type {
                CompressionType::Zlib => "zlib",
                CompressionType::Zstd => "zstd",
            },
            lazy_refcounts: v3.then(|| h.lazy_refcounts()),
            bitmaps,
            refcount_bits: h.refcount_bits(),
            data_file: h
                .data_file()
                .filter(|_| h.has_data_file())
                .map(str::to_string),
            data_file_raw: h.has_data_file().then(|| h.data_file_raw()),
            corrupt: v3.then(|| h.is_corrupt()),
            extended_l2: v3.then(|| h.extended_l2()),
        },
    });
    Ok(info)
}

/// qemu-img's human-readable sizes: "1 MiB", "216 KiB", "1.5 GiB".
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        return format!("{n} B");
    }
    // qemu prints 3 significant digits
    let s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s} {}", UNITS[u])
}

/// Formats a VM clock value the way qemu-img 10 does: HHHH:MM:SS.mmm.
pub fn format_vm_clock(nsec: u64) -> String {
    let ms = nsec / 1_000_000;
    let secs = ms / 1000;
    format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        ms % 1000
    )
}

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

/// `YYYY-MM-DD HH:MM:SS` in UTC.
pub fn format_utc(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(human_size(2097152), "2 MiB");
        assert_eq!(human_size(221184), "216 KiB");
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1536), "1.5 KiB");
    }

    #[test]
    fn dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_utc(1795680325), "2026-11-26 08:05:25");
    }
}
