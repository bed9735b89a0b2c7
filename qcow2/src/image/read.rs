//! Mapping and reading one image's guest ranges: what a range of this layer is (the same
//! [`ExtentKind`] vocabulary a chain's map uses), and its bytes.

use super::tables::{fmt_err, read_snapshot_table};
use super::{Backing, Qcow2};
use crate::compress;
use crate::error::{Error, IoContext, Result};
use crate::format::bitmap::{self, BitmapEntry};
use crate::format::entry::{self, ClusterKind, CompressedDesc};
use crate::format::snapshot::Snapshot;
use crate::mapping::ExtentKind;
use std::sync::Arc;

impl Qcow2 {
    /// The longest run starting at `guest` (at most `max_len` bytes, not crossing one L2
    /// table) whose units are all of one kind, with contiguous host offsets for data.
    /// `Unallocated` means the backing file decides.
    pub fn block_status(&self, guest: u64, max_len: u64) -> Result<(u64, ExtentKind)> {
        let h = &self.header;
        let geo = self.geometry;
        let unit_bits = geo.unit_bits();
        let unit = 1u64 << unit_bits;
        let l1_index = geo.table_indexes(geo.cluster_index(guest)).l1;
        let table_start = geo.l2_start(l1_index);
        let limit = max_len.min(geo.l2_end(guest) - guest);
        if limit == 0 {
            return Err(Error::internal(&self.path, "zero-length block status"));
        }
        let l1e = self.l1.get(l1_index).copied().unwrap_or(0);
        let l2_offset = entry::l1_l2_offset(l1e);
        if l2_offset == 0 {
            return Ok((limit, ExtentKind::Unallocated));
        }
        let table = self.l2_table(l2_offset)?;
        let units_per_cluster = 1u64 << (geo.cluster_bits - unit_bits);
        let first_unit = (guest - table_start) >> unit_bits;
        let unit_kind = |u: u64| -> Result<ClusterKind> {
            let e = self.l2_entry(&table, (u / units_per_cluster) as usize);
            e.kind(
                (u % units_per_cluster) as u32,
                geo.cluster_bits,
                h.version >= 3,
                h.has_data_file(),
            )
            .map_err(|err| {
                Error::invalid(
                    &self.path,
                    format!(
                        "{} (L2 table at {l2_offset:#x}, guest offset {:#x})",
                        err.0,
                        table_start + (u << unit_bits)
                    ),
                )
            })
        };
        let first = unit_kind(first_unit)?;
        let in_unit = guest & (unit - 1);
        let (kind, mut len) = match first {
            ClusterKind::Unallocated => (ExtentKind::Unallocated, unit - in_unit),
            ClusterKind::Zero { host } => (
                ExtentKind::Zero {
                    host: host.map(|x| x + in_unit),
                },
                unit - in_unit,
            ),
            ClusterKind::Data { host } => (
                ExtentKind::Data {
                    host: host + in_unit,
                },
                unit - in_unit,
            ),
            ClusterKind::Compressed(desc) => {
                let in_cluster = geo.offset_in_cluster(guest);
                let len = (geo.cluster_size() - in_cluster).min(limit);
                return Ok((
                    len,
                    ExtentKind::Compressed {
                        desc,
                        offset_in_cluster: in_cluster,
                    },
                ));
            }
        };
        let mut u = first_unit + 1;
        while len < limit {
            let next = unit_kind(u)?;
            let host_delta = (u - first_unit) << unit_bits;
            let same = match (first, next) {
                (ClusterKind::Unallocated, ClusterKind::Unallocated) => true,
                (ClusterKind::Zero { host: None }, ClusterKind::Zero { host: None }) => true,
                (ClusterKind::Zero { host: Some(a) }, ClusterKind::Zero { host: Some(b) })
                | (ClusterKind::Data { host: a }, ClusterKind::Data { host: b }) => {
                    b == a + host_delta
                }
                _ => false,
            };
            if !same {
                break;
            }
            len += unit;
            u += 1;
        }
        Ok((len.min(limit), kind))
    }

