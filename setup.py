"""Build script for moelora.

The Triton kernels live inside the package (moelora/ops/<op>/triton_backend.py): never a
top-level module named `kernels`, which would shadow Hugging Face's `kernels` package.

The compiled extension `moelora._C` (csrc/) is optional: the package imports and works without
it (the `cpu` / `cuda` backends then report themselves unavailable). Build switches, read from
the environment:

    MOELORA_BUILD_EXTENSION  auto (default): build when torch is importable and a C++ compiler
                             is found, else install pure Python with a warning; 1: required
                             (fail instead); 0: never.
    MOELORA_BUILD_CUDA       auto (default): add the CUDA kernels when torch has CUDA
                             (torch.version.cuda) and nvcc is found; 1: required; 0: never.
    MOELORA_CUDA_ARCHS       ";"-separated compute capabilities, default "8.0;9.0a"
                             (-gencode for sm_80 and sm_90a; "9.0a" enables Hopper-only code).
    MAX_JOBS                 parallel compile jobs; default from free memory (4 GiB per job
                             with CUDA, 2 GiB without) and the core count.
    CUDA_HOME                CUDA toolkit root (as for torch.utils.cpp_extension).

Build in place for development: `pip install -e . --no-build-isolation --no-deps` (torch must
be importable at build time, hence no build isolation). `python -m moelora.env` reports what
was built (recorded in the generated moelora/_build_info.py).
"""
from __future__ import annotations

import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext
from setuptools.command.build_py import build_py as _setuptools_build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"  # as moelora.__version__
BUILD_INFO = os.path.join("moelora", "_build_info.py")

# csrc/README.md: how the sources are laid out and how to add a kernel.
CPU_SOURCES = ["csrc/bindings.cpp", "csrc/molora_linear/schema.cpp", "csrc/molora_linear/autograd.cpp",
               "csrc/molora_linear/cpu/molora_cpu.cpp", "csrc/molora_linear/cpu/kernels.cpp"]
CUDA_SOURCES = ["csrc/molora_linear/cuda/molora_cuda.cu"]
HEADERS = ["csrc/molora_linear/molora_linear.h", "csrc/molora_linear/cpu/kernels.h",
           "csrc/molora_linear/cpu/kernels_impl.h"]


