//! qmpbackup against a hostile or broken QMP peer (a scripted fake QEMU from `testkit`):
//! names that try to leave the target, disks whose files share a base name, an endless
//! line, replies that are not JSON, absurd sizes, jobs that never end or never move, and
//! signals while QEMU does not answer. No QEMU is needed.

use serde_json::{json, Value};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testkit::fake_qmp::{FakeDisk, FakeQemu, Jobs, Reply};

fn qmpbackup_cmd(sock: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qmpbackup"));
    c.arg("--socket").arg(sock).args(args);
    c
}

fn run(sock: &str, args: &[&str]) -> (i32, String) {
    let out = qmpbackup_cmd(sock, args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every file and directory below `root`, relative to it.
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A hook that records the file names of the nodes qmpbackup attaches.
fn record_files(files: Arc<Mutex<Vec<String>>>) -> impl FnMut(&str, &Value) -> Reply + Send {
    move |cmd, args| {
        if cmd == "blockdev-add" {
            if let Some(f) = args["file"]["filename"].as_str() {
                files.lock().unwrap().push(f.to_string());
            }
        }
        Reply::Default
    }
}

#[test]
fn names_from_qemu_never_leave_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("a/b/c/d");
    std::fs::create_dir_all(&base).unwrap();
    let target = base.join("target");
    let fleece = base.join("fleece");
    let abs = tmp.path().join("ABS");
    let disks = vec![
        // No base name: the node name is all there is.
        FakeDisk {
            qdev: None,
            ..FakeDisk::qcow2("x", "../../../../B", "")
        },
        FakeDisk {
            qdev: None,
            ..FakeDisk::qcow2("x", abs.to_str().unwrap(), "/")
        },
        FakeDisk {
            device: "drive/../../C".into(),
            qdev: Some("/machine/peripheral/../../../D".into()),
            ..FakeDisk::qcow2("x", "#block1", "/x/y/..")
        },
        FakeDisk::qcow2("v3", "n3", "/images/a\u{0}b/../we ird\u{1}.qcow2"),
        FakeDisk::qcow2("v4", "n4", "/images/..."),
    ];
    let files = Arc::new(Mutex::new(Vec::new()));
    let fake = FakeQemu::start(
        &tmp.path().join("qmp.sock"),
        disks,
        Jobs::Complete,
        record_files(files.clone()),
    );
    let (c, e) = run(
        &fake.socket(),
        &[
            "backup",
            "-l",
            "full",
            "-t",
            target.to_str().unwrap(),
            "--fleece-dir",
            fleece.to_str().unwrap(),
        ],
    );
    assert_eq!(c, 0, "{e}");
    // Nothing outside the target and the fleece directory.
    let all = tree(tmp.path());
    for p in &all {
        assert!(
            p == "qmp.sock"
                || p == "a"
                || p == "a/b"
                || p == "a/b/c"
                || p == "a/b/c/d"
                || p.starts_with("a/b/c/d/target")
                || p.starts_with("a/b/c/d/fleece"),
            "{p} is outside the target: {all:?}"
        );
    }
    assert!(!abs.exists() && !tmp.path().join("B").exists());
    let mut dirs: Vec<String> = std::fs::read_dir(&target)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    dirs.sort();
    let abs_name: String = abs
        .to_str()
        .unwrap()
        .bytes()
        .map(|b| if b == b'/' { '_' } else { b as char })
        .collect();
    let mut expected = vec![
        ".._.._.._.._B".to_string(),
        abs_name,
        "drive_.._.._C".to_string(),
        "we_ird_.qcow2".to_string(),
        "v4".to_string(),
    ];
    expected.sort();
    assert_eq!(dirs, expected);
    for d in &dirs {
        let names: Vec<String> = std::fs::read_dir(target.join(d))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        assert!(
            names
                .iter()
                .any(|n| n.starts_with("FULL-") && n.ends_with(d.as_str())),
            "{d}: {names:?}"
        );
    }
    // Every file given to QEMU lies in the target or the fleece directory.
    for f in files.lock().unwrap().iter() {
        let p = Path::new(f);
        assert!(
            !f.contains("/../")
                && (p.starts_with(&target) || p.starts_with(&fleece))
                && p.parent().unwrap().parent().unwrap().starts_with(&base),
            "{f}"
        );
    }
}

#[test]
fn disks_sharing_a_base_name_get_stable_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("t");
    let disks = vec![
        FakeDisk::qcow2("virtio0", "#block1", "/a/disk.qcow2"),
        FakeDisk {
            device: "drive1".into(),
            qdev: Some("/machine/peripheral-anon/device[2]/virtio-backend".into()),
            ..FakeDisk::qcow2("x", "#block2", "/b/disk.qcow2")
        },
        FakeDisk::qcow2("virtio2", "#block3", "/c/unique.qcow2"),
    ];
    let fake = FakeQemu::start(
        &tmp.path().join("qmp.sock"),
        disks,
        Jobs::Complete,
        |_, _| Reply::Default,
    );
    let t = target.to_str().unwrap();
    let (c, e) = run(&fake.socket(), &["backup", "-l", "full", "-t", t]);
    assert_eq!(c, 0, "{e}");
    std::thread::sleep(Duration::from_millis(1100));
    let (c, e) = run(&fake.socket(), &["backup", "-l", "auto", "-t", t]);
    assert_eq!(c, 0, "{e}");
    for d in ["disk-virtio0.qcow2", "disk-drive1.qcow2", "unique.qcow2"] {
        let names: Vec<String> = std::fs::read_dir(target.join(d))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .filter(|n| !n.starts_with('.') && !n.ends_with(".manifest") && !n.ends_with(".config"))
            .collect();
        assert_eq!(names.len(), 2, "{d}: {names:?}");
        assert!(names
            .iter()
            .any(|n| n.starts_with("FULL-") && n.ends_with(d)));
        assert!(names
            .iter()
            .any(|n| n.starts_with("INC-") && n.ends_with(d)));
    }
    // With --no-subdir the file names carry the suffix, and each disk's chain is its own.
    let flat = tmp.path().join("flat");
    let f = flat.to_str().unwrap();
    let (c, e) = run(
        &fake.socket(),
        &["backup", "-l", "full", "-t", f, "--no-subdir"],
    );
    assert_eq!(c, 0, "{e}");
    std::thread::sleep(Duration::from_millis(1100));
    let (c, e) = run(
        &fake.socket(),
        &["backup", "-l", "auto", "-t", f, "--no-subdir"],
    );
    assert_eq!(c, 0, "{e}");
    assert!(!e.contains("full backup ("), "auto took a full: {e}");
    let names = tree(&flat);
    for d in ["disk-virtio0.qcow2", "disk-drive1.qcow2", "unique.qcow2"] {
        for level in ["FULL-", "INC-"] {
            assert_eq!(
                names
                    .iter()
                    .filter(|n| n.starts_with(level) && n.ends_with(d))
                    .count(),
                1,
                "{level}{d}: {names:?}"
            );
        }
    }
}

