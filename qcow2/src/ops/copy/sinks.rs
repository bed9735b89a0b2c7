//! The sinks the copy engine writes into: a new qcow2 image (plain or compressed), an
//! existing image being committed into, a sparse raw file. A new sink is a [`Sink`] (the
//! ordered plan step) and a [`JobWriter`] (the write step); the engine does not change.

use super::source::{ByteRange, Change, DataWindow, Verbatim};
use super::{JobWriter, Sink, Window};
use crate::chain::Chain;
use crate::compress;
use crate::error::{Error, IoContext, Result};
use crate::format::header::CompressionType;
use crate::image::{Backing, Qcow2};
use crate::ops::throttle::Throttle;
use crate::storage::{clone_range, CloneOutcome, Storage, ZEROS};
use std::sync::Arc;

/// Called with every run of guest data written to the output, in guest order.
pub type WriteObserver<'a> = &'a mut dyn FnMut(u64, &[u8]);

/// What a copy wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Guest bytes of data written (zeros left out are not counted).
    pub bytes_written: u64,
    /// Guest bytes zeroed by range (writes over an existing target).
    pub bytes_zeroed: u64,
}

/// Accounting shared by the sinks: statistics, rate limit, observer.
pub struct Progress<'a> {
    pub stats: CopyStats,
    pub throttle: &'a mut Throttle,
    pub observer: WriteObserver<'a>,
}

impl Progress<'_> {
    fn wrote(&mut self, guest: u64, data: &[u8]) {
        (self.observer)(guest, data);
        self.stats.bytes_written += data.len() as u64;
        self.throttle.account(data.len() as u64);
    }
}

/// One write of a window's buffer: `len` bytes from `pos` to host offset `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostWrite {
    pub pos: usize,
    pub host: u64,
    pub len: usize,
}

/// The writer's part of a window: where its runs go, and what was read verbatim from where.
pub struct HostJob {
    pub writes: Vec<HostWrite>,
    pub verbatim: Vec<Verbatim>,
}

/// Plans windows into a new qcow2 image: clusters allocated in guest order.
pub struct NewImageSink<'a> {
    pub image: &'a mut Qcow2,
    pub progress: Progress<'a>,
}

impl Sink<DataWindow> for NewImageSink<'_> {
    type Job = HostJob;

    fn plan(&mut self, window: Window, item: DataWindow, data: &[u8]) -> Result<HostJob> {
        let mut writes = Vec::new();
        for r in &item.runs {
            let guest = window.offset + r.start as u64;
            for run in self.image.allocate_for_write(guest, r.len() as u64)? {
                writes.push(HostWrite {
                    pos: (run.guest - window.offset) as usize,
                    host: run.host,
                    len: run.len as usize,
                });
            }
            self.progress.wrote(guest, &data[r.start..r.end]);
        }
        Ok(HostJob {
            writes,
            verbatim: item.verbatim,
        })
    }
}

/// Ranges a layer may have refused to share in a row before the writer stops asking.
const MAX_REFUSED_IN_A_ROW: u32 = 64;

/// Writes jobs at their host offsets in a file; where `chain`'s layers and the file are on
/// a filesystem that can share blocks (XFS, btrfs), clones verbatim stretches instead.
pub struct HostWriter<'a> {
    storage: Arc<dyn Storage>,
    path: String,
    chain: &'a Chain,
    /// Per source layer: may its blocks be shared with the output? Cleared at the first
    /// refusal, so a filesystem without reflinks costs one failed call per layer.
    may_clone: Vec<bool>,
    /// Ranges refused in a row per layer: a source whose clusters are smaller than the
    /// filesystem's blocks (512-byte clusters, say) is refused every time; stop asking.
    refused: Vec<u32>,
}

