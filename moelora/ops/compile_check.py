"""Compile every Triton kernel the core op (and the head log-probs) launch at docs/perf.md's shapes, exactly as the
launchers specialise it, for a GPU this machine need not have (default sm_90a, the H200), and
report what the hardware will run: registers, spills, and whether the fused GEMM's main loop
is TMA loads feeding wgmma.

    python -m moelora.ops.compile_check [--arch 90] [--json report.json] [--cases prefill,...]

How: each case runs on meta tensors under `configs.simulate` with `moelora.ops.traffic`
recording the launches (kernel, arguments, compile options); each launch goes through Triton's
own argument binder (the runtime's specialisation: 16-byte alignment of pointers, divisibility
and ones of integers, constexprs) and `triton.compile` for the target; then ptxas -v (spills)
and nvdisasm (the SASS) from Triton's bundled CUDA tools. Needs TRITON_INTERPRET unset.
Exit status 1 when a kernel spills or the GEMM lacks wgmma / TMA.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import torch

# (name, T, E, r, k, large-T GEMM, activation dtype, adapter dtype)
CASES = [
    ("prefill", 8192, 8, 16, 2, "fused", torch.bfloat16, torch.bfloat16),
    ("train-fp32-adapters", 8192, 8, 16, 2, "fused", torch.bfloat16, torch.float32),
    ("fine-grained", 8192, 64, 8, 2, "fused", torch.bfloat16, torch.bfloat16),
    ("multi-tenant", 4096, 64, 16, 1, "fused", torch.bfloat16, torch.bfloat16),
    ("decode-T1", 1, 8, 16, 2, "fused", torch.bfloat16, torch.bfloat16),
    ("decode-T64", 64, 8, 16, 2, "fused", torch.bfloat16, torch.bfloat16),
    ("fp32", 8192, 8, 16, 2, "fused", torch.float32, torch.float32),
]
D = 4096
# the per-expert heads log-probs (MoE-DPO): (name, T, V, K)
LOGPROB_CASES = [("moe-dpo-logprobs", 4096, 32000, 4)]


@dataclass
class KernelReport:
    case: str
    kernel: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    wgmma: bool
    tma_loads: bool
    constants: dict = field(default_factory=dict)


def _tools():
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return os.path.join(bin_dir, "ptxas"), os.path.join(bin_dir, "nvdisasm")


def collect(case) -> list:
    """The Triton launches of one case's forward and backward (moelora.ops.traffic.Launch)."""
    from moelora.ops.molora_linear import configs, triton_backend
    from moelora.ops.traffic import Traffic

    name, T, E, r, k, gemm, dtype, adapter_dtype = case
    meta = dict(device="meta")
    x = torch.empty(T, D, dtype=dtype, **meta)
    w = torch.empty(D, D, dtype=dtype, **meta)
    a = torch.empty(E, r, D, dtype=adapter_dtype, **meta)
    b = torch.empty(E, D, r, dtype=adapter_dtype, **meta)
    ids = torch.empty(T, k, dtype=torch.int64, **meta)
    gates = torch.empty(T, k, dtype=torch.float32, **meta)
    previous = configs.FORCED_GEMM
    configs.FORCED_GEMM = gemm
    try:
        with configs.simulate(), Traffic() as record:
            y, h, state = triton_backend.forward(x, w, None, a, b, ids, gates, 2.0)
            triton_backend.backward(torch.empty_like(y), x, w, a, b, ids, gates, h, state, 2.0, True, True)
    finally:
        configs.FORCED_GEMM = previous
    return [launch for launch in record.launches if launch.kind == "triton"]


