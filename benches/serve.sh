#!/usr/bin/env bash
# `qmprestore serve` side by side with `qemu-nbd --read-only -e 8` serving the same content,
# read by the same client: `nbdcopy -C 4 URI null:` (4 connections), alternating, RUNS
# rounds (default 7). The chain, in /dev/shm: a FULL of 1 GiB, every byte allocated, and an
# INC of 64 MiB of scattered 64 KiB rewrites, both with checksum manifests (as qmpbackup
# writes them); qemu-nbd serves the same files linked as a backing chain. Also measured:
# `serve` with --ignore-checksums (what checking costs), each server's CPU time, and how
# long a 1 TiB chain takes from start to its first answered request.
# Before timing, each server's output is copied once and compared with the other's.
# Usage: bash benches/serve.sh [RUNS]   (needs qemu-img, qemu-io, qemu-nbd, nbdcopy, nbdinfo)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-7}
cargo build --release -q --bin qmprestore --example write-manifest
B=$(pwd)/target/release
base=/dev/shm; [ -d "$base" ] || base=${TMPDIR:-/tmp}
W=$(mktemp -d "$base/qmpserve.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
D=$W/d; mkdir -p "$D"
echo "building the chain in $W ..." >&2
qemu-img create -q -f qcow2 "$D/FULL-1000-disk.qcow2" 1G
qemu-io -f qcow2 -c "write -P 0x11 0 512M" -c "write -P 0x12 512M 512M" "$D/FULL-1000-disk.qcow2" >/dev/null
qemu-img create -q -f qcow2 "$D/INC-1100-disk.qcow2" 1G
python3 - > "$W/cmds" <<'PY'
import random
r = random.Random(1)
for c in r.sample(range(16384), 1024):
    print(f"write -P 0x21 {c * 65536} 65536")
PY
qemu-io -f qcow2 "$D/INC-1100-disk.qcow2" < "$W/cmds" >/dev/null
"$B/examples/write-manifest" "$D"/*.qcow2 2>/dev/null
cp "$D/FULL-1000-disk.qcow2" "$W/full.qcow2"; cp "$D/INC-1100-disk.qcow2" "$W/linked.qcow2"
qemu-img rebase -u -b "$W/full.qcow2" -F qcow2 "$W/linked.qcow2"

start() { # name socket command... ; waits until the socket answers
  local name=$1 sock=$2; shift 2
  "$@" >/dev/null 2>"$W/$name.err" &
  PIDS+=($!); eval "PID_$name=$!"
  for _ in $(seq 100); do nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1 && return; sleep 0.05; done
  echo "$name did not start:" >&2; cat "$W/$name.err" >&2; exit 1
}
start ours "$W/ours.sock" "$B/qmprestore" serve --dir "$D" --socket "$W/ours.sock"
start nochk "$W/nochk.sock" "$B/qmprestore" --ignore-checksums serve --dir "$D" --socket "$W/nochk.sock"
start qemu "$W/qemu.sock" qemu-nbd --read-only -e 8 -t -f qcow2 -k "$W/qemu.sock" "$W/linked.qcow2"

for who in ours qemu; do nbdcopy -C 4 "nbd+unix:///?socket=$W/$who.sock" "$W/$who.raw"; done
cmp "$W/ours.raw" "$W/qemu.raw" || { echo "MISMATCH between the servers" >&2; exit 1; }
rm -f "$W/ours.raw" "$W/qemu.raw"

cpu() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }
: > "$W/results"
for r in $(seq "$RUNS"); do
  for who in ours qemu nochk; do
    pid_var=PID_$who; pid=${!pid_var}
    c0=$(cpu "$pid"); s=$(date +%s.%N)
    nbdcopy -C 4 "nbd+unix:///?socket=$W/$who.sock" null:
    e=$(date +%s.%N); c1=$(cpu "$pid")
    echo "$who $(echo "$e - $s" | bc) $(echo "$c1 - $c0" | bc)" >> "$W/results"
  done
done

# Start-up: a 1 TiB chain with 2 MiB of data, from exec to the first answered request.
mkdir -p "$W/big"
qemu-img create -q -f qcow2 "$W/big/FULL-1000-big.qcow2" 1T
qemu-io -f qcow2 -c "write -P 0x33 0 1M" -c "write -P 0x34 700G 1M" "$W/big/FULL-1000-big.qcow2" >/dev/null
qemu-img create -q -f qcow2 "$W/big/INC-1100-big.qcow2" 1T
qemu-io -f qcow2 -c "write -P 0x35 1023G 1M" "$W/big/INC-1100-big.qcow2" >/dev/null
"$B/examples/write-manifest" "$W/big"/*.qcow2 2>/dev/null
s=$(date +%s.%N)
"$B/qmprestore" serve --dir "$W/big" --socket "$W/big.sock" >/dev/null 2>"$W/big.err" &
PIDS+=($!)
until nbdinfo --size "nbd+unix:///?socket=$W/big.sock" >/dev/null 2>&1; do sleep 0.01; done
e=$(date +%s.%N)
echo "startup $(echo "$e - $s" | bc) 0" >> "$W/results"

python3 - "$W/results" "$RUNS" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    n, w, c = line.split(); rows.setdefault(n, []).append((float(w), float(c)))
med = {n: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v), min(x[0] for x in v)) for n, v in rows.items()}
names = {"ours": "serve", "nochk": "serve --ignore-checksums", "qemu": "qemu-nbd -r -e 8"}
print(f"1 GiB chain, nbdcopy -C 4 URI null:, {sys.argv[2]} alternating runs")
print(f"{'server':<26}{'median s':>10}{'best s':>9}{'server cpu s':>14}")
for n in ("ours", "nochk", "qemu"):
    w, c, b = med[n]
    print(f"{names[n]:<26}{w:>10.3f}{b:>9.3f}{c:>14.2f}")
print(f"serve / qemu-nbd                   = {med['ours'][0] / med['qemu'][0]:.2f}  (target <= 1.0)")
print(f"serve --ignore-checksums / qemu-nbd = {med['nochk'][0] / med['qemu'][0]:.2f}")
print(f"1 TiB chain, start to first answer = {med['startup'][0]:.3f} s  (target <= 1)")
PY
