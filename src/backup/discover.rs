//! Which disks a VM has, from `query-block` (one entry per guest device) and
//! `query-named-block-nodes` (every node): the format node under the device, its image
//! file, size, bitmaps, and the qdev path used to switch the device to a filter.

use crate::qmp::client::{Qmp, QmpError};
use crate::qmp::types::{BlockInfo, DirtyBitmap, NamedNode};
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
    /// Target directory / file name part: the image file's base name made a safe path
    /// component, with a suffix when another disk's would be the same (see [`assign_names`]).
    pub name: String,
    /// The image file's base name as QEMU reports it (for --include/--exclude).
    pub file_base: String,
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
            || (!self.file_base.is_empty() && id == self.file_base)
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
        check_reported_sizes(&b.device, &node, &image)?;
        let pflash = b.device.starts_with("pflash") || ins.file.contains("OVMF");
        let filename = image.filename.clone();
        let file_base = std::path::Path::new(&filename)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
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
            name: String::new(),
            file_base,
        });
    }
    assign_names(&mut disks);
    Ok(disks)
}

/// The longest name part we give a disk: a backup's file name adds up to 40 bytes
/// (`FULL-<unix time>-`, `.manifest.tmp`, `.partial.failed-<time>`) and must stay within
/// the 255 bytes of a file name.
const MAX_NAME: usize = 200;

fn is_safe_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// Makes `raw` one safe path component. A name that is already safe (letters, digits,
/// `.`, `_`, `-`; not `.` or `..`; not empty) stays exactly as it is, so existing chains
/// continue; any other byte becomes `_`. None when nothing usable is left (no letter or
/// digit). Names longer than [`MAX_NAME`] are cut and end in a checksum of the whole name.
pub fn safe_component(raw: &str) -> Option<String> {
    let mapped: String = raw
        .bytes()
        .map(|b| if is_safe_byte(b) { b as char } else { '_' })
        .collect();
    if !mapped.bytes().any(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    if mapped.len() <= MAX_NAME {
        return Some(mapped);
    }
    let crc = crc32fast::hash(raw.as_bytes());
    Some(format!("{}_{crc:08x}", &mapped[..MAX_NAME - 9]))
}

impl Disk {
    /// The qdev id of a device created with `-device …,id=ID` (`/machine/peripheral/ID`).
    fn named_qdev_id(&self) -> Option<&str> {
        let q = self.qdev.as_deref()?;
        let rest = q.strip_prefix("/machine/peripheral/")?;
        rest.split('/').next().filter(|s| !s.is_empty())
    }

    /// An identifier of the disk that stays the same across QEMU restarts with the same
    /// configuration: its qdev id, else its device (drive) name, else a node name the user
    /// gave — never an auto-generated node name (`#block123`), which changes at every start.
    fn stable_id(&self) -> Option<String> {
        let anonymous_qdev = self.qdev.as_deref().map(|q| {
            q.trim_end_matches("/virtio-backend")
                .rsplit('/')
                .next()
                .unwrap_or(q)
        });
        [
            self.named_qdev_id(),
            Some(self.device.as_str()).filter(|d| !d.is_empty()),
            Some(self.node.as_str()).filter(|n| !n.starts_with('#')),
            anonymous_qdev,
        ]
        .into_iter()
        .flatten()
        .find_map(safe_component)
    }
}

/// `disk.qcow2` + `virtio0` → `disk-virtio0.qcow2` (the suffix before a short extension).
fn with_suffix(name: &str, suffix: &str) -> String {
    match name.rsplit_once('.') {
        Some((stem, ext))
            if !stem.is_empty()
                && !ext.is_empty()
                && ext.len() <= 8
                && ext.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            format!("{stem}-{suffix}.{ext}")
        }
        _ => format!("{name}-{suffix}"),
    }
}

/// Gives every disk the name of its backup directory (and, with --no-subdir, of its files):
/// the image file's base name made safe ([`safe_component`]); a disk whose base name has
/// nothing usable falls back to its stable id. Disks whose names collide each get their
/// stable id as a suffix, so `/a/disk.qcow2` and `/b/disk.qcow2` on devices `virtio0` and
/// `virtio1` go to `disk-virtio0.qcow2/` and `disk-virtio1.qcow2/`. A disk whose name is
/// unique keeps it, so its chain continues.
pub fn assign_names(disks: &mut [Disk]) {
    for (i, d) in disks.iter_mut().enumerate() {
        d.name = safe_component(&d.file_base)
            .or_else(|| d.stable_id())
            .unwrap_or_else(|| format!("disk{i}"));
    }
    let base: Vec<String> = disks.iter().map(|d| d.name.clone()).collect();
    for (i, d) in disks.iter_mut().enumerate() {
        if base.iter().filter(|n| **n == base[i]).count() > 1 {
            let id = d.stable_id().unwrap_or_else(|| format!("disk{i}"));
            d.name = safe_component(&with_suffix(&base[i], &id)).unwrap_or(id);
        }
    }
    // Still equal (a disk's own name happens to be another's suffixed one): number them.
    for i in 1..disks.len() {
        let mut n = 2;
        let stem = disks[i].name.clone();
        while disks[..i].iter().any(|d| d.name == disks[i].name) {
            disks[i].name = with_suffix(&stem, &n.to_string());
            n += 1;
        }
    }
}