impl<'a> HostWriter<'a> {
    pub fn new(image: &Qcow2, chain: &'a Chain, share_blocks: bool) -> HostWriter<'a> {
        let layers = chain.layers().len();
        HostWriter {
            storage: image.storage().clone(),
            path: image.path().to_string(),
            chain,
            may_clone: vec![share_blocks; layers],
            refused: vec![0; layers],
        }
    }

    fn write_data(&self, data: &[u8], host: u64) -> Result<()> {
        self.storage
            .write_at(data, host)
            .at(&self.path, "writing data", host)
    }

    /// Clones what it can of `[pos, end)` (written to `host`) from verbatim sources and
    /// writes the rest, one write per stretch between clones.
    fn clone_or_write(&mut self, job: &HostJob, w: HostWrite, data: &[u8]) -> Result<()> {
        let end = w.pos + w.len;
        let mut unwritten = w.pos;
        for src in &job.verbatim {
            let (s, e) = (src.pos.max(w.pos), (src.pos + src.len).min(end));
            if s >= e || !self.may_clone[src.layer] {
                continue;
            }
            let from = src.host + (s - src.pos) as u64;
            let to = w.host + (s - w.pos) as u64;
            let layer = self.chain.layers()[src.layer].data_storage();
            let outcome = clone_range(
                layer.as_ref(),
                from,
                self.storage.as_ref(),
                to,
                (e - s) as u64,
            )
            .at(&self.path, "cloning data", to)?;
            match outcome {
                CloneOutcome::Cloned => {
                    self.refused[src.layer] = 0;
                    if unwritten < s {
                        self.write_data(&data[unwritten..s], w.host + (unwritten - w.pos) as u64)?;
                    }
                    unwritten = e;
                }
                CloneOutcome::NotThisRange => {
                    self.refused[src.layer] += 1;
                    if self.refused[src.layer] >= MAX_REFUSED_IN_A_ROW {
                        self.may_clone[src.layer] = false;
                    }
                }
                CloneOutcome::Unsupported => self.may_clone[src.layer] = false,
            }
        }
        if unwritten < end {
            self.write_data(&data[unwritten..end], w.host + (unwritten - w.pos) as u64)?;
        }
        Ok(())
    }
}

impl JobWriter<HostJob> for HostWriter<'_> {
    fn write(&mut self, job: HostJob, data: &[u8]) -> Result<()> {
        for &w in &job.writes {
            if self.may_clone.iter().any(|&m| m) {
                self.clone_or_write(&job, w, data)?;
            } else {
                self.write_data(&data[w.pos..w.pos + w.len], w.host)?;
            }
        }
        Ok(())
    }
}

/// A window's non-zero clusters, compressed by the reader (both cores compress).
pub struct CompressedWindow {
    pub runs: Vec<ByteRange>,
    /// The non-zero clusters in `runs`, in order.
    pub clusters: Vec<CompressedCluster>,
}

pub struct CompressedCluster {
    pub guest_cluster: u64,
    /// None when the cluster does not compress and is stored plainly.
    pub packed: Option<Vec<u8>>,
}

/// Compresses the non-zero clusters of a window read by [`super::source::read_data_window`]
/// (with the output's cluster size as unit); clusters cut by the disk's end are padded.
pub fn compress_window(
    window: Window,
    read: DataWindow,
    data: &[u8],
    kind: CompressionType,
    cluster_size: u64,
) -> Result<CompressedWindow> {
    let cs = cluster_size as usize;
    let mut clusters = Vec::new();
    let mut padded = vec![0u8; cs];
    for r in &read.runs {
        for (k, c) in data[r.start..r.end].chunks(cs).enumerate() {
            let guest = window.offset + (r.start + k * cs) as u64;
            let input = if c.len() == cs {
                c
            } else {
                padded[..c.len()].copy_from_slice(c);
                padded[c.len()..].fill(0);
                &padded[..]
            };
            let packed = compress::compress(kind, input)
                .map_err(|e| Error::internal("", format!("compression failed: {e}")))?;
            clusters.push(CompressedCluster {
                guest_cluster: guest / cluster_size,
                packed,
            });
        }
    }
    Ok(CompressedWindow {
        runs: read.runs,
        clusters,
    })
}

/// Stores compressed clusters into a new image (in the plan step: placing compressed data
/// packs it, so it is done in guest order by the image's owner).
pub struct CompressedSink<'a> {
    pub image: &'a mut Qcow2,
    pub progress: Progress<'a>,
}

impl Sink<CompressedWindow> for CompressedSink<'_> {
    type Job = ();

    fn plan(&mut self, window: Window, item: CompressedWindow, data: &[u8]) -> Result<()> {
        let cs = self.image.cluster_size();
        for c in &item.clusters {
            let pos = (c.guest_cluster * cs - window.offset) as usize;
            let plain = &data[pos..(pos + cs as usize).min(window.len as usize)];
            self.image
                .write_precompressed(c.guest_cluster, c.packed.as_deref(), plain)?;
        }
        for r in &item.runs {
            self.progress
                .wrote(window.offset + r.start as u64, &data[r.start..r.end]);
        }
        Ok(())
    }
}

