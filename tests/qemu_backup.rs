//! qmpbackup against a real QEMU (the binary from $QEMU_SYSTEM, default
//! qemu-system-x86_64; CI runs this suite once with QEMU 10.0 and once with 7.2). The VM
//! runs under TCG in prelaunch (-S) with no guest OS; "guest writes" go through the devices
//! with HMP `qemu-io -d <qdev>` on a second QMP monitor, exercising copy-before-write. Every
//! backup is restored with `qmprestore merge` and compared with a model of the disk at
//! backup time.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn qemu_binary() -> String {
    std::env::var("QEMU_SYSTEM").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A blocking QMP client for the test's own monitor.
struct Monitor {
    r: BufReader<UnixStream>,
    w: UnixStream,
    id: u64,
}

impl Monitor {
    fn connect(path: &Path) -> Monitor {
        let deadline = Instant::now() + Duration::from_secs(10);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("monitor {}: {e}", path.display()),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut m = Monitor {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            id: 0,
        };
        let mut greeting = String::new();
        m.r.read_line(&mut greeting).unwrap();
        m.cmd("qmp_capabilities", json!({}));
        m
    }

    fn try_cmd(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        self.id += 1;
        let msg = json!({"execute": cmd, "arguments": args, "id": self.id});
        writeln!(self.w, "{msg}").unwrap();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).unwrap_or(0) == 0 {
                return Err("disconnected".into());
            }
            let v: Value = serde_json::from_str(line.trim()).unwrap();
            if v["id"] == json!(self.id) {
                if let Some(r) = v.get("return") {
                    return Ok(r.clone());
                }
                return Err(v["error"]["desc"].as_str().unwrap_or("").to_string());
            }
        }
    }

    fn cmd(&mut self, cmd: &str, args: Value) -> Value {
        self.try_cmd(cmd, args.clone())
            .unwrap_or_else(|e| panic!("{cmd} {args}: {e}"))
    }

    fn hmp(&mut self, line: &str) -> String {
        self.cmd("human-monitor-command", json!({"command-line": line}))
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

#[derive(Clone)]
struct DiskSpec {
    /// qemu-io -d target
    qdev: String,
    file: String,
}

struct Vm {
    dir: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
    disks: Vec<DiskSpec>,
    /// One model per disk: its guest content as the test knows it.
    models: Vec<Vec<u8>>,
    mon: Option<Arc<Mutex<Monitor>>>,
    /// Where QEMU's stdout goes (HMP qemu-io prints there in QEMU 10); None: nowhere.
    stdout: Option<PathBuf>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Vm {
    fn sock(&self) -> String {
        self.dir.join("qmp.sock").display().to_string()
    }

    /// Disks: virtio-blk via -blockdev (d1, 64 KiB clusters), scsi-hd via legacy -drive
    /// (d2), a raw disk (r1), a qcow2 with 128 KiB clusters (d3), and an overlay over a
    /// backing file (ov).
    fn standard(dir: &Path) -> Vm {
        let d = dir.display().to_string();
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                &format!("{d}/d1.qcow2"),
                "16M",
            ],
        );
        sh(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x11 0 2M",
                "-c",
                "write -P 0x12 9M 64k",
                &format!("{d}/d1.qcow2"),
            ],
        );
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                &format!("{d}/d2.qcow2"),
                "8M",
            ],
        );
        sh(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x21 1M 1M",
                &format!("{d}/d2.qcow2"),
            ],
        );
        sh(
            "qemu-img",
            &["create", "-q", "-f", "raw", &format!("{d}/r1.raw"), "4M"],
        );
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=128k",
                &format!("{d}/d3.qcow2"),
                "8M",
            ],
        );
        sh(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x31 0 300k",
                &format!("{d}/d3.qcow2"),
            ],
        );
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                &format!("{d}/base.qcow2"),
                "8M",
            ],
        );
        sh(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x41 0 8M",
                &format!("{d}/base.qcow2"),
            ],
        );
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                &format!("{d}/ov.qcow2"),
            ],
        );
        sh(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x42 2M 64k",
                &format!("{d}/ov.qcow2"),
            ],
        );
        let args: Vec<String> = [
            "-blockdev", &format!("driver=file,filename={d}/d1.qcow2,node-name=d1-file"),
            "-blockdev", "driver=qcow2,file=d1-file,node-name=d1",
            "-device", "virtio-blk-pci,drive=d1,id=vblk1",
            "-drive", &format!("file={d}/d2.qcow2,format=qcow2,if=none,id=drive-d2"),
            "-device", "virtio-scsi-pci,id=scsi0",
            "-device", "scsi-hd,drive=drive-d2,id=sd2,bus=scsi0.0",
            "-drive", &format!("file={d}/r1.raw,format=raw,if=none,id=drive-r1"),
            "-device", "virtio-blk-pci,drive=drive-r1,id=vblk-r1",
            "-blockdev", &format!("{{\"driver\":\"qcow2\",\"node-name\":\"d3\",\"file\":{{\"driver\":\"file\",\"filename\":\"{d}/d3.qcow2\"}}}}"),
            "-device", "virtio-blk-pci,drive=d3,id=vblk3",
            "-blockdev", &format!("{{\"driver\":\"qcow2\",\"node-name\":\"ov\",\"file\":{{\"driver\":\"file\",\"filename\":\"{d}/ov.qcow2\"}}}}"),
            "-device", "virtio-blk-pci,drive=ov,id=vblk-ov",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let spec = |qdev: &str, file: &str| DiskSpec {
            qdev: qdev.into(),
            file: format!("{d}/{file}"),
        };
        let disks = vec![
            spec("/machine/peripheral/vblk1/virtio-backend", "d1.qcow2"),
            spec("sd2", "d2.qcow2"),
            spec("/machine/peripheral/vblk-r1/virtio-backend", "r1.raw"),
            spec("/machine/peripheral/vblk3/virtio-backend", "d3.qcow2"),
            spec("/machine/peripheral/vblk-ov/virtio-backend", "ov.qcow2"),
        ];
        let models = disks
            .iter()
            .map(|s| {
                let raw = format!("{}.model0", s.file);
                sh("qemu-img", &["convert", "-O", "raw", &s.file, &raw]);
                std::fs::read(&raw).unwrap()
            })
            .collect();
        let mut vm = Vm {
            dir: dir.to_path_buf(),
            child: None,
            args,
            disks,
            models,
            mon: None,
            stdout: None,
        };
        vm.start();
        vm
    }

    fn start(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("qmp.sock"));
        let _ = std::fs::remove_file(self.dir.join("test.sock"));
        let mut cmd = Command::new(qemu_binary());
        cmd.args([
            "-machine",
            "pc,accel=tcg",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
            "-S",
        ])
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            self.dir.join("qmp.sock").display()
        ))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            self.dir.join("test.sock").display()
        ))
        .args(&self.args)
        .stdin(Stdio::null())
        .stdout(match &self.stdout {
            Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
            None => Stdio::null(),
        })
        .stderr(Stdio::null());
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("{}: {e}", qemu_binary())),
        );
        self.mon = Some(Arc::new(Mutex::new(Monitor::connect(
            &self.dir.join("test.sock"),
        ))));
        // The backup socket must be there too.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.dir.join("qmp.sock").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        self.mon = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A clean shutdown (persistent bitmaps are written to the images).
    fn quit(&mut self) {
        if let Some(m) = &self.mon {
            let _ = m.lock().unwrap().try_cmd("quit", json!({}));
        }
        self.mon = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    fn mon(&self) -> std::sync::MutexGuard<'_, Monitor> {
        self.mon.as_ref().unwrap().lock().unwrap()
    }

    /// A guest write through disk `i`'s device.
    fn write(&mut self, i: usize, off: u64, len: u64, pattern: u8) {
        let q = self.disks[i].qdev.clone();
        let out = self.mon().hmp(&format!(
            "qemu-io -d {q} \"write -P {pattern} {off} {len}\""
        ));
        assert!(out.is_empty(), "{out}");
        self.models[i][off as usize..(off + len) as usize].fill(pattern);
    }

    fn zero(&mut self, i: usize, off: u64, len: u64) {
        let q = self.disks[i].qdev.clone();
        let out = self
            .mon()
            .hmp(&format!("qemu-io -d {q} \"write -z {off} {len}\""));
        assert!(out.is_empty(), "{out}");
        self.models[i][off as usize..(off + len) as usize].fill(0);
    }

    /// After QEMU was killed, the disks hold what reached them (QEMU's caches died with it):
    /// the models become what the files now read.
    fn reload_models(&mut self) {
        assert!(self.child.is_none(), "QEMU must be stopped");
        for (s, m) in self.disks.iter().zip(self.models.iter_mut()) {
            let raw = format!("{}.reload", s.file);
            let _ = std::fs::remove_file(&raw);
            sh("qemu-img", &["convert", "-U", "-O", "raw", &s.file, &raw]);
            *m = std::fs::read(&raw).unwrap();
            let _ = std::fs::remove_file(&raw);
        }
    }

    fn snapshot_models(&self) -> Vec<Vec<u8>> {
        self.models.clone()
    }
}

