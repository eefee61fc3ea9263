"""The benchmark cases: docs/perf.md's table at three sizes, and the sweeps behind the plot.

One list of cases (`_cases`) is instantiated at one of three sizes:

    gpu    docs/perf.md's shapes (bf16)
    cpu    the same cases shrunk to finish in minutes on 2 cores (fp32); the `cpu` case keeps
           docs/perf.md's exact CPU-backend shape
    quick  tiny shapes for smoke tests (seconds)

`work(case)` gives each case's floor (FLOPs and bytes), the yardstick of benchmarks/NOTES.md.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch

MODES = ("forward", "backward", "fwd+bwd", "memory")
GRAD_MODES = ("backward", "fwd+bwd")  # modes that run autograd (memory follows the case)

# Scaling alpha / r with PEFT's customary alpha = 2 r.
SCALING = 2.0


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # "molora" (docs/spec.md §1) or "logprobs" (docs/spec.md §5: per-expert heads log-probs)
    shape: dict  # molora: T, d_in, d_out, E, r, k; logprobs: T, d, V, K
    modes: tuple[str, ...]
    title: str  # what the case stands for
    routing: str = "topk"  # molora: "topk" (random router), "tenant" (one adapter per token), "single" (E = 1)
    dtype: torch.dtype | None = None  # None: the suite's dtype for the device
    graph: bool = False  # decode: time the replay of a CUDA graph of the call (on GPU)
    sweep: tuple[str, int] | None = None  # (axis, value) of a sweep point, for the plot
    target: str = ""  # docs/perf.md's target, as text
    # The target as the verdict checks it (harness.verdict): a ratio over the floor in the
    # modes named, peak memory as a share of the naive form's, and faster than every peer.
    limit: float | None = None
    limit_modes: tuple[str, ...] = ()
    memory_vs_naive: float | None = None
    beat_peers: bool = True

    @property
    def train(self) -> bool:
        """A training case: its memory mode measures forward + backward, not inference."""
        return any(m in GRAD_MODES for m in self.modes)

    def describe(self) -> str:
        s = self.shape
        if self.op == "logprobs":
            return f"T={s['T']} d={s['d']} V={s['V']} K={s['K']}"
        dims = f"{s['d_in']}x{s['d_out']}"
        return f"T={s['T']} {dims} E={s['E']} r={s['r']} k={s['k']} {self.routing}"


# Sizes of each profile. Sweep points: T values; (E, r) pairs for the E*r axis.
_SIZES = {
    "gpu": dict(T=8192, d=4096, decode=(1, 16, 64), tenant=(4096, 64), fine=(64, 8),
                logprobs=dict(T=4096, d=4096, V=32000, K=4),
                sweep_T=(64, 256, 1024, 4096, 16384),
                sweep_Er=((4, 8), (8, 16), (16, 16), (32, 16), (64, 16)), sweep_Er_T=8192),
    "cpu": dict(T=1024, d=1024, decode=(1, 16, 64), tenant=(1024, 64), fine=(64, 8),
                # logits (fp32 [T, K, V] = 128 MiB) dominate the heads' gradient (16 MiB), as at
                # docs/perf.md's size; a smaller T let the heads' gradient hide the logits' memory
                logprobs=dict(T=2048, d=256, V=4096, K=4),
                sweep_T=(16, 64, 256, 1024),
                sweep_Er=((4, 8), (8, 16), (16, 16), (32, 16), (64, 16)), sweep_Er_T=256),
    "quick": dict(T=32, d=64, decode=(1, 4), tenant=(32, 8), fine=(16, 4),
                  logprobs=dict(T=16, d=32, V=128, K=2),
                  sweep_T=(8, 32),
                  sweep_Er=((2, 4), (4, 8)), sweep_Er_T=16),
}


def _molora(T, d, E, r, k):
    return dict(T=T, d_in=d, d_out=d, E=E, r=r, k=k)


def _limit(text: str, limit: float | None, modes: tuple[str, ...]) -> dict:
    return dict(target=text, limit=limit, limit_modes=modes)


def _cases(profile: str) -> list[Case]:
    z = _SIZES[profile]
    T, d = z["T"], z["d"]
    gpu = profile == "gpu"
    # docs/perf.md's targets: the GPU rows on a GPU; on the CPU its two CPU-backend rows
    # (train fwd+bwd <= 1.10x, decode T=1 <= 1.5x) and "ahead of every CPU peer at every case".
    peers = "; faster than every peer"
    cases = [
        Case("train", "molora", _molora(T, d, 8, 16, 2), MODES, "training step, top-2 of 8",
             **(_limit("fwd+bwd <= 1.08x (base fwd + dX)" + peers, 1.08, ("fwd+bwd",)) if gpu
                else _limit("fwd+bwd <= 1.10x" + peers, 1.10, ("fwd+bwd",)))),
        Case("prefill", "molora", _molora(T, d, 8, 16, 2), ("forward",), "prefill, top-2 of 8",
             **(_limit("<= 1.05x" + peers, 1.05, ("forward",)) if gpu else _limit("faster than every peer", None, ()))),
        Case("fine-grained", "molora", _molora(T, d, *z["fine"], 2), ("fwd+bwd", "memory"),
             "many small experts, training",
             **(_limit("<= 1.10x" + peers, 1.10, ("fwd+bwd",)) if gpu else _limit("faster than every peer", None, ()))),
    ]
    cases += [
        Case(f"decode-T{t}", "molora", _molora(t, d, 8, 16, 2), ("forward",), f"decode, {t} tokens",
             graph=True,
             **(_limit("<= 1.15x (CUDA graph)" + peers, 1.15, ("forward",)) if gpu
                else _limit("<= 1.5x" + peers, 1.5, ("forward",)) if t == 1
                else _limit("faster than every peer", None, ())))
        for t in z["decode"]
    ]
    tenant_T, adapters = z["tenant"]
    cases += [
        Case("multi-tenant", "molora", _molora(tenant_T, d, adapters, 16, 1), ("forward",),
             f"serving {adapters} adapters, one per token", routing="tenant",
             **(_limit("<= 1.15x" + peers, 1.15, ("forward",)) if gpu else _limit("faster than every peer", None, ()))),
        Case("lora", "molora", _molora(T, d, 1, 16, 1), ("forward", "fwd+bwd"),
             "plain LoRA (E = 1), PEFT's own layer applies", routing="single"),
        Case("moe-dpo-logprobs", "logprobs", dict(z["logprobs"]), ("fwd+bwd", "memory"),
             "per-expert heads log-probs (MoE-DPO)",
             target="peak memory <= 1/4 of naive; time <= 1.15x the K head GEMMs",
             limit=1.15, limit_modes=("fwd+bwd",), memory_vs_naive=0.25, beat_peers=False),
    ]
    if profile != "gpu":
        # docs/perf.md's CPU-backend row, at its exact shape (fp32, whatever the suite's dtype).
        cpu_shape = _molora(256, 1024, 8, 16, 2) if profile == "cpu" else _molora(16, 64, 4, 8, 2)
        cases.append(Case("cpu", "molora", cpu_shape, ("forward", "fwd+bwd"), "CPU backend target",
                          dtype=torch.float32, target="faster than every peer"))
    cases += [
        Case(f"sweep-T-{t}", "molora", _molora(t, d, 8, 16, 2), ("forward",), "sweep over T",
             sweep=("T", t))
        for t in z["sweep_T"]
    ]
    cases += [
        Case(f"sweep-Er-{E * r}", "molora", _molora(z["sweep_Er_T"], d, E, r, 2), ("forward",),
             f"sweep over E*r (E={E}, r={r})", sweep=("E*r", E * r))
        for E, r in z["sweep_Er"]
    ]
    return cases


def suite(device: torch.device, quick: bool = False) -> list[Case]:
    """The default cases for a device: docs/perf.md's shapes on a GPU, CPU-sized ones on the CPU."""
    if quick:
        cases = _cases("quick")
        return [c for c in cases if c.name != "cpu"] if device.type == "cuda" else cases
    return _cases("gpu" if device.type == "cuda" else "cpu")


