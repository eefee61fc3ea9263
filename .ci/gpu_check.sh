#!/usr/bin/env bash
# GPU checks in steps that each fit one 10-minute device-tool command. Every step writes its
# log under $OUT as it goes (it comes back even when a step fails or is cut short), runs under
# a deadline (GPU_CHECK_LIMIT_S, default 570 s for the whole command, so the script ends and
# prints its summary before the tool's 600 s), and installs the package first if this machine
# has not got it yet (a fresh machine: the device tool gives a machine back 30 s after a call).
#
#   usage: bash .ci/gpu_check.sh [STEP ...]        (no step: build smoke)
#
#   build     environment report, build + editable install (full log), import check; puts the
#             built extension in $OUT (_C*.so, _build_info.py) for later calls to carry (~2-3 min)
#   smoke     the tests marked gpu, then a --quick benchmark on the GPU (every harness path:
#             do_bench, CUDA graphs, peak memory, torch.compile) (~2-4 min)
#   kernels   every test of the kernels on the GPU: test_molora_linear, test_cpp_backend,
#             test_expert_logprobs, test_routing (pytest-xdist when there) (~3-6 min, JIT-bound)
#   tests     the rest of tests/
#   memcheck  compute-sanitizer memcheck on the kernel tests (triton and cuda backends)
#   bench     docs/perf.md's cases (no sweeps), 2 passes -> $OUT/<gpu>-<stamp>.json/.md/.png;
#             ~6-9 min estimated: cut short at the deadline by SIGINT, the record keeps the
#             cases that finished (pass 1 whole, pass 2 in part); BENCH_CASES picks others
#   sweep     the sweep cases, 2 passes -> the same three files (~4-5 min; SWEEP_CASES)
#   quick     old name for "build smoke"
#   preflight needs no GPU (run it here first): nvcc compiles csrc/cuda/molora_cuda.cu for the
#             archs against the installed torch's headers (a CPU wheel lacks one generated
#             header: stubbed), and Triton compiles the core-op and routing kernels for sm_90
#
# Knobs (environment): PY (python3), CUDA_HOME (found if unset), MOELORA_CUDA_ARCHS (9.0a),
# PYTEST_WORKERS (8; 0 = no xdist), BENCH_ARGS (extra args to python -m benchmarks, e.g.
# "--passes 1"), MOELORA_GIT_COMMIT / MOELORA_GIT_DIRTY (recorded in the benchmark JSON: the
# machine's copy has no .git), PREBUILT (.gpu-ext: a folder holding a _C*.so and
# _build_info.py from an earlier `build`, carried to skip the compile; see below).
#
# Carrying the build to a fresh machine: after `build`, copy the returned _C.cpython-312-*.so
# and _build_info.py into .gpu-ext/ of your checkout (`echo /.gpu-ext/ >> .git/info/exclude`
# once) and name ".gpu-ext" in the run's carry. Each later step then installs in seconds.
#
# At most 8 files come back from $OUT: each step writes one log, bench/sweep three result files,
# build two; summary.txt is one more. Keep to a few steps per call (bench and sweep: one each).
set -uo pipefail
START=$(date +%s)
LIMIT=${GPU_CHECK_LIMIT_S:-570}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
export MOELORA_CUDA_ARCHS=${MOELORA_CUDA_ARCHS:-9.0a}
# the checkout's venv where there is one (this machine), else the system python (the GPU machine)
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PREBUILT=${PREBUILT:-.gpu-ext}
WORK=${TMPDIR:-/tmp}/moelora-gpu-check
mkdir -p "$WORK"
SUMMARY="$OUT/summary.txt"
KERNEL_TESTS="tests/ops"
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfE --durations=15 -o faulthandler_timeout=300
        --continue-on-collection-errors)

if [ -z "${CUDA_HOME:-}" ]; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then
        CUDA_HOME=/usr/local/cuda
    elif command -v nvcc >/dev/null; then  # may be a wrapper script: check the headers
        guess=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
        [ -f "$guess/include/cuda_runtime.h" ] && CUDA_HOME=$guess
    fi
fi
[ -n "${CUDA_HOME:-}" ] && export CUDA_HOME

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( LIMIT - $(elapsed) )); }
note() { echo "[gpu_check $(elapsed)s] $*" | tee -a "$SUMMARY"; }

