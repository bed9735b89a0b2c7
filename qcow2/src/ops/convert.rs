//! `convert`: a chain flattened into a new standalone image, qcow2 (plain or compressed) or
//! sparse raw. Every byte goes through the copy engine ([`super::copy`]).

use super::copy::sinks::{
    compress_window, CompressedSink, CopyStats, HostWriter, NewImageSink, Progress, RawSink,
    RawWriter, WriteObserver,
};
use super::copy::source::read_data_window;
use super::copy::{self, NoWriter, Plan};
use crate::chain::Chain;
use crate::create::{init_qcow2, CreateOptions};
use crate::error::{IoContext, Result};
use crate::image::Qcow2;
use crate::ops::throttle::Throttle;
use crate::storage::{PendingFile, Storage};
use std::path::Path;
use std::sync::Arc;

/// Granularity at which all-zero data is left as a hole in raw output.
pub const ZERO_DETECT: u64 = 4096;

/// Writes the chain's guest content to `dest` as a sparse raw file.
pub fn to_raw(chain: &Chain, dest: &Path, overwrite: bool) -> Result<CopyStats> {
    let dest_s = dest.display().to_string();
    let out = PendingFile::new(dest, overwrite).on_file(&dest_s, "cannot create output")?;
    let storage = out
        .create_storage()
        .on_file(&dest_s, "cannot create output")?;
    let storage: Arc<dyn Storage> = Arc::new(storage);
    let size = chain.virtual_size();
    let mut sink = RawSink {
        stats: CopyStats::default(),
    };
    let writer = RawWriter {
        storage: storage.clone(),
        path: dest_s.clone(),
    };
    copy::run(
        Plan::new(size, ZERO_DETECT),
        |p| p.fill(|w, buf| read_data_window(chain, w, buf, ZERO_DETECT, false)),
        &mut sink,
        writer,
    )?;
    storage.set_len(size).at(&dest_s, "setting length", size)?;
    drop(storage);
    out.commit().on_file(&dest_s, "cannot finish output")?;
    Ok(sink.stats)
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
pub fn to_qcow2(chain: &Chain, dest: &Path, opts: &Qcow2ConvertOptions) -> Result<CopyStats> {
    to_qcow2_observed(chain, dest, opts, &mut |_, _| {})
}

/// [`to_qcow2`], reporting every written run of guest data to `observer`.
pub fn to_qcow2_observed(
    chain: &Chain,
    dest: &Path,
    opts: &Qcow2ConvertOptions,
    observer: WriteObserver<'_>,
) -> Result<CopyStats> {
    let dest_s = dest.display().to_string();
    let out = PendingFile::new(dest, opts.overwrite).on_file(&dest_s, "cannot create output")?;
    let storage = out
        .create_storage()
        .on_file(&dest_s, "cannot create output")?;
    let mut copts = opts.create.clone();
    if copts.size == 0 {
        copts.size = chain.virtual_size();
    }
    let mut img = init_qcow2(
        Arc::new(storage),
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
    out.commit().on_file(&dest_s, "cannot finish output")?;
    Ok(stats)
}

/// Copies the chain's non-zero clusters into an empty image of at least the same size.
pub fn copy_into(
    chain: &Chain,
    img: &mut Qcow2,
    compress: bool,
    throttle: &mut Throttle,
) -> Result<CopyStats> {
    copy_into_observed(chain, img, compress, false, throttle, &mut |_, _| {})
}

/// [`copy_into`], reporting every written run of guest data to `observer`, in guest order;
/// `share_blocks` as in [`Qcow2ConvertOptions`]. `img` must be new (nothing allocated).
/// Readers map and read the source (never what maps as zeros) and find the non-zero
/// clusters; compressed copies compress them on the readers too, so both cores work.
pub fn copy_into_observed(
    chain: &Chain,
    img: &mut Qcow2,
    compress: bool,
    share_blocks: bool,
    throttle: &mut Throttle,
    observer: WriteObserver<'_>,
) -> Result<CopyStats> {
    let cs = img.cluster_size();
    let plan = Plan::new(chain.virtual_size().min(img.virtual_size()), cs);
    let progress = Progress {
        stats: CopyStats::default(),
        throttle,
        observer,
    };
    if compress {
        let kind = img.header().compression_type;
        let mut sink = CompressedSink {
            image: img,
            progress,
        };
        copy::run(
            plan,
            |p| {
                p.fill(|w, buf| {
                    let read = read_data_window(chain, w, buf, cs, false)?;
                    compress_window(w, read, buf, kind, cs)
                })
            },
            &mut sink,
            NoWriter,
        )?;
        return Ok(sink.progress.stats);
    }
    let writer = HostWriter::new(img, chain, share_blocks);
    let mut sink = NewImageSink {
        image: img,
        progress,
    };
    copy::run(
        plan,
        |p| p.fill(|w, buf| read_data_window(chain, w, buf, cs, share_blocks)),
        &mut sink,
        writer,
    )?;
    Ok(sink.progress.stats)
}
