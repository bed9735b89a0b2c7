//! qmprestore against the oracle: a backup directory built with qemu-img/qemu-io (data,
//! zero writes, a compressed INC, a growing disk) with raw models of the disk after each
//! backup. Every command and every --until point is compared with `qemu-img compare`; all
//! restore commands run with PATH=/nonexistent (no external program may be used).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use testkit::oracle::{apply, qemu_img, qemu_io, GuestWrite as W};

#[test]
fn merge_every_point_leaves_backups_untouched() {
    let b = backup_dir();
    let d = &b.root;
    let before = digest(d);
    let out = b._tmp.path();
    for (i, (file, model)) in b.points.iter().enumerate() {
        let stem = file.trim_end_matches(".qcow2");
        // the three spellings of a point
        let until = [file.as_str(), stem, &stem[..stem.rfind('-').unwrap()]][i % 3].to_string();
        let target = out.join(format!("restored-{i}.qcow2"));
        restore_ok(
            d,
            &[
                "merge",
                "--dir",
                ".",
                "--until",
                &until,
                "--targetfile",
                target.to_str().unwrap(),
            ],
        );
        clean(d, target.to_str().unwrap());
        same(d, target.to_str().unwrap(), model);
        // the merged target gets a manifest (built while writing) that verifies by re-reading
        assert!(target.with_extension("qcow2.manifest").exists());
        qmpbackup::store::manifest::verify::verify_manifest(&target)
            .unwrap()
            .unwrap();
        let m = qmpbackup::store::manifest::load_manifest(&target)
            .unwrap()
            .unwrap();
        assert_eq!(
            m.runs,
            qmpbackup::store::manifest::compute_runs(&target).unwrap().2
        );
    }
    // Without --until: the newest point.
    let t = out.join("latest.qcow2");
    restore_ok(
        d,
        &["merge", "--dir", ".", "--targetfile", t.to_str().unwrap()],
    );
    same(d, t.to_str().unwrap(), &b.points.last().unwrap().1);
    // An existing target is never overwritten.
    let (c, _, e) = restore(
        d,
        &["merge", "--dir", ".", "--targetfile", t.to_str().unwrap()],
    );
    assert_eq!(c, 1);
    assert!(e.contains("exists"), "{e}");
    assert_eq!(digest(d), before, "merge must not touch the backup files");
}

