#!/usr/bin/env bash
# One call on the GPU machine (device tool): build the extension in place, run the whole test
# suite on the GPU, memcheck the kernel tests, run the benchmark suite. Logs and results go
# to $OUT (default ./gpu-out) so they come back even when a step fails or times out.
#   usage: bash .ci/gpu_check.sh [quick]
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MOELORA_CUDA_ARCHS=${MOELORA_CUDA_ARCHS:-9.0a}
PY=${PY:-python3}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.log"

# Build in place; the pure-Python package still works (triton/torch backends) if this fails.
$PY -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 20 | tee "$OUT/build.log"
$PY -m moelora.env 2>&1 | tee -a "$OUT/env.log"

$PY -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log"

if command -v compute-sanitizer >/dev/null && [ "${1:-}" != "quick" ]; then
    compute-sanitizer --tool memcheck --error-exitcode 1 \
        $PY -m pytest -q -p no:cacheprovider tests/test_molora_linear.py tests/test_routing.py \
        -k "gpu or cuda_graph or matches_reference" 2>&1 | tail -n 40 | tee "$OUT/memcheck.log"
fi

$PY -m benchmarks --out "$OUT" 2>&1 | tee "$OUT/bench.log"