fn qmpbackup(vm: &Vm, args: &[&str]) -> (i32, String, String) {
    let sock = vm.sock();
    let mut all = vec!["--socket", sock.as_str()];
    all.extend_from_slice(args);
    let out = Command::new(env!("CARGO_BIN_EXE_qmpbackup"))
        .args(&all)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn backup_ok(vm: &Vm, args: &[&str]) -> String {
    let (c, o, e) = qmpbackup(vm, args);
    assert_eq!(c, 0, "qmpbackup {args:?}:\n{o}\n{e}");
    e
}

/// Restores `disk_dir` up to `until` (or the newest point) and compares with `model`.
fn assert_restores_to(disk_dir: &Path, until: Option<&str>, model: &[u8], tag: &str) {
    let target = disk_dir
        .parent()
        .unwrap()
        .join(format!("restore-{tag}-{}.qcow2", std::process::id()));
    let _ = std::fs::remove_file(&target);
    let _ = std::fs::remove_file(target.with_extension("qcow2.manifest"));
    let mut args = vec![
        "merge".to_string(),
        "--dir".into(),
        disk_dir.display().to_string(),
        "--targetfile".into(),
        target.display().to_string(),
    ];
    if let Some(u) = until {
        args.push("--until".into());
        args.push(u.into());
    }
    let out = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qmprestore {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = target.with_extension("raw");
    std::fs::write(&raw, model).unwrap();
    let cmp = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "raw"])
        .arg(&target)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{tag}: restored {} differs from the model: {}",
        disk_dir.display(),
        String::from_utf8_lossy(&cmp.stdout)
    );
    let _ = std::fs::remove_file(&target);
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_file(target.with_extension("qcow2.manifest"));
}

fn files(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix) && !n.ends_with(".manifest"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn wait_ts_tick() {
    // File names carry the Unix second; two backups must not share one.
    std::thread::sleep(Duration::from_millis(1100));
}

fn no_leftovers(vm: &Vm) {
    let nodes = vm
        .mon()
        .cmd("query-named-block-nodes", json!({"flat": true}));
    for n in nodes.as_array().unwrap() {
        let name = n["node-name"].as_str().unwrap_or("");
        assert!(!name.starts_with("qmpb-"), "leftover node {name}");
    }
    let jobs = vm.mon().cmd("query-jobs", json!({}));
    assert!(jobs.as_array().unwrap().is_empty(), "leftover jobs {jobs}");
    for b in vm.mon().cmd("query-block", json!({})).as_array().unwrap() {
        for bm in b["inserted"]["dirty-bitmaps"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let name = bm["name"].as_str().unwrap_or("");
            assert!(!name.ends_with("-f"), "leftover frozen bitmap {name}");
        }
    }
}

#[test]
fn every_level_restores_to_the_disk_at_backup_time() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = Vm::standard(tmp.path());
    let t = tmp.path().join("bk");
    let ts = t.display().to_string();
    backup_ok(&vm, &["backup", "-l", "full", "-t", &ts, "--include-raw"]);
    let m_full = vm.snapshot_models();
    no_leftovers(&vm);
    vm.write(0, MIB, 64 * 1024, 0x5a);
    vm.write(0, 12 * MIB, 4096, 0x5b);
    vm.zero(0, 0, 64 * 1024);
    vm.write(1, 3 * MIB, 128 * 1024, 0x6b);
    vm.write(2, 2 * MIB, 4096, 0x7c);
    vm.write(3, 4 * MIB, 200 * 1024, 0x3c);
    vm.write(4, 5 * MIB, 64 * 1024, 0x4c);
    vm.zero(4, 0, 128 * 1024); // zeros over backing data must restore as zeros
    wait_ts_tick();
    let (code, out, err) = qmpbackup(
        &vm,
        &["backup", "-l", "inc", "-t", &ts, "--include-raw", "--json"],
    );
    assert_eq!(code, 0, "{out}{err}");
    // The summary says what was copied, not how big the disks are.
    let events = json_events(&out);
    let disks = events.last().unwrap()["summary"]["disks"]
        .as_array()
        .unwrap()
        .clone();
    let d1 = disks
        .iter()
        .find(|d| d["file"].as_str().unwrap().contains("d1.qcow2"))
        .unwrap();
    let (copied, scanned) = (
        d1["bytes"].as_u64().unwrap(),
        d1["scanned"].as_u64().unwrap(),
    );
    // The job went over the bitmap's dirty clusters; what was copied is the data among them.
    assert!(
        (68 * 1024..=scanned).contains(&copied) && scanned < MIB,
        "{d1}"
    );
    let m_inc1 = vm.snapshot_models();
    vm.write(0, 5 * MIB, 64 * 1024, 0x5c);
    vm.write(1, 0, 4096, 0x6c);
    vm.write(3, 7 * MIB, 64 * 1024, 0x3d);
    wait_ts_tick();
    backup_ok(
        &vm,
        &[
            "backup",
            "-l",
            "auto",
            "-t",
            &ts,
            "--include-raw",
            "--compress",
        ],
    );
    let m_inc2 = vm.snapshot_models();
    wait_ts_tick();
    vm.write(0, 6 * MIB, 4096, 0x5d);
    backup_ok(&vm, &["backup", "-l", "copy", "-t", &ts, "--include-raw"]);
    let m_copy = vm.snapshot_models();
    no_leftovers(&vm);
    for (i, d) in vm.disks.iter().enumerate() {
        let name = Path::new(&d.file)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let dir = t.join(&name);
        let fulls = files(&dir, "FULL-");
        let incs = files(&dir, "INC-");
        assert_eq!(
            (fulls.len(), incs.len()),
            (1, 2),
            "{name}: {fulls:?} {incs:?}"
        );
        assert_restores_to(&dir, Some(&fulls[0]), &m_full[i], &format!("{name}-full"));
        assert_restores_to(&dir, Some(&incs[0]), &m_inc1[i], &format!("{name}-inc1"));
        assert_restores_to(&dir, Some(&incs[1]), &m_inc2[i], &format!("{name}-inc2"));
        // The copy is a standalone full image of its moment.
        let copy = files(&dir, "COPY-");
        assert_eq!(copy.len(), 1);
        let raw = dir.join("copy-model.raw");
        std::fs::write(&raw, &m_copy[i]).unwrap();
        let cmp = Command::new("qemu-img")
            .args(["compare", "-U", "-F", "raw"])
            .arg(dir.join(&copy[0]))
            .arg(&raw)
            .output()
            .unwrap();
        assert!(cmp.status.success(), "{name}: copy differs");
        // Every backup file is checked by verify, with its manifest.
        let out = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
            .args(["verify", "--dir"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(dir.join(format!("{name}.config")).exists());
        // Targets are always qcow2 v3, even for the raw disk.
        let info = sh(
            "qemu-img",
            &[
                "info",
                "--output",
                "json",
                dir.join(&incs[0]).to_str().unwrap(),
            ],
        );
        assert!(info.contains("\"compat\": \"1.1\""), "{info}");
    }
    // The whole VM in one command, raw, at the first INC's time (later runs exist).
    let inc1_time: String = files(&t.join("d1.qcow2"), "INC-")[0]
        .split('-')
        .nth(1)
        .unwrap()
        .to_string();
    let out_dir = tmp.path().join("vm-restore");
    let out = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
        .args(["merge", "--vm-dir", &ts, "--targetdir"])
        .arg(&out_dir)
        .args(["--until", &inc1_time, "--format", "raw"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (i, d) in vm.disks.iter().enumerate() {
        let name = Path::new(&d.file)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let restored = if name.ends_with(".raw") {
            name.clone()
        } else {
            format!("{name}.raw")
        };
        let got = std::fs::read(out_dir.join(&restored)).unwrap();
        assert!(
            got == m_inc1[i],
            "{name}: whole-VM restore differs from the first INC's point"
        );
    }
    // The overlay's FULL stays sparse (zeros read through the fleecing node are unmapped).
    let ov_full = t
        .join("ov.qcow2")
        .join(files(&t.join("ov.qcow2"), "FULL-")[0].clone());
    let size = std::fs::metadata(&ov_full).unwrap().len();
    assert!(size < 12 * MIB, "overlay FULL is {size} bytes");
}

#[test]
fn writes_during_a_rate_limited_backup_go_to_the_next() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = Vm::standard(tmp.path());
    let t = tmp.path().join("bk");
    let ts = t.display().to_string();
    backup_ok(&vm, &["backup", "-l", "full", "-t", &ts, "-i", "vblk1"]);
    vm.write(0, MIB, 1024 * 1024, 0x77);
    wait_ts_tick();
    let m_at_inc = vm.snapshot_models();
    // 16 MiB disk, 1 MiB dirty, 256 KiB/s: about 4 s.
    let child = spawn_backup(
        &vm,
        &[
            "backup",
            "-l",
            "inc",
            "-t",
            &ts,
            "-i",
            "vblk1",
            "--speed-limit",
            "256K",
        ],
    );
    std::thread::sleep(Duration::from_millis(1500));
    // Overwrite the dirty range and a clean one while the job copies.
    vm.write(0, MIB, 512 * 1024, 0x88);
    vm.write(0, 8 * MIB, 64 * 1024, 0x89);
    let (code, err) = finish(child);
    assert_eq!(code, 0, "{err}");
    let m_final = vm.snapshot_models();
    wait_ts_tick();
    backup_ok(&vm, &["backup", "-l", "inc", "-t", &ts, "-i", "vblk1"]);
    let dir = t.join("d1.qcow2");
    let incs = files(&dir, "INC-");
    assert_restores_to(&dir, Some(&incs[0]), &m_at_inc[0], "at-inc");
    assert_restores_to(&dir, Some(&incs[1]), &m_final[0], "final");
}

#[test]
fn incrementals_under_continuous_writes_all_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = Vm::standard(tmp.path());
    let t = tmp.path().join("bk");
    let ts = t.display().to_string();
    backup_ok(&vm, &["backup", "-l", "full", "-t", &ts, "-i", "vblk1,sd2"]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mon = vm.mon.clone().unwrap();
    let (q0, q1) = (vm.disks[0].qdev.clone(), vm.disks[1].qdev.clone());
    let stop2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut log: Vec<(usize, u64, u8)> = Vec::new();
        let mut n = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            let (i, q, size) = if n.is_multiple_of(2) {
                (0, &q0, 16 * MIB)
            } else {
                (1, &q1, 8 * MIB)
            };
            let off = (n * 7919 * 65536) % (size - 65536);
            let off = off & !4095;
            let pat = (n % 250) as u8 + 1;
            let out = mon
                .lock()
                .unwrap()
                .hmp(&format!("qemu-io -d {q} \"write -P {pat} {off} 4096\""));
            assert!(out.is_empty(), "{out}");
            log.push((i, off, pat));
            n += 1;
        }
        log
    });
    for _ in 0..3 {
        wait_ts_tick();
        backup_ok(&vm, &["backup", "-l", "inc", "-t", &ts, "-i", "vblk1,sd2"]);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let log = writer.join().unwrap();
    assert!(log.len() > 10, "the writer made only {} writes", log.len());
    for (i, off, pat) in log {
        vm.models[i][off as usize..off as usize + 4096].fill(pat);
    }
    wait_ts_tick();
    backup_ok(&vm, &["backup", "-l", "inc", "-t", &ts, "-i", "vblk1,sd2"]);
    assert_restores_to(&t.join("d1.qcow2"), None, &vm.models[0], "cont-d1");
    assert_restores_to(&t.join("d2.qcow2"), None, &vm.models[1], "cont-d2");
    no_leftovers(&vm);
}

#[test]
fn sigterm_mid_backup_leaves_nothing_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = Vm::standard(tmp.path());
    let t = tmp.path().join("bk");
    let ts = t.display().to_string();
    backup_ok(&vm, &["backup", "-l", "full", "-t", &ts, "-i", "vblk1"]);
    vm.write(0, 0, 4 * MIB, 0x99);
    wait_ts_tick();
    let child = start_slow_inc(&vm, &ts);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let (code, err) = finish(child);
    assert_ne!(code, 0, "a cancelled backup must fail: {err}");
    no_leftovers(&vm);
    let dir = t.join("d1.qcow2");
    assert!(
        files(&dir, "INC-").is_empty(),
        "no file of the cancelled run may remain: {:?}",
        files(&dir, "INC-")
    );
    assert!(!std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().contains("fleece")));
    wait_ts_tick();
    backup_ok(&vm, &["backup", "-l", "inc", "-t", &ts, "-i", "vblk1"]);
    assert_restores_to(&dir, None, &vm.models[0], "after-sigterm");
}

