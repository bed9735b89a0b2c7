//! The read path of `verify` and of the manifest checks: re-reading a file and CRC-32ing it,
//! with large `pread`s into a reused buffer against `memmap2` (the design card's candidate),
//! each on one thread and on two (disjoint halves). `verify` keeps what wins here.
//!
//! Size: QCOW2_BENCH_MIB (default 1024), in a tmpfs when there is one (TMPDIR otherwise:
//! a disk filesystem's page cache). Run: `cargo bench --bench read_path`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

struct Scratch {
    path: PathBuf,
    len: u64,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn scratch() -> Scratch {
    let mib: u64 = std::env::var("QCOW2_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let base = match std::env::var_os("TMPDIR") {
        Some(t) => PathBuf::from(t),
        None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
        None => std::env::temp_dir(),
    };
    let path = base.join(format!("read-path-bench-{}", std::process::id()));
    let mut f = File::create(&path).unwrap();
    let block: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    for _ in 0..mib {
        f.write_all(&block).unwrap();
    }
    Scratch {
        path,
        len: mib << 20,
    }
}

fn by_pread(f: &File, range: (u64, u64), buf: &mut [u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let mut p = range.0;
    while p < range.1 {
        let n = (buf.len() as u64).min(range.1 - p) as usize;
        f.read_exact_at(&mut buf[..n], p).unwrap();
        h.update(&buf[..n]);
        p += n as u64;
    }
    h.finalize()
}

fn by_mmap(f: &File, range: (u64, u64), sequential: bool) -> u32 {
    // SAFETY: the scratch file is ours and nothing truncates it while it is mapped.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(range.0)
            .len((range.1 - range.0) as usize)
            .map(f)
            .unwrap()
    };
    if sequential {
        map.advise(memmap2::Advice::Sequential).unwrap();
    }
    crc32fast::hash(&map)
}

/// Runs `read` on `threads` disjoint, equal parts of the file at once.
fn in_threads(len: u64, threads: u64, read: impl Fn((u64, u64)) -> u32 + Sync) {
    let share = len / threads;
    std::thread::scope(|s| {
        let read = &read;
        let parts: Vec<_> = (0..threads)
            .map(|i| {
                let end = if i + 1 == threads {
                    len
                } else {
                    (i + 1) * share
                };
                s.spawn(move || read((i * share, end)))
            })
            .collect();
        for p in parts {
            std::hint::black_box(p.join().unwrap());
        }
    });
}

fn bench(c: &mut Criterion) {
    let file = scratch();
    let f = File::open(&file.path).unwrap();
    let mut g = c.benchmark_group("reread_crc32");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(file.len));
    for threads in [1u64, 2] {
        for block_mib in [1usize, 4] {
            g.bench_function(
                BenchmarkId::new(format!("pread_{block_mib}MiB"), threads),
                |b| {
                    b.iter(|| {
                        in_threads(file.len, threads, |r| {
                            by_pread(&f, r, &mut vec![0u8; block_mib << 20])
                        })
                    })
                },
            );
        }
        for (name, sequential) in [("mmap", false), ("mmap_sequential", true)] {
            g.bench_function(BenchmarkId::new(name, threads), |b| {
                b.iter(|| in_threads(file.len, threads, |r| by_mmap(&f, r, sequential)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