# run_logged NAME MIN_SECONDS CMD...: CMD under the time left (SIGINT first: pytest and the
# benchmark write what they have), output appended to $OUT/NAME.log, a line in the summary.
run_logged() {
    local name=$1 need=$2; shift 2
    local budget; budget=$(( $(left) - 10 ))
    if [ "$budget" -lt "$need" ]; then
        note "$name: SKIPPED, ${budget}s left of GPU_CHECK_LIMIT_S=$LIMIT (needs ~${need}s): run it in its own call"
        return 124
    fi
    local t0; t0=$(date +%s)
    local cmd="$*"
    echo "=== $name: ${cmd:0:300} (limit ${budget}s)" | tr '\n' ' ' >> "$OUT/$name.log"
    echo >> "$OUT/$name.log"
    timeout -s INT -k 20 "$budget" "$@" >> "$OUT/$name.log" 2>&1
    local rc=$?
    local took=$(( $(date +%s) - t0 ))
    local what="rc=$rc"
    [ "$rc" -eq 0 ] && what="ok"
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && what="TIMED OUT (rc=$rc)"
    note "$name: $what in ${took}s (log $name.log)"
    return "$rc"
}

xdist_args() {
    local n=${PYTEST_WORKERS:-8}
    if [ "$n" != "0" ] && "$PY" -c "import xdist" 2>/dev/null; then
        echo "-n $n"
    fi
}

# --------------------------------------------------------------------------------------------
# installation
# --------------------------------------------------------------------------------------------
IMPORT_CHECK='
import sys, torch, moelora
from moelora.ops import extension
assert torch.cuda.is_available(), "torch sees no CUDA device"
import moelora.ops.molora_linear.triton_backend  # the triton backend: a broken install hides it silently
backends = moelora.available_backends("cuda", torch.bfloat16)
print("backends on cuda (bf16):", backends, "| extension:", extension.module())
need = ["triton"] + (["cuda"] if "--need-cuda" in sys.argv else [])
missing = [b for b in need if b not in backends]
if missing:
    sys.exit(f"MISSING backends {missing}")
'

env_report() {
    {
        echo "--- $(date -u +%FT%TZ) $(uname -srm)"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
        echo "CUDA_HOME=${CUDA_HOME:-unset}; nvcc: $(command -v nvcc || echo none)"
        "${CUDA_HOME:-/nonexistent}/bin/nvcc" --version 2>&1 | tail -n 2 || nvcc --version 2>&1 | tail -n 2
        echo "c++: $(c++ --version 2>&1 | head -n 1); ninja: $(ninja --version 2>&1)"
        echo "compute-sanitizer: $(command -v compute-sanitizer || echo none); free disk: $(df -h . | tail -n 1)"
        "$PY" -c "
import sys, torch, triton, importlib.metadata as m
print('python', sys.version.split()[0], sys.executable)
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)
for p in ('pip', 'setuptools', 'wheel', 'pytest', 'pytest-xdist', 'pytest-benchmark', 'peft', 'transformers', 'matplotlib'):
    try: print(' ', p, m.version(p))
    except m.PackageNotFoundError: print(' ', p, 'MISSING')
import sysconfig; print('EXT_SUFFIX', sysconfig.get_config_var('EXT_SUFFIX'))
"
        echo "MOELORA_GIT_COMMIT=${MOELORA_GIT_COMMIT:-unset}; git: $(git rev-parse HEAD 2>/dev/null || echo 'no .git here')"
    } 2>&1
}

pip_install() {  # pip_install LOGNAME [ENV=VALUE ...]
    local name=$1; shift
    run_logged "$name" 60 env "$@" "$PY" -m pip install -v --no-build-isolation --no-deps -e .
}

BUILD_FAILED=0
ensure_installed() {  # ensure_installed LOGNAME [force-build]
    local name=$1
    if [ "${2:-}" != "force-build" ] && "$PY" -c "$IMPORT_CHECK" --need-cuda >/dev/null 2>&1; then
        return 0
    fi
    if [ "$BUILD_FAILED" = 1 ]; then  # once per call is enough: the pure-Python install stands
        return 1
    fi
    local suffix; suffix=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
    if [ "${2:-}" != "force-build" ] && [ -f "$PREBUILT/_C$suffix" ]; then
        note "installing with the carried extension $PREBUILT/_C$suffix (no compile)"
        cp "$PREBUILT/_C$suffix" moelora/ && cp "$PREBUILT/_build_info.py" moelora/ 2>/dev/null
        pip_install "$name" MOELORA_BUILD_EXTENSION=0
        if "$PY" -c "$IMPORT_CHECK" --need-cuda >> "$OUT/$name.log" 2>&1; then
            return 0
        fi
        note "the carried extension does not load here (see $name.log): building"
        rm -f "moelora/_C$suffix"
    fi
    if [ "$(left)" -lt 200 ]; then
        note "$name: $(left)s left, too little to build the extension: run the step in its own call"
        BUILD_FAILED=1
        return 1
    fi
    note "building the extension (CUDA_HOME=${CUDA_HOME:-unset}, archs $MOELORA_CUDA_ARCHS)"
    if ! pip_install "$name" MOELORA_BUILD_EXTENSION=1 MOELORA_BUILD_CUDA=1; then
        BUILD_FAILED=1
        note "BUILD FAILED: first errors:"
        grep -n -m 25 -E "error|Error|FAILED" "$OUT/$name.log" | tee -a "$SUMMARY"
        note "installing pure Python (triton and torch backends only) so the other checks still run"
        pip_install "$name" MOELORA_BUILD_EXTENSION=0
        "$PY" -c "$IMPORT_CHECK" >> "$OUT/$name.log" 2>&1 || note "IMPORT CHECK FAILED: see $name.log"
        return 1
    fi
    "$PY" -c "$IMPORT_CHECK" --need-cuda >> "$OUT/$name.log" 2>&1 || {
        BUILD_FAILED=1
        note "IMPORT CHECK FAILED after the build: see $name.log"
        return 1
    }
}

