"""Calls of the native CPU op alone, for instruction counts and the profiler's op counts.

    python -m benchmarks.native_calls --T 1 --calls 20 [--dtype bf16] [--backward] [--profile]
    valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*cpu_forward*' \
        python -m benchmarks.native_calls --T 1 --calls 20

Wall-clock timings on a shared 2-core host swing by 20% and more; callgrind's instruction counts
of `cpu_forward` / `cpu_backward` repeat to the instruction, so budget decisions in
benchmarks/NOTES.md use them (and the profiler's ATen op counts per call).
"""
from __future__ import annotations

import argparse
import time

import torch

import moelora  # noqa: F401  (loads moelora._C, registering the native ops)
from moelora.ops import extension

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make(T: int, d: int, E: int, r: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(dtype)
    w = (torch.randn(d, d, generator=g) / d**0.5).to(dtype)
    a = (torch.randn(E, r, d, generator=g) / d**0.5).to(dtype)
    b = (torch.randn(E, d, r, generator=g) / r**0.5).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).long()
    gates = torch.rand(T, k, generator=g).softmax(-1)
    return x, w, a, b, idx, gates


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, default=1)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--E", type=int, default=8)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--backward", action="store_true", help="also call the native backward")
    p.add_argument("--trainable", action="store_true",
                   help="adapters that require grad (never cached: the training / benchmark case)")
    p.add_argument("--profile", action="store_true", help="print the profiler's op table")
    args = p.parse_args(argv)
    if not extension.load():
        raise SystemExit("moelora._C is not built (python setup.py build_ext --inplace)")
    x, w, a, b, idx, gates = make(args.T, args.d, args.E, args.r, args.k, DTYPES[args.dtype])
    a.requires_grad_(args.trainable)
    b.requires_grad_(args.trainable)
    fwd, bwd = torch.ops.moelora.molora_linear_native_fwd, torch.ops.moelora.molora_linear_native_bwd
    dy = torch.randn(args.T, args.d).to(x.dtype)

    @torch.no_grad()
    def step():
        y, h = fwd(x, w, None, a, b, idx, gates, 2.0)
        if args.backward:
            bwd(dy, x, w, a, b, idx, gates, h, 2.0, True, True)

    step()  # warm-up: caches, lazy initialisation
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.calls):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return
    t0 = time.perf_counter()
    for _ in range(args.calls):
        step()
    print(f"{(time.perf_counter() - t0) / args.calls * 1e6:.1f} us per call (noisy host)")


if __name__ == "__main__":
    main()