def collect_logprobs(case) -> list:
    """The Triton launches of the head log-probs' forward and backward at one case's shape."""
    from moelora.ops.expert_logprobs import chunked, triton_backend
    from moelora.ops.molora_linear import configs
    from moelora.ops.traffic import Traffic

    name, T, V, K = case
    meta = dict(device="meta")
    hidden = torch.empty(T, D, dtype=torch.bfloat16, **meta)
    heads = torch.empty(K, V, D, dtype=torch.bfloat16, **meta)
    targets = torch.empty(T, dtype=torch.int64, **meta)
    with configs.simulate(), Traffic() as record:
        logp, lse, basis = chunked.forward(triton_backend, hidden, heads, targets, -100, False)
        chunked.backward(triton_backend, torch.empty_like(logp), hidden, heads, targets, lse, basis, -100,
                         True, True)
    seen, out = set(), []
    for launch in record.launches:  # the row kernels repeat per chunk: compile each once
        if launch.kind == "triton" and launch.name not in seen:
            seen.add(launch.name)
            out.append(launch)
    return out


def compile_launch(launch, arch: int = 90):
    """triton.compile of one recorded launch for cuda:<arch>, as JITFunction.run would."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    compiled = compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return compiled, {str(k): v for k, v in constexprs.items()}


def inspect(compiled, arch: int = 90) -> dict:
    """Registers and spills (ptxas -v on the PTX) and the SASS's wgmma / TMA instructions."""
    ptxas, nvdisasm = _tools()
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        cubin = os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        usage = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(tmp, "o.cubin")],
                               capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    registers = max((int(m) for m in re.findall(r"Used (\d+) registers", usage)), default=0)
    spills = sum(int(m) for m in re.findall(r"(\d+) bytes spill (?:stores|loads)", usage))
    return dict(registers=registers, spill_bytes=spills, sass=sass,
                shared_bytes=int(compiled.metadata.shared),
                wgmma="HGMMA" in sass, tma_loads="UTMALDG" in sass)


def run(cases=CASES, arch: int = 90, logprob_cases=LOGPROB_CASES) -> list:
    reports, seen = [], set()
    work = [(case, collect(case)) for case in cases] + [(case, collect_logprobs(case)) for case in logprob_cases]
    for case, launches in work:
        for launch in launches:
            compiled, constants = compile_launch(launch, arch)
            key = (launch.name, compiled.hash if hasattr(compiled, "hash") else id(compiled))
            if key in seen:
                continue
            seen.add(key)
            info = inspect(compiled, arch)
            reports.append(KernelReport(case[0], launch.name, info["registers"], info["spill_bytes"],
                                        info["shared_bytes"], info["wgmma"], info["tma_loads"],
                                        {k: v for k, v in constants.items() if isinstance(v, (int, bool, str))}))
    return reports


def problems(reports) -> list[str]:
    """What the hardware would run badly: any spill; a fused GEMM at 16 bits without wgmma or
    without TMA loads."""
    out = []
    for rep in reports:
        if rep.spill_bytes:
            out.append(f"{rep.case}/{rep.kernel}: {rep.spill_bytes} bytes of register spills")
        sixteen_bit = not rep.constants.get("DOT_FP32", True)
        if rep.kernel == "_fused_gemm_kernel" and sixteen_bit and rep.constants.get("USE_TMA"):
            if not (rep.wgmma and rep.tma_loads):
                out.append(f"{rep.case}/{rep.kernel}: wgmma={rep.wgmma} tma={rep.tma_loads}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moelora.ops.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: sm_90a)")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    wanted = args.cases.split(",") if args.cases else None
    cases = [c for c in CASES if not wanted or c[0] in wanted]
    logprob_cases = [c for c in LOGPROB_CASES if not wanted or c[0] in wanted]
    reports = run(cases, args.arch, logprob_cases)
    print(f"{'case':<22} {'kernel':<28} {'regs':>5} {'spill':>6} {'smem KiB':>8} {'wgmma':>6} {'tma':>4}")
    for rep in reports:
        print(f"{rep.case:<22} {rep.kernel:<28} {rep.registers:>5} {rep.spill_bytes:>6} "
              f"{rep.shared_bytes / 1024:>8.1f} {str(rep.wgmma):>6} {str(rep.tma_loads):>4}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=1)
    bad = problems(reports)
    for line in bad:
        print("PROBLEM:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
