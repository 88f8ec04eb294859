#!/usr/bin/env bash
# Build jax_ep on a GPU machine, run the GPU tests and the benchmark, print a table last.
# Usage: tools/gpu_check.sh [stage ...]   (default: build faults tests bench sanitizer)
# Stages:
#   build      pip install --no-build-isolation -e . (against the machine's jax)
#   faults     tests that make kernels trap (timeouts, ranks disagreeing, stale
#              layout, use after destroy): run without MPS, where a trap takes
#              down the MPS clients
#   tests      the rest of the GPU suite in every process model the machine
#              allows (emulated ranks under MPS; one process and one process
#              per GPU when two or more GPUs are visible)
#   bench      python -m jax_ep.bench --dtypes bf16,fp8 --out $OUT (one process, every GPU)
#   bench-ll   the low-latency mode, bf16 and FP8 (--mode low_latency), into $OUT/ll
#   bench-pergpu, bench-emulated   the same with one process per GPU / ranks on GPU 0
#              (BENCH_RANKS="2 8": the emulated rank counts; BENCH_ARGS applies to both)
#   bench-mesh the two-axis Buffer (--mesh Gx1: node hop on NCCL, local hop ours)
#   bench-mesh-local  the two-axis Buffer over 2G processes (--mesh Gx2, two ranks
#              sharing each GPU under MPS: the local hop on our kernels over CUDA IPC
#              within a GPU, the node hop on NCCL across GPUs); cuda only
#   sanitizer  compute-sanitizer memcheck of the main job over every GPU (0 errors)
#   kernels    per-kernel device times at R = 1 (ncu)
#   experts    the grouped-matmul tests and the MoE block on the Mosaic kernels
#              (Hopper), on every local GPU in one process
#   trace      rebuild with kernel phase timestamps (JAX_EP_PHASE_TRACE), run the
#              small shape (normal dispatch, cached dispatch and combine;
#              low-latency ops) on cuda, keep the
#              trace lines in $OUT/trace_*.log (every block's; their spread per
#              phase, by tools/trace_summary.py, in trace_*_summary.txt), then
#              rebuild without them
#              (TRACE_SHAPES=small,deepep traces the normal mode at both shapes)
#   random     1008 random routings on the cuda backend against the NumPy
#              reference (tests/test_random_routings.py's check): one process
#              on every GPU (R = 1, 2, 4, 8 up to the GPU count), then 336 each
#              with 2, 4 and 8 ranks emulated on GPU 0, and one process per GPU
# Logs go to $OUT (the device tool's return folder) or /tmp/jax_ep_gpu_check.
# Env: PYTEST_K (extra -k filter for tests), BENCH_ARGS (extra bench arguments).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/jax_ep_gpu_check}
mkdir -p "$OUT"
stages=${*:-build faults tests bench sanitizer}
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
PY=${PYTHON:-python3}
NGPU=$(nvidia-smi -L | wc -l)
status=0
has() { [[ " $stages " == *" $1 "* ]]; }
FAULT_TESTS="timeout or different_ops or stale_layout or after_destroy or pending_receive"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
[ "$NGPU" -gt 1 ] && nvidia-smi topo -m | head -$((NGPU + 1)) | tee -a "$OUT/card.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"

if has build; then
  echo "=== build"
  t0=$(date +%s)
  $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log"; exit 1; }
  echo "built in $(( $(date +%s) - t0 )) s"
  $PY -c "import jax_ep; print(jax_ep.build_info())"
fi

if has faults; then
  echo "=== fault tests (no MPS)"
  timeout 420 $PY -m pytest -q -rs tests/gpu -k "$FAULT_TESTS" 2>&1 | tee "$OUT/gpu_faults.log" | tail -25
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if has experts; then
  echo "=== grouped matmuls and the MoE block on Mosaic GPU kernels"
  JAX_PLATFORMS=cuda timeout 400 $PY -m pytest -q -rs tests/test_grouped_matmul.py \
    tests/gpu/test_experts_gpu.py 2>&1 | tee "$OUT/experts.log" | tail -25
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if has kernels; then
  echo "=== per-kernel device times at R = 1, DeepEP shape (ncu; no MPS)"
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  CUDA_VISIBLE_DEVICES=0 JAX_PLATFORMS=cuda timeout 300 "${NCU:-ncu}" --clock-control none \
    --metrics gpu__time_duration.sum --csv -k regex:'(Dispatch|Cached|Combine|Layout|Scan)' \
    $PY -m jax_ep.bench --shapes deepep --backends cuda --iters 3 --reps 1 >"$OUT/ncu.csv" 2>"$OUT/ncu.err"
  copy=$(CUDA_VISIBLE_DEVICES=0 JAX_PLATFORMS=cuda $PY -c "from jax_ep.bench import copy_bandwidth; print(round(copy_bandwidth()))" 2>/dev/null || echo 0)
  echo "device-to-device copy: $copy GB/s (read + write)"
  $PY tools/kernel_times.py "$OUT/ncu.csv" --copy-gbps "${copy:-0}" | tee "$OUT/kernels.txt" \
    || { tail -5 "$OUT/ncu.csv"; tail -15 "$OUT/ncu.err"; }
fi

if has sanitizer; then
  echo "=== compute-sanitizer memcheck, main job on every GPU"
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -1)
  JAX_PLATFORMS=cuda timeout 400 "${SAN:-compute-sanitizer}" --tool memcheck --report-api-errors no \
    --target-processes all $PY -m jax_ep --backend cuda --iters 2 >"$OUT/sanitizer.log" 2>&1
  san=$?
  tail -8 "$OUT/sanitizer.log"
  grep -q "ERROR SUMMARY: 0 errors" "$OUT/sanitizer.log" && [ "$san" = 0 ] || { echo "sanitizer: errors or failure"; status=1; }