/// Runs qmpbackup against `fake` and expects a failure within `limit`, under a 2 GiB
/// address-space limit: returns stderr.
fn fails_quickly(fake: &FakeQemu, args: &[&str], limit: Duration) -> String {
    let start = Instant::now();
    let (code, err) = testkit::run_limited(qmpbackup_cmd(&fake.socket(), args), "qmpbackup", || {});
    assert_eq!(code, 1, "{err}");
    assert!(start.elapsed() < limit, "took {:?}: {err}", start.elapsed());
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn an_endless_line_is_refused_with_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("t");
    let fake = FakeQemu::start(
        &tmp.path().join("qmp.sock"),
        vec![FakeDisk::qcow2("v0", "n0", "/d.qcow2")],
        Jobs::Complete,
        |cmd, _| {
            if cmd == "query-block" {
                Reply::Endless(3 << 30)
            } else {
                Reply::Default
            }
        },
    );
    let e = fails_quickly(
        &fake,
        &["backup", "-l", "full", "-t", t.to_str().unwrap()],
        Duration::from_secs(20),
    );
    assert!(e.contains("without a line end"), "{e}");
    assert!(!t.exists() || tree(&t).iter().all(|n| !n.contains("FULL-")));
}

#[test]
fn an_endless_line_from_the_guest_agent_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let agent_path = tmp.path().join("qga.sock");
    let listener = UnixListener::bind(&agent_path).unwrap();
    let agent = std::thread::spawn(move || {
        use std::io::Write;
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.write_all(&[0xff]);
            let chunk = vec![b'y'; 1 << 20];
            for _ in 0..200 {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
        }
    });
    let fake = FakeQemu::start(
        &tmp.path().join("qmp.sock"),
        vec![FakeDisk::qcow2("v0", "n0", "/d.qcow2")],
        Jobs::Complete,
        |_, _| Reply::Default,
    );
    let t = tmp.path().join("t");
    let e = fails_quickly(
        &fake,
        &[
            "--agent-socket",
            agent_path.to_str().unwrap(),
            "backup",
            "-l",
            "full",
            // Required: with plain --quiesce the run would warn and go on unquiesced.
            "--quiesce-required",
            "-t",
            t.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert!(e.contains("without a line end"), "{e}");
    agent.join().unwrap();
}

#[test]
fn a_reply_that_is_not_json_is_a_clear_error_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("t");
    for bad in [
        &b"this is not json\r\n"[..],
        b"[1,2,3]\n",
        b"{\"return\": {}\n",
    ] {
        let sock = tmp.path().join("qmp.sock");
        let fake = FakeQemu::start(
            &sock,
            vec![FakeDisk::qcow2("v0", "n0", "/d.qcow2")],
            Jobs::Complete,
            move |cmd, _| {
                if cmd == "query-status" {
                    Reply::Raw(bad.to_vec())
                } else {
                    Reply::Default
                }
            },
        );
        let e = fails_quickly(
            &fake,
            &["backup", "-l", "full", "-t", t.to_str().unwrap()],
            Duration::from_secs(10),
        );
        assert!(e.contains("not a QMP message"), "{e}");
    }
}

