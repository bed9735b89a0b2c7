#!/usr/bin/env bash
# Merge and commit side by side with qemu-img, on the same files (issue: restore time).
# Builds in a tmpfs a FULL (4 GiB virtual, 2 GiB data) and three INCs (256 MiB of scattered
# 64 KiB rewrites each), then runs alternately, RUNS times each:
#   ours-merge   qmprestore merge
#   qemu-convert qemu-img convert -W -m 16 -O qcow2 of the equivalent backing chain
#   orig-method  the original tool's: copy the FULL, then qemu-img rebase -u + commit per INC
#   copy-bound   reading the inputs and writing the output's bytes, two streams: one reads
#                the INCs, the other copies the FULL and then as many INC bytes as the
#                merged output has beyond the FULL's size
#   ours-commit  qmprestore commit (on a copy of the directory)
# and, with BASELINE=/path/to/an/older/qmprestore, base-merge and base-commit: the same two
# commands of that build, to show a change's effect side by side;
# and prints median and best wall time, CPU time, peak RSS and the ratios; every output is
# compared with qemu-img compare. Usage: bash benches/compare.sh [RUNS]  (needs qemu-img,
# qemu-io). On a VM whose memory is populated lazily or handed back to the host (free page
# reporting, ballooning), writing fresh tmpfs pages dominates and varies from run to run:
# the memory is touched once before the runs, and more RUNS give steadier medians.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
SIZE_MIB=${SIZE_MIB:-4096}; DATA_MIB=${DATA_MIB:-2048}; INC_MIB=${INC_MIB:-256}
cargo build --release -q --workspace --bins
B=$(pwd)/target/release
# BENCH_DIR puts the files elsewhere (an XFS mount, to see merge share blocks).
base=${BENCH_DIR:-/dev/shm}; [ -d "$base" ] || base=${TMPDIR:-/tmp}
W=$(mktemp -d "$base/qmpbench.XXXXXX")
trap 'rm -rf "$W"' EXIT
D=$W/dir; mkdir -p "$D"
echo "building the chain in $W ..." >&2
. benches/chain.sh
bench_full "$D/FULL-1000-disk.qcow2"
for i in 1 2 3; do bench_inc "$D/INC-$((1000+i))-disk.qcow2" "$i"; done
# The equivalent backing chain for qemu-img convert.
mkdir -p "$W/chain"; cp "$D"/*.qcow2 "$W/chain/"
prev=FULL-1000-disk.qcow2
for i in 1 2 3; do
  cur=INC-$((1000+i))-disk.qcow2
  qemu-img rebase -u -b "$prev" -F qcow2 "$W/chain/$cur"; prev=$cur
done
TOP="$W/chain/$prev"

measure() { # name, command... -> "wall cpu rss_kib"
  local name=$1; shift
  /usr/bin/time -f "%e %U %S %M" -o "$W/time" "$@" >/dev/null 2>"$W/err" || { cat "$W/err" >&2; exit 1; }
  read -r wall u s rss < "$W/time"
  echo "$name $wall $(echo "$u + $s" | bc) $rss" >> "$W/results"
}
[ -x /usr/bin/time ] || { apt-get install -y -q time >/dev/null 2>&1 || true; }
command -v bc >/dev/null || { apt-get install -y -q bc >/dev/null 2>&1 || true; }
: > "$W/results"
# Each output is checked (first run) and removed at once: tmpfs is RAM, and keeping every
# output of a 4 GiB chain would need about 18 GiB.
verify() { # output file
  if [ "$r" = 1 ]; then
    qemu-img compare -q "$TOP" "$1" || { echo "MISMATCH: $1" >&2; exit 1; }
    qemu-img check -q "$1" || { echo "CHECK FAILED: $1" >&2; exit 1; }
  fi
}
# Touch as much memory as the biggest output once, so no method pays for the first use of
# memory the VM has not populated yet.
dd if=/dev/zero of="$W/warm" bs=4M count=$(( (DATA_MIB + 3 * INC_MIB) / 4 )) status=none; rm -f "$W/warm"
for r in $(seq "$RUNS"); do
  measure ours-merge "$B/qmprestore" -q merge --dir "$D" --targetfile "$W/out-ours.qcow2"
  verify "$W/out-ours.qcow2"; OUT_BYTES=$(stat -c %s "$W/out-ours.qcow2")
  rm -f "$W/out-ours.qcow2" "$W/out-ours.qcow2.manifest"
  measure qemu-convert qemu-img convert -W -m 16 -O qcow2 "$TOP" "$W/out-conv.qcow2"
  verify "$W/out-conv.qcow2"; rm -f "$W/out-conv.qcow2"
  rm -rf "$W/orig"; mkdir "$W/orig"; cp "$D"/*.qcow2 "$W/orig/"
  measure orig-method bash -c '
    set -e; cd "$1"; prev=FULL-1000-disk.qcow2
    for i in 1 2 3; do cur=INC-$((1000+i))-disk.qcow2
      qemu-img rebase -u -b "$prev" -F qcow2 "$cur"; qemu-img commit -q "$cur"; rm -f "$cur"
    done' _ "$W/orig"
  verify "$W/orig/FULL-1000-disk.qcow2"; rm -rf "$W/orig"
  measure copy-bound bash -c '
    set -e; cat "$1"/INC-* > /dev/null &
    cp --sparse=never "$1/FULL-1000-disk.qcow2" "$2"
    left=$(( $3 - $(stat -c %s "$2") ))
    for f in "$1"/INC-*; do
      [ "$left" -gt 0 ] || break; n=$(stat -c %s "$f"); [ "$n" -le "$left" ] || n=$left
      dd if="$f" of="$2" bs=4M iflag=count_bytes count="$n" oflag=append conv=notrunc status=none
      left=$((left - n))
    done; wait' _ "$D" "$W/out-copy" "$OUT_BYTES"
  [ "$(stat -c %s "$W/out-copy")" = "$OUT_BYTES" ] || { echo "copy bound wrote the wrong size" >&2; exit 1; }
  rm -f "$W/out-copy"
  rm -rf "$W/cm"; mkdir "$W/cm"; cp "$D"/*.qcow2 "$W/cm/"
  measure ours-commit "$B/qmprestore" -q commit --dir "$W/cm"
  verify "$W/cm/FULL-1000-disk.qcow2"; rm -rf "$W/cm"
  if [ -n "${BASELINE:-}" ]; then
    measure base-merge "$BASELINE" -q merge --dir "$D" --targetfile "$W/out-base.qcow2"
    verify "$W/out-base.qcow2"; rm -f "$W/out-base.qcow2" "$W/out-base.qcow2.manifest"
    rm -rf "$W/cm"; mkdir "$W/cm"; cp "$D"/*.qcow2 "$W/cm/"
    measure base-commit "$BASELINE" -q commit --dir "$W/cm"
    verify "$W/cm/FULL-1000-disk.qcow2"; rm -rf "$W/cm"
  fi
done
echo "all outputs compare equal and check clean" >&2
python3 - "$W/results" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    n, w, c, m = line.split(); rows.setdefault(n, []).append((float(w), float(c), int(m)))
med = {n: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v), max(x[2] for x in v), min(x[0] for x in v)) for n, v in rows.items()}
print(f"{'method':<14}{'median s':>10}{'best s':>9}{'cpu s':>9}{'peak RSS MiB':>14}")
for n, (w, c, m, b) in med.items():
    print(f"{n:<14}{w:>10.2f}{b:>9.2f}{c:>9.2f}{m/1024:>14.1f}")
def ratio(a, b):
    return f"{med[a][0]/med[b][0]:.2f} (best-of-{len(rows[a])}: {med[a][3]/med[b][3]:.2f})"
print(f"merge / qemu-img convert -W -m 16 = {ratio('ours-merge', 'qemu-convert')}  (target <= 0.5)")
print(f"merge / copy bound               = {ratio('ours-merge', 'copy-bound')}  (target <= 1.5)")
print(f"merge peak RSS                    = {med['ours-merge'][2]/1024:.1f} MiB (target <= 64)")
print(f"commit / original method         = {ratio('ours-commit', 'orig-method')}  (target <= 0.5)")
if 'base-merge' in rows:
    print(f"merge / baseline merge           = {ratio('ours-merge', 'base-merge')}")
    print(f"commit / baseline commit         = {ratio('ours-commit', 'base-commit')}")
PY
