"""The one prepared device run (issue: GPU validation and tuning), step by step, each result
written to OUT as soon as it exists so a cut-short run still brings back what finished.

    python .ci/gpu_tune.py OUT [--deadline SECONDS] [--tiny]

1. smoke    every route of the Triton core op (dense / grouped / decode, the fused GEMM and
            cuBLAS), bf16 and fp16 activations, 16-bit and fp32 adapters, against a float64
            reference on the device (values and every gradient, within twice PyTorch's own
            error at that precision); bitwise repeatability; CUDA-graph replay with new
            routing; a bad expert id killing a subprocess; the head log-probs and routing
            -> OUT/smoke.json
2. perf     docs/perf.md's cases: base linear, dense-masked torch, moelora with the cuBLAS and
            the fused GEMM, ratios over the base measured in the same run, each launch's device
            time (torch.profiler); decode replayed from a CUDA graph -> OUT/perf.json
3. sweep    the fused GEMM's tiles at the large-T shapes against cuBLAS's linear + addmm_:
            the winners become the measured configs table -> OUT/<device>.json (copy it into
            moelora/ops/molora_linear/configs/ and commit)
--tiny: the same code at toy shapes on CPU tensors under TRITON_INTERPRET=1 (the dry run that
keeps a typo from costing the device minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

ARGS = argparse.ArgumentParser()
ARGS.add_argument("out")
ARGS.add_argument("--deadline", type=float, default=420.0, help="seconds for all steps")
ARGS.add_argument("--tiny", action="store_true")
ARGS.add_argument("--steps", default="smoke,perf,sweep")
args = ARGS.parse_args()
if args.tiny:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import moelora  # noqa: E402
from moelora.ops.molora_linear import configs  # noqa: E402
from moelora.ops.molora_linear import triton_backend as K  # noqa: E402
from moelora.reference import molora_linear_ref  # noqa: E402

DEV = torch.device("cpu" if args.tiny else "cuda")
D = 64 if args.tiny else 4096
BIG_T = 130 if args.tiny else 8192
T0 = time.time()
os.makedirs(args.out, exist_ok=True)


def left() -> float:
    return args.deadline - (time.time() - T0)


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def save(name, obj):
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(obj, f, indent=1, default=str)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def problem(T, E, r, k, routing="topk", xd=torch.bfloat16, ad=torch.bfloat16, seed=0, d=D):
    g = torch.Generator(device=DEV).manual_seed(seed)

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=DEV) * scale

    if routing == "topk":  # distinct top-k of a random router, ~10% of slots -1
        ids = torch.topk(rn(T, E), k, dim=-1).indices
        ids = torch.where(torch.rand(T, k, generator=g, device=DEV) < 0.1, -1, ids)
    elif routing == "tenant":
        ids = torch.randint(0, E, (T, k), generator=g, device=DEV)
    else:
        ids = torch.zeros(T, k, dtype=torch.long, device=DEV)
    return dict(x=rn(T, d).to(xd), weight=rn(d, d, scale=d**-0.5).to(xd), bias=rn(d).to(xd),
                lora_a=rn(E, r, d, scale=d**-0.5).to(ad), lora_b=rn(E, d, r, scale=r**-0.5).to(ad),
                expert_indices=ids, expert_weights=torch.rand(T, k, generator=g, device=DEV) + 0.1)


GRADS = ("x", "lora_a", "lora_b", "expert_weights")


def run(fn, p, grads=GRADS, dy=None):
    leaves = {n: (t.detach().requires_grad_(n in grads) if t is not None and t.is_floating_point() else t)
              for n, t in p.items()}
    y = fn(**leaves)
    dy = torch.randn_like(y) if dy is None else dy.to(y.dtype)
    return [y.detach()] + list(torch.autograd.grad(y, [leaves[n] for n in grads], dy)), dy


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


FLOOR = {torch.bfloat16: 2e-2, torch.float16: 2.5e-3, torch.float32: 1e-5}


def forced(route=None, gemm=None):
    configs.FORCED_ROUTE, configs.FORCED_GEMM = route, gemm


# --------------------------------------------------------------------------------------------
# 1. smoke
# --------------------------------------------------------------------------------------------
smoke = []


def record(name, ok, **info):
    smoke.append(dict(name=name, ok=bool(ok), t=round(time.time() - T0, 1), **info))
    log(f"{'PASS' if ok else 'FAIL'} {name} {info}")
    save("smoke.json", smoke)


def check(name, p, route, gemm, scaling=0.5):
    forced(route, gemm)
    ours, dy = run(lambda **a: moelora.molora_linear(**a, scaling=scaling, backend="triton"), p)
    exact = {n: (t.double() if t is not None and t.is_floating_point() else t) for n, t in p.items()}
    ref, _ = run(lambda **a: molora_linear_ref(**a, scaling=scaling), exact, dy=dy.double())
    low = {n: (t.to(p["x"].dtype) if n in ("lora_a", "lora_b") else t) for n, t in p.items()}
    torch_low, _ = run(lambda **a: molora_linear_ref(**a, scaling=scaling), low, dy=dy)
    errors = {}
    ok = True
    for label, o, rf, tl in zip(("y",) + GRADS, ours, ref, torch_low):
        err, limit = rel(o, rf), 2 * rel(tl, rf) + FLOOR[p["x"].dtype]
        errors[label] = f"{err:.2e}/{limit:.2e}"
        ok &= bool(torch.isfinite(o).all()) and err <= limit
    again, _ = run(lambda **a: moelora.molora_linear(**a, scaling=scaling, backend="triton"), p, dy=dy)
    repeat = all(torch.equal(a, b) for a, b in zip(ours, again))
    record(f"{name} route={route} gemm={gemm}", ok and repeat, errors=errors, bitwise_repeat=repeat)


def capture(fn):
    """(replay, the graph's output) of a CUDA graph of fn(), warmed up on a side stream (lazy
    initialisation and JIT must not happen while capturing)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def graph_replay(name, T, E, r, k, route, gemm):
    if DEV.type != "cuda":
        return
    forced(route, gemm)
    p = problem(T, E, r, k)

    def call():
        return moelora.molora_linear(**p, backend="triton")

    replay, out = capture(call)
    q = problem(T, E, r, k, seed=7)
    for n in ("x", "expert_indices", "expert_weights"):
        p[n].copy_(q[n])
    replay()
    torch.cuda.synchronize()
    record(f"graph replay {name}", torch.equal(out, call()))


