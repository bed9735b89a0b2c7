//! Which disks a VM has, from `query-block` (one entry per guest device) and
//! `query-named-block-nodes` (every node): the format node under the device, its image
//! file, size, bitmaps, and the qdev path used to switch the device to a filter.

use crate::qmp::types::{BlockInfo, DirtyBitmap, NamedNode};
use crate::qmp::{Qmp, QmpError};
use serde::Serialize;
use serde_json::json;

/// Prefix of every node and job this tool creates (short: node names are ≤ 31 chars).
pub const NODE_PREFIX: &str = "qmpb-";

#[derive(Debug, Clone, Serialize)]
pub struct Disk {
    /// BlockBackend name ("" for devices attached with -blockdev).
    pub device: String,
    /// QOM path of the device (for qom-set); None for devices without one (pflash).
    pub qdev: Option<String>,
    /// The format node the device uses (qcow2/raw).
    pub node: String,
    pub format: String,
    /// The image file behind the format node.
    pub filename: String,
    /// Backing file of the image, if any.
    pub backing: Option<String>,
    pub virtual_size: u64,
    pub cluster_size: Option<u64>,
    /// qcow2 compat ("0.10"/"1.1").
    pub compat: Option<String>,
    pub lazy_refcounts: bool,
    pub read_only: bool,
    pub pflash: bool,
    pub bitmaps: Vec<DirtyBitmap>,
    /// Target directory / file name part: the image file's base name.
    pub name: String,
}

impl Disk {
    /// Names by which --include/--exclude can select the disk.
    pub fn matches(&self, id: &str) -> bool {
        let qdev_id = self
            .qdev
            .as_deref()
            .map(|q| {
                q.trim_end_matches("/virtio-backend")
                    .rsplit('/')
                    .next()
                    .unwrap_or(q)
                    .to_string()
            })
            .unwrap_or_default();
        id == self.device
            || id == self.node
            || id == self.name
            || (!qdev_id.is_empty() && id == qdev_id)
            || self.qdev.as_deref() == Some(id)
    }

    pub fn is_raw(&self) -> bool {
        self.format == "raw"
    }

    /// Whether QEMU can store a persistent bitmap in this disk's image.
    pub fn can_persist_bitmaps(&self) -> bool {
        self.format == "qcow2" && self.compat.as_deref() != Some("0.10")
    }

    pub fn bitmap(&self, name: &str) -> Option<&DirtyBitmap> {
        self.bitmaps
            .iter()
            .find(|b| b.name.as_deref() == Some(name))
    }

    /// A human label: device id or node name.
    pub fn label(&self) -> String {
        if !self.device.is_empty() {
            self.device.clone()
        } else if let Some(q) = &self.qdev {
            q.trim_end_matches("/virtio-backend")
                .rsplit('/')
                .next()
                .unwrap_or(q)
                .to_string()
        } else {
            self.node.clone()
        }
    }
}

/// Lists the VM's disks. Devices without media and nodes of ours left by an interrupted run
/// are reported as such by the caller.
pub async fn discover(qmp: &Qmp) -> Result<Vec<Disk>, QmpError> {
    let blocks: Vec<BlockInfo> = qmp.query("query-block", json!({})).await?;
    let nodes: Vec<NamedNode> = qmp
        .query("query-named-block-nodes", json!({"flat": true}))
        .await?;
    let mut disks = Vec::new();
    for b in blocks {
        let Some(ins) = b.inserted else { continue };
        let Some(mut node) = ins.node_name.clone() else {
            continue;
        };
        let mut format = ins.drv.clone();
        let mut image = ins.image.clone();
        let mut bitmaps = ins.dirty_bitmaps.clone();
        // A filter above the format node (throttle, or a copy-before-write of ours left
        // behind): find the format node holding the same image.
        if !matches!(format.as_str(), "qcow2" | "raw") {
            if let Some(n) = nodes.iter().find(|n| {
                matches!(n.drv.as_str(), "qcow2" | "raw")
                    && n.image.filename == ins.image.filename
                    && !n.node_name.starts_with(NODE_PREFIX)
            }) {
                node = n.node_name.clone();
                format = n.drv.clone();
                image = n.image.clone();
                bitmaps = n.dirty_bitmaps.clone();
            }
        }
        let bitmaps: Vec<DirtyBitmap> = bitmaps.into_iter().filter(|b| b.name.is_some()).collect();
        let pflash = b.device.starts_with("pflash") || ins.file.contains("OVMF");
        let filename = image.filename.clone();
        let name = std::path::Path::new(&filename)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| node.trim_start_matches('#').to_string());
        disks.push(Disk {
            device: b.device.clone(),
            qdev: b.qdev.clone().filter(|q| !q.is_empty()),
            node,
            format,
            filename,
            backing: image.backing_filename.clone().or(ins.backing_file.clone()),
            virtual_size: image.virtual_size,
            cluster_size: image.cluster_size,
            compat: image.compat(),
            lazy_refcounts: image.lazy_refcounts(),
            read_only: ins.ro,
            pflash,
            bitmaps,
            name,
        });
    }
    Ok(disks)
}

/// Nodes of ours present in QEMU (left by an interrupted run when no backup is running).
pub async fn leftover_nodes(qmp: &Qmp) -> Result<Vec<NamedNode>, QmpError> {
    let nodes: Vec<NamedNode> = qmp
        .query("query-named-block-nodes", json!({"flat": true}))
        .await?;
    Ok(nodes
        .into_iter()
        .filter(|n| n.node_name.starts_with(NODE_PREFIX))
        .collect())
}
