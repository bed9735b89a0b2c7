//! Shared helpers for oracle tests: run qemu-img / qemu-io, compare our results with theirs.

use qcow2::ops::{info, map};
use qcow2::{check, Chain, OpenOptions};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("qcow2-oracle")
                .tempdir()
                .expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Runs a program (with `LC_ALL=C`, `TZ=UTC`), returning its exit code, stdout and stderr.
pub fn run_tool(cmd: &str, args: &[&str], cwd: Option<&Path>) -> (i32, String, String) {
    let mut c = Command::new(cmd);
    c.args(args).env("LC_ALL", "C").env("TZ", "UTC");
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    let out = c.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd} ({e}): install the test oracles with `bash .ci/install-qemu`")
    });
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs qemu-img in `cwd`, asserting success; returns stdout.
pub fn qemu_img(cwd: &Path, args: &[&str]) -> String {
    let (code, out, err) = run_tool("qemu-img", args, Some(cwd));
    assert_eq!(code, 0, "qemu-img {args:?} failed: {err}");
    out
}

pub fn qemu_img_status(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    run_tool("qemu-img", args, Some(cwd))
}

/// A guest write a test applies to an image (through qemu-io) and to its model.
pub enum GuestWrite {
    /// (offset, length, byte pattern)
    Data(usize, usize, u8),
    /// (offset, length): reads as zeros afterwards
    Zero(usize, usize),
}

/// Applies `w` to `model` and returns the qemu-io command that does the same to an image.
pub fn apply(model: &mut [u8], w: &GuestWrite) -> String {
    match *w {
        GuestWrite::Data(off, len, p) => {
            model[off..off + len].fill(p);
            format!("write -P {p} {off} {len}")
        }
        GuestWrite::Zero(off, len) => {
            model[off..off + len].fill(0);
            format!("write -z {off} {len}")
        }
    }
}

/// Runs qemu-io with each command as a -c, asserting success.
pub fn qemu_io(cwd: &Path, file: &str, cmds: &[impl AsRef<str> + std::fmt::Debug]) {
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c.as_ref());
    }
    args.push(file);
    let (code, out, err) = run_tool("qemu-io", &args, Some(cwd));
    assert!(
        code == 0 && !out.contains("failed") && !err.contains("failed"),
        "qemu-io {cmds:?} on {file} failed: {out}{err}"
    );
}

pub fn qemu_io_raw_args(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    run_tool("qemu-io", args, Some(cwd))
}

pub fn open(path: &Path) -> Chain {
    Chain::open(path, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("our reader failed to open {}: {e}", path.display()))
}

/// Our raw read of the whole disk equals `qemu-img convert -O raw`.
pub fn assert_read_matches(dir: &Path, file: &str) {
    let raw_name = format!("{file}.oracle.raw");
    qemu_img(dir, &["convert", "-O", "raw", file, &raw_name]);
    let expected = std::fs::read(dir.join(&raw_name)).unwrap();
    std::fs::remove_file(dir.join(&raw_name)).unwrap();
    let chain = open(&dir.join(file));
    assert_eq!(chain.virtual_size(), expected.len() as u64, "{file}: size");
    let mut ours = vec![0u8; expected.len()];
    chain.read_at(&mut ours, 0).expect("our read");
    if ours != expected {
        let i = ours
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap();
        panic!("{file}: our read differs from qemu-img at byte {i:#x}");
    }
    // Reads at odd offsets and lengths agree too.
    let len = expected.len();
    for (off, n) in [
        (1usize, 1000usize),
        (511, 5000),
        (len / 3, 70000),
        (len.saturating_sub(777), 777),
    ] {
        if off + n <= len {
            let mut b = vec![0u8; n];
            chain.read_at(&mut b, off as u64).unwrap();
            assert_eq!(b, expected[off..off + n], "{file}: read at {off} len {n}");
        }
    }
}

