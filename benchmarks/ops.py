"""What is benchmarked: for each op, its inputs, its float64 reference and its contestants.

A contestant's `setup(case)` returns a builder that turns one input set into a `Prepared`:
a zero-argument forward plus the tensors it differentiates, keyed by the name of the
reference's argument whose gradient they stand for. The harness checks it against the
reference, then times it. A contestant that cannot run here, or does not compute this case,
raises `Skip` with the reason, which becomes its row's status.

The contestants of the core op (docs/spec.md §1), all on the same inputs:

    base linear     F.linear(x, W, b): the floor every ratio divides by (computes no LoRA)
    naive loop      the per-expert loop of PEFT-based MoE layers (MixLoRA, X-LoRA)
    reference loop  moelora.reference.molora_linear_ref, eager (docs/perf.md's CPU target's yardstick)
    dense masked    every expert on every token, masked by the gates: three GEMMs
    compile(ref)    torch.compile of moelora.reference.molora_linear_ref
    compile(dense)  torch.compile of dense masked (issue 18's fastest peer at T=1024 forward)
    peft            PEFT's own LoRA layer: plain LoRA (E = 1), and mixed-adapter batches
    moelora:<name>  moelora.molora_linear(..., backend=<name>) for each backend of the device

and of the per-expert heads log-probs (docs/spec.md §5, MoE-DPO):

    K head GEMMs    the K heads' logits alone: the time floor
    naive [T,K,V]   moelora's naive form (every logit materialised), the memory baseline
    compile(ref)    torch.compile of that naive form
    moelora:<name>  moelora.expert_logprobs(..., backend=<name>)
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import moelora
from moelora.ops import dispatch
from moelora.ops.expert_logprobs.reference import naive_expert_logprobs
from moelora.reference import molora_linear_ref, topk_route_ref

from benchmarks.cases import SCALING, Case


@dataclass
class InputSet:
    args: dict  # the op's keyword arguments, named as in its API
    grad_out: Tensor  # dy: the gradient fed to backward


@dataclass
class Prepared:
    forward: Callable[[], Tensor]
    # reference argument name -> tensors whose gradients, stacked, form that argument's gradient
    # (PEFT keeps one [r, d_in] weight per adapter where the reference has one [E, r, d_in])
    wrt: dict[str, list[Tensor]]
    no_grad_reason: str | None = None  # set when the contestant cannot differentiate
    no_retain_reason: str | None = None  # set when its graph cannot be differentiated twice


class Skip(Exception):
    """A contestant that does not run: status is "unavailable", "not applicable", ..."""

    def __init__(self, status: str, reason: str):
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Contestant:
    name: str
    setup: Callable[[Case], Callable[[InputSet], Prepared]]  # may raise Skip
    checked: bool = True  # False for the floor: it computes a different function
    capturable: bool = True  # no host sync: may be replayed as a CUDA graph


@dataclass(frozen=True)
class Op:
    floor: str  # the contestant every ratio divides by
    naive: str  # the contestant the speed-up is measured over
    make_inputs: Callable[[Case, torch.device, torch.dtype, int], InputSet]
    reference: Callable[[], Callable[..., Tensor]]  # gives the ground truth, run in float64 on InputSet.args
    grad_names: Callable[[Case], tuple[str, ...]]
    contestants: Callable[[torch.device, torch.dtype, tuple | None], list[Contestant]]


def brief(exc: BaseException) -> str:
    """An exception as one short line, for a row's reason."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _unavailable(name: str, status: str, reason: str) -> Contestant:
    def setup(case):
        raise Skip(status, reason)

    return Contestant(name, setup)


def _call(fn: Callable[..., Tensor], grads: Callable[[Case], tuple], **kwargs) -> Callable:
    """Setup of a contestant that is a plain function of the op's keyword arguments."""

    def setup(case: Case):
        names = grads(case)

        def build(inp: InputSet) -> Prepared:
            a = inp.args
            return Prepared(lambda: fn(**a, **kwargs), {n: [a[n]] for n in names})

        return build

    return setup


