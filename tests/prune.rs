//! `qmprestore prune` against the oracle: chains built with qemu-io (data, zero writes,
//! discards, a compressed INC, a grown disk; 64 KiB and 512 B clusters), each point's
//! model read by qemu-img from the linked chain before the prune. After a prune every kept
//! point restores (`merge --until`) to its model, every file left checks clean, `verify`
//! passes, and the files left are exactly the kept points. Killed at any write, a prune
//! never lets a kept point restore wrong, and the next run finishes the job.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use testkit::oracle::{qemu_img, qemu_io};

/// 2024-01-01 00:00:00 UTC.
const DAY0: u64 = 1_704_067_200;
const H: u64 = 3600;
const D: u64 = 86_400;

/// Five points: a FULL on day 0, three INCs on day 1 (08:00, 12:00, 20:00), one on day 2.
const TIMES: [u64; 5] = [
    DAY0,
    DAY0 + D + 8 * H,
    DAY0 + D + 12 * H,
    DAY0 + D + 20 * H,
    DAY0 + 2 * D + H,
];

/// A chain of `times.len()` points of the disk `disk` in `dir` (manifests written), and
/// each point's model (raw, read by qemu-img from the linked chain) in `models`:
/// (time, file name, model path).
fn build_chain(
    dir: &Path,
    models: &Path,
    times: &[u64],
    opts: &str,
    disk: &str,
) -> Vec<(u64, String, PathBuf)> {
    build_chain_with(dir, models, times, opts, disk, None)
}

/// [`build_chain`] with the INC `big` (if any) writing 2 MiB more.
fn build_chain_with(
    dir: &Path,
    models: &Path,
    times: &[u64],
    opts: &str,
    disk: &str,
    big: Option<usize>,
) -> Vec<(u64, String, PathBuf)> {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::create_dir_all(models).unwrap();
    let mut names = Vec::new();
    for (i, &t) in times.iter().enumerate() {
        let level = if i == 0 { "FULL" } else { "INC" };
        let name = format!("{level}-{t}-{disk}");
        let size = if i >= 4 { "10M" } else { "8M" };
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([name.as_str(), size]);
        qemu_img(dir, &args);
        let k = i as u64;
        let cmds: Vec<String> = if i == 0 {
            vec![
                "write -P 0x11 0 3M".into(),
                "write -P 0x12 5M 1M".into(),
                "write -P 0x13 7340544 4096".into(),
            ]
        } else {
            let mut c = vec![
                format!("write -P {} {} 98304", 0x20 + k, k * 69632),
                format!("write -z {} 65536", (k + 1) * 524_288),
                format!("write -P {} {} 3000", 0x40 + k, 3 * 1_048_576 + k * 1000),
            ];
            if i == 1 {
                c.push("write -P 0x55 2M 128k".into());
                c.push("discard 2M 64k".into());
            }
            if i == 3 {
                c.push("write -P 0x66 6M 512k".into());
            }
            if i >= 4 {
                c.push("write -P 0x77 9M 64k".into());
            }
            if big == Some(i) {
                c.push("write -P 0x88 4M 2M".into());
            }
            c
        };
        qemu_io(dir, &name, &cmds);
        if i == 2 {
            let tmp = format!("{name}.tmpc");
            qemu_img(dir, &["convert", "-c", "-O", "qcow2", &name, &tmp]);
            std::fs::rename(dir.join(&tmp), dir.join(&name)).unwrap();
            qemu_io(dir, &name, &["write -z 1572864 65536"]);
        }
        names.push(name);
    }
    // The models: a linked copy of the chain, each point read by qemu-img.
    let link = models.join(format!("link-{disk}"));
    std::fs::create_dir_all(&link).unwrap();
    let mut out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        std::fs::copy(dir.join(name), link.join(name)).unwrap();
        if i > 0 {
            qemu_img(
                &link,
                &["rebase", "-u", "-b", &names[i - 1], "-F", "qcow2", name],
            );
        }
        let model = models.join(format!("{name}.raw"));
        qemu_img(
            &link,
            &["convert", "-O", "raw", name, model.to_str().unwrap()],
        );
        qmpbackup::store::manifest::write_manifest(&dir.join(name), Some("uuid-1")).unwrap();
        out.push((times[i], name.clone(), model));
    }
    out
}

