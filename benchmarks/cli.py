"""`python -m benchmarks`: run the suite for the device found, print the table, record the run.

    python -m benchmarks                          the default suite (docs/perf.md shapes on a GPU,
                                                  CPU-sized ones on the CPU)
    python -m benchmarks --list                   cases and contestants, nothing run
    python -m benchmarks --cases 'decode*,cpu' --modes forward --backends torch
    python -m benchmarks --quick --out /tmp/b     tiny shapes: a smoke test

Progress goes to stderr, the markdown table to stdout, files to --out (default: a folder in the
temp directory) or, with --record, to the tracked benchmarks/results/ (see report.py).
Exit status 1 when a contestant was WRONG or raised an error; 130 when SIGINT cut the run short
(the files are still written, with the cases that finished).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
    "fp64": torch.float64, "float64": torch.float64,
}
BACKENDS = ("triton", "cuda", "cpu", "torch")


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from benchmarks.cases import MODES

    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cases", help="comma-separated case names or shell patterns, e.g. 'train,decode*' (default: all)")
    p.add_argument("--dtypes", help=f"comma-separated, among {', '.join(DTYPES)} (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--backends", help=f"moelora backends, among {', '.join(BACKENDS)} (default: triton,cuda,torch on "
                   "GPU; cpu,torch on CPU; triton on CPU runs under the slow TRITON_INTERPRET=1 interpreter)")
    p.add_argument("--contestants", help="contestant name patterns to keep, e.g. 'naive*,moelora:*' (the floor always stays)")
    p.add_argument("--modes", help=f"comma-separated, among {', '.join(MODES)} (default: each case's own)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when there is one)")
    p.add_argument("--out", type=Path, help="output folder (default: $MOELORA_BENCH_OUT, else "
                   "moelora-benchmarks in the temp folder; never the source tree unless --record)")
    p.add_argument("--record", action="store_true", help="write into the tracked benchmarks/results/ "
                   "(the committed record); without it the tree is left untouched")
    p.add_argument("--passes", type=int, help="passes over the whole suite, merged by median (default: 2, "
                   "docs/perf.md's 'run each case twice'; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and short timings, for smoke tests")
    p.add_argument("--list", action="store_true", help="list the cases and contestants, run nothing")
    args = p.parse_args(argv)
    for name in _csv(args.dtypes) or []:
        if name not in DTYPES:
            p.error(f"--dtypes: unknown dtype {name!r}; choose among {', '.join(DTYPES)}")
    for name in _csv(args.backends) or []:
        if name not in BACKENDS:
            p.error(f"--backends: unknown backend {name!r}; choose among {', '.join(BACKENDS)}")
    if args.passes is not None and args.passes < 1:
        p.error("--passes must be at least 1")
    for name in _csv(args.modes) or []:
        if name not in MODES:
            p.error(f"--modes: unknown mode {name!r}; choose among {', '.join(MODES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("python -m benchmarks: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    backends = _csv(args.backends)
    if device.type == "cpu" and backends and "triton" in backends:
        # Must precede importing moelora, which imports triton: triton.jit reads it when
        # triton.language defines its own helpers.
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from benchmarks import cases as cases_mod
    from benchmarks import harness, report
    from benchmarks.ops import OPS

    try:
        cases = cases_mod.select(cases_mod.suite(device, args.quick), _csv(args.cases))
    except ValueError as exc:
        print(f"python -m benchmarks: {exc}", file=sys.stderr)
        return 2
    dtypes = [DTYPES[n] for n in _csv(args.dtypes)] if args.dtypes else None
    make = harness.Settings.quick if args.quick else harness.Settings
    settings = make(
        device,
        backends=tuple(backends) if backends else None,
        contestants=tuple(_csv(args.contestants)) if args.contestants else None,
        modes=tuple(_csv(args.modes)) if args.modes else None,
        **({"passes": args.passes} if args.passes else {}),
    )

    if args.list:
        for c in cases:
            dtype = ", ".join(map(harness.dtype_name, dtypes or [c.dtype or cases_mod.default_dtype(device)]))
            print(f"{c.name:<18} {c.describe():<42} {dtype:<9} {','.join(settings.modes or c.modes):<30} {c.target}")
        for op_name in dict.fromkeys(c.op for c in cases):
            op, dtype = OPS[op_name], (dtypes or [cases_mod.default_dtype(device)])[0]
            names = [ct.name for ct in op.contestants(device, dtype, settings.backends)]
            print(f"\ncontestants ({op_name}, {device.type}): {', '.join(names)}")
        return 0

    start = time.perf_counter()
    log = harness.stderr_log(start)
    if device.type == "cpu" and not backends:
        log("triton is not benchmarked on CPU (interpreter only); ask with --backends triton,cpu,torch")
    load_before = report.load_average()
    busy = report.busy_host(load_before)
    if busy:
        log(busy)
    rows = harness.run_suite(cases, dtypes, settings, log)
    interrupted = getattr(rows, "interrupted", False)
    command = shlex.join(["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)])
    rec = report.record(rows, cases, settings, command, (load_before, report.load_average()))
    rec["interrupted"] = interrupted
    print(report.markdown_table(rec["rows"]))
    if args.record and args.out:
        log("--record writes into benchmarks/results; --out ignored")
    out = report.RESULTS_DIR if args.record else (args.out or report.DEFAULT_OUT)
    written, no_plot = report.write(rec, out)
    if no_plot:
        log(no_plot)
    log(f"done in {time.perf_counter() - start:.0f} s; wrote {', '.join(str(p) for p in written)}")
    if interrupted:
        log("the run was interrupted: the record holds the cases that finished")
        return 130
    return 1 if any(r.status in ("WRONG", "error") for r in rows) else 0
