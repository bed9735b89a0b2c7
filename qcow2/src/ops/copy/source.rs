//! What the copy engine's readers read: a window's non-zero data (for copies into a new
//! image or a raw file), or the changes above a layer (for commit). Both map the window
//! first and never read what maps as zeros.

use super::Window;
use crate::chain::Chain;
use crate::error::Result;
use crate::mapping::{Extent, ExtentKind};

/// Bytes `[start, end)` of a window's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: usize,
    pub end: usize,
}

impl ByteRange {
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Guest bytes `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRange {
    pub start: u64,
    pub end: u64,
}

/// A stretch of a window read verbatim from an uncompressed data extent: the writer may
/// clone it from there instead of writing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verbatim {
    /// Position in the window's buffer.
    pub pos: usize,
    pub len: usize,
    /// Chain layer whose data file holds it, at `host`.
    pub layer: usize,
    pub host: u64,
}

/// A window read for copying: where its non-zero data is, at `unit` granularity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataWindow {
    /// Non-zero runs of whole units (the last may be cut by the window's end), in order.
    pub runs: Vec<ByteRange>,
    /// Filled only when asked for: sorted by `pos`, disjoint.
    pub verbatim: Vec<Verbatim>,
}

/// Reads `window` of `chain` into `buf`: only the units touching data or compressed
/// extents are read; those found all zero are left out of `runs` like unmapped ones. `unit`
/// is the output's cluster size (or the hole size of a sparse file).
pub fn read_data_window(
    chain: &Chain,
    window: Window,
    buf: &mut [u8],
    unit: u64,
    note_verbatim: bool,
) -> Result<DataWindow> {
    let extents = chain.map(window.offset, window.len)?;
    let verbatim = if note_verbatim {
        extents
            .iter()
            .filter_map(|e| match e.kind {
                ExtentKind::Data { host } => Some(Verbatim {
                    pos: (e.start - window.offset) as usize,
                    len: e.len as usize,
                    layer: e.depth,
                    host,
                }),
                _ => None,
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut runs: Vec<ByteRange> = Vec::new();
    for r in data_units(&extents, window, unit) {
        let (a, b) = (
            (r.start - window.offset) as usize,
            (r.end - window.offset) as usize,
        );
        chain.read_mapped(&extents, &mut buf[a..b], r.start)?;
        for run in nonzero_runs(&buf[a..b], unit as usize) {
            let (s, t) = (a + run.start, a + run.end);
            match runs.last_mut() {
                Some(last) if last.end == s => last.end = t,
                _ => runs.push(ByteRange { start: s, end: t }),
            }
        }
    }
    Ok(DataWindow { runs, verbatim })
}

/// Guest ranges (unit-aligned, merged, within the window) that may hold non-zero data: the
/// units touching a data or compressed extent. Everything else reads as zeros.
pub fn data_units(extents: &[Extent], window: Window, unit: u64) -> Vec<GuestRange> {
    let mut out: Vec<GuestRange> = Vec::new();
    for e in extents.iter().filter(|e| !e.reads_as_zero()) {
        let s = (e.start / unit * unit).max(window.offset);
        let t = (e.end().div_ceil(unit) * unit).min(window.end());
        match out.last_mut() {
            Some(last) if last.end >= s => last.end = last.end.max(t),
            _ => out.push(GuestRange { start: s, end: t }),
        }
    }
    out
}

/// Runs of `unit`-sized blocks of `b` that are not all zero (the last block may be short).
pub fn nonzero_runs(b: &[u8], unit: usize) -> Vec<ByteRange> {
    let mut runs: Vec<ByteRange> = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let e = (i + unit).min(b.len());
        if b[i..e].iter().any(|&x| x != 0) {
            match runs.last_mut() {
                Some(last) if last.end == i => last.end = e,
                _ => runs.push(ByteRange { start: i, end: e }),
            }
        }
        i = e;
    }
    runs
}

/// One change a commit makes to its base, within a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Data at `offset`, read into the window's buffer at `offset - window.offset`.
    Data { offset: u64, len: u64 },
    /// Zeros (a zero cluster above, or nothing above while the base has a backing file).
    Zero { offset: u64, len: u64 },
}

/// Reads what the layers above `above` hold in `window`: data read into `buf` at its
/// window position, zero clusters as zero changes. `zero_unallocated`: ranges no upper
/// layer has (past an upper image's end) become zeros too, to hide the base's own backing.
pub fn read_changes_above(
    chain: &Chain,
    above: usize,
    zero_unallocated: bool,
    window: Window,
    buf: &mut [u8],
) -> Result<Vec<Change>> {
    let mut changes = Vec::new();
    chain.for_each_extent_above(window.offset, window.len, above, |e| {
        if e.depth >= above {
            return Ok(());
        }
        match e.kind {
            ExtentKind::Data { .. } | ExtentKind::Compressed { .. } => {
                let pos = (e.start - window.offset) as usize;
                chain.read_extent(e, e.start, &mut buf[pos..pos + e.len as usize])?;
                changes.push(Change::Data {
                    offset: e.start,
                    len: e.len,
                });
            }
            ExtentKind::Zero { .. } => changes.push(Change::Zero {
                offset: e.start,
                len: e.len,
            }),
            ExtentKind::Unallocated if zero_unallocated => changes.push(Change::Zero {
                offset: e.start,
                len: e.len,
            }),
            ExtentKind::Unallocated => {}
        }
        Ok(())
    })?;
    Ok(changes)
}
