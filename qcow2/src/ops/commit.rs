//! `commit`: the data of an image (and of the images between it and BASE) written into
//! BASE, as qemu-img commit does.

use super::copy::sinks::CommitSink;
pub use super::copy::sinks::CommitStats;
use super::copy::source::{for_each_gap, read_changes_above};
use super::copy::{self, NoWriter, Plan, WindowSet};
use crate::chain::{as_backing, open_backing_of, Chain, OpenOptions};
use crate::error::{Error, Result};
use crate::image::write::OpenRwOptions;
use crate::image::{Backing, Qcow2};
use crate::mapping::ExtentKind;
use crate::ops::throttle::Throttle;
use std::path::Path;

/// Guest bytes a commit reader maps per window.
const COMMIT_WINDOW: u64 = 64 << 20;

#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// The chain member to commit into (default: the image's backing file).
    pub base: Option<String>,
    /// Leave the top image untouched (implied by `base`).
    pub drop: bool,
    /// Bytes per second, 0 = unlimited.
    pub rate_limit: u64,
}

pub fn commit(top: &Path, opts: &CommitOptions) -> Result<CommitStats> {
    let top_s = top.display().to_string();
    let chain = Chain::open(top, &OpenOptions::default())?;
    if chain.layers().len() < 2 {
        return Err(Error::usage(&top_s, "Image does not have a backing file"));
    }
    let base_idx = match &opts.base {
        Some(b) => chain.find_member(b).ok_or_else(|| {
            Error::bad_request(format!(
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
        as_backing(base_backing.as_ref()),
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
/// Readers map and read the upper layers window by window; `base` is written in guest order.
pub fn commit_into(
    base: &mut Qcow2,
    base_backing: Option<&dyn Backing>,
    chain: &Chain,
    above: usize,
    throttle: &mut Throttle,
) -> Result<CommitStats> {
    // Zeros above BASE (past an upper image's end) must hide BASE's own backing.
    let zero_unallocated = base_backing.is_some();
    commit_changes(
        base,
        base_backing,
        chain,
        above,
        &[],
        zero_unallocated,
        throttle,
    )
}

/// [`commit_into`], except that the guest ranges of `keep` (sorted, disjoint) are left as
/// `base` has them. Folding older images *under* `base`: with `chain` the stack below
/// `base` and `keep` what `base` itself allocates, `base` ends up carrying every change
/// of the layers above `above` that it did not overwrite, and reads as before. Writes
/// only fill what `base` does not allocate, so a crash at any point leaves `base`
/// reading the same through its backing.
pub fn commit_into_except(
    base: &mut Qcow2,
    base_backing: Option<&dyn Backing>,
    chain: &Chain,
    above: usize,
    keep: &[std::ops::Range<u64>],
    throttle: &mut Throttle,
) -> Result<CommitStats> {
    commit_changes(base, base_backing, chain, above, keep, false, throttle)
}

/// [`commit_into`] of an image opened alone (`chain` one layer, nothing below it) into
/// `base`, which has `base_backing` below it: what the image does not allocate is no
/// change (it would read from below), and partial clusters written into `base` are
/// completed from `base_backing`.
pub fn commit_alone_into(
    base: &mut Qcow2,
    base_backing: Option<&dyn Backing>,
    chain: &Chain,
    throttle: &mut Throttle,
) -> Result<CommitStats> {
    commit_changes(base, base_backing, chain, 1, &[], false, throttle)
}

/// The body of the commits: `zero_unallocated` turns what no layer above `above`
/// allocates (past an upper image's end) into zeros.
fn commit_changes(
    base: &mut Qcow2,
    base_backing: Option<&dyn Backing>,
    chain: &Chain,
    above: usize,
    keep: &[std::ops::Range<u64>],
    zero_unallocated: bool,
    throttle: &mut Throttle,
) -> Result<CommitStats> {
    let size = chain.virtual_size();
    base.grow(size)?;
    // Upper layers are mostly scattered clusters: wide windows, their data packed, so each
    // hand-off carries a buffer's worth (a hand-off per few clusters costs more in thread
    // wake-ups than the copy). One reader: the plan step writes (through the base's own
    // write path) and one reader keeps up with it; a second only competes for the cores.
    let plan = Plan {
        readers: 1,
        ..Plan::new(size, base.cluster_size()).with_window(COMMIT_WINDOW)
    };
    let mut sink = CommitSink {
        base,
        base_backing,
        throttle,
        stats: CommitStats::default(),
    };
    // Only the windows holding a change (what `read_changes_above` acts on): a sparse
    // disk of many TiB costs what its changes cost, not a hand-off per empty window.
    let mut windows = WindowSet::default();
    chain.for_each_extent_above(0, size, above, |e| {
        let changes = match e.kind {
            ExtentKind::Unallocated => zero_unallocated,
            _ => true,
        };
        if e.depth < above && changes {
            for_each_gap(keep, e.start, e.end(), |a, b| {
                windows.add_bytes(&plan, a, b);
                Ok(())
            })?;
        }
        Ok(())
    })?;
    copy::run(
        plan,
        &windows,
        |p| read_changes_above(chain, above, zero_unallocated, keep, p),
        &mut sink,
        NoWriter,
    )?;
    Ok(sink.stats)
}
