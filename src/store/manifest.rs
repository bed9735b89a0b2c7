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

use crate::fsutil::{self, Dir};
use crate::store::name::MANIFEST_SUFFIX;
use anyhow::{bail, Context, Result};
use qcow2::{Chain, Format, OpenOptions};
use serde::de::DeserializeSeed;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const RUN_SIZE: u64 = 64 << 20;

/// One checksummed run of guest data; written as `[start, length, "crc32 hex"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedRun {
    /// Guest offset of the run's first byte.
    pub start: u64,
    /// Length in bytes (never 0 in a manifest we wrote).
    pub len: u64,
    /// CRC32 (IEEE) of the run's guest bytes as 8 lowercase hex digits.
    pub crc: String,
}

impl CheckedRun {
    pub fn new(start: u64, len: u64, crc: String) -> CheckedRun {
        CheckedRun { start, len, crc }
    }
}

// The on-disk form is a 3-element array, not an object: manifests of millions of runs stay
// compact, and existing manifests stay readable.
impl Serialize for CheckedRun {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.start, self.len, &self.crc).serialize(s)
    }
}

impl<'de> Deserialize<'de> for CheckedRun {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<CheckedRun, D::Error> {
        let (start, len, crc) = <(u64, u64, String)>::deserialize(d)?;
        Ok(CheckedRun { start, len, crc })
    }
}
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
    pub runs: Vec<CheckedRun>,
}

pub fn manifest_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(MANIFEST_SUFFIX);
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
pub fn compute_runs(image: &Path) -> Result<(u64, Vec<CheckedRun>)> {
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
            runs.push(CheckedRun::new(
                pos,
                run_end - pos,
                crc_of(&chain, pos, run_end, &mut buf)?,
            ));
            pos = run_end;
        }
    }
    Ok((chain.virtual_size(), runs))
}

/// The CRC32 of the guest range `start..end` of `chain`, as 8 hex digits, read through `buf`.
fn crc_of(chain: &Chain, start: u64, end: u64, buf: &mut [u8]) -> Result<String> {
    let mut h = crc32fast::Hasher::new();
    let mut p = start;
    while p < end {
        let n = (buf.len() as u64).min(end - p) as usize;
        chain.read_at(&mut buf[..n], p)?;
        h.update(&buf[..n]);
        p += n as u64;
    }
    Ok(format!("{:08x}", h.finalize()))
}

/// Builds the runs of a manifest from data as it is written (in guest order), so an image
/// we write ourselves needs no second read.
pub struct RunBuilder {
    runs: Vec<CheckedRun>,
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
            self.runs
                .push(CheckedRun::new(s, l, format!("{:08x}", h.finalize())));
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

    pub fn finish(mut self) -> Vec<CheckedRun> {
        self.close();
        self.runs
    }
}

/// Writes a manifest from runs already computed.
pub fn write_manifest_runs(
    image: &Path,
    uuid: Option<&str>,
    virtual_size: u64,
    runs: Vec<CheckedRun>,
) -> Result<Manifest> {
    let (dir, name) = open_parent(image)?;
    store(&dir, &name, uuid, virtual_size, runs)
}

/// Computes and writes `<image>.manifest` (atomically).
pub fn write_manifest(image: &Path, uuid: Option<&str>) -> Result<Manifest> {
    let (dir, name) = open_parent(image)?;
    write_manifest_in(&dir, &name, uuid)
}

/// Computes and writes the manifest of the image `name` in the opened directory `dir`.
pub fn write_manifest_in(dir: &Dir, name: &str, uuid: Option<&str>) -> Result<Manifest> {
    let (virtual_size, runs) = compute_runs(&dir.join(name))?;
    store(dir, name, uuid, virtual_size, runs)
}

/// The directory of `image`, opened, and the image's file name in it.
fn open_parent(image: &Path) -> Result<(Dir, String)> {
    let parent = match image.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = image
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{}: not a file name", image.display()))?
        .to_string();
    let dir = Dir::open(parent).with_context(|| format!("{}: cannot open", parent.display()))?;
    Ok((dir, name))
}

