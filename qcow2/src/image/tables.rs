//! Reading an image's metadata tables from storage: the header, the L1 table (and any table of
//! big-endian words), the snapshot table. Every size read from the file is bounded first.

use crate::error::{Error, FormatError, IoContext, Result};
use crate::format::entry;
use crate::format::header::{self, Header};
use crate::format::snapshot::{self, Snapshot};
use crate::storage::Storage;
use byteorder::{BigEndian as BE, ByteOrder};

pub(crate) fn fmt_err(path: &str) -> impl Fn(FormatError) -> Error + '_ {
    move |e| Error::invalid(path, e.0)
}

/// Reads a table of big-endian u64 entries. Only the part inside the file is read and kept:
/// entries past the end of the file are zero, so callers treat missing entries as 0. This
/// bounds memory by the file's real size whatever the header claims.
pub fn read_table(
    storage: &dyn Storage,
    path: &str,
    what: &'static str,
    offset: u64,
    entries: u64,
    file_len: u64,
) -> Result<Vec<u64>> {
    let in_file = file_len.saturating_sub(offset) / 8;
    let n = entries.min(in_file) as usize;
    let mut raw = vec![0u8; n * 8];
    storage.read_at(&mut raw, offset).at(path, what, offset)?;
    let mut out = vec![0u64; n];
    BE::read_u64_into(&raw, &mut out);
    Ok(out)
}

/// Rejects an active L1 table whose entries point into the header or share one L2 table:
/// never valid, and a hostile image could otherwise make one small L2 table stand for an
/// enormous disk.
pub(crate) fn check_l1(l1: &[u64], h: &Header, path: &str) -> Result<()> {
    let mut seen = std::collections::HashMap::new();
    for (i, &e) in l1.iter().enumerate() {
        let off = entry::l1_l2_offset(e);
        if off == 0 {
            continue;
        }
        if off < h.cluster_size() {
            return Err(Error::invalid(
                path,
                format!("L1 entry {i} points into the header (L2 table offset {off:#x})"),
            ));
        }
        if let Some(j) = seen.insert(off, i) {
            return Err(Error::invalid(
                path,
                format!("L1 entries {j} and {i} share the L2 table at {off:#x} (image is corrupt)"),
            ));
        }
    }
    Ok(())
}

/// Reads and parses cluster 0.
pub fn read_header(storage: &dyn Storage, path: &str) -> Result<Header> {
    let file_len = storage.len().at(path, "getting file length", 0)?;
    let mut first = [0u8; header::V3_HEADER_LEN as usize];
    storage
        .read_at(&mut first, 0)
        .at(path, "reading header", 0)?;
    if file_len < header::V2_HEADER_LEN as u64 {
        return Err(Error::invalid(
            path,
            format!("file too short for a qcow2 header ({file_len} bytes)"),
        ));
    }
    let cluster_bits = Header::peek_cluster_bits(&first).map_err(fmt_err(path))?;
    let mut cluster0 = vec![0u8; 1 << cluster_bits];
    storage
        .read_at(&mut cluster0, 0)
        .at(path, "reading header", 0)?;
    let h = Header::parse(&cluster0).map_err(|e| {
        // Name unknown incompatible features from the image's own feature table.
        Error::invalid(path, e.0)
    })?;
    Ok(h)
}

pub(crate) fn read_snapshot_table(
    storage: &dyn Storage,
    h: &Header,
    path: &str,
) -> Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    if h.nb_snapshots == 0 {
        return Ok(out);
    }
    let file_len = storage.len().at(path, "getting file length", 0)?;
    let mut pos = h.snapshots_offset;
    for i in 0..h.nb_snapshots {
        if i > 0 {
            pos = pos.div_ceil(8) * 8;
        }
        if pos - h.snapshots_offset > snapshot::MAX_TABLE_BYTES {
            return Err(Error::invalid(path, "snapshot table too large"));
        }
        if pos + snapshot::FIXED_LEN as u64 > file_len {
            return Err(Error::invalid(
                path,
                format!("snapshot table entry {i} lies past the end of the file"),
            ));
        }
        let mut fixed = [0u8; snapshot::FIXED_LEN];
        storage
            .read_at(&mut fixed, pos)
            .at(path, "reading snapshot table", pos)?;
        let (extra, id_len, name_len) = Snapshot::parse_fixed(&fixed).map_err(fmt_err(path))?;
        let total = snapshot::FIXED_LEN + extra as usize + id_len as usize + name_len as usize;
        let mut entry = vec![0u8; total];
        storage
            .read_at(&mut entry, pos)
            .at(path, "reading snapshot table", pos)?;
        let s = Snapshot::parse(&entry).map_err(fmt_err(path))?;
        if h.version >= 3 && s.extra.len() < 16 {
            return Err(Error::invalid(
                path,
                format!("snapshot {} has too little extra data for a v3 image", s.id),
            ));
        }
        if s.l1_size as u64 * 8 > header::MAX_L1_BYTES || s.l1_table_offset % h.cluster_size() != 0
        {
            return Err(Error::invalid(
                path,
                format!("snapshot {} has an invalid L1 table", s.id),
            ));
        }
        out.push(s);
        pos += total as u64;
    }
    Ok(out)
}
