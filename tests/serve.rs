//! `qmprestore serve` read by clients we did not write: qemu-img, nbdcopy, nbdinfo, the
//! libnbd Python module, qemu-nbd as the oracle for block status — and by hostile raw
//! clients. Every point of a chain (zero clusters, a compressed INC, a disk that grows;
//! 512 B, 64 KiB and 2 MiB clusters) is an export equal to its model.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testkit::oracle::{apply, qemu_img, qemu_io, GuestWrite as W};

const MIB: usize = 1 << 20;

/// A backup directory: FULL, an INC with zeroing, a compressed INC, an INC that grows the
/// disk from 8 to 10 MiB; models of every point; manifests for every file.
struct Backups {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    /// (file name, model) per point, oldest first.
    points: Vec<(String, Vec<u8>)>,
}

fn backups(cluster: usize) -> Backups {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("disk1");
    std::fs::create_dir(&dir).unwrap();
    let opt = format!("cluster_size={cluster}");
    let mut model = vec![0u8; 8 * MIB];
    let mut points = Vec::new();
    let steps: Vec<Vec<W>> = vec![
        vec![
            W::Data(0, 3 * MIB, 0x11),
            W::Data(5 * MIB, MIB, 0x12),
            W::Data(7 * MIB + 512, 4096, 0x13),
        ],
        vec![
            W::Data(64 * 1024 + 512, 128 * 1024, 0x21),
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
    for (i, ws) in steps.iter().enumerate() {
        let name = if i == 0 {
            "FULL-1000-disk1.qcow2".to_string()
        } else {
            format!("INC-{}-disk1.qcow2", 1000 + 100 * i)
        };
        let size = if i == 3 { 10 * MIB } else { 8 * MIB };
        // An INC holds whole clusters, as a backup job copies them: written over the
        // previous point (a raw model as its backing file), then detached.
        let prev = tmp.path().join(format!("model-{i}.raw"));
        std::fs::write(&prev, &model).unwrap();
        let mut create = vec!["create", "-q", "-f", "qcow2", "-o", &opt];
        let prev_s = prev.display().to_string();
        if i > 0 {
            create.extend(["-b", &prev_s, "-F", "raw"]);
        }
        let size_s = size.to_string();
        create.extend([name.as_str(), &size_s]);
        qemu_img(&dir, &create);
        model.resize(size, 0);
        let cmds: Vec<String> = ws.iter().map(|w| apply(&mut model, w)).collect();
        qemu_io(&dir, &name, &cmds);
        if i > 0 {
            qemu_img(&dir, &["rebase", "-q", "-u", "-b", "", &name]);
        }
        if i == 2 {
            let tmp = format!("{name}.tmpc");
            qemu_img(
                &dir,
                &["convert", "-c", "-O", "qcow2", "-o", &opt, &name, &tmp],
            );
            std::fs::rename(dir.join(&tmp), dir.join(&name)).unwrap();
            qemu_io(&dir, &name, &["write -z 5242880 524288"]);
        }
        qmpbackup::store::manifest::write_manifest(&dir.join(&name), Some("u-1")).unwrap();
        points.push((name, model.clone()));
    }
    Backups {
        _tmp: tmp,
        dir,
        points,
    }
}

/// A running `qmprestore serve`, stopped (SIGKILL) on drop.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(dir: &Path, extra: &[&str]) -> Server {
        let socket = dir
            .parent()
            .unwrap()
            .join(format!("s-{}.sock", std::process::id()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
            .arg("serve")
            .arg("--dir")
            .arg(dir)
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The URI on stdout says it listens.
        let mut first = [0u8; 1];
        let got = child.stdout.as_mut().unwrap().read(&mut first).unwrap_or(0);
        if got != 1 {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "serve did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Server { child, socket }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Stops the server with SIGTERM; its exit code and stderr.
    fn stop(mut self) -> (i32, String) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let out = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap())
            .wait_with_output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    }
}

fn tool(cmd: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tool_ok(cmd: &str, args: &[&str]) -> String {
    let (c, o, e) = tool(cmd, args);
    assert_eq!(c, 0, "{cmd} {args:?}: {o}{e}");
    o
}

/// The export read whole by qemu-img and by nbdcopy -C 4 equals the model.
fn assert_export_is(s: &Server, export: &str, model: &[u8], scratch: &Path) {
    let a = scratch.join("a.raw");
    let b = scratch.join("b.raw");
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    let uri = s.uri(export);
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            a.to_str().unwrap(),
        ],
    );
    let got = std::fs::read(&a).unwrap();
    let first = got.iter().zip(model).position(|(x, y)| x != y);
    assert!(
        got == model,
        "{export}: qemu-img read differs (sizes {} {}, first difference at {first:?})",
        got.len(),
        model.len()
    );
    tool_ok("nbdcopy", &["-C", "4", &uri, b.to_str().unwrap()]);
    assert!(
        std::fs::read(&b).unwrap() == model,
        "{export}: nbdcopy read differs"
    );
}

/// Copies of the backup files in `scratch`, each linked to the one before it as its backing
/// file: what qemu-img and qemu-nbd read as each point (oldest first).
fn linked_chain(b: &Backups, scratch: &Path) -> Vec<PathBuf> {
    let mut linked: Vec<PathBuf> = Vec::new();
    for (name, _) in &b.points {
        let copy = scratch.join(format!("l-{name}"));
        std::fs::copy(b.dir.join(name), &copy).unwrap();
        if let Some(p) = linked.last() {
            let (p, c) = (p.to_str().unwrap(), copy.to_str().unwrap());
            tool_ok(
                "qemu-img",
                &["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", p, c],
            );
        }
        linked.push(copy);
    }
    linked
}

#[test]
fn every_point_is_an_export_equal_to_its_model() {
    for cluster in [512, 65536, 2 << 20] {
        let b = backups(cluster);
        let s = Server::start(&b.dir, &[]);
        let scratch = b.dir.parent().unwrap();
        for (name, model) in &b.points {
            assert_export_is(&s, name, model, scratch);
            // The other --until spellings.
            let stem = name.trim_end_matches(".qcow2");
            assert_export_is(&s, stem, model, scratch);
        }
        assert_export_is(&s, "INC-1200", &b.points[2].1, scratch);
        // The default export is the newest point.
        assert_export_is(&s, "", &b.points[3].1, scratch);
        // The linked chain read by qemu-img says the same (the models are right).
        let linked = linked_chain(&b, scratch).pop().unwrap();
        let raw = scratch.join("a.raw");
        tool_ok(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "qcow2",
                raw.to_str().unwrap(),
                linked.to_str().unwrap(),
            ],
        );
        let (c, e) = s.stop();
        assert_eq!(c, 0, "{e}");
    }
}

