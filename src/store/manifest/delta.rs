//! Updating a manifest across a commit without reading what the commit leaves alone.
//!
//! CRC-32 is affine over GF(2): for inputs of one length L, crc(x ⊕ y) = crc(x) ⊕ crc(y) ⊕
//! crc(0^L). So a run whose bytes change from `old` to `new` only in some pieces gets
//! crc(new) = crc(old) ⊕ crc(old ⊕ new) ⊕ crc(0^L), where old ⊕ new is zero outside the
//! pieces: its CRC is put together from the pieces' CRCs and zero stretches with
//! crc32 combine. What must be read is the data the commit overwrites and the data it
//! writes: about the INC's size, whatever the FULL's. Data the commit leaves alone keeps
//! contributing its recorded CRC, so rot there stays detectable (it is never re-read and
//! blessed); rot in overwritten data is gone with the data.
//!
//! Runs are maximal allocated stretches within a block: new allocation (the INC's clusters
//! where the file had none) becomes pieces with the CRC of their new content, merged with
//! touching runs by combining CRCs.

use crate::store::manifest::runs::{overlapping, CheckedRun};
use anyhow::Result;
use qcow2::Chain;
use std::ops::Range;
use std::sync::OnceLock;

/// `crc(a || b)` from `crc(a)`, `crc(b)` and `len(b)`.
pub fn concat(a: u32, b: u32, len_b: u64) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial_len(a, 0);
    h.combine(&crc32fast::Hasher::new_with_initial_len(b, len_b));
    h.finalize()
}

/// The CRC of `len` zero bytes, in O(log len) combines.
pub fn zeros(len: u64) -> u32 {
    static POWERS: OnceLock<Vec<u32>> = OnceLock::new();
    let powers = POWERS.get_or_init(|| {
        let mut p = vec![crc32fast::hash(&[0])];
        for k in 1..64 {
            let prev = p[k - 1];
            p.push(concat(prev, prev, 1u64 << (k - 1)));
        }
        p
    });
    let mut crc = 0;
    for (k, &z) in powers.iter().enumerate() {
        if len & (1u64 << k) != 0 {
            crc = concat(crc, z, 1u64 << k);
        }
    }
    crc
}

/// A stretch of guest bytes and a CRC over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub start: u64,
    pub len: u64,
    pub crc: u32,
}

/// A changed stretch of an old run: the CRC of old ⊕ new there, and of the new bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Change {
    delta: Piece,
    new_crc: u32,
}

/// The CRC of a stretch `[start, start+len)` that is zero outside `pieces` (sorted,
/// disjoint, within it), each with its CRC.
fn sparse_crc(start: u64, len: u64, pieces: &[Piece]) -> u32 {
    let (mut crc, mut pos) = (0u32, start);
    for p in pieces {
        if p.start > pos {
            crc = concat(crc, zeros(p.start - pos), p.start - pos);
        }
        crc = concat(crc, p.crc, p.len);
        pos = p.start + p.len;
    }
    let end = start + len;
    if end > pos {
        crc = concat(crc, zeros(end - pos), end - pos);
    }
    crc
}

/// The CRC of the old run `r` after `changes` (in order, within it). Overwritten whole:
/// the CRC of the new bytes (whatever the old ones were, rot included). In part: by the
/// delta from the recorded CRC, so what is left keeps its recorded checksum — rot in the
/// overwritten part then still shows as a mismatch, a false alarm on data that is right,
/// never a blessing.
fn new_run_crc(r: &CheckedRun, changes: &[Change]) -> u32 {
    let whole = changes.first().is_some_and(|c| c.delta.start == r.start)
        && changes
            .windows(2)
            .all(|w| w[0].delta.start + w[0].delta.len == w[1].delta.start)
        && changes
            .last()
            .is_some_and(|c| c.delta.start + c.delta.len == r.end());
    if whole {
        return changes
            .iter()
            .fold(0, |crc, c| concat(crc, c.new_crc, c.delta.len));
    }
    let pieces: Vec<Piece> = changes.iter().map(|c| c.delta).collect();
    r.crc ^ sparse_crc(r.start, r.len, &pieces) ^ zeros(r.len)
}

