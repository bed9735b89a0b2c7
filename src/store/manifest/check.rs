//! Checking what a chain reads against the manifests of its files, as it reads: a merge, a
//! raw restore or an NBD export never passes on a block that does not match its checksum.
//!
//! A stretch read from a file is checked against the runs its manifest records there; a
//! run read only in part (a later file overwrites the rest) is completed from the file
//! itself, once, so the extra reading is bounded by the block size (64 MiB for version-1
//! manifests). What a file does *not* hold is checked too: where a read falls through a
//! file to an older one, that file's manifest must record nothing, or its metadata lost a
//! cluster.

use crate::store::manifest::runs::{
    hash_layer, hash_zeros, overlapping, zero_crc, CheckedRun, Disagreement,
};
use crate::store::manifest::{damaged, load_manifest, manifest_path};
use anyhow::Result;
use qcow2::chain::{ReadCheck, ResolvedRead};
use qcow2::Chain;
use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// What to do about a failed check.
const RESCUE: &str = "`qmprestore verify` lists every damaged file; --until restores an earlier point, and --ignore-checksums restores the data as it is";

/// The manifests of a chain's files, as a read check for that chain.
pub struct ManifestCheck {
    /// One per layer, top first; None for a file without a manifest.
    layers: Vec<Option<LayerRuns>>,
}

struct LayerRuns {
    path: String,
    runs: Vec<CheckedRun>,
    /// One bit per run: checked whole already (by an earlier partial read).
    verified: Vec<AtomicU64>,
}

impl ManifestCheck {
    /// Loads the manifest of every file of `chain`. Files without one are not checked and
    /// returned, for the caller to say so; a damaged manifest, or one recording another
    /// virtual size, is an error.
    pub fn for_chain(chain: &Chain) -> Result<(ManifestCheck, Vec<String>)> {
        let mut layers = Vec::new();
        let mut unchecked = Vec::new();
        for layer in chain.layers() {
            let path = layer.path().to_string();
            let Some(m) = load_manifest(Path::new(&path))? else {
                unchecked.push(path);
                layers.push(None);
                continue;
            };
            if m.header.virtual_size != layer.virtual_size() {
                return Err(damaged(
                    &manifest_path(Path::new(&path)),
                    format!(
                        "it records a virtual size of {}, the image has {}",
                        m.header.virtual_size,
                        layer.virtual_size()
                    ),
                ));
            }
            let verified = (0..m.runs.len().div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect();
            layers.push(Some(LayerRuns {
                path,
                runs: m.runs,
                verified,
            }));
        }
        Ok((ManifestCheck { layers }, unchecked))
    }
}

impl ReadCheck for ManifestCheck {
    fn check(&self, chain: &Chain, r: &ResolvedRead<'_>) -> qcow2::Result<()> {
        let end = r.start + r.len;
        // The files above the one that answered hold nothing here, by their manifests too.
        let above = if r.allocated { r.depth } else { r.depth + 1 };
        for l in self.layers.iter().take(above).flatten() {
            if let Some(run) = l.runs[overlapping(&l.runs, r.start, end)].first() {
                return Err(l.disagrees(Disagreement::Lost(run.start.max(r.start))));
            }
        }
        match self.layers.get(r.depth) {
            Some(Some(l)) if r.allocated => l.check(chain, r, end),
            _ => Ok(()),
        }
    }
}

thread_local! {
    /// Each reader thread's buffer for completing partly read runs.
    static RUN_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl LayerRuns {
    fn is_verified(&self, i: usize) -> bool {
        self.verified[i / 64].load(Ordering::Relaxed) & (1 << (i % 64)) != 0
    }

    fn set_verified(&self, i: usize) {
        self.verified[i / 64].fetch_or(1 << (i % 64), Ordering::Relaxed);
    }

    /// `r` (ending at `end`) came from this file: the runs recorded there must cover it and
    /// match.
    fn check(&self, chain: &Chain, r: &ResolvedRead<'_>, end: u64) -> qcow2::Result<()> {
        let mut pos = r.start;
        for i in overlapping(&self.runs, r.start, end) {
            let run = self.runs[i];
            if run.start > pos {
                return Err(self.disagrees(Disagreement::Unrecorded(pos)));
            }
            pos = run.end();
            let inside = run.start >= r.start && run.end() <= end;
            if !inside && self.is_verified(i) {
                continue;
            }
            let (a, b) = (run.start.max(r.start), run.end().min(end));
            let part = r
                .data
                .map(|d| &d[(a - r.start) as usize..(b - r.start) as usize]);
            let found = if inside {
                part.map_or_else(|| zero_crc(run.len), crc32fast::hash)
            } else {
                self.crc_completed(chain, r.depth, &run, a..b, part)?
            };
            if found != run.crc {
                return Err(self.disagrees(Disagreement::Mismatch { run, found }));
            }
            if !inside {
                self.set_verified(i);
            }
        }
        if pos < end {
            return Err(self.disagrees(Disagreement::Unrecorded(pos)));
        }
        Ok(())
    }

    /// The CRC of `run`, of which `read` was read (`part`, or zeros when None); the rest is
    /// read from the file itself.
    fn crc_completed(
        &self,
        chain: &Chain,
        depth: usize,
        run: &CheckedRun,
        read: std::ops::Range<u64>,
        part: Option<&[u8]>,
    ) -> qcow2::Result<u32> {
        RUN_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.is_empty() {
                buf.resize(1 << 20, 0);
            }
            let mut h = crc32fast::Hasher::new();
            hash_layer(chain, depth, run.start, read.start, &mut buf, &mut h)?;
            match part {
                Some(p) => h.update(p),
                None => hash_zeros(&mut h, read.end - read.start),
            }
            hash_layer(chain, depth, read.end, run.end(), &mut buf, &mut h)?;
            Ok(h.finalize())
        })
    }

    /// The read fails: this file disagrees with its manifest.
    fn disagrees(&self, d: Disagreement) -> qcow2::Error {
        qcow2::Error::invalid(&self.path, format!("{d}. {RESCUE}"))
    }
}
