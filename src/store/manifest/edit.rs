//! Keeping a FULL's manifest true while a commit changes the FULL in place, block by block:
//! the blocks the commit changes are checked against the manifest before it starts, and
//! get checksums of their new content after it; every other block keeps its recorded
//! checksum, so rot elsewhere in the FULL stays detectable (recomputing the whole manifest
//! would bless it).
//!
//! Between the first change and the new manifest, a pending file (`.<FULL>.commit-pending`)
//! lists the blocks being changed. A run interrupted there leaves it; the next command that
//! changes the FULL recomputes those blocks first ([`recover`]), since their recorded
//! checksums cannot be true any more.

use crate::fsutil::open_parent;
use crate::fsutil::Dir;
use crate::store::manifest::delta::{self, merge_ranges, whole_blocks, DeltaPlan};
use crate::store::manifest::runs::{allocated_spans, compute_runs_in, overlapping, CheckedRun};
use crate::store::manifest::verify::RunVerifier;
use crate::store::manifest::{load_manifest, open_alone, store, Manifest};
use anyhow::{Context, Result};
use qcow2::Chain;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The largest pending file read back (a list of ranges: far more than any disk needs).
const MAX_PENDING_BYTES: u64 = 512 << 20;

/// The pending file of the FULL named `full_name`: a dot file, never taken for a backup.
pub fn pending_name(full_name: &str) -> String {
    format!(".{full_name}.commit-pending")
}

/// The manifest of a FULL that commits change in place, loaded once for all of them.
pub struct FullEdit {
    image: PathBuf,
    dir: Dir,
    name: String,
    manifest: Manifest,
    /// Block-aligned guest ranges the commit under way may change (sorted, disjoint).
    touched: Vec<Range<u64>>,
    /// The commit under way, planned from the data it replaces and writes (see
    /// [`delta`]); None: the touched blocks are re-read afterwards.
    delta: Option<DeltaPlan>,
}

/// What a commit of an INC changes in a FULL, in whole blocks of the FULL's manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedBlocks {
    /// Every block the commit may change (sorted, disjoint).
    pub touched: Vec<Range<u64>>,
    /// The touched blocks the INC does not overwrite whole: the FULL's old data survives
    /// there in part, so it is checked before the commit.
    pub partly: Vec<Range<u64>>,
}

/// The blocks (of `block` bytes) a commit of `inc` (opened alone) into a FULL of
/// `full_size` bytes with `full_cluster` clusters may change: the INC's own allocation, and
/// the tail of the FULL's last cluster past its size when the INC is larger (the commit
/// zeroes it).
pub fn changed_blocks(
    inc: &Chain,
    full_size: u64,
    full_cluster: u64,
    block: u64,
) -> Result<ChangedBlocks> {
    let inc_size = inc.virtual_size();
    let new_size = inc_size.max(full_size);
    let spans = allocated_spans(inc, 0, inc_size)?;
    let mut changed = spans.clone();
    if inc_size > full_size && !full_size.is_multiple_of(full_cluster) {
        let tail = full_size..full_size.next_multiple_of(full_cluster).min(new_size);
        let at = changed.partition_point(|s| s.start < tail.start);
        changed.insert(at, tail);
    }
    let touched = whole_blocks(&changed, block, new_size);
    let whole = merge_ranges(spans.iter().filter_map(|s| {
        let (a, b) = (s.start.div_ceil(block) * block, s.end / block * block);
        (a < b).then_some(a..b)
    }));
    let partly = subtract(&touched, &whole);
    Ok(ChangedBlocks { touched, partly })
}

/// Ranges in any order as sorted, disjoint ones.
fn union(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    merge_ranges(ranges.into_iter())
}

/// `a` without `b` (both sorted and disjoint).
fn subtract(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut j = 0;
    for r in a {
        let mut pos = r.start;
        while j < b.len() && b[j].end <= pos {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].start < r.end {
            if b[k].start > pos {
                out.push(pos..b[k].start);
            }
            pos = pos.max(b[k].end);
            k += 1;
        }
        if pos < r.end {
            out.push(pos..r.end);
        }
    }
    out
}

