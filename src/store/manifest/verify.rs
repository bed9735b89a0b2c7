//! Re-reading an image and comparing it with its manifest: the whole image (`verify`), or
//! some blocks of it (before a commit changes them).

use crate::store::manifest::parallel::{in_parts, readers};
use crate::store::manifest::runs::{hash_layer, overlapping, CheckedRun, Disagreement};
use crate::store::manifest::{damaged, manifest_path, open_alone, read_streaming, ManifestHeader};
use anyhow::{bail, Result};
use qcow2::{Chain, Format};
use std::ops::Range;
use std::path::Path;

/// Compares an image opened alone with recorded runs, one at a time.
pub struct RunVerifier<'a> {
    chain: &'a Chain,
    name: String,
    is_raw: bool,
    buf: Vec<u8>,
}

impl<'a> RunVerifier<'a> {
    pub fn new(chain: &'a Chain, name: String) -> Self {
        RunVerifier {
            chain,
            name,
            is_raw: chain.top().format() == Format::Raw,
            buf: vec![0u8; 1 << 20],
        }
    }

    /// The first offset of `[start, end)` that is allocated (or not, per `allocated`).
    fn first(&self, start: u64, end: u64, allocated: bool) -> Result<Option<u64>> {
        let mut found = None;
        if end <= start {
            return Ok(None);
        }
        self.chain.for_each_extent(start, end - start, |e| {
            if found.is_none() && (e.present() || self.is_raw) == allocated {
                found = Some(e.start.max(start));
            }
            Ok(())
        })?;
        Ok(found)
    }

    /// Nothing may be allocated in `[start, end)`: the manifest records nothing there.
    pub fn gap(&self, start: u64, end: u64) -> Result<()> {
        if let Some(off) = self.first(start, end, true)? {
            bail!("{}: {}", self.name, Disagreement::Unrecorded(off));
        }
        Ok(())
    }

    /// The run must be allocated throughout and match its checksum.
    pub fn run(&mut self, r: &CheckedRun) -> Result<()> {
        if let Some(off) = self.first(r.start, r.end(), false)? {
            bail!("{}: {}", self.name, Disagreement::Lost(off));
        }
        let mut h = crc32fast::Hasher::new();
        hash_layer(self.chain, 0, r.start, r.end(), &mut self.buf, &mut h)?;
        let found = h.finalize();
        if found != r.crc {
            bail!(
                "{}: {}",
                self.name,
                Disagreement::Mismatch { run: *r, found }
            );
        }
        Ok(())
    }

    /// Every recorded run within `ranges` (sorted, disjoint, each made of whole blocks of
    /// the manifest, so no run crosses one's edge), and nothing else allocated in them.
    pub fn ranges(&mut self, runs: &[CheckedRun], ranges: &[Range<u64>]) -> Result<()> {
        for range in ranges {
            let mut pos = range.start;
            for r in &runs[overlapping(runs, range.start, range.end)] {
                self.gap(pos, r.start)?;
                self.run(r)?;
                pos = r.end();
            }
            self.gap(pos, range.end.max(pos))?;
        }
        Ok(())
    }
}

/// Runs are checked in batches of about this many bytes, each batch split between the
/// readers: large enough that a thread's start is nothing beside its reading, small enough
/// that a problem early in a large image is found early.
const BATCH_BYTES: u64 = 128 << 20;
/// ... or of this many runs, so a manifest of tiny runs stays in bounded memory.
const BATCH_RUNS: usize = 1 << 16;

/// One recorded run and where the unrecorded stretch before it starts.
#[derive(Clone, Copy)]
struct Step {
    gap_from: u64,
    run: CheckedRun,
}