/// What a commit does to the runs of some blocks of a manifest, worked out before it.
#[derive(Debug, Default)]
pub struct DeltaPlan {
    /// The blocks changed (sorted, disjoint, whole blocks but for the disk's end).
    pub touched: Vec<Range<u64>>,
    /// For each old run in the touched blocks (by index in the manifest), the pieces
    /// where it changes, each with the CRC of old ⊕ new there.
    changed_runs: Vec<(usize, Vec<Change>)>,
    /// New allocation, each piece within one block, with the CRC of its new content.
    new: Vec<Piece>,
}

/// Reads `[start, end)` of the image opened alone into `buf` (resized).
fn read(chain: &Chain, start: u64, end: u64, buf: &mut Vec<u8>) -> Result<()> {
    buf.resize((end - start) as usize, 0);
    chain.read_layer(0, buf, start)?;
    Ok(())
}

/// Largest stretch read at once.
const CHUNK: u64 = 4 << 20;

impl DeltaPlan {
    /// Plans the commit of `inc` (opened alone) into `target` (opened alone, as it is
    /// before the commit), whose manifest has `runs` with blocks of `block` bytes. The
    /// manifest must describe `target`'s allocation in the blocks the commit touches
    /// (checked here, from metadata): an error otherwise, before anything changes.
    pub fn new(inc: &Chain, target: &Chain, runs: &[CheckedRun], block: u64) -> Result<DeltaPlan> {
        let mut spans: Vec<(u64, u64, bool)> = Vec::new();
        inc.for_each_extent(0, inc.virtual_size(), |e| {
            if e.depth == 0 && e.present() {
                let data = matches!(
                    e.kind,
                    qcow2::mapping::ExtentKind::Data { .. }
                        | qcow2::mapping::ExtentKind::Compressed { .. }
                );
                spans.push((e.start, e.end(), data));
            }
            Ok(())
        })?;
        DeltaPlan::from_changes(target, runs, block, &spans, |pos, buf| {
            Ok(inc.read_layer(0, buf, pos)?)
        })
    }

    /// Plans writing `spans` (sorted, disjoint: start, end, and whether it is data;
    /// else zeros) into `target` (opened alone, as it is now), whose manifest has `runs`;
    /// `read_new` reads the new data of a stretch.
    pub fn from_changes(
        target: &Chain,
        runs: &[CheckedRun],
        block: u64,
        spans: &[(u64, u64, bool)],
        mut read_new: impl FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<DeltaPlan> {
        let changed: Vec<Range<u64>> = spans.iter().map(|&(s, e, _)| s..e).collect();
        let mut plan = DeltaPlan {
            touched: whole_blocks(&changed, block, target.virtual_size()),
            ..Default::default()
        };
        check_allocation(target, runs, &plan.touched)?;
        let (mut old, mut new) = (Vec::new(), Vec::new());
        let mut run_at = 0usize;
        for &(s, e, data) in spans {
            let mut pos = s;
            while pos < e {
                let end = e.min(pos + CHUNK);
                new.clear();
                new.resize((end - pos) as usize, 0);
                if data {
                    read_new(pos, &mut new)?;
                }
                plan.add(target, runs, &mut run_at, pos, &new, &mut old, block)?;
                pos = end;
            }
        }
        Ok(plan)
    }

    /// Adds the commit's new content `new` at `start`: against the old runs it overlaps,
    /// pieces of old ⊕ new; elsewhere new allocation.
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        target: &Chain,
        runs: &[CheckedRun],
        run_at: &mut usize,
        start: u64,
        new: &[u8],
        old: &mut Vec<u8>,
        block: u64,
    ) -> Result<()> {
        let end = start + new.len() as u64;
        let mut pos = start;
        while pos < end {
            while *run_at < runs.len() && runs[*run_at].end() <= pos {
                *run_at += 1;
            }
            let run = runs.get(*run_at).filter(|r| r.start < end);
            match run {
                Some(r) if r.start <= pos => {
                    let stop = r.end().min(end);
                    read(target, pos, stop, old)?;
                    let at = (pos - start) as usize;
                    let new_part = &new[at..at + (stop - pos) as usize];
                    for (o, n) in old.iter_mut().zip(new_part) {
                        *o ^= *n;
                    }
                    let piece = Change {
                        delta: Piece {
                            start: pos,
                            len: stop - pos,
                            crc: crc32fast::hash(old),
                        },
                        new_crc: crc32fast::hash(new_part),
                    };
                    match self.changed_runs.last_mut() {
                        Some((i, v)) if *i == *run_at => v.push(piece),
                        _ => self.changed_runs.push((*run_at, vec![piece])),
                    }
                    pos = stop;
                }
                _ => {
                    // No old run here: new allocation up to the next run, cut at blocks.
                    let next = run.map_or(end, |r| r.start);
                    let stop = next.min(end).min((pos / block + 1).saturating_mul(block));
                    let at = (pos - start) as usize;
                    let crc = crc32fast::hash(&new[at..at + (stop - pos) as usize]);
                    self.new.push(Piece {
                        start: pos,
                        len: stop - pos,
                        crc,
                    });
                    pos = stop;
                }
            }
        }
        Ok(())
    }