/// The largest virtual size a disk can have: QEMU's own limit (INT64_MAX rounded down to
/// 512 bytes). A qcow2 target may hold less; creating it says so.
pub const MAX_VIRTUAL_SIZE: u64 = i64::MAX as u64 & !511;

/// Sizes QEMU reports are checked before any arithmetic: a peer that reports 2^64−1 gets a
/// clear error, not a wrapped size and a 0-byte backup.
fn check_reported_sizes(
    device: &str,
    node: &str,
    image: &crate::qmp::types::ImageInfo,
) -> Result<(), QmpError> {
    let who = if device.is_empty() { node } else { device };
    if image.virtual_size > MAX_VIRTUAL_SIZE {
        return Err(QmpError::Protocol(format!(
            "disk {who}: QEMU reports a virtual size of {} bytes, more than any disk can have ({MAX_VIRTUAL_SIZE}); refusing to back it up",
            image.virtual_size
        )));
    }
    if let Some(cs) = image.cluster_size {
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(QmpError::Protocol(format!(
                "disk {who}: QEMU reports a cluster size of {cs} bytes, which no qcow2 image has (a power of two from 512 bytes to 2 MiB); refusing to back it up"
            )));
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use crate::backup::discover::*;

    fn disk(file: &str, device: &str, qdev: Option<&str>, node: &str) -> Disk {
        Disk {
            device: device.into(),
            qdev: qdev.map(str::to_string),
            node: node.into(),
            format: "qcow2".into(),
            filename: file.into(),
            backing: None,
            virtual_size: 1 << 20,
            cluster_size: Some(65536),
            compat: None,
            lazy_refcounts: false,
            read_only: false,
            pflash: false,
            bitmaps: Vec::new(),
            name: String::new(),
            file_base: std::path::Path::new(file)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    #[test]
    fn safe_names_stay_and_others_are_mapped() {
        for ok in ["disk.qcow2", "a-b_c.1", "X"] {
            assert_eq!(safe_component(ok).as_deref(), Some(ok));
        }
        assert_eq!(safe_component("a b/c").as_deref(), Some("a_b_c"));
        assert_eq!(
            safe_component("../../../../B").as_deref(),
            Some(".._.._.._.._B")
        );
        assert_eq!(safe_component("dïsk").as_deref(), Some("d__sk"));
        for bad in ["", ".", "..", "/", "../..", "\0", "#", "___"] {
            assert_eq!(safe_component(bad), None, "{bad:?}");
        }
        let long = "x".repeat(300);
        let s = safe_component(&long).unwrap();
        assert_eq!(s.len(), MAX_NAME);
        assert_ne!(s, safe_component(&"x".repeat(301)).unwrap());
    }

    #[test]
    fn names_fall_back_to_a_stable_id() {
        let mut d = vec![
            disk(
                "",
                "",
                Some("/machine/peripheral/virtio0/virtio-backend"),
                "../../B",
            ),
            disk("/", "drive-x", None, "#block123"),
            disk("..", "", None, "/abs/path"),
            disk("", "", None, "#block9"),
        ];
        assign_names(&mut d);
        let names: Vec<&str> = d.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["virtio0", "drive-x", "_abs_path", "disk3"]);
    }

    #[test]
    fn colliding_base_names_get_their_device_ids() {
        let mut d = vec![
            disk(
                "/a/disk.qcow2",
                "",
                Some("/machine/peripheral/virtio0/virtio-backend"),
                "#b1",
            ),
            disk(
                "/b/disk.qcow2",
                "drive1",
                Some("/machine/peripheral-anon/device[3]"),
                "#b2",
            ),
            disk("/c/other", "", None, "n1"),
            disk("/d/other", "", None, "#b4"),
            disk("/e/unique.qcow2", "", None, "#b5"),
        ];
        assign_names(&mut d);
        let names: Vec<&str> = d.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "disk-virtio0.qcow2",
                "disk-drive1.qcow2",
                "other-n1",
                "other-disk3",
                "unique.qcow2"
            ]
        );
        // Include/exclude still accept the file's own base name.
        assert!(d[0].matches("disk.qcow2"));
    }

    #[test]
    fn names_stay_unique_when_a_suffix_meets_a_real_name() {
        let mut d = vec![
            disk("/a/disk.qcow2", "v0", None, "#1"),
            disk("/b/disk.qcow2", "v1", None, "#2"),
            disk("/c/disk-v0.qcow2", "v2", None, "#3"),
        ];
        assign_names(&mut d);
        let names: Vec<&str> = d.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["disk-v0.qcow2", "disk-v1.qcow2", "disk-v0-2.qcow2"]);
    }
}