def select(cases: list[Case], patterns: list[str] | None) -> list[Case]:
    """Cases whose name matches any shell pattern (`decode*`, `sweep-T-*`), in suite order."""
    if not patterns:
        return cases
    for p in patterns:
        if not any(fnmatch.fnmatchcase(c.name, p) for c in cases):
            raise ValueError(f"no case matches {p!r}; cases: {', '.join(c.name for c in cases)}")
    return [c for c in cases if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def work(case: Case, dtype: torch.dtype) -> dict:
    """The floor of a case's forward pass: FLOPs and the bytes that must move at least once.

    molora (docs/perf.md): the base GEMM 2 T d_in d_out; routed LoRA 2 T k r (d_in + d_out);
    the all-experts-dense form 2 T E r (d_in + d_out). Bytes: x, W, b, y, all adapters, routing.
    Backward with W frozen adds one dX GEMM of the base's size (the fwd+bwd floor is 2x base).
    logprobs: K head GEMMs 2 T d V K; the naive form materialises [T, K, V] logits.
    """
    s = case.shape
    elt = torch.finfo(dtype).bits // 8
    if case.op == "logprobs":
        T, d, V, K = s["T"], s["d"], s["V"], s["K"]
        return {
            "head_gemm_flop": 2 * T * d * V * K,
            "bytes": (T * d + K * V * d) * elt + T * (8 + K * 4),
            "naive_logits_bytes": T * K * V * elt,
        }
    T, d_in, d_out, E, r, k = (s[n] for n in ("T", "d_in", "d_out", "E", "r", "k"))
    base_flop = 2 * T * d_in * d_out
    lora_flop = 2 * T * k * r * (d_in + d_out)
    dense_flop = 2 * T * E * r * (d_in + d_out)
    return {
        "base_flop": base_flop,
        "routed_lora_flop": lora_flop,
        "dense_lora_flop": dense_flop,
        "routed_over_base": lora_flop / base_flop,
        "dense_over_base": dense_flop / base_flop,
        "bytes": (T * d_in + d_out * d_in + d_out + T * d_out + E * r * (d_in + d_out)) * elt
        + T * k * (8 + 4),
        "weight_bytes": d_out * d_in * elt,
        "adapter_bytes": E * r * (d_in + d_out) * elt,
    }
