//! Crashes and full disks in the middle of `qcow2 convert`, `commit` and `snapshot`: the
//! process is killed (SIGKILL) or gets ENOSPC at its Nth file write (the storage layer's
//! fault hook, `QCOW2_FAULT_AFTER_WRITES`). Afterwards inputs are byte-identical, images
//! changed in place pass `qemu-img check` (leaks at most), and running the command again
//! finishes the job.

use std::path::Path;
use std::process::Command;
use testkit::oracle::*;

fn qcow2_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qcow2"));
    cmd.args(args).current_dir(dir);
    cmd
}

/// Runs our binary with a fault at write `n`: (killed, exit code, stderr).
fn faulty(dir: &Path, args: &[&str], n: u64, kind: &str) -> (bool, i32, String) {
    testkit::run_with_fault(qcow2_cmd(dir, args), n, kind)
}

/// Write counts 1, 2, 3, 4, 6, 9, … up to the first run that is not killed.
fn kill_points(dir: &Path, args: &[&str], after_kill: impl FnMut(u64)) -> u64 {
    let what = format!("qcow2 {args:?}");
    testkit::kill_until_done(&what, || qcow2_cmd(dir, args), after_kill)
}

fn check_code(dir: &Path, f: &str) -> i32 {
    qemu_img_status(dir, &["check", "-U", f]).0
}

/// After a crash: qemu-img check finds leaks at most, or (in the windows of a snapshot
/// create or delete, which QEMU's own share) only COPIED flags that disagree with
/// refcounts — harmless for reading, and `check -r all` recomputes them.
fn assert_sound_after_crash(dir: &Path, f: &str, what: &str) {
    let (code, out, err) = qemu_img_status(dir, &["check", "-U", f]);
    if code == 0 || code == 3 {
        return;
    }
    let text = format!("{out}{err}");
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("ERROR")).collect();
    assert!(
        code == 2
            && !errors.is_empty()
            && errors.iter().all(|l| l.starts_with("ERROR OFLAG_COPIED")),
        "{f} after {what}: check {code}\n{text}"
    );
}

fn to_raw(dir: &Path, f: &str, raw: &str) -> Vec<u8> {
    let _ = std::fs::remove_file(dir.join(raw));
    qemu_img(dir, &["convert", "-U", "-O", "raw", f, raw]);
    std::fs::read(dir.join(raw)).unwrap()
}

fn base_and_overlay(d: &Path) {
    create(d, "base.qcow2", "8M", "cluster_size=4k");
    qemu_io(
        d,
        "base.qcow2",
        &["write -P 0x11 0 3M", "write -P 0x12 5M 1M"],
    );
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "10M",
        ],
    );
    let mut cmds = Vec::new();
    for i in 0..40u64 {
        cmds.push(format!("write -P {} {} 8k", 0x20 + i, i * 200 * 1024));
    }
    cmds.push("write -z 1M 256k".into());
    let c: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(d, "top.qcow2", &c);
}

#[test]
fn convert_killed_anywhere_leaves_input_and_no_output() {
    let s = Scratch::new();
    let d = s.dir.path();
    base_and_overlay(d);
    let before: Vec<Vec<u8>> = ["base.qcow2", "top.qcow2"]
        .iter()
        .map(|f| std::fs::read(d.join(f)).unwrap())
        .collect();
    for compress in [false, true] {
        let mut args = vec!["convert", "-O", "qcow2", "top.qcow2", "flat.qcow2"];
        if compress {
            args.insert(1, "-c");
        }
        let kills = kill_points(d, &args, |n| {
            assert!(
                !d.join("flat.qcow2").exists(),
                "output after a kill at write {n}"
            );
        });
        assert!(kills >= 5, "{kills}");
        assert_qemu_clean(d, "flat.qcow2");
        assert_qemu_same(d, "top.qcow2", "flat.qcow2");
        std::fs::remove_file(d.join("flat.qcow2")).unwrap();
    }
    for (f, b) in ["base.qcow2", "top.qcow2"].iter().zip(&before) {
        assert_eq!(&std::fs::read(d.join(f)).unwrap(), b, "{f} changed");
    }
    // Only our inputs remain: the killed runs' temporaries were swept.
    let mut left: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["base.qcow2", "top.qcow2"]);
}

