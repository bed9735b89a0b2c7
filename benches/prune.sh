#!/usr/bin/env bash
# What a prune's folding costs (issue: prune), on the bench chain of benches/compare.sh
# (benches/chain.sh)
# with manifests: a FULL (4 GiB virtual, 2 GiB data) and three INCs of 256 MiB of
# scattered 64 KiB rewrites, named so that days separate them (UTC):
#   FULL day 0, INC1 day 1, INC2 day 2 08:00, INC3 day 2 20:00.
# Alternating, RUNS times each, on a fresh copy of the directory:
#   fold-full    prune --keep-last 3: the FULL's point goes, INC1 is committed into the
#                FULL (which becomes FULL-<INC1's time>), its manifest kept block by block
#   fold-middle  prune --keep-daily 3: INC2 goes, folded into INC3
#   qemu-commit  the same as fold-full with qemu-img: rebase -u INC1 onto the FULL, commit
#   read-inc     reading one INC file (cat), the floor of any fold
#   read-full    reading the FULL file (cat): what recomputing its manifest would cost
# and, with BASELINE=/path/to/an/older/qmprestore, base-fold-full and base-fold-middle:
# the same prunes by that build. Run it again with a smaller DATA_MIB to see that a fold
# costs what the INC costs, not what the FULL does. It prints median wall times and ratios; every result is checked with qemu-img compare
# against the linked chain, and `qmprestore verify`. Usage: bash benches/prune.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
SIZE_MIB=${SIZE_MIB:-4096}; DATA_MIB=${DATA_MIB:-2048}; INC_MIB=${INC_MIB:-256}
cargo build --release -q --bin qmprestore --example write-manifest
B=$(pwd)/target/release
base=${BENCH_DIR:-/dev/shm}; [ -d "$base" ] || base=${TMPDIR:-/tmp}
W=$(mktemp -d "$base/qmpprune.XXXXXX")
trap 'rm -rf "$W"' EXIT
D=$W/dir; mkdir -p "$D"
DAY=86400; T0=1704067200
T=($T0 $((T0 + DAY)) $((T0 + 2 * DAY + 8 * 3600)) $((T0 + 2 * DAY + 20 * 3600)))
FULL=FULL-${T[0]}-disk.qcow2
echo "building the chain in $W ..." >&2
. benches/chain.sh
bench_full "$D/$FULL"
INCS=()
for i in 1 2 3; do
  f=INC-${T[$i]}-disk.qcow2; INCS+=("$f")
  bench_inc "$D/$f" "$i"
done
"$B/examples/write-manifest" "$D"/*.qcow2 2>/dev/null
# The linked chain, read by qemu-img: the models of the points.
mkdir -p "$W/chain"; cp "$D"/*.qcow2 "$W/chain/"
prev=$FULL
for f in "${INCS[@]}"; do qemu-img rebase -u -b "$prev" -F qcow2 "$W/chain/$f"; prev=$f; done

measure() { # name, command... -> "name wall"
  local name=$1; shift
  /usr/bin/time -f "%e" -o "$W/time" "$@" >/dev/null 2>"$W/err" || { cat "$W/err" >&2; exit 1; }
  echo "$name $(cat "$W/time")" >> "$W/results"
}
[ -x /usr/bin/time ] || { apt-get install -y -q time >/dev/null 2>&1 || true; }
: > "$W/results"
fresh() { rm -rf "$W/p"; mkdir "$W/p"; cp "$D"/* "$W/p/"; }
same() { # file in $W/p, point in the linked chain
  qemu-img compare -q "$W/p/$1" "$W/chain/$2" || { echo "MISMATCH: $1" >&2; exit 1; }
}
for r in $(seq "$RUNS"); do
  fresh
  measure fold-full "$B/qmprestore" -q prune --dir "$W/p" --keep-last 3 --utc
  if [ "$r" = 1 ]; then
    # The FULL became INC1's point; INC2 and INC3 still read as before on top of it.
    qemu-img check -q "$W/p/FULL-${T[1]}-disk.qcow2"
    same "FULL-${T[1]}-disk.qcow2" "${INCS[0]}"
    "$B/qmprestore" -q verify --dir "$W/p"
  fi
  fresh
  measure fold-middle "$B/qmprestore" -q prune --dir "$W/p" --keep-daily 3 --utc
  if [ "$r" = 1 ]; then
    [ ! -e "$W/p/${INCS[1]}" ] || { echo "INC2 still there" >&2; exit 1; }
    qemu-img check -q "$W/p/${INCS[2]}"
    qemu-img rebase -u -b "${INCS[0]}" -F qcow2 "$W/p/${INCS[2]}"
    qemu-img rebase -u -b "$FULL" -F qcow2 "$W/p/${INCS[0]}"
    same "${INCS[2]}" "${INCS[2]}"
    qemu-img rebase -u -b "" "$W/p/${INCS[2]}"; qemu-img rebase -u -b "" "$W/p/${INCS[0]}"
    "$B/qmprestore" -q verify --dir "$W/p"
  fi
  fresh
  measure qemu-commit bash -c '
    set -e; cd "$1"; qemu-img rebase -u -b "$2" -F qcow2 "$3"; qemu-img commit -q "$3"' _ "$W/p" "$FULL" "${INCS[0]}"
  [ "$r" = 1 ] && same "$FULL" "${INCS[0]}"
  if [ -n "${BASELINE:-}" ]; then
    fresh; measure base-fold-full "$BASELINE" -q prune --dir "$W/p" --keep-last 3 --utc
    fresh; measure base-fold-middle "$BASELINE" -q prune --dir "$W/p" --keep-daily 3 --utc
  fi
  measure read-inc cat "$D/${INCS[0]}"
  measure read-full cat "$D/$FULL"
done
rm -rf "$W/p"
echo "every result compares equal to its point and verifies" >&2
python3 - "$W/results" "$INC_MIB" "$DATA_MIB" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    n, w = line.split(); rows.setdefault(n, []).append(float(w))
# /usr/bin/time counts hundredths: a read faster than that counts as one.
med = {n: max(statistics.median(v), 0.01) for n, v in rows.items()}
print(f"{'method':<13}{'median s':>10}{'best s':>9}")
for n, v in rows.items():
    print(f"{n:<13}{med[n]:>10.2f}{min(v):>9.2f}")
print(f"fold-full / qemu-img rebase+commit = {med['fold-full']/med['qemu-commit']:.2f}")
print(f"fold-full / reading the FULL       = {med['fold-full']/med['read-full']:.2f}  ({sys.argv[3]} MiB of data: about the INC's cost, not the FULL's, is the goal)")
print(f"fold-full / reading the INC        = {med['fold-full']/med['read-inc']:.2f}  ({sys.argv[2]} MiB)")
print(f"fold-middle / reading the INC      = {med['fold-middle']/med['read-inc']:.2f}")
if 'base-fold-full' in rows:
    print(f"fold-full / baseline              = {med['fold-full']/med['base-fold-full']:.2f}")
    print(f"fold-middle / baseline            = {med['fold-middle']/med['base-fold-middle']:.2f}")
PY
