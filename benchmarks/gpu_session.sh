#!/usr/bin/env bash
# One prepared run on a GPU machine: the figures in docs/performance.md and
# docs/parallel.md that say "GPU" come from this script.
#
#   OUT=dir bash benchmarks/gpu_session.sh [TOTAL_SECONDS]
#
# Runs from the repository root with the machine's own python3 (JAX with CUDA, PyTorch,
# Flax and Equinox installed; jax_rnn from this checkout through PYTHONPATH, nothing is
# installed). Six phases, each cut off so that the whole run ends within TOTAL_SECONDS
# (default 560), most important first:
#   1. benchmarks/parallel.py: sequential vs DEER vs quasi-DEER vs cuDNN nn.RNN over
#      T in 10^2..10^5 and H in 4..256 (forward; forward+backward at H=16): issue #5's
#      bar;
#   2. the correctness tests of the fast and parallel paths and of the kernels, run on
#      the GPU (the only check of the compiled Pallas kernels);
#   3. benchmarks/parallel.py again at JAX's default matrix-product precision (TF32 on
#      this GPU), T=10^4, H=16: that DEER and quasi-DEER still converge there (their
#      solver evaluates the step with full float32 products whatever that setting);
#   4. jax-rnn bench on the sizes against scan, Flax, Equinox and cuDNN;
#   5. benchmarks/kernels.py: the Elman cell's one-kernel loops against XLA's loop
#      and cuDNN, at three sizes;
#   6. benchmarks/unroll_factor.py: scan's unroll factor on this backend.
# But for phase 3, every phase runs with full float32 matrix products (JAX "highest",
# PyTorch TF32 off), so that the comparisons are like for like and the tests' float32
# tolerances hold. The device returns at most 8 files, so at the end everything but
# run.log is packed into results.tgz.
set -u
TOTAL=${1:-560}
OUT=${OUT:-gpu-out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several test workers share the GPU
export JAX_DEFAULT_MATMUL_PRECISION=highest  # but for phase 3 (env -u there)
LOG="$OUT/run.log"

left() { echo $((TOTAL - SECONDS)); }
phase() {  # phase NAME CAP_SECONDS LOGFILE command...: runs it, cut off, output to LOGFILE
    local name=$1 cap=$2 log=$3 budget
    shift 3
    budget=$(left)
    ((budget > cap)) && budget=$cap
    if ((budget < 20)); then
        echo "== $name: skipped, ${budget}s left" | tee -a "$LOG"
        return
    fi
    echo "== $name (at most ${budget}s, from ${SECONDS}s)" | tee -a "$LOG"
    timeout "$budget" "$@" 2>&1 | tee -a "$log"
    echo "== $name: exit ${PIPESTATUS[0]} at ${SECONDS}s" | tee -a "$LOG"
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" -c "
import importlib.metadata, jax, torch, jax_rnn
print('python', __import__('sys').version.split()[0], 'jax', jax.__version__,
      'torch', torch.__version__, 'jax_rnn', jax_rnn.__version__)
print('jax devices', jax.devices(), 'torch cuda', torch.cuda.is_available())
for m in ('flax', 'equinox', 'dm-haiku', 'rich', 'matplotlib', 'optax'):
    try:
        print(m, importlib.metadata.version(m))
    except Exception as err:
        print(m, 'missing:', type(err).__name__)
"
} 2>&1 | tee -a "$LOG"

# shellcheck disable=SC2086  # the *_ARGS are word lists
phase parallel 140 "$LOG" "$PY" benchmarks/parallel.py --out "$OUT" --precision highest \
    ${PARALLEL_ARGS:---hs 16 64 4 256 --grad-h 16 --repeats 5}
# -k: the C++ kernels' tests (test_cpu_*, and the cases run with the "native" setup) are
# for a CPU backend (they fail on a GPU by design).
# shellcheck disable=SC2086
phase tests 130 "$OUT/tests.log" "$PY" -m pytest \
    -p no:cacheprovider -v ${TEST_ARGS:--n 8} -k "not test_cpu_ and not native" \
    tests/test_kernels.py tests/test_fused.py tests/test_parallel.py tests/test_unroll_parallel.py \
    tests/test_gated_cells.py tests/test_core.py >/dev/null
phase default_precision 40 "$LOG" env -u JAX_DEFAULT_MATMUL_PRECISION "$PY" benchmarks/parallel.py \
    --out "$OUT/default_precision" --precision default --ts 10000 --hs 16 --repeats 3
# shellcheck disable=SC2086
phase bench 160 "$LOG" "$PY" -m jax_rnn bench --precision highest --out "$OUT" \
    ${BENCH_ARGS:---configs t1000_b32 t10000_b8 t1000_b1 t200_b64 --cells elman gru lstm \
    --peers scan flax equinox torch --repeats 5 --budget 0.5}
# shellcheck disable=SC2086
phase kernels 70 "$LOG" "$PY" benchmarks/kernels.py --out "$OUT" \
    ${KERNELS_ARGS:---sizes t1000_b1 t1000_b32 t10000_b8 --repeats 5}
# shellcheck disable=SC2086
phase unroll_factor 40 "$LOG" "$PY" benchmarks/unroll_factor.py ${UNROLL_ARGS:---repeats 5}
if [[ -f "$OUT/tests.log" ]]; then
    grep -E "FAILED|ERROR" "$OUT/tests.log" | head -20 | tee -a "$LOG"
    tail -n 1 "$OUT/tests.log" | tee -a "$LOG"
fi
echo "total ${SECONDS}s" | tee -a "$LOG"
# Everything but run.log in one archive (the device returns at most 8 files).
(cd "$OUT" && find . -mindepth 1 -maxdepth 1 ! -name run.log ! -name results.tgz -print0 |
    xargs -0 -r tar -czf results.tgz --remove-files)