#[test]
fn bitmaps_survive_a_qemu_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = Vm::standard(tmp.path());
    let t = tmp.path().join("bk");
    let ts = t.display().to_string();
    backup_ok(&vm, &["backup", "-l", "full", "-t", &ts, "--include-raw"]);
    vm.write(0, 2 * MIB, 64 * 1024, 0x1a);
    vm.quit();
    vm.start();
    vm.write(0, 3 * MIB, 64 * 1024, 0x1b);
    vm.write(2, 0, 4096, 0x1c);
    wait_ts_tick();
    // The raw disk's bitmap did not survive: auto takes a new full for it and says so.
    let err = backup_ok(&vm, &["backup", "-l", "auto", "-t", &ts, "--include-raw"]);
    assert!(err.contains("drive-r1: full backup"), "{err}");
    assert_restores_to(&t.join("d1.qcow2"), None, &vm.models[0], "restart-d1");
    assert_eq!(files(&t.join("d1.qcow2"), "INC-").len(), 1);
    assert_eq!(files(&t.join("r1.raw"), "FULL-").len(), 2);
    assert_restores_to(&t.join("r1.raw"), None, &vm.models[2], "restart-r1");
}

/// A fake guest agent: speaks the protocol, records what it was asked and checks, at
/// freeze and thaw time, what the backup has done so far via the test monitor.
fn fake_agent(path: &Path, mon: Arc<Mutex<Monitor>>) -> std::thread::JoinHandle<Vec<String>> {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let mut log = Vec::new();
        let (s, _) = l.accept().unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut frozen = false;
        loop {
            let mut buf = Vec::new();
            if r.read_until(b'\n', &mut buf).unwrap_or(0) == 0 {
                break;
            }
            let text: Vec<u8> = buf.into_iter().filter(|&b| b != 0xff).collect();
            let Ok(v) = serde_json::from_slice::<Value>(&text) else {
                continue;
            };
            let cmd = v["execute"].as_str().unwrap_or("").to_string();
            let jobs = || {
                mon.lock()
                    .unwrap()
                    .cmd("query-jobs", json!({}))
                    .as_array()
                    .unwrap()
                    .len()
            };
            let reply = match cmd.as_str() {
                "guest-sync-delimited" => {
                    w.write_all(&[0xff]).unwrap();
                    json!({"return": v["arguments"]["id"]})
                }
                "guest-info" => {
                    json!({"return": {"version": "fake", "supported_commands": [{"name": "guest-fsfreeze-freeze", "enabled": true}]}})
                }
                "guest-fsfreeze-status" => {
                    json!({"return": if frozen { "frozen" } else { "thawed" }})
                }
                "guest-fsfreeze-freeze" => {
                    frozen = true;
                    log.push(format!("freeze jobs={}", jobs()));
                    json!({"return": 2})
                }
                "guest-fsfreeze-thaw" => {
                    frozen = false;
                    log.push(format!("thaw jobs={}", jobs()));
                    json!({"return": 2})
                }
                _ => json!({"error": {"class": "CommandNotFound", "desc": "nope"}}),
            };
            w.write_all(format!("{reply}\n").as_bytes()).unwrap();
        }
        log
    })
}