/// Our info (each layer) equals qemu-img info's top-level fields (except `children`).
pub fn assert_info_matches(dir: &Path, file: &str) {
    let theirs: Value = serde_json::from_str(&qemu_img(
        dir,
        &["info", "-U", "--output", "json", "--backing-chain", file],
    ))
    .unwrap();
    let chain = Chain::open(&dir.join(file), &OpenOptions::default()).unwrap();
    let theirs = theirs.as_array().unwrap();
    assert_eq!(theirs.len(), chain.layers().len(), "{file}: chain length");
    for (i, t) in theirs.iter().enumerate() {
        let mut ours = serde_json::to_value(info::layer_info(&chain, i).unwrap()).unwrap();
        let mut t = t.clone();
        t.as_object_mut().unwrap().remove("children");
        // Paths: qemu prints them as given relative to its cwd; ours are joined the same way
        // but from an absolute top path, so compare file names relative to `dir`.
        for v in [&mut ours, &mut t] {
            let o = v.as_object_mut().unwrap();
            for key in ["filename", "full-backing-filename"] {
                if let Some(Value::String(s)) = o.get(key) {
                    let p = Path::new(s);
                    let p = p.strip_prefix(dir).unwrap_or(p);
                    let norm = normalize(p);
                    o.insert(key.into(), Value::String(norm));
                }
            }
            // actual-size is the file's allocation; qemu and we stat at different moments.
            o.remove("actual-size");
        }
        assert_eq!(ours, t, "{file}: info of layer {i}");
    }
}

fn normalize(p: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                if parts.last().is_some_and(|l| l != "..") {
                    parts.pop();
                } else {
                    parts.push("..".into());
                }
            }
            std::path::Component::CurDir => {}
            other => parts.push(other.as_os_str().to_string_lossy().into_owned()),
        }
    }
    parts.join("/")
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct NormEntry {
    start: u64,
    length: u64,
    depth: u64,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
}

fn merge_entries(v: Vec<NormEntry>) -> Vec<NormEntry> {
    let mut out: Vec<NormEntry> = Vec::new();
    for e in v {
        if let Some(l) = out.last_mut() {
            let contiguous = match (l.offset, e.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + l.length == b,
                _ => false,
            };
            if l.start + l.length == e.start
                && l.depth == e.depth
                && l.present == e.present
                && l.zero == e.zero
                && l.data == e.data
                && l.compressed == e.compressed
                && contiguous
            {
                l.length += e.length;
                continue;
            }
        }
        out.push(e);
    }
    out
}

/// Our map agrees with `qemu-img map --output json` (zero compared only where data is false:
/// qemu also reports host-file holes as zero).
pub fn assert_map_matches(dir: &Path, file: &str) {
    let theirs: Value =
        serde_json::from_str(&qemu_img(dir, &["map", "-U", "--output", "json", file])).unwrap();
    let theirs: Vec<NormEntry> = theirs
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let data = e["data"].as_bool().unwrap();
            NormEntry {
                start: e["start"].as_u64().unwrap(),
                length: e["length"].as_u64().unwrap(),
                depth: e["depth"].as_u64().unwrap(),
                present: e["present"].as_bool().unwrap(),
                zero: !data && e["zero"].as_bool().unwrap(),
                data,
                compressed: e["compressed"].as_bool().unwrap_or(false),
                // qemu also prints the host cluster of unallocated subclusters of an
                // allocated extended-L2 cluster (present false); that offset means nothing.
                offset: e
                    .get("offset")
                    .and_then(|o| o.as_u64())
                    .filter(|_| e["present"].as_bool().unwrap()),
            }
        })
        .collect();
    let chain = open(&dir.join(file));
    let mut ours = Vec::new();
    map::for_each_entry(&chain, |m| {
        ours.push(NormEntry {
            start: m.start,
            length: m.length,
            depth: m.depth as u64,
            present: m.present,
            zero: !m.data && m.zero,
            data: m.data,
            compressed: m.compressed,
            offset: m.offset,
        });
        Ok(())
    })
    .unwrap();
    let (ours, theirs) = (merge_entries(ours), merge_entries(theirs));
    assert_eq!(ours, theirs, "{file}: map differs from qemu-img");
}

/// Our check agrees with `qemu-img check --output json` on the counters and exit code.
pub fn assert_check_matches(dir: &Path, file: &str) -> i32 {
    let (code, out, err) = qemu_img_status(dir, &["check", "-U", "--output", "json", file]);
    let theirs: Value =
        serde_json::from_str(&out).unwrap_or_else(|_| panic!("qemu-img check output: {out}{err}"));
    let chain = Chain::open(
        &dir.join(file),
        &OpenOptions {
            no_backing: true,
            ..Default::default()
        },
    )
    .unwrap();
    let ours = check::check(chain.top().as_qcow2().unwrap()).unwrap();
    let o = serde_json::to_value(&ours).unwrap();
    for key in [
        "check-errors",
        "corruptions",
        "leaks",
        "total-clusters",
        "allocated-clusters",
        "fragmented-clusters",
        "compressed-clusters",
        "image-end-offset",
    ] {
        assert_eq!(
            o.get(key).and_then(Value::as_u64).unwrap_or(0),
            theirs.get(key).and_then(Value::as_u64).unwrap_or(0),
            "{file}: check key {key}: ours {o} theirs {theirs}\nour messages: {:?}\ntheir stderr: {err}",
            ours.messages
        );
    }
    assert_eq!(ours.exit_code(), code, "{file}: check exit code");
    code
}

