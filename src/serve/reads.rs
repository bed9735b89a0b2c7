//! What a request reads, resolved against a point's chain: data pieces read (and checked)
//! into a buffer, holes answered from metadata alone; and block status for
//! `base:allocation` and `qemu:allocation-depth`. Synchronous: the transmission phase runs
//! these on blocking threads.

use crate::serve::proto::{STATE_HOLE, STATE_ZERO};
use qcow2::mapping::{Extent, ExtentKind};
use qcow2::Chain;

/// A stretch of a read: data (bytes in the buffer) or a hole (reads as zeros, not read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Offset in the request (0 = the request's first byte).
    pub at: u64,
    pub len: u64,
    pub hole: bool,
}

/// Reads `[offset, offset + buf.len())` of `chain` into `buf`: data extents are read (and
/// checked by the chain's read check), zero and unallocated extents are checked as such
/// and left out of the buffer unless `fill_holes`. Returns the pieces in order, adjacent
/// pieces of one kind merged.
pub fn read(
    chain: &Chain,
    offset: u64,
    buf: &mut [u8],
    fill_holes: bool,
) -> qcow2::Result<Vec<Piece>> {
    let len = buf.len() as u64;
    let mut pieces: Vec<Piece> = Vec::new();
    for e in chain.map(offset, len)? {
        let (s, t) = (e.start.max(offset), e.end().min(offset + len));
        if s >= t {
            continue;
        }
        let b = &mut buf[(s - offset) as usize..(t - offset) as usize];
        let hole = matches!(e.kind, ExtentKind::Zero { .. } | ExtentKind::Unallocated);
        if hole {
            chain.check_unread(&clip(&e, s, t))?;
            if fill_holes {
                b.fill(0);
            }
        } else {
            chain.read_extent(&e, s, b)?;
        }
        let at = s - offset;
        match pieces.last_mut() {
            Some(p) if p.hole == hole && p.at + p.len == at => p.len += t - s,
            _ => pieces.push(Piece {
                at,
                len: t - s,
                hole,
            }),
        }
    }
    Ok(pieces)
}

/// The part `[s, t)` of a zero or unallocated extent.
fn clip(e: &Extent, s: u64, t: u64) -> Extent {
    Extent {
        start: s,
        len: t - s,
        ..*e
    }
}

/// A metadata context a client can select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// `base:allocation`: bit 0 hole, bit 1 reads as zero.
    Allocation,
    /// `qemu:allocation-depth`: 0 unallocated, 1 the served point's own file, 2 the one
    /// before it, …
    Depth,
}

impl Context {
    pub const ALL: [Context; 2] = [Context::Allocation, Context::Depth];

    pub fn name(self) -> &'static str {
        match self {
            Context::Allocation => "base:allocation",
            Context::Depth => "qemu:allocation-depth",
        }
    }

    /// The contexts a query names: an exact name, or a namespace with an empty leaf
    /// (`base:`, `qemu:`) for all of it (only when listing).
    pub fn matching(query: &str, listing: bool) -> Vec<Context> {
        Context::ALL
            .into_iter()
            .filter(|c| {
                c.name() == query
                    || (listing && query.ends_with(':') && c.name().starts_with(query))
            })
            .collect()
    }

    /// The flags of an extent of a chain of `layers` images.
    fn flags(self, e: &Extent, layers: usize) -> u32 {
        match (self, e.kind) {
            (Context::Allocation, ExtentKind::Data { .. } | ExtentKind::Compressed { .. }) => 0,
            (Context::Allocation, _) => STATE_HOLE | STATE_ZERO,
            // Allocated nowhere.
            (Context::Depth, ExtentKind::Unallocated) if e.depth + 1 >= layers => 0,
            // Past the end of the older file below `e.depth` (the disk grew): that file
            // answers (with zeros), as QEMU counts it.
            (Context::Depth, ExtentKind::Unallocated) => e.depth as u32 + 2,
            (Context::Depth, _) => e.depth as u32 + 1,
        }
    }
}

/// At most this many extents in one block status reply (the client asks again for more).
const MAX_EXTENTS: usize = 1 << 16;

