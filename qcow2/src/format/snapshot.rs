//! The internal snapshot table.

use crate::error::bail_format;
use crate::error::FormatError;
use byteorder::{BigEndian as BE, ByteOrder};

pub const FIXED_LEN: usize = 40;
pub const MAX_EXTRA: u32 = 1024;
/// QEMU's limit on the total size of the snapshot table.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    /// Virtual disk size at snapshot time (extra data), if recorded.
    pub disk_size: Option<u64>,
    /// -1 when icount was off; None if not recorded.
    pub icount: Option<i64>,
    /// The extra data as stored, kept so unknown fields survive a rewrite.
    pub extra: Vec<u8>,
}

impl Snapshot {
    /// Parses the fixed part; returns the entry and its total length (unpadded).
    /// `fixed` must hold 40 bytes; `rest` the extra data, id and name that follow.
    pub fn parse_fixed(fixed: &[u8]) -> Result<(u32, u16, u16), FormatError> {
        let id_len = BE::read_u16(&fixed[12..14]);
        let name_len = BE::read_u16(&fixed[14..16]);
        let extra = BE::read_u32(&fixed[36..40]);
        if extra > MAX_EXTRA {
            bail_format!("snapshot extra data too large ({extra} bytes)");
        }
        Ok((extra, id_len, name_len))
    }

    pub fn parse(entry: &[u8]) -> Result<Snapshot, FormatError> {
        if entry.len() < FIXED_LEN {
            bail_format!("snapshot entry truncated");
        }
        let (extra_len, id_len, name_len) = Self::parse_fixed(&entry[..FIXED_LEN])?;
        let need = FIXED_LEN + extra_len as usize + id_len as usize + name_len as usize;
        if entry.len() < need {
            bail_format!("snapshot entry truncated");
        }
        let extra = entry[FIXED_LEN..FIXED_LEN + extra_len as usize].to_vec();
        let ids = FIXED_LEN + extra_len as usize;
        let id = String::from_utf8_lossy(&entry[ids..ids + id_len as usize]).into_owned();
        let ns = ids + id_len as usize;
        let name = String::from_utf8_lossy(&entry[ns..ns + name_len as usize]).into_owned();
        let mut vm_state_size = BE::read_u32(&entry[32..36]) as u64;
        if extra.len() >= 8 {
            vm_state_size = BE::read_u64(&extra[0..8]);
        }
        let disk_size = (extra.len() >= 16).then(|| BE::read_u64(&extra[8..16]));
        let icount = (extra.len() >= 24).then(|| BE::read_u64(&extra[16..24]) as i64);
        Ok(Snapshot {
            l1_table_offset: BE::read_u64(&entry[0..8]),
            l1_size: BE::read_u32(&entry[8..12]),
            id,
            name,
            date_sec: BE::read_u32(&entry[16..20]),
            date_nsec: BE::read_u32(&entry[20..24]),
            vm_clock_nsec: BE::read_u64(&entry[24..32]),
            vm_state_size,
            disk_size,
            icount,
            extra,
        })
    }

    /// Serialised entry (without the 8-byte alignment padding).
    pub fn encode(&self) -> Vec<u8> {
        let mut extra = self.extra.clone();
        if extra.len() < 24 {
            extra.resize(24, 0);
        }
        BE::write_u64(&mut extra[0..8], self.vm_state_size);
        BE::write_u64(&mut extra[8..16], self.disk_size.unwrap_or(0));
        BE::write_u64(&mut extra[16..24], self.icount.unwrap_or(-1) as u64);
        let mut out = vec![0u8; FIXED_LEN];
        BE::write_u64(&mut out[0..8], self.l1_table_offset);
        BE::write_u32(&mut out[8..12], self.l1_size);
        BE::write_u16(&mut out[12..14], self.id.len() as u16);
        BE::write_u16(&mut out[14..16], self.name.len() as u16);
        BE::write_u32(&mut out[16..20], self.date_sec);
        BE::write_u32(&mut out[20..24], self.date_nsec);
        BE::write_u64(&mut out[24..32], self.vm_clock_nsec);
        BE::write_u32(
            &mut out[32..36],
            self.vm_state_size.min(u32::MAX as u64) as u32,
        );
        BE::write_u32(&mut out[36..40], extra.len() as u32);
        out.extend_from_slice(&extra);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out
    }
}

/// Size of a whole table: entries aligned to 8 bytes between each other, not after the last.
pub fn table_size(entries: &[Vec<u8>]) -> u64 {
    let mut size = 0u64;
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            size = size.div_ceil(8) * 8;
        }
        size += e.len() as u64;
    }
    size
}
