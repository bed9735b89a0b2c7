//! `qmprestore merge` to where disks live: new sparse raw files, block devices (loop
//! devices over files full of 0xFF) and existing files written in place, qcow2 on a device,
//! a raw stream on standard output, and a whole VM in one command. Every result is compared
//! with the raw model of its point; qmprestore runs with PATH=/nonexistent.

mod common;

use common::*;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A loop device over a file of `size` bytes of 0xFF, detached on drop; None (with a
/// message) where loop devices cannot be used.
struct Loop {
    dev: String,
    _backing: PathBuf,
}

impl Loop {
    fn new(dir: &Path, name: &str, size: usize) -> Option<Loop> {
        let backing = dir.join(name);
        std::fs::write(&backing, vec![0xFF; size]).unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "SKIPPED: loop devices are not available here: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Some(Loop {
            dev,
            _backing: backing,
        })
    }

    fn read(&self) -> Vec<u8> {
        std::fs::read(&self.dev).unwrap()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// A process started by a test, killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn model(b: &BackupDir, i: usize) -> Vec<u8> {
    std::fs::read(b.root.join(&b.points[i].1)).unwrap()
}

fn until(b: &BackupDir, i: usize) -> String {
    b.points[i].0.clone()
}

/// Bytes of 4 KiB blocks of `m` that are not all zero.
fn data_size(m: &[u8]) -> u64 {
    m.chunks(4096).filter(|c| c.iter().any(|&x| x != 0)).count() as u64 * 4096
}

#[test]
fn raw_files_equal_every_point_with_holes_and_are_never_overwritten() {
    let b = backup_dir();
    let d = &b.root;
    let before = digest(d);
    let out = b._tmp.path().join("out");
    for i in 0..b.points.len() {
        let t = out.join(format!("p{i}.raw"));
        restore_ok(
            d,
            &[
                "merge",
                "--dir",
                ".",
                "--until",
                &until(&b, i),
                "--format",
                "raw",
                "--targetfile",
                t.to_str().unwrap(),
            ],
        );
        let m = model(&b, i);
        assert!(std::fs::read(&t).unwrap() == m, "point {i} differs");
        let allocated = std::fs::metadata(&t).unwrap().blocks() * 512;
        let data = data_size(&m);
        assert!(
            allocated >= data && allocated <= data + 256 * 1024,
            "point {i}: {allocated} bytes allocated for {data} of data: zeros were written"
        );
        assert!(manifest_of(&t).exists());
    }
    // Never overwritten, not even the same point again.
    let t = out.join("p0.raw");
    let held = std::fs::read(&t).unwrap();
    let args = [
        "merge",
        "--dir",
        ".",
        "--format",
        "raw",
        "--targetfile",
        t.to_str().unwrap(),
    ];
    refused(d, &args, "--in-place writes over it");
    assert!(std::fs::read(&t).unwrap() == held);
    // Killed anywhere: no target, no temporary left once a run completes.
    let t = out.join("killed.raw");
    let ts = t.to_str().unwrap();
    let args = ["merge", "--dir", ".", "--format", "raw", "--targetfile", ts];
    testkit::kill_until_done(
        "raw merge",
        || restore_cmd(d, &args),
        |n| {
            assert!(
                !t.exists(),
                "a target appeared from a merge killed at write {n}"
            )
        },
    );
    assert!(std::fs::read(&t).unwrap() == model(&b, b.points.len() - 1));
    let leftovers: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(digest(d), before, "merge must not touch the backup files");
}

fn manifest_of(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".manifest");
    PathBuf::from(s)
}

fn in_place_args<'a>(target: &'a str, point: &'a str, format: &'a str) -> Vec<&'a str> {
    vec![
        "merge",
        "--dir",
        ".",
        "--until",
        point,
        "--format",
        format,
        "--targetfile",
        target,
        "--in-place",
    ]
}