/// The backup files (and manifests) in `dir`, sorted.
fn backup_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("FULL-") || n.starts_with("INC-") || n.starts_with("COPY-"))
        .collect();
    v.sort();
    v
}

/// The name a kept point has in `dir` now (a FULL takes the time of the point it became).
fn file_of(dir: &Path, t: u64) -> String {
    backup_files(dir)
        .into_iter()
        .find(|n| n.contains(&format!("-{t}-")) && !n.ends_with(".manifest"))
        .unwrap_or_else(|| panic!("no file for point {t} in {:?}", backup_files(dir)))
}

/// `merge --until point` of the directory into `target`: (exit code, stderr).
fn merge_point(dir: &Path, point: &str, target: &Path) -> (i32, String) {
    let t = target.to_str().unwrap();
    let (code, _, err) = restore(
        dir,
        &["merge", "--dir", ".", "--until", point, "--targetfile", t],
    );
    (code, err)
}

/// Every point of `kept` restores to its model; every file left checks clean; verify
/// passes.
fn assert_points_restore(dir: &Path, out: &Path, kept: &[&(u64, String, PathBuf)]) {
    for f in backup_files(dir) {
        if !f.ends_with(".manifest") {
            clean(dir, &f);
            // Manifests kept block by block (or by CRC delta) equal fresh ones.
            let path = dir.join(&f);
            if let Some(m) = qmpbackup::store::manifest::load_manifest(&path).unwrap() {
                let fresh = qmpbackup::store::manifest::compute_runs(&path).unwrap().2;
                assert_eq!(m.runs, fresh, "{f}: manifest differs from a fresh one");
            }
        }
    }
    for (t, _, model) in kept {
        let name = file_of(dir, *t);
        let target = out.join(format!("restored-{t}.qcow2"));
        let _ = std::fs::remove_file(&target);
        let _ = std::fs::remove_file(out.join(format!("restored-{t}.qcow2.manifest")));
        let (code, err) = merge_point(dir, &name, &target);
        assert_eq!(code, 0, "merge --until {name}: {err}");
        same(dir, target.to_str().unwrap(), model.to_str().unwrap());
    }
    restore_ok(dir, &["verify", "--dir", "."]);
}

fn expected_files(names: &[String]) -> Vec<String> {
    let mut v: Vec<String> = names
        .iter()
        .flat_map(|n| [n.clone(), format!("{n}.manifest")])
        .collect();
    v.sort();
    v
}

/// (policy, indices of the kept points, the files left).
fn cases(disk: &str) -> Vec<(Vec<&'static str>, Vec<usize>, Vec<String>)> {
    let f = |level: &str, i: usize| format!("{level}-{}-{disk}", TIMES[i]);
    vec![
        (vec!["--keep-last", "1"], vec![4], vec![f("FULL", 4)]),
        (
            vec!["--keep-last", "2"],
            vec![3, 4],
            vec![f("FULL", 3), f("INC", 4)],
        ),
        (
            vec!["--keep-daily", "3"],
            vec![0, 3, 4],
            vec![f("FULL", 0), f("INC", 3), f("INC", 4)],
        ),
        (
            vec!["--keep-last", "4"],
            vec![1, 2, 3, 4],
            vec![f("FULL", 1), f("INC", 2), f("INC", 3), f("INC", 4)],
        ),
        (
            // The hour of the newest point is kept already: hourly keeps the hour before.
            vec![
                "--keep-last",
                "1",
                "--keep-hourly",
                "1",
                "--keep-yearly",
                "3",
            ],
            vec![3, 4],
            vec![f("FULL", 3), f("INC", 4)],
        ),
    ]
}

#[test]
fn every_kept_point_restores_after_folding() {
    for opts in ["", "cluster_size=512"] {
        for (policy, kept, files) in cases("disk1.qcow2") {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("disk1");
            let points = build_chain(&dir, &tmp.path().join("m"), &TIMES, opts, "disk1.qcow2");
            let mut args = vec!["prune", "--dir", ".", "--utc"];
            args.extend(&policy);
            let plan = restore_ok(&dir, &args);
            assert!(plan.contains("keep"), "{plan}");
            assert_eq!(
                backup_files(&dir),
                expected_files(&files),
                "{opts} {policy:?}: {plan}"
            );
            let kept: Vec<&(u64, String, PathBuf)> = kept.iter().map(|&i| &points[i]).collect();
            assert_points_restore(&dir, tmp.path(), &kept);
            // Pruning again with the same policy has nothing left to do.
            let again = restore_ok(&dir, &args);
            assert_eq!(backup_files(&dir), expected_files(&files), "{again}");
        }
    }
}