/// What a commit did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitStats {
    pub bytes_copied: u64,
    pub bytes_zeroed: u64,
}

/// Applies the changes above a layer to the base image, through its own write path (in
/// the plan step: it needs the image mutably, and in-place writes are cheap).
pub struct CommitSink<'a> {
    pub base: &'a mut Qcow2,
    /// What lies below the base (for partial-cluster copy-on-write).
    pub base_backing: Option<&'a dyn Backing>,
    pub throttle: &'a mut Throttle,
    pub stats: CommitStats,
}

impl Sink<Vec<Change>> for CommitSink<'_> {
    type Job = ();

    fn plan(&mut self, _: Window, changes: Vec<Change>, data: &[u8]) -> Result<()> {
        for change in changes {
            match change {
                Change::Data { offset, pos, len } => {
                    let bytes = &data[pos..pos + len];
                    self.base.write_at(bytes, offset, self.base_backing)?;
                    self.throttle.account(len as u64);
                    self.stats.bytes_copied += len as u64;
                }
                Change::Zero { offset, len } => {
                    self.base
                        .write_zeroes(offset, len, true, self.base_backing)?;
                    self.stats.bytes_zeroed += len;
                }
            }
        }
        Ok(())
    }
}

/// Plans windows into raw output: the runs go where they are (guest offset = output
/// offset); what the writer does with the zeros between them is its own business.
pub struct RawSink<'a> {
    pub progress: Progress<'a>,
}

impl Sink<DataWindow> for RawSink<'_> {
    type Job = RawJob;

    fn plan(&mut self, window: Window, item: DataWindow, data: &[u8]) -> Result<RawJob> {
        for r in &item.runs {
            self.progress
                .wrote(window.offset + r.start as u64, &data[r.start..r.end]);
        }
        Ok(RawJob {
            window,
            runs: item.runs,
        })
    }
}

/// A window's non-zero runs, for the raw writers; the rest of the window reads as zeros.
pub struct RawJob {
    pub window: Window,
    pub runs: Vec<ByteRange>,
}

impl RawJob {
    /// The window's pieces in order: `Ok(run)` holds data, `Err(range)` reads as zeros.
    fn pieces(&self) -> impl Iterator<Item = std::result::Result<ByteRange, ByteRange>> + '_ {
        let len = self.window.len as usize;
        let mut at = 0usize;
        let mut runs = self.runs.iter().peekable();
        std::iter::from_fn(move || {
            if at >= len {
                return None;
            }
            match runs.peek() {
                Some(r) if r.start == at => {
                    at = r.end;
                    runs.next().map(|r| Ok(*r))
                }
                next => {
                    let end = next.map_or(len, |r| r.start);
                    let gap = ByteRange { start: at, end };
                    at = end;
                    Some(Err(gap))
                }
            }
        })
    }
}

/// Writes the runs of windows at their guest offsets into a new sparse file: the zeros
/// between them stay holes.
pub struct RawWriter {
    pub storage: Arc<dyn Storage>,
    pub path: String,
}

impl JobWriter<RawJob> for RawWriter {
    fn write(&mut self, job: RawJob, data: &[u8]) -> Result<()> {
        for r in job.runs {
            let at = job.window.offset + r.start as u64;
            self.storage
                .write_at(&data[r.start..r.end], at)
                .at(&self.path, "writing", at)?;
        }
        Ok(())
    }
}

/// Writes over an existing device or file in place: the runs at their guest offsets, and
/// (unless told the target is already zero) the zeros between them as zeroed ranges, never
/// as zero buffers; consecutive zero ranges are zeroed in one call. Windows the copy
/// skipped (no data) are zeros too; [`InPlaceRawWriter::finish`] covers the disk's tail.
pub struct InPlaceRawWriter {
    pub storage: Arc<dyn Storage>,
    pub path: String,
    /// Zero what reads as zero (off for a target known to be all zeros: a fresh thin LV).
    pub zero: bool,
    /// A zero range not yet zeroed: `[start, end)` in guest bytes.
    pending: Option<(u64, u64)>,
    /// Where the last window written ended: what lies between it and the next is zeros.
    next: u64,
    /// Guest bytes zeroed so far.
    pub zeroed: u64,
}

