"""The CPU kernels alone, without the op around them (benchmarks/cpu_kernels.cpp).

    python -m benchmarks.cpu_kernels [--T 1024 --d 1024 --E 8 --r 16 --k 2] [--threads 2]
                                     [--warm] [--isa avx512bf16|avx512|avx2|base]

Builds the kernels' translation unit (no torch needed) with the C++ compiler into a temporary
directory, runs it once and prints each kernel's best time and multiply-add rate. Compare two
versions of a kernel by building each (this tree and a worktree of the other commit) and
running them alternately: a kernel's time here repeats to a few percent, where its share of a
profile of the whole op swings 10-30% on a shared host (benchmarks/NOTES.md, 2026-12-04).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "csrc" / "molora_linear" / "cpu"
SOURCE = Path(__file__).resolve().parent / "cpu_kernels.cpp"


def compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise SystemExit("no C++ compiler found (set CXX)")


def build(out_dir: Path) -> Path:
    exe = out_dir / "cpu_kernels"
    cmd = [compiler(), "-O3", "-std=c++20", "-fopenmp", f"-I{KERNELS}", str(SOURCE),
           str(KERNELS / "kernels.cpp"), "-o", str(exe)]
    subprocess.run(cmd, check=True)
    return exe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("T", 1024), ("d", 1024), ("E", 8), ("r", 16), ("k", 2), ("threads", 2), ("reps", 30)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--warm", action="store_true", help="keep caches warm between runs (default: cold)")
    p.add_argument("--isa", choices=("avx512bf16", "avx512", "avx2", "base"),
                   help="kernel table (default: the best this CPU runs)")
    args = p.parse_args(argv)
    for name in ("T", "d", "E", "r", "k", "threads", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.k > args.E:
        p.error("--k must be at most --E")
    run = ["--T", args.T, "--d", args.d, "--E", args.E, "--r", args.r, "--k", args.k,
           "--threads", args.threads, "--reps", args.reps, "--cold", int(not args.warm)]
    if args.isa:
        run += ["--isa", args.isa]
    with tempfile.TemporaryDirectory(prefix="moelora-kernels-") as tmp:
        exe = build(Path(tmp))
        return subprocess.run([str(exe), *map(str, run)]).returncode


if __name__ == "__main__":
    sys.exit(main())
