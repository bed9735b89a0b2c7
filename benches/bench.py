#!/usr/bin/env python3
"""Side by side with qemu-img, in one run: merge, commit and verify of a dense chain, merge,
commit, verify and block status of sparse multi-TiB chains, and what qmpbackup adds to
QEMU's own backup job time.

qemu-img, qemu-nbd and cat are the yardsticks and the oracles: every merge and commit
output is compared with `qemu-img compare` against the linked chain and checked with
`qemu-img check`; a difference fails the run (exit 1; a tool missing or a command failing
or hanging exits 2). Times never fail it: on these
machines they move by a third from run to run, so methods alternate within each round,
medians are taken, and the ratios are for people and dashboards.

Usage: python3 benches/bench.py [--quick] [--runs N] [--json FILE] [--only SECTIONS]
  --quick    a dense chain of a few hundred MiB, one sparse 16 TiB chain, a 256 MiB VM
             disk, 3 rounds: what CI runs (under two minutes)
  --json     also write every figure as JSON: case, method, median, best, ratio, peak RSS,
             the chain, the QEMU version
  --only     a comma-separated subset of: dense, sparse, backup
Needs qemu-img, qemu-io; the sparse block status also qemu-nbd and nbdinfo (skipped
without them); the backup section qemu-system-x86_64 (skipped without it).
"""

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
MIB = 1 << 20


class Mismatch(Exception):
    """An output differs from qemu-img's (exit 1). Anything else that stops the run (a tool
    missing, a command failing or hanging) exits 2, so a CI log tells the two apart."""


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(2)


# No command of the bench takes minutes; a hung one stops the run instead of CI.
COMMAND_TIMEOUT = 600


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def quiet(*args):
    sh(*args, stdout=subprocess.DEVNULL)


TIME = shutil.which("time")


