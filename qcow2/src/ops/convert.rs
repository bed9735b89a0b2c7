//! `convert -O raw`: a chain flattened into a sparse raw file.

use crate::chain::Chain;
use crate::create::{init_qcow2, CreateOptions};
use crate::error::{Error, Result};
use crate::image::Qcow2;
use crate::mapping::Extent;
use crate::ops::pipeline::{self, Producer};
use crate::ops::throttle::Throttle;
use crate::storage::{PendingFile, Storage};
use std::path::Path;

/// Largest piece read and written at once.
pub const IO_CHUNK: usize = 4 << 20;
/// Granularity at which all-zero data is left as a hole.
pub const ZERO_DETECT: usize = 4096;

#[derive(Debug, Clone, Default)]
pub struct RawConvertStats {
    pub bytes_written: u64,
}

/// Writes the chain's guest content to `dest` as a sparse raw file.
pub fn to_raw(chain: &Chain, dest: &Path, overwrite: bool) -> Result<RawConvertStats> {
    let dest_s = dest.display().to_string();
    let out = PendingFile::new(dest, overwrite)
        .map_err(|e| Error::file(&dest_s, "cannot create output", e))?;
    let storage = out
        .create_storage()
        .map_err(|e| Error::file(&dest_s, "cannot create output", e))?;
    let mut stats = RawConvertStats::default();
    let mut buf = vec![0u8; IO_CHUNK];
    let size = chain.virtual_size();
    chain.for_each_extent(0, size, |e| {
        if e.reads_as_zero() {
            return Ok(());
        }
        let mut pos = e.start;
        while pos < e.end() {
            let n = (IO_CHUNK as u64).min(e.end() - pos) as usize;
            let b = &mut buf[..n];
            chain.read_extent(e, pos, b)?;
            write_sparse(&storage, b, pos, &mut stats)
                .map_err(|err| Error::io(&dest_s, "writing", pos, err))?;
            pos += n as u64;
        }
        Ok(())
    })?;
    storage
        .set_len(size)
        .map_err(|e| Error::io(&dest_s, "setting length", size, e))?;
    drop(storage);
    out.commit()
        .map_err(|e| Error::file(&dest_s, "cannot finish output", e))?;
    Ok(stats)
}

/// Options of a conversion to qcow2.
#[derive(Debug, Clone, Default)]
pub struct Qcow2ConvertOptions {
    pub create: CreateOptions,
    /// Write every non-zero cluster compressed.
    pub compress: bool,
    pub overwrite: bool,
    /// Bytes per second, 0 = unlimited.
    pub rate_limit: u64,
    /// Let the output share the source's data blocks where the filesystem can (reflinks on
    /// XFS or btrfs): nearly no writing and no space, copy-on-write afterwards. Off, every
    /// byte gets blocks of its own (an independent copy). Ignored with `compress`.
    pub share_blocks: bool,
}

/// Flattens the chain into a new standalone qcow2 image: zero and unallocated ranges stay
/// unallocated, all-zero clusters are skipped, data is written in large runs.
pub fn to_qcow2(chain: &Chain, dest: &Path, opts: &Qcow2ConvertOptions) -> Result<RawConvertStats> {
    to_qcow2_observed(chain, dest, opts, &mut |_, _| {})
}

/// [`to_qcow2`], reporting every written run of guest data to `observer`.
pub fn to_qcow2_observed(
    chain: &Chain,
    dest: &Path,
    opts: &Qcow2ConvertOptions,
    observer: WriteObserver<'_>,
) -> Result<RawConvertStats> {
    let dest_s = dest.display().to_string();
    let out = PendingFile::new(dest, opts.overwrite)
        .map_err(|e| Error::file(&dest_s, "cannot create output", e))?;
    let storage = out
        .create_storage()
        .map_err(|e| Error::file(&dest_s, "cannot create output", e))?;
    let mut copts = opts.create.clone();
    if copts.size == 0 {
        copts.size = chain.virtual_size();
    }
    let mut img = init_qcow2(
        std::sync::Arc::new(storage),
        &out.tmp_path().display().to_string(),
        dest.parent(),
        &copts,
    )?;
    let stats = copy_into_observed(
        chain,
        &mut img,
        opts.compress,
        opts.share_blocks,
        &mut Throttle::new(opts.rate_limit),
        observer,
    )?;
    img.flush()?;
    drop(img);
    out.commit()
        .map_err(|e| Error::file(&dest_s, "cannot finish output", e))?;
    Ok(stats)
}

/// Called with every run of guest data written to the output, in guest order.
pub type WriteObserver<'a> = &'a mut dyn FnMut(u64, &[u8]);

/// A range read from the source, with the runs of non-zero clusters found in it.
struct Piece {
    offset: u64,
    data: Vec<u8>,
    runs: Vec<(usize, usize)>,
}

