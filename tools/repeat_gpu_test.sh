#!/usr/bin/env bash
# Runs one GPU test selection several times, each under a fresh MPS daemon, once
# per XLA_FLAGS variant: a flaky failure shows how often it happens and whether
# a variant (command buffers off, serialized) makes it go away.
# Usage: tools/repeat_gpu_test.sh "PYTEST -k EXPR" REPEATS [VARIANT ...]
#   VARIANT: base (no extra flags), nocb (command buffers off),
#            serial (command buffers replay in thunk order)
# Logs: $OUT/repeat_<variant>_<i>.log; one line per run on stdout.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/jax_ep_repeat}
mkdir -p "$OUT"
expr=$1 repeats=$2
shift 2
variants=${*:-base}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export CUDA_MPS_PIPE_DIRECTORY=/tmp/jax_ep_mps CUDA_MPS_LOG_DIRECTORY=/tmp/jax_ep_mps_log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
for v in $variants; do
  case $v in
    base) flags= ;;
    nocb) flags=--xla_gpu_enable_command_buffer= ;;
    serial) flags=--xla_gpu_command_buffer_scheduling_mode=SERIALIZE ;;
    *) echo "unknown variant $v"; exit 2 ;;
  esac
  for i in $(seq 1 "$repeats"); do
    nvidia-cuda-mps-control -d
    t0=$(date +%s)
    XLA_FLAGS="$flags" timeout 300 python3 -m pytest -q -x tests/gpu -k "$expr" \
      >"$OUT/repeat_${v}_$i.log" 2>&1
    rc=$?
    echo "$v run $i: rc $rc in $(( $(date +%s) - t0 )) s: $(grep -E 'passed|failed' "$OUT/repeat_${v}_$i.log" | tail -1)"
    grep -ah "jax_ep: " "$OUT/repeat_${v}_$i.log" | sort | uniq -c | head -5
    echo quit | nvidia-cuda-mps-control
    sleep 2
  done
done
