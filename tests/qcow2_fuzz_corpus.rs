//! Replays the fuzz corpus (seeds and every input a fuzzer found interesting or crashing):
//! no panic, and each input finishes quickly.

use std::path::Path;
use std::time::{Duration, Instant};

fn replay(target: &str, f: impl Fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let start = Instant::now();
        f(&data);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} took {:?}",
            path.display(),
            start.elapsed()
        );
        n += 1;
    }
    assert!(n > 0, "empty corpus in {}", dir.display());
}

#[test]
fn open_read_check_corpus() {
    replay("open_read_check", qcow2::fuzzing::open_read_check);
}

#[test]
fn header_corpus() {
    replay("header", |d| {
        let _ = qcow2::format::header::Header::parse(d);
    });
}

#[test]
fn write_ops_corpus() {
    replay("write_ops", qcow2::fuzzing::write_ops);
}
