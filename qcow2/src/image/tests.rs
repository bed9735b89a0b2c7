//! The image on in-memory storage: mapping, copy-on-write, zero clusters, the write
//! mapping step, allocation and refcounts, checked against a model and our own `check`.

use super::write::{HostRun, WriteMapping};
use super::Backing;
use crate::chain::as_backing;
use crate::mapping::ExtentKind;
use crate::testutil::{chain_of, mem_image, read_all, reopen_checked};

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

fn view(img: &super::Qcow2, backing: Option<&dyn Backing>) -> Vec<u8> {
    let mut buf = vec![0u8; img.virtual_size() as usize];
    img.read_view(&mut buf, 0, backing).unwrap();
    buf
}

#[test]
fn a_new_image_maps_as_unallocated_and_reads_zeros() {
    let (img, _s) = mem_image(4 * M, 64 * K, false);
    assert_eq!(
        img.block_status(0, 4 * M).unwrap(),
        (4 * M, ExtentKind::Unallocated)
    );
    assert!(view(&img, None).iter().all(|&b| b == 0));
}

#[test]
fn whole_cluster_writes_allocate_one_contiguous_run() {
    let (mut img, s) = mem_image(4 * M, 64 * K, false);
    img.write_at(&vec![7u8; 256 * K as usize], 64 * K, None)
        .unwrap();
    let (len, kind) = img.block_status(64 * K, 4 * M - 64 * K).unwrap();
    assert_eq!(len, 256 * K, "four clusters of one run");
    assert!(matches!(kind, ExtentKind::Data { .. }));
    let img = reopen_checked(img, s);
    let v = view(&img, None);
    assert!(v[..64 * K as usize].iter().all(|&b| b == 0));
    assert!(v[64 * K as usize..320 * K as usize].iter().all(|&b| b == 7));
}

#[test]
fn rewrites_go_in_place_and_allocate_nothing() {
    let (mut img, s) = mem_image(M, 64 * K, false);
    img.write_at(&vec![1u8; 128 * K as usize], 0, None).unwrap();
    img.flush().unwrap();
    let len_before = img.file_len().unwrap();
    let runs = img
        .map_for_write(1000, 100 * K, WriteMapping::CopyOnWrite(None))
        .unwrap();
    let host = match img.block_status(0, M).unwrap().1 {
        ExtentKind::Data { host } => host,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        runs,
        vec![HostRun {
            guest: 1000,
            host: host + 1000,
            len: 100 * K
        }]
    );
    img.write_at(&[2u8; 100], 70 * K, None).unwrap();
    img.flush().unwrap();
    assert_eq!(img.file_len().unwrap(), len_before);
    let img = reopen_checked(img, s);
    let v = view(&img, None);
    assert_eq!(v[70 * K as usize], 2);
    assert_eq!(v[70 * K as usize - 1], 1);
}

#[test]
fn partial_writes_over_a_backing_copy_the_rest_of_the_cluster_up() {
    let (mut base, _bs) = mem_image(M, 64 * K, false);
    base.write_at(&vec![0xaa; M as usize], 0, None).unwrap();
    base.flush().unwrap();
    let below = chain_of(vec![base]);
    let (mut top, ts) = mem_image(M, 64 * K, false);
    top.write_at(&[0x55; 10], 65 * K + 3, Some(&below)).unwrap();
    let top = reopen_checked(top, ts);
    // The top owns the whole cluster now: the backing's bytes were copied up.
    let (len, kind) = top.block_status(64 * K, 64 * K).unwrap();
    assert_eq!(len, 64 * K);
    assert!(matches!(kind, ExtentKind::Data { .. }));
    let mut cluster = vec![0u8; 64 * K as usize];
    top.read_view(&mut cluster, 64 * K, None).unwrap();
    assert!(cluster[..K as usize + 3].iter().all(|&b| b == 0xaa));
    assert!(cluster[K as usize + 3..K as usize + 13]
        .iter()
        .all(|&b| b == 0x55));
    assert!(cluster[K as usize + 13..].iter().all(|&b| b == 0xaa));
    // Elsewhere the top still shows the backing.
    assert_eq!(
        top.block_status(0, 64 * K).unwrap().1,
        ExtentKind::Unallocated
    );
}

