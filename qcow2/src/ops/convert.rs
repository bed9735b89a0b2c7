//! `convert -O raw`: a chain flattened into a sparse raw file.

use crate::chain::Chain;
use crate::create::{init_qcow2, CreateOptions};
use crate::error::{Error, Result};
use crate::image::Qcow2;
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
}

/// Flattens the chain into a new standalone qcow2 image: zero and unallocated ranges stay
/// unallocated, all-zero clusters are skipped, data is written in large runs.
pub fn to_qcow2(chain: &Chain, dest: &Path, opts: &Qcow2ConvertOptions) -> Result<RawConvertStats> {
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
    let stats = copy_into(
        chain,
        &mut img,
        opts.compress,
        &mut Throttle::new(opts.rate_limit),
    )?;
    img.flush()?;
    drop(img);
    out.commit()
        .map_err(|e| Error::file(&dest_s, "cannot finish output", e))?;
    Ok(stats)
}

/// Copies the chain's non-zero clusters into an empty image of at least the same size.
pub fn copy_into(
    chain: &Chain,
    img: &mut Qcow2,
    compress: bool,
    throttle: &mut Throttle,
) -> Result<RawConvertStats> {
    let cs = img.cluster_size() as usize;
    let size = chain.virtual_size().min(img.virtual_size());
    let window = IO_CHUNK.max(cs) as u64;
    let mut buf = vec![0u8; window as usize];
    let mut stats = RawConvertStats::default();
    let mut off = 0u64;
    while off < size {
        let n = window.min(size - off);
        if chain.map(off, n)?.iter().all(|e| e.reads_as_zero()) {
            off += n;
            continue;
        }
        let b = &mut buf[..n as usize];
        chain.read_at(b, off)?;
        throttle.account(n);
        // Runs of non-zero clusters are written at once.
        let mut i = 0usize;
        while i < b.len() {
            let end_c = (i + cs).min(b.len());
            if b[i..end_c].iter().all(|&x| x == 0) {
                i = end_c;
                continue;
            }
            if compress {
                let mut cluster = vec![0u8; cs];
                cluster[..end_c - i].copy_from_slice(&b[i..end_c]);
                img.write_compressed((off + i as u64) / cs as u64, &cluster)?;
                stats.bytes_written += (end_c - i) as u64;
                i = end_c;
                continue;
            }
            let mut j = end_c;
            while j < b.len() {
                let e = (j + cs).min(b.len());
                if b[j..e].iter().all(|&x| x == 0) {
                    break;
                }
                j = e;
            }
            img.write_at(&b[i..j], off + i as u64, None)?;
            stats.bytes_written += (j - i) as u64;
            i = j;
        }
        off += n;
    }
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