impl FullEdit {
    /// The manifest of the FULL `image`, for commits into it; None without one (nothing to
    /// keep). The blocks commits change were checked by [`check_full`] before the first.
    pub fn open(image: &Path) -> Result<Option<FullEdit>> {
        let Some(manifest) = load_manifest(image)? else {
            return Ok(None);
        };
        let (dir, name) = open_parent(image)?;
        Ok(Some(FullEdit {
            image: image.to_path_buf(),
            dir,
            name,
            manifest,
            touched: Vec::new(),
            delta: None,
        }))
    }

    /// Before a commit of `inc` (opened alone) into the FULL, which is `full_size` bytes
    /// with `full_cluster` clusters: the blocks it may change are written to the pending
    /// file.
    pub fn begin(&mut self, inc: &Chain, full_size: u64, full_cluster: u64) -> Result<()> {
        let target = open_alone(&self.image)?;
        if delta::applies(inc, &target) {
            let plan = DeltaPlan::new(
                inc,
                &target,
                &self.manifest.runs,
                self.manifest.header.block_size,
            );
            if let Some(plan) = self.fallback_on_mismatch(plan)? {
                let touched = plan.touched.clone();
                self.delta = Some(plan);
                return self.begin_blocks(touched);
            }
        }
        let touched = changed_blocks(
            inc,
            full_size,
            full_cluster,
            self.manifest.header.block_size,
        )?
        .touched;
        self.begin_blocks(touched)
    }

    /// Before `spans` (sorted, disjoint: start, end, data or zeros) are written into
    /// the image where it allocates nothing: the manifest's update is planned from the
    /// new data alone (`read_new` reads it), see [`delta`].
    pub fn begin_changes(
        &mut self,
        spans: &[(u64, u64, bool)],
        read_new: impl FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        let target = open_alone(&self.image)?;
        let plan = DeltaPlan::from_changes(
            &target,
            &self.manifest.runs,
            self.manifest.header.block_size,
            spans,
            read_new,
        );
        match self.fallback_on_mismatch(plan)? {
            Some(plan) => {
                let touched = plan.touched.clone();
                self.delta = Some(plan);
                self.begin_blocks(touched)
            }
            None => {
                let size = target.virtual_size();
                let changed: Vec<Range<u64>> = spans.iter().map(|&(a, b, _)| a..b).collect();
                self.begin_ranges(&changed, size)
            }
        }
    }

    /// A plan that failed because the manifest does not record the file's allocation
    /// (checked before the first change when checksums are on, so only with
    /// `--ignore-checksums`): None, with a warning, and the blocks are re-read after.
    fn fallback_on_mismatch(&self, plan: Result<DeltaPlan>) -> Result<Option<DeltaPlan>> {
        match plan {
            Ok(p) => Ok(Some(p)),
            Err(e) if e.downcast_ref::<delta::AllocationMismatch>().is_some() => {
                crate::report::warn(format!(
                    "{}: {e}; the checksums of the blocks changed are recomputed from the file",
                    self.image.display()
                ));
                Ok(None)
            }
            Err(e) => Err(e.context(format!("{}", self.image.display()))),
        }
    }

    /// Before a change of the guest ranges `changed` (sorted, disjoint) of an image of
    /// `size` bytes: their blocks are written to the pending file.
    pub fn begin_ranges(&mut self, changed: &[Range<u64>], size: u64) -> Result<()> {
        let touched = whole_blocks(changed, self.manifest.header.block_size, size);
        self.begin_blocks(touched)
    }