BAD_ID = r"""
import sys, torch, moelora
from moelora.ops.molora_linear import configs
configs.FORCED_ROUTE = sys.argv[1]
T = 9 if sys.argv[1] == "decode" else 300
x = torch.randn(T, 64, device="cuda"); w = torch.randn(64, 64, device="cuda")
a, b = torch.randn(3, 4, 64, device="cuda"), torch.randn(3, 64, 4, device="cuda")
ids = torch.zeros(T, 2, dtype=torch.long, device="cuda"); ids[5, 1] = 3
moelora.molora_linear(x, w, None, a, b, ids, torch.ones(T, 2, device="cuda"), backend="triton")
torch.cuda.synchronize(); print("no error")
"""


def step_smoke():
    big = BIG_T if args.tiny else 2048
    cases = [  # name, T, E, r, k, routing, activation dtype, adapter dtype, routes
        ("train", big, 8, 16, 2, "topk", torch.bfloat16, torch.bfloat16, [("dense", "cublas"), ("dense", "fused")]),
        ("fp32-adapters", big, 8, 16, 2, "topk", torch.bfloat16, torch.float32, [("dense", "cublas"), ("dense", "fused")]),
        ("fp16", big, 8, 16, 2, "topk", torch.float16, torch.float16, [("dense", "fused")]),
        ("fine-grained", big, 64, 8, 2, "topk", torch.bfloat16, torch.bfloat16, [("grouped", "cublas"), ("grouped", "fused")]),
        ("multi-tenant", big, 64, 16, 1, "tenant", torch.bfloat16, torch.bfloat16, [("grouped", "cublas")]),
        ("odd-shapes", 1027, 5, 17, 2, "topk", torch.bfloat16, torch.bfloat16, [("dense", "fused"), ("grouped", "fused")]),
    ] + [(f"decode-T{t}", t, 8, 16, 2, "topk", torch.bfloat16, torch.bfloat16, [("decode", "cublas")]) for t in (1, 16, 64)]
    for name, T, E, r, k, routing, xd, ad, routes in cases:
        d = 1000 if name == "odd-shapes" and not args.tiny else D  # d not a multiple of 8: no TMA
        for route, gemm in routes:
            if left() < 60:
                record("smoke: out of time", False)
                return
            try:
                check(name, problem(T, E, r, k, routing, xd, ad, d=d), route, gemm)
            except Exception as exc:  # noqa: BLE001  (record and go on)
                record(f"{name} route={route} gemm={gemm}", False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    for route, gemm, T in (("decode", "cublas", 16), ("dense", "fused", 512)):
        try:
            graph_replay(f"{route}-{gemm}-T{T}", T, 8, 16, 2, route, gemm)
        except Exception as exc:  # noqa: BLE001
            record(f"graph replay {route}", False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    if DEV.type == "cuda":
        for route in ("dense", "decode", "grouped"):
            env = dict(os.environ, MOELORA_DEBUG="0")
            res = subprocess.run([sys.executable, "-c", BAD_ID, route], env=env, capture_output=True, text=True,
                                 timeout=120)
            record(f"bad id kills the process ({route})", res.returncode != 0 and "no error" not in res.stdout,
                   stderr=res.stderr[-300:])
    forced()
    try:  # the head log-probs and routing on the device
        from moelora.ops.expert_logprobs.reference import naive_expert_logprobs

        T, V, Kh = (64, 500, 2) if args.tiny else (1024, 32000, 2)
        g = torch.Generator(device=DEV).manual_seed(3)
        h = torch.randn(T, D, generator=g, device=DEV).to(torch.bfloat16).requires_grad_()
        H = (torch.randn(Kh, V, D, generator=g, device=DEV) * D**-0.5).to(torch.bfloat16).requires_grad_()
        y = torch.randint(0, V, (T,), generator=g, device=DEV)
        out = moelora.expert_logprobs(h, H, y, backend="triton")
        go = torch.randn_like(out)
        gh, gH = torch.autograd.grad(out, [h, H], go)
        h64, H64 = h.detach().double().requires_grad_(), H.detach().double().requires_grad_()
        ref = naive_expert_logprobs(h64, H64, y)
        rh, rH = torch.autograd.grad(ref, [h64, H64], go.double())
        errs = dict(logp=rel(out, ref), grad_hidden=rel(gh, rh), grad_heads=rel(gH, rH))
        record("expert_logprobs triton bf16", all(e < 3e-2 for e in errs.values()), errors=errs)
    except Exception as exc:  # noqa: BLE001
        record("expert_logprobs triton bf16", False, error=f"{type(exc).__name__}: {str(exc)[:300]}")


# --------------------------------------------------------------------------------------------
# 2. perf
# --------------------------------------------------------------------------------------------
def bench(fn) -> float:
    if DEV.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, quantiles=[0.5])
    fn()
    start = time.perf_counter()
    for _ in range(2):
        fn()
    return (time.perf_counter() - start) / 2 * 1e3


def graphed(fn):
    return capture(fn)[0] if DEV.type == "cuda" else fn


def kernels_of(fn, reps=3):
    """[(kernel, launches per call, device us per call)], from torch.profiler."""
    if DEV.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    agg = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            agg[e.name[:60]][0] += 1
            agg[e.name[:60]][1] += e.time_range.elapsed_us()
    return sorted(((n, c / reps, round(t / reps, 1)) for n, (c, t) in agg.items()), key=lambda x: -x[2])


def dense_masked(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling=2.0):
    from benchmarks.ops import dense_masked as peer

    return peer(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, expert_indices=expert_indices,
                expert_weights=expert_weights, scaling=scaling)


def step_perf():
    rows = []
    if DEV.type == "cuda":
        a = torch.randn(8192, 4096, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(4096, 4096, device=DEV, dtype=torch.bfloat16)
        ms = bench(lambda: a @ w.t())
        rows.append(dict(case="ceiling", gemm_tflops=2 * 8192 * 4096 * 4096 / ms / 1e9))
        del a, w
    cases = [  # name, T, E, r, k, routing, mode, graph, target
        ("decode-T1", 1, 8, 16, 2, "topk", "fwd", True, 1.15),
        ("decode-T16", 16, 8, 16, 2, "topk", "fwd", True, 1.15),
        ("decode-T64", 64, 8, 16, 2, "topk", "fwd", True, 1.15),
        ("prefill", BIG_T, 8, 16, 2, "topk", "fwd", False, 1.05),
        ("train", BIG_T, 8, 16, 2, "topk", "fwd+bwd", False, 1.08),
        ("fine-grained", BIG_T, 64, 8, 2, "topk", "fwd+bwd", False, 1.10),
        ("multi-tenant", BIG_T // 2, 64, 16, 1, "tenant", "fwd", False, 1.15),
    ]
    for name, T, E, r, k, routing, mode, graph, target in cases:
        if left() < 45:
            log("perf: out of time")
            break
        try:
            p = problem(T, E, r, k, routing)
            contestants = {"base": lambda **q: F.linear(q["x"], q["weight"], q["bias"]), "dense masked": dense_masked}
            for gemm in ("cublas", "fused"):
                contestants[f"triton:{gemm}"] = (lambda g: lambda **q: (forced(None, g), moelora.molora_linear(
                    **q, scaling=2.0, backend="triton"))[1])(gemm)
            res, launches = {}, {}
            for cname, fn in contestants.items():
                if mode == "fwd":
                    call = (lambda fn: lambda: fn(**p))(fn)
                    with torch.no_grad():
                        res[cname] = bench(graphed(call) if graph else call)
                        if cname.startswith("triton"):
                            launches[cname] = kernels_of(call)
                else:
                    wrt = ("x",) if cname == "base" else GRADS
                    leaves = {n: (t.detach().requires_grad_(n in wrt) if t.is_floating_point() else t)
                              for n, t in p.items() if t is not None}
                    dy = torch.randn(T, D, device=DEV, dtype=p["x"].dtype)
                    call = (lambda fn, leaves=leaves, dy=dy, wrt=wrt: lambda: torch.autograd.grad(
                        fn(**leaves), [leaves[n] for n in wrt], dy))(fn)
                    res[cname] = bench(call)
                    if cname.startswith("triton"):
                        launches[cname] = kernels_of(call)
            forced()
            base = res["base"]
            row = dict(case=name, mode=mode, target=target, ms=res,
                       ratio={c: round(v / base, 4) for c, v in res.items()}, kernels_us=launches)
            rows.append(row)
            log(f"{name:14s} {mode:8s} base {base:.4f} ms | " + " | ".join(
                f"{c} {v:.3f}x" for c, v in row["ratio"].items() if c != "base") + f" | target {target}x")
            for c, ks in launches.items():
                for kname, count, us in ks[:8]:
                    log(f"      {c:14s} {us:9.1f} us x{count:.0f} {kname}")
            save("perf.json", rows)
            del p
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(case=name, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
            log(f"{name}: ERROR {rows[-1]['error']}")
            save("perf.json", rows)
    forced()
    try:  # the head log-probs: fwd+bwd time over the K head GEMMs, peak memory over naive
        from moelora.ops.expert_logprobs.reference import naive_expert_logprobs

        T, V, Kh = (64, 500, 2) if args.tiny else (4096, 32000, 4)
        if left() > 60:
            g = torch.Generator(device=DEV).manual_seed(1)
            h = torch.randn(T, D, generator=g, device=DEV).to(torch.bfloat16)
            H = (torch.randn(Kh, V, D, generator=g, device=DEV) * D**-0.5).to(torch.bfloat16)
            y = torch.randint(0, V, (T,), generator=g, device=DEV)
            fns = {"K head GEMMs": lambda a, b: F.linear(a, b.reshape(-1, D)),
                   "naive": lambda a, b: naive_expert_logprobs(a, b, y),
                   "triton": lambda a, b: moelora.expert_logprobs(a, b, y, backend="triton"),
                   "torch": lambda a, b: moelora.expert_logprobs(a, b, y, backend="torch")}
            res, peak = {}, {}
            for n, fn in fns.items():
                a, b = h.detach().requires_grad_(), H.detach().requires_grad_()
                out = fn(a, b)
                go = torch.randn_like(out)
                del out
                call = (lambda fn, a=a, b=b, go=go: lambda: torch.autograd.grad(fn(a, b), [a, b], go))(fn)
                res[n] = bench(call)
                if DEV.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    call()
                    torch.cuda.synchronize()
                    peak[n] = (torch.cuda.max_memory_allocated() - before) / 2**20
                log(f"logprobs {n:12s} fwd+bwd {res[n]:.2f} ms ({res[n] / res['K head GEMMs'] / 3:.2f}x the 3 "
                    f"GEMM-equivalents) peak {peak.get(n, 0):.0f} MiB")
            rows.append(dict(case="moe-dpo-logprobs", ms=res, peak_mib=peak))
    except Exception as exc:  # noqa: BLE001
        rows.append(dict(case="moe-dpo-logprobs", error=f"{type(exc).__name__}: {str(exc)[:300]}"))
    save("perf.json", rows)


# --------------------------------------------------------------------------------------------
# 3. sweep: the fused GEMM's tiles vs cuBLAS, into the measured configs table
# --------------------------------------------------------------------------------------------
TILES = [  # block_m, block_n, block_k, group_m, num_warps, num_stages
    (128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 4, 4), (128, 128, 128, 8, 8, 3), (64, 128, 64, 8, 4, 4),
]


def step_sweep():
    device_name = torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else "interpreter"
    table = dict(device=device_name, arch=(torch.cuda.get_device_capability(DEV)[0] if DEV.type == "cuda" else 0),
                 measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 commit=os.environ.get("MOELORA_GIT_COMMIT", "?"), gemm={}, runs=[])
    shapes = [("forward", BIG_T, 8, 16, False), ("dx", BIG_T, 8, 16, True), ("forward", BIG_T, 64, 8, False)]
    tiles = TILES if not args.tiny else TILES[:2]
    slug = device_name.lower().replace(" ", "-")
    for which, M, E, r, w_kn in shapes:
        p = problem(M, E, r, 2)
        x, w, a_, b_ = p["x"], p["weight"], p["lora_a"], p["lora_b"]
        KX = E * r
        z = torch.randn(M, KX, device=DEV, dtype=x.dtype) * 0.1
        if w_kn:
            cublas = lambda: torch.mm(x, w).addmm_(z, a_.reshape(KX, D))  # noqa: E731
        else:
            bt = K._b_all_t(b_, x.dtype)
            cublas = lambda: F.linear(x, w, p["bias"]).addmm_(z, bt)  # noqa: E731
        base_ms = bench(lambda: F.linear(x, w))
        cublas_ms = bench(cublas)
        best = ("cublas", cublas_ms, None)
        for tile in tiles:
            if left() < 20:
                break
            bm, bn, bk, gm, warps, stages = tile
            real = configs.default_gemm_config
            configs.default_gemm_config = lambda arch, dtype, kx: configs.GemmConfig(
                bm, bn, bk, max(16, min(64, kx)), gm, warps, stages, arch >= 9)
            try:
                if w_kn:
                    fn = lambda: K._gemm(x, w, z, a_, K._strides(a_, 0, 1, 2), r, None, x.dtype, w_kn=True)  # noqa: E731
                else:
                    fn = lambda: K._gemm(x, w, z, b_, K._strides(b_, 0, 2, 1), r, p["bias"], x.dtype, w_kn=False)  # noqa: E731
                ref = cublas()
                out = fn()
                err = rel(out, ref)
                ms = bench(fn) if err < 2e-2 else float("inf")
            except Exception as exc:  # noqa: BLE001  (a tile that does not compile or fit)
                ms, err = float("inf"), f"{type(exc).__name__}: {str(exc)[:120]}"
            finally:
                configs.default_gemm_config = real
            table["runs"].append(dict(which=which, M=M, KX=KX, tile=tile, ms=ms, err=err, cublas_ms=cublas_ms,
                                      base_ms=base_ms))
            log(f"sweep {which} M={M} KX={KX} tile={tile}: {ms:.4f} ms (cuBLAS+addmm {cublas_ms:.4f}, "
                f"base {base_ms:.4f}) err {err}")
            if ms < best[1]:
                best = ("fused", ms, tile)
        key = configs.gemm_key(x.dtype, D, KX)
        entry = {"impl": best[0], "ms": best[1], "cublas_ms": cublas_ms, "base_ms": base_ms}
        if best[2] is not None:
            bm, bn, bk, gm, warps, stages = best[2]
            entry["tiles"] = dict(block_m=bm, block_n=bn, block_k=bk, group_m=gm, num_warps=warps, num_stages=stages)
        table["gemm"].setdefault(key, {})[str(M)] = entry
        save(f"{slug}.json", table)
        del p, z


for step in args.steps.split(","):
    if left() < 30:
        log(f"{step}: skipped, out of time")
        continue
    log(f"=== {step}")
    {"smoke": step_smoke, "perf": step_perf, "sweep": step_sweep}[step]()
log("done")
