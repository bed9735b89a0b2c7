//! The persistent dirty bitmap directory (read side: names, flags, tables for refcounting).

use crate::error::bail_format;
use crate::error::FormatError;
use byteorder::{BigEndian as BE, ByteOrder};

pub const FLAG_IN_USE: u32 = 1 << 0;
pub const FLAG_AUTO: u32 = 1 << 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub kind: u8,
    pub granularity_bits: u8,
    pub name: String,
}

impl BitmapEntry {
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits.min(63)
    }

    pub fn flag_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.flags & FLAG_IN_USE != 0 {
            v.push("in-use");
        }
        if self.flags & FLAG_AUTO != 0 {
            v.push("auto");
        }
        v
    }
}

/// Parses `count` directory entries from `dir`.
pub fn parse_directory(dir: &[u8], count: u32) -> Result<Vec<BitmapEntry>, FormatError> {
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut pos = 0usize;
    for _ in 0..count {
        if pos + 24 > dir.len() {
            bail_format!("bitmap directory truncated");
        }
        let e = &dir[pos..];
        let name_size = BE::read_u16(&e[18..20]) as usize;
        let extra = BE::read_u32(&e[20..24]) as usize;
        if extra > 1 << 20 {
            bail_format!("bitmap extra data too large");
        }
        let total = 24 + extra + name_size;
        if pos + total > dir.len() {
            bail_format!("bitmap directory entry truncated");
        }
        let name = String::from_utf8_lossy(&e[24 + extra..24 + extra + name_size]).into_owned();
        out.push(BitmapEntry {
            table_offset: BE::read_u64(&e[0..8]),
            table_size: BE::read_u32(&e[8..12]),
            flags: BE::read_u32(&e[12..16]),
            kind: e[16],
            granularity_bits: e[17],
            name,
        });
        pos += total.div_ceil(8) * 8;
    }
    Ok(out)
}
