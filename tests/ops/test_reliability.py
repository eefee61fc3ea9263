"""Nothing silently wrong (issue 15): empty batches, compile with dynamic shapes, NumPy
scalars, degenerate router logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo.testing

import moelora
from moelora.reference import molora_linear_ref
from moelora.ops.routing.reference import topk_route_ref

from conftest import DEVICE

CORE = [b for b in ("torch", "triton", "cpu", "cuda") if b in moelora.available_backends(DEVICE)]
ROUTE = [b for b in ("torch", "triton", "cpu") if b in moelora.ops.routing.op.BACKENDS.available(DEVICE)]
INF = float("inf")


def _inputs(T, d_in=8, d_out=6, E=3, r=2, k=2):
    return dict(
        x=torch.randn(T, d_in, device=DEVICE), weight=torch.randn(d_out, d_in, device=DEVICE),
        bias=torch.randn(d_out, device=DEVICE),
        lora_a=torch.randn(E, r, d_in, device=DEVICE, requires_grad=True),
        lora_b=torch.randn(E, d_out, r, device=DEVICE, requires_grad=True),
        expert_indices=torch.randint(0, E, (T, k), device=DEVICE),
        expert_weights=torch.rand(T, k, device=DEVICE, requires_grad=True),
    )


@pytest.mark.parametrize("backend", CORE)
def test_empty_batch_stays_in_the_graph(backend):
    p = _inputs(0)
    y = moelora.molora_linear(**p, scaling=0.5, backend=backend)
    assert y.shape == (0, 6) and y.grad_fn is not None
    y.sum().backward()  # raised "does not require grad" before
    assert torch.equal(p["lora_a"].grad, torch.zeros_like(p["lora_a"]))
    assert torch.equal(p["lora_b"].grad, torch.zeros_like(p["lora_b"]))
    assert p["expert_weights"].grad.shape == (0, 2)


def test_numpy_scalars_and_refused_tensor():
    p = _inputs(5)
    ref = moelora.molora_linear(**p, scaling=2.0, backend="torch")
    torch.testing.assert_close(moelora.molora_linear(**p, scaling=np.float32(2.0), backend="torch"), ref)
    torch.testing.assert_close(moelora.molora_linear(**p, scaling=np.int64(2), backend="torch"), ref)
    with pytest.raises(TypeError, match="scaling must be a real number.*got a Tensor"):
        moelora.molora_linear(**p, scaling=torch.tensor(2.0), backend="torch")
    with pytest.raises(TypeError, match="scaling must be"):
        moelora.molora_linear(**p, scaling=np.bool_(True), backend="torch")
    logits = torch.randn(4, 5)
    assert torch.equal(moelora.topk_route(logits, np.int64(2))[1], moelora.topk_route(logits, 2)[1])


def test_compile_dynamic_varying_tokens_compiles_once():
    p = _inputs(3, E=4)
    counter = torch._dynamo.testing.CompileCounter()

    def step(x, ids, g, scaling):
        return moelora.molora_linear(x, p["weight"], p["bias"], p["lora_a"], p["lora_b"], ids, g,
                                     scaling, backend="torch")

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    for T in (3, 5, 9, 17):
        x, ids = torch.randn(T, 8), torch.randint(-1, 4, (T, 2))
        g = torch.rand(T, 2)
        torch.testing.assert_close(compiled(x, ids, g, 0.5), step(x, ids, g, 0.5))
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for 4 token counts"


def _degenerate_logits():
    return torch.tensor([
        [0.0, 1.0, 2.0, 3.0, -1.0],
        [-INF, -INF, -INF, -INF, -INF],  # fully masked
        [INF, 0.0, INF, 1.0, 2.0],  # two +inf: they share the mass
        [-INF, 0.5, -INF, -INF, -INF],  # one unmasked expert, k = 2
        [-INF, 0.5, 1.0, -INF, 0.0],
    ], device=DEVICE)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("backend", ROUTE)
def test_degenerate_logits_policy(backend, renormalize):
    logits = _degenerate_logits().requires_grad_()
    probs, ids, gates = moelora.topk_route(logits, 2, renormalize=renormalize, backend=backend)
    assert not probs.isnan().any() and not gates.isnan().any()
    assert torch.equal(ids[1], torch.tensor([-1, -1])) and torch.equal(gates[1], torch.zeros(2))
    assert torch.equal(probs[1], torch.zeros(5))
    torch.testing.assert_close(probs[2], torch.tensor([0.5, 0, 0.5, 0, 0]))
    assert sorted(ids[2].tolist()) == [0, 2]
    assert ids[3].tolist() == [1, -1] and gates[3, 1] == 0
    rp, ri, rw = topk_route_ref(logits.detach().double(), 2, renormalize, False)
    assert torch.equal(ids[[0, 1, 3, 4]], ri[[0, 1, 3, 4]])
    torch.testing.assert_close(gates.double(), rw)
    (gates.sum() + probs.square().sum()).backward()
    assert not logits.grad.isnan().any()
    assert torch.equal(logits.grad[1], torch.zeros(5))  # fully masked row: no gradient
    # a fully masked row adds nothing to molora_linear's output (ids -1), never NaN
    w = torch.randn(6, 8)
    y = moelora.molora_linear(torch.randn(5, 8), w, None, torch.randn(5, 2, 8), torch.randn(5, 6, 2),
                              ids, gates.detach(), 1.0, backend="torch")
    assert not y.isnan().any()


@pytest.mark.parametrize("backend", ROUTE)
def test_masked_gradient_matches_the_reference(backend):
    """The gradient through a partially masked row equals the reference's (autograd of
    topk_route_ref in float64): a masked slot's gate is the constant 0."""
    logits = _degenerate_logits()[[0, 3, 4]]
    ours = logits.clone().requires_grad_()
    ref = logits.double().requires_grad_()
    _, _, g = moelora.topk_route(ours, 3, backend=backend)
    _, _, rg = topk_route_ref(ref, 3, True, False)
    weights = torch.randn(3, 3, dtype=torch.float64)
    (g.double() * weights).sum().backward()
    (rg * weights).sum().backward()
    torch.testing.assert_close(ours.grad.double(), torch.nan_to_num(ref.grad), atol=1e-6, rtol=1e-5)