#[test]
fn a_block_device_ends_equal_to_every_point_and_unsafe_devices_are_refused() {
    let b = backup_dir();
    let d = &b.root;
    let work = b._tmp.path();
    let size = 10 * MIB;
    let Some(dev) = Loop::new(work, "dev.img", size + MIB) else {
        return;
    };
    // Newest first, then older points over it: every range that reads as zero is zeroed.
    for i in (0..b.points.len()).rev() {
        let p = until(&b, i);
        restore_ok(d, &in_place_args(&dev.dev, &p, "raw"));
        let got = dev.read();
        let m = model(&b, i);
        assert!(got[..m.len()] == m[..], "device differs from point {i}");
        assert!(
            got[size..].iter().all(|&x| x == 0xFF),
            "past the disk's end the device was written"
        );
    }
    let newest = until(&b, b.points.len() - 1);
    // Without --in-place: refused, and says how.
    refused(
        d,
        &[
            "merge",
            "--dir",
            ".",
            "--format",
            "raw",
            "--targetfile",
            &dev.dev,
        ],
        "pass --in-place",
    );
    // Too small.
    let small = Loop::new(work, "small.img", 4 * MIB).unwrap();
    refused(
        d,
        &in_place_args(&small.dev, &newest, "raw"),
        "is too small",
    );
    assert!(small.read().iter().all(|&x| x == 0xFF));
    // Held with O_EXCL by another process (here: this one).
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&dev.dev)
        .unwrap();
    refused(
        d,
        &in_place_args(&dev.dev, &newest, "raw"),
        "opened exclusively",
    );
    drop(holder);
    // Open in a QEMU (qemu-nbd: QEMU does not use O_EXCL, but holds its lock bytes).
    let sock = work.join("nbd.sock");
    let nbd = Child(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "-k"])
            .arg(&sock)
            .arg(&dev.dev)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    refused(
        d,
        &in_place_args(&dev.dev, &newest, "raw"),
        "in use by a QEMU process",
    );
    drop(nbd);
    // Interrupted anywhere and run again: equals the point.
    std::fs::write(&dev._backing, vec![0xFF; size + MIB]).unwrap();
    let oldest = until(&b, 0);
    let args = in_place_args(&dev.dev, &oldest, "raw");
    let kills = testkit::kill_until_done("in-place merge", || restore_cmd(d, &args), |_| {});
    assert!(kills >= 3, "only {kills} kill points");
    let m = model(&b, 0);
    assert!(dev.read()[..m.len()] == m[..]);
}

#[test]
fn an_existing_raw_file_is_restored_in_place_resized_and_flushed() {
    let b = backup_dir();
    let d = &b.root;
    let t = b._tmp.path().join("vm-disk.raw");
    std::fs::write(&t, vec![0xFF; 12 * MIB]).unwrap();
    let ts = t.to_str().unwrap();
    for i in [1, 3, 0] {
        let p = until(&b, i);
        restore_ok(d, &in_place_args(ts, &p, "raw"));
        assert!(std::fs::read(&t).unwrap() == model(&b, i), "point {i}");
    }
    // A backup file itself is never a target.
    let full = d.join(&b.points[0].0);
    refused(
        d,
        &in_place_args(full.to_str().unwrap(), &until(&b, 1), "raw"),
        "is the backup file",
    );
}

#[test]
fn qcow2_on_a_block_device_checks_clean_and_compares_equal() {
    let b = backup_dir();
    let d = &b.root;
    let work = b._tmp.path();
    let Some(dev) = Loop::new(work, "lv.img", 16 * MIB) else {
        return;
    };
    let newest = b.points.len() - 1;
    let manifest = work.join("lv.manifest");
    let mut args = in_place_args(&dev.dev, &b.points[newest].0, "qcow2");
    args.extend(["--manifest", manifest.to_str().unwrap()]);
    restore_ok(d, &args);
    assert!(manifest.exists());
    let (c, o, e) =
        testkit::oracle::run_tool("qemu-img", &["check", "-f", "qcow2", &dev.dev], None);
    assert_eq!(c, 0, "{o}{e}");
    let m = d.join(&b.points[newest].1);
    let (c, o, e) = testkit::oracle::run_tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            &dev.dev,
            m.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(c, 0, "{o}{e}");
    let tiny = Loop::new(work, "tiny.img", MIB).unwrap();
    refused(
        d,
        &in_place_args(&tiny.dev, &b.points[newest].0, "qcow2"),
        "is too small",
    );
}

