#!/usr/bin/env bash
# The GPU check, as one device call runs it from the repository root:
#
#     bash benchmarks/gpu_check.sh          # logs and results under $OUT (default /tmp/nprt-gpu-check)
#
# 1. nvidia-smi; 2. the GPU tests and the backend-seam tests (pytest.log, gpu_measured.tsv);
# 3. the GPU benchmark (bench.log, gpu_bench.md). Each step has its own time limit and a
# failed or timed-out step does not stop the next; summary.txt has each step's exit
# status and seconds (124: timed out). Worst case 20 + 180 + 240 s (+ 10 s to kill each), under
# a 590 s call.
#
# Nothing is installed: the device's python3 has numpy, cupy, torch, transformers,
# safetensors, tokenizers, jinja2, ml-dtypes, pytest, and neither these tests nor the
# benchmark import `gguf` (only a .gguf conversion does). Wheels carried in .whl/, if
# any, are installed into /tmp/site first.
#
# A dry run without a GPU (the tests run on NumPy, the benchmark on tiny shapes):
#     NPRT_GPU_TEST_DEVICE=cpu GPU_BENCH_ARGS="--device cpu --tiny" PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OUT="${OUT:-/tmp/nprt-gpu-check}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
: > "$OUT/summary.txt"

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

# step NAME SECONDS COMMAND...: run it under `timeout`, output to the terminal and $OUT/NAME.log
step() {
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name: $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

step nvidia-smi 20 nvidia-smi
step pytest 180 "$PYTHON" -m pytest -q -rs -p no:cacheprovider --durations=10 tests/test_gpu.py tests/test_backend.py
# shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of flags
step bench 240 "$PYTHON" benchmarks/gpu_bench.py ${GPU_BENCH_ARGS:---profile 32}
cat "$OUT/summary.txt"
