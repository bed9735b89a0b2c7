//! Property test of the write path: random sequences of write / zero / discard / snapshot
//! create-apply-delete / commit run through our writer and against an in-memory model. At
//! the end qemu-img reads what the model says, for the disk and every snapshot, and
//! `qemu-img check` finds both images clean.

use proptest::prelude::*;
use qcow2::chain::open_backing_of;
use qcow2::create::{create_qcow2, CreateOptions};
use qcow2::ops::commit::{commit, CommitOptions};
use qcow2::OpenRwOptions;
use qcow2::Qcow2;
use std::collections::BTreeMap;
use testkit::oracle::*;

const SIZE: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, pattern: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    SnapCreate(u8),
    SnapApply(u8),
    SnapDelete(u8),
    Commit,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0u64..SIZE, 1u64..200_000).prop_map(|(off, l)| (off, l.min(SIZE - off)));
    prop_oneof![
        6 => (range.clone(), 1u8..=255).prop_map(|((off, len), pattern)| Op::Write { off, len, pattern }),
        2 => (range.clone(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => range.prop_map(|(off, len)| Op::Discard { off, len }),
        1 => (0u8..3).prop_map(Op::SnapCreate),
        1 => (0u8..3).prop_map(Op::SnapApply),
        1 => (0u8..3).prop_map(Op::SnapDelete),
        1 => Just(Op::Commit),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn writer_matches_model(
        ops in proptest::collection::vec(op(), 1..25),
        cs_bits in prop_oneof![Just(9u32), Just(12u32), Just(16u32)],
        ext in any::<bool>(),
        v2 in any::<bool>(),
    ) {
        let cs = 1u64 << cs_bits;
        let ext = ext && cs_bits >= 14 && !v2;
        let s = Scratch::new();
        let d = s.dir.path();
        let base_p = d.join("base.qcow2");
        let top_p = d.join("top.qcow2");
        let opts = CreateOptions {
            size: SIZE,
            cluster_size: cs,
            extended_l2: ext,
            version: if v2 { 2 } else { 3 },
            ..Default::default()
        };
        let mut base = create_qcow2(&base_p, &opts).unwrap();
        let mut base_model = vec![0u8; SIZE as usize];
        base.write_at(&vec![0x42; 300_000], 100_000, None).unwrap();
        base_model[100_000..400_000].fill(0x42);
        base.flush().unwrap();
        drop(base);
        let top_opts = CreateOptions { backing: Some(("base.qcow2".into(), "qcow2".into())), ..opts.clone() };
        create_qcow2(&top_p, &top_opts).unwrap().flush().unwrap();
        let mut model = base_model.clone();
        let mut snaps: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut top = Qcow2::open_rw(&top_p, OpenRwOptions::default()).unwrap();
        let mut backing = open_backing_of(&top).unwrap();
        for o in &ops {
            match *o {
                Op::Write { off, len, pattern } => {
                    top.write_at(&vec![pattern; len as usize], off, qcow2::chain::as_backing(backing.as_ref())).unwrap();
                    model[off as usize..(off + len) as usize].fill(pattern);
                }
                Op::Zero { off, len, unmap } => {
                    top.write_zeroes(off, len, unmap, qcow2::chain::as_backing(backing.as_ref())).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                Op::Discard { off, len } => {
                    top.discard(off, len).unwrap();
                    let (a, b) = (off.div_ceil(cs) * cs, ((off + len) / cs) * cs);
                    if b > a {
                        let (a, b) = (a as usize, b as usize);
                        if v2 {
                            // No zero flag on v2: the backing file shows again.
                            model[a..b].copy_from_slice(&base_model[a..b]);
                        } else {
                            model[a..b].fill(0);
                        }
                    }
                }
                Op::SnapCreate(i) => {
                    let name = format!("s{i}");
                    if let std::collections::btree_map::Entry::Vacant(slot) = snaps.entry(name) {
                        top.snapshot_create(slot.key()).unwrap();
                        slot.insert(model.clone());
                    }
                }
                Op::SnapApply(i) => {
                    let name = format!("s{i}");
                    if let Some(m) = snaps.get(&name) {
                        top.snapshot_apply(&name).unwrap();
                        model = m.clone();
                    }
                }
                Op::SnapDelete(i) => {
                    let name = format!("s{i}");
                    if snaps.remove(&name).is_some() {
                        top.snapshot_delete(&name).unwrap();
                    }
                }
                // Internal snapshots of an overlay read through to the backing file, so a
                // commit would change them too: the model only commits without snapshots.
                Op::Commit if snaps.is_empty() => {
                    top.flush().unwrap();
                    drop(top);
                    drop(backing);
                    commit(&top_p, &CommitOptions::default()).unwrap();
                    top = Qcow2::open_rw(&top_p, OpenRwOptions::default()).unwrap();
                    backing = open_backing_of(&top).unwrap();
                    base_model = model.clone();
                }
                Op::Commit => {}
            }
        }
        top.flush().unwrap();
        drop(top);
        drop(backing);
        assert_qemu_clean(d, "base.qcow2");
        assert_qemu_clean(d, "top.qcow2");
        qemu_img(d, &["convert", "-O", "raw", "top.qcow2", "top.raw"]);
        let got = std::fs::read(d.join("top.raw")).unwrap();
        let diff = got.iter().zip(&model).position(|(a, b)| a != b);
        prop_assert!(diff.is_none(), "disk differs at {:?} after {:?}", diff, ops);
        for (name, m) in &snaps {
            qemu_img(d, &["convert", "-l", &format!("snapshot.name={name}"), "-O", "raw", "top.qcow2", "snap.raw"]);
            let got = std::fs::read(d.join("snap.raw")).unwrap();
            prop_assert!(&got == m, "snapshot {} differs after {:?}", name, ops);
        }
    }
}