#[test]
fn nbdinfo_lists_every_point_with_its_size_and_description() {
    let b = backups(65536);
    let s = Server::start(&b.dir, &["--until", "INC-1100"]);
    let out = tool_ok("nbdinfo", &["--list", "--json", &s.uri("")]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let exports = v["exports"].as_array().unwrap();
    for (name, model) in &b.points {
        let e = exports
            .iter()
            .find(|e| e["export-name"] == name.as_str())
            .unwrap_or_else(|| panic!("{name} not listed: {out}"));
        assert_eq!(e["export-size"], model.len() as u64, "{name}");
        let level = &name[..name.find('-').unwrap()];
        assert!(e["description"].as_str().unwrap().starts_with(level), "{e}");
    }
    // --until picks the default export.
    let size = tool_ok("nbdinfo", &["--size", &s.uri("")]);
    assert_eq!(size.trim(), (8 * MIB).to_string());
    assert_export_is(&s, "", &b.points[1].1, b.dir.parent().unwrap());
    // An unknown name is an error the client reports, not a hang.
    let (c, _, e) = tool("nbdinfo", &[&s.uri("INC-999")]);
    assert_ne!(c, 0);
    assert!(e.contains("INC-999") || e.contains("unknown"), "{e}");
}

/// `nbdinfo --map[=CTX]` as (start, length, flags) rows.
fn map(uri: &str, ctx: &str) -> Vec<(u64, u64, u32)> {
    let arg = if ctx.is_empty() {
        "--map".to_string()
    } else {
        format!("--map={ctx}")
    };
    tool_ok("nbdinfo", &[&arg, uri])
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

/// Merges adjacent rows of equal flags; for base:allocation a ZERO bit without HOLE (data
/// that happens to read as zero, which qemu-nbd learns from the host file's holes) is
/// dropped: it is a hint, and the test checks separately that our zero ranges read zero.
fn normalise(rows: Vec<(u64, u64, u32)>, allocation: bool) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for (s, l, mut f) in rows {
        if allocation && f & 1 == 0 {
            f = 0;
        }
        match out.last_mut() {
            Some(last) if last.2 == f && last.0 + last.1 == s => last.1 += l,
            _ => out.push((s, l, f)),
        }
    }
    out
}

/// qemu-nbd serving a file, stopped on drop.
struct QemuNbd(Child, PathBuf);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_nbd(file: &Path, socket: &Path) -> QemuNbd {
    let child = Command::new("qemu-nbd")
        .args(["-r", "-A", "-t", "-f", "qcow2", "-k"])
        .arg(socket)
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    QemuNbd(child, socket.to_path_buf())
}

#[test]
fn block_status_agrees_with_qemu_nbd_and_zero_reads_zero() {
    for cluster in [512, 65536] {
        let b = backups(cluster);
        let s = Server::start(&b.dir, &[]);
        let scratch = b.dir.parent().unwrap();
        let linked = linked_chain(&b, scratch);
        for (i, ((name, model), copy)) in b.points.iter().zip(&linked).enumerate() {
            let q = qemu_nbd(copy, &scratch.join(format!("q{i}.sock")));
            let quri = format!("nbd+unix:///?socket={}", q.1.display());
            for (ctx, alloc) in [("", true), ("qemu:allocation-depth", false)] {
                let ours = normalise(map(&s.uri(name), ctx), alloc);
                let theirs = normalise(map(&quri, ctx), alloc);
                assert_eq!(ours, theirs, "{name} {ctx:?} cluster {cluster}");
            }
            for (start, len, flags) in map(&s.uri(name), "") {
                if flags & 2 != 0 {
                    let r = &model[start as usize..(start + len) as usize];
                    assert!(
                        r.iter().all(|&b| b == 0),
                        "{name}: zero range {start}+{len} is not zero"
                    );
                }
            }
            drop(q);
        }
    }
}

/// The libnbd Python module in strict mode: random unaligned reads across cluster, table and
/// layer boundaries, the last byte, zero-length and past-the-end requests, REQ_ONE, with
/// and without structured replies, several connections at once.
#[test]
fn libnbd_strict_random_reads_and_requests() {
    let probe = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("skipped: python3-libnbd is not installed (apt-get install python3-libnbd)");
        return;
    }
    let b = backups(65536);
    let s = Server::start(&b.dir, &[]);
    let scratch = b.dir.parent().unwrap();
    let (name, model) = &b.points[3];
    let model_path = scratch.join("model.raw");
    std::fs::write(&model_path, model).unwrap();
    let script = r#"
import nbd, random, sys
uri, export, model_path = sys.argv[1], sys.argv[2], sys.argv[3]
model = open(model_path, 'rb').read()
size = len(model)
def connect(structured=True):
    h = nbd.NBD()
    h.set_strict_mode(nbd.STRICT_COMMANDS | nbd.STRICT_FLAGS | nbd.STRICT_BOUNDS | nbd.STRICT_ZERO_SIZE * 0)
    h.set_request_structured_replies(structured)
    h.add_meta_context("base:allocation")
    h.add_meta_context("qemu:allocation-depth")
    h.set_export_name(export)
    h.connect_uri(uri.replace('/?', '/' + export + '?', 1) if export else uri)
    return h
handles = [connect(True), connect(False), connect(True)]
assert handles[0].get_structured_replies_negotiated()
assert not handles[1].get_structured_replies_negotiated()
assert handles[0].can_meta_context("base:allocation")
assert handles[0].can_meta_context("qemu:allocation-depth")
rng = random.Random(7)
edges = [0, 512, 65536, 1 << 20, 2 << 20, 8 << 20, size]
for i in range(3000):
    h = handles[i % len(handles)]
    if i % 3 == 0:
        e = rng.choice(edges)
        off = max(0, min(size - 1, e + rng.randint(-70000, 70000)))
    else:
        off = rng.randrange(size)
    n = rng.randint(1, min(size - off, 300000))
    if i % 7 == 0 and h.get_structured_replies_negotiated():
        # Don't fragment: one data chunk holding the whole range.
        chunks = []
        def chunk(sub, o, status, err):
            chunks.append((o, status, bytes(sub)))
            return 0
        got = h.pread_structured(n, off, chunk, flags=nbd.CMD_FLAG_DF)
        assert len(chunks) == 1 and chunks[0][1] == nbd.READ_DATA, chunks[:3]
    else:
        got = h.pread(n, off)
    assert got == model[off:off + n], (i, off, n)
# the last byte
for h in handles:
    assert h.pread(1, size - 1) == model[size - 1:]
# zero length
handles[0].pread(0, 0)
# past the end: an error, and the connection goes on
for h in handles:
    h.set_strict_mode(0)
    try:
        h.pread(2, size - 1)
        raise SystemExit("read past the end succeeded")
    except nbd.Error as e:
        assert e.errnum in (22, 75), e
    assert h.pread(4, 0) == model[0:4]
# block status with REQ_ONE: one extent per context, within the request
seen = []
def cb(ctx, off, entries, err):
    seen.append((ctx, list(entries)))
    return 0
h = handles[0]
h.block_status(100000, 4096, cb, nbd.CMD_FLAG_REQ_ONE)
assert len(seen) == 2, seen
for ctx, entries in seen:
    assert len(entries) == 2 and entries[0] <= 100000, (ctx, entries)
# ... and without: the extents cover the request from its start
seen.clear()
h.block_status(size, 0, cb)
for ctx, entries in seen:
    assert sum(entries[0::2]) >= size, (ctx, entries)
for h in handles:
    h.shutdown()
print("ok")
"#;
    let py = scratch.join("strict.py");
    std::fs::write(&py, script).unwrap();
    let out = tool_ok(
        "/usr/bin/python3",
        &[
            py.to_str().unwrap(),
            &s.uri(""),
            name,
            model_path.to_str().unwrap(),
        ],
    );
    assert!(out.contains("ok"), "{out}");
}

