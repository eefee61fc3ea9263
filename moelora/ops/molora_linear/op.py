"""The core op: routed multi-LoRA linear (docs/spec.md §1) — validation, the registered ops,
their one fake, autograd, and the public functional.

    y_t = W x_t + b + s * sum_{j<k} g[t,j] * B_{e[t,j]} A_{e[t,j]} x_t      (e = -1: no expert)

Bottom up: the backends (`torch_backend.py`, `triton_backend.py`, the compiled `cpu` / `cuda`
kernels of csrc/, all with the contract written in `torch_backend.py`); input validation; the
registered ops `moelora::molora_linear_fwd` / `moelora::molora_linear_bwd`, which dispatch to
the backend named by their `backend` argument; the public functional `molora_linear`. The
ground truth is `reference.molora_linear_ref`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from moelora.ops import dispatch, extension
from moelora.ops.checks import as_number, check_range
from moelora.ops.dtypes import accumulate_dtype
from moelora.ops.molora_linear.torch_backend import no_state

__all__ = ["molora_linear", "BACKENDS", "available_backends"]

_ADAPTER_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_NATIVE_FWD, _NATIVE_BWD = "molora_linear_native_fwd", "molora_linear_native_bwd"

BACKENDS = dispatch.register(dispatch.OpDispatch("molora_linear", [
    dispatch.torch_backend("moelora.ops.molora_linear.torch_backend"),
    dispatch.triton_backend("moelora.ops.molora_linear.triton_backend"),
    dispatch.native_backend("cpu", _NATIVE_FWD, _NATIVE_BWD, no_state),
    dispatch.native_backend("cuda", _NATIVE_FWD, _NATIVE_BWD, no_state),
]))


def available_backends(device: torch.device | str, dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that can run the core op on this device for activations and adapters of `dtype`."""
    return BACKENDS.available(torch.device(device), (dtype,))


# --------------------------------------------------------------------------------------------
# validation: every check names the argument and what was expected, before any kernel runs
# --------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_same_device(device: torch.device, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device} (the device of x)")


def _validate(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling):
    """Checks every argument; returns ``scaling`` as the float the op takes."""
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., d_in], got a scalar")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    _check_tensor("weight", weight, 2)
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x has last dim {x.shape[-1]}, expected d_in = {d_in} (weight.shape[1])")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype}, expected x's dtype {x.dtype}")
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if bias.shape[0] != d_out:
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected [{d_out}] (d_out)")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype}, expected x's dtype {x.dtype}")
    _check_tensor("lora_a", lora_a, 3)
    _check_tensor("lora_b", lora_b, 3)
    E, r, a_d_in = lora_a.shape
    if E < 1 or r < 1:
        raise ValueError(f"lora_a must be [E, r, d_in] with E >= 1 and r >= 1, got {tuple(lora_a.shape)}")
    if a_d_in != d_in:
        raise ValueError(f"lora_a has shape {tuple(lora_a.shape)}, expected [E, r, {d_in}] (d_in)")
    if tuple(lora_b.shape) != (E, d_out, r):
        raise ValueError(f"lora_b has shape {tuple(lora_b.shape)}, expected [{E}, {d_out}, {r}] ([E, d_out, r])")
    if lora_a.dtype not in _ADAPTER_DTYPES:
        raise TypeError(f"lora_a has dtype {lora_a.dtype}, expected one of {_ADAPTER_DTYPES}")
    if lora_b.dtype != lora_a.dtype:
        raise TypeError(f"lora_b has dtype {lora_b.dtype}, expected lora_a's dtype {lora_a.dtype}")
    _check_tensor("expert_indices", expert_indices)
    if expert_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"expert_indices must be int32 or int64, got {expert_indices.dtype}")
    if expert_indices.dim() != x.dim() or expert_indices.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"expert_indices has shape {tuple(expert_indices.shape)}, expected "
            f"{tuple(x.shape[:-1])} + (k,) (x's leading dims, then k)"
        )
    k = expert_indices.shape[-1]
    if not 1 <= k <= E:
        raise ValueError(f"expert_indices has k = {k} slots per token, expected 1 <= k <= E = {E}")
    _check_tensor("expert_weights", expert_weights)
    if expert_weights.shape != expert_indices.shape:
        raise ValueError(
            f"expert_weights has shape {tuple(expert_weights.shape)}, expected "
            f"{tuple(expert_indices.shape)} (the shape of expert_indices)"
        )
    if not expert_weights.is_floating_point():
        raise TypeError(f"expert_weights must be floating-point, got {expert_weights.dtype}")
    _check_same_device(
        x.device, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b,
        expert_indices=expert_indices, expert_weights=expert_weights,
    )
    # A tensor scaling is refused: reading its value would cost a host sync per call on a GPU,
    # and the op's schema takes a number.
    return as_number(scaling, "scaling", integral=False)


