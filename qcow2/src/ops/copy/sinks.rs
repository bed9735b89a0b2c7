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
use crate::storage::{clone_range, CloneOutcome, Storage};
use std::sync::Arc;

/// Called with every run of guest data written to the output, in guest order.
pub type WriteObserver<'a> = &'a mut dyn FnMut(u64, &[u8]);

/// What a copy wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Guest bytes of data written (zeros left out are not counted).
    pub bytes_written: u64,
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

/// Plans windows into a sparse raw file: the runs go where they are (guest offset = file
/// offset); zero blocks stay holes.
pub struct RawSink {
    pub stats: CopyStats,
}

impl Sink<DataWindow> for RawSink {
    type Job = RawJob;

    fn plan(&mut self, window: Window, item: DataWindow, _: &[u8]) -> Result<RawJob> {
        self.stats.bytes_written += item.runs.iter().map(|r| r.len() as u64).sum::<u64>();
        Ok(RawJob {
            offset: window.offset,
            runs: item.runs,
        })
    }
}

/// A window's runs, for the raw writer.
pub struct RawJob {
    /// The window's guest offset.
    pub offset: u64,
    pub runs: Vec<ByteRange>,
}

/// Writes runs of windows at their guest offsets into a file.
pub struct RawWriter {
    pub storage: Arc<dyn Storage>,
    pub path: String,
}

impl JobWriter<RawJob> for RawWriter {
    fn write(&mut self, job: RawJob, data: &[u8]) -> Result<()> {
        for r in job.runs {
            let at = job.offset + r.start as u64;
            self.storage
                .write_at(&data[r.start..r.end], at)
                .at(&self.path, "writing", at)?;
        }
        Ok(())
    }
}
