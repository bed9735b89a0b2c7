//! Property test: random write / zero / discard sequences applied by qemu-io to an image and
//! to a model buffer; our read of the image equals the model.

use proptest::prelude::*;
use testkit::oracle::*;

const SIZE: u64 = 2 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, pattern: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    // 512-byte aligned ranges (qemu-io's requirement for zero/discard alignment is looser,
    // but discard only drops whole clusters).
    let range = (0u64..SIZE / 512, 1u64..512).prop_map(|(s, l)| {
        let off = s * 512;
        let len = (l * 512).min(SIZE - off);
        (off, len)
    });
    prop_oneof![
        4 => (range.clone(), 1u8..=255).prop_map(|((off, len), pattern)| Op::Write { off, len, pattern }),
        2 => (range.clone(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => range.prop_map(|(off, len)| Op::Discard { off, len }),
    ]
}

fn apply_model(model: &mut [u8], has_backing_zero_view: bool, op: &Op, cs: u64) {
    let _ = has_backing_zero_view;
    match *op {
        Op::Write { off, len, pattern } => model[off as usize..(off + len) as usize].fill(pattern),
        Op::Zero { off, len, .. } => model[off as usize..(off + len) as usize].fill(0),
        Op::Discard { off, len } => {
            // Without a backing file a discarded cluster reads as zeros; qemu only discards
            // whole clusters, partial ones keep their data.
            let start = off.div_ceil(cs) * cs;
            let end = ((off + len) / cs) * cs;
            if end > start {
                model[start as usize..end as usize].fill(0);
            }
        }
    }
}

fn command(op: &Op) -> String {
    match *op {
        Op::Write { off, len, pattern } => format!("write -P {pattern} {off} {len}"),
        Op::Zero { off, len, unmap } => {
            format!("write -z{} {off} {len}", if unmap { " -u" } else { "" })
        }
        Op::Discard { off, len } => format!("discard {off} {len}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn our_read_equals_model(
        ops in proptest::collection::vec(op(), 1..30),
        cs_bits in prop_oneof![Just(12u32), Just(16u32)],
        ext_l2 in any::<bool>(),
    ) {
        let cs = 1u64 << cs_bits;
        let s = Scratch::new();
        let d = s.dir.path();
        let ext = ext_l2 && cs_bits >= 14;
        create(d, "p.qcow2", &SIZE.to_string(), &format!("cluster_size={cs},extended_l2={}", if ext { "on" } else { "off" }));
        let cmds: Vec<String> = ops.iter().map(command).collect();
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(d, "p.qcow2", &refs);
        let mut model = vec![0u8; SIZE as usize];
        for o in &ops {
            // qemu discards whole clusters, also with extended L2.
            apply_model(&mut model, false, o, cs);
        }
        let chain = open(&d.join("p.qcow2"));
        let mut ours = vec![0u8; SIZE as usize];
        chain.read_at(&mut ours, 0).unwrap();
        let first_diff = ours.iter().zip(&model).position(|(a, b)| a != b);
        prop_assert!(first_diff.is_none(), "differs at {:?} after {:?}", first_diff, cmds);
    }
}
