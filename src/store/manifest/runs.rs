//! Checksummed runs: what a manifest records, how runs are computed from an image (or from
//! data as it is written), and how a recorded list is searched.

use crate::store::manifest::parallel::{in_parts, readers, worth_splitting};
use anyhow::Result;
use qcow2::{Chain, Format};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::Path;

/// Guest bytes per checksum block in version-2 manifests (larger clusters: a cluster).
pub const BLOCK_SIZE: u64 = 1 << 20;
/// The run size of version-1 manifests: runs were cut at its multiples.
pub const V1_RUN_SIZE: u64 = 64 << 20;
/// Block sizes a manifest may declare: a run is read whole to check any part of it, so
/// this bounds the extra reading per check.
pub const BLOCK_SIZES: Range<u64> = 512..(64 << 20) + 1;

/// One checksummed run of an image's own guest data; written as `[start, length, "crc32
/// hex"]`. A run lies within one aligned block of the manifest's block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckedRun {
    /// Guest offset of the run's first byte.
    pub start: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// CRC32 (IEEE) of the run's guest bytes.
    pub crc: u32,
}

impl CheckedRun {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

// The on-disk form is a 3-element array, not an object: manifests of millions of runs stay
// compact, and version-1 manifests stay readable.
impl Serialize for CheckedRun {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.start, self.len, crc_hex(self.crc)).serialize(s)
    }
}

impl<'de> Deserialize<'de> for CheckedRun {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<CheckedRun, D::Error> {
        let (start, len, crc) = <(u64, u64, String)>::deserialize(d)?;
        let crc = parse_crc(&crc)
            .ok_or_else(|| serde::de::Error::custom(format!("bad crc32 {crc:?}")))?;
        Ok(CheckedRun { start, len, crc })
    }
}

pub fn crc_hex(crc: u32) -> String {
    format!("{crc:08x}")
}

fn parse_crc(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 8 {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// How a file and its manifest disagree, as the user is told (after the file's name).
pub enum Disagreement {
    /// The file holds data at this guest offset that the manifest does not record.
    Unrecorded(u64),
    /// The manifest records data at this guest offset that the file does not hold.
    Lost(u64),
    /// A run's data does not match its checksum.
    Mismatch { run: CheckedRun, found: u32 },
}

impl std::fmt::Display for Disagreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Disagreement::Unrecorded(off) => write!(
                f,
                "data at guest offset {off:#x} that the manifest does not record (damaged metadata?)"
            ),
            Disagreement::Lost(off) => write!(
                f,
                "the manifest records data at guest offset {off:#x} that the image no longer has (damaged metadata?)"
            ),
            Disagreement::Mismatch { run, found } => write!(
                f,
                "checksum mismatch in guest range {:#x}..{:#x} (bit rot or damage): recorded {:08x}, found {found:08x}",
                run.start,
                run.end(),
                run.crc
            ),
        }
    }
}

/// The block size of a new manifest for an image with `cluster_size` clusters.
pub fn block_size_for(cluster_size: u64) -> u64 {
    BLOCK_SIZE.max(cluster_size)
}

/// Why a run cannot follow the runs before it (which end at `prev_end`) in a manifest of a
/// disk of `size` bytes with blocks of `block` bytes; None when it can.
pub fn misplaced(run: &CheckedRun, prev_end: u64, size: u64, block: u64) -> Option<String> {
    let end = run.start.checked_add(run.len);
    let bad = match end {
        _ if run.len == 0 => "is empty",
        None => "is past the disk's end",
        Some(e) if e > size => "is past the disk's end",
        _ if run.start < prev_end => "is out of order",
        Some(e) if run.start / block != (e - 1) / block => "crosses a block boundary",
        _ => return None,
    };
    Some(format!("run {:#x}+{:#x} {bad}", run.start, run.len))
}

/// The indexes of `runs` (sorted, disjoint) that overlap `[start, end)`.
pub fn overlapping(runs: &[CheckedRun], start: u64, end: u64) -> Range<usize> {
    let first = runs.partition_point(|r| r.end() <= start);
    let last = first + runs[first..].partition_point(|r| r.start < end);
    first..last
}

/// The CRC32 of `len` zero bytes.
pub fn zero_crc(len: u64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    hash_zeros(&mut h, len);
    h.finalize()
}

/// Feeds `len` zero bytes to `h`.
pub fn hash_zeros(h: &mut crc32fast::Hasher, len: u64) {
    static ZEROS: [u8; 65536] = [0; 65536];
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..n]);
        left -= n as u64;
    }
}