#[test]
fn zero_writes_make_zero_clusters_that_hide_the_backing() {
    let (mut base, _bs) = mem_image(M, 64 * K, false);
    base.write_at(&vec![9; M as usize], 0, None).unwrap();
    base.flush().unwrap();
    let below = chain_of(vec![base]);
    let (mut top, ts) = mem_image(M, 64 * K, false);
    // Whole clusters become ZERO entries; the partial head gets explicit zeros.
    top.write_zeroes(60 * K, 200 * K, true, Some(&below))
        .unwrap();
    let top = reopen_checked(top, ts);
    assert_eq!(
        top.block_status(128 * K, 64 * K).unwrap(),
        (64 * K, ExtentKind::Zero { host: None })
    );
    let v = view(&top, Some(&below));
    assert!(v[..60 * K as usize].iter().all(|&b| b == 9));
    assert!(v[60 * K as usize..260 * K as usize].iter().all(|&b| b == 0));
    assert!(v[260 * K as usize..].iter().all(|&b| b == 9));
}

#[test]
fn discard_frees_clusters_and_refcounts_stay_exact() {
    let (mut img, s) = mem_image(2 * M, 64 * K, false);
    img.write_at(&vec![3; 2 * M as usize], 0, None).unwrap();
    img.flush().unwrap();
    img.discard(0, M).unwrap();
    // The freed space is reused by the next allocation instead of growing the file.
    img.flush().unwrap();
    let len = img.file_len().unwrap();
    img.write_at(&vec![4; 64 * K as usize], 0, None).unwrap();
    img.flush().unwrap();
    assert_eq!(img.file_len().unwrap(), len);
    let img = reopen_checked(img, s);
    let v = view(&img, None);
    assert!(v[..64 * K as usize].iter().all(|&b| b == 4));
    assert!(v[64 * K as usize..M as usize].iter().all(|&b| b == 0));
    assert!(v[M as usize..].iter().all(|&b| b == 3));
}

#[test]
fn allocate_for_write_maps_fresh_clusters_and_refuses_allocated_ones() {
    let (mut img, s) = mem_image(M + 1000, 64 * K, false);
    let runs = img.allocate_for_write(128 * K, 192 * K).unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!((runs[0].guest, runs[0].len), (128 * K, 192 * K));
    // The disk's end may cut the last cluster.
    let tail = img.allocate_for_write(M, 1000).unwrap();
    assert_eq!(tail[0].len, 1000);
    let e = img.allocate_for_write(128 * K, 64 * K).unwrap_err();
    assert!(
        e.is_usage() && e.to_string().contains("allocated already"),
        "{e}"
    );
    let e = img.allocate_for_write(100, 64 * K).unwrap_err();
    assert!(e.to_string().contains("unaligned"), "{e}");
    for r in runs.iter().chain(&tail) {
        img.storage()
            .write_at(&vec![6u8; r.len as usize], r.host)
            .unwrap();
    }
    let img = reopen_checked(img, s);
    let v = view(&img, None);
    assert!(v[128 * K as usize..320 * K as usize]
        .iter()
        .all(|&b| b == 6));
    assert!(v[M as usize..M as usize + 1000].iter().all(|&b| b == 6));
}

#[test]
fn writes_past_the_end_are_usage_errors() {
    let (mut img, _s) = mem_image(M, 64 * K, false);
    let e = img.write_at(&[1; 10], M - 5, None).unwrap_err();
    assert!(e.is_usage(), "{e}");
    assert!(
        e.to_string().starts_with("mem.qcow2: write of 10 bytes"),
        "{e}"
    );
    let e = img.write_zeroes(M, 1, false, None).unwrap_err();
    assert!(e.is_usage());
}

#[test]
fn extended_l2_writes_subclusters_and_maps_them() {
    let (mut img, s) = mem_image(4 * M, 64 * K, true);
    img.write_at(&vec![8; 64 * K as usize], 128 * K, None)
        .unwrap();
    img.write_zeroes(256 * K, 64 * K, true, None).unwrap();
    let img = reopen_checked(img, s);
    assert!(matches!(
        img.block_status(128 * K, 64 * K).unwrap().1,
        ExtentKind::Data { .. }
    ));
    assert_eq!(
        img.block_status(256 * K, 64 * K).unwrap().1,
        ExtentKind::Zero { host: None }
    );
    let v = view(&img, None);
    assert!(v[128 * K as usize..192 * K as usize]
        .iter()
        .all(|&b| b == 8));
}

