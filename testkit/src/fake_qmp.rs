//! A scripted QMP peer on a unix socket: enough of QEMU for qmpbackup to run a backup
//! (disks, bitmaps, nodes, block jobs and their events), with hooks that make it hostile —
//! odd names and sizes, replies that are not JSON, an endless line, jobs that never end,
//! silence. It serves one client at a time, as QEMU does.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// One disk as `query-block` reports it. Fields are JSON values so a test can put any type
/// in them (a negative or fractional size, say).
#[derive(Clone, Debug)]
pub struct FakeDisk {
    pub device: String,
    pub qdev: Option<String>,
    pub node: String,
    pub file: String,
    pub format: String,
    pub virtual_size: Value,
    pub cluster_size: Value,
}

impl FakeDisk {
    /// A 1 MiB qcow2 disk on a virtio device with qdev id `id`.
    pub fn qcow2(id: &str, node: &str, file: &str) -> FakeDisk {
        FakeDisk {
            device: String::new(),
            qdev: Some(format!("/machine/peripheral/{id}/virtio-backend")),
            node: node.into(),
            file: file.into(),
            format: "qcow2".into(),
            virtual_size: json!(1 << 20),
            cluster_size: json!(65536),
        }
    }

    fn image(&self) -> Value {
        json!({
            "filename": self.file, "format": self.format, "virtual-size": self.virtual_size,
            "cluster-size": self.cluster_size,
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "lazy-refcounts": false}},
        })
    }
}

/// How the backup jobs this peer starts behave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jobs {
    /// Each job completes right after the transaction that started it.
    Complete,
    /// Jobs never progress; a cancel ends them (`BLOCK_JOB_CANCELLED`).
    StuckButCancellable,
    /// Jobs never progress and ignore cancels: they never end.
    Stuck,
    /// After the jobs start, the peer answers nothing at all any more.
    SilentAfterStart,
}

/// What to do with one command, decided by a test's hook before the default behaviour.
pub enum Reply {
    /// Go on with the default behaviour.
    Default,
    /// Send these bytes as they are (no newline added).
    Raw(Vec<u8>),
    /// Send `n` bytes of `x` without a line end, then nothing more.
    Endless(usize),
    /// Answer nothing.
    Silence,
}

type Hook = Box<dyn FnMut(&str, &Value) -> Reply + Send>;

/// The peer's state, shared with the test.
#[derive(Default)]
pub struct State {
    pub disks: Vec<FakeDisk>,
    /// (node, bitmap name).
    pub bitmaps: Vec<(String, String)>,
    pub nodes: Vec<String>,
    /// Running job ids.
    pub jobs: Vec<String>,
    /// Every command received, in order.
    pub commands: Vec<String>,
    pub silent: bool,
}