/// A raw client: the handshake up to GO on `export`, with structured replies.
fn raw_client(socket: &Path, export: &str) -> UnixStream {
    let mut c = UnixStream::connect(socket).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 18];
    c.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    c.write_all(&3u32.to_be_bytes()).unwrap();
    // An unknown option first: ERR_UNSUP, and haggling goes on.
    send_option(&mut c, 99, b"junk");
    let (kind, _) = read_option_reply(&mut c);
    assert_eq!(kind, (1 << 31) + 1);
    send_option(&mut c, 8, &[]);
    assert_eq!(read_option_reply(&mut c).0, 1);
    let mut go = (export.len() as u32).to_be_bytes().to_vec();
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut c, 7, &go);
    loop {
        let (kind, _) = read_option_reply(&mut c);
        if kind == 1 {
            break;
        }
        assert_eq!(kind, 3, "GO failed");
    }
    c
}

fn send_option(c: &mut UnixStream, option: u32, data: &[u8]) {
    let mut m = b"IHAVEOPT".to_vec();
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    c.write_all(&m).unwrap();
}

fn read_option_reply(c: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).unwrap();
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    c.read_exact(&mut d).unwrap();
    (kind, d)
}

fn request(c: &mut UnixStream, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
    let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    c.write_all(&m).unwrap();
}

