"""Per-expert head log-probs (spec §5) against the float64 reference, on every backend here.

Without a GPU the Triton backend runs under TRITON_INTERPRET=1 (see conftest.py), so shapes
stay small; they are chosen to be awkward: V and d one past a block, V and d under the 16-wide
minimum tile, T = 1, K = 1, ignored targets. The torch backend's chunk is shrunk to a few rows
so that its chunk loop runs too.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moelora.ops.expert_logprobs import expert_logprobs
from moelora.ops.expert_logprobs.reference import expert_logprobs_ref, naive_expert_logprobs

from conftest import DEVICE
from helpers import bound, rel_error

el = importlib.import_module("moelora.ops.expert_logprobs.op")
chunked = importlib.import_module("moelora.ops.expert_logprobs.chunked")

BACKENDS = [b for b in ("torch", "triton") if b in el.BACKENDS.available(DEVICE)]

# (T, d, V, K, fraction of ignored targets)
SHAPES = [
    (17, 20, 70, 3, 0.25),  # V one past a 64-row chunk, d past the 16-wide tile
    (1, 16, 64, 1, 0.0),  # T = 1, K = 1, V exactly one chunk
    (65, 70, 130, 2, 0.1),  # T one past a 64-row block, d past 64, V three chunks
    (9, 5, 7, 4, 0.0),  # V and d under the minimum tile
    (6, 16, 33, 2, 1.0),  # every target ignored
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    # 200 elements: 2 rows per chunk at V = 70, 1 at V = 130, one chunk at V <= 33.
    monkeypatch.setitem(chunked.CHUNK_ELEMENTS, DEVICE.type, 200)


def _shape_id(shape):
    return "T{}-d{}-V{}-K{}-ign{}".format(*shape)


def _problem(T, d, V, K, ignore_frac, *, ignore_index=-100, lead=None):
    """float64 master inputs with logits of a realistic spread (std ~2)."""
    f64 = dict(dtype=torch.float64, device=DEVICE)
    targets = torch.randint(0, V, (T,), device=DEVICE)
    targets = torch.where(torch.rand(T, device=DEVICE) < ignore_frac, ignore_index, targets)
    lead = (T,) if lead is None else lead
    return dict(
        hidden=torch.randn(*lead, d, **f64),
        heads=2 * torch.randn(K, V, d, **f64) / d**0.5,
        targets=targets.reshape(lead),
    )


def _run(fn, hidden, heads, targets, grad_out, **kw):
    hidden = hidden.detach().requires_grad_()
    heads = heads.detach().requires_grad_()
    out = fn(hidden, heads, targets, **kw)
    g_hidden, g_heads = torch.autograd.grad(out, [hidden, heads], grad_out.to(out.dtype))
    return out, g_hidden, g_heads


def check_against_reference(backend, problem, dtype, heads_dtype=None, **kw):
    """Values and gradients within twice PyTorch's own error at the same precision."""
    heads_dtype = dtype if heads_dtype is None else heads_dtype
    hidden, heads, targets = problem["hidden"].to(dtype), problem["heads"].to(heads_dtype), problem["targets"]
    K = heads.shape[0]
    grad_out = torch.randn(*targets.shape, K, dtype=torch.float64, device=DEVICE)
    out, g_hidden, g_heads = _run(lambda *a, **k: expert_logprobs(*a, **k, backend=backend),
                                  hidden, heads, targets, grad_out, **kw)
    # the reference sees exactly the rounded inputs, so only the op's error is measured
    ref = _run(expert_logprobs_ref, hidden.double(), heads.double(), targets, grad_out, **kw)
    own = _run(naive_expert_logprobs, hidden, heads, targets, grad_out, **kw)

    assert out.dtype == torch.float32 and out.shape == (*targets.shape, K)
    assert g_hidden.dtype == hidden.dtype and g_heads.dtype == heads.dtype
    for name, got, exact, torch_low in zip(("logp", "grad hidden", "grad heads"),
                                           (out, g_hidden, g_heads), ref, own):
        err, limit = rel_error(got, exact), bound(dtype, rel_error(torch_low, exact))
        assert err <= limit, f"{name}: rel error {err:.3g} > {limit:.3g}"
    ignored = targets == kw.get("ignore_index", -100)
    assert (out[ignored] == 0).all() and (g_hidden[ignored] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, shape, dtype):
    check_against_reference(backend, _problem(*shape), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_heads_with_bf16_hidden(backend):
    check_against_reference(backend, _problem(17, 20, 70, 3, 0.25), torch.bfloat16, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_inside_vocab(backend):
    """A pad id in [0, V) as ignore_index: those rows score 0 and get no gradient."""
    p = _problem(12, 16, 40, 2, 0.0)
    p["targets"][::3] = 0
    check_against_reference(backend, p, torch.float32, ignore_index=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_int32_and_strided(backend):
    p = _problem(12, 9, 40, 2, 0.2, lead=(3, 4))
    p["targets"] = p["targets"].to(torch.int32)
    p["hidden"] = p["hidden"].transpose(0, 1).contiguous().transpose(0, 1)  # [3, 4, d], strided
    assert not p["hidden"].is_contiguous()
    check_against_reference(backend, p, torch.float32)


def test_float64_on_torch_is_exact():
    p = _problem(17, 20, 70, 3, 0.25)
    out = expert_logprobs(**p, backend="torch")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expert_logprobs_ref(**p), rtol=1e-12, atol=1e-12)


def test_default_chunking_matches(monkeypatch):
    monkeypatch.setitem(chunked.CHUNK_ELEMENTS, DEVICE.type, 1 << 20)
    check_against_reference("torch", _problem(17, 20, 70, 3, 0.25), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend):
    hidden = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    heads = torch.randn(2, 10, 8, device=DEVICE, requires_grad=True)
    out = expert_logprobs(hidden, heads, torch.zeros(0, dtype=torch.long, device=DEVICE), backend=backend)
    assert out.shape == (0, 2)
    g_hidden, g_heads = torch.autograd.grad(out.sum(), [hidden, heads])
    assert g_hidden.shape == (0, 8) and (g_heads == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_head(backend):
    """ref_head gives the K = 1 log-probs of a frozen head, with no gradient anywhere."""
    p = _problem(17, 20, 70, 3, 0.25)
    hidden, heads = p["hidden"].float().requires_grad_(), p["heads"].float().requires_grad_()
    ref_head = torch.randn(70, 20, device=DEVICE, requires_grad=True)
    logp, ref = expert_logprobs(hidden, heads, p["targets"], ref_head=ref_head, backend=backend)
    assert ref.shape == (17,) and not ref.requires_grad
    want = naive_expert_logprobs(hidden, ref_head[None], p["targets"])[:, 0]
    torch.testing.assert_close(ref, want.detach())
    torch.testing.assert_close(logp, expert_logprobs(hidden, heads, p["targets"], backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits(backend):
    """Logits spread over thousands (std ~600): the online logsumexp and the softmax rebuilt
    from the saved lse stay finite and exact; most targets have log-probs in the thousands."""
    p = _problem(17, 20, 70, 3, 0.25)
    p["heads"] = 300 * p["heads"]
    check_against_reference(backend, p, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_in_the_padded_tile(backend):
    """ignore_index = V + 3 lies inside the last 64-wide V tile's masked columns."""
    check_against_reference(backend, _problem(17, 20, 70, 3, 0.3, ignore_index=73), torch.float32,
                            ignore_index=73)


@pytest.mark.parametrize("frozen", ["heads", "hidden"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_input_gets_no_gradient_work(backend, frozen, monkeypatch):
    """A frozen head (or hidden) is neither differentiated nor given a gradient buffer: the
    backward is asked for the other input's gradient only, which still matches the reference."""
    calls = []
    impl = chunked.backward

    def spy(*args):
        calls.append(args[-2:])  # (compute_grad_hidden, compute_grad_heads)
        return impl(*args)

    monkeypatch.setattr(chunked, "backward", spy)
    p = _problem(17, 20, 70, 3, 0.25)
    hidden, heads, targets = p["hidden"].float(), p["heads"].float(), p["targets"]
    live = heads if frozen == "hidden" else hidden
    live.requires_grad_()
    grad_out = torch.randn(17, 3, device=DEVICE)
    (got,) = torch.autograd.grad(expert_logprobs(hidden, heads, targets, backend=backend), [live], grad_out)
    assert calls == [(frozen == "heads", frozen == "hidden")]
    h64, w64 = hidden.detach().double(), heads.detach().double()
    live64 = (w64 if frozen == "hidden" else h64).requires_grad_()
    (want,) = torch.autograd.grad(expert_logprobs_ref(h64, w64, targets), [live64], grad_out.double())
    assert rel_error(got, want) <= 1e-5


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_materialises_logits(backend):
    """No intermediate of forward + backward is as big as one expert's [T, V] logits."""
    T, d, V, K = 64, 8, 70, 4
    p = _problem(T, d, V, K, 0.1)
    hidden, heads = p["hidden"].float().requires_grad_(), p["heads"].float().requires_grad_()
    grad_out = torch.randn(T, K, device=DEVICE)
    with _LargestTensor() as mode:
        out = expert_logprobs(hidden, heads, p["targets"], backend=backend)
        torch.autograd.grad(out, [hidden, heads], grad_out)
    assert mode.largest < T * V, f"an intermediate of {mode.largest} elements >= T * V = {T * V}"


# --------------------------------------------------------------------------------------------
# registered ops: opcheck, torch.compile
# --------------------------------------------------------------------------------------------
def _op_inputs(hidden_dtype=torch.float32):
    p = _problem(17, 20, 70, 3, 0.25)
    return p["hidden"].to(hidden_dtype), p["heads"].float(), p["targets"]


# fp32 throughout, and the mixed case whose outputs (fp32 logp, bf16 grad_hidden) differ in
# dtype from some inputs: the fake implementations must say so too
OP_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("precompute", [False, True])
@pytest.mark.parametrize("hidden_dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_forward(backend, hidden_dtype, precompute):
    hidden, heads, targets = _op_inputs(hidden_dtype)
    args = (hidden.requires_grad_(), heads.requires_grad_(not precompute), targets, -100, backend, precompute)
    torch.library.opcheck(torch.ops.moelora.expert_logprobs_fwd.default, args)


@pytest.mark.parametrize("precompute", [False, True])
@pytest.mark.parametrize("hidden_dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward(backend, hidden_dtype, precompute):
    hidden, heads, targets = _op_inputs(hidden_dtype)
    _, lse, basis = torch.ops.moelora.expert_logprobs_fwd(hidden, heads, targets, -100, backend, precompute)
    grad = torch.randn(lse.shape, device=DEVICE)
    flag_sets = ((True, False),) if precompute else ((True, True), (True, False), (False, True))
    for flags in flag_sets:
        torch.library.opcheck(torch.ops.moelora.expert_logprobs_bwd.default,
                              (grad, hidden, heads, targets, lse, basis, -100, backend, *flags))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_heads_take_the_backward_without_a_gemm(backend, dtype, monkeypatch):
    """Frozen heads and a differentiated hidden (MoE-DPO's shared LM head, the reference): the
    forward keeps hidden's gradient basis and the backward multiplies no head."""
    p = _problem(17, 20, 70, 3, 0.25)
    hidden, heads, targets = p["hidden"].to(dtype).requires_grad_(), p["heads"].to(dtype), p["targets"]
    grad_out = torch.randn(17, 3, device=DEVICE)
    logits_calls = []
    real = chunked._logits
    monkeypatch.setattr(chunked, "_logits", lambda *a: logits_calls.append(1) or real(*a))
    (got,) = torch.autograd.grad(expert_logprobs(hidden, heads, targets, backend=backend), [hidden], grad_out)
    chunks_per_expert = -(-17 // max(1, 200 // 70))  # the fixture's 200-element chunks
    assert len(logits_calls) == 3 * chunks_per_expert  # the forward's logits, none in the backward
    h64 = hidden.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(expert_logprobs_ref(h64, heads.double(), targets), [h64], grad_out.double())
    h_low = hidden.detach().requires_grad_()
    (torch_low,) = torch.autograd.grad(expert_logprobs_ref(h_low, heads, targets), [h_low], grad_out)
    assert rel_error(got, want) <= bound(dtype, rel_error(torch_low, want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    from moelora.losses import mixture_dpo_loss, sequence_logprobs

    hidden, heads, targets = _op_inputs()
    heads.requires_grad_()
    log_w = torch.log_softmax(torch.randn(2, 3, device=DEVICE), -1)

    def step(hidden, heads):
        logp = expert_logprobs(hidden.view(4, 4, 20)[:, :4], heads, targets[:16].view(4, 4),
                               backend=backend)
        seq = sequence_logprobs(logp)  # [4, K]: pairs (0, 2) and (1, 3)
        return mixture_dpo_loss(seq[:2], seq[2:], log_weights=log_w).loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(hidden[:16], heads)
    (grad,) = torch.autograd.grad(loss, [heads])
    ref_loss = step(hidden[:16], heads)
    (ref_grad,) = torch.autograd.grad(ref_loss, [heads])
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_model_sized(dtype):
    """Real head sizes on the GPU: d = 4096, V = 32000 (+5), K = 4."""
    check_against_reference("triton", _problem(257, 4096, 32005, 4, 0.1), dtype)


# --------------------------------------------------------------------------------------------
# validation: a clear error naming the argument, raised before any kernel runs
# --------------------------------------------------------------------------------------------
def _valid():
    p = _problem(5, 8, 11, 2, 0.2)
    return dict(hidden=p["hidden"].float(), heads=p["heads"].float(), targets=p["targets"])


BAD_INPUTS = [
    ("hidden", lambda p: p["hidden"].long(), TypeError, "hidden has dtype"),
    ("hidden", lambda p: p["hidden"][:, :7], ValueError, r"heads has shape .* \(d = hidden"),
    ("heads", lambda p: p["heads"][0], ValueError, "heads must be 3-D"),
    ("heads", lambda p: p["heads"][:0], ValueError, "K >= 1"),
    ("heads", lambda p: p["heads"].to(torch.int32), TypeError, "heads has dtype"),
    ("targets", lambda p: p["targets"].float(), TypeError, "targets must be int32 or int64"),
    ("targets", lambda p: p["targets"][:4], ValueError, "targets has shape"),
    ("targets", lambda p: torch.full_like(p["targets"], 11), ValueError, r"\[0, 11\).*got targets\[0\] = 11"),
    ("targets", lambda p: torch.full_like(p["targets"], -1), ValueError, r"ignore_index = -100"),
    ("ignore_index", lambda p: -100.0, TypeError, "ignore_index must be a Python int"),
    ("ref_head", lambda p: p["heads"][0, :, :5], ValueError, "ref_head has shape"),
    ("ref_head", lambda p: p["heads"][0, :7], ValueError, r"ref_head has shape .*V of heads"),
    ("backend", lambda p: "cuda", ValueError, "expert_logprobs has no cuda backend"),
    ("backend", lambda p: "gpu", ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("name,corrupt,exc,match", BAD_INPUTS,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_is_named(name, corrupt, exc, match):
    p = _valid()
    p[name] = corrupt(p)
    with pytest.raises(exc, match=match):
        expert_logprobs(**p)


def test_device_mismatch_is_named():
    p = _valid()
    p["heads"] = p["heads"].to("meta")
    with pytest.raises(ValueError, match="heads is on meta"):
        expert_logprobs(**p)


def test_triton_without_float64():
    p = _valid()
    with pytest.raises(ValueError, match="'triton' cannot run"):
        expert_logprobs(p["hidden"].double(), p["heads"].double(), p["targets"], backend="triton")


def test_auto_never_picks_the_interpreter(monkeypatch):
    monkeypatch.delenv("MOELORA_BACKEND", raising=False)
    assert el.BACKENDS.resolve("auto", torch.device("cpu"), (torch.float32,)) in ("cpu", "torch")


def test_backend_resolution_is_the_shared_one(monkeypatch):
    """MOELORA_BACKEND overrides `auto` here as for the core op; "cpu" is this op's torch
    implementation (the compiled extension has no kernel for it), "cuda" it does not have."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("MOELORA_BACKEND", "torch")
    assert el.BACKENDS.resolve("auto", cpu, (torch.float32,)) == "torch"
    if "triton" in el.BACKENDS.available(cpu):
        monkeypatch.setenv("MOELORA_BACKEND", "triton")
        assert el.BACKENDS.resolve("auto", cpu, (torch.float32,)) == "triton"
    monkeypatch.setenv("MOELORA_BACKEND", "cuda")  # not this op's: auto's own choice
    assert el.BACKENDS.resolve("auto", cpu, (torch.float32,)) == "cpu"
    assert el.BACKENDS.impl("cpu") is el.BACKENDS.impl("torch")
    with pytest.raises(ValueError, match="expert_logprobs has no cuda backend"):
        el.BACKENDS.resolve("cuda", cpu, (torch.float32,))
