//! Helpers shared by the test suites of `qcow2` and `qmpbackup` (a dev-dependency only):
//! running a binary with a fault injected into its file writes (`qcow2::storage::fault`),
//! or under time and memory limits.

pub mod fake_qmp;
pub mod oracle;

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `cmd` with a fault at its `n`th file write (`kind`: "kill" or "enospc"):
/// (killed by SIGKILL, exit code, stderr).
pub fn run_with_fault(mut cmd: Command, n: u64, kind: &str) -> (bool, i32, String) {
    let out = cmd
        .env("QCOW2_FAULT_AFTER_WRITES", n.to_string())
        .env("QCOW2_FAULT_KIND", kind)
        .output()
        .unwrap();
    (
        out.status.signal() == Some(libc::SIGKILL),
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Kills the command `make` builds at write 1, 2, 3, 4, 6, 9, … (each run a fresh process
/// on the state the previous kill left) until a run is not killed, which must succeed;
/// `after_kill` inspects the state after each kill. Returns how many runs were killed.
pub fn kill_until_done(
    what: &str,
    mut make: impl FnMut() -> Command,
    mut after_kill: impl FnMut(u64),
) -> u64 {
    let (mut n, mut kills) = (1u64, 0);
    loop {
        let (killed, code, err) = run_with_fault(make(), n, "kill");
        if !killed {
            assert_eq!(code, 0, "{what} (fault at write {n}): {err}");
            return kills;
        }
        kills += 1;
        after_kill(n);
        n = (n * 3 / 2).max(n + 1);
        assert!(n < 1_000_000, "{what} never finished");
    }
}

/// Runs `cmd` (stdout discarded) under a 2 GiB address-space limit and a 20 s time limit:
/// (exit code, stderr). A run that hangs is killed, `on_hang` runs, and the test fails.
pub fn run_limited(mut cmd: Command, what: &str, on_hang: impl FnOnce()) -> (i32, String) {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: setrlimit only, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 2 << 30,
                rlim_max: 2 << 30,
            };
            libc::setrlimit(libc::RLIMIT_AS, &lim);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    // Drain stderr concurrently: a check of a garbage image prints a lot.
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut err = String::new();
        let _ = pipe.read_to_string(&mut err);
        err
    });
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st.code().unwrap_or(-1), reader.join().unwrap());
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            on_hang();
            panic!("{what} hung (> 20 s)");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