#[test]
fn dry_run_changes_nothing_and_json_shows_the_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("disk1");
    build_chain(&dir, &tmp.path().join("m"), &TIMES, "", "disk1.qcow2");
    let before = digest(&dir);
    let out = restore_ok(
        &dir,
        &[
            "prune",
            "--dir",
            ".",
            "--keep-daily",
            "3",
            "--utc",
            "--dry-run",
            "--json",
        ],
    );
    assert_eq!(digest(&dir), before);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let plan = &v["disks"][0]["plan"];
    let reasons: Vec<String> = plan["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["reason"].to_string())
        .collect();
    assert_eq!(
        reasons,
        [
            r#"{"kept":"keep-daily"}"#,
            r#""not-kept""#,
            r#""not-kept""#,
            r#"{"kept":"keep-daily"}"#,
            r#"{"kept":"keep-daily"}"#
        ],
        "{out}"
    );
    assert_eq!(plan["actions"][0]["action"], "fold-into-next", "{out}");
    // Without a keep option: refused, nothing changed.
    refused(&dir, &["prune", "--dir", "."], "no keep option given");
    assert_eq!(digest(&dir), before);
}

/// Folding a big removed INC into a small kept one is done the other way round (the kept
/// one committed into it, which takes its name): it writes less; killed anywhere, it
/// resumes to the same result.
#[test]
fn a_big_removed_inc_takes_in_the_small_kept_one() {
    let (policy, kept, files) = cases("d").remove(2);
    for kill in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let points = build_chain_with(&dir, &tmp.path().join("m"), &TIMES, "", "d", Some(1));
        let mut args = vec!["prune", "--dir", ".", "--utc"];
        args.extend(&policy);
        if kill {
            let kills = kill_at_every_write(
                "prune (commit direction)",
                || restore_cmd(&dir, &args),
                |_| {},
            );
            assert!(kills >= 5, "only {kills} kill points");
        } else {
            let (code, out, err) = restore(&dir, &args);
            assert_eq!(code, 0, "{out}{err}");
            assert!(err.contains("which writes less"), "{err}");
        }
        assert_eq!(backup_files(&dir), expected_files(&files));
        let kept: Vec<&(u64, String, PathBuf)> = kept.iter().map(|&i| &points[i]).collect();
        assert_points_restore(&dir, tmp.path(), &kept);
    }
}

/// Kills the command at write 1, 2, 3, … (each run on what the previous kill left) until a
/// run is not killed, which must succeed; `after_kill` inspects each state. Returns how
/// many runs were killed.
fn kill_at_every_write(
    what: &str,
    mut make: impl FnMut() -> std::process::Command,
    mut after_kill: impl FnMut(u64),
) -> u64 {
    for n in 1..10_000 {
        let (killed, code, err) = testkit::run_with_fault(make(), n, "kill");
        if !killed {
            assert_eq!(code, 0, "{what} (fault at write {n}): {err}");
            return n - 1;
        }
        after_kill(n);
    }
    panic!("{what} never finished");
}