#[test]
fn quiesce_freezes_before_the_cut_and_thaws_after_the_jobs_start() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = Vm::standard(tmp.path());
    let t = tmp.path().join("bk");
    let ts = t.display().to_string();
    let agent_path = tmp.path().join("qga.sock");
    let h = fake_agent(&agent_path, vm.mon.clone().unwrap());
    let ap = agent_path.display().to_string();
    let sock = vm.sock();
    // A slow job so it is still running when the thaw comes.
    let out = Command::new(env!("CARGO_BIN_EXE_qmpbackup"))
        .args([
            "--socket",
            &sock,
            "--agent-socket",
            &ap,
            "backup",
            "-l",
            "full",
            "-t",
            &ts,
            "-i",
            "vblk1",
            "--quiesce",
            "--speed-limit",
            "4M",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = h.join().unwrap();
    assert_eq!(
        log,
        vec!["freeze jobs=0".to_string(), "thaw jobs=1".to_string()],
        "agent saw {log:?}"
    );
    // A failing backup still thaws.
    let h = fake_agent(&tmp.path().join("qga2.sock"), vm.mon.clone().unwrap());
    let out = Command::new(env!("CARGO_BIN_EXE_qmpbackup"))
        .args([
            "--socket",
            &sock,
            "--agent-socket",
            tmp.path().join("qga2.sock").to_str().unwrap(),
            "backup",
            "-l",
            "full",
            "-t",
            &ts,
            "-i",
            "vblk1",
            "--quiesce",
            "--uuid",
            "bad uuid with spaces/and/slashes",
        ])
        .output()
        .unwrap();
    let log = h.join().unwrap();
    assert!(
        log.iter().filter(|l| l.starts_with("thaw")).count()
            == log.iter().filter(|l| l.starts_with("freeze")).count(),
        "{log:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn selection_layout_and_socket_options() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = Vm::standard(tmp.path());
    let t = tmp.path().join("bk");
    let ts = t.display().to_string();
    // Raw disks are skipped by default; --exclude by node name and by drive id.
    let err = backup_ok(
        &vm,
        &["backup", "-l", "full", "-t", &ts, "-e", "d3,drive-d2"],
    );
    assert!(err.contains("raw disk skipped"), "{err}");
    assert!(t.join("d1.qcow2").is_dir() && t.join("ov.qcow2").is_dir());
    assert!(
        !t.join("r1.raw").exists() && !t.join("d2.qcow2").exists() && !t.join("d3.qcow2").exists()
    );
    // An unknown --include is an error.
    let (c, _, e) = qmpbackup(
        &vm,
        &["backup", "-l", "full", "-t", &ts, "-i", "nonexistent"],
    );
    assert_eq!(c, 1);
    assert!(e.contains("no such disk"), "{e}");
    // --monthly and --no-subdir
    let tm = tmp.path().join("monthly");
    backup_ok(
        &vm,
        &[
            "backup",
            "-l",
            "auto",
            "-t",
            tm.to_str().unwrap(),
            "-i",
            "vblk1",
            "--monthly",
        ],
    );
    let month = std::fs::read_dir(&tm)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.len() == 7 && n.as_bytes()[4] == b'-')
        .expect("YYYY-MM dir");
    assert!(tm.join(&month).join("d1.qcow2").is_dir());
    assert!(tm.join("current").is_symlink());
    let tn = tmp.path().join("flat");
    backup_ok(
        &vm,
        &[
            "backup",
            "-l",
            "full",
            "-t",
            tn.to_str().unwrap(),
            "-i",
            "vblk1",
            "--no-subdir",
        ],
    );
    assert_eq!(files(&tn, "FULL-").len(), 1);
    // A .partial left by a crashed run is moved aside, not a reason to demand a new full.
    let dir = t.join("d1.qcow2");
    std::fs::write(dir.join("INC-1-d1.qcow2.partial"), b"junk").unwrap();
    wait_ts_tick();
    let err = backup_ok(&vm, &["backup", "-l", "inc", "-t", &ts, "-i", "vblk1"]);
    assert!(err.contains("moved aside"), "{err}");
    assert_eq!(
        files(&dir, "INC-")
            .iter()
            .filter(|f| !f.contains("partial"))
            .count(),
        1
    );
    // inc without a chain: a clear error.
    let (c, _, e) = qmpbackup(
        &vm,
        &[
            "backup",
            "-l",
            "inc",
            "-t",
            tmp.path().join("empty").to_str().unwrap(),
        ],
    );
    assert_eq!(c, 1);
    assert!(
        e.contains("no full backup") && e.contains("run a full backup first"),
        "{e}"
    );
    // info and cleanup
    let (c, o, _) = qmpbackup(&vm, &["info", "--show", "bitmaps"]);
    assert_eq!(c, 0);
    assert!(o.contains("qmpbackup-"));
    let (c, _, e) = qmpbackup(&vm, &["cleanup", "--remove-bitmaps"]);
    assert_eq!(c, 0, "{e}");
    let (_, o, _) = qmpbackup(&vm, &["info", "--show", "bitmaps"]);
    assert!(!o.contains("qmpbackup-"), "{o}");
    // inc after the bitmaps are gone: says what to do.
    let (c, _, e) = qmpbackup(&vm, &["backup", "-l", "inc", "-t", &ts, "-i", "vblk1"]);
    assert_eq!(c, 1);
    assert!(
        e.contains("is missing") && e.contains("run a full backup"),
        "{e}"
    );
}

#[test]
fn busy_socket_and_tcp_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            &format!("{}/d.qcow2", d.display()),
            "4M",
        ],
    );
    let port = 20000 + (std::process::id() % 20000) as u16;
    let mut child = Command::new(qemu_binary())
        .args([
            "-machine",
            "pc,accel=tcg",
            "-m",
            "32",
            "-nodefaults",
            "-display",
            "none",
            "-S",
        ])
        .arg("-qmp")
        .arg(format!("tcp:127.0.0.1:{port},server=on,wait=off"))
        .arg("-qmp")
        .arg(format!("unix:{}/qmp.sock,server=on,wait=off", d.display()))
        .args([
            "-drive",
            &format!("file={}/d.qcow2,format=qcow2,if=none,id=drv0", d.display()),
            "-device",
            "virtio-blk-pci,drive=drv0,id=vb0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    child = {
        let k = Kill(child);
        std::thread::sleep(Duration::from_millis(800));
        let tcp = format!("tcp:127.0.0.1:{port}");
        let out = Command::new(env!("CARGO_BIN_EXE_qmpbackup"))
            .args([
                "--socket",
                &tcp,
                "backup",
                "-l",
                "full",
                "-t",
                d.join("bk").to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tcp: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Hold the unix socket with another client: a clear "busy" error.
        let mon = Monitor::connect(&d.join("qmp.sock"));
        let out = Command::new(env!("CARGO_BIN_EXE_qmpbackup"))
            .args([
                "--socket",
                d.join("qmp.sock").to_str().unwrap(),
                "info",
                "--show",
                "blockdev",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1));
        assert!(err.contains("busy") && err.contains("dedicated"), "{err}");
        drop(mon);
        let mut k = k;
        std::mem::replace(&mut k.0, Command::new("true").spawn().unwrap())
    };
    let _ = child.kill();
    let _ = child.wait();
}

// ---- Faults: QEMU killed, targets unwritable or full, bitmaps lost, odd VM states -------

/// Starts qmpbackup in the background (for faults injected while it runs).
fn spawn_backup(vm: &Vm, args: &[&str]) -> Child {
    let sock = vm.sock();
    Command::new(env!("CARGO_BIN_EXE_qmpbackup"))
        .arg("--socket")
        .arg(&sock)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// An incremental of vblk1 limited to 128 KiB/s, given 1.5 s to get going: with 4 MiB dirty
/// it runs for half a minute, time for a fault to hit it.
fn start_slow_inc(vm: &Vm, target: &str) -> Child {
    let child = spawn_backup(
        vm,
        &[
            "backup",
            "-l",
            "inc",
            "-t",
            target,
            "-i",
            "vblk1",
            "--speed-limit",
            "128K",
        ],
    );
    std::thread::sleep(Duration::from_millis(1500));
    child
}

fn finish(mut child: Child) -> (i32, String) {
    let st = child.wait().unwrap();
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    (st.code().unwrap_or(-1), err)
}

/// Nothing of an unfinished run may remain in the disk's directory: no INC or partial, no
/// fleece image.
fn no_unfinished_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        assert!(
            !n.starts_with("INC-") && !n.contains("partial") && !n.contains("fleece"),
            "left behind in {}: {n}",
            dir.display()
        );
    }
}

/// A tmpfs mounted for the test (root only) and unmounted on every path.
struct TmpMount(PathBuf);

impl TmpMount {
    fn new(path: &Path, opts: &str) -> Option<TmpMount> {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("skipped: cannot mount a tmpfs (not root?)");
        }
        ok.then(|| TmpMount(path.to_path_buf()))
    }

    fn remount(&self, opts: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for TmpMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn qemu_killed_mid_backup_then_auto_starts_a_new_full() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = Vm::standard(tmp.path());
    let t = tmp.path().join("bk");
    let ts = t.display().to_string();
    backup_ok(&vm, &["backup", "-l", "full", "-t", &ts, "-i", "vblk1"]);
    vm.write(0, 0, 4 * MIB, 0x77);
    wait_ts_tick();
    let child = start_slow_inc(&vm, &ts);
    vm.kill(); // SIGKILL: the QMP socket closes under the running backup
    let (code, err) = finish(child);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("QEMU went away"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let dir = t.join("d1.qcow2");
    no_unfinished_files(&dir);
    // The socket is gone: a clear error, not a hang.
    let (c, _, e) = qmpbackup(&vm, &["info", "--show", "blockdev"]);
    assert_eq!(c, 1);
    assert!(e.contains("qmp.sock"), "{e}");
    // QEMU restarted: the bitmap added at runtime was never stored (QEMU died), so the
    // chain cannot continue: inc says so, auto takes a new full and says why.
    vm.reload_models();
    vm.start();
    wait_ts_tick();
    let (c, _, e) = qmpbackup(&vm, &["backup", "-l", "inc", "-t", &ts, "-i", "vblk1"]);
    assert_eq!(c, 1);
    assert!(
        e.contains("missing") && e.contains("run a full backup"),
        "{e}"
    );
    let err = backup_ok(&vm, &["backup", "-l", "auto", "-t", &ts, "-i", "vblk1"]);
    assert!(err.contains("full backup (bitmap"), "{err}");
    assert_eq!(files(&dir, "FULL-").len(), 2);
    assert_restores_to(&dir, None, &vm.models[0], "after-kill");
    no_leftovers(&vm);
}

#[test]
fn bitmap_left_in_use_by_a_killed_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = Vm::standard(tmp.path());
    let t = tmp.path().join("bk");
    let ts = t.display().to_string();
    backup_ok(
        &vm,
        &["backup", "-l", "full", "-t", &ts, "-i", "vblk1,vblk3"],
    );
    // A clean restart stores the bitmaps; the restarted QEMU marks them in use in the
    // images, so a SIGKILL now leaves them in use, and the next QEMU loads them inconsistent.
    vm.quit();
    vm.start();
    vm.write(0, MIB, 64 * 1024, 0x61);
    vm.write(3, MIB, 64 * 1024, 0x62);
    vm.kill();
    vm.reload_models();
    vm.start();
    let q = vm.mon().cmd("query-block", json!({}));
    assert!(q.to_string().contains("\"inconsistent\":true"), "{q}");
    wait_ts_tick();
    let (c, _, e) = qmpbackup(
        &vm,
        &["backup", "-l", "inc", "-t", &ts, "-i", "vblk1,vblk3"],
    );
    assert_eq!(c, 1);
    assert!(
        e.contains("inconsistent") && e.contains("run a full backup"),
        "{e}"
    );
    let err = backup_ok(
        &vm,
        &["backup", "-l", "auto", "-t", &ts, "-i", "vblk1,vblk3"],
    );
    assert!(err.contains("is inconsistent"), "{err}");
    // The new chain continues normally.
    vm.write(0, 2 * MIB, 4096, 0x63);
    wait_ts_tick();
    backup_ok(
        &vm,
        &["backup", "-l", "inc", "-t", &ts, "-i", "vblk1,vblk3"],
    );
    assert_restores_to(&t.join("d1.qcow2"), None, &vm.models[0], "inuse-d1");
    assert_restores_to(&t.join("d3.qcow2"), None, &vm.models[3], "inuse-d3");
    // The stale inconsistent bitmaps were replaced, not left to slow the guest down.
    let q = vm.mon().cmd("query-block", json!({}));
    assert!(!q.to_string().contains("\"inconsistent\":true"), "{q}");
    no_leftovers(&vm);
}

/// A full backup of vblk1 to `target` that must fail cleanly: its stderr.
fn full_backup_fails(vm: &Vm, target: &Path) -> String {
    let t = target.to_str().unwrap();
    let (c, _, e) = qmpbackup(vm, &["backup", "-l", "full", "-t", t, "-i", "vblk1"]);
    assert_eq!(c, 1, "{e}");
    assert!(!e.contains("panicked"), "{e}");
    no_leftovers(vm);
    e
}

#[test]
fn target_not_writable_or_full() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = Vm::standard(tmp.path());
    // A target below a regular file.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let bad = file.join("bk");
    let e = full_backup_fails(&vm, &bad);
    assert!(e.contains("a-file"), "{e}");
    // A read-only filesystem.
    if let Some(_ro) = TmpMount::new(&tmp.path().join("ro"), "ro,size=16m") {
        let t = tmp.path().join("ro");
        let e = full_backup_fails(&vm, &t);
        assert!(e.contains("Read-only file system"), "{e}");
    }
    // A filesystem that fills up during an incremental: a clear error, nothing left, and
    // once there is room the next inc holds every change.
    let Some(small) = TmpMount::new(&tmp.path().join("small"), "size=3m") else {
        return;
    };
    let t = tmp.path().join("small");
    let ts = t.display().to_string();
    backup_ok(&vm, &["backup", "-l", "full", "-t", &ts, "-i", "vblk1"]);
    vm.write(0, 4 * MIB, 3 * MIB, 0x71);
    wait_ts_tick();
    let (c, _, e) = qmpbackup(&vm, &["backup", "-l", "inc", "-t", &ts, "-i", "vblk1"]);
    assert_eq!(c, 1, "{e}");
    assert!(e.contains("No space left on device"), "{e}");
    let dir = t.join("d1.qcow2");
    no_unfinished_files(&dir);
    no_leftovers(&vm);
    small.remount("size=64m");
    vm.write(0, 8 * MIB, 64 * 1024, 0x72);
    wait_ts_tick();
    backup_ok(&vm, &["backup", "-l", "inc", "-t", &ts, "-i", "vblk1"]);
    assert_eq!(files(&dir, "INC-").len(), 1);
    assert_restores_to(&dir, None, &vm.models[0], "after-enospc");
}