    fn begin_blocks(&mut self, touched: Vec<Range<u64>>) -> Result<()> {
        self.touched = touched;
        let pending = pending_name(&self.name);
        let ranges: Vec<(u64, u64)> = self.touched.iter().map(|r| (r.start, r.end)).collect();
        let bytes = serde_json::to_vec(&serde_json::json!({
            "file": self.name,
            "ranges": ranges,
        }))?;
        self.dir
            .write_atomic(&pending, &bytes)
            .with_context(|| format!("{}: cannot write", self.dir.join(&pending).display()))
    }

    /// After the commit, with the FULL flushed: the changed blocks get checksums of their
    /// content now, the rest keep theirs; the manifest is replaced and the pending file
    /// removed.
    pub fn finish(&mut self) -> Result<()> {
        let touched = std::mem::take(&mut self.touched);
        match self.delta.take() {
            Some(plan) => self.apply_delta(&plan)?,
            None => replace_ranges(&self.image, &mut self.manifest, &touched)?,
        }
        let pending = pending_name(&self.name);
        self.dir
            .remove(&pending)
            .with_context(|| format!("{}: cannot remove", self.dir.join(&pending).display()))
    }
}

impl FullEdit {
    /// The runs of the touched blocks as planned, where the image now allocates what the
    /// plan says; a block where it does not (a commit that wrote otherwise than planned)
    /// is re-read instead.
    fn apply_delta(&mut self, plan: &DeltaPlan) -> Result<()> {
        let block = self.manifest.header.block_size;
        let chain = open_alone(&self.image)?;
        let planned = plan.runs_after(&self.manifest.runs, block);
        let mut fresh: Vec<CheckedRun> = Vec::with_capacity(planned.len());
        for b in &plan.touched {
            let want = delta::merge_ranges(
                planned
                    .iter()
                    .filter(|r| r.start >= b.start && r.end() <= b.end)
                    .map(|r| r.start..r.end()),
            );
            if delta::allocation(&chain, std::slice::from_ref(b))? == want {
                fresh.extend(
                    planned
                        .iter()
                        .filter(|r| r.start >= b.start && r.end() <= b.end),
                );
            } else {
                crate::report::debug(format!(
                    "{}: blocks {:#x}..{:#x} allocated otherwise than planned; their checksums are re-read",
                    self.image.display(),
                    b.start,
                    b.end
                ));
                // Runs the commit did not change keep their recorded checksums: rot in
                // them stays detectable even here.
                let old = &self.manifest.runs;
                for mut f in compute_runs_in(&chain, std::slice::from_ref(b), block)? {
                    let same = overlapping(old, f.start, f.end())
                        .find(|&i| old[i].start == f.start && old[i].len == f.len);
                    if let Some(i) = same.filter(|&i| !plan.changes_run(i, &old[i])) {
                        f.crc = old[i].crc;
                    }
                    fresh.push(f);
                }
            }
        }
        splice_runs(&mut self.manifest, &plan.touched, fresh);
        self.manifest.header.virtual_size = chain.virtual_size();
        store(&self.image, &self.manifest)
    }
}

/// Replaces the runs of `m` within `ranges` (whole blocks, sorted) with `fresh`.
fn splice_runs(m: &mut Manifest, ranges: &[Range<u64>], fresh: Vec<CheckedRun>) {
    let mut kept: Vec<CheckedRun> = Vec::with_capacity(m.runs.len() + fresh.len());
    let mut r = ranges.iter().peekable();
    for run in m.runs.drain(..) {
        while r.peek().is_some_and(|x| x.end <= run.start) {
            r.next();
        }
        if r.peek().is_none_or(|x| x.start > run.start) {
            kept.push(run);
        }
    }
    kept.extend(fresh);
    kept.sort_by_key(|r| r.start);
    m.runs = kept;
}

fn cluster_size(image: &Chain) -> u64 {
    image.top().as_qcow2().map_or(512, |q| q.cluster_size())
}