def _compiled(reference: Callable[..., Tensor], grads: Callable[[Case], tuple]) -> Callable:
    """Setup of torch.compile(reference): one static-shape compile per case."""

    def setup(case: Case):
        # A fresh compile per case: all cases share the reference's code object, and past the
        # recompile limit dynamo would silently run it eagerly.
        torch._dynamo.reset()
        compiled = torch.compile(reference, dynamic=False)

        def run(**args):
            try:
                return compiled(**args)
            except Exception as exc:  # the reference runs eagerly: any failure is the compiler's
                raise Skip("unavailable", f"torch.compile failed ({brief(exc)})") from exc

        build = _call(run, grads)(case)

        def build_compiled(inp: InputSet) -> Prepared:
            p = build(inp)
            # AOTAutograd donates saved buffers to the backward, which then frees them.
            p.no_retain_reason = "a compiled graph donates its buffers to one backward (no retain_graph)"
            return p

        return build_compiled

    return setup


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(gen, device, dtype, *shape, scale=1.0):
    """Random normal in fp32 (fp64 for fp64), scaled, then cast: the same values at any dtype."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return (torch.randn(*shape, generator=gen, device=device, dtype=work) * scale).to(dtype)


# --------------------------------------------------------------------------------------------
# the core op: routed multi-LoRA linear (docs/spec.md §1)
# --------------------------------------------------------------------------------------------
def _molora_grads(case: Case) -> tuple[str, ...]:
    # Gates are learned only where a router makes them; plain LoRA and tenants have fixed 1s.
    names = ("x", "lora_a", "lora_b")
    return names + ("expert_weights",) if case.routing == "topk" else names


def _routing(case: Case, gen, device, gate_dtype) -> tuple[Tensor, Tensor]:
    """Expert ids [T, k] and gates [T, k]: a random router's renormalised top-k, one uniform
    adapter per token (multi-tenant), or expert 0 with gate 1 (plain LoRA)."""
    T, E, k = case.shape["T"], case.shape["E"], case.shape["k"]
    if case.routing == "topk":
        logits = torch.randn(T, E, generator=gen, device=device, dtype=gate_dtype)
        _, ids, gates = topk_route_ref(logits, k, renormalize=True)
        return ids, gates
    if case.routing == "tenant":
        ids = torch.randint(0, E, (T, k), generator=gen, device=device)
    elif case.routing == "single":
        ids = torch.zeros(T, k, dtype=torch.long, device=device)
    else:
        raise ValueError(f"unknown routing {case.routing!r}")
    return ids, torch.ones(T, k, device=device, dtype=gate_dtype)


def _molora_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int) -> InputSet:
    """Random inputs of unit-order outputs, B not zero: a fresh PEFT B is, and would check nothing.
    With these scales the LoRA term is as large as the base term, so a wrong one shows."""
    s = case.shape
    T, d_in, d_out, E, r = s["T"], s["d_in"], s["d_out"], s["E"], s["r"]
    gen = _generator(device, seed)
    gate_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # routers run in fp32
    ids, gates = _routing(case, gen, device, gate_dtype)
    args = dict(
        x=_randn(gen, device, dtype, T, d_in),
        weight=_randn(gen, device, dtype, d_out, d_in, scale=d_in**-0.5),
        bias=_randn(gen, device, dtype, d_out),
        lora_a=_randn(gen, device, dtype, E, r, d_in, scale=d_in**-0.5),
        lora_b=_randn(gen, device, dtype, E, d_out, r, scale=r**-0.5),
        expert_indices=ids,
        expert_weights=gates,
        scaling=SCALING,
    )
    for name in _molora_grads(case):
        args[name].requires_grad_(True)
    return InputSet(args, _randn(gen, device, dtype, T, d_out))


def base_linear(x, weight, bias, **_):
    """The frozen base layer alone: the floor."""
    return F.linear(x, weight, bias)


_lora_dropout = torch.nn.Identity()  # PEFT's lora_dropout module at p = 0


def naive_loop(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling):
    """The per-expert loop of PEFT-based MoE layers (MixLoRA, X-LoRA; HF Mixtral's expert loop):
    for each expert, select its tokens, lora_B(lora_A(dropout(x))) * gate, index_add into y.

    torch.where on the routing has a data-dependent shape: one host sync per expert, so it
    can be neither captured in a CUDA graph nor traced without graph breaks.
    """
    d_in, k = x.shape[-1], expert_indices.shape[-1]
    x2 = x.reshape(-1, d_in)
    ids = expert_indices.reshape(-1, k)
    gates = expert_weights.reshape(-1, k)
    y = F.linear(x2, weight, bias)
    for e in range(lora_a.shape[0]):
        token, slot = torch.where(ids == e)  # Mixtral: torch.where(expert_mask[e])
        if token.numel() == 0:
            continue
        h = F.linear(_lora_dropout(x2[token]), lora_a[e])
        delta = F.linear(h, lora_b[e]) * scaling * gates[token, slot, None]
        y.index_add_(0, token, delta.to(y.dtype))
    return y.reshape(*x.shape[:-1], weight.shape[0])


def dense_masked(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling):
    """Every expert on every token, then gated: x A_all^T, scale by a dense [T, E] gate matrix,
    then @ B_all^T (docs/perf.md's "peer to beat at large T"). Static shapes, no host sync."""
    E, r, d_in = lora_a.shape
    d_out, k = weight.shape[0], expert_indices.shape[-1]
    x2 = x.reshape(-1, d_in)
    T = x2.shape[0]
    ids = expert_indices.reshape(T, k)
    gates = expert_weights.reshape(T, k)
    # Column E collects the id -1 slots, then is dropped; duplicate ids add up.
    dense = gates.new_zeros(T, E + 1).scatter_add(1, torch.where(ids >= 0, ids, E), gates)[:, :E]
    h = F.linear(x2, lora_a.reshape(E * r, d_in))  # [T, E*r]
    h = (h.view(T, E, r) * (scaling * dense).unsqueeze(-1).to(h.dtype)).view(T, E * r)
    # B_all [d_out, E*r]: one small copy, the price of the per-expert [E, d_out, r] layout.
    b_all = lora_b.permute(1, 0, 2).reshape(d_out, E * r)
    y = F.linear(x2, weight, bias) + F.linear(h, b_all)
    return y.reshape(*x.shape[:-1], d_out)


def _peft_layer(args: dict, adapters: int):
    """PEFT's LoRA wrapper around nn.Linear(W, b), adapters "a0".."a{E-1}" holding A[e], B[e]."""
    from peft import LoraConfig, get_peft_model

    weight, bias, lora_a, lora_b = (args[n] for n in ("weight", "bias", "lora_a", "lora_b"))
    r = lora_a.shape[1]
    base = torch.nn.Sequential(
        torch.nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    )
    with torch.no_grad():
        base[0].weight.copy_(weight)
        base[0].bias.copy_(bias)
    config = LoraConfig(r=r, lora_alpha=args["scaling"] * r, lora_dropout=0.0, target_modules=["0"])
    # autocast_adapter_dtype=False: PEFT would upcast 16-bit adapters to fp32; every other
    # contestant keeps them in the inputs' dtype.
    model = get_peft_model(base, config, adapter_name="a0", autocast_adapter_dtype=False)
    for e in range(1, adapters):
        model.add_adapter(f"a{e}", config, autocast_adapter_dtype=False)
    layer = model.base_model.model[0]
    with torch.no_grad():
        for e in range(adapters):
            layer.lora_A[f"a{e}"].weight.copy_(lora_a[e])
            layer.lora_B[f"a{e}"].weight.copy_(lora_b[e])
    return layer


def _peft_setup(case: Case):
    s = case.shape
    if case.routing == "topk":
        raise Skip(
            "not applicable",
            f"PEFT's layer applies one adapter per token; this case routes top-{s['k']} of {s['E']}",
        )
    if importlib.util.find_spec("peft") is None:
        raise Skip("unavailable", "peft is not installed (pip install peft)")

    def build(inp: InputSet) -> Prepared:
        a = inp.args
        layer = _peft_layer(a, s["E"])
        x = a["x"]
        if case.routing == "single":
            wrt = {"x": [x], "lora_a": [layer.lora_A["a0"].weight], "lora_b": [layer.lora_B["a0"].weight]}
            return Prepared(lambda: layer(x), wrt)
        # Mixed-adapter batch: PEFT mixes adapters per batch row, so one row per token; the
        # name list is what its users pass (built here, untimed).
        names = [f"a{e}" for e in a["expert_indices"][:, 0].tolist()]
        x_rows = x.unsqueeze(1)
        return Prepared(
            lambda: layer(x_rows, adapter_names=names).squeeze(1),
            {},
            no_grad_reason="PEFT's adapter_names= is inference only (PeftModel raises in training mode)",
        )

    return build


def _backend_contestants(op: str, functional: Callable, grads: Callable, device: torch.device,
                         dtype: torch.dtype, backends: tuple | None) -> list[Contestant]:
    """``moelora:<name>`` for each backend of ``op`` asked for (default: the device type's auto
    order, moelora.ops.dispatch.AUTO_ORDER; triton on CPU runs only under its slow interpreter,
    so there it is measured only when named), each implementation once: an op whose "cpu"
    backend is its torch implementation under another name is measured as "torch"."""
    table = dispatch.registry()[op]
    reasons = table.reasons(device, (dtype,))
    names = backends or dispatch.AUTO_ORDER.get(device.type, ("torch",))
    out = []
    for name in names:
        backend = table.backends.get(name)
        if backend is not None and backend.alias_of in names:
            continue
        if reasons[name] is None:
            out.append(Contestant(f"moelora:{name}", _call(functional, grads, backend=name)))
        else:
            out.append(_unavailable(f"moelora:{name}", "unavailable", reasons[name]))
    return out


def _molora_contestants(device: torch.device, dtype: torch.dtype, backends: tuple | None) -> list[Contestant]:
    contestants = [
        Contestant("base linear", _call(base_linear, lambda case: ("x",)), checked=False),
        Contestant("naive loop", _call(naive_loop, _molora_grads), capturable=False),
        # docs/perf.md's CPU target is stated against this one: moelora.reference run eagerly
        # (a loop over the k slots, gathering each token's A_e and B_e)
        Contestant("reference loop", _call(molora_linear_ref, _molora_grads)),
        Contestant("dense masked", _call(dense_masked, _molora_grads)),
        Contestant("compile(ref)", _compiled(molora_linear_ref, _molora_grads)),
        Contestant("compile(dense)", _compiled(dense_masked, _molora_grads)),
        Contestant("peft", _peft_setup, capturable=False),  # mixed batches index with lists
    ]
    return contestants + _backend_contestants("molora_linear", moelora.molora_linear, _molora_grads,
                                              device, dtype, backends)


# --------------------------------------------------------------------------------------------
# per-expert heads log-probs (docs/spec.md §5, MoE-DPO): logp[t, k] = log_softmax(H_k h_t)[y_t]
# --------------------------------------------------------------------------------------------
def _logprob_grads(case: Case) -> tuple[str, ...]:
    return ("hidden", "heads")


def _logprob_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int) -> InputSet:
    s = case.shape
    T, d, V, K = s["T"], s["d"], s["V"], s["K"]
    gen = _generator(device, seed)
    args = dict(
        hidden=_randn(gen, device, dtype, T, d).requires_grad_(True),
        heads=_randn(gen, device, dtype, K, V, d, scale=d**-0.5).requires_grad_(True),
        targets=torch.randint(0, V, (T,), generator=gen, device=device),
    )
    return InputSet(args, _randn(gen, device, dtype, T, K))


def _logprobs_reference() -> Callable[..., Tensor]:
    # moelora's naive form: every [T, K, V] logit, fp32 log-softmax, gather; the reference in
    # float64 and the memory baseline in the training dtype.
    return naive_expert_logprobs


def head_gemms(hidden, heads, targets):
    """The K head GEMMs alone (one GEMM into K*V outputs): the time floor of the fused op."""
    K, V, d = heads.shape
    return F.linear(hidden, heads.reshape(K * V, d))


def _logprob_contestants(device: torch.device, dtype: torch.dtype, backends: tuple | None) -> list[Contestant]:
    naive = _logprobs_reference()
    contestants = [
        Contestant("K head GEMMs", _call(head_gemms, _logprob_grads), checked=False),
        Contestant("naive [T,K,V]", _call(naive, _logprob_grads)),
        Contestant("compile(ref)", _compiled(naive, _logprob_grads)),
    ]
    return contestants + _backend_contestants("expert_logprobs", moelora.expert_logprobs, _logprob_grads,
                                              device, dtype, backends)


OPS: dict[str, Op] = {
    "molora": Op(
        floor="base linear", naive="naive loop",
        make_inputs=_molora_inputs, reference=lambda: molora_linear_ref, grad_names=_molora_grads,
        contestants=_molora_contestants,
    ),
    "logprobs": Op(
        floor="K head GEMMs", naive="naive [T,K,V]",
        make_inputs=_logprob_inputs, reference=_logprobs_reference, grad_names=_logprob_grads,
        contestants=_logprob_contestants,
    ),
}
