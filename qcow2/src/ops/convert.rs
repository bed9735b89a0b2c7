//! `convert -O raw`: a chain flattened into a sparse raw file.

use crate::chain::Chain;
use crate::error::{Error, Result};
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
    let out = PendingFile::create(dest, overwrite)
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
            write_sparse(out.storage(), b, pos, &mut stats)
                .map_err(|err| Error::io(&dest_s, "writing", pos, err))?;
            pos += n as u64;
        }
        Ok(())
    })?;
    out.storage()
        .set_len(size)
        .map_err(|e| Error::io(&dest_s, "setting length", size, e))?;
    out.commit()
        .map_err(|e| Error::file(&dest_s, "cannot finish output", e))?;
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