/// The manifest's name beside an image named `name`.
pub fn manifest_name(name: &str) -> String {
    format!("{name}{MANIFEST_SUFFIX}")
}

fn store(
    dir: &Dir,
    name: &str,
    uuid: Option<&str>,
    virtual_size: u64,
    runs: Vec<CheckedRun>,
) -> Result<Manifest> {
    let m = Manifest {
        format: FORMAT.into(),
        version: 1,
        file: name.to_string(),
        virtual_size,
        run_size: RUN_SIZE,
        uuid: uuid.map(str::to_string),
        runs,
    };
    let manifest = manifest_name(name);
    let bytes = serde_json::to_vec_pretty(&m)?;
    // Written through `<manifest>.tmp`, created anew (a leftover or a planted symlink there
    // is removed, never written through), then renamed over the manifest.
    dir.write_atomic(&manifest, &bytes)
        .with_context(|| format!("{}: cannot write manifest", dir.join(&manifest).display()))?;
    Ok(m)
}

/// A manifest without its runs: what commands need to know about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestHeader {
    pub format: String,
    pub version: u32,
    pub file: String,
    pub virtual_size: u64,
    pub run_size: u64,
    pub uuid: Option<String>,
}

/// How a damaged manifest is reported: what is wrong and what to do.
fn damaged(path: &Path, what: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: damaged checksum manifest ({what}); `qmprestore verify` reports on every file, and the manifest can be removed to go on without checksums for this file",
        path.display()
    )
}

/// Reads a manifest as a stream: the header fields are returned, each run is handed to
/// `on_run` in file order (its error stops the reading and is returned as it is), so a
/// manifest of millions of runs needs no memory for them. Ok(None) when there is none.
fn read_streaming(
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
    if h.format != FORMAT || h.version != 1 {
        return Err(damaged(
            &path,
            format!(
                "format {:?} version {}, expected {FORMAT:?} version 1",
                h.format, h.version
            ),
        ));
    }
    Ok(Some(h))
}

/// Reads a manifest's header (its runs are skipped, not kept). Ok(None) when there is none.
pub fn read_manifest(image: &Path) -> Result<Option<ManifestHeader>> {
    read_streaming(image, |_| Ok(()))
}

/// Reads a whole manifest, runs included.
pub fn load_manifest(image: &Path) -> Result<Option<Manifest>> {
    let mut runs = Vec::new();
    let Some(h) = read_streaming(image, |r| {
        runs.push(r);
        Ok(())
    })?
    else {
        return Ok(None);
    };
    Ok(Some(Manifest {
        format: h.format,
        version: h.version,
        file: h.file,
        virtual_size: h.virtual_size,
        run_size: h.run_size,
        uuid: h.uuid,
        runs,
    }))
}