fi

# MPS lets the emulated ranks' kernels run concurrently on one GPU.
export CUDA_MPS_PIPE_DIRECTORY=/tmp/jax_ep_mps CUDA_MPS_LOG_DIRECTORY=/tmp/jax_ep_mps_log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d && trap 'echo quit | nvidia-cuda-mps-control' EXIT

if has tests; then
  echo "=== GPU tests ($NGPU GPU(s); every process model available)"
  K="not ($FAULT_TESTS)"
  [ -n "${PYTEST_K:-}" ] && K="$K and ($PYTEST_K)"
  timeout 560 $PY -m pytest -q -rs tests/gpu -k "$K" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if has random; then
  echo "=== random routings, cuda backend"
  RANDOM_OK=1
  JAX_PLATFORMS=cuda timeout 560 $PY -X faulthandler -c "from jax_ep import testing as t; \
s = t.check_random_routings(0, 1, backend='cuda', count=1008); \
print('one process:', s['routings'], 'routings, R =', sorted({c['R'] for c in s['configs']}))" \
    2>&1 | tee "$OUT/random.log" | tail -5
  [ "${PIPESTATUS[0]}" = 0 ] || RANDOM_OK=0
  for r in 2 4 8; do
    timeout 560 $PY -m jax_ep.multiprocess --ranks "$r" jax_ep.testing:check_random_routings \
      '{"backend": "cuda", "count": 336}' >"$OUT/random_emulated$r.log" 2>&1 \
      && echo "emulated R = $r: 336 routings ok" \
      || { RANDOM_OK=0; tail -30 "$OUT/random_emulated$r.log"; }
  done
  if [ "$NGPU" -gt 1 ]; then
    timeout 560 $PY -m jax_ep.multiprocess --ranks "$NGPU" --gpus "$NGPU" \
      jax_ep.testing:check_random_routings '{"backend": "cuda", "count": 336}' \
      >"$OUT/random_pergpu.log" 2>&1 && echo "one process per GPU (R = $NGPU): 336 routings ok" \
      || { RANDOM_OK=0; tail -30 "$OUT/random_pergpu.log"; }
  fi
  [ "$RANDOM_OK" = 1 ] || status=1
fi
if has trace; then
  echo "=== phase traces, small shape, one process on every GPU"
  $PY -m pip install --no-build-isolation --no-deps -C cmake.define.JAX_EP_PHASE_TRACE=ON -e . \
    >"$OUT/trace_build.log" 2>&1 || { tail -30 "$OUT/trace_build.log"; status=1; }
  for mode in normal low_latency; do
    shapes=small
    [ "$mode" = normal ] && shapes=${TRACE_SHAPES:-small}
    JAX_PLATFORMS=cuda timeout 200 $PY -m jax_ep.bench --mode $mode --shapes "$shapes" --backends cuda \
      >"$OUT/trace_raw_$mode.log" 2>&1 || status=1
    grep -a "phase trace" "$OUT/trace_raw_$mode.log" >"$OUT/trace_$mode.log"
    rm -f "$OUT/trace_raw_$mode.log"
    $PY tools/trace_summary.py "$OUT/trace_$mode.log" | tee "$OUT/trace_${mode}_summary.txt"
  done
  $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || status=1
fi
if has bench; then
  echo "=== bench (one process, every GPU)"
  JAX_PLATFORMS=cuda timeout 560 $PY -m jax_ep.bench --dtypes bf16,fp8 --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -16
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if has bench-ll; then
  echo "=== bench, low-latency mode (one process, every GPU)"
  JAX_PLATFORMS=cuda timeout 560 $PY -m jax_ep.bench --mode low_latency --dtypes bf16,fp8 \
    --out "$OUT/ll" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_ll.log" | tail -10
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if has bench-pergpu && [ "$NGPU" -gt 1 ]; then
  echo "=== bench, one process per GPU"
  timeout 560 $PY -m jax_ep.bench --ranks "$NGPU" --gpus "$NGPU" --out "$OUT/pergpu" ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/bench_pergpu.log" | tail -10
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if has bench-mesh && [ "$NGPU" -gt 1 ]; then
  echo "=== bench, two axes (node = $NGPU, local = 1: node hop on NCCL, local hop on our kernels)"
  JAX_PLATFORMS=cuda timeout 400 $PY -m jax_ep.bench --mesh "${NGPU}x1" --backends cuda,xla \
    --out "$OUT/mesh" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_mesh.log" | tail -8
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if has bench-mesh-local && [ "$NGPU" -gt 1 ]; then
  echo "=== bench, two axes over $((2 * NGPU)) processes (node = $NGPU, local = 2 sharing each GPU)"
  timeout "${MESH_TIMEOUT:-400}" $PY -m jax_ep.bench --ranks $((2 * NGPU)) --gpus "$NGPU" \
    --mesh "${NGPU}x2" --backends cuda --shapes "${MESH_SHAPES:-deepep,small}" --iters 5 --reps 3 \
    --out "$OUT/mesh_local" 2>&1 | tee "$OUT/bench_mesh_local.log" | tail -8
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if has bench-emulated; then
  for r in ${BENCH_RANKS:-2}; do
    echo "=== bench, $r ranks emulated on GPU 0 (MPS)"
    timeout 400 $PY -m jax_ep.bench --ranks "$r" --iters 5 --reps 5 --out "$OUT/emulated$r" ${BENCH_ARGS:-} 2>&1 \
      | tee "$OUT/bench_emulated$r.log" | tail -6
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done
fi
echo "=== summary"
grep -h -E "passed|failed|error" "$OUT"/gpu_*.log 2>/dev/null | tail -4
tail -12 "$OUT"/bench.log 2>/dev/null
exit $status
