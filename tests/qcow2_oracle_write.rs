//! The write side against the oracle: everything we write passes `qemu-img check` and
//! compares equal (`qemu-img compare`) to what it should contain.

use qcow2::create::{create_qcow2, CreateOptions};
use qcow2::ops::{commit, convert, rebase};
use qcow2::repair::{repair, RepairMode};
use qcow2::OpenRwOptions;
use qcow2::{Chain, Format, OpenOptions, Qcow2};
use std::path::Path;
use testkit::oracle::*;

fn ours(d: &Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .args(args)
        .current_dir(d)
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(d: &Path, args: &[&str]) -> String {
    let (code, out, err) = ours(d, args);
    assert_eq!(code, 0, "qcow2 {args:?}: {out}{err}");
    out
}

#[test]
fn create_is_byte_identical_to_qemu_img() {
    let s = Scratch::new();
    let d = s.dir.path();
    for (i, opts) in [
        "",
        "cluster_size=512",
        "cluster_size=2M",
        "compat=0.10",
        "refcount_bits=1,cluster_size=4k",
        "refcount_bits=64",
        "extended_l2=on",
        "compression_type=zstd",
        "lazy_refcounts=on",
    ]
    .iter()
    .enumerate()
    {
        for size in ["1M", "100000", "10G"] {
            let a = format!("a{i}-{size}.qcow2");
            let b = format!("b{i}-{size}.qcow2");
            let mut args = vec!["create", "-f", "qcow2"];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            args.extend([a.as_str(), size]);
            ok(d, &args);
            create(d, &b, size, opts);
            assert_qemu_clean(d, &a);
            assert_info_matches(d, &a);
            assert_map_matches(d, &a);
            // When one refcount block covers all metadata, the layout is qemu-img's exactly.
            if !(size == "10G" && opts.contains("512")) {
                assert_eq!(
                    std::fs::read(d.join(&a)).unwrap(),
                    std::fs::read(d.join(&b)).unwrap(),
                    "create -o {opts} {size}"
                );
            }
        }
    }
    // With a backing file: same header bytes as qemu-img's.
    create(d, "base.qcow2", "3M", "");
    ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ov1.qcow2",
        ],
    );
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ov2.qcow2",
        ],
    );
    assert_eq!(
        std::fs::read(d.join("ov1.qcow2")).unwrap(),
        std::fs::read(d.join("ov2.qcow2")).unwrap()
    );
    assert_all_match(d, "ov1.qcow2");
}

#[test]
fn convert_every_image_to_qcow2_plain_and_compressed() {
    let s = Scratch::new();
    let d = s.dir.path();
    for src in build_image_set(d) {
        for (tag, extra) in [
            ("plain", vec![]),
            ("zlib", vec!["-c"]),
            ("zstd", vec!["-c", "-o", "compression_type=zstd"]),
            ("c512", vec!["-c", "-o", "cluster_size=512"]),
            ("v2", vec!["-o", "compat=0.10,cluster_size=4k"]),
            ("ext", vec!["-o", "extended_l2=on"]),
            ("rc1", vec!["-c", "-o", "refcount_bits=1,cluster_size=1k"]),
        ] {
            let dst = format!("{src}.{tag}.out");
            let mut args = vec!["convert", "-O", "qcow2"];
            args.extend(extra.iter().copied());
            args.extend([src.as_str(), dst.as_str()]);
            ok(d, &args);
            assert_qemu_clean(d, &dst);
            assert_qemu_same(d, &src, &dst);
            assert_check_matches(d, &dst);
            std::fs::remove_file(d.join(&dst)).unwrap();
        }
    }
    // Raw output of the chain equals qemu-img's, and never overwrites without --force.
    ok(d, &["convert", "-O", "raw", "m-top.qcow2", "top.raw"]);
    assert_qemu_same(d, "m-top.qcow2", "top.raw");
    let (code, _, err) = ours(d, &["convert", "-O", "raw", "m-top.qcow2", "top.raw"]);
    assert_eq!(code, 1);
    assert!(err.contains("exists"), "{err}");
}

