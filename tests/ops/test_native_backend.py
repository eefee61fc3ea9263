"""The compiled backends (`cpu`, `cuda`: moelora._C from csrc/) against the float64 reference.

Error bounds follow style.md: the kernel's relative error against the float64 reference may be
at most twice PyTorch's own error at the same precision (the reference formula run in the low
dtype on the same inputs), plus a small per-dtype floor. Every output is checked: y and the
gradients of x, lora_a, lora_b and expert_weights. The CPU kernels exist once per instruction
set (AVX-512, AVX2, baseline SSE2); each set this machine runs is tested.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import moelora
from moelora.ops import extension
from moelora.reference import molora_linear_ref

from helpers import bound, make_routing, rel_error

if not extension.has_kernel("molora_linear_native_fwd", "CPU"):
    pytest.skip(
        "compiled extension moelora._C not loaded (not built: pip install -e . "
        "--no-build-isolation; or MOELORA_DISABLE_EXTENSION=1)",
        allow_module_level=True,
    )

_C = extension.module()



def _supported_isas() -> list[str]:
    best = _C.cpu_isa()
    order = ["base", "avx2", "avx512", "avx512bf16"]
    compiled = _C.compiled_cpu_isas().split(",")
    return [isa for isa in order[: order.index(best) + 1] if isa in compiled]


@pytest.fixture(params=_supported_isas())
def isa(request):
    previous = _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa(previous)


@pytest.fixture(params=["routed", "dense"])
def route(request):
    """Both routes of the CPU backend, forced (auto picks by measured thresholds): the routed
    kernels and the dense rank-space GEMMs (fp32 / bf16 with a shared dtype; other dtypes
    always take the routed kernels)."""
    previous = _C.set_cpu_route(request.param)
    yield request.param
    _C.set_cpu_route(previous)


@pytest.fixture
def routed():
    previous = _C.set_cpu_route("routed")
    yield
    _C.set_cpu_route(previous)


def make_inputs(T, d_in, d_out, E, r, k, routing="topk", bias=True):
    """float64 master inputs, scaled so every term of y is O(1)."""
    x = torch.randn(T, d_in, dtype=torch.float64)
    w = torch.randn(d_out, d_in, dtype=torch.float64) / d_in**0.5
    b = torch.randn(d_out, dtype=torch.float64) if bias else None
    a = torch.randn(E, r, d_in, dtype=torch.float64) / d_in**0.5
    bb = torch.randn(E, d_out, r, dtype=torch.float64) / r**0.5
    ids, g = make_routing(routing, T, E, k, "cpu")
    return x, w, b, a, bb, ids, g


def run(fn, x, w, b, a, bb, ids, g, scaling, dy, need_x=True):
    """y and the gradients of (x, lora_a, lora_b, expert_weights) of fn(...) for cotangent dy."""
    x = x.detach().clone().requires_grad_(need_x)
    a = a.detach().clone().requires_grad_()
    bb = bb.detach().clone().requires_grad_()
    g = g.detach().clone().requires_grad_()
    y = fn(x, w, b, a, bb, ids, g, scaling)
    y.backward(dy.to(y.dtype))
    return [y.detach(), x.grad, a.grad, bb.grad, g.grad]


def check(T, d_in, d_out, E, r, k, dtype, adapter_dtype=None, routing="topk", bias=True,
          scaling=0.75, need_x=True):
    adapter_dtype = adapter_dtype or dtype
    x, w, b, a, bb, ids, g = make_inputs(T, d_in, d_out, E, r, k, routing, bias)
    # Round the inputs to the test precision once; the float64 reference then sees the very
    # same values, so the error measured is the computation's alone.
    low = [x.to(dtype), w.to(dtype), None if b is None else b.to(dtype),
           a.to(adapter_dtype), bb.to(adapter_dtype), ids, g.float()]
    exact = [t if t is None or not t.is_floating_point() else t.double() for t in low]
    dy = torch.randn(T, d_out, dtype=torch.float64)

    ref = run(molora_linear_ref, *exact, scaling, dy, need_x)
    out = run(lambda *args: moelora.molora_linear(*args, backend="cpu"), *low, scaling, dy, need_x)
    # PyTorch at the test precision: the reference formula, or for mixed dtypes (which its
    # einsums cannot take) the dense-masked torch backend.
    torch_impl = molora_linear_ref if dtype == adapter_dtype else (
        lambda *args: moelora.molora_linear(*args, backend="torch"))
    torch_low = run(torch_impl, *low, scaling, dy, need_x)

    names = ["y", "grad_x", "grad_lora_a", "grad_lora_b", "grad_expert_weights"]
    assert out[0].dtype == dtype and out[0].shape == (T, d_out)
    for name, o, rf, tl in zip(names, out, ref, torch_low):
        if rf is None:
            assert o is None, name
            continue
        assert o is not None and o.shape == rf.shape, name
        limit = bound(dtype, rel_error(tl, rf), adapter_dtype)
        err = rel_error(o, rf)
        assert err <= limit, f"{name}: rel error {err:.3g} > bound {limit:.3g} ({dtype}, isa {_C.cpu_isa()})"
    assert out[2].dtype == adapter_dtype and out[3].dtype == adapter_dtype
    assert out[4].dtype == torch.float32


# (T, d_in, d_out, E, r, k): sizes of 1, sizes just past a vector / panel boundary (63, 65,
# 130), ranks not a multiple of the register block, k from 1 to E. T * k <= 8 E with trainable
# adapters is the direct decode expand: d_out past whole vector blocks, r under / past a vector.
SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (1, 65, 70, 9, 3, 2),
    (2, 65, 130, 9, 24, 2),
    (17, 63, 65, 5, 3, 2),
    (17, 65, 63, 5, 16, 5),
    (1, 65, 1, 5, 1, 3),
    (17, 1, 63, 1, 3, 1),
    (33, 130, 70, 5, 16, 4),
    # past the direct decode expand: the panels (bf16: rank pairs, an odd rank padded)
    (40, 97, 130, 3, 5, 2),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
def test_cpu_matches_reference(isa, route, shape, dtype):
    check(*shape, dtype)


@pytest.mark.parametrize("routing", ["duplicates", "none", "skewed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_routings(isa, route, routing, dtype):
    check(19, 65, 63, 5, 3, 4, dtype, routing=routing)


@pytest.mark.parametrize(
    "dtype,adapter_dtype",
    [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
     (torch.float16, torch.float32), (torch.float32, torch.float64)],
    ids=str,
)
def test_cpu_mixed_dtypes(route, dtype, adapter_dtype):
    check(17, 63, 65, 5, 3, 2, dtype, adapter_dtype=adapter_dtype)


def test_cpu_no_bias_no_grad_x(route):
    check(17, 65, 63, 5, 3, 2, torch.float32, bias=False, need_x=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_larger_shape(route, dtype):
    # A real-ish layer: several panels and register blocks in every dimension, E*r = 128.
    check(96, 256, 320, 8, 16, 2, dtype)


def test_cpu_deterministic(route):
    x, w, b, a, bb, ids, g = (t if t is None or not t.is_floating_point() else t.float()
                              for t in make_inputs(40, 130, 70, 5, 16, 3, "duplicates"))
    args = (x, w, b, a, bb, ids, g, 0.5)
    y1, h1 = torch.ops.moelora.molora_linear_native_fwd(*args)
    y2, h2 = torch.ops.moelora.molora_linear_native_fwd(*args)
    assert torch.equal(y1, y2) and torch.equal(h1, h2)
    dy = torch.randn_like(y1)
    bw = (dy, x, w, a, bb, ids, g, h1, 0.5, True, True)
    for t1, t2 in zip(torch.ops.moelora.molora_linear_native_bwd(*bw), torch.ops.moelora.molora_linear_native_bwd(*bw)):
        assert torch.equal(t1, t2)


def test_cpu_h_contract(route):
    """h = A_e x_t per slot in the accumulate dtype, exactly 0 for unrouted slots."""
    x, w, b, a, bb, ids, g = make_inputs(9, 33, 17, 4, 5, 3)
    ids[0] = -1
    _, h = torch.ops.moelora.molora_linear_native_fwd(x.float(), w.float(), b.float(), a.float(), bb.float(),
                                         ids, g.float(), 1.0)
    assert h.dtype == torch.float32 and h.shape == (9, 3, 5)
    expect = torch.einsum("tc,tjrc->tjr", x, a[ids.clamp(min=0)]) * (ids >= 0).unsqueeze(-1)
    assert torch.equal(h[ids < 0], torch.zeros_like(h[ids < 0]))
    assert rel_error(h, expect) < 1e-5


def _op_args(T, dtype, bias=True):
    x, w, b, a, bb, ids, g = make_inputs(T, 20, 12, 3, 4, 2, "duplicates", bias)
    x, w, a, bb = (t.to(dtype) for t in (x, w, a, bb))
    b = None if b is None else b.to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return x, w, b, a, bb, ids, g.to(acc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_opcheck(route, dtype, bias):
    x, w, b, a, bb, ids, g = _op_args(7, dtype, bias)
    torch.library.opcheck(torch.ops.moelora.molora_linear_native_fwd.default, (x, w, b, a, bb, ids, g, 0.5))
    _, h = torch.ops.moelora.molora_linear_native_fwd(x, w, b, a, bb, ids, g, 0.5)
    dy = torch.randn(7, 12).to(dtype)
    for need_x, need_adapters in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(torch.ops.moelora.molora_linear_native_bwd.default,
                              (dy, x, w, a, bb, ids, g, h, 0.5, need_x, need_adapters))


def test_cpu_rejects_bad_ids(route):
    """The op's own check (the eager path leaves it to the op): a ValueError with the Python
    layer's message, before any kernel runs."""
    x, w, b, a, bb, ids, g = _op_args(4, torch.float32)
    ids[1, 0] = 3  # E = 3
    for op in (torch.ops.moelora.molora_linear_native_fwd, torch.ops.moelora.molora_linear_native):
        with pytest.raises(ValueError, match=r"expert_indices must lie in \[-1, 3\).*expert_indices\[1, 0\] = 3"):
            op(x, w, b, a, bb, ids, g, 1.0)
    with pytest.raises(ValueError, match=r"expert_indices must lie in \[-1, 3\)"):
        moelora.molora_linear(x, w, b, a, bb, ids, g, 1.0, backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_autograd_op(route, dtype, bias):
    """molora_linear_native (the eager path: autograd in C++) against the registered ops'
    gradients, every input that can need one, and opcheck (schema, autograd registration,
    fake, AOT dispatch)."""
    x, w, b, a, bb, ids, g = _op_args(7, dtype, bias)
    args = [x, w, b, a, bb, ids, g]
    grads = {}
    for name, fn in (("native", torch.ops.moelora.molora_linear_native),
                     ("custom op", lambda *t: moelora.molora_linear(*t, backend="torch"))):
        leaves = [t if t is None or not t.is_floating_point() else t.detach().clone().requires_grad_()
                  for t in args]
        y = fn(*leaves, 0.5)
        y.backward(torch.ones_like(y))
        grads[name] = [y.detach()] + [t.grad for t in leaves if t is not None and t.is_floating_point()]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for got, want in zip(grads["native"], grads["custom op"]):
        assert rel_error(got, want) < tol
    leaves = [t if t is None or not t.is_floating_point() else t.detach().requires_grad_() for t in args]
    torch.library.opcheck(torch.ops.moelora.molora_linear_native.default, (*leaves, 0.5))


def test_cpu_route_switch():
    previous = _C.set_cpu_route("dense")
    try:
        assert _C.cpu_route() == "dense"
        with pytest.raises(ValueError, match="unknown CPU route 'sideways'"):
            _C.set_cpu_route("sideways")
    finally:
        _C.set_cpu_route(previous)
    assert _C.cpu_route() == previous


@pytest.mark.parametrize("value, expected", [("dense", "dense"), ("routed", "routed"), ("", "auto")])
def test_cpu_route_from_environment(value, expected):
    """MOELORA_CPU_ROUTE is read once, at the first call that needs the route (a fresh process)."""
    code = "from moelora.ops import extension; extension.load(); print(extension.module().cpu_route())"
    env = {**os.environ, "MOELORA_CPU_ROUTE": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected


def test_cpu_dense_route_skips_frozen_adapter_gradients():
    """Frozen experts (HoE router training): the dense backward runs its two GEMMs (u = dy B,
    dx), not the two adapter-gradient GEMMs."""
    from torch.profiler import profile

    x, w, b, a, bb, ids, g = _op_args(16, torch.float32)
    x.requires_grad_()
    g.requires_grad_()
    previous = _C.set_cpu_route("dense")
    try:
        y = moelora.molora_linear(x, w, b, a, bb, ids, g, 0.5, backend="cpu")
        with profile() as prof:
            y.sum().backward()
    finally:
        _C.set_cpu_route(previous)
    mms = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm_"))
    assert mms == 3  # u_all, dy W, dx += z_u A
    assert x.grad is not None and g.grad is not None and a.grad is None


def test_cpu_isa_switch():
    previous = _C.set_cpu_isa("base")
    try:
        assert _C.cpu_isa() == "base"
        with pytest.raises(RuntimeError, match="unknown CPU instruction set"):
            _C.set_cpu_isa("sse9")
    finally:
        _C.set_cpu_isa(previous)


def test_cpu_backend_is_auto_on_cpu():
    assert "cpu" in moelora.available_backends("cpu")


# ---------------------------------------------------------------------------------------------
# the adapter cache and the small-T path (csrc/molora_linear/cpu/molora_cpu.cpp)
# ---------------------------------------------------------------------------------------------
def _native_ref(x, w, b, a, bb, ids, g, scaling):
    """y of the float64 reference, and the op's h [T, k, r] (A_e x_t, 0 where unrouted)."""
    y = molora_linear_ref(*(t if t is None or not t.is_floating_point() else t.double()
                            for t in (x, w, b, a, bb)), ids, g.double(), scaling)
    h = torch.einsum("tc,tjrc->tjr", x.double(), a.double()[ids.clamp(min=0)]) * (ids >= 0).unsqueeze(-1)
    return y, h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_cache_sees_in_place_updates(routed, dtype):
    """The cached adapter layouts are keyed on the version counter: an in-place update of A or
    B (an optimizer step) is seen by the next forward and backward."""
    x, w, b, a, bb, ids, g = make_inputs(5, 70, 130, 6, 4, 2)
    x, w, b, a, bb = (t.to(dtype) for t in (x, w, b, a, bb))
    g = g.float()
    fwd, bwd = torch.ops.moelora.molora_linear_native_fwd, torch.ops.moelora.molora_linear_native_bwd
    dy = torch.randn(5, 130).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    hits_before = _C.cpu_cache_stats()[2]
    for step in range(3):
        y, h = fwd(x, w, b, a, bb, ids, g, 0.5)
        assert torch.equal(fwd(x, w, b, a, bb, ids, g, 0.5)[0], y)  # served from the cache
        y_ref, h_ref = _native_ref(x, w, b, a, bb, ids, g, 0.5)
        assert rel_error(y, y_ref) < tol and rel_error(h, h_ref) < tol, step
        gx, _, _, _ = bwd(dy, x, w, a, bb, ids, g, h, 0.5, True, True)
        xr = x.double().requires_grad_()
        molora_linear_ref(xr, w.double(), b.double(), a.double(), bb.double(), ids, g.double(), 0.5).backward(dy.double())
        assert rel_error(gx, xr.grad) < tol, step
        with torch.no_grad():  # what an optimizer step does: bumps the version counters
            a.mul_(-1.5).add_(0.25)
            bb.add_(torch.randn_like(bb))
    entries, _, hits, misses = _C.cpu_cache_stats()
    assert hits >= hits_before + 3 and misses > 0 and entries >= 1


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adam", "adam"])
def test_cpu_trainable_adapters_see_every_optimizer_step(fused):
    """Fused optimizer steps (torch's fused Adam on CPU, HF Trainer's default) write parameters
    without bumping their version counters: trainable adapters must never be served from the
    layout cache, or training silently runs on the previous step's weights."""
    torch.manual_seed(0)
    x, w, b, a, bb, ids, g = (t if t is None or not t.is_floating_point() else t.float()
                              for t in make_inputs(4, 24, 20, 3, 4, 2))
    a, bb = a.clone().requires_grad_(), bb.clone().requires_grad_()
    opt = torch.optim.Adam([a, bb], lr=0.1, fused=fused)
    for step in range(3):
        y = moelora.molora_linear(x, w, b, a, bb, ids, g, 0.5, backend="cpu")
        y_ref = molora_linear_ref(x.double(), w.double(), b.double(), a.detach().double(),
                                  bb.detach().double(), ids, g.double(), 0.5)
        assert rel_error(y, y_ref) < 1e-5, step
        opt.zero_grad()
        y.square().sum().backward()
        opt.step()


def test_cpu_cache_new_tensor_same_values_layout_is_fresh(route):
    """A freed adapter's entry never serves another tensor, even at the same address."""
    x, w, b, a, bb, ids, g = (t if t is None or not t.is_floating_point() else t.float()
                              for t in make_inputs(3, 40, 50, 4, 3, 2))
    for _ in range(4):
        bb = torch.randn_like(bb)  # the old one is freed: its storage may be reused
        y, _ = torch.ops.moelora.molora_linear_native_fwd(x, w, b, a, bb, ids, g, 1.0)
        assert rel_error(y, _native_ref(x, w, b, a, bb, ids, g, 1.0)[0]) < 1e-5


@pytest.mark.parametrize("T", [1, 2, 8, 16])
@pytest.mark.parametrize("inference", [False, True], ids=["cached", "inference-mode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_small_T(isa, route, T, inference, dtype):
    """Decode sizes: the serial path (no parallel region), cached layouts, and under inference
    mode (inference tensors are never cached) the direct expand; unrouted slots included."""
    x, w, b, a, bb, ids, g = make_inputs(T, 96, 160, 8, 16, 2)
    ids[0, 1] = -1
    x, w, b, a, bb = (t.to(dtype) for t in (x, w, b, a, bb))
    g = g.float()
    with torch.inference_mode(inference):
        if inference:
            a, bb = a.clone(), bb.clone()  # inference tensors
        y, h = torch.ops.moelora.molora_linear_native_fwd(x, w, b, a, bb, ids, g, 0.75)
    y_ref, h_ref = _native_ref(x, w, b, a, bb, ids, g, 0.75)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert y.dtype == dtype and rel_error(y, y_ref) < tol and rel_error(h, h_ref) < 1e-2
    assert torch.equal(h[0, 1], torch.zeros_like(h[0, 1]))


def test_cpu_inference_mode_rejects_bad_ids():
    x, w, b, a, bb, ids, g = _op_args(1, torch.float32)
    ids[0, 0] = 7  # E = 3
    with torch.inference_mode(), pytest.raises(ValueError, match="expert_indices"):
        torch.ops.moelora.molora_linear_native_fwd(x, w, b, a.clone(), bb.clone(), ids, g, 1.0)


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU or without a CUDA build)
# ---------------------------------------------------------------------------------------------
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not extension.has_kernel("molora_linear_native_fwd", "CUDA"):
        pytest.skip("moelora._C was built without CUDA (MOELORA_BUILD_CUDA)")


def check_cuda(T, d_in, d_out, E, r, k, dtype, routing="topk", bias=True, scaling=0.75):
    x, w, b, a, bb, ids, g = make_inputs(T, d_in, d_out, E, r, k, routing, bias)
    low = [x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), a.to(dtype),
           bb.to(dtype), ids, g.float()]
    exact = [t if t is None or not t.is_floating_point() else t.double() for t in low]
    dy = torch.randn(T, d_out, dtype=torch.float64)
    ref = run(molora_linear_ref, *exact, scaling, dy)
    torch_low = run(molora_linear_ref, *[None if t is None else t.cuda() for t in low], scaling,
                    dy.cuda())
    out = run(lambda *args: moelora.molora_linear(*args, backend="cuda"),
              *[None if t is None else t.cuda() for t in low], scaling, dy.cuda())
    for name, o, rf, tl in zip(["y", "grad_x", "grad_lora_a", "grad_lora_b", "grad_g"], out, ref,
                               torch_low):
        limit = bound(dtype, rel_error(tl.cpu(), rf))
        err = rel_error(o.cpu(), rf)
        assert err <= limit, f"{name}: rel error {err:.3g} > bound {limit:.3g} ({dtype}, T={T})"


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 7, 64, 65, 300])  # <= 64: fused decode kernel; else grouped
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_matches_reference(T, dtype):
    _need_cuda()
    check_cuda(T, 130, 70, 5, 16, 3, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES + [(80, 257, 129, 4, 256, 2), (5, 4096, 4096, 8, 16, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_shapes(shape):
    _need_cuda()
    check_cuda(*shape, torch.float32)
    check_cuda(*shape, torch.bfloat16, routing="duplicates")


@pytest.mark.gpu
def test_cuda_opcheck():
    _need_cuda()
    for T in (3, 70):
        x, w, b, a, bb, ids, g = (None if t is None else t.cuda() for t in _op_args(T, torch.bfloat16))
        torch.library.opcheck(torch.ops.moelora.molora_linear_native_fwd.default, (x, w, b, a, bb, ids, g, 0.5))
        _, h = torch.ops.moelora.molora_linear_native_fwd(x, w, b, a, bb, ids, g, 0.5)
        dy = torch.randn(T, 12, device="cuda", dtype=torch.bfloat16)
        for need_x, need_adapters in ((True, True), (False, True), (True, False)):
            torch.library.opcheck(torch.ops.moelora.molora_linear_native_bwd.default,
                                  (dy, x, w, a, bb, ids, g, h, 0.5, need_x, need_adapters))