#[test]
fn disk_added_after_the_last_full() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = Vm::standard(tmp.path());
    let t = tmp.path().join("bk");
    let ts = t.display().to_string();
    backup_ok(&vm, &["backup", "-l", "full", "-t", &ts, "-i", "vblk1"]);
    // Hot-plug a new disk.
    let new = tmp.path().join("new.qcow2");
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", new.to_str().unwrap(), "4M"],
    );
    vm.mon().cmd(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "newdisk",
               "file": {"driver": "file", "filename": new.display().to_string()}}),
    );
    vm.mon().cmd(
        "device_add",
        json!({"driver": "virtio-blk-pci", "drive": "newdisk", "id": "vblk-new"}),
    );
    vm.disks.push(DiskSpec {
        qdev: "/machine/peripheral/vblk-new/virtio-backend".into(),
        file: new.display().to_string(),
    });
    vm.models.push(vec![0u8; 4 * MIB as usize]);
    let n = vm.disks.len() - 1;
    vm.write(n, 0, 128 * 1024, 0x81);
    vm.write(0, 3 * MIB, 64 * 1024, 0x82);
    wait_ts_tick();
    let sel = "vblk1,vblk-new";
    let (c, _, e) = qmpbackup(&vm, &["backup", "-l", "inc", "-t", &ts, "-i", sel]);
    assert_eq!(c, 1);
    assert!(
        e.contains("missing on vblk-new") && e.contains("run a full backup"),
        "{e}"
    );
    let err = backup_ok(&vm, &["backup", "-l", "auto", "-t", &ts, "-i", sel]);
    assert!(err.contains("vblk-new: full backup (bitmap"), "{err}");
    assert_eq!(files(&t.join("d1.qcow2"), "INC-").len(), 1);
    assert_eq!(files(&t.join("new.qcow2"), "FULL-").len(), 1);
    vm.write(n, MIB, 4096, 0x83);
    wait_ts_tick();
    backup_ok(&vm, &["backup", "-l", "inc", "-t", &ts, "-i", sel]);
    assert_restores_to(&t.join("d1.qcow2"), None, &vm.models[0], "added-d1");
    assert_restores_to(&t.join("new.qcow2"), None, &vm.models[n], "added-new");
}

/// A QMP peer that reports the VM as shut down (a real QEMU only gets there when a guest
/// powers off under -no-shutdown).
#[test]
fn vm_in_the_shutdown_state() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("fake.sock");
    let l = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut w = s.try_clone().unwrap();
        let r = BufReader::new(s);
        writeln!(w, r#"{{"QMP": {{"version": {{"qemu": {{"micro": 0, "minor": 0, "major": 10}}, "package": ""}}, "capabilities": []}}}}"#).unwrap();
        for line in r.lines() {
            let Ok(line) = line else { break };
            let v: Value = serde_json::from_str(&line).unwrap();
            let ret = match v["execute"].as_str().unwrap_or("") {
                "query-version" => {
                    json!({"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": ""})
                }
                "query-status" => {
                    json!({"status": "shutdown", "running": false, "singlestep": false})
                }
                _ => json!({}),
            };
            let mut reply = json!({"return": ret});
            if let Some(id) = v.get("id") {
                reply["id"] = id.clone();
            }
            if writeln!(w, "{reply}").is_err() {
                break;
            }
        }
    });
    let out = Command::new(env!("CARGO_BIN_EXE_qmpbackup"))
        .args([
            "--socket",
            path.to_str().unwrap(),
            "backup",
            "-l",
            "auto",
            "-t",
        ])
        .arg(tmp.path().join("bk"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("'shutdown'"), "{err}");
    assert!(!tmp.path().join("bk").join("uuid").exists());
    let _ = server.join();
}