#[test]
fn qemu_writes_into_our_images_stay_consistent() {
    let s = Scratch::new();
    let d = s.dir.path();
    for src in build_image_set(d) {
        let dst = format!("{src}.c.out");
        ok(d, &["convert", "-c", "-O", "qcow2", &src, &dst]);
        qemu_io(
            d,
            &dst,
            &[
                "write -P 0x66 0 300k",
                "write -z 1M 64k",
                "discard 1536k 128k",
            ],
        );
        assert_qemu_clean(d, &dst);
    }
}

fn commit_case(d: &Path, base_opts: &str, top_opts: &str, top_size: &str) {
    let tag = format!("{base_opts}-{top_opts}-{top_size}").replace([',', '='], "_");
    let base = format!("cb{tag}.qcow2");
    let top = format!("ct{tag}.qcow2");
    create(d, &base, "2M", base_opts);
    qemu_io(d, &base, &["write -P 0x11 0 2M"]);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !top_opts.is_empty() {
        args.extend(["-o", top_opts]);
    }
    args.extend(["-b", &base, "-F", "qcow2", &top, top_size]);
    qemu_img(d, &args);
    qemu_io(
        d,
        &top,
        &[
            "write -P 0x22 64k 100k",
            "write -z 512k 128k",
            "write -P 0x33 1500k 4k",
            "write -P 0 1700k 64k",
        ],
    );
    if top_size != "2M" {
        qemu_io(d, &top, &["write -P 0x44 2500k 64k"]);
    }
    let before = format!("{top}.before.raw");
    qemu_img(d, &["convert", "-O", "raw", &top, &before]);
    ok(d, &["commit", &top]);
    assert_qemu_clean(d, &base);
    assert_qemu_clean(d, &top);
    assert_qemu_same(d, &base, &before);
    assert_qemu_same(d, &top, &before);
    // The top is empty: nothing allocated at depth 0.
    let chain = open(&d.join(&top));
    chain
        .for_each_extent(0, chain.virtual_size(), |e| {
            assert!(e.depth > 0 || !e.present(), "{top}: still allocated {e:?}");
            Ok(())
        })
        .unwrap();
}

#[test]
fn commit_into_backing_with_zeros_growth_and_v2() {
    let s = Scratch::new();
    let d = s.dir.path();
    commit_case(d, "", "", "2M");
    commit_case(d, "", "", "3M");
    commit_case(d, "compat=0.10", "compat=0.10", "2M");
    commit_case(d, "cluster_size=4k", "cluster_size=512", "3M");
    commit_case(d, "extended_l2=on", "", "2M");
    commit_case(d, "", "extended_l2=on", "2M");
}

#[test]
fn commit_drop_and_base_through_a_chain() {
    let s = Scratch::new();
    let d = s.dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    create(d, "a.qcow2", "2M", "");
    qemu_io(d, "a.qcow2", &["write -P 0x11 0 2M"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../a.qcow2",
            "-F",
            "qcow2",
            "sub/b.qcow2",
        ],
    );
    qemu_io(d, "sub/b.qcow2", &["write -P 0x22 0 512k"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            "sub/c.qcow2",
        ],
    );
    qemu_io(
        d,
        "sub/c.qcow2",
        &["write -P 0x33 256k 512k", "write -z 1M 64k"],
    );
    qemu_img(d, &["convert", "-O", "raw", "sub/c.qcow2", "c.raw"]);
    let c_before = std::fs::read(d.join("sub/c.qcow2")).unwrap();
    // -b as stored in b.qcow2 ("../a.qcow2"); implies -d.
    ok(d, &["commit", "-b", "../a.qcow2", "sub/c.qcow2"]);
    assert_eq!(
        std::fs::read(d.join("sub/c.qcow2")).unwrap(),
        c_before,
        "top untouched"
    );
    assert_qemu_clean(d, "a.qcow2");
    assert_qemu_same(d, "a.qcow2", "c.raw");
    assert_qemu_same(d, "sub/c.qcow2", "c.raw");
    // A name that is not in the chain.
    let (code, _, err) = ours(d, &["commit", "-b", "nope.qcow2", "sub/c.qcow2"]);
    assert_eq!(code, 1);
    assert!(err.contains("Did not find"), "{err}");
    // -d keeps the top.
    ok(d, &["commit", "-d", "sub/c.qcow2"]);
    assert_eq!(std::fs::read(d.join("sub/c.qcow2")).unwrap(), c_before);
    assert_qemu_clean(d, "sub/b.qcow2");
}

