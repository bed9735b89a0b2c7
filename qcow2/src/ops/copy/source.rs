//! What the copy engine's readers read: a window's non-zero data (for copies into a new
//! image or a raw file), or the changes above a layer (for commit). Both map the window
//! first and never read what maps as zeros.

use super::{Pieces, Window};
use crate::buffer::AlignedBuf;
use crate::chain::Chain;
use crate::error::Result;
use crate::mapping::{Extent, ExtentKind};
use std::ops::Range;

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
    for e in extents.iter().filter(|e| e.reads_as_zero()) {
        chain.check_unread(e)?;
    }
    let mut runs: Vec<ByteRange> = Vec::new();
    for r in data_units(&extents, window, unit) {
        let (a, b) = (
            (r.start - window.offset) as usize,
            (r.end - window.offset) as usize,
        );
        chain.read_mapped(&extents, &mut buf[a..b], r.start)?;
        for run in nonzero_runs(&buf[a..b], unit as usize) {
            push_range(&mut runs, a + run.start, a + run.end);
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
            push_range(&mut runs, i, e);
        }
        i = e;
    }
    runs
}

/// Appends `[start, end)`, extending the last range when it ends where this one starts.
fn push_range(runs: &mut Vec<ByteRange>, start: usize, end: usize) {
    match runs.last_mut() {
        Some(last) if last.end == start => last.end = end,
        _ => runs.push(ByteRange { start, end }),
    }
}

/// One change a commit makes to its base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// `len` bytes of data for guest `offset`, at `pos` in the piece's buffer.
    Data { offset: u64, pos: usize, len: usize },
    /// Zeros (a zero cluster above, or nothing above while the base has a backing file).
    Zero { offset: u64, len: u64 },
}

/// Zero changes per piece at most, so a long run of tiny zero extents still moves on.
const MAX_CHANGES_PER_PIECE: usize = 4096;

/// Sends what the layers above `above` hold in the window as pieces of changes: data
/// packed into the buffers (scattered clusters fill a buffer before it is handed on), zero
/// clusters as zero changes. `zero_unallocated`: ranges no upper layer has (past an upper
/// image's end) become zeros too, to hide the base's own backing.
pub fn read_changes_above(
    chain: &Chain,
    above: usize,
    zero_unallocated: bool,
    keep: &[Range<u64>],
    pieces: &mut Pieces<'_, Vec<Change>>,
) -> Result<()> {
    let window = pieces.window();
    // The piece being filled: its changes, buffer and bytes used.
    let mut piece: Option<Piece> = None;
    chain.for_each_extent_above(window.offset, window.len, above, |e| {
        if e.depth >= above || pieces.stopped() {
            return Ok(());
        }
        for_each_gap(keep, e.start, e.end(), |start, end| {
            change(chain, e, start, end, zero_unallocated, &mut piece, pieces)
        })
    })?;
    send(&mut piece, pieces);
    Ok(())
}

/// Calls `f` for each stretch of `[start, end)` outside the ranges of `keep` (sorted,
/// disjoint), in order.
pub fn for_each_gap(
    keep: &[Range<u64>],
    start: u64,
    end: u64,
    mut f: impl FnMut(u64, u64) -> Result<()>,
) -> Result<()> {
    let mut pos = start;
    let first = keep.partition_point(|k| k.end <= start);
    for k in &keep[first..] {
        if k.start >= end {
            break;
        }
        if k.start > pos {
            f(pos, k.start)?;
        }
        pos = pos.max(k.end);
    }
    if pos < end {
        f(pos, end)?;
    }
    Ok(())
}

/// Adds `[start, end)` of the extent `e` to the changes being sent.
fn change(
    chain: &Chain,
    e: &Extent,
    start: u64,
    end: u64,
    zero_unallocated: bool,
    piece: &mut Option<Piece>,
    pieces: &mut Pieces<'_, Vec<Change>>,
) -> Result<()> {
    match e.kind {
        ExtentKind::Data { .. } | ExtentKind::Compressed { .. } => {
            let mut offset = start;
            while offset < end {
                let Some((changes, buf, used)) = current(piece, pieces) else {
                    return Ok(());
                };
                let room = buf.len() - *used;
                if room == 0 {
                    send(piece, pieces);
                    continue;
                }
                let len = (room as u64).min(end - offset) as usize;
                chain.read_extent(e, offset, &mut buf[*used..*used + len])?;
                changes.push(Change::Data {
                    offset,
                    pos: *used,
                    len,
                });
                *used += len;
                offset += len as u64;
            }
        }
        ExtentKind::Zero { .. } => zero(piece, pieces, start, end - start),
        ExtentKind::Unallocated if zero_unallocated => zero(piece, pieces, start, end - start),
        ExtentKind::Unallocated => {}
    }
    Ok(())
}

type Piece = (Vec<Change>, AlignedBuf, usize);

/// The piece being filled, started with a spare buffer when there is none; None once the
/// copy is stopping.
fn current<'p>(
    piece: &'p mut Option<Piece>,
    pieces: &mut Pieces<'_, Vec<Change>>,
) -> Option<&'p mut Piece> {
    if piece.is_none() {
        *piece = pieces.buffer().map(|buf| (Vec::new(), buf, 0));
    }
    piece.as_mut()
}

fn send(piece: &mut Option<Piece>, pieces: &mut Pieces<'_, Vec<Change>>) {
    if let Some((changes, buf, _)) = piece.take() {
        pieces.send(changes, buf);
    }
}

fn zero(piece: &mut Option<Piece>, pieces: &mut Pieces<'_, Vec<Change>>, offset: u64, len: u64) {
    let Some((changes, _, _)) = current(piece, pieces) else {
        return;
    };
    changes.push(Change::Zero { offset, len });
    if changes.len() >= MAX_CHANGES_PER_PIECE {
        send(piece, pieces);
    }
}
