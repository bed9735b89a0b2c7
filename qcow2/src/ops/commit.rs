//! `commit`: the data of an image (and of the images between it and BASE) written into
//! BASE, as qemu-img commit does.

use crate::chain::{open_backing_of, Chain, OpenOptions};
use crate::error::{Error, Result};
use crate::image::Qcow2;
use crate::mapping::ExtentKind;
use crate::ops::convert::IO_CHUNK;
use crate::ops::pipeline::{self, Producer};
use crate::ops::throttle::Throttle;
use crate::write::OpenRwOptions;
use std::path::Path;

#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// The chain member to commit into (default: the image's backing file).
    pub base: Option<String>,
    /// Leave the top image untouched (implied by `base`).
    pub drop: bool,
    /// Bytes per second, 0 = unlimited.
    pub rate_limit: u64,
}

#[derive(Debug, Clone, Default)]
pub struct CommitStats {
    pub bytes_copied: u64,
    pub bytes_zeroed: u64,
}

pub fn commit(top: &Path, opts: &CommitOptions) -> Result<CommitStats> {
    let top_s = top.display().to_string();
    let chain = Chain::open(top, &OpenOptions::default())?;
    if chain.layers().len() < 2 {
        return Err(Error::Request(format!(
            "{top_s}: Image does not have a backing file"
        )));
    }
    let base_idx = match &opts.base {
        Some(b) => chain.find_member(b).ok_or_else(|| {
            Error::Request(format!(
                "Did not find '{b}' in the backing chain of '{top_s}'"
            ))
        })?,
        None => 1,
    };
    let base_path = chain.layers()[base_idx].path().to_string();
    if chain.layers()[base_idx].as_qcow2().is_none() {
        return Err(Error::unsupported(
            &base_path,
            "committing into a raw image",
        ));
    }
    let mut base = Qcow2::open_rw(Path::new(&base_path), OpenRwOptions::default())?;
    let base_backing = open_backing_of(&base)?;
    let size = chain.virtual_size();
    base.grow(size)?;
    let stats = commit_into(
        &mut base,
        base_backing.as_ref(),
        &chain,
        base_idx,
        &mut Throttle::new(opts.rate_limit),
    )?;
    base.flush()?;
    drop(base);
    if !opts.drop && opts.base.is_none() {
        drop(chain);
        let mut t = Qcow2::open_rw(top, OpenRwOptions::default())?;
        t.make_empty()?;
    }
    Ok(stats)
}

/// One step of a [`Batch`]: data at `pos` in the batch's buffer, or zeros.
enum CommitOp {
    Data { offset: u64, pos: usize, len: usize },
    Zero { offset: u64, len: u64 },
}

/// What the reader thread of [`commit_into`] hands the writer: up to a buffer's worth of
/// data from any number of extents. Batching matters because INC data is mostly small
/// scattered clusters; one hand-off per cluster costs more in thread wake-ups than the copy.
struct Batch {
    data: Vec<u8>,
    used: usize,
    ops: Vec<CommitOp>,
}

/// Zero steps per batch at most, so a long run of tiny zero extents still moves on.
const MAX_OPS_PER_BATCH: usize = 4096;

/// Writes into `base` everything `chain` resolves above layer `above` (data as data, zero
/// clusters as zero clusters), growing `base` to the chain's size. `base_backing` is what
/// lies below `base` (for partial-cluster copy-on-write). The caller flushes.
/// Two threads: one maps and reads the upper layers, the other writes into `base`.
pub fn commit_into(
    base: &mut Qcow2,
    base_backing: Option<&Chain>,
    chain: &Chain,
    above: usize,
    throttle: &mut Throttle,
) -> Result<CommitStats> {
    let size = chain.virtual_size();
    base.grow(size)?;
    // Zeros above BASE (past an upper image's end) must hide BASE's own backing.
    let zero_unallocated = base_backing.is_some();
    let mut stats = CommitStats::default();
    let read = |out: &Producer<Batch>| -> Result<()> {
        let mut batch: Option<Batch> = None;
        // The batch being filled, started with a spare buffer when there is none; None
        // once the writer has stopped.
        let current = |batch: &mut Option<Batch>| {
            if batch.is_none() {
                *batch = out.buffer().map(|data| Batch {
                    data,
                    used: 0,
                    ops: Vec::new(),
                });
            }
        };
        let send = |batch: &mut Option<Batch>| {
            if let Some(b) = batch.take() {
                out.send(b);
            }
        };
        chain.for_each_extent_above(0, size, above, |e| {
            if e.depth >= above || out.writer_gone() {
                return Ok(());
            }
            let mut zero = false;
            match e.kind {
                ExtentKind::Data { .. } | ExtentKind::Compressed { .. } => {
                    let mut pos = e.start;
                    while pos < e.end() {
                        current(&mut batch);
                        let Some(b) = batch.as_mut() else { break };
                        let room = b.data.len() - b.used;
                        if room == 0 {
                            send(&mut batch);
                            continue;
                        }
                        let len = (room as u64).min(e.end() - pos) as usize;
                        chain.read_extent(e, pos, &mut b.data[b.used..b.used + len])?;
                        b.ops.push(CommitOp::Data {
                            offset: pos,
                            pos: b.used,
                            len,
                        });
                        b.used += len;
                        pos += len as u64;
                    }
                }
                ExtentKind::Zero { .. } => zero = true,
                ExtentKind::Unallocated => zero = zero_unallocated,
            }
            if zero {
                current(&mut batch);
                if let Some(b) = batch.as_mut() {
                    b.ops.push(CommitOp::Zero {
                        offset: e.start,
                        len: e.len,
                    });
                    if b.ops.len() >= MAX_OPS_PER_BATCH {
                        send(&mut batch);
                    }
                }
            }
            Ok(())
        })?;
        send(&mut batch);
        Ok(())
    };
    let write = |batch: Batch| -> Result<Vec<u8>> {
        for op in &batch.ops {
            match *op {
                CommitOp::Data { offset, pos, len } => {
                    base.write_at(&batch.data[pos..pos + len], offset, base_backing)?;
                    throttle.account(len as u64);
                    stats.bytes_copied += len as u64;
                }
                CommitOp::Zero { offset, len } => {
                    base.write_zeroes(offset, len, true, base_backing)?;
                    stats.bytes_zeroed += len;
                }
            }
        }
        Ok(batch.data)
    };
    pipeline::run(IO_CHUNK, read, write)?;
    Ok(stats)
}