#[test]
fn rebase_safe_unsafe_and_remove() {
    let s = Scratch::new();
    let d = s.dir.path();
    create(d, "old.qcow2", "900k", "");
    qemu_io(
        d,
        "old.qcow2",
        &["write -P 0x11 0 900k", "write -P 0x44 512k 256k"],
    );
    create(d, "new.qcow2", "1M", "");
    qemu_io(
        d,
        "new.qcow2",
        &["write -P 0x11 0 1M", "write -P 0x12 300k 512"],
    );
    for opts in ["", "extended_l2=on", "cluster_size=4k", "compat=0.10"] {
        let ov = format!("ov-{}.qcow2", opts.replace([',', '='], "_"));
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend(["-b", "old.qcow2", "-F", "qcow2", &ov, "1M"]);
        qemu_img(d, &args);
        qemu_io(d, &ov, &["write -P 0x55 100k 1k", "write -z 600k 64k"]);
        let raw = format!("{ov}.raw");
        qemu_img(d, &["convert", "-O", "raw", &ov, &raw]);
        ok(d, &["rebase", "-b", "new.qcow2", "-F", "qcow2", &ov]);
        assert_qemu_clean(d, &ov);
        assert_qemu_same(d, &ov, &raw);
        assert_info_matches(d, &ov);
        ok(d, &["rebase", "-b", "", &ov]);
        assert_qemu_clean(d, &ov);
        assert_qemu_same(d, &ov, &raw);
        assert!(open(&d.join(&ov)).layers().len() == 1);
    }
    // Unsafe: cluster 0 equals qemu-img's for the same change.
    create(d, "u1.qcow2", "1M", "");
    qemu_io(d, "u1.qcow2", &["write -P 1 0 64k"]);
    std::fs::copy(d.join("u1.qcow2"), d.join("u2.qcow2")).unwrap();
    ok(
        d,
        &[
            "rebase",
            "-u",
            "-b",
            "some/base.qcow2",
            "-F",
            "qcow2",
            "u1.qcow2",
        ],
    );
    qemu_img(
        d,
        &[
            "rebase",
            "-u",
            "-b",
            "some/base.qcow2",
            "-F",
            "qcow2",
            "u2.qcow2",
        ],
    );
    let (a, b) = (
        std::fs::read(d.join("u1.qcow2")).unwrap(),
        std::fs::read(d.join("u2.qcow2")).unwrap(),
    );
    assert_eq!(a[..65536], b[..65536], "cluster 0 after rebase -u");
}

#[test]
fn snapshots_interoperate_with_qemu_img() {
    let s = Scratch::new();
    let d = s.dir.path();
    for opts in ["", "cluster_size=512", "compat=0.10", "refcount_bits=4"] {
        let f = format!("sn{}.qcow2", opts.replace([',', '='], "_"));
        create(d, &f, "2M", opts);
        qemu_io(d, &f, &["write -P 0x11 0 1M"]);
        let r0 = format!("{f}.0.raw");
        qemu_img(d, &["convert", "-O", "raw", &f, &r0]);
        ok(d, &["snapshot", "-c", "first", &f]);
        assert_qemu_clean(d, &f);
        qemu_io(d, &f, &["write -P 0x22 512k 1M", "write -z 0 64k"]);
        assert_qemu_clean(d, &f);
        let r1 = format!("{f}.1.raw");
        qemu_img(d, &["convert", "-O", "raw", &f, &r1]);
        qemu_img(d, &["snapshot", "-c", "second", &f]); // made by qemu-img
        let list = qemu_img(d, &["snapshot", "-l", &f]);
        assert!(list.contains("first") && list.contains("second"), "{list}");
        assert_info_matches(d, &f);
        // snapshot content as qemu-img reads it
        let sraw = format!("{f}.s.raw");
        qemu_img(
            d,
            &[
                "convert",
                "-l",
                "snapshot.name=first",
                "-O",
                "raw",
                &f,
                &sraw,
            ],
        );
        assert_qemu_same(d, &sraw, &r0);
        ok(d, &["snapshot", "-a", "first", &f]);
        assert_qemu_clean(d, &f);
        assert_qemu_same(d, &f, &r0);
        ok(d, &["snapshot", "-a", "second", &f]); // one qemu-img made
        assert_qemu_clean(d, &f);
        assert_qemu_same(d, &f, &r1);
        qemu_img(d, &["snapshot", "-a", "first", &f]); // qemu applies ours
        assert_qemu_same(d, &f, &r0);
        ok(d, &["snapshot", "-d", "second", &f]);
        assert_qemu_clean(d, &f);
        ok(d, &["snapshot", "-d", "first", &f]);
        assert_qemu_clean(d, &f);
        assert_qemu_same(d, &f, &r0);
        assert!(qemu_img(d, &["snapshot", "-l", &f]).is_empty());
    }
    // refcount_bits=1 cannot hold snapshots: a clear error, image unchanged.
    create(d, "rc1.qcow2", "1M", "refcount_bits=1");
    let before = std::fs::read(d.join("rc1.qcow2")).unwrap();
    let (code, _, err) = ours(d, &["snapshot", "-c", "x", "rc1.qcow2"]);
    assert_eq!(code, 1);
    assert!(err.contains("refcount"), "{err}");
    assert_eq!(std::fs::read(d.join("rc1.qcow2")).unwrap(), before);
}

