//! Checksum manifests: a record, written beside a backup file, of a CRC32 for every
//! allocated run of guest clusters, so bit rot is found before the day of the restore.
//!
//! Format (JSON, one object; `<file>.manifest` beside `<file>`):
//! ```json
//! { "format": "qmpbackup-manifest", "version": 1,
//!   "file": "INC-1700000000-disk.qcow2", "virtual-size": 10737418240,
//!   "run-size": 67108864, "uuid": "…" | null,
//!   "runs": [ [guest_start, length, "crc32 hex"], … ] }
//! ```
//! Runs cover the image's *own* allocated guest ranges (data, compressed and zero clusters;
//! the backing file is not followed), coalesced by guest contiguity and cut at multiples of
//! `run-size`, so they do not depend on where the data lies in the file. The CRC32
//! (IEEE, as crc32fast computes it) is over the guest bytes of the run.

use anyhow::{bail, Context, Result};
use qcow2::{Chain, Format, OpenOptions};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const RUN_SIZE: u64 = 64 << 20;

/// One checksummed run: guest start, length, CRC32 as 8 hex digits.
pub type Run = (u64, u64, String);
const FORMAT: &str = "qmpbackup-manifest";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub file: String,
    pub virtual_size: u64,
    pub run_size: u64,
    pub uuid: Option<String>,
    pub runs: Vec<Run>,
}

pub fn manifest_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".manifest");
    PathBuf::from(s)
}

fn open_alone(image: &Path) -> Result<Chain> {
    Ok(Chain::open(
        image,
        &OpenOptions {
            format: None,
            no_backing: true,
        },
    )?)
}

/// The allocated runs of an image alone, with their checksums.
pub fn compute_runs(image: &Path) -> Result<(u64, Vec<Run>)> {
    let chain = open_alone(image)?;
    let is_raw = chain.top().format() == Format::Raw;
    let mut spans: Vec<(u64, u64)> = Vec::new();
    chain.for_each_extent(0, chain.virtual_size(), |e| {
        if e.present() || is_raw {
            match spans.last_mut() {
                Some(last) if last.0 + last.1 == e.start => last.1 += e.len,
                _ => spans.push((e.start, e.len)),
            }
        }
        Ok(())
    })?;
    let mut runs = Vec::new();
    let mut buf = vec![0u8; 4 << 20];
    for (start, len) in spans {
        let mut pos = start;
        let end = start + len;
        while pos < end {
            let run_end = ((pos / RUN_SIZE) + 1) * RUN_SIZE;
            let run_end = run_end.min(end);
            let mut h = crc32fast::Hasher::new();
            let mut p = pos;
            while p < run_end {
                let n = (buf.len() as u64).min(run_end - p) as usize;
                chain.read_at(&mut buf[..n], p)?;
                h.update(&buf[..n]);
                p += n as u64;
            }
            runs.push((pos, run_end - pos, format!("{:08x}", h.finalize())));
            pos = run_end;
        }
    }
    Ok((chain.virtual_size(), runs))
}

/// Builds the runs of a manifest from data as it is written (in guest order), so an image
/// we write ourselves needs no second read.
pub struct RunBuilder {
    runs: Vec<Run>,
    cur: Option<(u64, u64, crc32fast::Hasher)>,
}

impl Default for RunBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl RunBuilder {
    pub fn new() -> Self {
        RunBuilder {
            runs: Vec::new(),
            cur: None,
        }
    }

    fn close(&mut self) {
        if let Some((s, l, h)) = self.cur.take() {
            self.runs.push((s, l, format!("{:08x}", h.finalize())));
        }
    }

    /// Adds guest data at `offset` (after everything added before).
    pub fn feed(&mut self, mut offset: u64, mut data: &[u8]) {
        while !data.is_empty() {
            let continues = matches!(&self.cur, Some((s, l, _)) if s + l == offset && !offset.is_multiple_of(RUN_SIZE));
            if !continues {
                self.close();
                self.cur = Some((offset, 0, crc32fast::Hasher::new()));
            }
            let room = (RUN_SIZE - offset % RUN_SIZE) as usize;
            let n = room.min(data.len());
            let (_, l, h) = self.cur.as_mut().expect("open run");
            h.update(&data[..n]);
            *l += n as u64;
            offset += n as u64;
            data = &data[n..];
        }
    }

    pub fn finish(mut self) -> Vec<Run> {
        self.close();
        self.runs
    }
}

/// Writes a manifest from runs already computed.
pub fn write_manifest_runs(
    image: &Path,
    uuid: Option<&str>,
    virtual_size: u64,
    runs: Vec<Run>,
) -> Result<Manifest> {
    store(image, uuid, virtual_size, runs)
}

/// Computes and writes `<image>.manifest` (atomically).
pub fn write_manifest(image: &Path, uuid: Option<&str>) -> Result<Manifest> {
    let (virtual_size, runs) = compute_runs(image)?;
    store(image, uuid, virtual_size, runs)
}

fn store(image: &Path, uuid: Option<&str>, virtual_size: u64, runs: Vec<Run>) -> Result<Manifest> {
    let m = Manifest {
        format: FORMAT.into(),
        version: 1,
        file: image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        virtual_size,
        run_size: RUN_SIZE,
        uuid: uuid.map(str::to_string),
        runs,
    };
    let path = manifest_path(image);
    let tmp = path.with_extension("manifest.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&m)?)
        .with_context(|| format!("{}: cannot write manifest", tmp.display()))?;
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("{}: cannot write manifest", path.display()))?;
    Ok(m)
}

pub fn read_manifest(image: &Path) -> Result<Option<Manifest>> {
    let path = manifest_path(image);
    match std::fs::read(&path) {
        Ok(b) => {
            let m: Manifest = serde_json::from_slice(&b)
                .with_context(|| format!("{}: not a valid manifest", path.display()))?;
            if m.format != FORMAT || m.version != 1 {
                bail!("{}: unknown manifest format/version", path.display());
            }
            Ok(Some(m))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read manifest", path.display())),
    }
}

/// Re-reads the image and compares with its manifest. Ok(None) when there is no manifest;
/// Err describes the first difference (file and guest offset).
pub fn verify_manifest(image: &Path) -> Result<Option<Manifest>> {
    let Some(m) = read_manifest(image)? else {
        return Ok(None);
    };
    let (size, runs) = compute_runs(image)?;
    let name = image.display();
    if size != m.virtual_size {
        bail!(
            "{name}: virtual size is {size}, the manifest recorded {}",
            m.virtual_size
        );
    }
    for (i, rec) in m.runs.iter().enumerate() {
        match runs.get(i) {
            Some(now) if now == rec => {}
            Some(now) if now.0 == rec.0 && now.1 == rec.1 => bail!(
                "{name}: checksum mismatch in guest range {:#x}..{:#x} (bit rot or damage): recorded {}, found {}",
                rec.0,
                rec.0 + rec.1,
                rec.2,
                now.2
            ),
            Some(now) => bail!(
                "{name}: allocation differs from the manifest at guest offset {:#x} (metadata damaged?)",
                now.0.min(rec.0)
            ),
            None => bail!(
                "{name}: the manifest records data at guest offset {:#x} that the image no longer has",
                rec.0
            ),
        }
    }
    if let Some(extra) = runs.get(m.runs.len()) {
        bail!(
            "{name}: data at guest offset {:#x} that the manifest does not record",
            extra.0
        );
    }
    Ok(Some(m))
}