/// Reads one structured chunk: (flags, type, cookie, payload).
fn chunk(c: &mut UnixStream) -> (u16, u16, u64, Vec<u8>) {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x668e_33ef);
    let flags = u16::from_be_bytes([h[4], h[5]]);
    let kind = u16::from_be_bytes([h[6], h[7]]);
    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    c.read_exact(&mut d).unwrap();
    (flags, kind, cookie, d)
}

/// The error of a reply that must be one error chunk.
fn error_of(c: &mut UnixStream, cookie: u64) -> u32 {
    let (flags, kind, got, d) = chunk(c);
    assert_eq!((got, flags & 1, kind), (cookie, 1, 0x8001), "{d:?}");
    u32::from_be_bytes(d[0..4].try_into().unwrap())
}

/// Reads a read's reply chunks into bytes (holes as zeros).
fn read_reply(c: &mut UnixStream, cookie: u64, offset: u64, len: usize) -> Result<Vec<u8>, u32> {
    let mut out = vec![0xeeu8; len];
    loop {
        let (flags, kind, got, d) = chunk(c);
        assert_eq!(got, cookie);
        match kind {
            1 => {
                let at = u64::from_be_bytes(d[0..8].try_into().unwrap()) - offset;
                out[at as usize..at as usize + d.len() - 8].copy_from_slice(&d[8..]);
            }
            2 => {
                let at = (u64::from_be_bytes(d[0..8].try_into().unwrap()) - offset) as usize;
                let n = u32::from_be_bytes(d[8..12].try_into().unwrap()) as usize;
                out[at..at + n].fill(0);
            }
            0 => {}
            0x8001 => return Err(u32::from_be_bytes(d[0..4].try_into().unwrap())),
            k => panic!("chunk type {k}"),
        }
        if flags & 1 != 0 {
            return Ok(out);
        }
    }
}

