#!/usr/bin/env bash
# Proves that the CUDA extension compiles and links, on a machine without a GPU.
#
# In a throwaway venv (reused when present) with a CUDA build of torch, builds a wheel of a
# copy of this repo with MOELORA_BUILD_CUDA=1 (an error if CUDA cannot be built), then checks
# that the wheel holds moelora/_C*.so, that the .so carries device code for the requested
# architectures (cuobjdump), resolves its CUDA / torch libraries (ldd), exports its module
# init (nm -D), and imports with the cuda_* ops registered. Prints the elapsed time.
#
# Environment: MOELORA_CUDA_VENV (default /tmp/moelora-cuda-venv), MOELORA_CUDA_TORCH (default
# torch==2.14.1, a CUDA 13.0 build), MOELORA_CUDA_ARCHS (default 9.0a: one arch keeps nvcc to
# a few minutes on 2 cores), CUDA_HOME (default /usr/local/cuda), MAX_JOBS (default 1).
set -euo pipefail

start=$(date +%s)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MOELORA_CUDA_VENV:-/tmp/moelora-cuda-venv}
torch_spec=${MOELORA_CUDA_TORCH:-torch==2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MOELORA_CUDA_ARCHS=${MOELORA_CUDA_ARCHS:-9.0a}
export MAX_JOBS=${MAX_JOBS:-1}
export MOELORA_BUILD_CUDA=1 MOELORA_BUILD_EXTENSION=1

log() { echo "cuda_build_check: $*"; }
elapsed() { echo $(( $(date +%s) - start )); }

if ! command -v "$CUDA_HOME/bin/nvcc" >/dev/null 2>&1 && ! command -v nvcc >/dev/null 2>&1; then
  log "FAIL: no nvcc (CUDA_HOME=$CUDA_HOME)"; exit 1
fi

# 1. venv with a CUDA build of torch
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
pip_log=$(mktemp /tmp/moelora-cuda-pip.XXXXXX.log)
pip_install() {  # quiet unless it fails
  "$py" -m pip install -q "$@" >"$pip_log" 2>&1 || { cat "$pip_log"; log "FAIL: pip install $*"; exit 1; }
}
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1; then
  log "installing $torch_spec (CUDA build, ~5.5 GB)"
  pip_install "$torch_spec"
fi
pip_install setuptools wheel ninja pybind11 numpy
rm -f "$pip_log"
log "torch $("$py" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)') ($(elapsed)s)"

# 2. build a wheel from a clean copy of the sources (no stale .so or build/ from this checkout)
work=$(mktemp -d /tmp/moelora-cuda-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src"
cp -r "$repo/setup.py" "$repo/pyproject.toml" "$repo/README.md" "$repo/csrc" "$repo/moelora" \
  "$work/src/"
find "$work/src" \( -name '*.so' -o -name '__pycache__' -o -name '_build_info.py' \) -prune -exec rm -rf {} +
log "building wheel (archs $MOELORA_CUDA_ARCHS, MAX_JOBS=$MAX_JOBS)"
build_start=$(date +%s)
if ! (cd "$work/src" && "$py" -m pip wheel . --no-build-isolation --no-deps -w "$work/dist" -v \
        >"$work/build.log" 2>&1); then
  grep -n -B2 -A8 -E "error|FAILED" "$work/build.log" | head -n 150 || tail -n 80 "$work/build.log"
  log "FAIL: build failed"; exit 1
fi
log "built in $(( $(date +%s) - build_start ))s"

# 3. inspect the wheel and the .so
wheel=$(ls "$work"/dist/moelora-*.whl)
mkdir -p "$work/unpacked"
"$py" -m zipfile -e "$wheel" "$work/unpacked"
so=$(ls "$work"/unpacked/moelora/_C*.so 2>/dev/null || true)
[ -n "$so" ] || { log "FAIL: no moelora/_C*.so in $(basename "$wheel")"; exit 1; }
log "wheel $(basename "$wheel") holds $(basename "$so") ($(du -h "$so" | cut -f1))"
grep -q "cuda_built = True" "$work/unpacked/moelora/_build_info.py" || { log "FAIL: _build_info says no CUDA"; exit 1; }

nm -D --defined-only "$so" | grep PyInit__C >/dev/null || { log "FAIL: PyInit__C not exported"; exit 1; }
torch_lib=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
nvidia_libs=$("$py" - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for lib in glob.glob(os.path.join(sp, "nvidia", "**", "lib", "*.so*"), recursive=True):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
PY
)
missing=$(LD_LIBRARY_PATH="$torch_lib:$nvidia_libs" ldd "$so" | grep "not found" || true)
[ -z "$missing" ] || { echo "$missing"; log "FAIL: unresolved libraries"; exit 1; }
LD_LIBRARY_PATH="$torch_lib:$nvidia_libs" ldd "$so" | grep -E "cudart|c10_cuda|torch_cuda" | sed 's/^/  /'
# Device code: cuobjdump when the toolkit has it, else the fatbin section and the arch names.
readelf -S "$so" | grep "\.nv_fatbin" >/dev/null || { log "FAIL: no .nv_fatbin section (no device code)"; exit 1; }
for arch in $(echo "$MOELORA_CUDA_ARCHS" | tr ';,' '  '); do
  sm="sm_$(echo "${arch%+PTX}" | tr -d .)"
  if [ -x "$CUDA_HOME/bin/cuobjdump" ]; then
    "$CUDA_HOME/bin/cuobjdump" --list-elf "$so" | grep "$sm" >/dev/null || { log "FAIL: no $sm code"; exit 1; }
  else
    grep -aq "$sm" "$so" || { log "FAIL: no $sm code"; exit 1; }
  fi
done
for kernel in decode_kernel shrink_kernel expand_kernel outer_kernel; do
  grep -aq "$kernel" "$so" || { log "FAIL: kernel $kernel missing"; exit 1; }
done
fatbin_hex=$(readelf -S -W "$so" | awk '/\.nv_fatbin/ {print $6}')
log "device code for $MOELORA_CUDA_ARCHS present (.nv_fatbin $(( 16#$fatbin_hex / 1024 )) KiB)"

# 4. import it (no GPU needed): ops registered, CPU path works
(cd "$work/unpacked" && "$py" - <<'PY'
import torch
import moelora
from moelora.ops import extension
assert extension.load(), "moelora._C did not load"
for op in ("molora_linear_native_fwd", "molora_linear_native_bwd"):
    for key in ("CPU", "CUDA"):
        assert extension.has_kernel(op, key), (op, key, extension.unavailable_reason(op, key))
x = torch.randn(5, 8); w = torch.randn(6, 8); a = torch.randn(2, 3, 8); b = torch.randn(2, 6, 3)
ids = torch.tensor([[0, -1]] * 5); g = torch.rand(5, 2)
y = moelora.molora_linear(x, w, None, a, b, ids, g, 0.5, backend="cpu")
ref = moelora.reference.molora_linear_ref(x, w, None, a, b, ids, g, 0.5)
assert torch.allclose(y, ref, atol=1e-5), (y - ref).abs().max()
print("cuda_build_check: import ok, native ops with CPU and CUDA kernels")
PY
)
log "OK in $(elapsed)s"
