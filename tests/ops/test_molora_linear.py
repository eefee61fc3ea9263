"""The core op against the float64 reference, on every backend this machine has.

Without a GPU the Triton backend runs under TRITON_INTERPRET=1 (see conftest.py), so shapes
stay small; they are chosen to be awkward: 0, 1, odd sizes, one past a block boundary.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import moelora
from moelora.reference import molora_linear_ref

from conftest import DEVICE
from helpers import bound, make_routing, rel_error

BACKENDS = [b for b in ("torch", "triton", "cpu", "cuda") if b in moelora.available_backends(DEVICE)]

# (T, d_in, d_out, E, r, k, routing)
SHAPES = [
    (17, 33, 21, 5, 3, 2, "topk"),
    (1, 1, 1, 1, 1, 1, "dense"),  # plain LoRA at its smallest
    (17, 16, 16, 1, 16, 1, "dense"),  # plain LoRA (PEFT): E = 1, k = 1
    (1, 63, 65, 5, 16, 5, "dense"),  # dense soft mixture, k = E
    (65, 65, 63, 5, 1, 1, "tenant"),  # multi-tenant; 65 = one past a 64-row block
    (17, 64, 17, 5, 3, 3, "duplicates"),  # repeated ids within a row
    (3, 8, 8, 5, 3, 2, "none"),  # every slot is the empty expert
    (65, 17, 33, 5, 3, 2, "skewed"),  # one expert spans several row blocks
    (129, 20, 70, 3, 17, 2, "topk"),  # r = 17: one past the 16-wide rank tile
    (33, 17, 9, 1, 2, 1, "topk"),  # plain LoRA with some tokens on no adapter (k = 1 grouped path)
    (5, 8, 8, 3, 2, 1, "none"),  # k = 1 and every slot the empty expert
]
# (activation dtype, adapter dtype)
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),  # mixed precision as people train: fp32 adapters
]


def _shape_id(shape):
    return "T{}-din{}-dout{}-E{}-r{}-k{}-{}".format(*shape)


def _dtype_id(pair):
    return "-".join(str(d).removeprefix("torch.") for d in pair)


def _problem(T, d_in, d_out, E, r, k, routing, *, bias=True, lead=None):
    """float64 master inputs; B is not zero (a fresh PEFT B is, but that would test nothing)."""
    lead = (T,) if lead is None else lead
    ids, gates = make_routing(routing, T, E, k, DEVICE)
    f64 = dict(dtype=torch.float64, device=DEVICE)
    return dict(
        x=torch.randn(*lead, d_in, **f64),
        weight=torch.randn(d_out, d_in, **f64) / d_in**0.5,
        bias=torch.randn(d_out, **f64) if bias else None,
        lora_a=torch.randn(E, r, d_in, **f64) / d_in**0.5,
        lora_b=torch.randn(E, d_out, r, **f64) / r**0.5,
        expert_indices=ids.reshape(*lead, k),
        expert_weights=gates.reshape(*lead, k),
    )


DIFF_ARGS = ("x", "lora_a", "lora_b", "expert_weights")


def _run(fn, inputs, grad_out, grad_names):
    leaves = {
        n: (t.detach().requires_grad_(n in grad_names) if t is not None and t.is_floating_point() else t)
        for n, t in inputs.items()
    }
    out = fn(**leaves)
    grads = torch.autograd.grad(out, [leaves[n] for n in grad_names], grad_out.to(out.dtype))
    return out, dict(zip(grad_names, grads))


def _cast(inputs, dtype, adapter_dtype):
    out = {}
    for name, t in inputs.items():
        if t is None or not t.is_floating_point():
            out[name] = t
        elif name in ("lora_a", "lora_b"):
            out[name] = t.to(adapter_dtype)
        else:
            out[name] = t.to(dtype)
    return out


def check_against_reference(backend, problem, dtype, adapter_dtype, *, scaling=0.5,
                            grad_names=DIFF_ARGS):
    """Values and gradients within twice PyTorch's own error at the same precision."""
    low = _cast(problem, dtype, adapter_dtype)
    # The reference sees exactly the rounded inputs, so only the kernel's error is measured.
    exact = {n: (t.double() if t is not None and t.is_floating_point() else t) for n, t in low.items()}
    torch_low = _cast(problem, dtype, dtype)
    grad_out = torch.randn(*problem["x"].shape[:-1], problem["weight"].shape[0],
                           dtype=torch.float64, device=DEVICE)

    def ours(**kw):
        return moelora.molora_linear(**kw, scaling=scaling, backend=backend)

    def ref(**kw):
        return molora_linear_ref(**kw, scaling=scaling)

    out, grads = _run(ours, low, grad_out, grad_names)
    ref_out, ref_grads = _run(ref, exact, grad_out, grad_names)
    tl_out, tl_grads = _run(ref, torch_low, grad_out, grad_names)

    assert out.dtype == dtype and out.shape == ref_out.shape
    err, limit = rel_error(out, ref_out), bound(dtype, rel_error(tl_out, ref_out))
    assert err <= limit, f"output: rel error {err:.3g} > {limit:.3g}"
    for name in grad_names:
        g = grads[name]
        assert g.dtype == low[name].dtype and g.shape == low[name].shape, name
        err = rel_error(g, ref_grads[name])
        limit = bound(dtype, rel_error(tl_grads[name], ref_grads[name]))
        assert err <= limit, f"grad of {name}: rel error {err:.3g} > {limit:.3g}"