# Signatures (type, shape, dtype, device of every tensor argument) that passed _validate: its
# verdict depends on nothing else but scaling, which is checked per call. A decode step's
# validation cost ~25 us of Python, a sixth of the step; the set is bounded (cleared when full).
_VALID_SIGNATURES: set = set()
_MAX_SIGNATURES = 4096


def _signature(tensors) -> tuple:
    return tuple(None if t is None else (type(t), t.shape, t.dtype, t.device) for t in tensors)


def _validated(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling):
    """_validate, run once per signature in eager mode (always while compiling: dynamo traces
    the checks, not a cache)."""
    tensors = (x, weight, bias, lora_a, lora_b, expert_indices, expert_weights)
    if torch.compiler.is_compiling() or not all(t is None or isinstance(t, Tensor) for t in tensors):
        return _validate(*tensors, scaling)
    key = _signature(tensors)
    if key in _VALID_SIGNATURES:
        if type(scaling) is float and math.isfinite(scaling):
            return scaling
        return as_number(scaling, "scaling", integral=False)
    scaling = _validate(*tensors, scaling)
    if len(_VALID_SIGNATURES) >= _MAX_SIGNATURES:
        _VALID_SIGNATURES.clear()
    _VALID_SIGNATURES.add(key)
    return scaling


def _check_expert_range(expert_indices: Tensor, num_experts: int, backend: str) -> None:
    """A backend whose kernels assert on the ids themselves (CHECKS_IDS) needs no launch of its
    own for the check on a GPU; on CPU tensors every backend gets the named ValueError, the
    native cpu kernels raise it themselves (the same message, in their one pass over the ids,
    before any kernel runs)."""
    if expert_indices.device.type != "cpu" and getattr(BACKENDS.impl(backend), "CHECKS_IDS", False):
        return
    if backend == "cpu":
        return
    check_range(expert_indices, -1, num_experts, name="expert_indices",
                expected=f"lie in [-1, {num_experts}) (E = {num_experts}, -1 = no expert)")


# --------------------------------------------------------------------------------------------
# registered ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("moelora::molora_linear_fwd", mutates_args=())
def _molora_linear_fwd(
    x: Tensor,  # [T, d_in]
    weight: Tensor,  # [d_out, d_in]
    bias: Optional[Tensor],  # [d_out]
    lora_a: Tensor,  # [E, r, d_in]
    lora_b: Tensor,  # [E, d_out, r]
    expert_indices: Tensor,  # [T, k] int64
    expert_weights: Tensor,  # [T, k] accumulate dtype (float32, or float64)
    scaling: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    # y [T, d_out], h [T, k, r] accumulate dtype, state: what the backend's backward reuses
    return BACKENDS.impl(backend).forward(
        x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling
    )


def _fake_forward(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling):
    """Shapes of a forward's y and h, for this op and the native one."""
    T, k = expert_indices.shape
    y = x.new_empty(T, weight.shape[0])
    h = x.new_empty(T, k, lora_a.shape[1], dtype=expert_weights.dtype)
    return y, h


@_molora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling, backend):
    y, h = _fake_forward(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling)
    state = BACKENDS.impl(backend).state_like(x, lora_a, expert_indices)
    return y, h, state