/// The JSON lines a `--json` run printed on stdout.
fn json_events(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

/// Every file name below `dir`, recursively (to see that a refused run left nothing).
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        out.push(p.display().to_string());
        if p.is_dir() && !p.is_symlink() {
            out.extend(tree(&p));
        }
    }
    out.sort();
    out
}

#[test]
fn an_agent_that_cannot_quiesce_gives_a_crash_consistent_backup_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = Vm::standard(tmp.path());
    let t = tmp.path().join("bk");
    let ts = t.display().to_string();
    let log = tmp.path().join("logs/qmpbackup.log");
    let logs = log.display().to_string();
    let missing = tmp.path().join("no-agent.sock").display().to_string();
    // 1. No agent socket at all: warned, marked, backed up.
    let (c, out, err) = qmpbackup(
        &vm,
        &[
            "-L",
            &logs,
            "--agent-socket",
            &missing,
            "backup",
            "-l",
            "full",
            "-t",
            &ts,
            "-i",
            "vblk1",
            "--quiesce",
            "--json",
        ],
    );
    assert_eq!(c, 0, "{err}");
    assert!(err.contains("NOT quiesced"), "{err}");
    let events = json_events(&out);
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "warning"
                && e["message"].as_str().unwrap().contains("NOT quiesced")),
        "{out}"
    );
    let summary = &events.last().unwrap()["summary"];
    assert_eq!(summary["quiesced"], json!(false), "{out}");
    assert!(summary["warnings"][0].as_str().unwrap().contains(&missing));
    let text = std::fs::read_to_string(&log).unwrap();
    let first = text.lines().next().unwrap();
    assert!(
        first.contains("INFO Arguments: ")
            && first.contains(&format!("--agent-socket {missing} backup -l full")),
        "{first}"
    );
    assert!(
        text.lines().nth(1).unwrap().contains("qmpbackup "),
        "{text}"
    );
    assert!(text.contains("QEMU "), "{text}");
    assert!(text.contains("WARNING guest agent at"), "{text}");
    assert_restores_to(&t.join("d1.qcow2"), None, &vm.models[0], "unquiesced");

    // 2. An agent that accepts the connection and never answers: the same after its timeout.
    let silent_path = tmp.path().join("silent.sock");
    let silent = UnixListener::bind(&silent_path).unwrap();
    let holder = std::thread::spawn(move || {
        let (s, _) = silent.accept().unwrap();
        let mut r = s;
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink);
    });
    wait_ts_tick();
    let silent_s = silent_path.display().to_string();
    let (c, out, err) = qmpbackup(
        &vm,
        &[
            "--agent-socket",
            &silent_s,
            "backup",
            "-l",
            "inc",
            "-t",
            &ts,
            "-i",
            "vblk1",
            "--quiesce",
            "--json",
        ],
    );
    assert_eq!(c, 0, "{err}");
    assert!(
        err.contains("did not answer") && err.contains("NOT quiesced"),
        "{err}"
    );
    assert_eq!(
        json_events(&out).last().unwrap()["summary"]["quiesced"],
        json!(false)
    );
    holder.join().unwrap();

    // 3. --quiesce-required: refused, nothing left behind.
    let before = tree(&t);
    let (c, _, err) = qmpbackup(
        &vm,
        &[
            "--agent-socket",
            &missing,
            "backup",
            "-l",
            "inc",
            "-t",
            &ts,
            "-i",
            "vblk1",
            "--quiesce-required",
        ],
    );
    assert_ne!(c, 0);
    assert!(err.contains("--quiesce-required"), "{err}");
    assert_eq!(tree(&t), before);
    no_leftovers(&vm);
    assert_eq!(files(&t.join("d1.qcow2"), "INC-").len(), 1);
}

#[test]
fn no_timestamp_backups_form_a_chain_that_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = Vm::standard(tmp.path());
    for (tag, extra) in [("links", None), ("nolinks", Some("--no-symlink"))] {
        let t = tmp.path().join(tag);
        let ts = t.display().to_string();
        let mut args = vec![
            "backup",
            "-l",
            "full",
            "-t",
            &ts,
            "-i",
            "vblk1",
            "--no-timestamp",
        ];
        args.extend(extra);
        backup_ok(&vm, &args);
        let m_full = vm.snapshot_models();
        let d = t.join("d1.qcow2");
        assert!(d.join("d1.qcow2").is_file());
        let link = d.join("FULL-d1.qcow2");
        match extra {
            None => assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("d1.qcow2")),
            Some(_) => assert!(std::fs::symlink_metadata(&link).is_err()),
        }
        // inc and auto at once (same second allowed): INC-<time> names.
        vm.write(0, MIB, 64 * 1024, 0x5a);
        args[2] = "inc";
        backup_ok(&vm, &args);
        let m_inc = vm.snapshot_models();
        vm.write(0, 5 * MIB, 4096, 0x5c);
        args[2] = "auto";
        let err = backup_ok(&vm, &args);
        assert!(
            !err.contains("full backup ("),
            "auto continued the chain: {err}"
        );
        let incs = files(&d, "INC-");
        assert_eq!(incs.len(), 2, "{incs:?}");
        assert_restores_to(
            &d,
            Some("FULL-d1.qcow2"),
            &m_full[0],
            &format!("{tag}-full"),
        );
        assert_restores_to(&d, Some(&incs[0]), &m_inc[0], &format!("{tag}-inc"));
        assert_restores_to(&d, None, &vm.models[0], &format!("{tag}-auto"));
        for cmd in ["list", "verify"] {
            let out = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
                .args([cmd, "--dir", d.to_str().unwrap()])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{cmd}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            if cmd == "list" {
                assert!(
                    text.contains("d1.qcow2") && text.contains(&incs[1]),
                    "{text}"
                );
            }
        }
        // A second full into the same directory would need the same name: refused.
        args[2] = "full";
        let (c, _, err) = qmpbackup(&vm, &args);
        assert_ne!(c, 0);
        assert!(err.contains("holds one full or copy"), "{err}");
    }
}

/// Unix times of the backup files in `dir`, in name order of their kinds.
fn point_times(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".manifest") {
                return None;
            }
            n.split('-').nth(1)?.parse().ok()
        })
        .collect();
    v.sort();
    v
}

#[test]
fn three_backups_in_one_second_are_three_points() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = Vm::standard(tmp.path());
    let t = tmp.path().join("bk");
    let ts = t.display().to_string();
    let mut models = Vec::new();
    for (i, level) in ["full", "inc", "auto"].into_iter().enumerate() {
        vm.write(0, (i as u64 + 1) * MIB, 4096, 0x70 + i as u8);
        backup_ok(&vm, &["backup", "-l", level, "-t", &ts, "-i", "vblk1"]);
        models.push(vm.models[0].clone());
    }
    let d = t.join("d1.qcow2");
    let times = point_times(&d);
    assert_eq!(times.len(), 3, "{:?}", files(&d, ""));
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    let names: Vec<String> = files(&d, "FULL-")
        .into_iter()
        .chain(files(&d, "INC-"))
        .collect();
    for (name, model) in names.iter().zip(&models) {
        assert_restores_to(&d, Some(name), model, name);
    }
}

