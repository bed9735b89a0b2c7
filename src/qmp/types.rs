//! Typed replies of the QMP commands used (only the fields we read).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize)]
pub struct VersionTriple {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VersionInfo {
    pub qemu: VersionTriple,
    #[serde(default)]
    pub package: String,
}

impl VersionInfo {
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.qemu.major, self.qemu.minor) >= (major, minor)
    }

    pub fn text(&self) -> String {
        format!(
            "{}.{}.{}",
            self.qemu.major, self.qemu.minor, self.qemu.micro
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct StatusInfo {
    pub status: String,
    #[serde(default)]
    pub running: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DirtyBitmap {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub recording: bool,
    #[serde(default)]
    pub persistent: bool,
    #[serde(default)]
    pub busy: bool,
    #[serde(default)]
    pub granularity: u64,
    #[serde(default)]
    pub count: u64,
    #[serde(default)]
    pub inconsistent: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ImageInfo {
    #[serde(default)]
    pub filename: String,
    #[serde(default)]
    pub format: String,
    #[serde(rename = "virtual-size", default)]
    pub virtual_size: u64,
    #[serde(rename = "cluster-size", default)]
    pub cluster_size: Option<u64>,
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
    #[serde(rename = "backing-image", default)]
    pub backing_image: Option<Box<ImageInfo>>,
    #[serde(rename = "format-specific", default)]
    pub format_specific: Option<serde_json::Value>,
}

impl ImageInfo {
    /// qcow2 compat level ("0.10" or "1.1") when known.
    pub fn compat(&self) -> Option<String> {
        self.format_specific
            .as_ref()?
            .get("data")?
            .get("compat")?
            .as_str()
            .map(str::to_string)
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.format_specific
            .as_ref()
            .and_then(|f| f.get("data")?.get("lazy-refcounts")?.as_bool())
            .unwrap_or(false)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Inserted {
    pub file: String,
    #[serde(rename = "node-name", default)]
    pub node_name: Option<String>,
    pub drv: String,
    #[serde(default)]
    pub ro: bool,
    #[serde(default)]
    pub backing_file: Option<String>,
    #[serde(default)]
    pub backing_file_depth: u32,
    pub image: ImageInfo,
    #[serde(rename = "dirty-bitmaps", default)]
    pub dirty_bitmaps: Vec<DirtyBitmap>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct BlockInfo {
    pub device: String,
    #[serde(default)]
    pub qdev: Option<String>,
    #[serde(default)]
    pub inserted: Option<Inserted>,
    #[serde(rename = "type", default)]
    pub kind: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct NamedNode {
    #[serde(rename = "node-name")]
    pub node_name: String,
    pub drv: String,
    pub file: String,
    #[serde(default)]
    pub ro: bool,
    pub image: ImageInfo,
    #[serde(rename = "dirty-bitmaps", default)]
    pub dirty_bitmaps: Vec<DirtyBitmap>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BlockJob {
    pub device: String,
    #[serde(default)]
    pub len: u64,
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub status: String,
}