# --------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------
step_build() {
    env_report >> "$OUT/build.log"
    ensure_installed build force-build
    local rc=$?
    "$PY" -m moelora.env >> "$OUT/build.log" 2>&1
    tail -n 12 "$OUT/build.log"
    local suffix; suffix=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
    if [ -f "moelora/_C$suffix" ]; then
        local size; size=$(stat -c %s "moelora/_C$suffix")
        if [ "$size" -lt 15000000 ]; then
            cp "moelora/_C$suffix" moelora/_build_info.py "$OUT/"
            note "built extension in \$OUT: _C$suffix ($size bytes), _build_info.py (carry them: see the header)"
        else
            note "built extension is $size bytes, over what comes back: not copied"
        fi
    fi
    return $rc
}

step_smoke() {
    local rc=0
    ensure_installed smoke || { rc=1; note "smoke: install incomplete, testing what there is"; }
    run_logged smoke 60 "${PYTEST[@]}" -m gpu tests/test_molora_linear.py tests/test_cpp_backend.py \
        tests/test_expert_logprobs.py || rc=1
    # Every GPU branch of the harness at tiny sizes, torch.compile and CUDA graphs included.
    run_logged smoke 60 "$PY" -m benchmarks --quick --out "$WORK/smoke-bench" \
        --cases 'train,decode-T1,multi-tenant,lora,moe-dpo-logprobs' || rc=1
    return $rc
}

step_kernels() {
    ensure_installed kernels || note "kernels: install incomplete, testing what there is"
    # shellcheck disable=SC2046
    TORCHINDUCTOR_COMPILE_THREADS=2 run_logged kernels 120 "${PYTEST[@]}" $(xdist_args) $KERNEL_TESTS
}

step_tests() {
    ensure_installed tests || note "tests: install incomplete, testing what there is"
    local ignore=()
    for f in $KERNEL_TESTS; do ignore+=(--ignore="$f"); done
    # shellcheck disable=SC2046
    TORCHINDUCTOR_COMPILE_THREADS=2 run_logged tests 120 "${PYTEST[@]}" $(xdist_args) "${ignore[@]}" tests
}

step_memcheck() {
    ensure_installed memcheck || note "memcheck: install incomplete, checking what there is"
    if ! command -v compute-sanitizer >/dev/null; then
        note "memcheck: compute-sanitizer not found, skipped"
        return 0
    fi
    # No caching allocator, so an overrun past a tensor is past its allocation and seen (CUDA
    # graphs need the allocator: capture tests are left out). API errors are torch's and
    # triton's probes, not ours.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_logged memcheck 120 compute-sanitizer --tool memcheck \
        --error-exitcode 1 --print-limit 30 --leak-check no --report-api-errors no \
        "$PY" -m pytest -q -p no:cacheprovider -p no:xdist -rfE -o faulthandler_timeout=300 \
        tests/test_cpp_backend.py tests/test_molora_linear.py tests/test_expert_logprobs.py tests/test_routing.py \
        -k "(cuda or triton) and not model_sized and not graph and not compile and not opcheck"
}

# bench_step NAME CASES: the benchmark into a scratch folder, then its record's three files
# (not the latest-*/README copies: the file count is limited) into $OUT.
bench_step() {
    local name=$1 cases=$2
    ensure_installed "$name" || note "$name: install incomplete, benchmarking what there is"
    rm -rf "$WORK/$name"
    # shellcheck disable=SC2086
    run_logged "$name" 120 "$PY" -m benchmarks --cases "$cases" --out "$WORK/$name" ${BENCH_ARGS:-}
    local rc=$?
    find "$WORK/$name" -maxdepth 1 -type f -name '*-[0-9]*Z.*' -exec cp {} "$OUT/" \;
    return $rc
}