@torch.library.custom_op("moelora::molora_linear_bwd", mutates_args=())
def _molora_linear_bwd(
    grad_out: Tensor,  # [T, d_out]
    x: Tensor,  # [T, d_in]
    weight: Tensor,  # [d_out, d_in]
    lora_a: Tensor,  # [E, r, d_in]
    lora_b: Tensor,  # [E, d_out, r]
    expert_indices: Tensor,  # [T, k] int64
    expert_weights: Tensor,  # [T, k] accumulate dtype
    h: Tensor,  # [T, k, r] accumulate dtype, saved by the forward
    state: Tensor,  # the forward's state (e.g. its routing plan), backend-private
    scaling: float,
    backend: str,
    compute_grad_x: bool,
    compute_grad_adapters: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # grad_x, grad_lora_a, grad_lora_b, grad_weights
    # grad_x is [0] when not compute_grad_x, grad_lora_a / grad_lora_b when not compute_grad_adapters
    return BACKENDS.impl(backend).backward(
        grad_out, x, weight, lora_a, lora_b, expert_indices, expert_weights, h, state, scaling,
        compute_grad_x, compute_grad_adapters,
    )


def _fake_backward(grad_out, x, weight, lora_a, lora_b, expert_indices, expert_weights, h,
                   scaling, compute_grad_x, compute_grad_adapters):
    """Shapes of a backward's gradients, for this op and the native one."""
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if compute_grad_x else x.new_empty(0),
        torch.empty_like(lora_a) if compute_grad_adapters else lora_a.new_empty(0),
        torch.empty_like(lora_b) if compute_grad_adapters else lora_b.new_empty(0),
        torch.empty_like(expert_weights),
    )


@_molora_linear_bwd.register_fake
def _(grad_out, x, weight, lora_a, lora_b, expert_indices, expert_weights, h, state, scaling,
      backend, compute_grad_x, compute_grad_adapters):
    return _fake_backward(grad_out, x, weight, lora_a, lora_b, expert_indices, expert_weights, h,
                          scaling, compute_grad_x, compute_grad_adapters)


extension.register_fake(_NATIVE_FWD, _fake_forward)
extension.register_fake(_NATIVE_BWD, _fake_backward)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling, backend = inputs
    _, h, state = output
    ctx.mark_non_differentiable(h, state)
    ctx.save_for_backward(x, weight, lora_a, lora_b, expert_indices, expert_weights, h, state)
    ctx.scaling = scaling
    ctx.backend = backend


def _backward(ctx, grad_y, _grad_h, _grad_state):
    x, weight, lora_a, lora_b, expert_indices, expert_weights, h, state = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_y = grad_y.contiguous()
    grad_x, grad_a, grad_b, grad_g = torch.ops.moelora.molora_linear_bwd(
        grad_y, x, weight, lora_a, lora_b, expert_indices, expert_weights, h, state, ctx.scaling,
        ctx.backend, needs[0], needs[3] or needs[4],
    )
    # The base weight is frozen in the common case; when it trains, its gradients are plain
    # cuBLAS work that gains nothing from fusion.
    grad_w = grad_y.t().mm(x) if needs[1] else None
    grad_bias = grad_y.sum(0) if needs[2] else None
    return (
        grad_x if needs[0] else None, grad_w, grad_bias,
        grad_a if needs[3] else None, grad_b if needs[4] else None,
        None, grad_g if needs[6] else None, None, None,
    )


_molora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


_NATIVE = "molora_linear_native"  # y alone, autograd in C++ (csrc/molora_linear/autograd.cpp)


def _fake_native(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling):
    return x.new_empty(expert_indices.shape[0], weight.shape[0])


extension.register_fake(_NATIVE, _fake_native)