/// Re-reads the image and compares with its manifest, one recorded run at a time (bounded
/// memory whatever the manifest's size): every recorded range must be allocated and match
/// its checksum, and nothing between them allocated. Ok(None) when there is no manifest;
/// Err describes the first difference (file and guest offset).
pub fn verify_manifest(image: &Path) -> Result<Option<ManifestHeader>> {
    if manifest_path(image).symlink_metadata().is_err() {
        return Ok(None);
    }
    let chain = open_alone(image)?;
    let size = chain.virtual_size();
    let is_raw = chain.top().format() == Format::Raw;
    let name = image.display().to_string();
    // The first allocated offset in a range, and the first unallocated one.
    let first = |start: u64, len: u64, allocated: bool| -> Result<Option<u64>> {
        let mut found = None;
        if len == 0 {
            return Ok(None);
        }
        chain.for_each_extent(start, len, |e| {
            if found.is_none() && (e.present() || is_raw) == allocated {
                found = Some(e.start.max(start));
            }
            Ok(())
        })?;
        Ok(found)
    };
    let mut pos = 0u64;
    let mut buf = vec![0u8; 4 << 20];
    let header = read_streaming(image, |CheckedRun { start, len, crc }| {
        let end = start
            .checked_add(len)
            .filter(|&e| len > 0 && start >= pos && e <= size)
            .ok_or_else(|| {
                damaged(
                    &manifest_path(image),
                    format!("run {start:#x}+{len:#x} is out of order or past the disk's end"),
                )
            })?;
        if let Some(off) = first(pos, start - pos, true)? {
            bail!("{name}: data at guest offset {off:#x} that the manifest does not record");
        }
        if let Some(off) = first(start, len, false)? {
            bail!(
                "{name}: the manifest records data at guest offset {off:#x} that the image no longer has"
            );
        }
        let found = crc_of(&chain, start, end, &mut buf)?;
        if found != crc {
            bail!(
                "{name}: checksum mismatch in guest range {start:#x}..{end:#x} (bit rot or damage): recorded {crc}, found {found}"
            );
        }
        pos = end;
        Ok(())
    })?;
    let Some(header) = header else {
        return Ok(None);
    };
    if size != header.virtual_size {
        bail!(
            "{name}: virtual size is {size}, the manifest recorded {}",
            header.virtual_size
        );
    }
    if let Some(off) = first(pos, size - pos, true)? {
        bail!("{name}: data at guest offset {off:#x} that the manifest does not record");
    }
    Ok(Some(header))
}

/// Streaming deserialisation of a manifest: the header's fields are kept, the runs handed
/// one by one to a callback.
mod stream {
    use crate::store::manifest::{CheckedRun, ManifestHeader};
    use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use std::fmt;

    pub type OnRun<'a> = &'a mut dyn FnMut(CheckedRun) -> Result<(), ()>;