/// swtpm serving a TPM 2.0 on a socket for QEMU; killed on drop.
struct Swtpm(Child);

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_emulated_tpm_is_warned_about() {
    if Command::new("swtpm").arg("--version").output().is_err() {
        eprintln!("skipped: swtpm is not installed (apt-get install swtpm)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("tpm");
    std::fs::create_dir(&state).unwrap();
    let sock = tmp.path().join("swtpm.sock");
    let _swtpm = Swtpm(
        Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", state.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", sock.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut vm = Vm::standard(tmp.path());
    vm.quit();
    vm.args.extend(
        [
            "-chardev",
            &format!("socket,id=chrtpm,path={}", sock.display()),
            "-tpmdev",
            "emulator,id=tpm0,chardev=chrtpm",
            "-device",
            "tpm-tis,tpmdev=tpm0",
        ]
        .map(String::from),
    );
    vm.start();
    let t = tmp.path().join("bk");
    let (c, out, err) = qmpbackup(
        &vm,
        &[
            "backup",
            "-l",
            "full",
            "-t",
            t.to_str().unwrap(),
            "-i",
            "vblk1",
            "--json",
        ],
    );
    assert_eq!(c, 0, "{err}");
    assert!(err.contains("TPM tpm0: an emulated TPM"), "{err}");
    let events = json_events(&out);
    let summary = &events.last().unwrap()["summary"];
    assert!(
        summary["warnings"][0].as_str().unwrap().contains("tpm0"),
        "{out}"
    );
}

/// `qmprestore serve` on a disk directory; killed on drop.
struct Serving(Child, PathBuf);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Serving {
    fn start(dir: &Path, socket: PathBuf) -> Serving {
        let mut child = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
            .arg("serve")
            .arg("--dir")
            .arg(dir)
            .arg("--socket")
            .arg(&socket)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut first = [0u8; 1];
        use std::io::Read;
        let started = child.stdout.as_mut().unwrap().read(&mut first).unwrap_or(0) == 1;
        let s = Serving(child, socket);
        assert!(started, "serve did not start");
        s
    }

    /// The export `name` read whole with qemu-img (None when there is no such export).
    fn read(&self, name: &str, scratch: &Path) -> Option<Vec<u8>> {
        let out = scratch.join("served.raw");
        let _ = std::fs::remove_file(&out);
        let uri = format!("nbd+unix:///{name}?socket={}", self.1.display());
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(&out)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        st.success().then(|| std::fs::read(&out).unwrap())
    }
}

#[test]
fn a_backup_appends_a_point_while_the_directory_is_served() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = Vm::standard(tmp.path());
    let t = tmp.path().join("bk");
    let ts = t.display().to_string();
    vm.write(0, MIB, 65536, 0x51);
    backup_ok(&vm, &["backup", "-l", "full", "-t", &ts, "-i", "vblk1"]);
    let full_model = vm.models[0].clone();
    let d = t.join("d1.qcow2");
    let server = Serving::start(&d, tmp.path().join("serve.sock"));
    assert!(server.read("", tmp.path()) == Some(full_model.clone()));
    vm.write(0, 3 * MIB, 65536, 0x52);
    // The append lock coexists with the server's shared lock.
    backup_ok(&vm, &["backup", "-l", "inc", "-t", &ts, "-i", "vblk1"]);
    let inc = files(&d, "INC-").pop().expect("the INC");
    // The running server still serves the point it started with, and every block of it.
    assert!(server.read("", tmp.path()) == Some(full_model.clone()));
    assert_eq!(
        server.read(&inc, tmp.path()),
        None,
        "a point added after start-up"
    );
    // Restarted, it serves the new point as the default and by its name.
    drop(server);
    let server = Serving::start(&d, tmp.path().join("serve.sock"));
    assert!(server.read("", tmp.path()).as_ref() == Some(&vm.models[0]));
    assert!(server.read(&inc, tmp.path()).as_ref() == Some(&vm.models[0]));
    let full = files(&d, "FULL-").pop().unwrap();
    assert!(server.read(&full, tmp.path()) == Some(full_model));
}

/// Instant recovery with stock QEMU: a new VM's disk is a local qcow2 whose backing file is
/// the served point; the VM reads through it at once, writes locally, and `block-stream`
/// pulls the rest in while it runs. Afterwards the local image stands alone and equals the
/// point plus the VM's writes, with the server gone.
#[test]
fn instant_recovery_streams_a_served_point_into_a_local_image() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = Vm::standard(tmp.path());
    let t = tmp.path().join("bk");
    let ts = t.display().to_string();
    vm.write(0, 0, 3 * MIB, 0x71);
    vm.write(0, 9 * MIB + 4096, 65536, 0x72);
    backup_ok(&vm, &["backup", "-l", "full", "-t", &ts, "-i", "vblk1"]);
    vm.write(0, MIB, 128 * 1024, 0x73);
    vm.zero(0, 2 * MIB, MIB);
    backup_ok(&vm, &["backup", "-l", "inc", "-t", &ts, "-i", "vblk1"]);
    let point = vm.models[0].clone();
    vm.quit();
    drop(vm);

    let sock = tmp.path().join("recover.sock");
    let server = Serving::start(&t.join("d1.qcow2"), sock.clone());
    let local = tmp.path().join("recovered.qcow2");
    let backing = format!("nbd+unix:///?socket={}", sock.display());
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            &backing,
            local.to_str().unwrap(),
        ],
    );
    let d = tmp.path().join("rec");
    std::fs::create_dir(&d).unwrap();
    let log = d.join("stdout.log");
    let mut rec = Vm {
        dir: d.clone(),
        child: None,
        args: vec![
            "-blockdev".into(),
            format!(
                "driver=qcow2,node-name=rec,file.driver=file,file.filename={}",
                local.display()
            ),
            "-device".into(),
            "virtio-blk-pci,drive=rec,id=vrec".into(),
        ],
        disks: vec![DiskSpec {
            qdev: "/machine/peripheral/vrec/virtio-backend".into(),
            file: local.display().to_string(),
        }],
        models: vec![point.clone()],
        mon: None,
        stdout: Some(log.clone()),
    };
    rec.start();
    // Reads through the device see the point at once (patterns checked by qemu-io).
    let mut replies = String::new();
    for (off, len, p) in [
        (0u64, MIB, 0x71u8),
        (MIB, 128 * 1024, 0x73),
        (2 * MIB, MIB, 0),
        (9 * MIB + 4096, 65536, 0x72),
        (12 * MIB, MIB, 0),
    ] {
        replies += &rec.mon().hmp(&format!(
            "qemu-io -d /machine/peripheral/vrec/virtio-backend \"read -P {p} {off} {len}\""
        ));
    }
    // The VM writes while the stream runs: the writes stay local.
    rec.write(0, 5 * MIB + 512, 8192, 0x74);
    rec.mon().cmd(
        "block-stream",
        json!({"job-id": "recover", "device": "rec"}),
    );
    rec.write(0, 100, 4096, 0x75);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let jobs = rec.mon().cmd("query-block-jobs", json!({}));
        if jobs.as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "block-stream did not finish: {jobs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The server goes; the VM runs on.
    drop(server);
    rec.write(0, 7 * MIB, 4096, 0x76);
    replies += &rec
        .mon()
        .hmp("qemu-io -d /machine/peripheral/vrec/virtio-backend \"read -P 113 0 100\"");
    rec.quit();
    let printed = std::fs::read_to_string(&log).unwrap_or_default() + &replies;
    assert!(
        !printed.contains("Pattern verification failed") && !printed.contains("error"),
        "{printed}"
    );
    assert!(
        printed.matches("bytes at offset").count() >= 6,
        "the reads did not report: {printed}"
    );
    let info = sh("qemu-img", &["info", "-U", local.to_str().unwrap()]);
    assert!(!info.contains("backing file"), "still backed: {info}");
    let model = tmp.path().join("recovered.model");
    std::fs::write(&model, &rec.models[0]).unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&local)
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the recovered image differs from the point plus the VM's writes: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    sh("qemu-img", &["check", local.to_str().unwrap()]);
}

/// `--keep-last 2` after every run: two points stay, each restores to the disk at its
/// time, and the chain goes on from the newest (the next incremental restores right). A
/// prune that cannot run (a reader holds the directory) leaves the backup and exits 3.
#[test]
fn keep_last_prunes_after_every_backup_and_the_chain_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = Vm::standard(tmp.path());
    let t = tmp.path().join("bk");
    let ts = t.display().to_string();
    let d = t.join("d1.qcow2");
    let mut models: Vec<Vec<u8>> = Vec::new();
    for run in 0..5u64 {
        vm.write(0, run * 3 * MIB / 2, 8192, 0x30 + run as u8);
        let log = backup_ok(
            &vm,
            &[
                "backup",
                "-l",
                "auto",
                "-t",
                &ts,
                "-i",
                "vblk1",
                "--keep-last",
                "2",
            ],
        );
        models.push(vm.models[0].clone());
        let names: Vec<String> = files(&d, "FULL-")
            .into_iter()
            .chain(files(&d, "INC-"))
            .collect();
        let want = models.len().min(2);
        assert_eq!(names.len(), want, "run {run}: {names:?}\n{log}");
        for (name, model) in names.iter().zip(&models[models.len() - want..]) {
            assert_restores_to(&d, Some(name), model, name);
        }
        if run >= 2 {
            assert!(log.contains("fold"), "run {run}: {log}");
        }
    }
    assert_eq!(files(&d, "FULL-").len(), 1);
    // A reader holds the directory: the backup succeeds, the prune cannot run: exit 3.
    let held =
        qmpbackup::store::lock::lock_dir(&d, qmpbackup::store::lock::LockMode::Shared).unwrap();
    vm.write(0, 0, 4096, 0x66);
    let (code, _, err) = qmpbackup(
        &vm,
        &[
            "backup",
            "-l",
            "inc",
            "-t",
            &ts,
            "-i",
            "vblk1",
            "--keep-last",
            "2",
        ],
    );
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("finish the prune with `qmprestore prune"),
        "{err}"
    );
    drop(held);
    let names: Vec<String> = files(&d, "FULL-")
        .into_iter()
        .chain(files(&d, "INC-"))
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert_restores_to(&d, None, &vm.models[0], "after-exit-3");
    no_leftovers(&vm);
}

