#!/usr/bin/env bash
# A/B kernel variants in one device call: for each variant, patch a copy of
# ffi/ (sed expressions or Python patch scripts), rebuild (~15 s), and time
# the cuda backend with the device clock. The tree is restored at the end;
# variants are never committed. Output: $OUT/variants.log (one line per row).
#
#   tools/kernel_variants.sh base \
#       'unroll4=s/constexpr int kReduceUnroll = 8;/constexpr int kReduceUnroll = 4;/' \
#       'timers=tools/variants/reduce_timers.py'
#
# A variant is NAME=EDIT[@@EDIT...]: an EDIT ending in .py is run as a patch
# script (it edits ffi/intranode.cu in place and exits non-zero if its anchor
# is gone), anything else is a sed expression on ffi/intranode.cu. "base" is
# the tree as it is. Env: BENCH_ARGS (default: --shapes deepep,small --reps 5).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/jax_ep_variants}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
PY=${PYTHON:-python3}
saved=$(mktemp -d)
cp ffi/intranode.cu "$saved/"
restore() { cp "$saved/intranode.cu" ffi/intranode.cu; }
trap restore EXIT
echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" \
  | tee "$OUT/variants.log"
t0=$(date +%s)
for spec in "$@"; do
  name=${spec%%=*}
  edits=""; [ "$spec" != "$name" ] && edits=${spec#*=}
  restore
  ok=1
  parts=()
  while [ -n "$edits" ]; do
    parts+=("${edits%%@@*}")
    [[ "$edits" == *@@* ]] && edits=${edits#*@@} || edits=""
  done
  for e in "${parts[@]}"; do
    [ -z "$e" ] && continue
    if [[ "$e" == *.py ]]; then $PY "$e" || ok=0; else sed -i "$e" ffi/intranode.cu || ok=0; fi
  done
  unchanged=0
  cmp -s ffi/intranode.cu "$saved/intranode.cu" && unchanged=1
  if [ "$ok" = 0 ] || { [ "$unchanged" = 1 ] && [ "$name" != base ]; }; then
    echo "=== $name: the edit did not apply"; continue
  fi
  if ! $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build_$name.log" 2>&1; then
    echo "=== $name: build failed"; tail -20 "$OUT/build_$name.log"; continue
  fi
  echo "=== $name (t=$(( $(date +%s) - t0 )) s)" | tee -a "$OUT/variants.log"
  timeout 200 $PY -m jax_ep.bench --backends cuda --clock device \
    ${BENCH_ARGS:---shapes deepep,small --reps 5} >"$OUT/bench_$name.log" 2>&1
  grep "^cuda" "$OUT/bench_$name.log" | sort -u | tee -a "$OUT/variants.log"
  grep "^DBG" "$OUT/bench_$name.log" | tail -8 | tee -a "$OUT/variants.log"
done
restore
$PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build_restore.log" 2>&1
echo "--- $(( $(date +%s) - t0 )) s"