#[test]
fn absurd_sizes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("t");
    for (size, cluster, says) in [
        (json!(u64::MAX), json!(65536), "more than any disk can have"),
        (
            json!(1u64 << 63),
            json!(65536),
            "more than any disk can have",
        ),
        (json!(-1), json!(65536), "unexpected reply"),
        (json!(1.5), json!(65536), "unexpected reply"),
        (json!("1M"), json!(65536), "unexpected reply"),
        (json!(1 << 20), json!(3), "cluster size of 3"),
        (json!(1 << 20), json!(1u64 << 40), "cluster size of"),
        // Possible for QEMU, too large for any qcow2 target.
        (json!(1u64 << 62), json!(512), "too large"),
    ] {
        let sock = tmp.path().join("qmp.sock");
        let disk = FakeDisk {
            virtual_size: size.clone(),
            cluster_size: cluster,
            ..FakeDisk::qcow2("v0", "n0", "/d.qcow2")
        };
        let fake = FakeQemu::start(&sock, vec![disk], Jobs::Complete, |_, _| Reply::Default);
        let e = fails_quickly(
            &fake,
            &["backup", "-l", "full", "-t", t.to_str().unwrap()],
            Duration::from_secs(10),
        );
        assert!(e.contains(says), "{size}: {e}");
        assert!(
            !t.exists() || tree(&t).iter().all(|n| !n.contains("FULL-")),
            "{size}: {:?}",
            tree(&t)
        );
        assert!(!fake.received("transaction"), "{size}: a job was started");
    }
}