#[test]
fn repair_like_qemu_img() {
    let s = Scratch::new();
    let d = s.dir.path();
    create(d, "r.qcow2", "1M", "");
    qemu_io(d, "r.qcow2", &["write -P 0x11 0 256k"]);
    let p = d.join("r.qcow2");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.resize(12 * 65536, 0);
    bytes[2 * 65536 + 10 * 2 + 1] = 1; // leak on cluster 10
    std::fs::write(&p, &bytes).unwrap();
    std::fs::copy(&p, d.join("q.qcow2")).unwrap();
    let (code, _, _) = ours(d, &["check", "r.qcow2"]);
    assert_eq!(code, 3);
    ok(d, &["check", "-r", "leaks", "r.qcow2"]);
    qemu_img(d, &["check", "-r", "leaks", "q.qcow2"]);
    assert_qemu_clean(d, "r.qcow2");
    assert_qemu_same(d, "r.qcow2", "q.qcow2");
    // A refcount too low (data cluster at 0x50000 = cluster 5) needs -r all.
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[2 * 65536 + 5 * 2 + 1] = 0;
    std::fs::write(&p, &bytes).unwrap();
    let (code, _, _) = ours(d, &["check", "r.qcow2"]);
    assert_eq!(code, 2);
    let (code, _, _) = ours(d, &["check", "-r", "leaks", "r.qcow2"]);
    assert_eq!(code, 2);
    ok(d, &["check", "-r", "all", "r.qcow2"]);
    assert_qemu_clean(d, "r.qcow2");
    assert_qemu_same(d, "r.qcow2", "q.qcow2");
    // A crashed lazy-refcount image: repaired, dirty bit cleared, content intact.
    create(d, "lazy.qcow2", "2M", "lazy_refcounts=on");
    let _ = qemu_io_raw_args(
        d,
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x22 0 128k",
            "-c",
            "sigraise 9",
            "lazy.qcow2",
        ],
    );
    qemu_img(d, &["convert", "-O", "raw", "lazy.qcow2", "lazy.raw"]);
    let (code, _, err) = ours(d, &["snapshot", "-c", "x", "lazy.qcow2"]);
    assert_eq!(code, 1, "writing a dirty image must be refused");
    assert!(err.contains("check -r all"), "{err}");
    ok(d, &["check", "-r", "all", "lazy.qcow2"]);
    assert_qemu_clean(d, "lazy.qcow2");
    assert_qemu_same(d, "lazy.qcow2", "lazy.raw");
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(d, &["info", "--output", "json", "lazy.qcow2"])).unwrap();
    assert_eq!(info["dirty-flag"], false);
}