/// Before commits of `incs` (opened alone, in order) change the FULL `image`: the blocks
/// of the FULL they change but do not overwrite whole are checked against its manifest, so
/// rot there is found before anything changes instead of being blessed with a new
/// checksum. What counts is the first INC that touches a block: if it overwrites the block
/// whole, the FULL's old data there is gone, and later INCs find checked data.
pub fn check_full(image: &Path, incs: &[Chain]) -> Result<()> {
    let Some(manifest) = load_manifest(image)? else {
        return Ok(());
    };
    let full = open_alone(image)?;
    let size = full.virtual_size();
    let mut partly: Vec<Range<u64>> = Vec::new();
    let mut seen: Vec<Range<u64>> = Vec::new();
    for inc in incs {
        let blocks = changed_blocks(inc, size, cluster_size(&full), manifest.header.block_size)?;
        // Updated by delta: rot in what the commit leaves alone stays detectable without
        // a check now (the block is not re-read and blessed).
        if delta::applies(inc, &full) {
            // The delta update needs the manifest to record the allocation it changes:
            // checked for every INC before the first commit (metadata only).
            if let Some(at) = delta::allocation_mismatch(&full, &manifest.runs, &blocks.touched)? {
                return Err(anyhow::Error::new(delta::AllocationMismatch(at))
                    .context(format!("{}: nothing was changed", image.display())));
            }
            // Blocks it overwrites whole need no check by later INCs either: the old
            // data is gone. What it changes in part is not checked (see above), so a
            // later INC re-reading such a block checks it first.
            seen.extend(subtract(&blocks.touched, &blocks.partly));
        } else {
            partly.extend(subtract(&blocks.partly, &seen));
            partly = union(partly);
            seen.extend(blocks.touched);
        }
        seen = union(seen);
    }
    RunVerifier::new(&full, image.display().to_string())
        .ranges(&manifest.runs, &clipped(&partly, size))
        .context("found in a part of the full backup a commit would change; nothing was changed")
}

/// Before the guest ranges `changed` (sorted, disjoint) of `image` are written and its
/// manifest updated by delta: the manifest must record the file's allocation in their
/// blocks (metadata only).
pub fn check_recorded_allocation(image: &Path, changed: &[Range<u64>]) -> Result<()> {
    let Some(manifest) = load_manifest(image)? else {
        return Ok(());
    };
    let chain = open_alone(image)?;
    let blocks = whole_blocks(changed, manifest.header.block_size, chain.virtual_size());
    if let Some(at) = delta::allocation_mismatch(&chain, &manifest.runs, &blocks)? {
        return Err(anyhow::Error::new(delta::AllocationMismatch(at))
            .context(format!("{}: nothing was changed", image.display())));
    }
    Ok(())
}

/// Before the guest ranges `changed` (sorted, disjoint) of `image` are written: every
/// block holding one is checked against the manifest (the data of the image's own there
/// keeps its checksums only if it is sound now).
pub fn check_blocks(image: &Path, changed: &[Range<u64>]) -> Result<()> {
    let Some(manifest) = load_manifest(image)? else {
        return Ok(());
    };
    let chain = open_alone(image)?;
    let size = chain.virtual_size();
    let blocks = whole_blocks(changed, manifest.header.block_size, size);
    RunVerifier::new(&chain, image.display().to_string())
        .ranges(&manifest.runs, &clipped(&blocks, size))
        .context("found in a part of the backup a prune would change; nothing was changed")
}

/// `ranges` limited to `size` bytes.
fn clipped(ranges: &[Range<u64>], size: u64) -> Vec<Range<u64>> {
    ranges
        .iter()
        .filter(|r| r.start < size)
        .map(|r| r.start..r.end.min(size))
        .collect()
}

/// Rewrites `m` (the manifest of `image`), in memory and on disk: runs within `ranges`
/// (block-aligned, sorted, disjoint) computed from the image as it is now, the others kept.
fn replace_ranges(image: &Path, m: &mut Manifest, ranges: &[Range<u64>]) -> Result<()> {
    let chain = open_alone(image)?;
    let size = chain.virtual_size();
    let ranges = clipped(ranges, size);
    let fresh = compute_runs_in(&chain, &ranges, m.header.block_size)?;
    // A run lies within one block and ranges are whole blocks: each old run is inside a
    // range or outside all of them.
    splice_runs(m, &ranges, fresh);
    m.header.virtual_size = size;
    store(image, m)
}