/// Feeds the guest range `start..end` of layer `depth` of `chain` (read alone) to `h`,
/// through `buf`.
pub fn hash_layer(
    chain: &Chain,
    depth: usize,
    start: u64,
    end: u64,
    buf: &mut [u8],
    h: &mut crc32fast::Hasher,
) -> qcow2::Result<()> {
    let mut p = start;
    while p < end {
        let n = (buf.len() as u64).min(end - p) as usize;
        chain.read_layer(depth, &mut buf[..n], p)?;
        h.update(&buf[..n]);
        p += n as u64;
    }
    Ok(())
}

/// The ranges of `[start, end)` an image opened alone holds itself (data, compressed and
/// zero clusters; every byte of a raw file), merged where they touch.
pub fn allocated_spans(chain: &Chain, start: u64, end: u64) -> Result<Vec<Range<u64>>> {
    let is_raw = chain.top().format() == Format::Raw;
    let mut spans: Vec<Range<u64>> = Vec::new();
    if end <= start {
        return Ok(spans);
    }
    chain.for_each_extent(start, end - start, |e| {
        if e.present() || is_raw {
            match spans.last_mut() {
                Some(last) if last.end == e.start => last.end = e.end(),
                _ => spans.push(e.start..e.end()),
            }
        }
        Ok(())
    })?;
    Ok(spans)
}

/// Pieces are hashed in batches of about this many bytes, or this many pieces, split
/// between the readers: bounded memory beside the runs themselves.
const BATCH_BYTES: u64 = 256 << 20;
const BATCH_PIECES: usize = 1 << 16;

/// The runs of an image opened alone within `ranges` (sorted, disjoint, block-aligned but
/// for the disk's end), cut at multiples of `block`; re-read on all readers.
pub fn compute_runs_in(
    chain: &Chain,
    ranges: &[Range<u64>],
    block: u64,
) -> Result<Vec<CheckedRun>> {
    // One reader until a batch is worth splitting: counting the readers stats the file and
    // reads sysfs, too much for the one-block calls of `edit`'s fallback.
    let mut buffers: Vec<Vec<u8>> = vec![Vec::new()];
    let mut counted = false;
    let mut runs = Vec::new();
    let mut batch: Vec<Range<u64>> = Vec::new();
    let mut batch_bytes = 0u64;
    let mut hash_batch = |batch: &mut Vec<Range<u64>>, runs: &mut Vec<CheckedRun>| {
        if !counted && worth_splitting(batch.iter().map(|p| p.end - p.start).sum()) {
            buffers.resize_with(readers(Path::new(chain.top().path())), Vec::new);
            counted = true;
        }
        let parts = in_parts(
            &mut buffers,
            batch,
            |p| p.end - p.start,
            |buf, part, stop| {
                buf.resize(4 << 20, 0);
                let mut out = Vec::with_capacity(part.len());
                for p in part {
                    if stop() {
                        break;
                    }
                    let mut h = crc32fast::Hasher::new();
                    hash_layer(chain, 0, p.start, p.end, buf, &mut h)?;
                    out.push(CheckedRun {
                        start: p.start,
                        len: p.end - p.start,
                        crc: h.finalize(),
                    });
                }
                Ok(out)
            },
        );
        batch.clear();
        for part in parts {
            runs.extend(part?);
        }
        Ok::<(), anyhow::Error>(())
    };
    for range in ranges {
        for span in allocated_spans(chain, range.start, range.end)? {
            let mut pos = span.start;
            while pos < span.end {
                let run_end = ((pos / block) + 1).saturating_mul(block).min(span.end);
                batch.push(pos..run_end);
                batch_bytes += run_end - pos;
                pos = run_end;
                if batch_bytes >= BATCH_BYTES || batch.len() >= BATCH_PIECES {
                    hash_batch(&mut batch, &mut runs)?;
                    batch_bytes = 0;
                }
            }
        }
    }
    hash_batch(&mut batch, &mut runs)?;
    Ok(runs)
}

/// Builds the runs of a manifest from data as it is written (in guest order), so an image
/// we write ourselves needs no second read.
pub struct RunBuilder {
    block: u64,
    runs: Vec<CheckedRun>,
    cur: Option<(u64, u64, crc32fast::Hasher)>,
}

impl RunBuilder {
    pub fn new(block: u64) -> Self {
        RunBuilder {
            block,
            runs: Vec::new(),
            cur: None,
        }
    }