TRITON_PREFLIGHT='
import itertools, os, re, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from moelora.kernels import molora as K, routing as R

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
spills = []

def spill_bytes(ptx):
    # ptxas -v on the PTX Triton made: the spills the GPU would see, without a GPU
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    return max([int(n) for n in re.findall(r"(\d+) bytes spill stores", out)] or [0])

def compile_(fn, consts, ptrs, num_warps=4):
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "*fp32") if n.endswith("_ptr")
           else "fp32" if n == "scaling" else "i32" for n in fn.arg_names}
    try:
        kernel = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=num_warps))
    except Exception as exc:
        print("FAILED", fn.__name__, consts, ptrs, type(exc).__name__, str(exc)[:1500])
        return False
    if os.path.exists(PTXAS):
        n = spill_bytes(kernel.asm["ptx"])
        if n:
            types = {k: v for k, v in ptrs.items() if k in ("src_ptr", "dst_ptr", "mat_ptr", "out_ptr")}
            spills.append(f"{n:6d} B/thread spilled: {fn.__name__} {num_warps} warps {consts} {types}")
    return True

ok, ty, idx = True, {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}, "*i64"
plan = {"sorted_slots_ptr": idx, "block_expert_ptr": idx, "block_start_ptr": idx, "block_end_ptr": idx}
# every config the launchers pick (their own config functions), at ranks 8 to 256
for (xd, md), r in itertools.product([("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"), ("bf16", "fp32")],
                                     [8, 32, 64, 128, 256]):
    br = K._rank_block(r)
    f32 = not (xd == md and xd != "fp32")
    bk, nw = K._config(K._SHRINK_CONFIGS, f32, br)
    for fuse in (False, True):
        ok &= compile_(K._shrink_kernel, dict(FUSE_GATE_GRAD=fuse, DOT_FP32=f32, BLOCK_M=64, BLOCK_R=br, BLOCK_K=bk),
                       dict(plan, src_ptr=ty[xd], mat_ptr=ty[md]), nw)
        for bt in (16, 64):  # the plan-free (small T) kernels, smallest and largest token tile
            ok &= compile_(K._token_shrink_kernel, dict(FUSE_GATE_GRAD=fuse, DOT_FP32=f32, BLOCK_T=bt, BLOCK_R=br,
                                                        BLOCK_K=bk), dict(src_ptr=ty[xd], mat_ptr=ty[md], index_ptr=idx), nw)
    chunk, chunks, nw = K._expand_config(r, grouped=True)
    ok &= compile_(K._grouped_expand_kernel, dict(DOT_FP32=f32, BLOCK_M=64, BLOCK_N=64, BLOCK_R=chunk, RANK_CHUNKS=chunks),
                   dict(plan, dst_ptr=ty[xd], mat_ptr=ty[md]), nw)
    chunk, chunks, nw = K._expand_config(r, grouped=False)
    for bt in (16, 64):
        ok &= compile_(K._expand_kernel, dict(DOT_FP32=f32, BLOCK_T=bt, BLOCK_N=64, BLOCK_R=chunk, RANK_CHUNKS=chunks),
                       dict(dst_ptr=ty[xd], mat_ptr=ty[md], index_ptr=idx), nw)
    step, nw = K._config(K._WGRAD_CONFIGS, xd == "fp32", br)
    ok &= compile_(K._wgrad_kernel, dict(DOT_FP32=xd == "fp32", BLOCK_M=step, BLOCK_N=64, BLOCK_R=br),
                   dict(src_ptr=ty[xd], out_ptr=ty[md], sorted_slots_ptr=idx, expert_start_ptr=idx,
                        expert_count_ptr=idx), nw)
    ok &= compile_(K._token_wgrad_kernel, dict(DOT_FP32=xd == "fp32", BLOCK_T=step, BLOCK_N=64, BLOCK_R=br),
                   dict(src_ptr=ty[xd], out_ptr=ty[md], index_ptr=idx), nw)
for e_pad in (16, 128, 1024):  # the routing plan, E = 8, 64, 512 (sub as GroupPlan picks it)
    tiles = K._plan_config(e_pad)
    ok &= compile_(K._plan_histogram_kernel, dict(E_PAD=e_pad, SUB=tiles["SUB"]), dict(index_ptr=idx, hist_ptr=idx))
    ok &= compile_(K._plan_scatter_kernel, dict(BLOCK_M=64, E_PAD=e_pad, **tiles),
                   {n: idx for n in K._plan_scatter_kernel.arg_names if n.endswith("_ptr")})
