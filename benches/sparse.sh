#!/usr/bin/env bash
# Merge of sparse multi-TiB chains: `qmprestore merge` side by side with
# `qemu-img convert -W -m 16 -O qcow2` of the same chain linked (qemu-img is the oracle
# only). For each virtual size in SIZES (default "1T 16T 64T") and cluster size in
# CLUSTERS (default "64k 2M"): a FULL and three INCs in /dev/shm, each holding 8 scattered
# 256 KiB writes spread over the whole disk (a few MiB in all), with manifests. RUNS
# alternating rounds (default 3); prints median wall time, peak RSS and the ratio, and
# checks each output with qemu-img compare and check. Then commit of the three INCs into
# the FULL: `qmprestore commit` on a copy of the directory against `qemu-img commit -b` on
# a copy of the linked chain.
# Usage: bash benches/sparse.sh [RUNS]   (needs qemu-img, qemu-io)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
SIZES=${SIZES:-1T 16T 64T}
CLUSTERS=${CLUSTERS:-64k 2M}
cargo build --release -q --bin qmprestore --example write-manifest
B=$(pwd)/target/release
base=/dev/shm; [ -d "$base" ] || base=${TMPDIR:-/tmp}
W=$(mktemp -d "$base/qmprestore-sparse.XXXXXX")
trap 'rm -rf "$W"' EXIT
tib() { case "$1" in *T) echo "${1%T}" ;; *) echo "size must end in T" >&2; exit 1 ;; esac; }

measure() { # label out command...: appends "label seconds peak-KiB"
  local label=$1 out=$2; shift 2
  rm -f "$out" "$out.manifest"
  /usr/bin/time -f "%e %M" -o "$W/time" "$@" >/dev/null 2>"$W/err" || { cat "$W/err" >&2; exit 1; }
  echo "$label $(cat "$W/time")" >> "$W/results"
}

: > "$W/results"
for size in $SIZES; do
  for cs in $CLUSTERS; do
    D=$W/$size-$cs; mkdir -p "$D"
    t=$(tib "$size")
    i=0
    for level in FULL-1000 INC-1100 INC-1200 INC-1300; do
      f=$D/$level-disk.qcow2
      qemu-img create -q -f qcow2 -o cluster_size="$cs" "$f" "$size"
      python3 - "$t" "$i" > "$W/cmds" <<'PY'
import sys
t, i = int(sys.argv[1]), int(sys.argv[2])
step = (t << 40) // 8
for k in range(8):  # 8 writes of 256 KiB, spread over the disk, shifted per layer
    off = (k * step + i * (1 << 30)) // 65536 * 65536
    print(f"write -P 0x{0x30 + i:x} {off} 256k")
PY
      qemu-io -f qcow2 "$f" < "$W/cmds" >/dev/null
      i=$((i + 1))
    done
    "$B/examples/write-manifest" "$D"/*.qcow2 2>/dev/null
    # The linked chain for qemu-img: copies of the INCs with backing references.
    L=$W/linked-$size-$cs; mkdir -p "$L"
    prev=$D/FULL-1000-disk.qcow2
    for level in INC-1100 INC-1200 INC-1300; do
      cp "$D/$level-disk.qcow2" "$L/$level.qcow2"
      qemu-img rebase -u -b "$prev" -F qcow2 "$L/$level.qcow2"
      prev=$L/$level.qcow2
    done
    for r in $(seq "$RUNS"); do
      if [ $((r % 2)) = 1 ]; then order="ours qemu"; else order="qemu ours"; fi
      for who in $order; do
        if [ "$who" = ours ]; then
          measure "$size-$cs ours" "$W/ours.qcow2" "$B/qmprestore" -q merge --dir "$D" --targetfile "$W/ours.qcow2"
        else
          measure "$size-$cs qemu" "$W/qemu.qcow2" qemu-img convert -W -m 16 -O qcow2 -o cluster_size="$cs" "$prev" "$W/qemu.qcow2"
        fi
      done
    done
    # Commit of the three INCs into the FULL: `qmprestore commit` on a copy of the
    # directory against `qemu-img commit -b` on a copy of the linked chain (copies untimed).
    for r in $(seq "$RUNS"); do
      if [ $((r % 2)) = 1 ]; then order="ours qemu"; else order="qemu ours"; fi
      for who in $order; do
        rm -rf "$W/c"; mkdir "$W/c"
        if [ "$who" = ours ]; then
          cp --sparse=always "$D"/* "$W/c/"
          measure "$size-$cs ours-commit" "$W/c/none" "$B/qmprestore" -q commit --dir "$W/c"
        else
          cp --sparse=always "$D/FULL-1000-disk.qcow2" "$W/c/full.qcow2"
          p=$W/c/full.qcow2
          for level in INC-1100 INC-1200 INC-1300; do
            cp --sparse=always "$D/$level-disk.qcow2" "$W/c/$level.qcow2"
            qemu-img rebase -u -b "$p" -F qcow2 "$W/c/$level.qcow2"
            p=$W/c/$level.qcow2
          done
          measure "$size-$cs qemu-commit" "$W/c/none" qemu-img commit -q -b "$W/c/full.qcow2" "$p"
        fi
      done
    done
    rm -rf "$W/c"
    qemu-img compare -q "$W/ours.qcow2" "$prev" || { echo "MISMATCH at $size $cs" >&2; exit 1; }
    qemu-img check -q "$W/ours.qcow2" || { echo "check failed at $size $cs" >&2; exit 1; }
    rm -rf "$D" "$L" "$W"/ours.qcow2* "$W/qemu.qcow2"
  done
done
echo "$(qemu-img --version | head -n 1); FULL + 3 INCs, 8 x 256 KiB per layer; $RUNS rounds, alternating"
echo
python3 - "$W/results" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    case, who, t, rss = line.split()
    runs.setdefault((case, who), []).append((float(t), int(rss)))
print("| chain | merge s | peak RSS MiB | qemu-img convert s | ratio | commit s | qemu-img commit s | ratio |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
med = lambda v: statistics.median(t for t, _ in v)
for case in dict.fromkeys(c for c, _ in runs):
    o, q = runs[case, "ours"], runs[case, "qemu"]
    oc, qc = runs[case, "ours-commit"], runs[case, "qemu-commit"]
    rss = max(r for _, r in o) / 1024
    print(f"| {case} | {med(o):.3f} | {rss:.1f} | {med(q):.3f} | {med(o) / max(med(q), 0.001):.2f} "
          f"| {med(oc):.3f} | {med(qc):.3f} | {med(oc) / max(med(qc), 0.001):.2f} |")
print()
print("ratio = qmprestore / qemu-img (below 1: ours faster); times under 10 ms read as 0.00")
PY