#[test]
fn commit_killed_anywhere_then_finished() {
    let s = Scratch::new();
    let d = s.dir.path();
    base_and_overlay(d);
    let want = to_raw(d, "top.qcow2", "want.raw");
    let kills = kill_points(d, &["commit", "top.qcow2"], |n| {
        for f in ["base.qcow2", "top.qcow2"] {
            let c = check_code(d, f);
            assert!(c == 0 || c == 3, "{f}: check {c} after a kill at write {n}");
        }
        // The top still holds everything it had, so the chain reads as before.
        assert_eq!(to_raw(d, "top.qcow2", "now.raw"), want, "kill at write {n}");
    });
    assert!(kills >= 5, "{kills}");
    let got = to_raw(d, "base.qcow2", "got.raw");
    assert_eq!(got, want);
    let c = check_code(d, "base.qcow2");
    assert!(c == 0 || c == 3);
    // Leaks left by the kills go with `check -r leaks`.
    let out = Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .args(["check", "-r", "leaks", "base.qcow2"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_qemu_clean(d, "base.qcow2");
}

#[test]
fn snapshot_create_and_delete_killed_anywhere() {
    let s = Scratch::new();
    let d = s.dir.path();
    base_and_overlay(d);
    qemu_img(
        d,
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "top.qcow2",
            "img.qcow2",
        ],
    );
    let want = to_raw(d, "img.qcow2", "want.raw");
    let has = |name: &str| {
        qemu_img(d, &["snapshot", "-U", "-l", "img.qcow2"])
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(name))
    };
    for (op, name) in [("-c", "s1"), ("-c", "s2"), ("-d", "s1")] {
        let mut n = 1u64;
        let mut kills = 0;
        loop {
            let (killed, code, err) = faulty(d, &["snapshot", op, name, "img.qcow2"], n, "kill");
            if !killed {
                assert_eq!(code, 0, "snapshot {op} {name} (fault at {n}): {err}");
                break;
            }
            kills += 1;
            assert_sound_after_crash(
                d,
                "img.qcow2",
                &format!("snapshot {op} {name} killed at write {n}"),
            );
            assert_eq!(
                to_raw(d, "img.qcow2", "now.raw"),
                want,
                "{op} {name}: kill at {n}"
            );
            // The snapshot table is switched in one write: the snapshot is there whole or
            // not at all. Once it is (or is gone, for -d), running the command again would
            // be a different command.
            if has(name) == (op == "-c") {
                break;
            }
            n = (n * 3 / 2).max(n + 1);
        }
        assert!(kills >= 2, "snapshot {op} {name}: {kills} kill points");
        assert_eq!(has(name), op == "-c");
    }
    assert!(has("s2") && !has("s1"));
    let out = Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .args(["check", "-r", "all", "img.qcow2"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(
        out.status.code().unwrap_or(9) <= 3,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_qemu_clean(d, "img.qcow2");
    qemu_img(d, &["snapshot", "-a", "s2", "img.qcow2"]);
    assert_eq!(to_raw(d, "img.qcow2", "now.raw"), want);
}

#[test]
fn enospc_is_a_clear_error_and_leaves_no_output() {
    let s = Scratch::new();
    let d = s.dir.path();
    base_and_overlay(d);
    for n in [1, 2, 3, 5, 8] {
        let (killed, code, err) = faulty(
            d,
            &["convert", "-O", "qcow2", "top.qcow2", "flat.qcow2"],
            n,
            "enospc",
        );
        assert!(!killed && code == 1, "exit {code}: {err}");
        assert!(err.contains("No space left on device"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!d.join("flat.qcow2").exists());
        let (_, code, err) = faulty(
            d,
            &["convert", "-O", "raw", "top.qcow2", "flat.raw"],
            n,
            "enospc",
        );
        assert_eq!(code, 1, "{err}");
        assert!(!d.join("flat.raw").exists());
    }
    let want = to_raw(d, "top.qcow2", "want.raw");
    let (_, code, err) = faulty(d, &["commit", "top.qcow2"], 30, "enospc");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    let c = check_code(d, "base.qcow2");
    assert!(c == 0 || c == 3, "base after ENOSPC: {c}");
    assert_eq!(to_raw(d, "top.qcow2", "now.raw"), want);
}