    fn close(&mut self) {
        if let Some((start, len, h)) = self.cur.take() {
            self.runs.push(CheckedRun {
                start,
                len,
                crc: h.finalize(),
            });
        }
    }

    /// Adds guest data at `offset` (after everything added before).
    pub fn feed(&mut self, mut offset: u64, mut data: &[u8]) {
        while !data.is_empty() {
            let block = self.block;
            let continues = matches!(&self.cur, Some((s, l, _)) if s + l == offset && !offset.is_multiple_of(block));
            if !continues {
                self.close();
                self.cur = Some((offset, 0, crc32fast::Hasher::new()));
            }
            let room = (block - offset % block) as usize;
            let n = room.min(data.len());
            let (_, l, h) = self.cur.as_mut().expect("open run");
            h.update(&data[..n]);
            *l += n as u64;
            offset += n as u64;
            data = &data[n..];
        }
    }

    pub fn finish(mut self) -> Vec<CheckedRun> {
        self.close();
        self.runs
    }
}

#[cfg(test)]
mod tests {
    use crate::store::manifest::runs::*;

    fn run(start: u64, len: u64) -> CheckedRun {
        CheckedRun { start, len, crc: 0 }
    }

    #[test]
    fn runs_are_written_as_three_element_arrays() {
        let r = CheckedRun {
            start: 65536,
            len: 512,
            crc: 0x0badf00d,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, r#"[65536,512,"0badf00d"]"#);
        assert_eq!(serde_json::from_str::<CheckedRun>(&json).unwrap(), r);
        for bad in [
            r#"{"start":1}"#,
            r#"[1,2]"#,
            r#"[-1,2,"x"]"#,
            r#"[1,2,"xyz"]"#,
            r#"[1,2,""]"#,
            r#"[1,2,"123456789"]"#,
        ] {
            assert!(serde_json::from_str::<CheckedRun>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn run_builder_cuts_at_blocks_and_at_gaps() {
        let block = BLOCK_SIZE;
        let mut b = RunBuilder::new(block);
        let chunk = vec![1u8; 256 << 10];
        let mut off = block - (512 << 10);
        for _ in 0..4 {
            b.feed(off, &chunk);
            off += chunk.len() as u64;
        }
        b.feed(off + 4096, &chunk[..4096]);
        let runs = b.finish();
        let spans: Vec<(u64, u64)> = runs.iter().map(|r| (r.start, r.len)).collect();
        assert_eq!(
            spans,
            [
                (block - (512 << 10), 512 << 10),
                (block, 512 << 10),
                (block + (512 << 10) + 4096, 4096)
            ]
        );
        assert_eq!(runs[2].crc, crc32fast::hash(&chunk[..4096]));
        assert!(RunBuilder::new(block).finish().is_empty());
    }

    #[test]
    fn misplaced_runs_are_named() {
        let m = |r, prev| misplaced(&r, prev, 8 << 20, BLOCK_SIZE);
        assert_eq!(m(run(0, BLOCK_SIZE), 0), None);
        assert_eq!(m(run(BLOCK_SIZE + 5, 7), BLOCK_SIZE), None);
        assert!(m(run(0, 0), 0).unwrap().contains("empty"));
        assert!(m(run(4096, 1), 8192).unwrap().contains("out of order"));
        assert!(m(run(u64::MAX, 2), 0)
            .unwrap()
            .contains("past the disk's end"));
        assert!(m(run(8 << 20, 1), 0)
            .unwrap()
            .contains("past the disk's end"));
        assert!(m(run(BLOCK_SIZE - 1, 2), 0)
            .unwrap()
            .contains("crosses a block boundary"));
    }

    #[test]
    fn overlapping_finds_exactly_the_runs_touched() {
        let runs = [run(0, 10), run(20, 10), run(40, 10)];
        assert_eq!(overlapping(&runs, 0, 1), 0..1);
        assert_eq!(overlapping(&runs, 10, 20), 1..1);
        assert_eq!(overlapping(&runs, 9, 21), 0..2);
        assert_eq!(overlapping(&runs, 29, 100), 1..3);
        assert_eq!(overlapping(&runs, 50, 100), 3..3);
        assert_eq!(overlapping(&[], 0, 100), 0..0);
    }

    #[test]
    fn zero_crc_is_the_crc_of_zeros() {
        for len in [0u64, 1, 4096, 65536, 65537, BLOCK_SIZE] {
            assert_eq!(zero_crc(len), crc32fast::hash(&vec![0; len as usize]));
        }
    }
}
