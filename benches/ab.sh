#!/usr/bin/env bash
# A change's effect on restore time: this build's `qmprestore merge` and `commit` against an
# older build's, in ABBA order (each round swaps who goes first, so neither always pays for
# the memory the other just freed), on the chain of benches/compare.sh (4 GiB virtual FULL
# with 2 GiB of data, three INCs of 256 MiB of scattered 64 KiB rewrites) in /dev/shm.
# Usage: bash benches/ab.sh /path/to/older/qmprestore [ROUNDS]   (needs qemu-img, qemu-io)
# Build the older one with: git worktree add /tmp/old REV && cargo build --release
#   --manifest-path /tmp/old/Cargo.toml --bin qmprestore
# MANIFESTS=1 gives the backup files checksum manifests (as real backups have), and
# OLD_ARGS are passed to the older build: `MANIFESTS=1 OLD_ARGS=--ignore-checksums bash
# benches/ab.sh target/release/qmprestore` measures what checking costs.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:?usage: bash benches/ab.sh /path/to/older/qmprestore [ROUNDS]}
ROUNDS=${2:-8}
cargo build --release -q --bin qmprestore
NEW=$(pwd)/target/release/qmprestore
W=$(mktemp -d /dev/shm/qmpab.XXXXXX); trap 'rm -rf "$W"' EXIT
D=$W/dir; mkdir -p "$D"
echo "building the chain in $W ..." >&2
qemu-img create -q -f qcow2 "$D/FULL-1000-disk.qcow2" 4096M
cmds=(); for off in 0 512 1024 1536; do cmds+=(-c "write -P 0x11 ${off}M 512M"); done
qemu-io -f qcow2 "${cmds[@]}" "$D/FULL-1000-disk.qcow2" >/dev/null
for i in 1 2 3; do
  f="$D/INC-$((1000+i))-disk.qcow2"; qemu-img create -q -f qcow2 "$f" 4096M
  python3 -c "
import random; r = random.Random($i)
for c in r.sample(range(4096 * 16), 256 * 16): print(f'write -P {0x20 + $i} {c * 65536} 65536')" > "$W/c$i"
  qemu-io -f qcow2 "$f" < "$W/c$i" >/dev/null
done
if [ "${MANIFESTS:-0}" = 1 ]; then
  cargo run --release -q --example write-manifest -- "$D"/*.qcow2
fi
OLD_ARGS=${OLD_ARGS:-}
# Touch the memory the runs will use once, so no run pays for its first use.
dd if=/dev/zero of="$W/warm" bs=4M count=800 status=none; rm -f "$W/warm"
merge() { # label binary [args]
  /usr/bin/time -f "$1 %e %U %S" -a -o "$W/res" "$2" -q merge --dir "$D" --targetfile "$W/out.qcow2" ${3:-} >/dev/null
  rm -f "$W/out.qcow2" "$W/out.qcow2.manifest"
}
commit() { # label binary [args]
  rm -rf "$W/cm"; mkdir "$W/cm"; cp "$D"/*.qcow2* "$W/cm/"
  /usr/bin/time -f "$1 %e %U %S" -a -o "$W/res" "$2" -q commit --dir "$W/cm" ${3:-} >/dev/null
  rm -rf "$W/cm"
}
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then
    merge new-merge "$NEW"; merge old-merge "$BASE" "$OLD_ARGS"; commit new-commit "$NEW"; commit old-commit "$BASE" "$OLD_ARGS"
  else
    merge old-merge "$BASE" "$OLD_ARGS"; merge new-merge "$NEW"; commit old-commit "$BASE" "$OLD_ARGS"; commit new-commit "$NEW"
  fi
done
python3 - "$W/res" <<'PY'
import collections, statistics as st, sys
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    n, w, u, s = line.split(); d[n].append((float(w), float(u) + float(s)))
for n in sorted(d):
    ws = [x[0] for x in d[n]]
    print(f"{n:11} median {st.median(ws):.2f} s  best {min(ws):.2f}  cpu {st.median(x[1] for x in d[n]):.2f}")
for k in ("merge", "commit"):
    new, old = [x[0] for x in d["new-" + k]], [x[0] for x in d["old-" + k]]
    print(f"{k}: new/old median {st.median(new) / st.median(old):.2f}, best {min(new) / min(old):.2f}")
PY