fn copy_dir(b: &BackupDir, name: &str) -> PathBuf {
    let dst = b._tmp.path().join(name);
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(&b.root).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

#[test]
fn rebase_until_and_latest() {
    let b = backup_dir();
    let d = copy_dir(&b, "rb1");
    restore_ok(&d, &["rebase", "--dir", ".", "--dry-run"]);
    assert!(
        !qemu_img(&d, &["info", "--output", "json", &b.points[1].0]).contains("backing-filename")
    );
    restore_ok(&d, &["rebase", "--dir", "."]);
    for (f, _) in &b.points {
        clean(&d, f);
    }
    same(&d, "image", &b.points.last().unwrap().1);
    for (i, (f, m)) in b.points.iter().enumerate() {
        same(&d, f, m);
        if i > 0 {
            let info = qemu_img(&d, &["info", "--output", "json", f]);
            assert!(
                info.contains(&format!("\"backing-filename\": \"{}\"", b.points[i - 1].0)),
                "{info}"
            );
        }
    }
    let d2 = copy_dir(&b, "rb2");
    restore_ok(&d2, &["rebase", "--dir", ".", "--until", "INC-1200"]);
    same(&d2, "image", &b.points[2].1);
}

#[test]
fn commit_in_place() {
    let b = backup_dir();
    let d = copy_dir(&b, "cm");
    restore_ok(&d, &["commit", "--dir", ".", "--rate-limit", "1G"]);
    let full = &b.points[0].0;
    clean(&d, full);
    same(&d, full, &b.points.last().unwrap().1);
    for (f, _) in &b.points[1..] {
        assert!(!d.join(f).exists(), "{f} should be removed");
    }
    // The FULL's manifest was refreshed and verifies; it equals a fresh one.
    restore_ok(&d, &["verify", "--dir", "."]);
    let m = qmpbackup::store::manifest::load_manifest(&d.join(full))
        .unwrap()
        .unwrap();
    let fresh = qmpbackup::store::manifest::compute_runs(&d.join(full)).unwrap();
    assert_eq!(m.runs, fresh.2);
    // --until: only the INCs up to the point.
    let d2 = copy_dir(&b, "cm2");
    restore_ok(&d2, &["commit", "--dir", ".", "--until", &b.points[1].0]);
    same(&d2, full, &b.points[1].1);
    let m = qmpbackup::store::manifest::load_manifest(&d2.join(full))
        .unwrap()
        .unwrap();
    let fresh = qmpbackup::store::manifest::compute_runs(&d2.join(full)).unwrap();
    assert_eq!(m.runs, fresh.2, "a commit updated by CRC delta only");
    assert!(d2.join(&b.points[2].0).exists());
}

#[test]
fn snapshotrebase_snapshots_every_point() {
    let b = backup_dir();
    let d = copy_dir(&b, "sr");
    restore_ok(&d, &["snapshotrebase", "--dir", "."]);
    let full = &b.points[0].0;
    clean(&d, full);
    same(&d, full, &b.points.last().unwrap().1);
    assert_snapshots_hold_every_point(&d, &b);
    // Run again: nothing left to do, still fine.
    restore_ok(&d, &["snapshotrebase", "--dir", "."]);
}

/// The FULL after snapshotrebase: one internal snapshot per point, each with that point's
/// content.
fn assert_snapshots_hold_every_point(d: &Path, b: &BackupDir) {
    let full = &b.points[0].0;
    let list = qemu_img(d, &["snapshot", "-l", full]);
    assert!(list.contains("FULL-BACKUP"), "{list}");
    // INC at 1100 = 1970-01-01 00:18:20 UTC
    let names = [
        "FULL-BACKUP",
        "1970-01-01-00:18:20",
        "1970-01-01-00:20:00",
        "1970-01-01-00:21:40",
    ];
    for (i, n) in names.iter().enumerate() {
        assert!(list.contains(n), "{n} missing: {list}");
        let raw = format!("snap{i}.raw");
        qemu_img(
            d,
            &[
                "convert",
                "-l",
                &format!("snapshot.name={n}"),
                "-O",
                "raw",
                full,
                &raw,
            ],
        );
        let model = std::fs::read(d.join(&b.points[i].1)).unwrap();
        let got = std::fs::read(d.join(&raw)).unwrap();
        assert!(got.len() >= model.len());
        assert!(got[..model.len()] == model[..], "snapshot {n} content");
        assert!(got[model.len()..].iter().all(|&x| x == 0));
    }
}

fn damage_l2(path: &Path) {
    // Make the first L2 entry's offset unaligned (a structural error check finds).
    let mut bytes = std::fs::read(path).unwrap();
    let l1_off = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let l2 = (u64::from_be_bytes(bytes[l1_off..l1_off + 8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00) as usize;
    let mut found = false;
    for i in 0..8192 {
        let e = u64::from_be_bytes(bytes[l2 + i * 8..l2 + i * 8 + 8].try_into().unwrap());
        if e & 0x00ff_ffff_ffff_fe00 != 0 && e & (1 << 62) == 0 {
            let bad = e | 0x200;
            bytes[l2 + i * 8..l2 + i * 8 + 8].copy_from_slice(&bad.to_be_bytes());
            found = true;
            break;
        }
    }
    assert!(found);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn damaged_inc_changes_nothing() {
    let b = backup_dir();
    let d = copy_dir(&b, "dmg");
    damage_l2(&d.join(&b.points[3].0));
    let before = digest(&d);
    let target = b._tmp.path().join("never.qcow2");
    for args in [
        vec![
            "merge",
            "--dir",
            ".",
            "--targetfile",
            target.to_str().unwrap(),
        ],
        vec!["commit", "--dir", "."],
        vec!["snapshotrebase", "--dir", "."],
        vec!["rebase", "--dir", "."],
    ] {
        let (c, _, e) = restore(&d, &args);
        assert_eq!(c, 1, "{args:?} should fail");
        assert!(
            e.contains(&b.points[3].0),
            "error names the damaged file: {e}"
        );
        assert_eq!(digest(&d), before, "{args:?} changed something");
        assert!(!target.exists());
        let leftovers: Vec<_> = std::fs::read_dir(b._tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            !leftovers
                .iter()
                .any(|n| n.to_string_lossy().contains("never")),
            "{leftovers:?}"
        );
    }
    // Restoring up to the point before the damage still works.
    let ok_target = b._tmp.path().join("ok.qcow2");
    restore_ok(
        &d,
        &[
            "merge",
            "--dir",
            ".",
            "--until",
            &b.points[2].0,
            "--targetfile",
            ok_target.to_str().unwrap(),
        ],
    );
    same(&d, ok_target.to_str().unwrap(), &b.points[2].1);
    // verify names the file
    let (c, _, e) = restore(&d, &["verify", "--dir", "."]);
    assert_eq!(c, 1);
    assert!(e.contains(&b.points[3].0), "{e}");
}

#[test]
fn verify_finds_bit_rot_with_offset() {
    let b = backup_dir();
    let d = copy_dir(&b, "rot");
    restore_ok(&d, &["verify", "--dir", "."]);
    // Flip a byte inside INC 1's data (guest 6 MiB, pattern 0x22): find it in the file.
    let inc = d.join(&b.points[1].0);
    let mut bytes = std::fs::read(&inc).unwrap();
    let pos = bytes
        .windows(4096)
        .position(|w| w.iter().all(|&x| x == 0x22))
        .unwrap();
    bytes[pos + 100] ^= 0xff;
    std::fs::write(&inc, bytes).unwrap();
    let (c, _, e) = restore(&d, &["verify", "--dir", "."]);
    assert_eq!(c, 1, "{e}");
    assert!(
        e.contains(&b.points[1].0) && e.contains("checksum mismatch") && e.contains("0x600000"),
        "{e}"
    );
    let (_, o, _) = restore(&d, &["verify", "--dir", ".", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&o).unwrap();
    assert_eq!(
        v.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["ok"] == false)
            .count(),
        1
    );
}

#[test]
fn two_chains_partial_files_and_listing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let old = build(d, 1000, "disk.qcow2");
    let new = build(d, 5000, "disk.qcow2");
    let t = d.join("out.qcow2");
    let (c, _, e) = restore(
        d,
        &["merge", "--dir", ".", "--targetfile", t.to_str().unwrap()],
    );
    assert_eq!(c, 0, "{e}");
    assert!(e.contains("2 chains") && e.contains(&new[0].0), "{e}");
    same(d, t.to_str().unwrap(), &new.last().unwrap().1);
    let l: serde_json::Value =
        serde_json::from_str(&restore_ok(d, &["list", "--dir", ".", "--json"])).unwrap();
    assert_eq!(l["chains"].as_array().unwrap().len(), 2);
    assert_eq!(l["chains"][0][0]["file"], old[0].0.as_str());
    assert_eq!(l["chains"][1].as_array().unwrap().len(), 4);
    // --filter picks files by name
    let t2 = d.join("out2.qcow2");
    let (c, _, e) = restore(
        d,
        &[
            "merge",
            "--dir",
            ".",
            "--filter",
            "disk",
            "--until",
            &old[2].0,
            "--targetfile",
            t2.to_str().unwrap(),
        ],
    );
    assert_eq!(c, 0, "{e}");
    assert!(e.contains("older chain"), "{e}");
    same(d, t2.to_str().unwrap(), &old[2].1);
    // A .partial file: a clear error.
    std::fs::write(d.join("INC-9999-disk.qcow2.partial"), b"x").unwrap();
    let (c, _, e) = restore(
        d,
        &[
            "merge",
            "--dir",
            ".",
            "--targetfile",
            d.join("x.qcow2").to_str().unwrap(),
        ],
    );
    assert_eq!(c, 1);
    assert!(e.contains(".partial") && e.contains("interrupted"), "{e}");
    // An empty directory: says to run a full backup first.
    let empty = tempfile::tempdir().unwrap();
    let (c, _, e) = restore(
        empty.path(),
        &["merge", "--dir", ".", "--targetfile", "x.qcow2"],
    );
    assert_eq!(c, 1);
    assert!(e.contains("no full backup"), "{e}");
}

// ---- Interruptions and full disks -------------------------------------------------------

/// Runs qmprestore (no PATH) with a fault injected at its `n`th file write (see
/// `qcow2::storage::fault`). Returns (killed by SIGKILL, exit code, stderr).
fn restore_faulty(cwd: &Path, args: &[&str], n: u64, kind: &str) -> (bool, i32, String) {
    testkit::run_with_fault(restore_cmd(cwd, args), n, kind)
}

/// Kills `args` at write 1, 2, 3, 4, 6, 9, … until a run completes; `after_kill` inspects
/// the state after each kill. Returns how many runs were killed.
fn kill_until_done(cwd: &Path, args: &[&str], after_kill: impl FnMut(u64)) -> u64 {
    let what = format!("qmprestore {args:?}");
    testkit::kill_until_done(&what, || restore_cmd(cwd, args), after_kill)
}

fn check_code(cwd: &Path, f: &str) -> i32 {
    run("qemu-img", &["check", "-U", f], cwd).0
}

/// After a crash in a snapshot operation: leaks at most, or only COPIED flags that disagree
/// with refcounts (QEMU's own snapshot code has the same window; reading is unaffected and
/// the next command that changes the file recomputes them).
fn assert_sound_after_crash(cwd: &Path, f: &str, what: &str) {
    let (code, out, err) = run("qemu-img", &["check", "-U", f], cwd);
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

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn merge_killed_anywhere_leaves_inputs_identical_and_no_target() {
    let b = backup_dir();
    let d = &b.root;
    let before = digest(d);
    let out = b._tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let target = out.join("restored.qcow2");
    let t = target.to_str().unwrap();
    let kills = kill_until_done(d, &["merge", "--dir", ".", "--targetfile", t], |n| {
        assert_eq!(
            digest(d),
            before,
            "inputs changed by a merge killed at write {n}"
        );
        assert!(
            !target.exists(),
            "a target appeared from a merge killed at write {n}"
        );
    });
    assert!(kills >= 5, "only {kills} kill points");
    clean(d, t);
    same(d, t, &b.points.last().unwrap().1);
    // The killed runs' temporary files were swept by the run that completed.
    assert_eq!(entries(&out), ["restored.qcow2", "restored.qcow2.manifest"]);
}

#[test]
fn commit_killed_anywhere_resumes_to_the_right_disk() {
    let b = backup_dir();
    let d = copy_dir(&b, "cmk");
    let full = b.points[0].0.clone();
    let kills = kill_until_done(&d, &["commit", "--dir", "."], |n| {
        let code = check_code(&d, &full);
        assert!(
            code == 0 || code == 3,
            "FULL corrupt after a kill at write {n}"
        );
    });
    assert!(kills >= 5, "only {kills} kill points");
    clean(&d, &full);
    same(&d, &full, &b.points.last().unwrap().1);
    restore_ok(&d, &["verify", "--dir", "."]);
}

#[test]
fn snapshotrebase_killed_anywhere_resumes_or_rolls_back() {
    let b = backup_dir();
    let d = copy_dir(&b, "srk");
    let full = b.points[0].0.clone();
    let mut rolled_back = false;
    let kills = kill_until_done(&d, &["snapshotrebase", "--dir", "."], |n| {
        assert_sound_after_crash(&d, &full, &format!("a kill at write {n}"));
        // The documented roll-back works from any state with the first snapshot in.
        let list = qemu_img(&d, &["snapshot", "-l", "-U", &full]);
        if !rolled_back && list.contains("FULL-BACKUP") && n > 20 {
            let r = copy_dir(&b, "srk-rollback");
            std::fs::copy(d.join(&full), r.join(&full)).unwrap();
            qemu_img(&r, &["snapshot", "-a", "FULL-BACKUP", &full]);
            same(&r, &full, &b.points[0].1);
            rolled_back = true;
        }
    });
    assert!(kills >= 5, "only {kills} kill points");
    assert!(rolled_back);
    clean(&d, &full);
    same(&d, &full, &b.points.last().unwrap().1);
    assert_snapshots_hold_every_point(&d, &b);
}

#[test]
fn rebase_killed_anywhere_resumes() {
    let b = backup_dir();
    let d = copy_dir(&b, "rbk");
    let kills = kill_until_done(&d, &["rebase", "--dir", "."], |n| {
        for (f, _) in &b.points {
            assert_eq!(check_code(&d, f), 0, "{f} after a kill at write {n}");
        }
    });
    assert!(kills >= 1);
    same(&d, "image", &b.points.last().unwrap().1);
}

#[test]
fn full_disk_gives_a_clear_error_and_leaves_nothing_behind() {
    let b = backup_dir();
    let d = &b.root;
    let before = digest(d);
    let out = b._tmp.path().join("full-disk");
    std::fs::create_dir(&out).unwrap();
    let t = out.join("restored.qcow2");
    for n in [1, 2, 3, 5] {
        let (killed, code, err) = restore_faulty(
            d,
            &["merge", "--dir", ".", "--targetfile", t.to_str().unwrap()],
            n,
            "enospc",
        );
        assert!(!killed);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("No space left on device"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(entries(&out).is_empty(), "left behind: {:?}", entries(&out));
    }
    assert_eq!(digest(d), before);
    // commit into a FULL on a full disk: a clear error, the FULL still sound, and once
    // there is room again the same command finishes the job.
    let c = copy_dir(&b, "full-commit");
    let full = &b.points[0].0;
    let (_, code, err) = restore_faulty(&c, &["commit", "--dir", "."], 20, "enospc");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    let cc = check_code(&c, full);
    assert!(cc == 0 || cc == 3, "FULL after ENOSPC: check {cc}");
    restore_ok(&c, &["commit", "--dir", "."]);
    clean(&c, full);
    same(&c, full, &b.points.last().unwrap().1);
}

/// A real full filesystem: a 2 MiB tmpfs as the target of a merge that needs ~10 MiB.
/// Needs root (mount); skipped with a note otherwise.
#[test]
fn merge_onto_a_real_full_filesystem() {
    struct Mount(PathBuf);
    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let b = backup_dir();
    let mnt = b._tmp.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipped: cannot mount a tmpfs here (not root?)");
        return;
    }
    let _guard = Mount(mnt.clone());
    let t = mnt.join("restored.qcow2");
    let (c, _, e) = restore(
        &b.root,
        &["merge", "--dir", ".", "--targetfile", t.to_str().unwrap()],
    );
    assert_eq!(c, 1, "{e}");
    assert!(e.contains("No space left on device"), "{e}");
    assert!(entries(&mnt).is_empty(), "left behind: {:?}", entries(&mnt));
}

/// A small XFS (reflinks on) on a loop device, unmounted on drop; None (with the reason on
/// stderr) where this machine cannot make one (not root, no loop devices, no xfsprogs).
struct XfsMount {
    _tmp: tempfile::TempDir,
    mnt: PathBuf,
}

impl XfsMount {
    fn new() -> Option<XfsMount> {
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("xfs.img");
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::File::create(&img)
            .unwrap()
            .set_len(512 << 20)
            .unwrap();
        let step = |cmd: &str, args: &[&str]| {
            let (c, o, e) = run(cmd, args, tmp.path());
            if c != 0 {
                eprintln!("skipped: cannot make an XFS here ({cmd}: {o}{e})");
            }
            c == 0
        };
        let img_s = img.to_str().unwrap();
        if !step("mkfs.xfs", &["-q", "-m", "reflink=1", img_s])
            || !step("mount", &["-o", "loop", img_s, mnt.to_str().unwrap()])
        {
            return None;
        }
        Some(XfsMount { _tmp: tmp, mnt })
    }

    fn used_bytes(&self) -> u64 {
        let (c, o, e) = run("sync", &["-f", self.mnt.to_str().unwrap()], &self.mnt);
        assert_eq!(c, 0, "{e}");
        let (c, o2, e) = run(
            "df",
            &["-B1", "--output=used", self.mnt.to_str().unwrap()],
            &self.mnt,
        );
        assert_eq!(c, 0, "{o}{e}");
        o2.lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

/// On a filesystem with reflinks, merge shares the backups' blocks instead of copying them:
/// the merged image takes almost no space, has the right content, and writing to it leaves
/// the backups as they were.
#[test]
fn merge_on_xfs_shares_blocks_with_the_backups() {
    let Some(x) = XfsMount::new() else { return };
    let d = x.mnt.join("disk1");
    std::fs::create_dir(&d).unwrap();
    let mut model = vec![0u8; 64 * MIB];
    let full = "FULL-1000-disk1.qcow2";
    qemu_img(&d, &["create", "-q", "-f", "qcow2", full, "64M"]);
    let cmds = vec![apply(&mut model, &W::Data(0, 48 * MIB, 0x51))];
    qemu_io(&d, full, &cmds);
    let full_model = model.clone();
    let inc = "INC-1100-disk1.qcow2";
    qemu_img(&d, &["create", "-q", "-f", "qcow2", inc, "64M"]);
    let ws = [
        W::Data(4 * MIB, MIB, 0x52),
        W::Zero(8 * MIB, MIB),
        W::Data(56 * MIB, 2 * MIB, 0x53),
    ];
    let cmds: Vec<String> = ws.iter().map(|w| apply(&mut model, w)).collect();
    qemu_io(&d, inc, &cmds);
    std::fs::write(x.mnt.join("model.raw"), &model).unwrap();
    std::fs::write(x.mnt.join("full-model.raw"), &full_model).unwrap();
    let before = x.used_bytes();
    restore_ok(&d, &["merge", "--dir", ".", "--targetfile", "../out.qcow2"]);
    let grown = x.used_bytes() - before;
    clean(&x.mnt, "out.qcow2");
    same(&x.mnt, "out.qcow2", "model.raw");
    // 49 MiB of data in the output; what it takes of its own is metadata.
    assert!(
        grown < 4 * MIB as u64,
        "the merged image took {grown} bytes"
    );
    let (c, _, e) = restore(&d, &["verify", "--dir", "."]);
    assert_eq!(c, 0, "{e}");
    // Shared blocks are copy-on-write: writing the output leaves the backups alone.
    qemu_io(&x.mnt, "out.qcow2", &["write -P 0x77 0 64M"]);
    same(&d, full, "../full-model.raw");
    clean(&d, inc);
    // 512-byte clusters are smaller than XFS's blocks: every range is refused, the writer
    // stops asking and writes them, and the content is still right.
    let small = x.mnt.join("disk2");
    std::fs::create_dir(&small).unwrap();
    let sfull = "FULL-1000-disk2.qcow2";
    let opts = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"];
    qemu_img(&small, &[&opts[..], &[sfull, "4M"]].concat());
    qemu_io(&small, sfull, &["write -P 0x61 0 3M"]);
    let sinc = "INC-1100-disk2.qcow2";
    qemu_img(&small, &[&opts[..], &[sinc, "4M"]].concat());
    qemu_io(&small, sinc, &["write -P 0x62 1000k 9k"]);
    restore_ok(
        &small,
        &["merge", "--dir", ".", "--targetfile", "../small.qcow2"],
    );
    clean(&x.mnt, "small.qcow2");
    let stop = format!("{sinc}.top.qcow2");
    std::fs::copy(small.join(sinc), small.join(&stop)).unwrap();
    qemu_img(&small, &["rebase", "-u", "-b", sfull, "-F", "qcow2", &stop]);
    same(&small, &stop, "../small.qcow2");
    let top = format!("{}.tmp-top.qcow2", inc);
    std::fs::copy(d.join(inc), d.join(&top)).unwrap();
    qemu_img(&d, &["rebase", "-u", "-b", full, "-F", "qcow2", &top]);
    same(&d, &top, "../model.raw");
}

// ---- Hostile and damaged files in a backup directory ------------------------------------

/// Runs qmprestore with a 20 s limit and a 2 GiB address-space limit: (exit code, stderr).
fn restore_limited(cwd: &Path, args: &[&str]) -> (i32, String) {
    let what = format!("qmprestore {args:?}");
    testkit::run_limited(restore_cmd(cwd, args), &what, || {})
}

/// Variants of a good backup file: truncated, absurd header fields, wild table entries,
/// random bit flips in the metadata.
fn hostile_variants(good: &[u8]) -> Vec<(String, Vec<u8>)> {
    let put32 =
        |b: &mut Vec<u8>, off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |b: &mut Vec<u8>, off: usize, v: u64| b[off..off + 8].copy_from_slice(&v.to_be_bytes());
    let mut out = Vec::new();
    for len in [
        0,
        50,
        104,
        4096,
        65536,
        65536 * 3 + 7,
        good.len() / 2,
        good.len() - 1,
    ] {
        out.push((
            format!("truncated-{len}"),
            good[..len.min(good.len())].to_vec(),
        ));
    }
    let pokes: Vec<(&str, usize, u64, bool)> = vec![
        ("l1-size-max", 36, u32::MAX as u64, false),
        ("cluster-bits-40", 20, 40, false),
        ("refcount-order-9", 96, 9, false),
        ("header-length-huge", 100, u32::MAX as u64, false),
        ("snapshots-max", 60, u32::MAX as u64, false),
        ("size-max", 24, u64::MAX, true),
        ("l1-offset-past-eof", 40, 1 << 50, true),
        ("reftable-offset-past-eof", 48, 1 << 50, true),
        ("unknown-incompat", 72, 1 << 12, true),
        ("corrupt-bit", 72, 2, true),
        ("backing-name-huge", 16, u32::MAX as u64, false),
    ];
    for (name, off, v, wide) in pokes {
        let mut b = good.to_vec();
        if wide {
            put64(&mut b, off, v);
        } else {
            put32(&mut b, off, v as u32);
        }
        out.push((name.to_string(), b));
    }
    let l1 = u64::from_be_bytes(good[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(good[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    let mut b = good.to_vec();
    put64(&mut b, l1, 0x8000_0000_0000_0200);
    out.push(("l1-into-header".into(), b));
    let mut b = good.to_vec();
    for (i, x) in b[l2..l2 + 4096].iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(151).wrapping_add(7);
    }
    out.push(("l2-garbage".into(), b));
    let mut x = 0x2545_f491u32;
    for k in 0..12 {
        let mut b = good.to_vec();
        for _ in 0..3 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let pos = (x as usize) % good.len().min(4 * 65536);
            b[pos] ^= 1 << (x % 8);
        }
        out.push((format!("flips-{k}"), b));
    }
    out
}

#[test]
fn hostile_files_in_a_backup_directory() {
    let b = backup_dir();
    let work = b._tmp.path().join("hostile");
    for victim in [0usize, 2] {
        let good = std::fs::read(b.root.join(&b.points[victim].0)).unwrap();
        for (name, bytes) in hostile_variants(&good) {
            for verb in [
                "list",
                "verify",
                "merge",
                "rebase",
                "commit",
                "snapshotrebase",
            ] {
                let _ = std::fs::remove_dir_all(&work);
                let d = copy_dir(&b, "hostile");
                std::fs::write(d.join(&b.points[victim].0), &bytes).unwrap();
                let before = digest(&d);
                let target = b._tmp.path().join("hostile-out.qcow2");
                let _ = std::fs::remove_file(&target);
                let mut args = vec![verb, "--dir", "."];
                if verb == "merge" {
                    args.extend(["--targetfile", target.to_str().unwrap()]);
                }
                let (code, err) = restore_limited(&d, &args);
                let what = format!("{verb} with {name} as {}", b.points[victim].0);
                assert!(code == 0 || code == 1, "{what}: exit {code}\n{err}");
                assert!(!err.contains("panicked"), "{what}: {err}");
                if code != 0 {
                    assert!(err.contains("qmprestore:"), "{what}: no message: {err}");
                    assert!(
                        digest(&d) == before,
                        "{what}: failed but changed files\n{err}"
                    );
                    assert!(!target.exists(), "{what}: failed but left a target");
                } else if verb == "verify" || verb == "list" {
                    assert!(digest(&d) == before, "{what}: changed files");
                }
            }
        }
    }
}

// ---- Planted symlinks, special files, leftovers, files in use ----------------------------

/// A file outside the backup directory that a planted symlink points at.
fn victim(b: &BackupDir) -> PathBuf {
    let v = b._tmp.path().join("victim");
    std::fs::write(&v, b"precious, not a manifest").unwrap();
    v
}

fn assert_victim_intact(v: &Path) {
    assert_eq!(std::fs::read(v).unwrap(), b"precious, not a manifest");
}

#[test]
fn planted_symlinks_at_side_file_names_are_never_followed() {
    let b = backup_dir();
    let v = victim(&b);
    let link = |at: &Path| std::os::unix::fs::symlink(&v, at).unwrap();
    // merge: the target's manifest is written through `<T>.manifest.tmp`.
    let d = copy_dir(&b, "plant-merge");
    let out = b._tmp.path().join("plant-out");
    std::fs::create_dir(&out).unwrap();
    let t = out.join("restored.qcow2");
    link(&out.join("restored.qcow2.manifest.tmp"));
    restore_ok(
        &d,
        &["merge", "--dir", ".", "--targetfile", t.to_str().unwrap()],
    );
    assert_victim_intact(&v);
    let m = out.join("restored.qcow2.manifest");
    assert!(m.symlink_metadata().unwrap().file_type().is_file());
    restore_ok(&d, &["verify", "--dir", "."]);
    // merge refuses an existing manifest for the target, as it refuses the target.
    let t2 = out.join("second.qcow2");
    link(&out.join("second.qcow2.manifest"));
    let (c, _, e) = restore(
        &d,
        &["merge", "--dir", ".", "--targetfile", t2.to_str().unwrap()],
    );
    assert_eq!(c, 1, "{e}");
    assert!(
        e.contains("second.qcow2.manifest") && e.contains("not overwriting"),
        "{e}"
    );
    assert!(!t2.exists());
    assert_victim_intact(&v);
    // commit: the FULL's manifest is refreshed through its `.manifest.tmp`.
    let d = copy_dir(&b, "plant-commit");
    let full = &b.points[0].0;
    link(&d.join(format!("{full}.manifest.tmp")));
    restore_ok(&d, &["commit", "--dir", "."]);
    assert_victim_intact(&v);
    assert!(!d.join(format!("{full}.manifest.tmp")).exists());
    restore_ok(&d, &["verify", "--dir", "."]);
    // rebase: an `image` symlink pointing elsewhere is replaced, never written through.
    let d = copy_dir(&b, "plant-rebase");
    link(&d.join("image"));
    restore_ok(&d, &["rebase", "--dir", "."]);
    assert_victim_intact(&v);
    assert_eq!(
        std::fs::read_link(d.join("image")).unwrap(),
        Path::new(&b.points[3].0)
    );
    // A backup file that is a symlink to a file elsewhere is never changed in place.
    let d = copy_dir(&b, "plant-full");
    let elsewhere = b._tmp.path().join("elsewhere.qcow2");
    std::fs::rename(d.join(full), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, d.join(full)).unwrap();
    let before = std::fs::read(&elsewhere).unwrap();
    for verb in ["commit", "snapshotrebase"] {
        let (c, _, e) = restore(&d, &[verb, "--dir", "."]);
        assert_eq!(c, 1, "{verb}: {e}");
        assert!(e.contains("not a regular file"), "{verb}: {e}");
        assert_eq!(std::fs::read(&elsewhere).unwrap(), before, "{verb}");
    }
}

#[test]
fn fifos_and_leftover_temporaries_in_a_backup_directory() {
    let b = backup_dir();
    let mkfifo = |p: &Path| {
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    };
    let out = b._tmp.path().join("fifo-out.qcow2");
    let verbs: [&[&str]; 6] = [
        &["list"],
        &["verify"],
        &["merge", "--targetfile", out.to_str().unwrap()],
        &["rebase"],
        &["commit"],
        &["snapshotrebase"],
    ];
    for verb in verbs {
        // A FIFO and a socket named like backups, and leftover temporaries: skipped, the
        // command does its job.
        let _ = std::fs::remove_dir_all(b._tmp.path().join("fifo"));
        let _ = std::fs::remove_file(&out);
        let _ = std::fs::remove_file(manifest_of(&out));
        let d = copy_dir(&b, "fifo");
        mkfifo(&d.join("INC-5000-disk1.qcow2"));
        let _sock = std::os::unix::net::UnixListener::bind(d.join("INC-5001-disk1.qcow2")).unwrap();
        std::fs::write(
            d.join(format!("{}.manifest.tmp", b.points[0].0)),
            b"{\"trunc",
        )
        .unwrap();
        std::fs::write(
            d.join(format!("{}.partial.failed-99", b.points[1].0)),
            b"junk",
        )
        .unwrap();
        let mut args = vec![verb[0], "--dir", "."];
        args.extend_from_slice(&verb[1..]);
        let (code, err) = restore_limited(&d, &args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(
            err.contains("FIFO") && err.contains("socket"),
            "{args:?}: {err}"
        );
        if verb[0] == "commit" || verb[0] == "snapshotrebase" {
            // The next write to the leftover's name cleaned it up.
            assert!(!d.join(format!("{}.manifest.tmp", b.points[0].0)).exists());
        }
        // A FIFO in place of a manifest is refused with a message, never opened blocking.
        let _ = std::fs::remove_dir_all(b._tmp.path().join("fifo"));
        let _ = std::fs::remove_file(&out);
        let _ = std::fs::remove_file(manifest_of(&out));
        let d = copy_dir(&b, "fifo");
        let m = d.join(format!("{}.manifest", b.points[1].0));
        std::fs::remove_file(&m).unwrap();
        mkfifo(&m);
        let (code, err) = restore_limited(&d, &args);
        if verb[0] == "list" {
            assert_eq!(code, 0, "{args:?}: {err}");
        } else {
            assert_eq!(code, 1, "{args:?}: {err}");
            assert!(err.contains("FIFO"), "{args:?}: {err}");
            assert!(!out.exists());
        }
    }
}

fn manifest_of(p: &Path) -> PathBuf {
    PathBuf::from(format!("{}.manifest", p.display()))
}

#[test]
fn damaged_manifest_and_odd_names_get_clear_messages() {
    let b = backup_dir();
    let d = copy_dir(&b, "damaged-manifest");
    let m = d.join(format!("{}.manifest", b.points[2].0));
    std::fs::write(
        &m,
        b"{\"format\": \"qmpbackup-manifest\", \"version\": 1, \"runs\": [[1, 2",
    )
    .unwrap();
    let out = b._tmp.path().join("dm.qcow2");
    for args in [
        vec!["verify", "--dir", "."],
        vec!["merge", "--dir", ".", "--targetfile", out.to_str().unwrap()],
    ] {
        let (c, _, e) = restore(&d, &args);
        assert_eq!(c, 1, "{e}");
        assert!(e.contains("damaged checksum manifest"), "{e}");
        // Said once, not once per layer of error context.
        assert_eq!(
            e.matches(m.file_name().unwrap().to_str().unwrap()).count(),
            1,
            "{e}"
        );
        assert!(!out.exists());
    }
    // A non-UTF-8 name that looks like a backup is named as such.
    let d = copy_dir(&b, "odd-name");
    use std::os::unix::ffi::OsStrExt;
    let odd = d.join(std::ffi::OsStr::from_bytes(b"INC-5000-disk\xff.qcow2"));
    std::fs::write(&odd, b"x").unwrap();
    let (c, _, e) = restore(&d, &["list", "--dir", "."]);
    assert_eq!(c, 1, "{e}");
    assert!(
        e.contains("not valid UTF-8") && !e.contains("no timestamp"),
        "{e}"
    );
    // A FULL that cannot be opened for writing (QEMU's write lock held on it; as root,
    // permissions would not stop us): the path once in the error, not twice.
    let d = copy_dir(&b, "locked-full");
    let full = d.join(&b.points[0].0);
    let mut holder = QemuIo::hold(&full);
    let (c, _, e) = restore(&d, &["commit", "--force-share", "--dir", "."]);
    holder.release();
    assert_eq!(c, 1, "{e}");
    let last = e
        .lines()
        .find(|l| l.starts_with("qmprestore:"))
        .unwrap_or("");
    assert_eq!(last.matches(&b.points[0].0).count(), 1, "{e}");
    assert!(last.contains("in use by another process"), "{e}");
}

/// A qemu-io holding an image open for writing (with QEMU's locks) until released.
struct QemuIo {
    child: Option<std::process::Child>,
}

impl QemuIo {
    fn hold(path: &Path) -> QemuIo {
        let child = Command::new("qemu-io")
            .args(["-f", "qcow2", path.to_str().unwrap()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait until its write lock is there.
        let start = std::time::Instant::now();
        while !qcow2::lock::path_has_writer(path) {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "qemu-io took no lock"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        QemuIo { child: Some(child) }
    }

    fn release(&mut self) {
        if let Some(mut c) = self.child.take() {
            drop(c.stdin.take());
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        self.release();
    }
}

#[test]
fn a_backup_file_being_written_is_refused() {
    let b = backup_dir();
    let d = copy_dir(&b, "in-use");
    let inc = d.join(&b.points[2].0);
    let before = digest(&d);
    let out = b._tmp.path().join("in-use.qcow2");
    let mut holder = QemuIo::hold(&inc);
    for args in [
        vec!["merge", "--dir", ".", "--targetfile", out.to_str().unwrap()],
        vec!["commit", "--dir", "."],
        vec!["verify", "--dir", "."],
    ] {
        let (c, _, e) = restore(&d, &args);
        assert_eq!(c, 1, "{args:?}: {e}");
        assert!(
            e.contains(&b.points[2].0)
                && e.contains("in use for writing")
                && e.contains("--force-share"),
            "{args:?}: {e}"
        );
        assert!(!out.exists());
    }
    assert_eq!(digest(&d), before);
    // --force-share reads it anyway (here it is not really written), with a warning.
    let (c, _, e) = restore(
        &d,
        &[
            "merge",
            "--force-share",
            "--dir",
            ".",
            "--targetfile",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(c, 0, "{e}");
    assert!(e.contains("reading it anyway"), "{e}");
    // The qcow2 inspection verbs read it, as qemu-img -U does, and warn.
    let qcow2_bin = env!("CARGO_BIN_EXE_qmprestore").replace("qmprestore", "qcow2");
    let o = Command::new(&qcow2_bin)
        .args(["info", inc.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("in use for writing"));
    holder.release();
    same(&d, out.to_str().unwrap(), &b.points[3].1);
}

#[test]
fn verify_streams_a_manifest_of_millions_of_runs() {
    let b = backup_dir();
    let d = copy_dir(&b, "many-runs");
    // The FULL's first 3 MiB are one allocated range: describe it as 2^21 one-byte runs.
    let full = d.join(&b.points[0].0);
    let data = vec![0x11u8; 3 * MIB];
    let n = 2usize << 20;
    let mut json = String::with_capacity(n * 32);
    json.push_str("{\"format\":\"qmpbackup-manifest\",\"version\":1,\"file\":\"x\",\"virtual-size\":8388608,\"run-size\":67108864,\"uuid\":\"uuid-1\",\"runs\":[");
    for i in 0..n {
        if i > 0 {
            json.push(',');
        }
        let crc = crc32fast::hash(&data[i..i + 1]);
        json.push_str(&format!("[{i},1,\"{crc:08x}\"]"));
    }
    // The rest as the real manifest has it.
    let real = qmpbackup::store::manifest::load_manifest(&full)
        .unwrap()
        .unwrap();
    for qmpbackup::store::manifest::runs::CheckedRun {
        start: s,
        len: l,
        crc: c,
    } in &real.runs
    {
        let (mut s, mut l) = (*s, *l);
        if s < n as u64 {
            let cut = (n as u64 - s).min(l);
            s += cut;
            l -= cut;
            if l == 0 {
                continue;
            }
            // Recompute the CRC of the shortened run from the model.
            let model = std::fs::read(b.root.join(&b.points[0].1)).unwrap();
            let crc = crc32fast::hash(&model[s as usize..(s + l) as usize]);
            json.push_str(&format!(",[{s},{l},\"{crc:08x}\"]"));
            continue;
        }
        json.push_str(&format!(",[{s},{l},\"{c:08x}\"]"));
    }
    json.push_str("]}");
    std::fs::write(d.join(format!("{}.manifest", b.points[0].0)), &json).unwrap();
    drop(json);
    let mut child = restore_cmd(&d, &["verify", "--dir", ".", "--filter", "FULL-"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The child's own high-water mark (VmHWM: since its exec), polled until it exits.
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let status = loop {
        if let Ok(st) = std::fs::read_to_string(&status_file) {
            if let Some(v) = st
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak_kib = peak_kib.max(v);
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert!(status.success(), "verify failed");
    // Far below the ~70 MB of JSON and the runs it holds.
    assert!(peak_kib < 48 * 1024, "peak RSS {peak_kib} KiB");
}

// ---- Bit rot must not spread ------------------------------------------------------------

/// Rewrites every manifest in `d` as version 1 (64 MiB runs), as backups made before
/// version 2 have them.
fn to_v1_manifests(d: &Path) {
    use qmpbackup::store::manifest::{self, runs};
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".manifest") || name.starts_with("model") {
            continue;
        }
        let Some(mut m) = manifest::load_manifest(&p).unwrap() else {
            continue;
        };
        let chain = manifest::open_alone(&p).unwrap();
        let whole = 0..chain.virtual_size();
        m.runs =
            runs::compute_runs_in(&chain, std::slice::from_ref(&whole), runs::V1_RUN_SIZE).unwrap();
        m.header.version = 1;
        m.header.block_size = runs::V1_RUN_SIZE;
        manifest::store(&p, &m).unwrap();
    }
}

/// Flips a byte of the data that holds guest offset `guest` in the image `path` itself
/// (inside the compressed stream for a compressed cluster).
fn flip_guest_byte(path: &Path, guest: u64) {
    let img = qcow2::Qcow2::open(path).unwrap();
    let host = match img.block_status(guest, 1).unwrap().1 {
        qcow2::ExtentKind::Data { host } => host,
        // Early in the stream: the end of the last sector is padding.
        qcow2::ExtentKind::Compressed { desc, .. } => desc.host_offset + 4,
        other => panic!("{}: guest {guest:#x} is {other:?}", path.display()),
    };
    drop(img);
    let mut bytes = std::fs::read(path).unwrap();
    bytes[host as usize] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

/// Where rot is planted, and what each command must then do.
struct RotCase {
    what: &'static str,
    /// Index of the point whose file rots, and the guest offset.
    point: usize,
    guest: u64,
    /// Merge of the newest point stops (it reads the rotten data, or, with version 1, a
    /// run holding it).
    merge_stops: bool,
    /// Commit stops before changing the FULL (else it succeeds, and verify afterwards
    /// still finds the rot when `rot_survives`).
    commit_stops: bool,
    rot_survives: bool,
}

fn rot_cases(version: u32) -> Vec<RotCase> {
    let v2 = version == 2;
    vec![
        RotCase {
            what: "INC data",
            point: 1,
            guest: 6 * MIB as u64 + 100,
            merge_stops: true,
            commit_stops: true,
            rot_survives: true,
        },
        RotCase {
            what: "compressed INC data",
            point: 2,
            guest: 2 * MIB as u64 + 70000,
            merge_stops: true,
            commit_stops: true,
            rot_survives: true,
        },
        // A FULL block no INC touches: commit leaves it, and its old checksum with it
        // (version 1: the one 64 MiB block is touched, and checked first).
        RotCase {
            what: "FULL data the INCs leave",
            point: 0,
            guest: 7 * MIB as u64 + 600,
            merge_stops: true,
            commit_stops: !v2,
            rot_survives: true,
        },
        // A FULL block an INC changes in part: the commit updates its checksum from what
        // changes alone (version 2), so the rot beside the change stays detectable; with
        // version 1 the grown last INC re-reads the one block, which is checked first.
        RotCase {
            what: "FULL data beside an INC's change",
            point: 0,
            guest: 5 * MIB as u64 + 700_000,
            merge_stops: true,
            commit_stops: !v2,
            rot_survives: true,
        },
        // A FULL block an INC overwrites whole: the rot goes away with it.
        RotCase {
            what: "FULL data an INC overwrites",
            point: 0,
            guest: 2 * MIB as u64 + 100,
            merge_stops: !v2,
            commit_stops: !v2,
            rot_survives: false,
        },
    ]
}

#[test]
fn bit_rot_never_spreads_into_a_restore() {
    let b = backup_dir();
    let newest = &b.points.last().unwrap().1;
    for version in [2, 1] {
        for (i, case) in rot_cases(version).into_iter().enumerate() {
            let label = format!("v{version} {}", case.what);
            let d = copy_dir(&b, &format!("rot-v{version}-{i}"));
            if version == 1 {
                to_v1_manifests(&d);
            }
            let rotten = b.points[case.point].0.clone();
            flip_guest_byte(&d.join(&rotten), case.guest);
            let before = digest(&d);
            let target = d.join(format!("out-{i}.qcow2"));
            let t = target.to_str().unwrap();
            // merge
            let (c, _, e) = restore(&d, &["merge", "--dir", ".", "--targetfile", t]);
            if case.merge_stops {
                assert_eq!(c, 1, "{label}: merge should stop: {e}");
                assert!(e.contains(&rotten), "{label}: names the file: {e}");
                assert!(!target.exists(), "{label}: a target was left");
                // (Rot in a compressed stream may fail decompression first.)
                assert!(
                    e.contains("--ignore-checksums") || e.contains("corrupt deflate"),
                    "{label}: {e}"
                );
            } else {
                assert_eq!(c, 0, "{label}: {e}");
                same(&d, t, newest);
                std::fs::remove_file(&target).unwrap();
                std::fs::remove_file(d.join(format!("out-{i}.qcow2.manifest"))).unwrap();
            }
            assert!(digest(&d) == before, "{label}: merge changed the backups");
            // --ignore-checksums: the data as it is, loudly.
            if case.rot_survives && case.point != 2 {
                let (c, _, e) = restore(
                    &d,
                    &[
                        "merge",
                        "--dir",
                        ".",
                        "--targetfile",
                        t,
                        "--ignore-checksums",
                    ],
                );
                assert_eq!(c, 0, "{label}: {e}");
                assert!(e.contains("NOT checked"), "{label}: {e}");
                let (c, _, _) = run("qemu-img", &["compare", "-U", t, newest], &d);
                assert_eq!(c, 1, "{label}: the rotten byte is restored as it is");
                std::fs::remove_file(&target).unwrap();
                std::fs::remove_file(d.join(format!("out-{i}.qcow2.manifest"))).unwrap();
            }
            // commit and snapshotrebase
            for cmd in ["commit", "snapshotrebase"] {
                let w = copy_dir(&b, &format!("rot-v{version}-{i}-{cmd}"));
                if version == 1 {
                    to_v1_manifests(&w);
                }
                flip_guest_byte(&w.join(&rotten), case.guest);
                let before = digest(&w);
                let (c, _, e) = restore(&w, &[cmd, "--dir", "."]);
                let full = &b.points[0].0;
                if case.commit_stops {
                    assert_eq!(c, 1, "{label}: {cmd} should stop: {e}");
                    assert!(e.contains(&rotten), "{label}: {cmd} names the file: {e}");
                    assert!(digest(&w) == before, "{label}: {cmd} changed something");
                    if case.point == 2 {
                        continue; // an undecodable compressed stream cannot be committed at all
                    }
                    // A rescue goes through, loudly.
                    let (c, _, e) = restore(&w, &[cmd, "--dir", ".", "--ignore-checksums"]);
                    assert_eq!(c, 0, "{label}: {cmd} --ignore-checksums: {e}");
                    assert!(e.contains("NOT checked"), "{label}: {e}");
                    clean(&w, full);
                    continue;
                }
                assert_eq!(c, 0, "{label}: {cmd}: {e}");
                clean(&w, full);
                let (c, _, e) = restore(&w, &["verify", "--dir", "."]);
                if case.rot_survives {
                    assert_eq!(c, 1, "{label}: {cmd} blessed the rot");
                    assert!(
                        e.contains(full.as_str()) && e.contains("checksum mismatch"),
                        "{label}: {e}"
                    );
                } else {
                    assert_eq!(c, 0, "{label}: {cmd}: {e}");
                    same(&w, full, newest);
                }
            }
        }
    }
}

/// Rot in FULL data a commit overwrites whole goes away with it: the block's new checksum
/// is that of the new data, so verify passes (no later INC re-reads the block here).
#[test]
fn rot_an_inc_overwrites_is_gone_after_commit() {
    let b = backup_dir();
    let d = copy_dir(&b, "rot-gone");
    let full = &b.points[0].0;
    flip_guest_byte(&d.join(full), 2 * MIB as u64 + 100);
    restore_ok(&d, &["commit", "--dir", ".", "--until", &b.points[2].0]);
    clean(&d, full);
    same(&d, full, &b.points[2].1);
    restore_ok(&d, &["verify", "--dir", "."]);
}

#[test]
fn lost_clusters_are_found_while_merging() {
    // An INC's L2 entry cleared (the cluster is "unallocated" now): the chain would read
    // the older data there. Its manifest still records the data: merge stops.
    let b = backup_dir();
    let d = copy_dir(&b, "lost");
    let inc = d.join(&b.points[1].0);
    let mut bytes = std::fs::read(&inc).unwrap();
    let l1_off = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let l2 = (u64::from_be_bytes(bytes[l1_off..l1_off + 8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00) as usize;
    // Guest 6 MiB is cluster 96 of the first L2 table (64 KiB clusters).
    let e = l2 + 96 * 8;
    assert_ne!(bytes[e..e + 8], [0; 8]);
    bytes[e..e + 8].fill(0);
    std::fs::write(&inc, bytes).unwrap();
    let t = d.join("out.qcow2");
    let (c, _, e) = restore(
        &d,
        &["merge", "--dir", ".", "--targetfile", t.to_str().unwrap()],
    );
    assert_eq!(c, 1, "{e}");
    assert!(
        e.contains(&b.points[1].0) && e.contains("no longer has") && e.contains("0x600000"),
        "{e}"
    );
    assert!(!t.exists());
}

#[test]
fn commit_and_merge_agree_on_a_disk_that_shrank_and_grew() {
    // The FULL was taken of a disk shrunk to 1 MiB - 4 KiB: its last cluster still holds
    // data past that size. The INC grew the disk to 2 MiB without writing there: the
    // linked chain reads zeros past the FULL's size, so every restore must.
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let full = "FULL-1000-d.qcow2";
    let inc = "INC-1100-d.qcow2";
    qemu_img(d, &["create", "-q", "-f", "qcow2", full, "1M"]);
    qemu_io(d, full, &["write -P 0x55 0 1M"]);
    qemu_img(
        d,
        &["resize", "-q", "--shrink", full, &(MIB - 4096).to_string()],
    );
    qemu_img(d, &["create", "-q", "-f", "qcow2", inc, "2M"]);
    qemu_io(d, inc, &["write -P 0x66 1536K 64K"]);
    let mut model = vec![0x55u8; MIB - 4096];
    model.resize(2 * MIB, 0);
    model[1536 * 1024..1600 * 1024].fill(0x66);
    std::fs::write(d.join("model.raw"), &model).unwrap();
    for f in [full, inc] {
        qmpbackup::store::manifest::write_manifest(&d.join(f), Some("u")).unwrap();
    }
    let pristine = d.join("pristine");
    std::fs::create_dir(&pristine).unwrap();
    for f in [full, inc] {
        std::fs::copy(d.join(f), pristine.join(f)).unwrap();
        std::fs::copy(
            d.join(format!("{f}.manifest")),
            pristine.join(format!("{f}.manifest")),
        )
        .unwrap();
    }
    restore_ok(d, &["merge", "--dir", ".", "--targetfile", "merged.qcow2"]);
    same(d, "merged.qcow2", "model.raw");
    for cmd in ["commit", "snapshotrebase"] {
        let w = d.join(cmd);
        std::fs::create_dir(&w).unwrap();
        for e in std::fs::read_dir(&pristine).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), w.join(e.file_name())).unwrap();
        }
        restore_ok(&w, &[cmd, "--dir", "."]);
        clean(&w, full);
        same(&w, full, d.join("model.raw").to_str().unwrap());
        restore_ok(&w, &["verify", "--dir", "."]);
    }
}

#[test]
fn exit_status_is_0_success_1_failure_2_usage_as_help_says() {
    let b = backup_dir();
    let d = b.root.display().to_string();
    let status = |bin: &str, args: &[&str]| {
        Command::new(bin)
            .args(args)
            .env("PATH", "/nonexistent")
            .output()
            .unwrap()
    };
    let restore = env!("CARGO_BIN_EXE_qmprestore");
    let backup = env!("CARGO_BIN_EXE_qmpbackup");
    assert_eq!(
        status(restore, &["list", "--dir", &d]).status.code(),
        Some(0)
    );
    let missing = b._tmp.path().join("missing").display().to_string();
    assert_eq!(
        status(restore, &["list", "--dir", &missing]).status.code(),
        Some(1)
    );
    assert_eq!(status(restore, &["list", "--bogus"]).status.code(), Some(2));
    assert_eq!(
        status(backup, &["backup", "--target", "/x"]).status.code(),
        Some(2)
    );
    // qcow2 keeps qemu-img's codes: a usage error is 1 (2 is check's "corruptions").
    let qcow2 = env!("CARGO_BIN_EXE_qcow2");
    assert_eq!(status(qcow2, &["info", "--bogus"]).status.code(), Some(1));
    assert_eq!(status(qcow2, &["--help"]).status.code(), Some(0));
    let no_socket = status(backup, &["backup", "--level", "full", "--target", &missing]);
    assert_eq!(no_socket.status.code(), Some(1));
    // --help wraps its text: compare words.
    let help_of = |bin: &str| {
        let text = String::from_utf8(status(bin, &["--help"]).stdout).unwrap();
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    for bin in [restore, backup] {
        let help = help_of(bin);
        assert!(help.contains("Exit status: 0 success; 1 failure"), "{help}");
        assert!(help.contains("2 usage error"), "{help}");
    }
    let help = help_of(backup);
    assert!(
        help.contains("3 the backup was made but pruning after it failed"),
        "{help}"
    );
}