/// Whether an interrupted commit left part of `image`'s manifest stale.
pub fn is_pending(image: &Path) -> bool {
    let (Some(dir), Some(name)) = (image.parent(), image.file_name()) else {
        return false;
    };
    let name = name.to_string_lossy();
    dir.join(pending_name(&name)).symlink_metadata().is_ok()
}

/// Repairs what an interrupted commit left: the blocks its pending file lists get checksums
/// of the FULL's content now (their recorded ones cannot be true any more), then the file is
/// removed. A pending file that cannot be read stands for every block. Returns the bytes
/// whose checksums were recomputed, None when nothing was pending.
pub fn recover(image: &Path) -> Result<Option<u64>> {
    let (dir, name) = open_parent(image)?;
    let pending = pending_name(&name);
    let listed = match dir.read_small(&pending, MAX_PENDING_BYTES) {
        Ok(None) => return Ok(None),
        Ok(Some(bytes)) => parse_pending(&bytes),
        Err(_) => None,
    };
    if let Some(mut m) = load_manifest(image)? {
        let ranges = listed.unwrap_or_else(|| std::iter::once(0..u64::MAX).collect());
        replace_ranges(image, &mut m, &ranges)?;
        let bytes = clipped(&ranges, open_alone(image)?.virtual_size())
            .iter()
            .map(|r| r.end - r.start)
            .sum();
        dir.remove(&pending)
            .with_context(|| format!("{}: cannot remove", dir.join(&pending).display()))?;
        return Ok(Some(bytes));
    }
    dir.remove(&pending)
        .with_context(|| format!("{}: cannot remove", dir.join(&pending).display()))?;
    Ok(Some(0))
}

/// The ranges of a pending file: sorted and disjoint, else None.
fn parse_pending(bytes: &[u8]) -> Option<Vec<Range<u64>>> {
    #[derive(serde::Deserialize)]
    struct Pending {
        ranges: Vec<(u64, u64)>,
    }
    let p: Pending = serde_json::from_slice(bytes).ok()?;
    let mut prev = 0;
    let mut out = Vec::with_capacity(p.ranges.len());
    for (a, b) in p.ranges {
        if a < prev || b <= a {
            return None;
        }
        prev = b;
        out.push(a..b);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use crate::store::manifest::edit::{parse_pending, subtract};

    #[test]
    fn subtract_leaves_what_the_second_list_does_not_cover() {
        let r = |v: &[(u64, u64)]| v.iter().map(|&(a, b)| a..b).collect::<Vec<_>>();
        assert_eq!(
            subtract(&r(&[(0, 10), (20, 30), (40, 50)]), &r(&[(5, 25), (40, 50)])),
            r(&[(0, 5), (25, 30)])
        );
        assert_eq!(subtract(&r(&[(0, 10)]), &r(&[])), r(&[(0, 10)]));
        assert_eq!(
            subtract(&r(&[(0, 10)]), &r(&[(2, 3), (5, 6)])),
            r(&[(0, 2), (3, 5), (6, 10)])
        );
        assert_eq!(subtract(&r(&[(0, 10)]), &r(&[(0, 10)])), r(&[]));
    }

    #[test]
    fn pending_files_that_do_not_list_sorted_ranges_stand_for_everything() {
        assert_eq!(
            parse_pending(br#"{"file":"F","ranges":[[0,4096],[8192,16384]]}"#),
            Some(vec![0..4096, 8192..16384])
        );
        for bad in [
            &br#"{"ranges":[[4096,0]]}"#[..],
            br#"{"ranges":[[8192,16384],[0,4096]]}"#,
            br#"{"ranges":"x"}"#,
            b"",
        ] {
            assert_eq!(parse_pending(bad), None);
        }
    }
}
