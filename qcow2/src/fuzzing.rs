//! Entry points shared by the fuzz targets and the regression-corpus test, so both exercise
//! exactly the same code.

use crate::chain::{Chain, Layer};
use crate::image::Qcow2;
use crate::storage::MemStorage;
use std::sync::Arc;

/// Most extents visited and data bytes read per input: keeps hostile images (many L1 entries
/// sharing one L2 table, huge virtual sizes) from turning a fuzz run into a hang.
const MAX_EXTENTS: usize = 20_000;
const MAX_READ: u64 = 16 << 20;

/// Opens `data` as a standalone qcow2 image, walks its mapping, reads its data and checks it.
/// Errors are fine; panics are bugs.
pub fn open_read_check(data: &[u8]) {
    let storage = Arc::new(MemStorage::new(data.to_vec()));
    let Ok(img) = Qcow2::open_storage(storage, "fuzz.qcow2", None) else {
        return;
    };
    let _ = img.snapshots();
    let _ = img.bitmaps();
    let _ = crate::check::check(&img);
    let Ok(chain) = Chain::from_layers(vec![Layer::Qcow2(Box::new(img))]) else {
        return;
    };
    let mut extents = 0usize;
    let mut read = 0u64;
    let mut buf = vec![0u8; 65536];
    let _ = chain.for_each_extent(0, chain.virtual_size(), |e| {
        extents += 1;
        if extents > MAX_EXTENTS || read > MAX_READ {
            return Err(crate::error::Error::bad_request("fuzz budget spent"));
        }
        let n = e.len.min(buf.len() as u64);
        read += n;
        // Errors on individual extents are expected for garbage.
        let _ = chain.read_extent(e, e.start, &mut buf[..n as usize]);
        Ok(())
    });
}

/// Applies an operation sequence decoded from `data` to a small in-memory image and to a
/// model; afterwards our own check must find nothing and our read must equal the model.
/// Panics (the fuzzer's finding) on any disagreement.
pub fn write_ops(data: &[u8]) {
    use crate::create::{init_qcow2, CreateOptions};
    if data.len() < 2 {
        return;
    }
    const SIZE: u64 = 256 << 10;
    let cs_bits = [9u32, 12, 14, 16][(data[0] & 3) as usize];
    let ext = data[0] & 4 != 0 && cs_bits >= 14;
    let v2 = data[0] & 8 != 0 && !ext;
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: 1 << cs_bits,
        extended_l2: ext,
        version: if v2 { 2 } else { 3 },
        refcount_bits: if v2 {
            16
        } else {
            [16u32, 2, 64, 8][((data[0] >> 4) & 3) as usize]
        },
        ..Default::default()
    };
    let storage = Arc::new(MemStorage::new(Vec::new()));
    let mut img = init_qcow2(storage.clone(), "fuzz.qcow2", None, &opts).expect("create");
    let mut model = vec![0u8; SIZE as usize];
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let cs = 1u64 << cs_bits;
    let trace = std::env::var_os("QCOW2_FUZZ_TRACE").is_some();
    if trace {
        eprintln!("{opts:?}");
    }
    for (n, op) in data[1..].chunks_exact(5).enumerate().take(40) {
        let off = (u16::from_le_bytes([op[1], op[2]]) as u64 * 4) % SIZE;
        let len = ((op[3] as u64 + 1) * 512 + op[4] as u64).min(SIZE - off);
        if trace {
            eprintln!("op {} off {off} len {len} arg {}", op[0] % 8, op[4]);
        }
        match op[0] % 8 {
            0 | 1 => {
                let pat = op[4] | 1;
                img.write_at(&vec![pat; len as usize], off, None)
                    .expect("write");
                model[off as usize..(off + len) as usize].fill(pat);
            }
            2 => {
                img.write_zeroes(off, len, op[4] & 1 != 0, None)
                    .expect("zero");
                model[off as usize..(off + len) as usize].fill(0);
            }
            3 => {
                img.discard(off, len).expect("discard");
                let (a, b) = (off.div_ceil(cs) * cs, ((off + len) / cs) * cs);
                if b > a {
                    model[a as usize..b as usize].fill(0);
                }
            }
            4 => {
                let gc = off / cs;
                let start = (gc * cs) as usize;
                let end = (start + cs as usize).min(SIZE as usize);
                let mut cluster = vec![0u8; cs as usize];
                for (i, b) in cluster[..end - start].iter_mut().enumerate() {
                    *b = (i / 97) as u8 ^ op[4];
                }
                img.write_compressed(gc, &cluster)
                    .expect("compressed write");
                model[start..end].copy_from_slice(&cluster[..end - start]);
            }
            5 if opts.refcount_bits >= 8 && snaps.len() < 3 => {
                let name = format!("s{n}");
                img.snapshot_create(&name).expect("snapshot create");
                snaps.push((name, model.clone()));
            }
            6 if !snaps.is_empty() => {
                let (name, m) = &snaps[op[4] as usize % snaps.len()];
                img.snapshot_apply(name).expect("snapshot apply");
                model = m.clone();
            }
            7 if !snaps.is_empty() => {
                let (name, _) = snaps.remove(op[4] as usize % snaps.len());
                img.snapshot_delete(&name).expect("snapshot delete");
            }
            _ => {}
        }
        if trace {
            let mut got = vec![0u8; SIZE as usize];
            img.read_view(&mut got, 0, None).expect("read");
            if let Some(p) = got.iter().zip(&model).position(|(a, b)| a != b) {
                panic!(
                    "after op {n}: differs at {p:#x}: got {} want {}",
                    got[p], model[p]
                );
            }
        }
    }
    img.flush().expect("flush");
    drop(img);
    let reopened = Qcow2::open_storage(storage, "fuzz.qcow2", None).expect("reopen");
    let report = crate::check::check(&reopened).expect("check");
    assert!(
        report.corruptions == 0 && report.leaks == 0,
        "check found problems: {:?}",
        report.messages
    );
    let chain = Chain::from_layers(vec![Layer::Qcow2(Box::new(reopened))]).expect("chain");
    let mut got = vec![0u8; SIZE as usize];
    chain.read_at(&mut got, 0).expect("read");
    assert!(got == model, "read differs from the model");
}
