"""`moelora::molora_delta`, the routed LoRA delta without a base: against the float64
reference, equal to the core op minus its base on every backend here, opcheck, compile."""
from __future__ import annotations

import pytest
import torch

from moelora.ops.molora_delta import molora_delta
from moelora.ops.molora_delta.op import BACKENDS as DELTA_BACKENDS
from moelora.ops.molora_delta.reference import molora_delta_ref
from moelora.ops.molora_linear import molora_linear

from conftest import DEVICE
from helpers import bound, make_routing, rel_error

BACKENDS = DELTA_BACKENDS.available(DEVICE)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # A later compile of the same code with another float scaling would otherwise recompile
    # with a symbolic float, which the op's validation cannot take yet (issue 15, item 2).
    yield
    torch._dynamo.reset()


def _problem(T=17, d_in=20, d_out=12, E=4, r=3, k=2, routing="topk", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    ids, gates = make_routing(routing, T, E, k, DEVICE)
    return dict(
        x=torch.randn(T, d_in, device=DEVICE, dtype=dtype),
        lora_a=torch.randn(E, r, d_in, device=DEVICE, dtype=dtype) / d_in ** 0.5,
        lora_b=torch.randn(E, d_out, r, device=DEVICE, dtype=dtype),
        expert_indices=ids,
        expert_weights=gates.to(dtype),
    )


def _grads(fn, p, dy):
    leaves = {n: p[n].detach().clone().requires_grad_() for n in ("x", "lora_a", "lora_b", "expert_weights")}
    y = fn(leaves["x"], leaves["lora_a"], leaves["lora_b"], p["expert_indices"], leaves["expert_weights"], 0.7)
    (y * dy.to(y.dtype)).sum().backward()
    return y.detach(), {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("routing,k", [("topk", 2), ("dense", 4), ("duplicates", 3), ("none", 1)])
def test_values_and_gradients_match_float64_reference(backend, routing, k):
    p = _problem(routing=routing, k=k)
    p64 = {n: (t.double() if t.is_floating_point() else t) for n, t in p.items()}
    dy = torch.randn(17, 12, device=DEVICE, dtype=torch.float64)
    y, g = _grads(lambda *a: molora_delta(*a, backend=backend), p, dy)
    y_ref, g_ref = _grads(molora_delta_ref, p64, dy)
    y_torch, g_torch = _grads(molora_delta_ref, p, dy)  # PyTorch's own fp32 error
    assert y.dtype == torch.float32 and y.shape == (17, 12)
    assert rel_error(y, y_ref) <= bound(torch.float32, rel_error(y_torch, y_ref))
    for name in g:
        assert rel_error(g[name], g_ref[name]) <= bound(torch.float32, rel_error(g_torch[name], g_ref[name])), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_is_the_core_op_without_its_base(backend):
    p = _problem(dtype=torch.float64 if backend == "torch" else torch.float32)
    weight = torch.randn(12, 20, device=DEVICE, dtype=p["x"].dtype)
    args = (p["lora_a"], p["lora_b"], p["expert_indices"], p["expert_weights"], 0.7)
    full = molora_linear(p["x"], weight, None, *args, backend=backend)
    delta = molora_delta(p["x"], *args, backend=backend)
    tol = 1e-10 if p["x"].dtype == torch.float64 else 1e-5
    torch.testing.assert_close(delta, full - p["x"] @ weight.t(), rtol=tol, atol=tol)


def test_leading_dims_and_empty_batch_keep_the_graph():
    p = _problem(T=6)
    x = p["x"].reshape(2, 3, 20)
    y = molora_delta(x, p["lora_a"], p["lora_b"], p["expert_indices"].reshape(2, 3, 2),
                     p["expert_weights"].reshape(2, 3, 2), 0.5)
    assert y.shape == (2, 3, 12)
    a = p["lora_a"].clone().requires_grad_()
    y0 = molora_delta(p["x"][:0], a, p["lora_b"], p["expert_indices"][:0], p["expert_weights"][:0], 0.5)
    assert y0.shape == (0, 12)
    y0.sum().backward()
    assert a.grad is not None and torch.count_nonzero(a.grad) == 0


@pytest.mark.parametrize("change,error,match", [
    (dict(x=torch.ones(17, 20, dtype=torch.int64)), TypeError, "x must be a floating-point"),
    (dict(x=torch.randn(17, 19)), ValueError, "lora_a has shape"),
    (dict(lora_b=torch.randn(4, 12)), ValueError, "lora_b must be 3-D"),
    (dict(lora_b=torch.randn(4, 12, 2)), ValueError, "lora_b has shape"),
    (dict(expert_indices=torch.full((17, 2), 4)), ValueError, "expert_indices"),
    (dict(expert_weights=torch.rand(17, 3)), ValueError, "expert_weights has shape"),
])
def test_bad_input_is_named(change, error, match):
    p = _problem()
    p.update({n: t.to(DEVICE) for n, t in change.items()})
    with pytest.raises(error, match=match):
        molora_delta(p["x"], p["lora_a"], p["lora_b"], p["expert_indices"], p["expert_weights"], 0.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        molora_delta(*_problem().values(), 0.5, backend="nope")


def _op_args(backend):
    p = _problem()
    return (p["x"], p["lora_a"], p["lora_b"], p["expert_indices"].long(), p["expert_weights"].float(), 0.5, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    args = _op_args(backend)
    for i in (0, 1, 2, 4):
        args[i].requires_grad_()
    torch.library.opcheck(torch.ops.moelora.molora_delta_fwd.default, args)
    x, a, b, idx, g, s, name = (t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    _, h, state = torch.ops.moelora.molora_delta_fwd(x, a, b, idx, g, s, name)
    dy = torch.randn(x.shape[0], b.shape[1], device=DEVICE)
    for need_x, need_adapters in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(torch.ops.moelora.molora_delta_bwd.default,
                              (dy, x, a, b, idx, g, h, state, s, name, need_x, need_adapters))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    p = _problem()
    a = p["lora_a"].clone().requires_grad_()

    def step(x, lora_a):
        y = molora_delta(x, lora_a, p["lora_b"], p["expert_indices"], p["expert_weights"], 0.5, backend=backend)
        return y.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(p["x"], a)
    (grad,) = torch.autograd.grad(loss, [a])
    ref_loss = step(p["x"], a)
    (ref_grad,) = torch.autograd.grad(ref_loss, [a])
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_torch_compile_inductor():
    p = _problem(T=9)
    fn = torch.compile(lambda **kw: molora_delta(**kw, backend="torch") * 2, fullgraph=True)
    torch.testing.assert_close(fn(**p), 2 * molora_delta(**p, backend="torch"))


def test_torch_backend_runs_without_a_base(monkeypatch):
    """The torch backend has a weight=None path: the delta pays no zero base GEMM there."""
    from moelora.ops.molora_linear import torch_backend

    seen = []
    real_fwd, real_bwd = torch_backend.forward, torch_backend.backward
    monkeypatch.setattr(torch_backend, "forward", lambda x, w, *a: seen.append(w) or real_fwd(x, w, *a))
    monkeypatch.setattr(torch_backend, "backward", lambda dy, x, w, *a: seen.append(w) or real_bwd(dy, x, w, *a))
    p = _problem()
    x = p["x"].requires_grad_()
    molora_delta(x, p["lora_a"], p["lora_b"], p["expert_indices"], p["expert_weights"], 0.5,
                 backend="torch").sum().backward()
    assert seen == [None, None]