pub struct FakeQemu {
    pub path: PathBuf,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeQemu {
    /// Starts a peer on `path` with these disks and job behaviour; `hook` sees every command
    /// first.
    pub fn start(
        path: &Path,
        disks: Vec<FakeDisk>,
        jobs: Jobs,
        hook: impl FnMut(&str, &Value) -> Reply + Send + 'static,
    ) -> FakeQemu {
        let listener = UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(Mutex::new(State {
            disks,
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let mut hook: Hook = Box::new(hook);
        let thread = std::thread::spawn(move || {
            while !sp.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        serve(s, &st, jobs, &mut hook, &sp);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FakeQemu {
            path: path.to_path_buf(),
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn socket(&self) -> String {
        self.path.display().to_string()
    }

    /// Whether a command of this name was received.
    pub fn received(&self, command: &str) -> bool {
        self.state
            .lock()
            .unwrap()
            .commands
            .iter()
            .any(|c| c == command)
    }
}

impl Drop for FakeQemu {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn send(w: &mut UnixStream, v: &Value) -> bool {
    let mut line = v.to_string();
    line.push_str("\r\n");
    w.write_all(line.as_bytes()).is_ok()
}

fn serve(s: UnixStream, state: &Mutex<State>, jobs: Jobs, hook: &mut Hook, stop: &AtomicBool) {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    if !send(
        &mut w,
        &json!({"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "fake"}, "capabilities": []}}),
    ) {
        return;
    }
    let mut line = String::new();
    while !stop.load(Ordering::SeqCst) {
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.ends_with('\n') => {}
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return,
        }
        let msg: Value = match serde_json::from_str(line.trim()) {
            Ok(v) => v,
            Err(_) => {
                line.clear();
                continue;
            }
        };
        line.clear();
        let cmd = msg["execute"].as_str().unwrap_or("").to_string();
        let args = msg.get("arguments").cloned().unwrap_or(Value::Null);
        let id = msg.get("id").cloned().unwrap_or(Value::Null);
        state.lock().unwrap().commands.push(cmd.clone());
        if state.lock().unwrap().silent {
            continue;
        }
        match hook(&cmd, &args) {
            Reply::Default => {}
            Reply::Raw(bytes) => {
                let _ = w.write_all(&bytes);
                continue;
            }
            Reply::Endless(n) => {
                let chunk = vec![b'x'; 1 << 20];
                let mut sent = 0;
                while sent < n && !stop.load(Ordering::SeqCst) {
                    if w.write_all(&chunk).is_err() {
                        return;
                    }
                    sent += chunk.len();
                }
                continue;
            }
            Reply::Silence => continue,
        }
        let (reply, events) = answer(state, jobs, &cmd, &args);
        let mut out = match reply {
            Ok(v) => json!({"return": v}),
            Err(desc) => json!({"error": {"class": "GenericError", "desc": desc}}),
        };
        if !id.is_null() {
            out["id"] = id;
        }
        if !send(&mut w, &out) {
            return;
        }
        for e in events {
            if !send(&mut w, &e) {
                return;
            }
        }
    }
}

fn event(name: &str, data: Value) -> Value {
    json!({"event": name, "data": data, "timestamp": {"seconds": 0, "microseconds": 0}})
}

/// The default behaviour of a well-behaved QEMU 10.0 for the commands qmpbackup uses.
fn answer(
    state: &Mutex<State>,
    jobs: Jobs,
    cmd: &str,
    args: &Value,
) -> (Result<Value, String>, Vec<Value>) {
    let mut st = state.lock().unwrap();
    let mut events = Vec::new();
    let reply = match cmd {
        "qmp_capabilities" => Ok(json!({})),
        "query-version" => Ok(
            json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "fake"}),
        ),
        "query-status" => Ok(json!({"status": "running", "running": true})),
        "query-block" => Ok(Value::Array(
            st.disks
                .iter()
                .map(|d| {
                    let bitmaps: Vec<Value> = st
                        .bitmaps
                        .iter()
                        .filter(|(n, _)| *n == d.node)
                        .map(|(_, b)| json!({"name": b, "recording": true, "persistent": true, "busy": false, "granularity": 65536, "count": 0}))
                        .collect();
                    json!({
                        "device": d.device, "qdev": d.qdev, "type": "unknown", "locked": false,
                        "removable": false,
                        "inserted": {"file": d.file, "node-name": d.node, "drv": d.format,
                            "ro": false, "backing_file_depth": 0, "image": d.image(),
                            "dirty-bitmaps": bitmaps},
                    })
                })
                .collect(),
        )),
        "query-named-block-nodes" => Ok(Value::Array(
            st.disks
                .iter()
                .map(|d| json!({"node-name": d.node, "drv": d.format, "file": d.file, "ro": false, "image": d.image(), "dirty-bitmaps": []}))
                .collect(),
        )),
        "query-jobs" => Ok(Value::Array(
            st.jobs
                .iter()
                .map(|j| json!({"id": j, "type": "backup", "status": "running", "current-progress": 0, "total-progress": 1048576}))
                .collect(),
        )),
        "blockdev-add" => {
            st.nodes
                .push(args["node-name"].as_str().unwrap_or("").to_string());
            Ok(json!({}))
        }
        "blockdev-del" => {
            let n = args["node-name"].as_str().unwrap_or("");
            st.nodes.retain(|x| x != n);
            Ok(json!({}))
        }
        "block-dirty-bitmap-add" | "block-dirty-bitmap-remove" => {
            bitmap_action(&mut st, cmd, args);
            Ok(json!({}))
        }
        "block-job-cancel" => {
            let j = args["device"].as_str().unwrap_or("").to_string();
            if jobs != Jobs::Stuck && st.jobs.contains(&j) {
                st.jobs.retain(|x| *x != j);
                events.push(event(
                    "BLOCK_JOB_CANCELLED",
                    json!({"device": j, "type": "backup", "len": 1048576, "offset": 0, "speed": 0}),
                ));
            }
            Ok(json!({}))
        }
        "transaction" => {
            for a in args["actions"].as_array().cloned().unwrap_or_default() {
                let t = a["type"].as_str().unwrap_or("");
                if t == "blockdev-backup" {
                    let j = a["data"]["job-id"].as_str().unwrap_or("").to_string();
                    match jobs {
                        Jobs::Complete => events.push(event(
                            "BLOCK_JOB_COMPLETED",
                            json!({"device": j, "type": "backup", "len": 1048576, "offset": 1048576, "speed": 0}),
                        )),
                        Jobs::SilentAfterStart => {
                            st.silent = true;
                            st.jobs.push(j);
                        }
                        _ => st.jobs.push(j),
                    }
                } else {
                    bitmap_action(&mut st, t, &a["data"]);
                }
            }
            Ok(json!({}))
        }
        _ => Ok(json!({})),
    };
    (reply, events)
}

fn bitmap_action(st: &mut State, what: &str, data: &Value) {
    let node = data["node"].as_str().unwrap_or("").to_string();
    let name = data["name"].as_str().unwrap_or("").to_string();
    match what {
        "block-dirty-bitmap-add" => st.bitmaps.push((node, name)),
        "block-dirty-bitmap-remove" => st.bitmaps.retain(|(n, b)| !(*n == node && *b == name)),
        _ => {}
    }
}
