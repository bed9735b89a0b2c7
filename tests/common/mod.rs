//! What the restore tests share: a backup directory built with qemu-img/qemu-io (data,
//! zero writes, a compressed INC, a growing disk) with raw models of the disk after each
//! backup, and qmprestore run with PATH=/nonexistent (no external program may be used).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use testkit::oracle::{apply, qemu_img, qemu_io, GuestWrite as W};

pub const MIB: usize = 1 << 20;

pub fn run(cmd: &str, args: &[&str], cwd: &Path) -> (i32, String, String) {
    testkit::oracle::run_tool(cmd, args, Some(cwd))
}

/// qmprestore with no PATH at all, in `cwd`.
pub fn restore_cmd(cwd: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qmprestore"));
    cmd.args(args)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", "/nonexistent");
    cmd
}

/// Runs qmprestore with no PATH at all: it must not need any other program.
pub fn restore(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    let out = restore_cmd(cwd, args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs qmprestore, which must fail with exit 1 saying `why`; returns its stderr.
pub fn refused(cwd: &Path, args: &[&str], why: &str) -> String {
    let (code, out, err) = restore(cwd, args);
    assert_eq!(code, 1, "qmprestore {args:?} should fail: {out}{err}");
    assert!(err.contains(why), "qmprestore {args:?}: {err}");
    err
}

pub fn restore_ok(cwd: &Path, args: &[&str]) -> String {
    let (c, o, e) = restore(cwd, args);
    assert_eq!(c, 0, "qmprestore {args:?}: {o}{e}");
    o
}

pub fn same(cwd: &Path, a: &str, b: &str) {
    let (c, o, e) = run("qemu-img", &["compare", "-U", a, b], cwd);
    assert_eq!(c, 0, "compare {a} {b}: {o}{e}");
}

pub fn clean(cwd: &Path, f: &str) {
    let (c, o, e) = run("qemu-img", &["check", "-U", f], cwd);
    assert_eq!(c, 0, "check {f}: {o}{e}");
}

pub struct BackupDir {
    pub _tmp: tempfile::TempDir,
    pub root: PathBuf,
    /// (file name, model file name) per point, oldest first.
    pub points: Vec<(String, String)>,
}

/// FULL at t=1000, then INCs; INC 2 is compressed; INC 3 grows the disk to 10 MiB.
pub fn build(root: &Path, base_ts: u64, disk: &str) -> Vec<(String, String)> {
    let mut model = vec![0u8; 8 * MIB];
    let mut points = Vec::new();
    let full = format!("FULL-{base_ts}-{disk}");
    qemu_img(root, &["create", "-q", "-f", "qcow2", &full, "8M"]);
    let ws = [
        W::Data(0, 3 * MIB, 0x11),
        W::Data(5 * MIB, MIB, 0x12),
        W::Data(7 * MIB + 512, 4096, 0x13),
    ];
    let cmds: Vec<String> = ws.iter().map(|w| apply(&mut model, w)).collect();
    qemu_io(root, &full, &cmds);
    let m = format!("model-{base_ts}-0.raw");
    std::fs::write(root.join(&m), &model).unwrap();
    points.push((full, m));
    let incs: Vec<Vec<W>> = vec![
        vec![
            W::Data(64 * 1024, 128 * 1024, 0x21),
            W::Zero(MIB, 256 * 1024),
            W::Data(6 * MIB, 65536, 0x22),
        ],
        vec![W::Data(2 * MIB, MIB, 0x31), W::Zero(5 * MIB, 512 * 1024)],
        vec![
            W::Data(0, 65536, 0x41),
            W::Data(9 * MIB, 65536, 0x42),
            W::Zero(2 * MIB, 65536),
        ],
    ];
    for (i, ws) in incs.iter().enumerate() {
        let ts = base_ts + 100 * (i as u64 + 1);
        let name = format!("INC-{ts}-{disk}");
        let size = if i == 2 { 10 * MIB } else { 8 * MIB };
        model.resize(size, 0);
        qemu_img(
            root,
            &["create", "-q", "-f", "qcow2", &name, &size.to_string()],
        );
        let cmds: Vec<String> = ws.iter().map(|w| apply(&mut model, w)).collect();
        qemu_io(root, &name, &cmds);
        if i == 1 {
            let tmp = format!("{name}.tmpc");
            qemu_img(root, &["convert", "-c", "-O", "qcow2", &name, &tmp]);
            std::fs::rename(root.join(&tmp), root.join(&name)).unwrap();
            // convert drops zero clusters; put the zeroing back as ZERO clusters.
            qemu_io(root, &name, &["write -z 5242880 524288"]);
        }
        let m = format!("model-{base_ts}-{}.raw", i + 1);
        std::fs::write(root.join(&m), &model).unwrap();
        points.push((name, m));
    }
    // Scramble file times: only the names may give the order.
    for (i, (f, _)) in points.iter().enumerate() {
        let t = ["2030-01-01", "2001-05-05", "2015-03-03", "1999-09-09"][i % 4];
        let (c, _, e) = run("touch", &["-d", t, f], root);
        assert_eq!(c, 0, "{e}");
    }
    points
}

pub fn backup_dir() -> BackupDir {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("disk1");
    std::fs::create_dir(&root).unwrap();
    let points = build(&root, 1000, "disk1.qcow2");
    for (f, _) in &points {
        qmpbackup::store::manifest::write_manifest(&root.join(f), Some("uuid-1")).unwrap();
    }
    BackupDir {
        _tmp: tmp,
        root,
        points,
    }
}

pub fn digest(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            // The lock files every command takes stay (empty); they are not backups.
            let n = e.file_name().to_string_lossy().into_owned();
            !n.starts_with("model") && n != ".lock" && n != ".append.lock"
        })
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}