#[test]
fn library_writes_at_odd_offsets_over_backing() {
    let s = Scratch::new();
    let d = s.dir.path();
    create(d, "lb.qcow2", "3M", "");
    qemu_io(d, "lb.qcow2", &["write -P 0x11 0 3M"]);
    for opts in [
        CreateOptions::default(),
        CreateOptions {
            cluster_size: 512,
            ..Default::default()
        },
        CreateOptions {
            extended_l2: true,
            ..Default::default()
        },
        CreateOptions {
            version: 2,
            ..Default::default()
        },
    ] {
        let name = format!(
            "lt{}-{}.qcow2",
            opts.cluster_size,
            opts.extended_l2 as u8 + opts.version as u8
        );
        let p = d.join(&name);
        let mut o = opts.clone();
        o.size = 4 << 20;
        o.backing = Some(("lb.qcow2".into(), "qcow2".into()));
        let mut img = create_qcow2(&p, &o).unwrap();
        let backing = Chain::open(
            &d.join("lb.qcow2"),
            &OpenOptions {
                format: Some(Format::Qcow2),
                no_backing: false,
            },
        )
        .unwrap();
        let mut model = vec![0x11u8; 3 << 20];
        model.resize(4 << 20, 0);
        let writes: [(u64, usize, u8); 5] = [
            (100, 5000, 0x21),
            (65536 * 3 - 7, 70000, 0x22),
            ((3 << 20) - 1000, 3000, 0x23),
            (0, 512, 0x24),
            ((4 << 20) - 600, 600, 0x25),
        ];
        for (off, len, pat) in writes {
            img.write_at(&vec![pat; len], off, Some(&backing)).unwrap();
            model[off as usize..off as usize + len].fill(pat);
        }
        img.write_zeroes(1 << 20, 200_000, false, Some(&backing))
            .unwrap();
        model[1 << 20..(1 << 20) + 200_000].fill(0);
        img.discard(2 << 20, 128 << 10).unwrap();
        // v2 has no zero flag: a discarded cluster shows the backing file again.
        let after_discard = if opts.version == 2 { 0x11 } else { 0 };
        model[2 << 20..(2 << 20) + (128 << 10)].fill(after_discard);
        img.flush().unwrap();
        drop(img);
        assert_qemu_clean(d, &name);
        std::fs::write(d.join("model.raw"), &model).unwrap();
        assert_qemu_same(d, &name, "model.raw");
        // Reopen and keep writing.
        let mut img = Qcow2::open_rw(&p, OpenRwOptions::default()).unwrap();
        img.write_at(&[0x77; 4096], 8192, Some(&backing)).unwrap();
        img.flush().unwrap();
        drop(img);
        model[8192..8192 + 4096].fill(0x77);
        std::fs::write(d.join("model.raw"), &model).unwrap();
        assert_qemu_clean(d, &name);
        assert_qemu_same(d, &name, "model.raw");
    }
}

#[test]
fn rebase_commit_library_api_smoke() {
    // The library calls behind the verbs, used directly.
    let s = Scratch::new();
    let d = s.dir.path();
    create(d, "x.qcow2", "1M", "");
    qemu_io(d, "x.qcow2", &["write -P 1 0 1M"]);
    qemu_img(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-b", "x.qcow2", "-F", "qcow2", "y.qcow2",
        ],
    );
    qemu_io(d, "y.qcow2", &["write -P 2 0 64k"]);
    qemu_img(d, &["convert", "-O", "raw", "y.qcow2", "y.raw"]);
    rebase::rebase(
        &d.join("y.qcow2"),
        &rebase::RebaseOptions {
            backing: String::new(),
            format: None,
            unsafe_mode: false,
        },
    )
    .unwrap();
    assert_qemu_same(d, "y.qcow2", "y.raw");
    let _ = (
        commit::CommitOptions::default(),
        convert::Qcow2ConvertOptions::default(),
    );
    let r = repair(&d.join("y.qcow2"), RepairMode::Leaks).unwrap();
    assert_eq!(r.after.exit_code(), 0);
}

