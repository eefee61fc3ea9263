"""topk_route (softmax + top-k + renormalise) against the float64 reference, values and grads."""
from __future__ import annotations

import pytest
import torch

import moelora
from moelora.ops.routing.op import BACKENDS as ROUTING
from moelora.reference import topk_route_ref

from conftest import DEVICE
from helpers import bound, rel_error

BACKENDS = [b for b in ("torch", "triton", "cpu") if b in ROUTING.available(DEVICE)]

CASES = [  # (T, E', k)
    (1, 1, 1),
    (17, 5, 2),
    (65, 8, 8),  # k = E': dense mixture
    (3, 33, 4),  # E' past a power of two
    (64, 9, 1),  # PMoL: 8 experts + the empty one
    (17, 6, 3),  # k not a power of two: the padded gate column must not be written
]


def _losses(probs, weights, c_probs, c_weights):
    # Weights on both outputs so the gradient goes through probs and the gates.
    return (probs.double() * c_probs).sum() + (weights.double() * c_weights).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("empty_expert", [False, True])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-E{}-k{}".format(*c))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, case, renormalize, empty_expert, dtype):
    T, E, k = case
    if empty_expert and E < 2:
        pytest.skip("an empty expert needs another column")
    # Distinct quarter-integers are exact in every dtype, so no two columns tie after rounding
    # (the order among tied experts is unspecified).
    ranks = torch.stack([torch.randperm(E) for _ in range(T)]).to(torch.float64)
    logits = ((ranks - E / 2) * 0.25 + torch.randint(-2, 3, (T, 1))).to(DEVICE, dtype)
    c_probs = torch.randn(T, E, dtype=torch.float64, device=DEVICE)
    c_weights = torch.randn(T, k, dtype=torch.float64, device=DEVICE)

    x = logits.detach().requires_grad_()
    probs, idx, w = moelora.topk_route(x, k, renormalize=renormalize, empty_expert=empty_expert,
                                       backend=backend)
    (grad,) = torch.autograd.grad(_losses(probs, w, c_probs, c_weights), [x])

    x64 = logits.double().requires_grad_()
    rprobs, ridx, rw = topk_route_ref(x64, k, renormalize, empty_expert)
    (rgrad,) = torch.autograd.grad(_losses(rprobs, rw, c_probs, c_weights), [x64])

    assert idx.dtype == torch.int64 and probs.dtype == torch.float32
    assert torch.equal(idx, ridx)
    if empty_expert:
        assert (idx < E - 1).all() and (idx >= -1).all()
    # inputs are exact in float64, so fp32 math should be near fp32 epsilon whatever the dtype
    for name, ours, ref in (("probs", probs, rprobs), ("weights", w, rw), ("grad", grad, rgrad)):
        err = rel_error(ours, ref)
        limit = bound(torch.float32, 0.0) if name != "grad" else bound(dtype, rel_error(ref.to(dtype), ref))
        assert err <= limit, f"{name}: rel error {err:.3g} > {limit:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_zero_rows(backend):
    logits = torch.randn(2, 3, 6, device=DEVICE)
    probs, idx, w = moelora.topk_route(logits, 2, backend=backend)
    assert probs.shape == (2, 3, 6) and idx.shape == (2, 3, 2) and w.shape == (2, 3, 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, device=DEVICE))
    probs, idx, w = moelora.topk_route(torch.randn(0, 6, device=DEVICE), 2, backend=backend)
    assert probs.shape == (0, 6) and idx.shape == (0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits(backend):
    logits = torch.randn(7, 11, device=DEVICE).t()  # [11, 7], column-major
    probs, idx, w = moelora.topk_route(logits, 3, empty_expert=True, backend=backend)
    rprobs, ridx, rw = topk_route_ref(logits.double(), 3, True, True)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(probs, rprobs.float())
    torch.testing.assert_close(w, rw.float())


@pytest.mark.parametrize("empty_expert", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_give_nan_gates_and_valid_ids(backend, empty_expert):
    """A diverging router must propagate NaN, not emit ids >= E' that molora_linear rejects
    (or, on a GPU under torch.compile, where the range check is skipped, reads out of bounds)."""
    E, k = 5, 3
    logits = torch.randn(4, E, device=DEVICE)
    logits[1, 2] = float("nan")
    logits[2] = float("nan")
    probs, idx, w = moelora.topk_route(logits, k, empty_expert=empty_expert, backend=backend)
    top = E - 1 if empty_expert else E
    assert ((idx >= -1) & (idx < top)).all(), idx
    assert w[1:3].isnan().all() and not w[[0, 3]].isnan().any()
    ref_probs, ref_idx, ref_w = topk_route_ref(logits[[0, 3]], k, True, empty_expert)
    assert torch.equal(idx[[0, 3]], ref_idx)
    torch.testing.assert_close(w[[0, 3]], ref_w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    logits = torch.randn(9, 6, device=DEVICE, requires_grad=True)
    for renormalize, empty in ((True, False), (False, True)):
        torch.library.opcheck(torch.ops.moelora.topk_route.default, (logits, 3, renormalize, empty, backend))


def test_routes_into_molora_linear_under_compile():
    """Router -> op -> loss compiles as one graph, gradients reach the router weights."""
    x = torch.randn(10, 8, device=DEVICE)
    router = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    w, a, b = torch.randn(6, 8), torch.randn(4, 2, 8), torch.randn(4, 6, 2)

    def step(router):
        probs, idx, g = moelora.topk_route(x @ router.t(), 2)
        return moelora.molora_linear(x, w, None, a, b, idx, g, 1.0).square().mean() + probs.var()

    (grad,) = torch.autograd.grad(torch.compile(step, fullgraph=True, backend="aot_eager")(router), [router])
    (ref,) = torch.autograd.grad(step(router), [router])
    torch.testing.assert_close(grad, ref)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize(
    "logits,k,kwargs,exc,match",
    [
        (torch.randn(3, 4), 5, {}, ValueError, "k must be an int with 1 <= k <= E' = 4"),
        (torch.randn(3, 4), 0, {}, ValueError, "k must be"),
        (torch.randn(3, 4), 2.0, {}, TypeError, "k must be an integer"),
        (torch.ones(3, 4, dtype=torch.long), 1, {}, TypeError, "floating-point"),
        (torch.randn(3, 1), 1, {"empty_expert": True}, ValueError, "at least 2"),
        (torch.randn(3, 4), 1, {"backend": "cuda"}, ValueError, "topk_route has no cuda backend"),
        (torch.randn(3, 4), 1, {"backend": "gpu"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_input_is_named(logits, k, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        moelora.topk_route(logits, k, **kwargs)


def test_cpu_backend_name_is_accepted_like_the_core_ops():
    """backend="cpu" runs on CPU tensors (torch's softmax / topk are this op's CPU kernels), as
    molora_linear accepts it; the result is the torch backend's."""
    logits = torch.randn(5, 6)
    got = moelora.topk_route(logits, 2, backend="cpu")
    want = moelora.topk_route(logits, 2, backend="torch")
    for g, w in zip(got, want):
        assert torch.equal(g, w)