/// Block status of `[offset, offset + len)` for one context: (length, flags) descriptors,
/// adjacent ones with equal flags merged; with `one`, only the first.
pub fn block_status(
    chain: &Chain,
    ctx: Context,
    offset: u64,
    len: u64,
    one: bool,
) -> qcow2::Result<Vec<(u32, u32)>> {
    let end = offset + len;
    let mut out: Vec<(u64, u32)> = Vec::new();
    for e in chain.map(offset, len)? {
        let (s, t) = (e.start.max(offset), e.end().min(end));
        if s >= t {
            continue;
        }
        let f = ctx.flags(&e, chain.layers().len());
        match out.last_mut() {
            Some((l, lf)) if *lf == f => *l += t - s,
            _ => {
                if out.len() >= MAX_EXTENTS || (one && !out.is_empty()) {
                    break;
                }
                out.push((t - s, f));
            }
        }
    }
    // Lengths fit: the request's length is a u32.
    Ok(out.into_iter().map(|(l, f)| (l as u32, f)).collect())
}

#[cfg(test)]
mod tests {
    use crate::serve::proto::{STATE_HOLE, STATE_ZERO};
    use crate::serve::reads::{block_status, read, Context, Piece};
    use qcow2::create::{init_qcow2, CreateOptions};
    use qcow2::storage::MemStorage;
    use qcow2::{Chain, Layer};
    use std::sync::Arc;

    /// A two-layer chain: the base holds 0x11 in cluster 0 and 2, the top 0x22 in cluster
    /// 1 and a zero cluster over 2 (64 KiB clusters, 4 clusters).
    fn chain() -> Chain {
        let cs = 65536u64;
        let opts = CreateOptions {
            size: 4 * cs,
            cluster_size: cs,
            ..Default::default()
        };
        let mem = || Arc::new(MemStorage::new(Vec::new()));
        let mut base = init_qcow2(mem(), "base", None, &opts).unwrap();
        base.write_at(&vec![0x11; cs as usize], 0, None).unwrap();
        base.write_at(&vec![0x11; cs as usize], 2 * cs, None)
            .unwrap();
        let mut top = init_qcow2(mem(), "top", None, &opts).unwrap();
        top.write_at(&vec![0x22; cs as usize], cs, None).unwrap();
        top.write_zeroes(2 * cs, cs, false, None).unwrap();
        Chain::from_layers(vec![
            Layer::Qcow2(Box::new(top)),
            Layer::Qcow2(Box::new(base)),
        ])
        .unwrap()
    }

    #[test]
    fn reads_return_data_and_holes_across_layers() {
        let c = chain();
        let cs = 65536u64;
        let mut buf = vec![0xee; (3 * cs) as usize];
        let pieces = read(&c, 100, &mut buf, false).unwrap();
        // 100.. cluster 0 (base data), cluster 1 (top data), cluster 2 zero, cluster 3 up
        // to 100 + 3 cs unallocated.
        assert_eq!(
            pieces,
            [
                Piece {
                    at: 0,
                    len: 2 * cs - 100,
                    hole: false
                },
                Piece {
                    at: 2 * cs - 100,
                    len: cs + 100,
                    hole: true
                },
            ]
        );
        assert!(buf[..(cs - 100) as usize].iter().all(|&b| b == 0x11));
        assert!(buf[(cs - 100) as usize..(2 * cs - 100) as usize]
            .iter()
            .all(|&b| b == 0x22));
        // Holes are left alone unless asked.
        assert_eq!(buf[(2 * cs) as usize], 0xee);
        read(&c, 100, &mut buf, true).unwrap();
        assert!(buf[(2 * cs - 100) as usize..].iter().all(|&b| b == 0));
    }

    #[test]
    fn block_status_reports_allocation_and_depth() {
        let c = chain();
        let cs = 65536u32;
        let all = 4 * cs as u64;
        assert_eq!(
            block_status(&c, Context::Allocation, 0, all, false).unwrap(),
            [(2 * cs, 0), (2 * cs, STATE_HOLE | STATE_ZERO)]
        );
        assert_eq!(
            block_status(&c, Context::Depth, 0, all, false).unwrap(),
            [(cs, 2), (2 * cs, 1), (cs, 0)]
        );
        assert_eq!(
            block_status(&c, Context::Depth, 10, all - 10, true).unwrap(),
            [(cs - 10, 2)]
        );
        assert_eq!(Context::matching("base:", true), [Context::Allocation]);
        assert!(Context::matching("base:", false).is_empty());
        assert_eq!(
            Context::matching("qemu:allocation-depth", false),
            [Context::Depth]
        );
    }
}