#[test]
fn hostile_clients_cost_nothing_and_get_errors_not_crashes() {
    let b = backups(65536);
    let s = Server::start(&b.dir, &["--max-connections", "2000"]);
    let (name, model) = &b.points[3];
    let size = model.len() as u64;
    // Malformed requests get errors; the connection stays usable.
    let mut c = raw_client(&s.socket, name);
    request(&mut c, 0, 0, 1, size - 1, 2); // past the end
    assert_eq!(error_of(&mut c, 1), 22);
    request(&mut c, 0, 0, 2, 0, 64 << 20); // over the maximum
    assert_eq!(error_of(&mut c, 2), 75);
    request(&mut c, 1 << 9, 0, 3, 0, 4096); // unknown flag
    assert_eq!(error_of(&mut c, 3), 22);
    request(&mut c, 0, 77, 4, 0, 4096); // unknown command
    assert_eq!(error_of(&mut c, 4), 22);
    request(&mut c, 0, 7, 5, 0, 4096); // block status without a context
    assert_eq!(error_of(&mut c, 5), 22);
    request(&mut c, 0, 1, 6, 0, 4096); // a write to a read-only export, payload dropped
    c.write_all(&vec![0x55; 4096]).unwrap();
    assert_eq!(error_of(&mut c, 6), 1);
    request(&mut c, 0, 1, 7, 0, 40 << 20); // an oversized write: its payload is dropped too
    let big = vec![0u8; 1 << 20];
    for _ in 0..40 {
        c.write_all(&big).unwrap();
    }
    assert_eq!(error_of(&mut c, 7), 75);
    request(&mut c, 0, 0, 8, 4096, 8192);
    assert_eq!(
        read_reply(&mut c, 8, 4096, 8192).unwrap(),
        model[4096..12288]
    );
    // A client that vanishes mid-reply.
    for _ in 0..20 {
        let mut v = raw_client(&s.socket, name);
        request(&mut v, 0, 0, 1, 0, size as u32);
        let mut some = [0u8; 1000];
        v.read_exact(&mut some).unwrap();
        drop(v);
    }
    // Random bytes at every handshake stage.
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for stage in 0..4 {
        for _ in 0..25 {
            let mut g = UnixStream::connect(&s.socket).unwrap();
            g.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut greeting = [0u8; 18];
            g.read_exact(&mut greeting).unwrap();
            if stage >= 1 {
                g.write_all(&3u32.to_be_bytes()).unwrap();
            }
            if stage >= 2 {
                let mut m = b"IHAVEOPT".to_vec();
                m.extend_from_slice(&7u32.to_be_bytes());
                if stage == 2 {
                    m.extend_from_slice(&u32::MAX.to_be_bytes()); // absurd option length
                }
                let _ = g.write_all(&m);
            }
            let junk: Vec<u8> = (0..next() % 300).map(|_| next() as u8).collect();
            let _ = g.write_all(&junk);
            let _ = g.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = g.read_to_end(&mut sink);
        }
    }
    // Garbage after the handshake closes only that connection.
    let mut g = raw_client(&s.socket, name);
    g.write_all(&[0xAB; 64]).unwrap();
    let mut sink = Vec::new();
    let _ = g.read_to_end(&mut sink);
    // 1,000 connections opened and dropped.
    for _ in 0..1000 {
        drop(UnixStream::connect(&s.socket).unwrap());
    }
    // The server still serves, correctly, and its memory stayed bounded.
    let mut c = raw_client(&s.socket, name);
    request(&mut c, 0, 0, 9, 0, size as u32);
    assert!(read_reply(&mut c, 9, 0, size as usize).unwrap() == *model);
    let rss = s.rss_kib();
    assert!(rss < 400 * 1024, "peak RSS {rss} KiB");
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_flipped_byte_fails_that_read_with_eio_and_others_go_on() {
    let b = backups(65536);
    let (name, model) = &b.points[0];
    // Flip a byte of guest data at 5 MiB + 100 in the FULL's file (0x12 there).
    let path = b.dir.join(name);
    let mut bytes = std::fs::read(&path).unwrap();
    let pattern = vec![0x12u8; 65536];
    let at = bytes
        .windows(65536)
        .position(|w| w == pattern.as_slice())
        .expect("the 0x12 cluster");
    bytes[at + 100] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let s = Server::start(&b.dir, &["--until", name]);
    let mut c = raw_client(&s.socket, "");
    let bad = 5 * MIB as u64;
    request(&mut c, 0, 0, 1, bad, 65536);
    assert_eq!(read_reply(&mut c, 1, bad, 65536), Err(5));
    request(&mut c, 0, 0, 2, 0, 65536);
    assert_eq!(read_reply(&mut c, 2, 0, 65536).unwrap(), model[..65536]);
    let (code, err) = s.stop();
    assert_eq!(code, 0);
    assert!(err.contains(name) && err.contains("5242880"), "{err}");
}

/// Whether this machine can mount an export's filesystem: root, /dev/fuse, nbdfuse, a loop
/// device.
fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new("/dev/fuse").exists()
        && Path::new("/dev/loop-control").exists()
        && Command::new("nbdfuse").arg("--version").output().is_ok()
}

/// nbdfuse serving an export as a file, and that file mounted read-only; undone on drop.
struct Mounted {
    fuse_dir: PathBuf,
    mnt: PathBuf,
    fuse: Child,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.fuse_dir)
            .status();
        let _ = self.fuse.kill();
        let _ = self.fuse.wait();
    }
}

fn mount_export(uri: &str, at: &Path) -> Mounted {
    let fuse_dir = at.join("fuse");
    let mnt = at.join("mnt");
    std::fs::create_dir_all(&fuse_dir).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let fuse = Command::new("nbdfuse")
        .arg(fuse_dir.join("disk"))
        .arg(uri)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fuse_dir.join("disk").exists() {
        assert!(Instant::now() < deadline, "nbdfuse did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = Mounted {
        fuse_dir,
        mnt,
        fuse,
    };
    tool_ok(
        "mount",
        &[
            "-o",
            "loop,ro,noload",
            m.fuse_dir.join("disk").to_str().unwrap(),
            m.mnt.to_str().unwrap(),
        ],
    );
    m
}

#[test]
fn file_level_restore_through_nbdfuse_shows_each_points_files() {
    if !can_mount() {
        eprintln!("skipped: needs root, /dev/fuse, loop devices and nbdfuse");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fs");
    std::fs::create_dir(&dir).unwrap();
    let raw = tmp.path().join("fs.raw");
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    tool_ok("mkfs.ext4", &["-q", "-F", raw.to_str().unwrap()]);
    let edit = |text: &str| {
        tool_ok(
            "mount",
            &["-o", "loop", raw.to_str().unwrap(), work.to_str().unwrap()],
        );
        std::fs::write(work.join("file.txt"), text).unwrap();
        tool_ok("umount", &[work.to_str().unwrap()]);
    };
    edit("as at the full\n");
    let full = dir.join("FULL-1000-fs.qcow2");
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            full.to_str().unwrap(),
        ],
    );
    edit("changed by the inc\n");
    // The INC: only the clusters that differ from the FULL, detached from it.
    let inc = dir.join("INC-1100-fs.qcow2");
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            full.to_str().unwrap(),
            "-F",
            "qcow2",
            raw.to_str().unwrap(),
            inc.to_str().unwrap(),
        ],
    );
    tool_ok(
        "qemu-img",
        &["rebase", "-u", "-b", "", inc.to_str().unwrap()],
    );
    for f in [&full, &inc] {
        qmpbackup::store::manifest::write_manifest(f, None).unwrap();
    }
    let s = Server::start(&dir, &[]);
    for (export, text) in [
        ("FULL-1000-fs.qcow2", "as at the full\n"),
        ("", "changed by the inc\n"),
    ] {
        let at = tmp.path().join(format!("m-{}", export.len()));
        let m = mount_export(&s.uri(export), &at);
        assert_eq!(
            std::fs::read_to_string(m.mnt.join("file.txt")).unwrap(),
            text,
            "{export:?}"
        );
    }
}

