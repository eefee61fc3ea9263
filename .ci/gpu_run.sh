#!/usr/bin/env bash
# The one prepared device command (~8 minutes on a fresh H200: 15 device-minutes a task,
# start-up included, so there is no rerun). Run it as: bash .ci/gpu_run.sh, with a device
# command limit of ~510 s, then hand the machine back at once.
#
#   1. install moelora (pure Python: the auto backends on a GPU are triton and torch)  ~15 s
#   2. .ci/gpu_tune.py: smoke (every route vs float64 on the device), perf (docs/perf.md's
#      cases, ratios and per-launch device times), sweep (the fused GEMM vs cuBLAS: the
#      measured configs table)                                                          ~330 s
#   3. the GPU-marked tests and the Triton route tests on the device (pytest-xdist)      rest
#   4. the benchmark suite's own record, one pass, few contestants                       rest
# Everything lands under $OUT as it is produced (a cut-short run keeps what finished):
# log.txt summary.txt smoke.json perf.json <device>.json bench-*.json (<= 8 files).
# Dry run on the CPU first: GPU_RUN_TINY=1 bash .ci/gpu_run.sh (toy shapes, the interpreter).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
TINY=${GPU_RUN_TINY:-0}
T0=$(date +%s); LIMIT=${GPU_RUN_LIMIT_S:-480}; LOG=$OUT/log.txt; SUM=$OUT/summary.txt
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
note() { echo "[gpu_run $(( $(date +%s) - T0 ))s] $*" | tee -a "$SUM"; }
step() {  # step NAME MIN_SECONDS CMD...: under the time left (SIGINT first), output into the log
    local name=$1 need=$2; shift 2; local b=$(( $(left) - 5 ))
    if [ "$b" -lt "$need" ]; then note "$name: SKIPPED (${b}s left, needs ~${need}s)"; return 0; fi
    echo "=== $name (limit ${b}s): $*" >> "$LOG"; local t; t=$(date +%s)
    timeout -s INT -k 15 "$b" "$@" >> "$LOG" 2>&1; local rc=$?
    note "$name: rc=$rc in $(( $(date +%s) - t ))s"
}
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 || true
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, torch.version.cuda, "| triton", triton.__version__)'
  echo "commit ${MOELORA_GIT_COMMIT:-?} cores $(nproc)"; } >> "$LOG" 2>&1

if [ "$TINY" = "1" ]; then
    step tune 30 "$PY" .ci/gpu_tune.py "$OUT" --tiny --deadline 600
    note "dry run done (tiny shapes on CPU): see $LOG"; cat "$SUM"; exit 0
fi
step install 10 env MOELORA_BUILD_EXTENSION=0 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
step tune 120 "$PY" .ci/gpu_tune.py "$OUT" --deadline $(( $(left) - 120 ))
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
step gputests 60 "$PY" -m pytest -q -p no:cacheprovider -rfE $XDIST -m gpu tests/ops tests/layers
step routes 60 "$PY" -m pytest -q -p no:cacheprovider -rfE $XDIST -x tests/ops/test_molora_triton.py
step bench 60 "$PY" -m benchmarks --cases 'decode*,prefill,train,multi-tenant,fine-grained,moe-dpo-logprobs' \
    --contestants 'moelora:*,dense*,naive*' --passes 1 --out /tmp/gpu-run-bench
find /tmp/gpu-run-bench -maxdepth 1 -type f -name '*.json' -exec cp {} "$OUT/" \; 2>/dev/null
echo; echo "================ gpu_run summary ================"
grep -E "PASS|FAIL|base .* ms|logprobs|sweep|passed|failed|ERROR" "$LOG" | tail -n 80
cat "$SUM"; ls -l "$OUT"