    /// The runs of the touched blocks after the commit: old runs with their CRCs updated,
    /// new allocation merged in (touching stretches within a block become one run).
    pub fn runs_after(&self, runs: &[CheckedRun], block: u64) -> Vec<CheckedRun> {
        let mut segments: Vec<CheckedRun> = Vec::new();
        let mut changed = self.changed_runs.iter().peekable();
        for range in &self.touched {
            for i in overlapping(runs, range.start, range.end) {
                let r = &runs[i];
                let crc = match changed.peek() {
                    Some((ci, changes)) if *ci == i => {
                        changed.next();
                        new_run_crc(r, changes)
                    }
                    _ => r.crc,
                };
                segments.push(CheckedRun { crc, ..*r });
            }
        }
        segments.extend(self.new.iter().map(|p| CheckedRun {
            start: p.start,
            len: p.len,
            crc: p.crc,
        }));
        segments.sort_by_key(|s| s.start);
        let mut out: Vec<CheckedRun> = Vec::with_capacity(segments.len());
        for s in segments {
            match out.last_mut() {
                Some(l) if l.end() == s.start && s.start % block != 0 => {
                    l.crc = concat(l.crc, s.crc, s.len);
                    l.len += s.len;
                }
                _ => out.push(s),
            }
        }
        out
    }

    /// Whether the commit changes the old run `i` (`r`) or allocates next to it.
    pub fn changes_run(&self, i: usize, r: &CheckedRun) -> bool {
        self.changed_runs.iter().any(|(ci, _)| *ci == i)
            || self
                .new
                .iter()
                .any(|p| p.start <= r.end() && p.start + p.len >= r.start)
    }
}

/// The blocks (of `block` bytes, the last cut at `size`) holding any of `ranges` (sorted,
/// disjoint), merged.
pub fn whole_blocks(ranges: &[Range<u64>], block: u64, size: u64) -> Vec<Range<u64>> {
    merge_ranges(
        ranges.iter().map(|s| {
            s.start / block * block..s.end.div_ceil(block).saturating_mul(block).min(size)
        }),
    )
}