fn qmprestore(args: &[&str]) -> (i32, String, String) {
    tool(env!("CARGO_BIN_EXE_qmprestore"), args)
}

/// `qmprestore serve` of `dir` on `socket` with `extra`, which must fail to start: its
/// stderr.
fn serve_refused(dir: &Path, socket: &Path, extra: &[&str]) -> String {
    let mut all = vec![
        "serve",
        "--dir",
        dir.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
    ];
    all.extend(extra);
    let (code, _, err) = qmprestore(&all);
    assert_ne!(code, 0, "serve {extra:?} started");
    err
}

fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .filter(|(n, _)| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

#[test]
fn serving_shares_the_directory_with_readers_and_keeps_rewriters_out() {
    let b = backups(65536);
    let d = b.dir.to_str().unwrap();
    let before = contents(&b.dir);
    let s = Server::start(&b.dir, &[]);
    let pid = s.child.id();
    // Commands that rewrite files are refused, naming the server, and change nothing.
    for cmd in ["commit", "snapshotrebase", "rebase"] {
        let (code, _, err) = qmprestore(&[cmd, "--dir", d]);
        assert_ne!(code, 0, "{cmd} ran during serve");
        assert!(
            err.contains(&format!("qmprestore serve (pid {pid})"))
                && err.contains("run again when it is done"),
            "{cmd}: {err}"
        );
    }
    assert!(
        contents(&b.dir) == before,
        "a refused command changed files"
    );
    // Readers go on beside it.
    let out = b._tmp.path().join("merged.qcow2");
    let (code, _, err) = qmprestore(&["merge", "--dir", d, "--targetfile", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = qmprestore(&["verify", "--dir", d]);
    assert_eq!(code, 0, "{err}");
    // A second server too.
    let other = tempfile::tempdir().unwrap();
    let sock2 = other.path().join("second.sock");
    let mut second = Command::new(env!("CARGO_BIN_EXE_qmprestore"))
        .args(["serve", "--dir", d, "--socket", sock2.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = [0u8; 1];
    let started = second.stdout.as_mut().unwrap().read(&mut line).unwrap_or(0) == 1;
    let _ = second.kill();
    let _ = second.wait();
    assert!(started, "a second server was refused");
    let (code, _) = s.stop();
    assert_eq!(code, 0);
    // Released at exit: commit now runs.
    let (code, _, err) = qmprestore(&["commit", "--dir", d]);
    assert_eq!(code, 0, "{err}");
}

/// A CA, a server certificate (localhost) and a client certificate, in `dir` with the
/// names GnuTLS clients (qemu, libnbd) look for; and a second directory with only the CA.
fn certificates(dir: &Path) {
    let sh = |script: &str| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "openssl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    sh(&format!(
        "openssl req -x509 {key} -keyout ca-key.pem -out ca-cert.pem -days 2 -subj /CN=ca \
         -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign"
    ));
    for (who, ext) in [
        (
            "server",
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth",
        ),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        sh(&format!(
            "openssl req {key} -keyout {who}-key.pem -out {who}.csr -subj /CN={who} && \
             printf '{ext}\\nbasicConstraints=CA:FALSE\\n' > {who}.ext && \
             openssl x509 -req -in {who}.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
             -out {who}-cert.pem -days 2 -extfile {who}.ext"
        ));
    }
}

#[test]
fn tls_is_required_and_verified_clients_read_every_point() {
    let b = backups(65536);
    let certs = b._tmp.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    certificates(&certs);
    let c = |name: &str| certs.join(name).display().to_string();
    let s = Server::start(
        &b.dir,
        &[
            "--tls-cert",
            &c("server-cert.pem"),
            "--tls-key",
            &c("server-key.pem"),
            "--tls-ca",
            &c("ca-cert.pem"),
        ],
    );
    // Before STARTTLS every option but ABORT is refused with ERR_TLS_REQD; STARTTLS is
    // accepted.
    let mut raw = UnixStream::connect(&s.socket).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 18];
    raw.read_exact(&mut greeting).unwrap();
    raw.write_all(&3u32.to_be_bytes()).unwrap();
    for option in [3u32, 6, 8, 99] {
        send_option(&mut raw, option, &[]);
        assert_eq!(
            read_option_reply(&mut raw).0,
            (1 << 31) + 5,
            "option {option}"
        );
    }
    send_option(&mut raw, 5, &[]);
    assert_eq!(read_option_reply(&mut raw).0, 1);
    drop(raw);
    // A plain client is told TLS is required.
    let plain = format!("nbd+unix:///?socket={}", s.socket.display());
    let (code, _, err) = tool("nbdinfo", &["--size", &plain]);
    assert_ne!(code, 0);
    assert!(err.contains("TLS"), "{err}");
    // libnbd (nbdcopy) with the client certificate, verifying the server's.
    let tls_uri = |export: &str| {
        format!(
            "nbds+unix:///{export}?socket={}&tls-certificates={}",
            s.socket.display(),
            certs.display()
        )
    };
    let scratch = b._tmp.path();
    for (name, model) in &b.points {
        let out = scratch.join("tls.raw");
        let _ = std::fs::remove_file(&out);
        tool_ok(
            "nbdcopy",
            &["-C", "4", &tls_uri(name), out.to_str().unwrap()],
        );
        assert!(std::fs::read(&out).unwrap() == *model, "{name} over TLS");
    }
    // qemu-img with tls-creds-x509 (GnuTLS), the default export.
    let out = scratch.join("qemu-tls.raw");
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                certs.display()
            ),
            "--image-opts",
            &format!(
                "driver=nbd,path={},tls-creds=tls0,tls-hostname=localhost",
                s.socket.display()
            ),
            "-O",
            "raw",
            out.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&out).unwrap() == b.points.last().unwrap().1);
    // Without a client certificate signed by the CA: refused.
    let ca_only = scratch.join("ca-only");
    std::fs::create_dir(&ca_only).unwrap();
    std::fs::copy(certs.join("ca-cert.pem"), ca_only.join("ca-cert.pem")).unwrap();
    let uri = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        s.socket.display(),
        ca_only.display()
    );
    let (code, out, _) = tool("nbdinfo", &["--size", &uri]);
    assert_ne!(code, 0, "a client without a certificate read {out}");
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
}