def _switch(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("1", "true", "yes", "on"):
        return "1"
    if value in ("0", "false", "no", "off"):
        return "0"
    raise SystemExit(f"{name} must be auto, 1 or 0, got {value!r}")


def _note(msg: str) -> None:
    print(f"moelora setup: {msg}", file=sys.stderr)


def _available_memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / (1024 * 1024)
    except OSError:
        pass
    return None


def _default_max_jobs(with_cuda: bool) -> int:
    """Jobs that fit in free memory: 4 GiB per job with CUDA, 2 GiB without. Measured peaks:
    nvcc 1.6 GB on molora_cuda.cu (sm_90a), g++ 1.6 GB on bindings.cpp (torch/extension.h) and
    0.8 GB on molora_cpu.cpp; the rest is headroom for more archs and newer torch headers."""
    cores = os.cpu_count() or 1
    mem = _available_memory_gib()
    if mem is None:
        return max(1, min(cores, 4))
    per_job = 4.0 if with_cuda else 2.0
    return max(1, min(cores, int(mem // per_job)))


def _cuda_arch_flags(archs: str) -> tuple[list[str], list[str]]:
    """"8.0;9.0a" -> -gencode flags (sm_80, sm_90a); a "+PTX" suffix also embeds PTX."""
    flags, names = [], []
    for arch in archs.replace(",", ";").replace(" ", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        arch = arch[: -len("+PTX")] if ptx else arch
        num = arch.replace(".", "")
        if not num.rstrip("af").isdigit():
            raise SystemExit(f"MOELORA_CUDA_ARCHS: cannot read {arch!r} (expected e.g. 8.0;9.0a)")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
        names.append(f"sm_{num}" + ("+PTX" if ptx else ""))
    if not flags:
        raise SystemExit("MOELORA_CUDA_ARCHS is empty")
    return flags, names


def _has_cxx_compiler() -> bool:
    cxx = os.environ.get("CXX", "c++").split()[0]
    return any(shutil.which(c) for c in (cxx, "c++", "g++", "clang++"))


def no_extension_message(reason: str) -> str:
    """What a build without the compiled extension says (pip shows it with -v; the version's
    "+noext" tag says it in pip's last line either way)."""
    return (f"moelora: NOT building the compiled extension moelora._C: {reason}.\n"
            "The package works without it, but the native 'cpu' and 'cuda' backends are unavailable "
            "(the torch and Triton backends serve).\n"
            "pip builds in an isolated environment without torch; to build the extension, install "
            "torch first, then:\n"
            "    pip install --no-build-isolation .        (CUDA kernels too: set CUDA_HOME)\n"
            "`python -m moelora.env` reports what was built.")


def _banner(message: str) -> None:
    rule = "=" * 78
    print(f"{rule}\n{message}\n{rule}", file=sys.stderr)


def package_version(extension_built: bool) -> str:
    """VERSION, tagged "+noext" (a PEP 440 local version: `moelora==0.1.0` still matches) when
    the extension is not built, so `pip install .` ends with "Successfully installed
    moelora-0.1.0+noext". Not for a build from an sdist (its PKG-INFO at the root): pip checks
    that the built metadata's version is the sdist's."""
    if extension_built or os.path.exists(os.path.join(ROOT, "PKG-INFO")):
        return VERSION
    return VERSION + "+noext"


def _write_build_info(path: str, info: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = ['"""Generated by setup.py at build time: what the compiled extension was built with."""', ""]
    lines += [f"{key} = {value!r}" for key, value in info.items()]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# decide what to build
# ---------------------------------------------------------------------------------------------
build_info: dict = {
    "torch_version": None,
    "cuda_version": None,
    "cuda_archs": [],
    "cpu_built": False,
    "cuda_built": False,
    "cxx_flags": [],
    "nvcc_flags": [],
    "reason": "",
}
ext_modules: list = []
cmdclass: dict = {}

want_ext = _switch("MOELORA_BUILD_EXTENSION")
want_cuda = _switch("MOELORA_BUILD_CUDA")
torch = None
if want_ext != "0":
    try:
        import torch  # noqa: F811
        from torch.utils import cpp_extension
    except Exception as exc:  # pip's isolated build env has no torch: pure-Python install
        torch = None
        build_info["reason"] = f"torch not importable at build time ({type(exc).__name__}: {exc})"
else:
    build_info["reason"] = "MOELORA_BUILD_EXTENSION=0"

if torch is not None and not _has_cxx_compiler():
    build_info["reason"] = "no C++ compiler found"
    torch = None

if torch is None:
    if want_ext == "1" or want_cuda == "1":
        raise SystemExit(f"moelora: the extension was required but cannot be built: {build_info['reason']}")
    if want_ext != "0":
        _banner(no_extension_message(build_info["reason"]))
else:
    build_info["torch_version"] = torch.__version__
    with_cuda = False
    if want_cuda != "0":
        problems = []
        if torch.version.cuda is None:
            problems.append(f"torch {torch.__version__} is a CPU-only build")
        if cpp_extension.CUDA_HOME is None:
            problems.append("nvcc not found (set CUDA_HOME)")
        if problems:
            if want_cuda == "1":
                raise SystemExit("moelora: MOELORA_BUILD_CUDA=1 but " + "; ".join(problems))
            _note("CPU extension only: " + "; ".join(problems))
        else:
            with_cuda = True

    # -g0: no host debug info (Python's CFLAGS carry -g; it tripled the .so to 17 MB).
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
    nvcc_flags: list[str] = []
    define_macros = []
    sources = list(CPU_SOURCES)
    if with_cuda:
        arch_flags, arch_names = _cuda_arch_flags(os.environ.get("MOELORA_CUDA_ARCHS", "8.0;9.0a"))
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler", "-fopenmp",
                      *arch_flags]
        define_macros.append(("MOELORA_WITH_CUDA", None))
        sources += CUDA_SOURCES
        build_info["cuda_version"] = torch.version.cuda
        build_info["cuda_archs"] = arch_names
        make_ext = cpp_extension.CUDAExtension
    else:
        make_ext = cpp_extension.CppExtension
    if "MAX_JOBS" not in os.environ:
        os.environ["MAX_JOBS"] = str(_default_max_jobs(with_cuda))
    _note(f"building moelora._C ({'CPU + CUDA' if with_cuda else 'CPU'}), MAX_JOBS={os.environ['MAX_JOBS']}")

    extra = {"cxx": cxx_flags}
    if with_cuda:
        extra["nvcc"] = nvcc_flags
    ext_modules.append(
        make_ext(
            name="moelora._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            depends=HEADERS,
            define_macros=define_macros,
            extra_compile_args=extra,
            # libgomp: torch ships one with the same soname, which the loader reuses.
            extra_link_args=["-fopenmp"],
        )
    )
    build_info.update(cxx_flags=cxx_flags, nvcc_flags=nvcc_flags)

    class BuildExt(cpp_extension.BuildExtension):
        """torch's build_ext, then record what was built in moelora/_build_info.py."""

        def run(self):
            super().run()
            info = dict(build_info, cpu_built=True, cuda_built=bool(build_info["cuda_archs"]))
            if self.inplace:  # editable / develop: the package is the source tree
                _write_build_info(os.path.join(ROOT, BUILD_INFO), info)
            else:
                _write_build_info(os.path.join(self.build_lib, BUILD_INFO), info)

    cmdclass["build_ext"] = BuildExt.with_options(use_ninja=shutil.which("ninja") is not None)

if not ext_modules:

    class NoBuildExt(_setuptools_build_ext):
        def run(self):
            pass

    cmdclass["build_ext"] = NoBuildExt


class BuildPy(_setuptools_build_py):
    """Also write moelora/_build_info.py into the build (never into the source tree, which may
    hold an in-place build's info). With the extension, build_ext overwrites it with the result."""

    def run(self):
        super().run()
        _write_build_info(os.path.join(self.build_lib, BUILD_INFO), build_info)


cmdclass["build_py"] = BuildPy

HF = ["transformers>=4.40", "peft>=0.10", "safetensors>=0.4"]

setup(
    name="moelora",
    version=package_version(bool(ext_modules)),
    description="Fused kernels for mixture-of-LoRA-experts layers",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    # Found, not listed: a hand-kept list once left new subpackages out of the wheel.
    packages=["moelora", *(f"moelora.{p}" for p in find_packages("moelora"))],
    package_data={"moelora": ["ops/*/configs/*.json", "py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        # custom_op / register_fake / register_autograd / opcheck are stable from 2.5.
        "torch>=2.5",
        # Triton ships Linux wheels only; elsewhere the torch backend serves.
        "triton>=3.1; platform_system == 'Linux'",
    ],
    extras_require={
        # transformers / PEFT models, PEFT adapters as experts and exports, safetensors files
        "hf": HF,
        # TRL trainers on injected models
        "trl": ["trl>=1.16", "datasets", *HF],
        # quantized bases (QLoRA): bitsandbytes 4/8-bit and torchao linears (both run on CPU)
        "quant": ["bitsandbytes>=0.50", "torchao>=0.18"],
        # the benchmark suite (its plot, the PEFT baseline) and what the examples and the
        # README's snippets import
        "bench": ["matplotlib>=3.5", "pytest-benchmark>=4", *HF],
        # every optional integration, so CI runs their tests rather than skipping them
        "test": ["pytest>=7", "pytest-benchmark>=4", "numpy", "matplotlib>=3.5", "trl>=1.16",
                 "datasets", "bitsandbytes>=0.50", "torchao>=0.18", *HF],
    },
)