def _eager_native(backend: str, tensors) -> bool:
    """Eager calls of the compiled kernels on plain tensors take the C++-autograd op: the
    custom op's Python dispatch layers cost ~50-120 us a call, as much as a decode step's
    whole LoRA work. torch.compile, tensor subclasses (DTensor, functorch wrappers) and fake
    tensors keep the registered custom op, whose fake and autograd the compiler traces."""
    return (
        backend in _NATIVE_BACKENDS
        and not torch.compiler.is_compiling()
        and all(t is None or type(t) is Tensor for t in tensors)
    )


_NATIVE_BACKENDS = ("cpu", "cuda")


# --------------------------------------------------------------------------------------------
# public functional
# --------------------------------------------------------------------------------------------
def molora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    expert_indices: Tensor,
    expert_weights: Tensor,
    scaling: float = 1.0,
    *,
    backend: str = "auto",
) -> Tensor:
    """Routed multi-LoRA linear: ``W x + b + scaling * sum_j g_j B_{e_j} A_{e_j} x``.

    Args:
        x: ``[..., d_in]`` activations (float32, bfloat16 or float16).
        weight: ``[d_out, d_in]`` frozen base weight, dtype of ``x``.
        bias: ``[d_out]`` or None.
        lora_a: ``[E, r, d_in]`` expert down-projections (float32 / bfloat16 / float16).
        lora_b: ``[E, d_out, r]`` expert up-projections, dtype of ``lora_a``.
        expert_indices: ``[..., k]`` int32/int64 expert ids per token; ``-1`` = no expert.
        expert_weights: ``[..., k]`` gate weights.
        scaling: LoRA scaling ``s`` (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA).
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``.

    Returns:
        ``[..., d_out]`` in ``x``'s dtype. Differentiable w.r.t. x, lora_a, lora_b,
        expert_weights, and weight / bias when they require grad.
    """
    scaling = _validated(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling)
    requested, dtypes = backend, (x.dtype, lora_a.dtype)
    backend = BACKENDS.resolve(backend, x.device, dtypes)
    _check_expert_range(expert_indices, lora_a.shape[0], backend)
    lead = x.shape[:-1]
    d_in = x.shape[-1]
    d_out = weight.shape[0]
    k = expert_indices.shape[-1]
    # reshape is a dispatcher call even when it changes nothing (~1 us each at decode sizes)
    x2 = x if x.dim() == 2 else x.reshape(-1, d_in)
    if x2.shape[0] == 0:
        # Nothing to route, but the op stays in the autograd graph (zero gradients for the
        # adapters and gates: under DDP a rank with an empty batch must still produce them).
        # The torch backend serves it: every kernel of the others assumes at least one row.
        backend = "torch"
    ids = expert_indices if expert_indices.dim() == 2 else expert_indices.reshape(-1, k)
    gates = expert_weights if expert_weights.dim() == 2 else expert_weights.reshape(-1, k)
    acc = accumulate_dtype(x.dtype, lora_a.dtype)
    args = (
        x2.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        lora_a.contiguous(),
        lora_b.contiguous(),
        (ids if ids.dtype == torch.int64 else ids.to(torch.int64)).contiguous(),
        (gates if gates.dtype == acc else gates.to(acc)).contiguous(),
        scaling,
    )
    if _eager_native(backend, args[:7]):
        y = torch.ops.moelora.molora_linear_native(*args)
        return y if len(lead) == 1 else y.reshape(*lead, d_out)
    try:
        y, _, _ = torch.ops.moelora.molora_linear_fwd(*args, backend)
    except Exception as exc:
        # A Triton compile fault under "auto" reruns on the next backend; anything else
        # (and any explicitly requested backend) re-raises inside fall_back.
        backend = BACKENDS.fall_back(requested, backend, exc, x.device, dtypes)
        _check_expert_range(expert_indices, lora_a.shape[0], backend)
        y, _, _ = torch.ops.moelora.molora_linear_fwd(*args, backend)
    return y.reshape(*lead, d_out)