impl InPlaceRawWriter {
    pub fn new(storage: Arc<dyn Storage>, path: String, zero: bool) -> InPlaceRawWriter {
        InPlaceRawWriter {
            storage,
            path,
            zero,
            pending: None,
            next: 0,
            zeroed: 0,
        }
    }

    /// After the copy: zeroes what is left up to `size` (windows after the last one with
    /// data) and what is pending.
    pub fn finish(&mut self, size: u64) -> Result<()> {
        if self.zero && self.next < size {
            self.zero_later(self.next, size)?;
        }
        self.next = size;
        self.zero_pending()
    }

    /// Adds `[start, end)` to the pending range (zeroing what was pending first when the
    /// two do not touch).
    fn zero_later(&mut self, start: u64, end: u64) -> Result<()> {
        match &mut self.pending {
            Some((_, e)) if *e == start => *e = end,
            _ => {
                self.zero_pending()?;
                self.pending = Some((start, end));
            }
        }
        Ok(())
    }

    /// Zeroes the pending range.
    fn zero_pending(&mut self) -> Result<()> {
        if let Some((s, e)) = self.pending.take() {
            self.storage
                .zero_range(s, e - s)
                .at(&self.path, "zeroing", s)?;
            self.zeroed += e - s;
        }
        Ok(())
    }
}

impl JobWriter<RawJob> for &mut InPlaceRawWriter {
    fn write(&mut self, job: RawJob, data: &[u8]) -> Result<()> {
        let base = job.window.offset;
        if self.zero && self.next < base {
            self.zero_later(self.next, base)?;
        }
        self.next = job.window.end();
        for piece in job.pieces() {
            match piece {
                Ok(r) => {
                    self.zero_pending()?;
                    let at = base + r.start as u64;
                    self.storage
                        .write_at(&data[r.start..r.end], at)
                        .at(&self.path, "writing", at)?;
                }
                Err(gap) if self.zero => {
                    self.zero_later(base + gap.start as u64, base + gap.end as u64)?
                }
                Err(_) => {}
            }
        }
        Ok(())
    }
}

/// Writes the whole disk in guest order to a stream (a pipe, standard output): data and
/// zeros alike, the windows the copy skipped (no data) as zeros, and the disk's tail by
/// [`StreamWriter::finish`].
pub struct StreamWriter<'a> {
    out: &'a mut (dyn std::io::Write + Send),
    name: String,
    /// Bytes of the disk written so far.
    next: u64,
}

impl<'a> StreamWriter<'a> {
    pub fn new(out: &'a mut (dyn std::io::Write + Send), name: String) -> StreamWriter<'a> {
        StreamWriter { out, name, next: 0 }
    }

    fn put(&mut self, bytes: &[u8], at: u64) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| stream_error(&self.name, at, e))
    }

    /// Writes `len` zeros at guest offset `at`, a mebibyte at a time.
    fn put_zeros(&mut self, at: u64, len: u64) -> Result<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROS.len() as u64);
            self.put(&ZEROS[..n as usize], at + done)?;
            done += n;
        }
        Ok(())
    }

    /// After the copy: zeros up to `size`, and the stream flushed.
    pub fn finish(&mut self, size: u64) -> Result<()> {
        if self.next < size {
            self.put_zeros(self.next, size - self.next)?;
            self.next = size;
        }
        self.out
            .flush()
            .map_err(|e| Error::io(&self.name, "writing the stream", size, e))
    }
}

/// A reader that went away (`| head`) is said plainly.
fn stream_error(name: &str, at: u64, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Error::usage(
            name,
            format!("the reader closed the stream while byte {at} was being written: the output is incomplete"),
        )
    } else {
        Error::io(name, "writing the stream", at, e)
    }
}

impl JobWriter<RawJob> for &mut StreamWriter<'_> {
    fn write(&mut self, job: RawJob, data: &[u8]) -> Result<()> {
        let base = job.window.offset;
        if self.next < base {
            self.put_zeros(self.next, base - self.next)?;
        }
        self.next = job.window.end();
        for piece in job.pieces() {
            match piece {
                Ok(r) => self.put(&data[r.start..r.end], base + r.start as u64)?,
                Err(gap) => self.put_zeros(base + gap.start as u64, gap.len() as u64)?,
            }
        }
        Ok(())
    }
}