/// A prune killed at any write: every kept point restores to its model or is refused
/// (never restores wrong); the run after it finishes with the same files as an
/// uninterrupted prune.
#[test]
fn prune_killed_anywhere_resumes_to_the_same_result() {
    for (policy, kept, files) in cases("d").into_iter().take(3) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let points = build_chain(&dir, &tmp.path().join("m"), &TIMES, "", "d");
        let mut args = vec!["prune", "--dir", ".", "--utc"];
        args.extend(&policy);
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let target = out.join("p.qcow2");
        let kills = kill_at_every_write(
            &format!("prune {policy:?}"),
            || restore_cmd(&dir, &args),
            |n| {
                for &i in &kept {
                    let (t, _, model) = &points[i];
                    let _ = std::fs::remove_file(&target);
                    let _ = std::fs::remove_file(out.join("p.qcow2.manifest"));
                    let Some(name) = backup_files(&dir)
                        .into_iter()
                        .find(|f| f.contains(&format!("-{t}-")) && !f.ends_with(".manifest"))
                    else {
                        panic!("point {t} gone after a kill at write {n}");
                    };
                    let (code, err) = merge_point(&dir, &name, &target);
                    if code == 0 {
                        same(&dir, target.to_str().unwrap(), model.to_str().unwrap());
                    } else {
                        assert!(
                            err.contains("prune"),
                            "point {t} after a kill at write {n}: {err}"
                        );
                    }
                }
            },
        );
        eprintln!("{policy:?}: {kills} kill points");
        if policy == ["--keep-daily", "3"] {
            // A full filesystem: the prune stops with a message; the next run finishes.
            let (killed, code, err) =
                testkit::run_with_fault(restore_cmd(&dir, &args), 1, "enospc");
            assert!(!killed && code == 0, "nothing left to write: {err}");
        }
        assert!(kills >= 3, "{policy:?}: only {kills} kill points");
        assert!(!dir.join(".prune-journal").exists());
        assert_eq!(backup_files(&dir), expected_files(&files), "{policy:?}");
        let kept: Vec<&(u64, String, PathBuf)> = kept.iter().map(|&i| &points[i]).collect();
        assert_points_restore(&dir, tmp.path(), &kept);
    }
}

#[test]
fn a_full_filesystem_stops_the_prune_and_the_next_run_finishes() {
    for n in [1, 2, 4] {
        let (policy, kept, files) = cases("d").remove(2);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let points = build_chain(&dir, &tmp.path().join("m"), &TIMES, "", "d");
        let mut args = vec!["prune", "--dir", ".", "--utc"];
        args.extend(&policy);
        let (killed, code, err) = testkit::run_with_fault(restore_cmd(&dir, &args), n, "enospc");
        assert!(!killed && code == 1, "ENOSPC at write {n}: {err}");
        assert!(err.contains("No space left"), "{err}");
        assert!(err.contains("--resume"), "{err}");
        refused(&dir, &["list", "--dir", "."], "interrupted prune");
        restore_ok(&dir, &["prune", "--dir", ".", "--resume"]);
        assert_eq!(backup_files(&dir), expected_files(&files));
        let kept: Vec<&(u64, String, PathBuf)> = kept.iter().map(|&i| &points[i]).collect();
        assert_points_restore(&dir, tmp.path(), &kept);
    }
}

#[test]
fn old_chains_copies_orphans_and_leftovers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("disk1");
    let m = tmp.path().join("m");
    let old = build_chain(&dir, &m, &TIMES[..2], "", "disk1");
    let t = DAY0 + 10 * D;
    let new = build_chain(&dir, &m, &[t, t + H], "", "disk1");
    // Copies: self-contained images.
    for (i, c) in [DAY0 + 3 * D, DAY0 + 11 * D].iter().enumerate() {
        let src = if i == 0 { &old[0].1 } else { &new[0].1 };
        std::fs::copy(dir.join(src), dir.join(format!("COPY-{c}-disk1"))).unwrap();
    }
    std::fs::write(dir.join(format!("INC-{}-disk1", DAY0 - D)), b"orphan").unwrap();
    std::fs::write(dir.join(format!("INC-{}-disk1.partial", t + 2 * H)), b"").unwrap();
    let plan = restore_ok(&dir, &["prune", "--dir", ".", "--keep-last", "1", "--utc"]);
    assert!(
        plan.contains("an incremental with no FULL before it"),
        "{plan}"
    );
    assert!(plan.contains("interrupted backup left"), "{plan}");
    let mut want = expected_files(&[format!("FULL-{}-disk1", t + H)]);
    want.push(format!("COPY-{}-disk1", DAY0 + 11 * D));
    want.push(format!("INC-{}-disk1", DAY0 - D));
    want.push(format!("INC-{}-disk1.partial", t + 2 * H));
    want.sort();
    assert_eq!(backup_files(&dir), want, "{plan}");
    assert!(dir
        .join(format!("INC-{}-disk1.partial", t + 2 * H))
        .exists());
    // The partial stops other commands; set aside, the kept point restores.
    std::fs::remove_file(dir.join(format!("INC-{}-disk1.partial", t + 2 * H))).unwrap();
    std::fs::remove_file(dir.join(format!("INC-{}-disk1", DAY0 - D))).unwrap();
    assert_points_restore(&dir, tmp.path(), &[&new[1]]);
}