/// Commit batches many small extents (and zeros) into one hand-off of up to 4 MiB: content
/// that spans several batches, with long runs split across them, scattered clusters, zero
/// clusters over data and a base that has a backing file of its own.
#[test]
fn commit_of_many_extents_across_batches() {
    let s = Scratch::new();
    let d = s.dir.path();
    create(d, "bb.qcow2", "24M", "");
    qemu_io(d, "bb.qcow2", &["write -P 0x10 0 24M"]);
    qemu_img(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-b", "bb.qcow2", "-F", "qcow2", "b.qcow2", "24M",
        ],
    );
    qemu_io(d, "b.qcow2", &["write -P 0x11 2M 6M"]);
    qemu_img(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2", "32M",
        ],
    );
    let mut cmds = vec![
        "write -P 0x22 1M 9M".to_string(),
        "write -z 12M 3M".to_string(),
    ];
    for i in 0..120u64 {
        let off = (10 << 20) + (i * 7 % 200) * 65536 + (i % 3) * 4096;
        cmds.push(format!(
            "write -P {} {off} {}",
            0x30 + i % 50,
            4096 * (1 + i % 16)
        ));
    }
    cmds.push("write -P 0x77 30M 2M".into());
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(d, "t.qcow2", &cmds);
    qemu_img(d, &["convert", "-O", "raw", "t.qcow2", "before.raw"]);
    ok(d, &["commit", "t.qcow2"]);
    assert_qemu_clean(d, "b.qcow2");
    assert_qemu_same(d, "b.qcow2", "before.raw");
    assert_qemu_same(d, "t.qcow2", "before.raw");
}

/// `a` <- `b` <- `c`; `b` folded under `c` (`c` takes every change of `b` it does not
/// overwrite itself), then `c` rebased onto `a`: it reads as the whole chain did.
fn fold_under_case(d: &Path, b_opts: &str, c_opts: &str) {
    let tag = format!("{b_opts}-{c_opts}").replace([',', '='], "_");
    let (a, b, c) = (
        format!("fa{tag}.qcow2"),
        format!("fb{tag}.qcow2"),
        format!("fc{tag}.qcow2"),
    );
    create(d, &a, "2M", "");
    qemu_io(d, &a, &["write -P 0x11 0 2M"]);
    for (name, backing, opts, size) in [(&b, &a, b_opts, "2M"), (&c, &b, c_opts, "3M")] {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend(["-b", backing, "-F", "qcow2", name, size]);
        qemu_img(d, &args);
    }
    qemu_io(
        d,
        &b,
        &[
            "write -P 0x22 0 512k",
            "write -z 768k 256k",
            "write -P 0x23 1536k 1k",
        ],
    );
    qemu_io(
        d,
        &c,
        &[
            "write -P 0x33 256k 512k",
            "write -z 1M 64k",
            "write -P 0x34 1537k 512",
            "write -P 0x35 2560k 4k",
        ],
    );
    let want = format!("{c}.raw");
    qemu_img(d, &["convert", "-O", "raw", &c, &want]);
    let keep: Vec<std::ops::Range<u64>> = {
        let alone = Chain::open(
            &d.join(&c),
            &OpenOptions {
                format: Some(Format::Qcow2),
                no_backing: true,
            },
        )
        .unwrap();
        let mut v: Vec<std::ops::Range<u64>> = Vec::new();
        alone
            .for_each_extent(0, alone.virtual_size(), |e| {
                if e.depth == 0 && e.present() {
                    match v.last_mut() {
                        Some(l) if l.end == e.start => l.end = e.end(),
                        _ => v.push(e.start..e.end()),
                    }
                }
                Ok(())
            })
            .unwrap();
        v
    };
    let below = open(&d.join(&b));
    let mut top = Qcow2::open_rw(&d.join(&c), OpenRwOptions::default()).unwrap();
    commit::commit_into_except(
        &mut top,
        qcow2::chain::as_backing(Some(&below)),
        &below,
        1,
        &keep,
        &mut qcow2::ops::throttle::Throttle::new(0),
    )
    .unwrap();
    top.flush().unwrap();
    drop(top);
    qemu_img(d, &["rebase", "-u", "-b", &a, "-F", "qcow2", &c]);
    assert_qemu_clean(d, &c);
    assert_qemu_same(d, &c, &want);
}

#[test]
fn fold_under_keeps_the_top_and_fills_the_rest() {
    let s = Scratch::new();
    let d = s.dir.path();
    fold_under_case(d, "", "");
    fold_under_case(d, "cluster_size=512", "cluster_size=4k");
    fold_under_case(d, "cluster_size=4k", "cluster_size=512");
    fold_under_case(d, "", "extended_l2=on");
}