/// Guest ranges (cluster-aligned, merged) that may hold non-zero data: the clusters touching
/// a data or compressed extent. Everything else reads as zeros and is never read.
pub(crate) fn data_clusters(chain: &Chain, off: u64, n: u64, cs: u64) -> Result<Vec<(u64, u64)>> {
    Ok(data_clusters_of(&chain.map(off, n)?, off, n, cs))
}

/// [`data_clusters`] of extents already mapped (those of `[off, off+n)`).
pub(crate) fn data_clusters_of(extents: &[Extent], off: u64, n: u64, cs: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in extents {
        if e.reads_as_zero() {
            continue;
        }
        let s = e.start / cs * cs;
        let t = (e.end().div_ceil(cs) * cs).min(off + n);
        match out.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(t),
            _ => out.push((s, t)),
        }
    }
    out
}

/// Runs of clusters in `b` that are not all zero, as (start, end) byte positions.
pub(crate) fn nonzero_runs(b: &[u8], cs: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let e = (i + cs).min(b.len());
        if b[i..e].iter().any(|&x| x != 0) {
            match runs.last_mut() {
                Some(last) if last.1 == i => last.1 = e,
                _ => runs.push((i, e)),
            }
        }
        i = e;
    }
    runs
}

/// Copies the chain's non-zero clusters into an empty image of at least the same size.
pub fn copy_into(
    chain: &Chain,
    img: &mut Qcow2,
    compress: bool,
    throttle: &mut Throttle,
) -> Result<RawConvertStats> {
    copy_into_observed(chain, img, compress, false, throttle, &mut |_, _| {})
}

/// [`copy_into`], reporting every written run of guest data to `observer`, in guest order;
/// `share_blocks` as in [`Qcow2ConvertOptions`].
/// Uncompressed copies go to [`super::parallel_copy`]. Compressed ones use two threads: one
/// maps and reads the source (never reading what maps as zeros) and finds the non-zero
/// clusters; the other compresses and writes them.
pub fn copy_into_observed(
    chain: &Chain,
    img: &mut Qcow2,
    compress: bool,
    share_blocks: bool,
    throttle: &mut Throttle,
    observer: WriteObserver<'_>,
) -> Result<RawConvertStats> {
    if !compress {
        return super::parallel_copy::copy_into_new(chain, img, share_blocks, throttle, observer);
    }
    let cs = img.cluster_size();
    let size = chain.virtual_size().min(img.virtual_size());
    let window = (IO_CHUNK as u64).max(cs);
    let mut stats = RawConvertStats::default();
    let read = |out: &Producer<Piece>| -> Result<()> {
        let mut off = 0u64;
        while off < size {
            let n = window.min(size - off);
            for (s, t) in data_clusters(chain, off, n, cs)? {
                let Some(mut data) = out.buffer() else {
                    return Ok(());
                };
                let len = (t - s) as usize;
                chain.read_at(&mut data[..len], s)?;
                let runs = nonzero_runs(&data[..len], cs as usize);
                if !out.send(Piece {
                    offset: s,
                    data,
                    runs,
                }) {
                    return Ok(());
                }
            }
            off += n;
        }
        Ok(())
    };
    let write = |piece: Piece| -> Result<Vec<u8>> {
        for &(a, b) in &piece.runs {
            let off = piece.offset + a as u64;
            let data = &piece.data[a..b];
            for (k, c) in data.chunks(cs as usize).enumerate() {
                let mut cluster = vec![0u8; cs as usize];
                cluster[..c.len()].copy_from_slice(c);
                img.write_compressed(off / cs + k as u64, &cluster)?;
            }
            observer(off, data);
            stats.bytes_written += data.len() as u64;
            throttle.account(data.len() as u64);
        }
        Ok(piece.data)
    };
    pipeline::run(window as usize, read, write)?;
    Ok(stats)
}
/// Writes `buf` at `offset`, skipping aligned all-zero blocks (they stay holes).
fn write_sparse(
    s: &dyn Storage,
    buf: &[u8],
    offset: u64,
    stats: &mut RawConvertStats,
) -> std::io::Result<()> {
    let mut run_start: Option<usize> = None;
    let mut i = 0;
    while i < buf.len() {
        let n = ZERO_DETECT.min(buf.len() - i);
        let zero = buf[i..i + n].iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(st)) => {
                s.write_at(&buf[st..i], offset + st as u64)?;
                stats.bytes_written += (i - st) as u64;
                run_start = None;
            }
            _ => {}
        }
        i += n;
    }
    if let Some(st) = run_start {
        s.write_at(&buf[st..], offset + st as u64)?;
        stats.bytes_written += (buf.len() - st) as u64;
    }
    Ok(())
}