#[test]
fn monthly_target_loses_whole_months_and_keeps_current() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("t");
    let m = tmp.path().join("m");
    let jan = DAY0;
    let feb = DAY0 + 31 * D;
    let mar = DAY0 + 60 * D;
    let mut points = Vec::new();
    for (month, t0) in [("2024-01", jan), ("2024-02", feb), ("2024-03", mar)] {
        std::fs::create_dir_all(target.join(month)).unwrap();
        std::fs::write(target.join(month).join("uuid"), b"u\n").unwrap();
        for disk in ["vda", "vdb"] {
            let d = target.join(month).join(disk);
            points.push((
                disk,
                d.clone(),
                build_chain(&d, &m.join(month), &[t0, t0 + D, t0 + 2 * D], "", disk),
            ));
            std::fs::write(d.join(format!("{disk}.config")), b"{}").unwrap();
        }
    }
    std::os::unix::fs::symlink("2024-03", target.join("current")).unwrap();
    let plan = restore_ok(
        &target,
        &["prune", "--dir", ".", "--keep-monthly", "2", "--utc"],
    );
    assert!(!target.join("2024-01").exists(), "{plan}");
    assert_eq!(
        std::fs::read_link(target.join("current")).unwrap(),
        Path::new("2024-03")
    );
    // Each disk keeps the newest point of February and of March.
    for (_, d, chain) in &points {
        if d.starts_with(target.join("2024-01")) {
            continue;
        }
        assert_eq!(backup_files(d).len(), 2, "{}: {plan}", d.display());
        assert_points_restore(d, tmp.path(), &[&chain[2]]);
    }
}

#[test]
fn untimestamped_and_snapshotted_directories_are_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("disk1");
    let m = tmp.path().join("m");
    build_chain(&dir, &m, &TIMES[..3], "", "disk1");
    restore_ok(&dir, &["snapshotrebase", "--dir", "."]);
    let before = digest(&dir);
    let plan = restore_ok(&dir, &["prune", "--dir", ".", "--keep-last", "1"]);
    assert!(plan.contains("internal snapshots"), "{plan}");
    assert_eq!(digest(&dir), before);

    let dir = tmp.path().join("disk2");
    build_chain(&dir, &m, &TIMES[..1], "", "disk2");
    std::fs::rename(
        dir.join(format!("FULL-{DAY0}-disk2")),
        dir.join("FULL-disk2"),
    )
    .unwrap();
    std::fs::remove_file(dir.join(format!("FULL-{DAY0}-disk2.manifest"))).unwrap();
    let (code, out, err) = restore(&dir, &["prune", "--dir", ".", "--keep-last", "1"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("--no-timestamp"), "{out}");
}

#[test]
fn prune_waits_for_no_one() {
    use qmpbackup::fsutil::Dir;
    use qmpbackup::store::lock::{DirLock, LockMode};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    build_chain(&dir, &tmp.path().join("m"), &TIMES[..2], "", "d");
    let before = digest(&dir);
    for mode in [LockMode::Shared, LockMode::Append] {
        let held = DirLock::acquire(&Dir::open(&dir).unwrap(), mode).unwrap();
        let err = refused(
            &dir,
            &["prune", "--dir", ".", "--keep-last", "1"],
            "nothing was changed",
        );
        assert!(
            err.contains(&format!("(pid {})", std::process::id())),
            "{err}"
        );
        assert_eq!(digest(&dir), before);
        drop(held);
    }
    // A dry run only reads: it goes on beside readers.
    let held = DirLock::acquire(&Dir::open(&dir).unwrap(), LockMode::Shared).unwrap();
    restore_ok(
        &dir,
        &["prune", "--dir", ".", "--keep-last", "1", "--dry-run"],
    );
    drop(held);
    restore_ok(&dir, &["prune", "--dir", ".", "--keep-last", "1"]);
    assert_eq!(backup_files(&dir).len(), 2);
}
