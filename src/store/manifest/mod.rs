//! Checksum manifests: a record, written beside a backup file, of a CRC32 for every run of
//! guest data the file itself holds, so bit rot is found before the day of the restore and
//! never spreads into a restored disk.
//!
//! Format (JSON, one object; `<file>.manifest` beside `<file>`):
//! ```json
//! { "format": "qmpbackup-manifest", "version": 2,
//!   "file": "INC-1700000000-disk.qcow2", "virtual-size": 10737418240,
//!   "block-size": 1048576, "uuid": "…" | null,
//!   "runs": [ [guest_start, length, "crc32 hex"], … ] }
//! ```
//! Runs cover the image's *own* allocated guest ranges (data, compressed and zero clusters;
//! the backing file is not followed), coalesced by guest contiguity and cut at every
//! multiple of the block size, so each run lies within one aligned block and does not
//! depend on where the data lies in the file. The CRC32 (IEEE) is over the guest bytes of
//! the run. Recording the allocated stretches, not one CRC per block, records the
//! allocation too: a cluster lost or invented by damaged metadata is found like rot.
//!
//! Version 2 (written since manifests are checked on every read) uses 1 MiB blocks, or the
//! cluster size when larger, so a reader checks the blocks it reads and little more.
//! Version 1 (`"run-size": 67108864` instead of `"block-size"`) is the same with 64 MiB
//! blocks: still read and checked, a run read whole whenever any part of it is needed.

pub mod check;
pub mod delta;
pub mod edit;
pub mod parallel;
pub mod runs;
mod stream;
pub mod verify;

use crate::fsutil::{self, open_parent, Dir};
use crate::store::level::BackupLevel;
use crate::store::name::MANIFEST_SUFFIX;
use anyhow::{Context, Result};
use qcow2::{Chain, OpenOptions};
use runs::{block_size_for, compute_runs_in, CheckedRun};
use serde::de::DeserializeSeed;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "qmpbackup-manifest";
/// The version this build writes for new manifests.
pub const VERSION: u32 = 2;

/// A manifest without its runs: what commands need to know about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestHeader {
    pub format: String,
    pub version: u32,
    pub file: String,
    pub virtual_size: u64,
    /// Runs are cut at multiples of it (version 1: its `run-size`).
    pub block_size: u64,
    pub uuid: Option<String>,
    /// The level and Unix time of the backup, as `qmpbackup` wrote it: how a `--no-timestamp`
    /// file, whose name says neither, takes its place in a chain. Absent in manifests
    /// written by older versions and in those of restored images.
    pub origin: Option<Origin>,
}

/// What a backup file is: its level and the time of its point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub level: BackupLevel,
    pub time: u64,
}

/// A whole manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub header: ManifestHeader,
    /// Sorted, disjoint, each within one block.
    pub runs: Vec<CheckedRun>,
}

pub fn manifest_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(MANIFEST_SUFFIX);
    PathBuf::from(s)
}

/// The manifest's name beside an image named `name`.
pub fn manifest_name(name: &str) -> String {
    format!("{name}{MANIFEST_SUFFIX}")
}

/// Opens an image alone (its backing file not followed): what its manifest describes.
pub fn open_alone(image: &Path) -> Result<Chain> {
    Ok(Chain::open(
        image,
        &OpenOptions {
            format: None,
            no_backing: true,
        },
    )?)
}

/// The block size for a new manifest of the image `chain` (opened alone).
fn new_block_size(chain: &Chain) -> u64 {
    block_size_for(chain.top().as_qcow2().map_or(0, |q| q.cluster_size()))
}

/// The runs of an image alone, computed by reading it, for a version-2 manifest: the
/// virtual size, the block size and the runs.
pub fn compute_runs(image: &Path) -> Result<(u64, u64, Vec<CheckedRun>)> {
    let chain = open_alone(image)?;
    let size = chain.virtual_size();
    let block = new_block_size(&chain);
    let whole = 0..size;
    let runs = compute_runs_in(&chain, std::slice::from_ref(&whole), block)?;
    Ok((size, block, runs))
}

/// A version-2 header for the image `name`.
pub fn new_header(name: &str, uuid: Option<&str>, virtual_size: u64, block: u64) -> ManifestHeader {
    ManifestHeader {
        format: FORMAT.into(),
        version: VERSION,
        file: name.to_string(),
        virtual_size,
        block_size: block,
        uuid: uuid.map(str::to_string),
        origin: None,
    }
}

/// Computes and writes `<image>.manifest` (atomically).
pub fn write_manifest(image: &Path, uuid: Option<&str>) -> Result<Manifest> {
    let (dir, name) = open_parent(image)?;
    write_manifest_in(&dir, &name, uuid, None)
}

/// Computes and writes the manifest of the image `name` in the opened directory `dir`.
pub fn write_manifest_in(
    dir: &Dir,
    name: &str,
    uuid: Option<&str>,
    origin: Option<Origin>,
) -> Result<Manifest> {
    let (size, block, runs) = compute_runs(&dir.join(name))?;
    let mut header = new_header(name, uuid, size, block);
    header.origin = origin;
    let m = Manifest { header, runs };
    store_in(dir, &m)?;
    Ok(m)
}