@pytest.mark.parametrize("dtypes", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, shape, dtypes):
    check_against_reference(backend, _problem(*shape), *dtypes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_agrees_tightly(backend):
    if backend not in moelora.available_backends(DEVICE, torch.float64):
        pytest.skip(f"{backend} has no float64 path")
    check_against_reference(backend, _problem(17, 33, 21, 5, 3, 2, "topk"), torch.float64, torch.float64)


@pytest.mark.parametrize("k,routing", [(2, "topk"), (1, "tenant")])  # token-major / grouped expand
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_rank(backend, k, routing):
    check_against_reference(backend, _problem(5, 16, 20, 2, 256, k, routing), torch.float32, torch.float32)


@pytest.mark.parametrize("routing", ["topk", "duplicates"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_k_up_to_num_experts(backend, k, routing):
    check_against_reference(backend, _problem(9, 10, 11, 5, 3, k, routing), torch.float32, torch.float32)


@pytest.mark.parametrize("shape", [(17, 33, 21, 5, 3, 2, "topk"), (33, 20, 24, 4, 5, 1, "tenant")],
                         ids=_shape_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_activations_with_half_adapters_keep_fp32_math(backend, shape, monkeypatch):
    """fp32 x with fp16 adapters: fp32 outputs and dx carry no 16-bit rounding of h or u.

    The bound is the torch backend's error on the same (already rounded) inputs, not the loose
    all-fp32 reference of check_against_reference, which includes the adapters' own rounding.
    """
    p = _problem(*shape)
    low = _cast(p, torch.float32, torch.float16)
    exact = {n: (t.double() if t is not None and t.is_floating_point() else t) for n, t in low.items()}
    grad_out = torch.randn(shape[0], shape[2], dtype=torch.float64, device=DEVICE)

    def run(backend_name):
        return lambda **kw: moelora.molora_linear(**kw, scaling=0.5, backend=backend_name)

    out, grads = _run(run(backend), low, grad_out, DIFF_ARGS)
    t_out, t_grads = _run(run("torch"), low, grad_out, DIFF_ARGS)
    r_out, r_grads = _run(lambda **kw: molora_linear_ref(**kw, scaling=0.5), exact, grad_out, DIFF_ARGS)
    pairs = [("output", out, t_out, r_out)] + [(n, grads[n], t_grads[n], r_grads[n]) for n in DIFF_ARGS]
    for name, ours, theirs, ref in pairs:
        err, limit = rel_error(ours, ref), bound(torch.float32, rel_error(theirs, ref))
        assert err <= limit, f"{name}: rel error {err:.3g} > {limit:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_base_weight_and_bias(backend):
    check_against_reference(
        backend, _problem(17, 33, 21, 5, 3, 2, "topk"), torch.float32, torch.float32,
        grad_names=DIFF_ARGS + ("weight", "bias"),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_adapters_skip_their_gradients(backend, monkeypatch):
    # HoE router training: experts frozen, router (gates) and x train. The backward must not
    # spend the two weight-gradient passes on A and B, and the other gradients stay exact.
    from moelora.ops.molora_linear.op import BACKENDS as OP

    flags = []
    impl = OP.impl(backend)
    real = impl.backward

    def spy(*args):
        flags.append(args[-1])  # compute_grad_adapters
        out = real(*args)
        assert out[1].numel() == 0 and out[2].numel() == 0  # no adapter gradients computed
        return out

    monkeypatch.setattr(impl, "backward", spy)
    check_against_reference(backend, _problem(17, 33, 21, 5, 3, 2, "topk"), torch.float32,
                            torch.float32, grad_names=("x", "expert_weights"))
    # The compiled backends' eager calls run their autograd in C++ (molora_linear_native),
    # past this spy: tests/ops/test_native_backend.py checks their flag.
    assert flags == ([] if backend in ("cpu", "cuda") else [False])


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_no_bias_and_int32_ids(backend):
    problem = _problem(12, 9, 7, 4, 2, 2, "topk", bias=False, lead=(3, 4))
    problem["expert_indices"] = problem["expert_indices"].to(torch.int32)
    check_against_reference(backend, problem, torch.float32, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    p = _problem(10, 12, 14, 3, 4, 2, "duplicates")
    p["x"] = torch.randn(12, 10, dtype=torch.float64, device=DEVICE).t()  # strided view
    p["lora_a"] = p["lora_a"].transpose(1, 2).contiguous().transpose(1, 2)
    p["expert_indices"] = p["expert_indices"].t().contiguous().t()
    assert not p["x"].is_contiguous() and not p["lora_a"].is_contiguous()
    check_against_reference(backend, p, torch.float32, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend):
    p = _cast(_problem(0, 8, 6, 3, 2, 2, "topk"), torch.float32, torch.float32)
    x = p.pop("x").requires_grad_()
    y = moelora.molora_linear(x, **p, backend=backend)
    assert y.shape == (0, 6)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    assert gx.shape == (0, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_lora_b_is_identity(backend):
    """A fresh PEFT adapter (B = 0) leaves the base layer's output unchanged."""
    p = _cast(_problem(9, 8, 6, 3, 2, 2, "topk"), torch.float32, torch.float32)
    p["lora_b"] = torch.zeros_like(p["lora_b"])
    y = moelora.molora_linear(**p, scaling=2.0, backend=backend)
    torch.testing.assert_close(y, torch.nn.functional.linear(p["x"], p["weight"], p["bias"]))


# --------------------------------------------------------------------------------------------
# registered ops: opcheck, torch.compile, CUDA graphs
# --------------------------------------------------------------------------------------------
def _op_args(backend, dtype=torch.float32):
    p = _cast(_problem(17, 20, 12, 4, 3, 2, "topk"), dtype, dtype)
    T, k = p["expert_indices"].shape
    return (
        p["x"], p["weight"], p["bias"], p["lora_a"], p["lora_b"],
        p["expert_indices"].long(), p["expert_weights"].float(), 0.5, backend,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_forward(backend):
    args = _op_args(backend)
    for i in (0, 3, 4, 6):
        args[i].requires_grad_()
    torch.library.opcheck(torch.ops.moelora.molora_linear_fwd.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward(backend):
    x, w, b, a, bb, idx, g, s, name = _op_args(backend)
    _, h, state = torch.ops.moelora.molora_linear_fwd(x, w, b, a, bb, idx, g, s, name)
    dy = torch.randn(x.shape[0], w.shape[0], device=DEVICE)
    for compute_grad_x, compute_grad_adapters in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(
            torch.ops.moelora.molora_linear_bwd.default,
            (dy, x, w, a, bb, idx, g, h, state, s, name, compute_grad_x, compute_grad_adapters),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    p = _cast(_problem(17, 20, 12, 4, 3, 2, "topk"), torch.float32, torch.float32)
    a = p["lora_a"].requires_grad_()

    def step(x, lora_a):
        y = moelora.molora_linear(x, p["weight"], p["bias"], lora_a, p["lora_b"],
                                  p["expert_indices"], p["expert_weights"], 0.5, backend=backend)
        return y.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(p["x"], a)
    (grad,) = torch.autograd.grad(loss, [a])
    ref_loss = step(p["x"], a)
    (ref_grad,) = torch.autograd.grad(ref_loss, [a])
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_torch_compile_inductor():
    """Inductor (not only graph capture) accepts the op and its fake implementations."""
    p = _cast(_problem(9, 8, 6, 3, 2, 2, "topk"), torch.float32, torch.float32)
    fn = torch.compile(lambda **kw: moelora.molora_linear(**kw, backend="torch") * 2, fullgraph=True)
    torch.testing.assert_close(fn(**p), 2 * moelora.molora_linear(**p, backend="torch"))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [16, 100])  # cuda backend: one-launch decode path, grouped path
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture(backend, T):
    """Every GPU backend replays from a CUDA graph (no host sync, no allocation outside the
    graph's pool), and reads the routing on the device at replay: new x, ids and gates written
    into the static inputs give the eager result on them."""
    p = _cast(_problem(T, 64, 64, 8, 16, 2, "topk"), torch.bfloat16, torch.bfloat16)

    def run():
        return moelora.molora_linear(**p, backend=backend)

    side = torch.cuda.Stream()  # warm-up off the capture stream: JIT, module loads, workspaces
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph):
            static_out = run()
    finally:  # a failed capture_end leaves the capture stream current for the next tests
        torch.cuda.set_stream(current)
    ids, gates = make_routing("topk", T, 8, 2, DEVICE)
    p["x"].copy_(torch.randn_like(p["x"]))
    p["expert_indices"].copy_(ids)
    p["expert_weights"].copy_(gates)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, run())


_BAD_IDS_ON_GPU = """
import sys, torch, moelora
x = torch.randn(8, 16, device="cuda")
w = torch.randn(16, 16, device="cuda")
a, b = torch.randn(3, 4, 16, device="cuda"), torch.randn(3, 16, 4, device="cuda")
ids = torch.zeros(8, 2, dtype=torch.long, device="cuda")
ids[5, 1] = int(sys.argv[2])
y = moelora.molora_linear(x, w, None, a, b, ids, torch.ones(8, 2, device="cuda"), backend=sys.argv[1])
torch.cuda.synchronize()
print("no error")
"""


@pytest.mark.gpu
@pytest.mark.parametrize("bad_id", [3, -2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_ids_fail_on_gpu(backend, bad_id):
    """Without MOELORA_DEBUG the id check is a device-side assert (no host sync): the process
    must die with it rather than compute with a bad id. In a subprocess: it poisons the context."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MOELORA_DEBUG="0")
    run = subprocess.run([sys.executable, "-c", _BAD_IDS_ON_GPU, backend, str(bad_id)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "no error" not in run.stdout, run.stdout + run.stderr
    assert "assert" in run.stderr.lower(), run.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_model_sized(backend):
    """Real model dims on the GPU: 4096 hidden, top-2 of 8, r = 16."""
    check_against_reference(backend, _problem(1027, 4096, 4096, 8, 16, 2, "topk"),
                            torch.bfloat16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# validation: a clear error naming the argument, raised before any kernel runs
# --------------------------------------------------------------------------------------------
def _valid_kwargs():
    return _cast(_problem(5, 8, 6, 3, 2, 2, "topk"), torch.float32, torch.float32)


BAD_INPUTS = [
    ("x", lambda p: p["x"][:, :7], ValueError, "d_in"),
    ("x", lambda p: p["x"].long(), TypeError, "floating"),
    ("weight", lambda p: p["weight"][0], ValueError, "weight must be 2-D"),
    ("weight", lambda p: p["weight"].double(), TypeError, "weight has dtype"),
    ("bias", lambda p: p["bias"][:5], ValueError, "bias has shape"),
    ("lora_a", lambda p: p["lora_a"][..., :7], ValueError, "lora_a has shape"),
    ("lora_a", lambda p: p["lora_a"].to(torch.int32), TypeError, "lora_a has dtype"),
    ("lora_b", lambda p: p["lora_b"][:, :, :1], ValueError, "lora_b has shape"),
    ("lora_b", lambda p: p["lora_b"].half(), TypeError, "lora_b has dtype"),
    ("expert_indices", lambda p: p["expert_indices"].float(), TypeError, "int32 or int64"),
    ("expert_indices", lambda p: p["expert_indices"][:4], ValueError, "expert_indices has shape"),
    ("expert_indices", lambda p: torch.zeros(5, 4, dtype=torch.long), ValueError, "k = 4"),
    ("expert_indices", lambda p: torch.full_like(p["expert_indices"], 3), ValueError, r"\[-1, 3\)"),
    ("expert_indices", lambda p: torch.full_like(p["expert_indices"], -2), ValueError, r"\[-1, 3\)"),
    ("expert_weights", lambda p: p["expert_weights"][:, :1], ValueError, "expert_weights has shape"),
    ("scaling", lambda p: float("nan"), ValueError, "scaling must be finite"),
    ("scaling", lambda p: float("inf"), ValueError, "scaling must be finite"),
    ("scaling", lambda p: torch.tensor(1.0), TypeError, "scaling must be a real number.*got a Tensor"),
]


@pytest.mark.parametrize("name,corrupt,exc,match", BAD_INPUTS,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_is_named(name, corrupt, exc, match):
    p = _valid_kwargs()
    p["scaling"] = 0.5
    p[name] = corrupt(p)
    with pytest.raises(exc, match=match):
        moelora.molora_linear(**p)


def test_device_mismatch_is_named():
    p = _valid_kwargs()
    p["lora_b"] = p["lora_b"].to("meta")
    with pytest.raises(ValueError, match="lora_b is on meta"):
        moelora.molora_linear(**p)


def test_unknown_or_unavailable_backend():
    p = _valid_kwargs()
    with pytest.raises(ValueError, match="backend must be one of"):
        moelora.molora_linear(**p, backend="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' cannot run molora_linear"):
            moelora.molora_linear(**p, backend="cuda")


def test_auto_never_picks_the_interpreter(monkeypatch):
    """CPU tensors go to the compiled kernels or torch, even with the interpreter on; the
    interpreter runs only when named."""
    from moelora.ops.molora_linear.op import BACKENDS as OP

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("MOELORA_BACKEND", raising=False)
    assert OP.resolve("auto", torch.device("cpu"), (torch.float32,)) in ("cpu", "torch")
    if "triton" in OP.available("cpu"):
        assert OP.resolve("triton", torch.device("cpu"), (torch.float32,)) == "triton"