#[test]
fn compressed_clusters_round_trip_and_map_as_compressed() {
    let (mut img, s) = mem_image(M, 64 * K, false);
    let cluster: Vec<u8> = (0..64 * K).map(|i| (i / 100) as u8).collect();
    img.write_compressed(2, &cluster).unwrap();
    let mut x = 0x9e3779b97f4a7c15u64;
    let incompressible: Vec<u8> = (0..64 * K)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    img.write_compressed(5, &incompressible).unwrap();
    let img = reopen_checked(img, s);
    assert!(matches!(
        img.block_status(128 * K, 64 * K).unwrap().1,
        ExtentKind::Compressed { .. }
    ));
    assert!(matches!(
        img.block_status(5 * 64 * K, 64 * K).unwrap().1,
        ExtentKind::Data { .. }
    ));
    let v = view(&img, None);
    assert_eq!(&v[128 * K as usize..192 * K as usize], &cluster[..]);
    assert_eq!(&v[320 * K as usize..384 * K as usize], &incompressible[..]);
}

#[test]
fn chain_map_resolves_each_range_in_the_topmost_layer_that_has_it() {
    let (mut base, _b) = mem_image(2 * M, 64 * K, false);
    base.write_at(&vec![1; 2 * M as usize], 0, None).unwrap();
    base.flush().unwrap();
    let (mut mid, _m) = mem_image(2 * M, 64 * K, false);
    mid.write_at(&vec![2; 64 * K as usize], 0, None).unwrap();
    mid.write_zeroes(M, 128 * K, true, None).unwrap();
    mid.flush().unwrap();
    let (mut top, _t) = mem_image(2 * M, 64 * K, false);
    top.write_at(&vec![3; 64 * K as usize], 64 * K, None)
        .unwrap();
    top.flush().unwrap();
    let chain = chain_of(vec![top, mid, base]);
    let map = chain.map(0, 2 * M).unwrap();
    let at = |off: u64| {
        map.iter()
            .find(|e| e.start <= off && off < e.end())
            .unwrap()
    };
    assert_eq!(at(0).depth, 1);
    assert_eq!(at(100 * K).depth, 0);
    assert_eq!(at(200 * K).depth, 2);
    assert_eq!(at(M).depth, 1);
    assert!(at(M).reads_as_zero());
    // Extents cover the disk exactly, in order, without overlap.
    assert_eq!(map[0].start, 0);
    assert!(map.windows(2).all(|w| w[0].end() == w[1].start));
    assert_eq!(map.last().unwrap().end(), 2 * M);
    let all = read_all(&chain);
    assert!(all[..64 * K as usize].iter().all(|&b| b == 2));
    assert!(all[64 * K as usize..128 * K as usize]
        .iter()
        .all(|&b| b == 3));
    assert!(all[128 * K as usize..M as usize].iter().all(|&b| b == 1));
    assert!(all[M as usize..M as usize + 128 * K as usize]
        .iter()
        .all(|&b| b == 0));
    assert!(all[M as usize + 128 * K as usize..].iter().all(|&b| b == 1));
}

#[test]
fn chain_map_above_a_layer_stops_there() {
    let (mut base, _b) = mem_image(M, 64 * K, false);
    base.write_at(&vec![1; M as usize], 0, None).unwrap();
    base.flush().unwrap();
    let (mut top, _t) = mem_image(M, 64 * K, false);
    top.write_at(&vec![2; 64 * K as usize], 128 * K, None)
        .unwrap();
    top.flush().unwrap();
    let chain = chain_of(vec![top, base]);
    let mut seen = Vec::new();
    chain
        .for_each_extent_above(0, M, 1, |e| {
            seen.push((e.start, e.len, e.depth, e.present()));
            Ok(())
        })
        .unwrap();
    assert_eq!(
        seen,
        vec![
            (0, 128 * K, 1, false),
            (128 * K, 64 * K, 0, true),
            (192 * K, M - 192 * K, 1, false)
        ]
    );
}

#[test]
fn copy_on_write_through_a_chain_backing_matches_a_model() {
    // Random-ish writes of every shape over a backing, compared byte for byte.
    let (mut base, _b) = mem_image(M, 4 * K, false);
    let pattern: Vec<u8> = (0..M).map(|i| (i % 251) as u8).collect();
    base.write_at(&pattern, 0, None).unwrap();
    base.flush().unwrap();
    let below = chain_of(vec![base]);
    let (mut top, ts) = mem_image(M, 4 * K, false);
    let mut model = pattern.clone();
    let mut x = 12345u64;
    for i in 0..200 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 20) % M;
        let len = ((x >> 40) % (20 * K)).min(M - off).max(1);
        let byte = (i % 200 + 1) as u8;
        if i % 5 == 4 {
            top.write_zeroes(off, len, i % 2 == 0, as_backing(Some(&below)))
                .unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        } else {
            top.write_at(&vec![byte; len as usize], off, as_backing(Some(&below)))
                .unwrap();
            model[off as usize..(off + len) as usize].fill(byte);
        }
    }
    let top = reopen_checked(top, ts);
    assert!(view(&top, Some(&below)) == model);
}