#[test]
fn unusable_tls_files_are_refused_at_start_up() {
    let b = backups(65536);
    let certs = b._tmp.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    certificates(&certs);
    let sock = b._tmp.path().join("x.sock");
    let c = |name: &str| certs.join(name).display().to_string();
    for (args, says) in [
        (
            vec![
                "--tls-cert",
                &c("server-key.pem"),
                "--tls-key",
                &c("server-key.pem"),
            ],
            "no certificate",
        ),
        (
            vec![
                "--tls-cert",
                &c("server-cert.pem"),
                "--tls-key",
                &c("server-cert.pem"),
            ],
            "no private key",
        ),
        (
            vec![
                "--tls-cert",
                &c("server-cert.pem"),
                "--tls-key",
                &c("client-key.pem"),
            ],
            "do not make a usable pair",
        ),
        (vec!["--tls-cert", &c("server-cert.pem")], "--tls-key"),
    ] {
        let err = serve_refused(&b.dir, &sock, &args);
        assert!(err.contains(says), "{says}: {err}");
    }
}

/// qemu-io on an export (raw over NBD); the commands must all succeed.
fn qemu_io_nbd(uri: &str, cmds: &[String]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(uri);
    let (code, out, err) = tool("qemu-io", &args);
    assert!(
        code == 0 && !out.contains("failed") && !err.contains("failed"),
        "qemu-io {cmds:?}: {out}{err}"
    );
}