#[test]
fn a_raw_stream_carries_the_point_and_a_closed_pipe_is_a_clear_error() {
    let b = backup_dir();
    let d = &b.root;
    let before = digest(d);
    for i in [0, 3] {
        let out = restore_cmd(
            d,
            &[
                "merge",
                "--dir",
                ".",
                "--until",
                &until(&b, i),
                "--format",
                "raw",
                "--targetfile",
                "-",
                "--json",
            ],
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == model(&b, i), "stream of point {i} differs");
        // --json went to stderr: stdout carries the stream.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("\"event\":\"summary\""), "{err}");
    }
    // The reader goes away after 1 MiB (as `| head -c 1M` does).
    let mut child = restore_cmd(
        d,
        &[
            "merge",
            "--dir",
            ".",
            "--format",
            "raw",
            "--targetfile",
            "-",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut head = vec![0u8; MIB];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("the reader closed the stream"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        digest(d),
        before,
        "nothing may be left in the backup directory"
    );
    let m = model(&b, 3);
    assert!(head[..] == m[..MIB]);
    // qcow2 cannot be streamed.
    refused(
        d,
        &["merge", "--dir", ".", "--targetfile", "-"],
        "--format raw",
    );
}

/// Three disks backed up by the same runs (same times): restored in one command.
#[test]
fn a_whole_vm_is_restored_at_one_point_in_time() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("vm1");
    let disks = ["disk0.qcow2", "disk1.qcow2", "sdc.img"];
    for disk in disks {
        let root = target.join(disk);
        std::fs::create_dir_all(&root).unwrap();
        for (f, _) in build(&root, 1000, disk) {
            qmpbackup::store::manifest::write_manifest(&root.join(f), Some("uuid-1")).unwrap();
        }
    }
    // One more run that missed sdc.img: the newest run covering every disk is still 1300.
    for disk in &disks[..2] {
        let root = target.join(disk);
        let name = format!("INC-1400-{disk}");
        testkit::oracle::qemu_img(&root, &["create", "-q", "-f", "qcow2", &name, "10M"]);
        testkit::oracle::qemu_io(&root, &name, &["write -P 0x99 0 64k"]);
        qmpbackup::store::manifest::write_manifest(&root.join(name), Some("uuid-1")).unwrap();
    }
    let out = tmp.path().join("out");
    let outs = out.to_str().unwrap();
    let ts = target.to_str().unwrap();
    let o = restore_ok(
        tmp.path(),
        &["merge", "--vm-dir", ts, "--targetdir", outs, "--json"],
    );
    assert_eq!(
        o.lines().filter(|l| l.contains("\"summary\"")).count(),
        3,
        "{o}"
    );
    for disk in disks {
        let m = std::fs::read(target.join(disk).join("model-1000-3.raw")).unwrap();
        assert!(std::fs::read(out.join(disk)).is_ok());
        let (c, so, se) = testkit::oracle::run_tool(
            "qemu-img",
            &[
                "compare",
                "-F",
                "raw",
                out.join(disk).to_str().unwrap(),
                target.join(disk).join("model-1000-3.raw").to_str().unwrap(),
            ],
            None,
        );
        assert_eq!(c, 0, "{disk}: {so}{se}");
        assert!(!m.is_empty());
    }
    // At a time between runs, raw: each disk at its newest point not after it.
    let raw_out = tmp.path().join("raw");
    restore_ok(
        tmp.path(),
        &[
            "merge",
            "--vm-dir",
            ts,
            "--targetdir",
            raw_out.to_str().unwrap(),
            "--until",
            "1970-01-01T00:19:10Z",
            "--format",
            "raw",
        ],
    );
    for (disk, name) in disks
        .iter()
        .zip(["disk0.qcow2.raw", "disk1.qcow2.raw", "sdc.img"])
    {
        let m = std::fs::read(target.join(disk).join("model-1000-1.raw")).unwrap();
        assert!(std::fs::read(raw_out.join(name)).unwrap() == m, "{disk}");
    }
    // Before the first backup: every disk named.
    let err = refused(
        tmp.path(),
        &[
            "merge",
            "--vm-dir",
            ts,
            "--targetdir",
            "x",
            "--until",
            "999",
        ],
        "no backup of",
    );
    for disk in disks {
        assert!(err.contains(disk), "{err}");
    }
    // Nothing overwritten: the first restore's files are there.
    refused(
        tmp.path(),
        &["merge", "--vm-dir", ts, "--targetdir", outs],
        "target exists",
    );
    let _ = File::open(out.join(disks[0])).unwrap();
}
