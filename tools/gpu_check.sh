#!/usr/bin/env bash
# Build jax_ep on a GPU machine, run the GPU tests and the benchmark, print a table last.
# Usage: tools/gpu_check.sh [build] [timeout] [kernels] [timeout-mps] [tests] [bench] [bench-ranks]
# (default: all but timeout-mps)
# Logs go to $OUT (the device tool's return folder) or /tmp/jax_ep_gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/jax_ep_gpu_check}
mkdir -p "$OUT"
stages=${*:-build timeout tests bench kernels bench-ranks}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}
status=0
has() { [[ " $stages " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"

if has build; then
  echo "=== build"
  t0=$(date +%s)
  $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log"; exit 1; }
  echo "built in $(( $(date +%s) - t0 )) s"
  $PY -c "import jax_ep; print(jax_ep.build_info())"
fi

# The timeout test runs before MPS starts (a trapped kernel takes down the MPS
# client; stage timeout-mps checks what happens there, for information).
if has timeout; then
  echo "=== timeout test (no MPS)"
  timeout 200 $PY -m pytest -q -rs tests/gpu -k timeout 2>&1 | tee "$OUT/gpu_timeout.log" | tail -30
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if has kernels; then
  echo "=== per-kernel device times (no MPS: ncu cannot attach to MPS clients) at R = 1, DeepEP shape (ncu)"
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  echo "ncu: ${NCU:-not found}"
  JAX_PLATFORMS=cuda timeout 300 "${NCU:-ncu}" --clock-control none --metrics gpu__time_duration.sum --csv \
    -k regex:'^(Dispatch|Cached|Combine|Layout|Barrier)' \
    $PY -m jax_ep.bench --shapes deepep --backends cuda --iters 3 --reps 1 >"$OUT/ncu.csv" 2>"$OUT/ncu.err"
  copy=$(JAX_PLATFORMS=cuda $PY -c "from jax_ep.bench import copy_bandwidth; print(round(copy_bandwidth()))" 2>/dev/null || echo 0)
  echo "device-to-device copy: $copy GB/s (read + write)"
  $PY tools/kernel_times.py "$OUT/ncu.csv" --copy-gbps "${copy:-0}" | tee "$OUT/kernels.txt" \
    || { tail -5 "$OUT/ncu.csv"; tail -15 "$OUT/ncu.err"; }
fi

# MPS lets the emulated ranks' kernels run concurrently on the one GPU.
export CUDA_MPS_PIPE_DIRECTORY=/tmp/jax_ep_mps CUDA_MPS_LOG_DIRECTORY=/tmp/jax_ep_mps_log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d && trap 'echo quit | nvidia-cuda-mps-control' EXIT

if has timeout-mps; then
  echo "=== timeout test under MPS (information only)"
  timeout 200 $PY -m pytest -q -rs tests/gpu -k timeout 2>&1 | tail -15
fi
if has tests; then
  echo "=== GPU tests"
  timeout 420 $PY -m pytest -q -rs tests/gpu -k "not timeout" ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if has bench; then
  echo "=== bench (all local devices)"
  JAX_PLATFORMS=cuda timeout 300 $PY -m jax_ep.bench --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -12
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if has bench-ranks; then
  for r in ${BENCH_RANKS:-2 8}; do
    echo "=== bench, $r emulated ranks on one GPU"
    timeout 300 $PY -m jax_ep.bench --ranks "$r" --iters 5 --reps 5 2>&1 \
      | tee "$OUT/bench_ranks$r.log" | tail -6
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done
fi
echo "=== summary"
grep -h -E "passed|failed|error" "$OUT/gpu_timeout.log" "$OUT/gpu_tests.log" 2>/dev/null | tail -3
cat "$OUT"/bench.log 2>/dev/null | tail -6
exit $status
