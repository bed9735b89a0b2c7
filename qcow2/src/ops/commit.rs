//! `commit`: the data of an image (and of the images between it and BASE) written into
//! BASE, as qemu-img commit does.

use crate::chain::{open_backing_of, Chain, OpenOptions};
use crate::error::{Error, Result};
use crate::image::Qcow2;
use crate::mapping::ExtentKind;
use crate::ops::convert::IO_CHUNK;
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

/// Writes into `base` everything `chain` resolves above layer `above` (data as data, zero
/// clusters as zero clusters), growing `base` to the chain's size. `base_backing` is what
/// lies below `base` (for partial-cluster copy-on-write). The caller flushes.
pub fn commit_into(
    base: &mut Qcow2,
    base_backing: Option<&Chain>,
    chain: &Chain,
    above: usize,
    throttle: &mut Throttle,
) -> Result<CommitStats> {
    let size = chain.virtual_size();
    base.grow(size)?;
    let mut stats = CommitStats::default();
    let mut buf = vec![0u8; IO_CHUNK];
    chain.for_each_extent(0, size, |e| {
        if e.depth >= above {
            return Ok(());
        }
        match e.kind {
            ExtentKind::Data { .. } | ExtentKind::Compressed { .. } => {
                let mut pos = e.start;
                while pos < e.end() {
                    let n = (IO_CHUNK as u64).min(e.end() - pos) as usize;
                    chain.read_extent(e, pos, &mut buf[..n])?;
                    base.write_at(&buf[..n], pos, base_backing)?;
                    throttle.account(n as u64);
                    stats.bytes_copied += n as u64;
                    pos += n as u64;
                }
            }
            ExtentKind::Zero { .. } => {
                base.write_zeroes(e.start, e.len, true, base_backing)?;
                stats.bytes_zeroed += e.len;
            }
            ExtentKind::Unallocated => {
                // Zeros above BASE (past an upper image's end): BASE's own backing must not
                // show through there.
                if base_backing.is_some() {
                    base.write_zeroes(e.start, e.len, true, base_backing)?;
                    stats.bytes_zeroed += e.len;
                }
            }
        }
        Ok(())
    })?;
    Ok(stats)
}
