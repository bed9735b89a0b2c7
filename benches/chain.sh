# The bench chain's files, shared by compare.sh and prune.sh (sourced; uses SIZE_MIB,
# DATA_MIB and INC_MIB): a FULL with DATA_MIB of data from its start, and INCs of INC_MIB
# of scattered 64 KiB rewrites (the same clusters for the same index on every run).

bench_full() { # file
  qemu-img create -q -f qcow2 "$1" "${SIZE_MIB}M"
  local step=512 off=0 cmds=()
  while [ $off -lt "$DATA_MIB" ]; do cmds+=(-c "write -P 0x11 ${off}M ${step}M"); off=$((off+step)); done
  qemu-io -f qcow2 "${cmds[@]}" "$1" >/dev/null
}

bench_inc() { # file, index (1, 2, 3: seed and pattern)
  qemu-img create -q -f qcow2 "$1" "${SIZE_MIB}M"
  python3 - "$2" "$SIZE_MIB" "$INC_MIB" <<'PY' | qemu-io -f qcow2 "$1" >/dev/null
import random, sys
i, size, inc = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
r = random.Random(i); n = inc * 16; clusters = size * 16
for c in r.sample(range(clusters), n):
    print(f"write -P {0x20 + i} {c * 65536} 65536")
PY
}
