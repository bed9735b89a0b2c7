//! Read throughput: a fully allocated qcow2 image read sequentially through our reader,
//! beside a plain read of the same bytes from a raw file (the bound), and random 4 KiB reads.
//!
//! Size: QCOW2_BENCH_MIB (default 1024). Images are built with qemu-img in a tmpfs when one
//! is available. Run: `cargo bench --bench read`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qcow2::{Chain, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const CHUNK: usize = 4 << 20;

fn scratch_dir() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!("qcow2-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sh(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd).args(args).status().expect(cmd);
    assert!(st.success(), "{cmd} {args:?}");
}

struct Images {
    dir: PathBuf,
    qcow2: PathBuf,
    raw: PathBuf,
    size: u64,
}

impl Drop for Images {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn build_images() -> Images {
    let mib: u64 = std::env::var("QCOW2_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let size = mib << 20;
    let dir = scratch_dir();
    let qcow2 = dir.join("seq.qcow2");
    let raw = dir.join("seq.raw");
    let q = qcow2.to_str().unwrap();
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", q, &size.to_string()],
    );
    sh(
        "qemu-io",
        &["-f", "qcow2", "-c", &format!("write -P 0x5a 0 {size}"), q],
    );
    sh(
        "qemu-img",
        &["convert", "-O", "raw", q, raw.to_str().unwrap()],
    );
    Images {
        dir,
        qcow2,
        raw,
        size,
    }
}

fn bench_read(c: &mut Criterion) {
    let img = build_images();
    let chain = Chain::open(&img.qcow2, &OpenOptions::default()).unwrap();
    let raw = std::fs::File::open(&img.raw).unwrap();
    let mut buf = vec![0u8; CHUNK];

    let mut g = c.benchmark_group("sequential_read");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(img.size));
    g.bench_function(BenchmarkId::new("qcow2_reader", img.size >> 20), |b| {
        b.iter(|| {
            let mut off = 0;
            while off < img.size {
                let n = (CHUNK as u64).min(img.size - off) as usize;
                chain.read_at(&mut buf[..n], off).unwrap();
                off += n as u64;
            }
        })
    });
    g.bench_function(BenchmarkId::new("plain_file_read", img.size >> 20), |b| {
        b.iter(|| {
            let mut off = 0;
            while off < img.size {
                let n = (CHUNK as u64).min(img.size - off) as usize;
                raw.read_exact_at(&mut buf[..n], off).unwrap();
                off += n as u64;
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("random_4k_read");
    g.throughput(Throughput::Elements(1000));
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let offsets: Vec<u64> = (0..1000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (img.size / 4096)) * 4096
        })
        .collect();
    let mut small = vec![0u8; 4096];
    g.bench_function("qcow2_reader", |b| {
        b.iter(|| {
            for &o in &offsets {
                chain.read_at(&mut small, o).unwrap();
            }
        })
    });
    g.bench_function("plain_file_read", |b| {
        b.iter(|| {
            for &o in &offsets {
                raw.read_exact_at(&mut small, o).unwrap();
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench_read);
criterion_main!(benches);