def measure(cmd):
    """Runs cmd; returns (wall seconds, peak RSS KiB or None). A failing command stops the
    run. The peak comes from /usr/bin/time: a child forked from Python would count
    Python's own pages in its high-water mark."""
    with tempfile.NamedTemporaryFile("r") as rss:
        full = [TIME, "-f", "%M", "-o", rss.name, *cmd] if TIME else cmd
        t0 = time.monotonic()
        try:
            p = subprocess.run(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            fail(f"{' '.join(map(str, cmd))}: no end after {COMMAND_TIMEOUT} s")
        wall = time.monotonic() - t0
        if p.returncode != 0:
            fail(f"{' '.join(map(str, cmd))}: exit {p.returncode}\n"
                 f"{p.stderr.decode(errors='replace')}")
        peak = rss.read().strip().splitlines()
    return wall, int(peak[-1]) if peak and peak[-1].isdigit() else None


class Results:
    """Every timed run, grouped by (case, method), and the targets: a ratio of two methods'
    medians, or a method's median in seconds."""

    def __init__(self):
        self.runs = {}
        self.chains = {}
        self.targets = {}  # (case, method) -> [(reference method or None, limit)]
        self.qemu_system = None

    def add(self, case, method, wall, rss=None):
        self.runs.setdefault((case, method), []).append((wall, rss))

    def target(self, case, method, ref, limit):
        """ref None: the median must be at most limit seconds; else the ratio to ref's
        median at most limit (limit None: the ratio is shown, with no target)."""
        self.targets.setdefault((case, method), []).append((ref, limit))

    def median(self, case, method):
        return statistics.median(w for w, _ in self.runs[(case, method)])

    def rows(self):
        """One dict per (case, method), with its ratios and targets ("against", one entry
        per reference method or time limit)."""
        for (case, method), runs in self.runs.items():
            walls = [w for w, _ in runs]
            peaks = [r for _, r in runs if r is not None]
            row = {
                "case": case,
                "method": method,
                "median": round(statistics.median(walls), 4),
                "best": round(min(walls), 4),
                "runs": len(walls),
                "peak_rss_kib": max(peaks) if peaks else None,
                "chain": self.chains.get(case, ""),
            }
            against = []
            for ref, limit in self.targets.get((case, method), []):
                if ref is None:
                    against.append({"target_seconds": limit, "met": row["median"] <= limit})
                    continue
                ratio = round(row["median"] / max(self.median(case, ref), 1e-3), 3)
                entry = {"ratio": ratio, "ratio_to": ref}
                if limit is not None:
                    entry.update(target_ratio=limit, met=ratio <= limit)
                against.append(entry)
            if against:
                row["against"] = against
            yield row


def alternate(results, case, runs, methods, after=None, before=None):
    """Runs every method once per round, the order rotated each round. `before(method)`
    prepares untimed (a fresh copy to commit into); `after(method, round)` checks the
    output (first round) and removes it."""
    names = list(methods)
    for r in range(runs):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if before:
                before(name)
            wall, rss = measure(methods[name])
            results.add(case, name, wall, rss)
            if after:
                after(name, r)


def compare(a, b, what, *flags):
    """qemu-img compare: 0 equal, 1 different; anything else is an error, not a verdict."""
    code = subprocess.run(["qemu-img", "compare", "-q", *flags, str(a), str(b)]).returncode
    if code == 1:
        raise Mismatch(f"{what}: {a} differs from {b}")
    if code != 0:
        fail(f"{what}: qemu-img compare {a} {b} failed (exit {code})")
    code = subprocess.run(["qemu-img", "check", "-q", str(a)]).returncode
    if code in (2, 3):
        raise Mismatch(f"{what}: {a} fails qemu-img check (exit {code})")
    if code != 0:
        fail(f"{what}: qemu-img check {a} failed (exit {code})")


def rm(*paths):
    for p in paths:
        p = Path(p)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


NAMES = ["FULL-1000-disk.qcow2", "INC-1100-disk.qcow2", "INC-1200-disk.qcow2",
         "INC-1300-disk.qcow2"]


def link_chain(full, src, dst):
    """Copies of src's INCs in dst with backing references, the oldest onto `full`: the
    chain as qemu-img sees it. Returns the top's path."""
    dst.mkdir(parents=True, exist_ok=True)
    prev = full
    for name in NAMES[1:]:
        sh("cp", "--sparse=always", str(src / name), str(dst / name))
        quiet("qemu-img", "rebase", "-u", "-b", str(prev), "-F", "qcow2", str(dst / name))
        prev = dst / name
    return prev


def write_manifests(d):
    sh(str(BIN / "examples" / "write-manifest"), *map(str, sorted(d.glob("*.qcow2"))),
       stderr=subprocess.DEVNULL)


def qemu_io(image, commands):
    sh("qemu-io", "-f", "qcow2", image, input="\n".join(commands) + "\n",
       text=True, stdout=subprocess.DEVNULL)


def commit_cases(results, case, runs, d, top, w):
    """`qmprestore commit` on a copy of the directory against `qemu-img commit -b` on a
    copy of the linked chain (the copies untimed); both results compared with the chain."""
    c = w / "commit"

    def before(name):
        rm(c)
        c.mkdir()
        if name == "qmprestore commit":
            for f in d.iterdir():
                sh("cp", "--sparse=always", str(f), str(c / f.name))
        else:
            sh("cp", "--sparse=always", str(d / NAMES[0]), str(c / NAMES[0]))
            link_chain(c / NAMES[0], d, c / "linked")

    def after(name, r):
        if r == 0:
            compare(c / NAMES[0], top, f"{case} {name}")
        rm(c)

    linked_top = c / "linked" / NAMES[-1]
    alternate(results, case, runs, {
        "qmprestore commit": [BIN / "qmprestore", "-q", "commit", "--dir", c],
        "qemu-img commit": ["qemu-img", "commit", "-q", "-b", c / NAMES[0], linked_top],
    }, after=after, before=before)
    results.target(case, "qmprestore commit", "qemu-img commit", None)


def dense(results, runs, w, quick):
    """A FULL with data from its start and three INCs of scattered 64 KiB rewrites."""
    size, data, inc = (1024, 256, 32) if quick else (4096, 2048, 256)
    d = w / "dense"
    d.mkdir()
    quiet("qemu-img", "create", "-q", "-f", "qcow2", d / NAMES[0], f"{size}M")
    qemu_io(d / NAMES[0], [f"write -P 0x11 {o}M {min(512, data - o)}M"
                           for o in range(0, data, 512)])
    for i, name in enumerate(NAMES[1:], 1):
        quiet("qemu-img", "create", "-q", "-f", "qcow2", d / name, f"{size}M")
        clusters = random.Random(i).sample(range(size * 16), inc * 16)
        qemu_io(d / name, [f"write -P {0x20 + i} {c * 65536} 65536" for c in clusters])
    write_manifests(d)
    top = link_chain(d / NAMES[0], d, w / "dense-linked")
    # Touch as much memory as an output once, so no method pays for the first use of
    # memory the VM has not populated yet (or handed back to its host).
    with open(w / "warm", "wb") as f:
        for _ in range(data + 3 * inc):
            f.write(bytes(MIB))
    rm(w / "warm")
    case = "dense merge"
    results.chains[case] = results.chains["dense commit"] = results.chains["dense verify"] = (
        f"FULL {size} MiB virtual, {data} MiB data, 3 INCs of {inc} MiB scattered 64 KiB "
        "rewrites, manifests, tmpfs")
    merge_cases(results, case, runs, d, top, w, 1.0, unchecked=True)
    results.target(case, "qmprestore merge", "qmprestore merge --ignore-checksums", 1.10)
    commit_cases(results, "dense commit", runs, d, top, w)
    verify_cases(results, "dense verify", runs, d)
    rm(d, w / "dense-linked")


def merge_cases(results, case, runs, d, top, w, limit, convert_opts=(), unchecked=False):
    """`qmprestore merge` (and with `unchecked`, merge --ignore-checksums) against
    `qemu-img convert` of the linked chain `top`; each output is compared with the chain in
    the first round, and removed."""
    out = w / "out.qcow2"

    def after(name, r):
        if r == 0:
            compare(out, top, f"{case} {name}")
        rm(out, f"{out}.manifest")

    merge = [BIN / "qmprestore", "-q", "merge", "--dir", d, "--targetfile", out]
    methods = {"qmprestore merge": merge}
    if unchecked:
        methods["qmprestore merge --ignore-checksums"] = [
            BIN / "qmprestore", "-q", "--ignore-checksums", *merge[2:]]
    methods["qemu-img convert"] = ["qemu-img", "convert", "-W", "-m", "16", "-O", "qcow2",
                                   *convert_opts, top, out]
    alternate(results, case, runs, methods, after=after)
    results.target(case, "qmprestore merge", "qemu-img convert", limit)


def verify_cases(results, case, runs, d):
    files = sorted(map(str, d.glob("*.qcow2")))
    alternate(results, case, runs, {
        "qmprestore verify": [BIN / "qmprestore", "-q", "verify", "--dir", d],
        "cat": ["cat", *files],
    })
    results.target(case, "qmprestore verify", "cat", 1.3)


class Server:
    """A background NBD server on a unix socket, ended on every path."""

    def __init__(self, cmd, sock):
        self.sock = sock
        self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if time.monotonic() > deadline or self.p.poll() is not None:
                self.stop()
                fail(f"{cmd[0]} did not start")
            time.sleep(0.02)

    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.stop()


def sparse(results, runs, w, quick):
    """A FULL and three INCs, each with 8 writes of 256 KiB spread over the whole disk."""
    layouts = [("16T", "64k")] if quick else [
        (s, c) for s in ("1T", "16T", "64T") for c in ("64k", "2M")]
    for size, cs in layouts:
        tib = int(size[:-1])
        d = w / f"sparse-{size}-{cs}"
        d.mkdir()
        for i, name in enumerate(NAMES):
            quiet("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}",
                  d / name, size)
            step = (tib << 40) // 8
            qemu_io(d / name, [
                f"write -P {0x30 + i} {(k * step + i * (1 << 30)) // 65536 * 65536} 256k"
                for k in range(8)])
        write_manifests(d)
        top = link_chain(d / NAMES[0], d, w / f"{d.name}-linked")
        label = f"{size} {cs} clusters"
        chain = (f"FULL + 3 INCs of {size} virtual, {cs} clusters, 8 x 256 KiB per layer "
                 "spread over the disk, manifests, tmpfs")
        case = f"sparse {label} merge"
        results.chains[case] = chain
        merge_cases(results, case, runs, d, top, w, 1.5, convert_opts=("-o", f"cluster_size={cs}"))
        results.chains[f"sparse {label} commit"] = chain
        commit_cases(results, f"sparse {label} commit", runs, d, top, w)
        results.chains[f"sparse {label} verify"] = chain
        alternate(results, f"sparse {label} verify", runs, {
            "qmprestore verify": [BIN / "qmprestore", "-q", "verify", "--dir", d]})
        if shutil.which("nbdinfo") and shutil.which("qemu-nbd"):
            case = f"sparse {label} block status"
            results.chains[case] = chain + "; nbdinfo --map of the whole disk"
            with Server([BIN / "qmprestore", "serve", "--dir", d, "--socket", w / "ours.sock"],
                        str(w / "ours.sock")) as ours, \
                 Server(["qemu-nbd", "-r", "-t", "-f", "qcow2", "-k", w / "qemu.sock", top],
                        str(w / "qemu.sock")) as qemu:
                alternate(results, case, runs, {
                    "qmprestore serve": ["nbdinfo", "--map", ours.uri()],
                    "qemu-nbd": ["nbdinfo", "--map", qemu.uri()],
                })
            rm(w / "ours.sock", w / "qemu.sock")
            results.target(case, "qmprestore serve", "qemu-nbd", None)
        rm(d, w / f"{d.name}-linked")


class Qmp:
    """A minimal QMP client for the bench's own monitor: commands and timestamped events."""

    def __init__(self, path):
        deadline = time.monotonic() + 10
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(str(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.f = self.s.makefile("rwb")
        self.events = []
        self.replies = []
        self.cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.execute("qmp_capabilities")

    def _read(self):
        for line in self.f:
            msg = json.loads(line)
            with self.cv:
                if "event" in msg:
                    ts = msg["timestamp"]
                    self.events.append((msg["event"], msg.get("data", {}),
                                        ts["seconds"] + ts["microseconds"] / 1e6))
                elif "return" in msg or "error" in msg:
                    self.replies.append(msg)
                self.cv.notify_all()

    def execute(self, cmd, **args):
        with self.cv:
            self.replies.clear()
        self.f.write(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
        self.f.flush()
        with self.cv:
            if not self.cv.wait_for(lambda: self.replies, timeout=60):
                fail(f"QMP {cmd}: no reply")
            reply = self.replies.pop(0)
        if "error" in reply:
            fail(f"QMP {cmd}: {reply['error']}")
        return reply["return"]

    def job_seconds(self, since):
        """From the first backup job's creation to the last one's completion, by QEMU's
        event timestamps, among the events after index `since`."""
        with self.cv:
            # The completion event may still be on its way from the socket.
            self.cv.wait_for(lambda: any(n == "BLOCK_JOB_COMPLETED"
                                         for n, _, _ in self.events[since:]), timeout=10)
            evs = self.events[since:]
        starts = [t for n, d, t in evs if n == "JOB_STATUS_CHANGE" and d.get("status") == "created"]
        ends = [t for n, _, t in evs if n == "BLOCK_JOB_COMPLETED"]
        if not starts or not ends:
            fail("the backup job's events were not seen")
        return max(ends) - min(starts)


def backup(results, runs, w, quick):
    """A full backup of a disk filled with data, then an inc of 64 MiB of changes: wall
    time of `qmpbackup backup` against QEMU's job time (its own event timestamps)."""
    qemu = os.environ.get("QEMU_SYSTEM", "qemu-system-x86_64")
    if not shutil.which(qemu):
        print(f"backup: skipped ({qemu} not found)", file=sys.stderr)
        return
    size = 256 if quick else 1024
    full_case = f"backup full {size} MiB"
    disk = w / "vm-disk.qcow2"
    quiet("qemu-img", "create", "-q", "-f", "qcow2", disk, f"{size}M")
    qemu_io(disk, [f"write -P 0x5a {o}M {min(256, size - o)}M" for o in range(0, size, 256)])
    vm = subprocess.Popen([
        qemu, "-machine", "pc,accel=tcg", "-m", "64", "-nodefaults", "-display", "none", "-S",
        "-qmp", f"unix:{w}/backup.qmp,server=on,wait=off",
        "-qmp", f"unix:{w}/bench.qmp,server=on,wait=off",
        "-blockdev", f"driver=file,filename={disk},node-name=disk-file",
        "-blockdev", "driver=qcow2,file=disk-file,node-name=disk",
        "-device", "virtio-blk-pci,drive=disk,id=vblk",
    ], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        mon = Qmp(w / "bench.qmp")
        version = mon.execute("query-version")["qemu"]
        results.qemu_system = f"{version['major']}.{version['minor']}.{version['micro']}"
        chain = f"one virtio-blk disk of {size} MiB filled with data, QEMU {results.qemu_system}, tmpfs"
        for r in range(runs):
            target = w / f"backup-{r}"
            for level, case in (("full", full_case), ("inc", "backup inc 64 MiB")):
                results.chains[case] = chain
                if level == "inc":
                    mon.execute("human-monitor-command", **{
                        "command-line": f"qemu-io -d /machine/peripheral/vblk/virtio-backend "
                                        f"\"write -P 0x{0x60 + r:x} 32M 64M\""})
                since = len(mon.events)
                wall, rss = measure([BIN / "qmpbackup", "--socket", w / "backup.qmp", "backup",
                                     "--level", level, "--target", target, "--no-subdir"])
                job = mon.job_seconds(since)
                results.add(case, "qmpbackup backup", wall, rss)
                results.add(case, "QEMU job", job)
                results.add(case, "our share", wall - job)
            if r == 0:
                out = w / "restored.qcow2"
                quiet(BIN / "qmprestore", "-q", "merge", "--dir", target, "--targetfile", out)
                compare(out, disk, "backup: the restored chain against the VM's disk", "-U")
                rm(out, f"{out}.manifest")
            rm(target)
    finally:
        vm.kill()
        vm.wait()
    # The target is for a 1 GiB disk: on a smaller one the fixed costs weigh more.
    results.target(full_case, "our share", "QEMU job", None if quick else 0.20)
    results.target("backup inc 64 MiB", "our share", None, 0.5)


def table(results):
    lines = ["| case | method | median s | best s | peak RSS MiB | ratio | target |",
             "|---|---|---:|---:|---:|---:|---|"]
    for row in results.rows():
        rss = f"{row['peak_rss_kib'] / 1024:.1f}" if row["peak_rss_kib"] else ""
        ratios, targets = [], []
        for e in row.get("against", []):
            if "ratio" in e:
                ratios.append(f"{e['ratio']:.2f} of {e['ratio_to']}")
            if "target_ratio" in e:
                targets.append(f"<= {e['target_ratio']}")
            elif "target_seconds" in e:
                targets.append(f"<= {e['target_seconds']} s")
            if "met" in e:
                targets[-1] += " met" if e["met"] else " MISSED"
        lines.append(f"| {row['case']} | {row['method']} | {row['median']:.3f} "
                     f"| {row['best']:.3f} | {rss} | {'; '.join(ratios)} | {'; '.join(targets)} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", default="dense,sparse,backup")
    args = ap.parse_args()
    runs = args.runs or (3 if args.quick else 5)
    sections = args.only.split(",")
    sh("cargo", "build", "--release", "-q", "--bin", "qmprestore", "--bin", "qmpbackup",
       "--example", "write-manifest", cwd=ROOT)
    # tmpfs when it has room for the chains (a container's /dev/shm may hold 64 MiB).
    need = (2 if args.quick else 12) << 30
    base = None
    if os.path.isdir("/dev/shm"):
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize >= need:
            base = "/dev/shm"
    qemu_version = subprocess.run(["qemu-img", "--version"], capture_output=True,
                                  text=True).stdout.splitlines()[0]
    results = Results()
    with tempfile.TemporaryDirectory(prefix="qmpbench.", dir=base) as tmp:
        w = Path(tmp)
        try:
            for name, section in (("dense", dense), ("sparse", sparse), ("backup", backup)):
                if name in sections:
                    print(f"== {name}", file=sys.stderr)
                    section(results, runs, w, args.quick)
        except Mismatch as e:
            print(f"OUTPUT MISMATCH: {e}", file=sys.stderr)
            sys.exit(1)
        except (subprocess.CalledProcessError, OSError) as e:
            fail(f"the bench could not run: {e}")
    print(f"{qemu_version}; {runs} alternating rounds, medians")
    print()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({
            "qemu_img": qemu_version,
            "qemu_system": results.qemu_system,
            "runs": runs,
            "quick": args.quick,
            "results": list(results.rows()),
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