def test_backend_choice_is_logged_once_with_why_others_were_skipped(monkeypatch, caplog):
    """A triton whose import fails (numpy absent, say) is named in the one INFO line."""
    from moelora.ops.routing.op import BACKENDS as ROUTING

    triton = ROUTING.backends["triton"]

    def broken():
        raise ModuleNotFoundError("No module named 'numpy'")

    monkeypatch.setattr(triton, "load", broken)
    monkeypatch.setattr(triton, "_impl", None)
    monkeypatch.setattr(triton, "_error", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("MOELORA_BACKEND", raising=False)
    monkeypatch.setattr(ROUTING, "_logged", set())
    caplog.set_level("INFO", logger="moelora")
    for _ in range(3):
        moelora.topk_route(torch.randn(4, 5), 2)
    lines = [r.getMessage() for r in caplog.records if r.name == "moelora" and "topk_route" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "uses backend" in lines[0] and "triton" in lines[0] and "numpy" in lines[0]


def test_cpu_id_range_check_is_one_pass():
    """The CPU check of in-range ids dispatches one reduction (aminmax), no elementwise temps."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from moelora.ops.checks import check_range

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    ids = torch.randint(-1, 4, (64, 2))
    with Count() as c:
        check_range(ids, -1, 4, name="expert_indices", expected="lie in [-1, 4)")
    assert [op for op in c.ops if "aminmax" not in op and "_local_scalar_dense" not in op] == [], c.ops
    ids[3, 1] = 4
    with pytest.raises(ValueError, match=r"expert_indices\[3, 1\] = 4"):
        check_range(ids, -1, 4, name="expert_indices", expected="lie in [-1, 4)")
