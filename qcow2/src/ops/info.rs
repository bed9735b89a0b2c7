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