struct Running {
    child: Child,
    stderr: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn start(fake: &FakeQemu, dir: &Path, extra: &[&str]) -> Running {
        let stderr = dir.join("stderr.log");
        let t = dir.join("t");
        let mut args = vec!["backup", "-l", "full", "-t", t.to_str().unwrap()];
        args.extend_from_slice(extra);
        let child = qmpbackup_cmd(&fake.socket(), &args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Running { child, stderr }
    }

    fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the exit (at most `limit`): (exit code, stderr, time taken).
    fn wait(&mut self, limit: Duration) -> (i32, String, Duration) {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let err = std::fs::read_to_string(&self.stderr).unwrap();
                return (st.code().unwrap_or(-1), err, start.elapsed());
            }
            assert!(
                start.elapsed() < limit,
                "still running after {limit:?}: {}",
                std::fs::read_to_string(&self.stderr).unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits (at most 20 s) until the fake's state satisfies `started`, then a little longer:
/// the bitmap cut is a transaction too, and the one that starts the jobs follows it.
fn wait_for(fake: &FakeQemu, started: impl Fn(&testkit::fake_qmp::State) -> bool) {
    let start = Instant::now();
    while !started(&fake.state.lock().unwrap()) {
        assert!(start.elapsed() < Duration::from_secs(20), "no job started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
}

fn wait_for_jobs(fake: &FakeQemu) {
    wait_for(fake, |st| !st.jobs.is_empty());
}

/// A run stopped by a signal: it must fail within `within`, saying what it left in QEMU
/// and how to remove it. Returns its stderr.
fn assert_left_within(r: &mut Running, within: Duration) -> String {
    let (code, err, took) = r.wait(Duration::from_secs(30));
    assert_ne!(code, 0, "{err}");
    assert!(took < within, "{took:?}: {err}");
    assert!(
        err.contains("left in QEMU") && err.contains("qmpbackup cleanup"),
        "{err}"
    );
    err
}

fn stuck_fake(dir: &Path, jobs: Jobs) -> FakeQemu {
    FakeQemu::start(
        &dir.join("qmp.sock"),
        vec![FakeDisk::qcow2("v0", "n0", "/d.qcow2")],
        jobs,
        |_, _| Reply::Default,
    )
}

#[test]
fn sigterm_with_a_job_that_never_ends_leaves_within_the_cancel_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = stuck_fake(tmp.path(), Jobs::Stuck);
    let mut r = Running::start(&fake, tmp.path(), &["--cancel-timeout", "2"]);
    wait_for_jobs(&fake);
    r.signal(libc::SIGTERM);
    let err = assert_left_within(&mut r, Duration::from_secs(10));
    assert!(err.contains("block job qmpb-0"), "{err}");
    // The run's files are gone; nothing else was written to the target.
    let t = tmp.path().join("t");
    assert!(
        tree(&t)
            .iter()
            .all(|n| !n.contains("FULL-") && !n.contains("fleece")),
        "{:?}",
        tree(&t)
    );
}

#[test]
fn a_second_signal_leaves_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = stuck_fake(tmp.path(), Jobs::Stuck);
    let mut r = Running::start(&fake, tmp.path(), &["--cancel-timeout", "600"]);
    wait_for_jobs(&fake);
    r.signal(libc::SIGINT);
    std::thread::sleep(Duration::from_millis(500));
    r.signal(libc::SIGINT);
    assert_left_within(&mut r, Duration::from_secs(5));
}

#[test]
fn sigterm_while_qemu_answers_nothing_leaves_within_the_cancel_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = stuck_fake(tmp.path(), Jobs::SilentAfterStart);
    let mut r = Running::start(&fake, tmp.path(), &["--cancel-timeout", "2"]);
    wait_for(&fake, |st| st.silent);
    r.signal(libc::SIGTERM);
    assert_left_within(&mut r, Duration::from_secs(10));
}

#[test]
fn a_job_without_progress_is_cancelled_after_the_stall_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = stuck_fake(tmp.path(), Jobs::StuckButCancellable);
    let mut r = Running::start(&fake, tmp.path(), &["--stall-timeout", "2"]);
    let (code, err, took) = r.wait(Duration::from_secs(30));
    assert_eq!(code, 1, "{err}");
    assert!(took < Duration::from_secs(15), "{took:?}: {err}");
    assert!(err.contains("no progress for 2 s"), "{err}");
    // Cancelled cleanly: nothing left in QEMU.
    assert!(!err.contains("left in QEMU"), "{err}");
    assert!(fake.state.lock().unwrap().jobs.is_empty());
    assert!(fake.state.lock().unwrap().nodes.is_empty());
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn planted_symlinks_in_the_target_are_never_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let intact = || assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // A real source image, so that the disk's .config is written too.
    let source = tmp.path().join("d.qcow2");
    qcow2::create::create_qcow2(
        &source,
        &qcow2::create::CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let fake = FakeQemu::start(
        &tmp.path().join("qmp.sock"),
        vec![FakeDisk::qcow2("v0", "n0", source.to_str().unwrap())],
        Jobs::Complete,
        |_, _| Reply::Default,
    );
    let plant = |at: PathBuf| std::os::unix::fs::symlink(&victim, at).unwrap();
    // Side files: the uuid and config temporaries, the config itself, the manifest's
    // temporary for every second the run may take.
    let t = tmp.path().join("t");
    let disk = t.join("d.qcow2");
    std::fs::create_dir_all(&disk).unwrap();
    plant(t.join("uuid.tmp"));
    plant(disk.join("d.qcow2.config.tmp"));
    plant(disk.join("d.qcow2.config"));
    let start = now();
    for ts in start..start + 30 {
        plant(disk.join(format!("FULL-{ts}-d.qcow2.manifest.tmp")));
    }
    let (c, e) = run(
        &fake.socket(),
        &["backup", "-l", "full", "-t", t.to_str().unwrap()],
    );
    assert_eq!(c, 0, "{e}");
    intact();
    for f in [t.join("uuid"), disk.join("d.qcow2.config")] {
        assert!(
            f.symlink_metadata().unwrap().file_type().is_file(),
            "{}",
            f.display()
        );
    }
    // The uuid file itself a symlink: refused, not read through.
    std::fs::remove_file(t.join("uuid")).unwrap();
    plant(t.join("uuid"));
    let (c, e) = run(
        &fake.socket(),
        &["backup", "-l", "auto", "-t", t.to_str().unwrap()],
    );
    assert_eq!(c, 1, "{e}");
    assert!(e.contains("symlink"), "{e}");
    intact();
    // The fleece image's name taken by a symlink: the run stops, nothing written through.
    let t2 = tmp.path().join("t2");
    let disk2 = t2.join("d.qcow2");
    std::fs::create_dir_all(&disk2).unwrap();
    let start = now();
    for ts in start..start + 30 {
        plant(disk2.join(format!(".d.qcow2.fleece-{ts}.qcow2")));
    }
    let before = fake.state.lock().unwrap().commands.len();
    let (c, e) = run(
        &fake.socket(),
        &["backup", "-l", "full", "-t", t2.to_str().unwrap()],
    );
    assert_eq!(c, 1, "{e}");
    assert!(e.contains("cannot create the target image"), "{e}");
    intact();
    assert!(!fake.state.lock().unwrap().commands[before..]
        .iter()
        .any(|c| c == "blockdev-add"));
    // A symlink in place of the disk's directory, or of the month's: refused.
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let t3 = tmp.path().join("t3");
    std::fs::create_dir(&t3).unwrap();
    std::os::unix::fs::symlink(&elsewhere, t3.join("d.qcow2")).unwrap();
    let (c, e) = run(
        &fake.socket(),
        &["backup", "-l", "full", "-t", t3.to_str().unwrap()],
    );
    assert_eq!(c, 1, "{e}");
    assert!(e.contains("is not a directory"), "{e}");
    let t4 = tmp.path().join("t4");
    std::fs::create_dir(&t4).unwrap();
    let (y, m) = {
        let days = (now() / 86400) as i64;
        // civil from days (UTC), as the month directory is named
        let z = days + 719468;
        let era = z.div_euclid(146097);
        let doe = z - era * 146097;
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        (yoe + era * 400 + i64::from(m <= 2), m)
    };
    std::os::unix::fs::symlink(&elsewhere, t4.join(format!("{y:04}-{m:02}"))).unwrap();
    plant(t4.join("current"));
    let (c, e) = run(
        &fake.socket(),
        &[
            "backup",
            "-l",
            "full",
            "-t",
            t4.to_str().unwrap(),
            "--monthly",
        ],
    );
    assert_eq!(c, 1, "{e}");
    assert!(e.contains("is not a directory"), "{e}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    intact();
    // `current` a symlink to a file: replaced as a link, the file untouched.
    std::fs::remove_file(t4.join(format!("{y:04}-{m:02}"))).unwrap();
    let (c, e) = run(
        &fake.socket(),
        &[
            "backup",
            "-l",
            "full",
            "-t",
            t4.to_str().unwrap(),
            "--monthly",
        ],
    );
    assert_eq!(c, 0, "{e}");
    assert_eq!(
        std::fs::read_link(t4.join("current")).unwrap(),
        Path::new(&format!("{y:04}-{m:02}"))
    );
    intact();
}
