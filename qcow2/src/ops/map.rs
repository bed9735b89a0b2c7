//! `map`: the allocation of a chain in qemu-img map's terms.

use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::mapping::{Extent, ExtentKind};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: usize,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl MapEntry {
    pub fn from_extent(e: &Extent) -> MapEntry {
        let (zero, data, compressed) = match e.kind {
            ExtentKind::Data { .. } => (false, true, false),
            ExtentKind::Compressed { .. } => (false, true, true),
            ExtentKind::Zero { .. } | ExtentKind::Unallocated => (true, false, false),
        };
        MapEntry {
            start: e.start,
            length: e.len,
            depth: e.depth,
            present: e.present(),
            zero,
            data,
            compressed,
            offset: e.host_offset(),
        }
    }

    fn try_merge(&mut self, n: &MapEntry) -> bool {
        let same = self.start + self.length == n.start
            && self.depth == n.depth
            && self.present == n.present
            && self.zero == n.zero
            && self.data == n.data
            && self.compressed == n.compressed
            && match (self.offset, n.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            };
        if same {
            self.length += n.length;
        }
        same
    }

    /// One line of qemu-img's JSON map output.
    pub fn json_line(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start, self.length, self.depth, self.present, self.zero, self.data, self.compressed
        );
        if let Some(o) = self.offset {
            s.push_str(&format!(", \"offset\": {o}"));
        }
        s.push('}');
        s
    }
}

/// Calls `f` with each merged map entry of the whole disk, in order.
pub fn for_each_entry(chain: &Chain, mut f: impl FnMut(&MapEntry) -> Result<()>) -> Result<()> {
    let mut pending: Option<MapEntry> = None;
    chain.for_each_extent(0, chain.virtual_size(), |e| {
        let m = MapEntry::from_extent(e);
        if pending.as_mut().is_some_and(|p| p.try_merge(&m)) {
            return Ok(());
        }
        match pending.replace(m) {
            Some(p) => f(&p),
            None => Ok(()),
        }
    })?;
    if let Some(p) = pending {
        f(&p)?;
    }
    Ok(())
}

/// Writes the JSON map (qemu-img's line layout) to `out`.
pub fn write_json(chain: &Chain, out: &mut dyn std::io::Write) -> Result<()> {
    let mut first = true;
    let io = |e| Error::io("<stdout>", "writing", 0, e);
    for_each_entry(chain, |m| {
        let prefix = if first { "[" } else { ",\n" };
        first = false;
        write!(out, "{prefix}{}", m.json_line()).map_err(io)
    })?;
    if first {
        write!(out, "[").map_err(io)?;
    }
    writeln!(out, "]").map_err(io)
}

/// Writes the human map: data ranges with their host offset and file.
pub fn write_human(chain: &Chain, out: &mut dyn std::io::Write) -> Result<()> {
    let io = |e| Error::io("<stdout>", "writing", 0, e);
    writeln!(
        out,
        "{:<16}{:<16}{:<16}File",
        "Offset", "Length", "Mapped to"
    )
    .map_err(io)?;
    let mut pending: Option<(u64, u64, u64, usize)> = None;
    let file_of = |depth: usize| -> String {
        let layer = &chain.layers()[depth];
        if let Some(q) = layer.as_qcow2() {
            if q.header().has_data_file() {
                if let Some(d) = q.header().data_file() {
                    return d.to_string();
                }
            }
        }
        layer.path().to_string()
    };
    let emit = |p: (u64, u64, u64, usize), out: &mut dyn std::io::Write| {
        writeln!(
            out,
            "{:<16}{:<16}{:<16}{}",
            format!("{:#x}", p.0).replace("0x0", "0"),
            format!("{:#x}", p.1),
            format!("{:#x}", p.2),
            file_of(p.3)
        )
        .map_err(io)
    };
    chain.for_each_extent(0, chain.virtual_size(), |e| match e.kind {
        ExtentKind::Compressed { .. } => Err(Error::bad_request(
            "File contains external, encrypted or compressed clusters.",
        )),
        ExtentKind::Data { host } => {
            if let Some(p) = pending.as_mut() {
                if p.0 + p.1 == e.start && p.2 + p.1 == host && p.3 == e.depth {
                    p.1 += e.len;
                    return Ok(());
                }
            }
            if let Some(p) = pending.replace((e.start, e.len, host, e.depth)) {
                emit(p, out)?;
            }
            Ok(())
        }
        _ => Ok(()),
    })?;
    if let Some(p) = pending {
        emit(p, out)?;
    }
    Ok(())
}

/// Calls `f` with every extent of `chain` in guest order, mapped a gibibyte at a time so
/// memory stays bounded whatever the disk's size.
pub fn for_each_extent(chain: &Chain, mut f: impl FnMut(&Extent)) -> Result<()> {
    const STEP: u64 = 1 << 30;
    let size = chain.virtual_size();
    let mut offset = 0;
    while offset < size {
        let len = STEP.min(size - offset);
        chain.map(offset, len)?.iter().for_each(&mut f);
        offset += len;
    }
    Ok(())
}

/// Guest bytes that map to data (plain or compressed) in `chain`: what a copy of it reads,
/// and at most what it writes.
pub fn data_bytes(chain: &Chain) -> Result<u64> {
    let mut total = 0;
    for_each_extent(chain, |e| {
        if !e.reads_as_zero() {
            total += e.len;
        }
    })?;
    Ok(total)
}