    pub struct HeaderSeed<'a> {
        pub on_run: OnRun<'a>,
    }

    impl<'de> DeserializeSeed<'de> for HeaderSeed<'_> {
        type Value = ManifestHeader;
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<ManifestHeader, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for HeaderSeed<'_> {
        type Value = ManifestHeader;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a manifest object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ManifestHeader, A::Error> {
            let mut h = ManifestHeader::default();
            let mut seen_format = false;
            while let Some(key) = map.next_key::<String>()? {
                match key.as_str() {
                    "format" => {
                        h.format = map.next_value()?;
                        seen_format = true;
                    }
                    "version" => h.version = map.next_value()?,
                    "file" => h.file = map.next_value()?,
                    "virtual-size" => h.virtual_size = map.next_value()?,
                    "run-size" => h.run_size = map.next_value()?,
                    "uuid" => h.uuid = map.next_value()?,
                    "runs" => map.next_value_seed(RunsSeed {
                        on_run: &mut *self.on_run,
                    })?,
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            if !seen_format {
                return Err(de::Error::missing_field("format"));
            }
            Ok(h)
        }
    }

    struct RunsSeed<'a> {
        on_run: OnRun<'a>,
    }

    impl<'de> DeserializeSeed<'de> for RunsSeed<'_> {
        type Value = ();
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_seq(self)
        }
    }

    impl<'de> Visitor<'de> for RunsSeed<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of [start, length, crc32] runs")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while let Some(run) = seq.next_element::<CheckedRun>()? {
                if (self.on_run)(run).is_err() {
                    return Err(de::Error::custom("stopped"));
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::store::manifest::*;

    /// A raw image of `len` bytes of a pattern (raw: every byte is the image's own).
    fn raw_image(dir: &Path, len: usize) -> PathBuf {
        let path = dir.join("COPY-1-d.raw");
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, data).unwrap();
        path
    }

    #[test]
    fn runs_are_written_as_three_element_arrays() {
        let run = CheckedRun::new(65536, 512, "0badf00d".into());
        let json = serde_json::to_string(&run).unwrap();
        assert_eq!(json, r#"[65536,512,"0badf00d"]"#);
        assert_eq!(serde_json::from_str::<CheckedRun>(&json).unwrap(), run);
        assert!(serde_json::from_str::<CheckedRun>(r#"{"start":1}"#).is_err());
        assert!(serde_json::from_str::<CheckedRun>(r#"[1,2]"#).is_err());
        assert!(serde_json::from_str::<CheckedRun>(r#"[-1,2,"x"]"#).is_err());
    }

    #[test]
    fn run_builder_cuts_at_run_size_and_at_gaps() {
        let mut b = RunBuilder::new();
        let chunk = vec![1u8; 1 << 20];
        let mut off = RUN_SIZE - (2 << 20);
        for _ in 0..4 {
            b.feed(off, &chunk);
            off += chunk.len() as u64;
        }
        b.feed(off + 4096, &chunk[..4096]);
        let runs = b.finish();
        let spans: Vec<(u64, u64)> = runs.iter().map(|r| (r.start, r.len)).collect();
        assert_eq!(
            spans,
            [
                (RUN_SIZE - (2 << 20), 2 << 20),
                (RUN_SIZE, 2 << 20),
                (RUN_SIZE + (2 << 20) + 4096, 4096)
            ]
        );
        let crc = format!("{:08x}", crc32fast::hash(&chunk[..4096]));
        assert_eq!(runs[2].crc, crc);
        assert!(RunBuilder::default().finish().is_empty());
    }

    #[test]
    fn write_then_read_back_and_verify() {
        let tmp = tempfile::tempdir().unwrap();
        let image = raw_image(tmp.path(), 3 << 20);
        assert_eq!(read_manifest(&image).unwrap(), None);
        assert_eq!(verify_manifest(&image).unwrap(), None);
        let written = write_manifest(&image, Some("u-1")).unwrap();
        assert_eq!(
            manifest_path(&image),
            tmp.path().join("COPY-1-d.raw.manifest")
        );
        assert_eq!(load_manifest(&image).unwrap().unwrap(), written);
        let header = read_manifest(&image).unwrap().unwrap();
        assert_eq!(
            (
                header.file.as_str(),
                header.virtual_size,
                header.uuid.as_deref()
            ),
            ("COPY-1-d.raw", 3 << 20, Some("u-1"))
        );
        assert_eq!(written.runs.iter().map(|r| r.len).sum::<u64>(), 3 << 20);
        assert_eq!(verify_manifest(&image).unwrap().unwrap(), header);
    }

    #[test]
    fn changed_data_is_found() {
        let tmp = tempfile::tempdir().unwrap();
        let image = raw_image(tmp.path(), 1 << 20);
        write_manifest(&image, None).unwrap();
        let mut data = std::fs::read(&image).unwrap();
        data[4242] ^= 1;
        std::fs::write(&image, data).unwrap();
        let e = verify_manifest(&image).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
    }

    #[test]
    fn damaged_manifests_are_reported_as_damaged() {
        let tmp = tempfile::tempdir().unwrap();
        let image = raw_image(tmp.path(), 1 << 20);
        let path = manifest_path(&image);
        for bad in [
            "",
            "{",
            "[]",
            r#"{"version":1}"#,
            r#"{"format":"other","version":1,"runs":[]}"#,
            r#"{"format":"qmpbackup-manifest","version":2,"runs":[]}"#,
            r#"{"format":"qmpbackup-manifest","version":1,"runs":[[0,1]]}"#,
            r#"{"format":"qmpbackup-manifest","version":1,"runs":[]} trailing"#,
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = read_manifest(&image).unwrap_err().to_string();
            assert!(e.contains("damaged checksum manifest"), "{bad}: {e}");
            assert!(load_manifest(&image).is_err(), "{bad}");
        }
        // Runs out of order or past the end are damage too, found while verifying.
        std::fs::write(
            &path,
            r#"{"format":"qmpbackup-manifest","version":1,"file":"x","virtual-size":1048576,"run-size":67108864,"uuid":null,"runs":[[0,4194304,"00000000"]]}"#,
        )
        .unwrap();
        let e = verify_manifest(&image).unwrap_err().to_string();
        assert!(e.contains("past the disk's end"), "{e}");
    }
}