#[test]
fn grow_extends_the_l1_and_the_new_space_reads_zeros() {
    let (mut img, s) = mem_image(M, 512, false);
    img.write_at(&[5; 512], M - 512, None).unwrap();
    // 512-byte clusters: 64 KiB per L2 table, so growing needs a bigger L1.
    img.grow(8 * M).unwrap();
    img.write_at(&[6; 512], 8 * M - 512, None).unwrap();
    let img = reopen_checked(img, s);
    assert_eq!(img.virtual_size(), 8 * M);
    assert!(img.l1().len() as u64 >= 8 * M / (64 * K));
    let v = view(&img, None);
    assert_eq!(v[M as usize - 1], 5);
    assert!(v[M as usize..8 * M as usize - 512].iter().all(|&b| b == 0));
    assert_eq!(v[8 * M as usize - 1], 6);
}

#[test]
fn snapshots_keep_their_view_while_the_image_changes() {
    let (mut img, s) = mem_image(M, 64 * K, false);
    img.write_at(&vec![1; M as usize], 0, None).unwrap();
    img.snapshot_create("before").unwrap();
    img.write_at(&vec![2; 64 * K as usize], 0, None).unwrap();
    img.flush().unwrap();
    assert_eq!(view(&img, None)[0], 2);
    img.snapshot_apply("before").unwrap();
    assert_eq!(view(&img, None)[0], 1);
    img.snapshot_delete("before").unwrap();
    let e = img.snapshot_delete("before").unwrap_err();
    assert!(e.is_usage() && e.to_string().contains("not found"), "{e}");
    reopen_checked(img, s);
}

#[test]
fn growing_with_a_zeroed_tail_hides_what_a_shrink_left_in_the_last_cluster() {
    for compressed in [false, true] {
        let (mut img, s) = mem_image(128 * K, 64 * K, false);
        let data = vec![0x5a; 128 * K as usize];
        if compressed {
            img.write_compressed(1, &data[..64 * K as usize]).unwrap();
        } else {
            img.write_at(&data, 0, None).unwrap();
        }
        // As a shrink to 68 KiB leaves it: the second cluster still holds data past the size.
        img.header.size = 68 * K;
        let zeroed = img.grow_zeroing_tail(256 * K).unwrap();
        assert_eq!(zeroed, Some(68 * K..128 * K));
        let img = reopen_checked(img, s);
        let v = view(&img, None);
        assert!(v[64 * K as usize..68 * K as usize]
            .iter()
            .all(|&b| b == 0x5a));
        assert!(v[68 * K as usize..].iter().all(|&b| b == 0), "{compressed}");
    }
    // Nothing to hide: an aligned old size, or a tail that already reads as zeros.
    let (mut img, _) = mem_image(128 * K, 64 * K, false);
    assert_eq!(img.grow_zeroing_tail(256 * K).unwrap(), None);
    img.header.size = 68 * K;
    assert_eq!(img.grow_zeroing_tail(256 * K).unwrap(), None);
}

#[test]
fn an_application_extension_survives_a_reopen_and_is_replaced_in_place() {
    let (mut img, s) = mem_image(4 * M, 64 * K, false);
    const KIND: u32 = 0x716d_7062;
    img.set_app_extension(KIND, b"first".to_vec()).unwrap();
    img.write_at(&[1u8; 512], 0, None).unwrap();
    img.set_app_extension(KIND, b"second record".to_vec())
        .unwrap();
    let img = reopen_checked(img, s);
    assert_eq!(img.app_extension(KIND), Some(&b"second record"[..]));
    assert_eq!(img.app_extension(KIND + 1), None);
    let mut img = img;
    img.make_writable().unwrap();
    // Extensions qcow2 defines are not for applications.
    assert!(img
        .set_app_extension(crate::format::header::EXT_BITMAPS, vec![])
        .is_err());
    // Nor one that would not fit the header cluster.
    assert!(img.set_app_extension(KIND, vec![0; 70_000]).is_err());
    assert_eq!(img.app_extension(KIND), Some(&b"second record"[..]));
}