    /// Reads guest data that `block_status` reported as `Data` at `host`.
    pub fn read_data(&self, buf: &mut [u8], host: u64) -> Result<()> {
        self.data_storage()
            .read_at(buf, host)
            .at(&self.path, "reading data", host)
    }

    /// Reads part of a compressed cluster.
    pub fn read_compressed(
        &self,
        buf: &mut [u8],
        desc: CompressedDesc,
        offset_in_cluster: u64,
    ) -> Result<()> {
        let cluster = self.decompress_cluster(desc)?;
        let start = offset_in_cluster as usize;
        buf.copy_from_slice(&cluster[start..start + buf.len()]);
        Ok(())
    }

    /// The whole decompressed cluster for a descriptor (the last one is cached).
    pub fn decompress_cluster(&self, desc: CompressedDesc) -> Result<Arc<Vec<u8>>> {
        if let Some((off, data)) = self.lock_decompressed().as_ref() {
            if *off == desc.host_offset {
                return Ok(data.clone());
            }
        }
        let mut input = vec![0u8; desc.len as usize];
        self.storage.read_at(&mut input, desc.host_offset).at(
            &self.path,
            "reading compressed cluster",
            desc.host_offset,
        )?;
        let mut out = vec![0u8; self.cluster_size() as usize];
        compress::decompress(self.header.compression_type, &input, &mut out).map_err(|e| {
            Error::invalid(
                &self.path,
                format!(
                    "compressed cluster at host offset {:#x}: {e}",
                    desc.host_offset
                ),
            )
        })?;
        let out = Arc::new(out);
        *self.lock_decompressed() = Some((desc.host_offset, out.clone()));
        Ok(out)
    }

    /// Reads this image's view of guest bytes: its own clusters, and below them `backing`
    /// (zeros when there is none or past its end). Bytes past the virtual size read as 0.
    pub fn read_view(
        &self,
        buf: &mut [u8],
        offset: u64,
        backing: Option<&dyn Backing>,
    ) -> Result<()> {
        let size = self.virtual_size();
        let end = offset + buf.len() as u64;
        if end > size {
            let keep = size.saturating_sub(offset) as usize;
            buf[keep..].fill(0);
            if keep == 0 {
                return Ok(());
            }
            return self.read_view(&mut buf[..keep], offset, backing);
        }
        let mut pos = offset;
        while pos < end {
            let (n, kind) = self.block_status(pos, end - pos)?;
            let b = &mut buf[(pos - offset) as usize..(pos - offset + n) as usize];
            match kind {
                ExtentKind::Data { host } => self.read_data(b, host)?,
                ExtentKind::Compressed {
                    desc,
                    offset_in_cluster,
                } => self.read_compressed(b, desc, offset_in_cluster)?,
                ExtentKind::Zero { .. } => b.fill(0),
                ExtentKind::Unallocated => match backing {
                    Some(below) => {
                        let inside = below.virtual_size().saturating_sub(pos).min(n) as usize;
                        if inside > 0 {
                            below.read_at(&mut b[..inside], pos)?;
                        }
                        b[inside..].fill(0);
                    }
                    None => b.fill(0),
                },
            }
            pos += n;
        }
        Ok(())
    }

    /// The internal snapshot table.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        read_snapshot_table(self.storage.as_ref(), &self.header, &self.path)
    }

    /// The persistent bitmap directory.
    pub fn bitmaps(&self) -> Result<Vec<BitmapEntry>> {
        let Some(ext) = self.header.bitmaps() else {
            return Ok(Vec::new());
        };
        let file_len = self.file_len()?;
        if ext.directory_offset.saturating_add(ext.directory_size) > file_len {
            return Err(Error::invalid(
                &self.path,
                "bitmap directory lies past the end of the file",
            ));
        }
        let mut dir = vec![0u8; ext.directory_size as usize];
        self.storage.read_at(&mut dir, ext.directory_offset).at(
            &self.path,
            "reading bitmap directory",
            ext.directory_offset,
        )?;
        bitmap::parse_directory(&dir, ext.nb_bitmaps).map_err(fmt_err(&self.path))
    }
}