/// The promtool of the `prometheus` package (`.ci/install-qemu` extracts it to
/// /opt/prometheus without installing the server); None where there is none.
fn promtool() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("PROMTOOL").map(PathBuf::from),
        Some(PathBuf::from("/opt/prometheus/usr/bin/promtool")),
        Some(PathBuf::from("/usr/bin/promtool")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

/// `promtool check metrics` accepts the file (lint included); skipped without promtool.
fn assert_promtool_accepts(path: &Path) {
    let Some(tool) = promtool() else {
        eprintln!("promtool not found: metrics lint skipped (run .ci/install-qemu)");
        return;
    };
    let text = std::fs::read(path).unwrap();
    let mut child = Command::new(tool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&text).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool on {}:\n{}\n{}{}",
        path.display(),
        String::from_utf8_lossy(&text),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A systemd environment file as the units read it: VAR=value lines, quotes removed.
fn read_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// The unit's ExecStart for `instance` with `env` (its Environment= defaults first), as
/// systemd expands it: `${VAR}` one argument, `$VAR` split at whitespace, `%i` the instance.
fn exec_start(unit: &str, instance: &str, config: &str) -> Vec<String> {
    let mut env: Vec<(String, String)> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .flat_map(read_env_file)
        .collect();
    env.extend(read_env_file(config));
    let get = |k: &str| {
        env.iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let mut args = Vec::new();
    for word in line.split_whitespace() {
        let word = word.replace("%i", instance);
        if let Some(var) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            args.push(get(var));
        } else if let Some(var) = word.strip_prefix('$') {
            args.extend(get(var).split_whitespace().map(str::to_string));
        } else {
            args.push(word);
        }
    }
    args
}

#[test]
fn the_systemd_unit_backs_up_and_leaves_metrics_promtool_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let mut vm = Vm::standard(tmp.path());
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd/qmpbackup@.service"),
    )
    .unwrap();
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/vm.conf"))
            .unwrap();
    let target = tmp.path().join("bk");
    let metrics = tmp.path().join("qmpbackup-vm1.prom");
    // The documented example, with this VM's socket and target, one disk, keep-last 2.
    let config = example
        .replace("/run/vm1-backup.qmp", &vm.sock())
        .replace("/backup/vm1", &target.display().to_string())
        .replace(
            "--keep-daily 7 --keep-weekly 4 --keep-monthly 6",
            "--keep-last 2",
        )
        .replace(
            "/var/lib/prometheus/node-exporter/qmpbackup-vm1.prom",
            &metrics.display().to_string(),
        )
        .replace("EXTRA_ARGS=\n", "EXTRA_ARGS=\"-i vblk1\"\n");
    let args = exec_start(&unit, "vm1", &config);
    assert_eq!(args[0], "/usr/bin/qmpbackup", "{args:?}");
    let run = |args: &[String]| {
        let out = Command::new(env!("CARGO_BIN_EXE_qmpbackup"))
            .args(&args[1..])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let metric = |name: &str| -> Vec<String> {
        std::fs::read_to_string(&metrics)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with(name))
            .map(str::to_string)
            .collect()
    };
    for run_no in 1..=3u64 {
        vm.write(0, run_no * MIB, 4096, 0x70 + run_no as u8);
        let (code, err) = run(&args);
        assert_eq!(code, 0, "{args:?}\n{err}");
        assert_eq!(
            metric("qmpbackup_last_run_success"),
            ["qmpbackup_last_run_success{name=\"vm1\"} 1"]
        );
        assert_eq!(
            metric("qmpbackup_last_run_prune_success"),
            ["qmpbackup_last_run_prune_success{name=\"vm1\"} 1"]
        );
        let level = if run_no == 1 { "full" } else { "inc" };
        assert_eq!(
            metric("qmpbackup_disk_last_backup_info"),
            [format!(
                "qmpbackup_disk_last_backup_info{{name=\"vm1\",disk=\"d1.qcow2\",device=\"vblk1\",level=\"{level}\"}} 1"
            )]
        );
        let written = metric("qmpbackup_disk_last_backup_written_bytes");
        assert_eq!(written.len(), 1, "{written:?}");
        assert!(
            written[0].starts_with(
                "qmpbackup_disk_last_backup_written_bytes{name=\"vm1\",disk=\"d1.qcow2\"} "
            ),
            "{written:?}"
        );
        // keep-last 2: the chain never holds more than two points.
        assert_eq!(
            metric("qmpbackup_disk_chain_points"),
            [format!(
                "qmpbackup_disk_chain_points{{name=\"vm1\",disk=\"d1.qcow2\"}} {}",
                run_no.min(2)
            )]
        );
        let newest = metric("qmpbackup_last_backup_timestamp_seconds");
        let point = newest[0].rsplit(' ').next().unwrap().to_string();
        assert_eq!(
            metric("qmpbackup_disk_newest_point_timestamp_seconds"),
            [format!(
                "qmpbackup_disk_newest_point_timestamp_seconds{{name=\"vm1\",disk=\"d1.qcow2\"}} {point}"
            )]
        );
        assert_promtool_accepts(&metrics);
    }
    assert_restores_to(&target.join("d1.qcow2"), None, &vm.models[0], "unit");

    // A failed run (the VM's socket gone) says so, and still lints clean.
    let broken = config.replace(
        &vm.sock(),
        &tmp.path().join("nothing.qmp").display().to_string(),
    );
    let (code, err) = run(&exec_start(&unit, "vm1", &broken));
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        metric("qmpbackup_last_run_success"),
        ["qmpbackup_last_run_success{name=\"vm1\"} 0"]
    );
    assert_eq!(
        metric("qmpbackup_last_run_exit_code"),
        ["qmpbackup_last_run_exit_code{name=\"vm1\"} 1"]
    );
    // What this run backed up: nothing; what the target holds: still there.
    assert!(metric("qmpbackup_disk_last_backup").is_empty());
    assert_eq!(
        metric("qmpbackup_disk_newest_point_timestamp_seconds").len(),
        1
    );
    assert_eq!(
        metric("qmpbackup_disk_chain_points"),
        ["qmpbackup_disk_chain_points{name=\"vm1\",disk=\"d1.qcow2\"} 2"]
    );
    assert_promtool_accepts(&metrics);
    // A typo in the configuration: a usage error (2), and the metrics say so.
    let typo = config.replace("--keep-last 2", "--keep-lats 2");
    let (code, err) = run(&exec_start(&unit, "vm1", &typo));
    assert_eq!(code, 2, "{err}");
    assert_eq!(
        metric("qmpbackup_last_run_exit_code"),
        ["qmpbackup_last_run_exit_code{name=\"vm1\"} 2"]
    );
    assert_promtool_accepts(&metrics);

    // verify's metrics: sound, then with a damaged backup.
    let disk_dir = target.join("d1.qcow2");
    let vmetrics = tmp.path().join("verify.prom");
    let verify = || {
        Command::new(env!("CARGO_BIN_EXE_qmprestore"))
            .args(["verify", "--dir"])
            .arg(&disk_dir)
            .args(["--name", "vm1", "--metrics-file"])
            .arg(&vmetrics)
            .output()
            .unwrap()
    };
    assert!(verify().status.success());
    let text = std::fs::read_to_string(&vmetrics).unwrap();
    assert!(
        text.contains("qmprestore_last_verify_success{name=\"vm1\",dir=\""),
        "{text}"
    );
    assert!(text.contains("} 1\n"), "{text}");
    assert_promtool_accepts(&vmetrics);
    let newest = files(&disk_dir, "INC-").pop().unwrap();
    std::fs::write(disk_dir.join(format!("{newest}.manifest")), "{").unwrap();
    assert_eq!(verify().status.code(), Some(1));
    let text = std::fs::read_to_string(&vmetrics).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("qmprestore_last_verify_problems{") && l.ends_with(" 1")),
        "{text}"
    );
    assert_promtool_accepts(&vmetrics);
    vm.kill();
}
