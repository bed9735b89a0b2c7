#!/usr/bin/env bash
# Restoring a backup chain to raw: `qmprestore merge --format raw` side by side with
# `qemu-img convert -W -m 16 -f qcow2 -O raw` of the same chain linked as a backing chain
# (qemu-img is the oracle only). The chain, in /dev/shm (so reading it costs no disk I/O):
# a FULL of SIZE_MIB MiB (default 4096) with 75% allocated (two large patterns around an
# unallocated hole of 25% in the middle, so zero handling matters) and an INC of 1024
# scattered 64 KiB clusters (~64 MiB): 960 rewritten with data, 64 written as zero clusters
# over FULL data. Both carry checksum manifests (as qmpbackup writes them). qemu-img reads
# a copy of the INC rebased (-u) onto the FULL.
# Three cases, RUNS rounds each (default 5); within a round both tools run, and which one
# goes first alternates from round to round. Median wall time of each tool, and ours/qemu:
#   1. a new file on tmpfs (/dev/shm);
#   2. a new file on the VM's disk ($TMPDIR or /var/tmp, ext4 here). `sync` (untimed)
#      before each run; the time includes a trailing fsync of the output (`sync FILE`)
#      for both tools, so both results are on disk when the clock stops (ours fsyncs
#      itself; for qemu-img the extra fsync covers whatever its close left to do);
#   3. in place onto a block device: a loop device (direct I/O) over a SIZE_MIB file on
#      the VM's disk, refilled with 0xFF bytes before every run (untimed), so zero
#      ranges must really be zeroed: `merge --in-place` against `qemu-img convert -n`;
#      again with a trailing fsync of the device in the time.
# Before every timed run (untimed), as much tmpfs memory as the output holds is written and
# freed again: this VM hands freed memory back to its host, and a run that meets only
# fresh pages pays a host fault per page (half and more of the time, in
# copy_folio_from_iter_atomic), which made single runs vary from 1.3 s to 7 s; with the
# memory warm before each run, both tools start from the same state.
# Checked before timing: ours equals qemu-img's output (cmp), and both files' allocated
# sizes (du) are printed; in cases 2 and 3 the first result of each tool is compared
# with that output as well. Needs root (losetup) for case 3; without it case 3 is skipped.
# Usage: bash benches/restore_raw.sh [RUNS]   (env: SIZE_MIB, default 4096; CASES, default
#        "tmpfs disk device", a subset runs only those;
#        needs qemu-img, qemu-io, python3, losetup, blockdev)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
SIZE_MIB=${SIZE_MIB:-4096}
[ $((SIZE_MIB % 8)) = 0 ] && [ "$SIZE_MIB" -ge 64 ] || { echo "SIZE_MIB must be a multiple of 8, >= 64" >&2; exit 1; }
SIZE=$((SIZE_MIB << 20))
CASES=${CASES:-tmpfs disk device}
want() { case " $CASES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
cargo build --release -q --bin qmprestore --example write-manifest
B=$(pwd)/target/release
base=/dev/shm; [ -d "$base" ] || base=${TMPDIR:-/tmp}
W=$(mktemp -d "$base/qmprestore-raw.XXXXXX")
V= LOOP=
cleanup() {
  if [ -n "$LOOP" ]; then losetup -d "$LOOP" 2>/dev/null || true; fi
  rm -rf "$W"; if [ -n "$V" ]; then rm -rf "$V"; fi
}
trap cleanup EXIT
V=$(mktemp -d "${TMPDIR:-/var/tmp}/qmprestore-raw.XXXXXX")
VFS=$(df --output=fstype "$V" | tail -n 1 | tr -d ' ')
[ "$VFS" = tmpfs ] && echo "warning: $V is on tmpfs, not a disk; set TMPDIR to a disk directory" >&2
D=$W/d; mkdir -p "$D"

echo "building the ${SIZE_MIB} MiB chain in $W ..." >&2
qemu-img create -q -f qcow2 "$D/FULL-1000-disk.qcow2" "${SIZE_MIB}M"
python3 - "$SIZE_MIB" > "$W/full.cmds" <<'PY'
import sys
m = int(sys.argv[1])
def fill(pattern, start, end):  # in MiB, at most 512 MiB a request
    while start < end:
        n = min(512, end - start)
        print(f"write -P {pattern} {start}M {n}M")
        start += n
fill("0x11", 0, m * 3 // 8)      # [0, 3/8) data, [3/8, 5/8) hole, [5/8, 1) data
fill("0x12", m * 5 // 8, m)
PY
qemu-io -f qcow2 "$D/FULL-1000-disk.qcow2" < "$W/full.cmds" >/dev/null
qemu-img create -q -f qcow2 "$D/INC-1100-disk.qcow2" "${SIZE_MIB}M"
python3 - "$SIZE" > "$W/inc.cmds" <<'PY'
import random, sys
r = random.Random(1)
for i, c in enumerate(r.sample(range(int(sys.argv[1]) // 65536), 1024)):
    print(f"write -z {c * 65536} 65536" if i % 16 == 0 else f"write -P 0x21 {c * 65536} 65536")
PY
qemu-io -f qcow2 "$D/INC-1100-disk.qcow2" < "$W/inc.cmds" >/dev/null
"$B/examples/write-manifest" "$D"/*.qcow2 2>/dev/null
cp "$D/INC-1100-disk.qcow2" "$W/linked.qcow2"
qemu-img rebase -u -b "$D/FULL-1000-disk.qcow2" -F qcow2 "$W/linked.qcow2"

fail() { echo "FAILED: $1" >&2; [ -f "$2" ] && tail -n 40 "$2" >&2; exit 1; }
ours() { "$B/qmprestore" merge --dir "$D" --format raw --targetfile "$@"; }
qemu() { qemu-img convert -W -m 16 -f qcow2 -O raw "$W/linked.qcow2" "$1"; }
qemu_dev() { qemu-img convert -n -W -m 16 -f qcow2 -O raw "$W/linked.qcow2" "$1"; }
sizes() { # label file: apparent and allocated size
  printf '%-34s apparent %6d MiB, allocated (du) %6d MiB\n' "$1" \
    $(($(stat -c %s "$2") >> 20)) $(($(du -B1 "$2" | cut -f1) >> 20)) >> "$W/sizes"
}

# Correctness, once: ours is the model the later results are compared with.
: > "$W/sizes"
ours "$W/model.raw" 2>"$W/check.log" || fail "qmprestore merge to $W/model.raw" "$W/check.log"
qemu "$W/qemu.raw" 2>>"$W/check.log" || fail "qemu-img convert to $W/qemu.raw" "$W/check.log"
cmp "$W/model.raw" "$W/qemu.raw" || { echo "MISMATCH: qmprestore merge and qemu-img convert differ" >&2; exit 1; }
sizes "tmpfs, qmprestore merge" "$W/model.raw"
sizes "tmpfs, qemu-img convert" "$W/qemu.raw"
rm -f "$W/qemu.raw" "$W/model.raw.manifest"

: > "$W/results"
WARM_MIB=$((SIZE_MIB * 3 / 4 + 64))
warm() { dd if=/dev/zero of="$W/warm" bs=4M count=$((WARM_MIB / 4)) status=none; rm -f "$W/warm"; }
run() { # case who target sync(0|1) command...
  local c=$1 who=$2 target=$3 dosync=$4 s e; shift 4
  warm
  s=$(date +%s.%N)
  "$@" >>"$W/$c-$who.log" 2>&1 || fail "$c $who: $*" "$W/$c-$who.log"
  if [ "$dosync" = 1 ]; then sync "$target"; fi
  e=$(date +%s.%N)
  echo "$c $who $(awk "BEGIN { print $e - $s }")" >> "$W/results"
}
order() { if [ $(($1 % 2)) = 1 ]; then echo ours qemu; else echo qemu ours; fi; }

want tmpfs && echo "case 1: new file on tmpfs ..." >&2
OUT=$W/out.raw
want tmpfs && for r in $(seq "$RUNS"); do
  for who in $(order "$r"); do
    rm -f "$OUT" "$OUT.manifest"
    if [ "$who" = ours ]; then run tmpfs ours "$OUT" 0 ours "$OUT"; else run tmpfs qemu "$OUT" 0 qemu "$OUT"; fi
  done
done
rm -f "$OUT" "$OUT.manifest"

want disk && echo "case 2: new file on $VFS ($V) ..." >&2
OUT=$V/out.raw
want disk && for r in $(seq "$RUNS"); do
  for who in $(order "$r"); do
    rm -f "$OUT" "$OUT.manifest"; sync
    if [ "$who" = ours ]; then run disk ours "$OUT" 1 ours "$OUT"; else run disk qemu "$OUT" 1 qemu "$OUT"; fi
    if [ ! -e "$W/disk-$who.checked" ]; then
      cmp "$OUT" "$W/model.raw" || { echo "MISMATCH: $who's output on $VFS differs from the model" >&2; exit 1; }
      sizes "$VFS, $([ "$who" = ours ] && echo qmprestore merge || echo qemu-img convert)" "$OUT"
      touch "$W/disk-$who.checked"
    fi
  done
done
rm -f "$OUT" "$OUT.manifest"

refill() { # the whole device to 0xFF, on disk, and out of the page cache
  python3 - "$LOOP" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
size = os.lseek(fd, 0, os.SEEK_END); os.lseek(fd, 0, os.SEEK_SET)
buf = b"\xff" * (4 << 20); done = 0
while done < size:
    done += os.write(fd, buf[: min(len(buf), size - done)])
os.fsync(fd); os.close(fd)
PY
  blockdev --flushbufs "$LOOP"
  sync
}
DIO=on
if ! want device; then
  :
elif fallocate -l "$SIZE" "$V/dev.img" && LOOP=$(losetup -f --show --direct-io=on "$V/dev.img" 2>/dev/null) \
   || { DIO=off; LOOP=$(losetup -f --show "$V/dev.img" 2>/dev/null); }; then
  echo "case 3: in place onto $LOOP (over $V/dev.img, direct I/O $DIO) ..." >&2
  for r in $(seq "$RUNS"); do
    for who in $(order "$r"); do
      refill
      if [ "$who" = ours ]; then run device ours "$LOOP" 1 ours "$LOOP" --in-place
      else run device qemu "$LOOP" 1 qemu_dev "$LOOP"; fi
      if [ ! -e "$W/device-$who.checked" ]; then
        blockdev --flushbufs "$LOOP"
        cmp -n "$SIZE" "$LOOP" "$W/model.raw" || { echo "MISMATCH: $who's result on $LOOP differs from the model" >&2; exit 1; }
        touch "$W/device-$who.checked"
      fi
    done
  done
else
  LOOP=; echo "case 3 skipped: could not attach a loop device (root needed)" >&2
fi

echo
echo "$(qemu-img --version | head -n 1); chain ${SIZE_MIB} MiB (75% allocated + 64 MiB INC), $RUNS rounds, alternating"
echo
python3 - "$W/results" "$VFS" "$DIO" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    c, who, t = line.split(); runs.setdefault((c, who), []).append(float(t))
names = {"tmpfs": "new file, tmpfs",
         "disk": f"new file, {sys.argv[2]} (+fsync)",
         "device": f"loop device in place (DIO {sys.argv[3]}, +fsync)"}
print("| case | qmprestore merge (s) | qemu-img convert (s) | ratio |")
print("|---|---:|---:|---:|")
for c in ("tmpfs", "disk", "device"):
    if (c, "ours") not in runs: continue
    o, q = statistics.median(runs[c, "ours"]), statistics.median(runs[c, "qemu"])
    print(f"| {names[c]} | {o:.3f} | {q:.3f} | {o / q:.2f} |")
print()
print("medians of each tool's runs; ratio = qmprestore / qemu-img (below 1: ours faster)")
for (c, who), v in runs.items():
    print(f"  {c:<6} {who:<4} " + " ".join(f"{x:.3f}" for x in v))
PY
echo
echo "output sizes:"
cat "$W/sizes"