#[test]
fn an_overlay_takes_writes_keeps_them_across_restarts_and_never_touches_the_backups() {
    let b = backups(65536);
    let before = contents(&b.dir);
    let scratch = b._tmp.path();
    let ov = scratch.join("overlay.qcow2");
    let ov_s = ov.to_str().unwrap();
    let (newest, base_model) = b.points.last().unwrap().clone();
    let mut model = base_model.clone();
    let s = Server::start(&b.dir, &["--overlay", ov_s]);
    // Writes of every kind, unaligned ones included (their clusters are completed from
    // the backups), with and without FUA, then a trim of whole clusters.
    let writes = [
        W::Data(100, 5000, 0x61),
        W::Data(3 * MIB - 512, 70_000, 0x62),
        W::Zero(MIB + 4096, 300_000),
        W::Data(9 * MIB + 1, 65536, 0x63),
    ];
    let mut cmds: Vec<String> = writes.iter().map(|w| apply(&mut model, w)).collect();
    cmds.push("write -f -P 0x64 6291456 131072".into());
    model[6 * MIB..6 * MIB + 131072].fill(0x64);
    cmds.push(format!("discard {} {}", 4 * MIB, MIB));
    model[4 * MIB..5 * MIB].fill(0);
    cmds.push("flush".into());
    qemu_io_nbd(&s.uri(""), &cmds);
    assert_export_is(&s, "", &model, scratch);
    // The point under its own name is still the backup, read-only.
    assert_export_is(&s, &newest, &base_model, scratch);
    let (code, _, err) = tool(
        "qemu-io",
        &["-f", "raw", "-c", "write 0 512", &s.uri(&newest)],
    );
    assert!(
        code != 0 || err.contains("read-only") || err.contains("failed"),
        "{err}"
    );
    // What the overlay holds is depth 1.
    let depth = map(&s.uri(""), "qemu:allocation-depth");
    assert!(
        depth
            .iter()
            .any(|&(o, l, d)| d == 1 && o <= 100 && o + l >= 5100),
        "{depth:?}"
    );
    let (code, err) = s.stop();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("every write is flushed"), "{err}");
    let (code, out, e) = tool("qemu-img", &["check", ov_s]);
    assert_eq!(code, 0, "qemu-img check: {out}{e}");
    // A restart continues from the overlay.
    let s = Server::start(&b.dir, &["--overlay", ov_s]);
    assert_export_is(&s, "", &model, scratch);
    qemu_io_nbd(&s.uri(""), &["write -P 0x65 0 4096".to_string()]);
    model[..4096].fill(0x65);
    assert_export_is(&s, "", &model, scratch);
    let (code, _) = s.stop();
    assert_eq!(code, 0);
    // Another point with the same overlay is refused, naming the point it belongs to.
    let (older, _) = &b.points[1];
    let sock = scratch.join("other.sock");
    let err = serve_refused(&b.dir, &sock, &["--until", older, "--overlay", ov_s]);
    assert!(
        err.contains("holds writes over another point") && err.contains(&newest),
        "{err}"
    );
    // A file that is not an overlay of ours is not taken.
    let foreign = scratch.join("foreign.qcow2");
    tool_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            foreign.to_str().unwrap(),
            "10M",
        ],
    );
    let err = serve_refused(&b.dir, &sock, &["--overlay", foreign.to_str().unwrap()]);
    assert!(
        err.contains("not made by `qmprestore serve --overlay`"),
        "{err}"
    );
    assert!(contents(&b.dir) == before, "the backups changed");
}

#[test]
fn an_overlay_killed_mid_write_is_readable_with_at_most_leaks() {
    let b = backups(65536);
    let scratch = b._tmp.path();
    let ov = scratch.join("overlay.qcow2");
    let ov_s = ov.to_str().unwrap();
    let s = Server::start(&b.dir, &["--overlay", ov_s]);
    // A stream of scattered writes with flushes between, killed while it runs.
    let script = scratch.join("writes");
    let mut text = String::new();
    for i in 0..4000u64 {
        let off = (i * 7919 * 4096) % (10 * MIB as u64 - 65536);
        text.push_str(&format!("write -P {} {} 12288\n", i % 250 + 1, off));
        if i % 50 == 0 {
            text.push_str("flush\n");
        }
    }
    std::fs::write(&script, text).unwrap();
    let mut writer = Command::new("qemu-io")
        .args(["-f", "raw", &s.uri("")])
        .stdin(std::fs::File::open(&script).unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed once the overlay holds a good part of the writes (before the writer ends).
    let t0 = Instant::now();
    while std::fs::metadata(&ov).map_or(0, |m| m.len()) < 3 * MIB as u64
        && writer.try_wait().unwrap().is_none()
        && t0.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        writer.try_wait().unwrap().is_none(),
        "the writes ended before the kill"
    );
    let mut s = s;
    let _ = s.child.kill();
    let _ = s.child.wait();
    let _ = writer.kill();
    let _ = writer.wait();
    let (code, out, err) = tool("qemu-img", &["check", ov_s]);
    assert!(
        code == 0 || code == 3,
        "qemu-img check exit {code}: {out}{err}"
    );
    // The server takes the overlay again and it reads whole.
    let s = Server::start(&b.dir, &["--overlay", ov_s]);
    let out = scratch.join("after-kill.raw");
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &s.uri(""),
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::metadata(&out).unwrap().len(),
        b.points.last().unwrap().1.len() as u64
    );
}

/// A read-only bind mount, unmounted on drop.
struct ReadOnlyView(PathBuf);

impl Drop for ReadOnlyView {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn readers_run_without_a_lock_on_read_only_media() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: a read-only bind mount needs root");
        return;
    }
    let b = backups(65536);
    let ro = b._tmp.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let bind = Command::new("mount")
        .arg("--bind")
        .arg(&b.dir)
        .arg(&ro)
        .status()
        .unwrap();
    if !bind.success() {
        eprintln!("skipped: cannot bind-mount here");
        return;
    }
    let _view = ReadOnlyView(ro.clone());
    tool_ok("mount", &["-o", "remount,bind,ro", ro.to_str().unwrap()]);
    let r = ro.to_str().unwrap();
    let (code, out, err) = qmprestore(&["list", "--dir", r]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("FULL-1000-disk1.qcow2"), "{out}");
    assert!(
        err.contains("read-only: reading it without a lock"),
        "{err}"
    );
    let s = Server::start(&ro, &[]);
    let scratch = tempfile::tempdir().unwrap();
    let (name, model) = &b.points[1];
    assert_export_is(&s, name, model, scratch.path());
    drop(s);
    // A command that changes files cannot run there, and says why.
    let (code, _, err) = qmprestore(&["commit", "--dir", r]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot create the lock file"), "{err}");
}