/// Checks a batch of steps (in order) on all readers; the first problem by guest offset is
/// returned, whatever thread found it.
fn check_batch(verifiers: &mut [RunVerifier<'_>], steps: &[Step]) -> Result<()> {
    in_parts(
        verifiers,
        steps,
        |s| s.run.len,
        |v, part, stop| {
            for s in part {
                if stop() {
                    break;
                }
                v.gap(s.gap_from, s.run.start)?;
                v.run(&s.run)?;
            }
            Ok(())
        },
    )
    .into_iter()
    .collect()
}

/// Re-reads the image and compares with its manifest, a batch of recorded runs at a time
/// (bounded memory whatever the manifest's size), each batch on all cores: every recorded
/// range must be allocated and match its checksum, and nothing between them allocated.
/// Ok(None) when there is no manifest; Err describes the first difference (file and guest
/// offset).
pub fn verify_manifest(image: &Path) -> Result<Option<ManifestHeader>> {
    if manifest_path(image).symlink_metadata().is_err() {
        return Ok(None);
    }
    let chain = open_alone(image)?;
    let size = chain.virtual_size();
    let name = image.display().to_string();
    let mut verifiers: Vec<RunVerifier> = (0..readers(image))
        .map(|_| RunVerifier::new(&chain, name.clone()))
        .collect();
    let mut batch: Vec<Step> = Vec::new();
    let mut batch_bytes = 0u64;
    let mut pos = 0u64;
    let mut data_error = false;
    let streamed = read_streaming(image, |r| {
        if r.end() > size {
            return Err(damaged(
                &manifest_path(image),
                format!(
                    "run {:#x}+{:#x} is past the disk's end ({size} bytes)",
                    r.start, r.len
                ),
            ));
        }
        batch.push(Step {
            gap_from: pos,
            run: r,
        });
        batch_bytes += r.len;
        pos = r.end();
        if batch_bytes >= BATCH_BYTES || batch.len() >= BATCH_RUNS {
            data_error = true;
            check_batch(&mut verifiers, &batch)?;
            data_error = false;
            batch.clear();
            batch_bytes = 0;
        }
        Ok(())
    });
    // The runs read before a damaged part of the manifest are checked first: rot there is
    // the first problem, and a damaged manifest must not hide it behind advice to restore
    // with --ignore-checksums.
    let header = match streamed {
        Err(e) if !data_error => {
            check_batch(&mut verifiers, &batch)?;
            return Err(e);
        }
        other => other?,
    };
    check_batch(&mut verifiers, &batch)?;
    let Some(header) = header else {
        return Ok(None);
    };
    if size != header.virtual_size {
        bail!(
            "{}: virtual size is {size}, the manifest recorded {}",
            image.display(),
            header.virtual_size
        );
    }
    verifiers[0].gap(pos, size)?;
    Ok(Some(header))
}

#[cfg(test)]
mod tests {
    use crate::store::manifest::runs::V1_RUN_SIZE;
    use crate::store::manifest::verify::verify_manifest;
    use crate::store::manifest::{
        load_manifest, manifest_path, read_manifest, store, write_manifest,
    };
    use std::path::{Path, PathBuf};

    /// A raw image of `len` bytes of a pattern (raw: every byte is the image's own).
    pub fn raw_image(dir: &Path, len: usize) -> PathBuf {
        let path = dir.join("COPY-1-d.raw");
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, data).unwrap();
        path
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
                header.version,
                header.virtual_size,
                header.block_size,
                header.uuid.as_deref()
            ),
            ("COPY-1-d.raw", 2, 3 << 20, 1 << 20, Some("u-1"))
        );
        // One run per 1 MiB block.
        assert_eq!(written.runs.len(), 3);
        assert_eq!(written.runs.iter().map(|r| r.len).sum::<u64>(), 3 << 20);
        assert_eq!(verify_manifest(&image).unwrap().unwrap(), header);
        // The JSON is the documented one, and serde reads it as such.
        let text = std::fs::read_to_string(manifest_path(&image)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], 2);
        assert_eq!(v["block-size"], 1 << 20);
        assert_eq!(v["runs"][1][0], 1 << 20);
    }

    #[test]
    fn version_1_manifests_are_read_and_rewritten_as_version_1() {
        let tmp = tempfile::tempdir().unwrap();
        let image = raw_image(tmp.path(), 1 << 20);
        let crc = crc32fast::hash(&std::fs::read(&image).unwrap());
        std::fs::write(
            manifest_path(&image),
            format!(
                r#"{{"format":"qmpbackup-manifest","version":1,"file":"COPY-1-d.raw","virtual-size":1048576,"run-size":67108864,"uuid":null,"runs":[[0,1048576,"{crc:08x}"]]}}"#
            ),
        )
        .unwrap();
        let m = load_manifest(&image).unwrap().unwrap();
        assert_eq!((m.header.version, m.header.block_size), (1, V1_RUN_SIZE));
        verify_manifest(&image).unwrap().unwrap();
        store(&image, &m).unwrap();
        assert_eq!(load_manifest(&image).unwrap().unwrap(), m);
        let text = std::fs::read_to_string(manifest_path(&image)).unwrap();
        assert!(text.contains("\"run-size\": 67108864"), "{text}");
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
    fn the_first_problem_by_offset_is_reported_whichever_reader_finds_it() {
        // 40 MiB: one batch, split between the readers (on a machine with more than one
        // core); rot in both halves, the later one found first by its reader or not.
        let tmp = tempfile::tempdir().unwrap();
        let image = raw_image(tmp.path(), 40 << 20);
        let written = write_manifest(&image, None).unwrap();
        let mut data = std::fs::read(&image).unwrap();
        // Computed on several readers, the runs are those of one pass in order.
        let expected: Vec<(u64, u64, u32)> = data
            .chunks(1 << 20)
            .enumerate()
            .map(|(i, c)| ((i as u64) << 20, 1 << 20, crc32fast::hash(c)))
            .collect();
        let got: Vec<(u64, u64, u32)> = written
            .runs
            .iter()
            .map(|r| (r.start, r.len, r.crc))
            .collect();
        assert_eq!(got, expected);
        verify_manifest(&image).unwrap().unwrap();
        data[(35 << 20) + 7] ^= 1;
        std::fs::write(&image, &data).unwrap();
        let e = verify_manifest(&image).unwrap_err().to_string();
        assert!(e.contains("guest range 0x2300000..0x2400000"), "{e}");
        data[(5 << 20) + 9] ^= 1;
        std::fs::write(&image, &data).unwrap();
        for _ in 0..5 {
            let e = verify_manifest(&image).unwrap_err().to_string();
            assert!(e.contains("guest range 0x500000..0x600000"), "{e}");
        }
    }

    #[test]
    fn rot_before_a_damaged_part_of_the_manifest_is_reported_as_rot() {
        let tmp = tempfile::tempdir().unwrap();
        let image = raw_image(tmp.path(), 16 << 20);
        write_manifest(&image, None).unwrap();
        let path = manifest_path(&image);
        let text = std::fs::read_to_string(&path).unwrap();
        // Run 10's checksum made unreadable: the stream fails there.
        let at = text.find(&format!("{},", 10 << 20)).unwrap();
        let quote = at + text[at..].find('"').unwrap();
        let damaged = format!("{}\"zz{}", &text[..quote], &text[quote + 3..]);
        std::fs::write(&path, &damaged).unwrap();
        let e = verify_manifest(&image).unwrap_err().to_string();
        assert!(e.contains("damaged checksum manifest"), "{e}");
        // With rot in run 3 as well, the rot is what verify reports.
        let mut data = std::fs::read(&image).unwrap();
        data[(3 << 20) + 5] ^= 1;
        std::fs::write(&image, &data).unwrap();
        let e = verify_manifest(&image).unwrap_err().to_string();
        assert!(
            e.contains("checksum mismatch in guest range 0x300000..0x400000"),
            "{e}"
        );
    }

    #[test]
    fn damaged_manifests_are_reported_as_damaged() {
        let tmp = tempfile::tempdir().unwrap();
        let image = raw_image(tmp.path(), 1 << 20);
        let path = manifest_path(&image);
        let head = r#""format":"qmpbackup-manifest","version":2,"file":"x","virtual-size":1048576,"block-size":1048576"#;
        for bad in [
            "".to_string(),
            "{".into(),
            "[]".into(),
            r#"{"version":1}"#.into(),
            r#"{"format":"other","version":1,"runs":[]}"#.into(),
            r#"{"format":"qmpbackup-manifest","version":3,"runs":[]}"#.into(),
            r#"{"format":"qmpbackup-manifest","version":1,"runs":[[0,1]]}"#.into(),
            format!(r#"{{{head},"runs":[]}} trailing"#),
            format!(r#"{{{head},"runs":[[0,4194304,"00000000"]]}}"#),
            format!(r#"{{{head},"runs":[[4096,1,"0"],[0,1,"0"]]}}"#),
            format!(r#"{{{head},"runs":[[0,0,"0"]]}}"#),
            format!(r#"{{{head},"runs":[[0,1,"zz"]]}}"#),
            r#"{"format":"qmpbackup-manifest","version":2,"file":"x","virtual-size":1048576,"block-size":3,"runs":[]}"#.into(),
            r#"{"format":"qmpbackup-manifest","version":2,"file":"x","runs":[[0,1,"0"]],"virtual-size":1048576,"block-size":1048576}"#.into(),
        ] {
            std::fs::write(&path, &bad).unwrap();
            let e = read_manifest(&image).unwrap_err().to_string();
            assert!(e.contains("damaged checksum manifest"), "{bad}: {e}");
            assert!(e.contains("--ignore-checksums"), "{bad}: {e}");
            assert!(load_manifest(&image).is_err(), "{bad}");
        }
    }
}