/// Writes the version-2 manifest of `image` from runs already computed (with blocks of
/// `block` bytes).
pub fn write_manifest_runs(
    image: &Path,
    uuid: Option<&str>,
    virtual_size: u64,
    block: u64,
    runs: Vec<CheckedRun>,
) -> Result<()> {
    let (dir, name) = open_parent(image)?;
    let m = Manifest {
        header: new_header(&name, uuid, virtual_size, block),
        runs,
    };
    store_in(&dir, &m)
}

/// Writes a manifest already computed beside `image` (whose file name must be
/// `m.header.file`).
pub fn store(image: &Path, m: &Manifest) -> Result<()> {
    let (dir, _) = open_parent(image)?;
    store_in(&dir, m)
}

/// Writes the manifest of a restored image that cannot have one beside it (a device, a
/// stream) at `path`, describing the image `image_name`.
pub fn write_manifest_at(
    path: &Path,
    image_name: &str,
    uuid: Option<&str>,
    virtual_size: u64,
    block: u64,
    runs: Vec<CheckedRun>,
) -> Result<()> {
    let (dir, name) = open_parent(path)?;
    let m = Manifest {
        header: new_header(image_name, uuid, virtual_size, block),
        runs,
    };
    store_as(&dir, &name, &m)
}

/// Writes the manifest of `m.header.file` in `dir`: through `<manifest>.tmp`, created anew
/// (a leftover or a planted symlink there is removed, never written through), then renamed
/// over the manifest. One run per line: millions of runs stay readable and compact.
fn store_in(dir: &Dir, m: &Manifest) -> Result<()> {
    store_as(dir, &manifest_name(&m.header.file), m)
}

/// [`store_in`] under the name `manifest`.
fn store_as(dir: &Dir, manifest: &str, m: &Manifest) -> Result<()> {
    let h = &m.header;
    let size_key = if h.version == 1 {
        "run-size"
    } else {
        "block-size"
    };
    let origin = match h.origin {
        Some(o) => format!(
            "\n  \"level\": \"{}\",\n  \"time\": {},",
            o.level.prefix(),
            o.time
        ),
        None => String::new(),
    };
    let head = format!(
        "{{\n  \"format\": {},\n  \"version\": {},\n  \"file\": {},\n  \"virtual-size\": {},\n  \"{size_key}\": {},\n  \"uuid\": {},{origin}\n  \"runs\": [",
        serde_json::to_string(&h.format)?,
        h.version,
        serde_json::to_string(&h.file)?,
        h.virtual_size,
        h.block_size,
        serde_json::to_string(&h.uuid)?,
    );
    dir.write_atomic_via(manifest, &format!("{manifest}.tmp"), |f| {
        let mut w = std::io::BufWriter::new(f);
        w.write_all(head.as_bytes())?;
        for (i, r) in m.runs.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(w, "{sep}\n    [{},{},\"{:08x}\"]", r.start, r.len, r.crc)?;
        }
        w.write_all(b"\n  ]\n}\n")?;
        w.flush()
    })
    .with_context(|| format!("{}: cannot write manifest", dir.join(manifest).display()))
}

/// How a damaged manifest is reported: what is wrong and what to do.
pub fn damaged(path: &Path, what: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: damaged checksum manifest ({what}); nothing was changed. `qmprestore verify` reports on every file; to restore anyway, without checking this file's data, pass --ignore-checksums",
        path.display()
    )
}

/// Reads a manifest as a stream: the header is returned, each run is handed to `on_run`
/// in file order, already checked to be in order, within the disk and within one block
/// (its error stops the reading and is returned as it is), so a manifest of millions of
/// runs needs no memory for them. Ok(None) when there is none.
pub fn read_streaming(
    image: &Path,
    mut on_run: impl FnMut(CheckedRun) -> Result<()>,
) -> Result<Option<ManifestHeader>> {
    let path = manifest_path(image);
    let file = match fsutil::open_regular(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(damaged(&path, e)),
    };
    let mut stopped: Option<anyhow::Error> = None;
    let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::new(file));
    let parsed = stream::HeaderSeed {
        on_run: &mut |run| match on_run(run) {
            Ok(()) => Ok(()),
            Err(e) => {
                stopped = Some(e);
                Err(())
            }
        },
    }
    .deserialize(&mut de)
    .and_then(|h| de.end().map(|_| h));
    if let Some(e) = stopped {
        return Err(e);
    }
    let h = parsed.map_err(|e| damaged(&path, e))?;
    Ok(Some(h))
}

/// Reads a manifest's header (its runs are skipped, not kept). Ok(None) when there is none.
pub fn read_manifest(image: &Path) -> Result<Option<ManifestHeader>> {
    read_streaming(image, |_| Ok(()))
}

/// Reads a whole manifest, runs included.
pub fn load_manifest(image: &Path) -> Result<Option<Manifest>> {
    let mut runs = Vec::new();
    let Some(header) = read_streaming(image, |r| {
        runs.push(r);
        Ok(())
    })?
    else {
        return Ok(None);
    };
    Ok(Some(Manifest { header, runs }))
}