/// All four oracle comparisons.
pub fn assert_all_match(dir: &Path, file: &str) {
    assert_read_matches(dir, file);
    assert_info_matches(dir, file);
    assert_map_matches(dir, file);
    assert_check_matches(dir, file);
}

/// Creates a qcow2 image with qemu-img.
pub fn create(dir: &Path, file: &str, size: &str, opts: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    args.push(file);
    args.push(size);
    qemu_img(dir, &args);
}

/// A standard mix of guest writes: patterns at cluster and sub-cluster offsets, zero writes,
/// discards, and a write straddling cluster boundaries.
pub fn scatter_writes(dir: &Path, file: &str, size: u64) {
    let s = |f: f64| ((size as f64 * f) as u64) & !511;
    let cmds = [
        "write -P 0x11 0 64k".to_string(),
        format!("write -P 0x22 {} 3k", s(0.1) + 512),
        format!("write -P 0x33 {} 200k", s(0.3)),
        format!("write -z {} 64k", s(0.3) + 64 * 1024),
        format!("discard {} 64k", s(0.5)),
        format!("write -P 0x44 {} 4k", s(0.7) + 1024),
        format!("write -P 0x55 {} 512", size - 512),
    ];
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(dir, file, &refs);
}

/// `qemu-img check` says the image is clean (no errors, no leaks).
pub fn assert_qemu_clean(dir: &Path, file: &str) {
    let (code, out, err) = qemu_img_status(dir, &["check", "-U", file]);
    assert_eq!(code, 0, "qemu-img check {file}: {out}{err}");
}

/// `qemu-img compare` says the two disks have equal content.
pub fn assert_qemu_same(dir: &Path, a: &str, b: &str) {
    let (code, out, err) = qemu_img_status(dir, &["compare", "-U", a, b]);
    assert_eq!(code, 0, "qemu-img compare {a} {b}: {out}{err}");
}

/// A varied set of images (and chains) made by qemu-img/qemu-io; returns the top files.
pub fn build_image_set(d: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for (name, opts) in [
        ("m-v2.qcow2", "compat=0.10"),
        ("m-512.qcow2", "cluster_size=512"),
        ("m-4k-rc1.qcow2", "cluster_size=4k,refcount_bits=1"),
        ("m-64k.qcow2", ""),
        ("m-2m.qcow2", "cluster_size=2M"),
        ("m-ext.qcow2", "extended_l2=on"),
        ("m-rc64.qcow2", "refcount_bits=64"),
        ("m-lazy.qcow2", "lazy_refcounts=on"),
    ] {
        create(d, name, "6M", opts);
        scatter_writes(d, name, 6 << 20);
        out.push(name.to_string());
    }
    qemu_img(
        d,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "m-64k.qcow2",
            "m-zlib.qcow2",
        ],
    );
    qemu_img(
        d,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd,cluster_size=4k",
            "m-64k.qcow2",
            "m-zstd.qcow2",
        ],
    );
    out.push("m-zlib.qcow2".into());
    out.push("m-zstd.qcow2".into());
    // A chain with a top larger than its base, zero clusters over data.
    create(d, "m-base.qcow2", "4M", "");
    qemu_io(d, "m-base.qcow2", &["write -P 0x11 0 4M"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "m-base.qcow2",
            "-F",
            "qcow2",
            "m-top.qcow2",
            "6M",
        ],
    );
    qemu_io(
        d,
        "m-top.qcow2",
        &[
            "write -P 0x22 1M 100k",
            "write -z 2M 128k",
            "write -P 0x33 5M 64k",
        ],
    );
    out.push("m-top.qcow2".into());
    // Internal snapshot.
    create(d, "m-snap.qcow2", "2M", "");
    qemu_io(d, "m-snap.qcow2", &["write -P 0x44 0 1M"]);
    qemu_img(d, &["snapshot", "-c", "s1", "m-snap.qcow2"]);
    qemu_io(d, "m-snap.qcow2", &["write -P 0x45 512k 1M"]);
    out.push("m-snap.qcow2".into());
    out
}