/// Sorted ranges merged where they touch.
pub fn merge_ranges(ranges: impl Iterator<Item = Range<u64>>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(l) if l.end >= r.start => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The image's allocation within `blocks`, merged.
pub fn allocation(chain: &Chain, blocks: &[Range<u64>]) -> Result<Vec<Range<u64>>> {
    let mut all = Vec::new();
    for b in blocks {
        all.extend(crate::store::manifest::runs::allocated_spans(
            chain, b.start, b.end,
        )?);
    }
    Ok(merge_ranges(all.into_iter()))
}

/// Where the manifest's runs and the image's allocation in `blocks` first disagree (None:
/// they agree). Metadata only.
pub fn allocation_mismatch(
    chain: &Chain,
    runs: &[CheckedRun],
    blocks: &[Range<u64>],
) -> Result<Option<u64>> {
    let actual = allocation(chain, blocks)?;
    let recorded = merge_ranges(
        blocks
            .iter()
            .flat_map(|b| runs[overlapping(runs, b.start, b.end)].iter())
            .map(|r| r.start..r.end())
            .collect::<Vec<_>>()
            .into_iter(),
    );
    if actual == recorded {
        return Ok(None);
    }
    let at = actual
        .iter()
        .zip(&recorded)
        .find(|(a, b)| a != b)
        .map(|(a, b)| a.start.min(b.start))
        .or_else(|| {
            actual
                .get(recorded.len())
                .or(recorded.get(actual.len()))
                .map(|r| r.start)
        })
        .unwrap_or(0);
    Ok(Some(at))
}

/// The manifest does not record what the file allocates: a delta update cannot be planned
/// (the caller re-reads the blocks instead, or refuses).
#[derive(Debug)]
pub struct AllocationMismatch(pub u64);

impl std::fmt::Display for AllocationMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the manifest does not record what the file allocates near guest offset {:#x} (damaged metadata?)",
            self.0
        )
    }
}

impl std::error::Error for AllocationMismatch {}

fn check_allocation(chain: &Chain, runs: &[CheckedRun], blocks: &[Range<u64>]) -> Result<()> {
    match allocation_mismatch(chain, runs, blocks)? {
        None => Ok(()),
        Some(at) => Err(AllocationMismatch(at).into()),
    }
}

/// Whether a commit of `inc` into `target` (both opened alone) can update the target's
/// manifest by [`DeltaPlan`]: both qcow2 with one cluster size and no subclusters, and one
/// virtual size, so the commit writes whole clusters where the INC has them and nothing
/// else. Otherwise the changed blocks are checked and re-read (`edit`).
pub fn applies(inc: &Chain, target: &Chain) -> bool {
    applies_layers(inc.top(), target.top()) && inc.virtual_size() == target.virtual_size()
}

/// Both qcow2 with one cluster size and no subclusters.
pub fn applies_layers(a: &qcow2::chain::Layer, b: &qcow2::chain::Layer) -> bool {
    let (Some(a), Some(b)) = (a.as_qcow2(), b.as_qcow2()) else {
        return false;
    };
    a.cluster_size() == b.cluster_size() && !a.header().extended_l2() && !b.header().extended_l2()
}

#[cfg(test)]
mod tests {
    use super::{concat, sparse_crc, zeros, Piece};

    #[test]
    fn zeros_and_concat_agree_with_hashing() {
        for len in [0u64, 1, 2, 3, 7, 4096, 65537, 1 << 20] {
            assert_eq!(
                zeros(len),
                crc32fast::hash(&vec![0u8; len as usize]),
                "{len}"
            );
        }
        let (a, b) = (b"hello, ".as_slice(), b"world".as_slice());
        assert_eq!(
            concat(crc32fast::hash(a), crc32fast::hash(b), b.len() as u64),
            crc32fast::hash(b"hello, world")
        );
        assert_eq!(concat(0, crc32fast::hash(b), 5), crc32fast::hash(b));
    }

    #[test]
    fn a_run_changed_in_pieces_gets_the_crc_of_its_new_bytes() {
        let old: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut new = old.clone();
        new[100..300].fill(0xaa);
        new[5000..5001].fill(0);
        new[9990..].fill(0x55);
        let pieces: Vec<Piece> = [(100usize, 300usize), (5000, 5001), (9990, 10_000)]
            .iter()
            .map(|&(a, b)| {
                let d: Vec<u8> = old[a..b]
                    .iter()
                    .zip(&new[a..b])
                    .map(|(x, y)| x ^ y)
                    .collect();
                Piece {
                    start: 1000 + a as u64,
                    len: (b - a) as u64,
                    crc: crc32fast::hash(&d),
                }
            })
            .collect();
        let d = sparse_crc(1000, old.len() as u64, &pieces);
        assert_eq!(
            crc32fast::hash(&old) ^ d ^ zeros(old.len() as u64),
            crc32fast::hash(&new)
        );
    }
}
