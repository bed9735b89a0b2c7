//! Write-side throughput: convert (flatten a base+overlay chain into a new qcow2), commit
//! (overlay into its base) and random 4 KiB writes. Images are built with our own writer in
//! a tmpfs when available. Size: QCOW2_BENCH_MIB (default 256). Run:
//! `cargo bench --bench write`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qcow2::create::{create_qcow2, CreateOptions};
use qcow2::ops::commit::{commit, CommitOptions};
use qcow2::ops::convert::{to_qcow2, Qcow2ConvertOptions};
use qcow2::OpenRwOptions;
use qcow2::{Chain, OpenOptions, Qcow2};
use std::path::{Path, PathBuf};

fn scratch() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!("qcow2-wbench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn mib() -> u64 {
    std::env::var("QCOW2_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// base: `size` of data; top: every 8th 64 KiB cluster rewritten.
fn build_chain(dir: &Path, size: u64) {
    let _ = std::fs::remove_file(dir.join("base.qcow2"));
    let _ = std::fs::remove_file(dir.join("top.qcow2"));
    let mut base = create_qcow2(
        &dir.join("base.qcow2"),
        &CreateOptions {
            size,
            ..Default::default()
        },
    )
    .unwrap();
    let chunk = vec![0x5au8; 4 << 20];
    let mut off = 0;
    while off < size {
        base.write_at(&chunk, off, None).unwrap();
        off += chunk.len() as u64;
    }
    base.flush().unwrap();
    drop(base);
    let mut top = create_qcow2(
        &dir.join("top.qcow2"),
        &CreateOptions {
            size,
            backing: Some(("base.qcow2".into(), "qcow2".into())),
            ..Default::default()
        },
    )
    .unwrap();
    let c = vec![0xa5u8; 65536];
    let mut off = 0;
    while off < size {
        top.write_at(&c, off, None).unwrap();
        off += 8 * 65536;
    }
    top.flush().unwrap();
}

fn bench(c: &mut Criterion) {
    let dir = scratch();
    let size = mib() << 20;
    build_chain(&dir, size);

    let mut g = c.benchmark_group("write");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(size));
    g.bench_function("convert_chain_flatten", |b| {
        b.iter(|| {
            let chain = Chain::open(&dir.join("top.qcow2"), &OpenOptions::default()).unwrap();
            let out = dir.join("flat.qcow2");
            let _ = std::fs::remove_file(&out);
            to_qcow2(&chain, &out, &Qcow2ConvertOptions::default()).unwrap();
        })
    });
    g.throughput(Throughput::Bytes(size / 8));
    g.bench_function("commit_overlay", |b| {
        b.iter_batched(
            || build_chain(&dir, size),
            |_| {
                commit(&dir.join("top.qcow2"), &CommitOptions::default()).unwrap();
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("random_4k_write");
    g.throughput(Throughput::Elements(1000));
    let target = dir.join("rand.qcow2");
    let mut img = create_qcow2(
        &target,
        &CreateOptions {
            size,
            ..Default::default()
        },
    )
    .unwrap();
    let buf = vec![0x33u8; 4096];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    g.bench_function("qcow2_writer", |b| {
        b.iter(|| {
            for _ in 0..1000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                img.write_at(&buf, (x % (size / 4096)) * 4096, None)
                    .unwrap();
            }
            img.flush_metadata().unwrap();
        })
    });
    g.finish();
    drop(img);
    let _ = Qcow2::open_rw(&target, OpenRwOptions::default());
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