# the expert-id check must keep its device-side assert (debug on for that kernel alone)
ids_check = triton.compile(ASTSource(R._ids_in_range_kernel, {"index_ptr": idx, "n": "i32", "num_experts": "i32",
                                                               "BLOCK": "constexpr"}, constexprs={"BLOCK": 1024}),
                           target=GPUTarget("cuda", 90, 32), options=dict(debug=bool(R._ids_in_range_kernel.debug)))
if "__assertfail" not in ids_check.asm["ptx"]:
    print("FAILED _ids_in_range_kernel: no __assertfail in its PTX")
    ok = False
for be, bt, bk in [(4, 64, 1), (8, 64, 2), (512, 8, 64)]:
    ok &= compile_(R._topk_route_kernel, dict(RENORMALIZE=True, BLOCK_T=bt, BLOCK_E=be, BLOCK_K=bk),
                   dict(logits_ptr="*bf16", index_ptr=idx))
print(f"triton spills (ptxas -v, sm_90a): {len(spills)} configs spill")
print("\n".join(sorted(spills, reverse=True)))
print("triton kernels compile for sm_90" if ok else "TRITON COMPILE FAILED")
sys.exit(0 if ok else 1)
'

step_preflight() {
    local torch_inc stub="$WORK/stub-include" rc=0 arch_flags=()
    torch_inc=$("$PY" -c "from torch.utils.cpp_extension import include_paths; print(' '.join(include_paths()))")
    mkdir -p "$stub/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
    for a in ${MOELORA_CUDA_ARCHS//;/ }; do
        a=${a//./}; arch_flags+=("-gencode=arch=compute_$a,code=sm_$a")
    done
    local incs=() d
    for d in $torch_inc; do incs+=(-I"$d"); done
    # shellcheck disable=SC2086
    run_logged preflight 60 "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" -c csrc/cuda/molora_cuda.cu \
        -o "$WORK/molora_cuda.o" "${incs[@]}" -I"$stub" -Icsrc -DMOELORA_WITH_CUDA \
        -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
        -D__CUDA_NO_HALF2_OPERATORS__ -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
        -std=c++17 -O3 -lineinfo --expt-relaxed-constexpr -Xcompiler -fPIC -Xcompiler -fopenmp \
        --resource-usage "${arch_flags[@]}" || rc=1
    grep -E "spill (stores|loads)" "$OUT/preflight.log" | grep -v " 0 bytes spill stores" | sort | uniq -c | head -n 5
    TRITON_CACHE_DIR="$WORK/triton-preflight" run_logged preflight 60 "$PY" -c "$TRITON_PREFLIGHT" || rc=1
    return $rc
}

step_bench() { bench_step bench "${BENCH_CASES:-train,prefill,fine-grained,decode*,multi-tenant,lora,moe-dpo-logprobs}"; }
step_sweep() { bench_step sweep "${SWEEP_CASES:-sweep-*}"; }

# --------------------------------------------------------------------------------------------
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build smoke)
[ "${steps[*]}" = "quick" ] && steps=(build smoke)
note "steps: ${steps[*]} (limit ${LIMIT}s, OUT=$OUT)"
status=0
for s in "${steps[@]}"; do
    case "$s" in
        build|smoke|kernels|tests|memcheck|bench|sweep|preflight) "step_$s" || status=1 ;;
        *) note "unknown step '$s' (build smoke kernels tests memcheck bench sweep preflight)"; status=2 ;;
    esac
done

# Logs over what comes back (16 MiB a file) keep their end.
for f in "$OUT"/*.log; do
    [ -f "$f" ] || continue
    if [ "$(stat -c %s "$f")" -gt 15000000 ]; then
        tail -c 15000000 "$f" > "$f.tmp" && mv "$f.tmp" "$f"
        note "$(basename "$f") truncated to its last 15 MB"
    fi
done
echo
echo "================ summary ================"
for s in "${steps[@]}"; do
    [ -f "$OUT/$s.log" ] || continue
    echo "--- $s.log (last lines)"
    grep -E "passed|failed|skipped|deselected|no tests ran|error|FAILED|ERROR|MISSING|WRONG|interrupted|Timeout|done in|kernels compile" "$OUT/$s.log" | tail -n 25
done
echo "---"
cat "$SUMMARY"
n=$(find "$OUT" -type f | wc -l)
echo "files in \$OUT: $n (at most 8 come back)"; ls -l "$OUT"
[ "$n" -gt 8 ] && echo "WARNING: more than 8 files in \$OUT: some will not come back; run fewer steps per call"
exit $status
