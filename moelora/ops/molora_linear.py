"""The core op: routed multi-LoRA linear (spec §1).

    y_t = W x_t + b + s * sum_{j<k} g[t,j] * B_{e[t,j]} A_{e[t,j]} x_t      (e = -1: no expert)

Layers of this file, bottom up: input validation; the two registered ops
`moelora::molora_linear_fwd` / `moelora::molora_linear_bwd` (fake implementations, autograd
registration), which dispatch to a backend from `backends.py`; the public functional
`molora_linear`. The reference is `moelora.reference.molora_linear_ref`.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from moelora.ops.backends import BACKENDS, accumulate_dtype, resolve_backend, triton_kernels

__all__ = ["molora_linear"]

_ADAPTER_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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


def _validate(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling) -> None:
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
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python float, got {type(scaling).__name__}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling}")
    _check_same_device(
        x.device, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b,
        expert_indices=expert_indices, expert_weights=expert_weights,
    )
    _check_expert_range(expert_indices, E)


def _check_expert_range(expert_indices: Tensor, num_experts: int) -> None:
    """Ids must lie in [-1, E). Always checked on CPU; on GPU a host sync would stall the
    stream, so the check is asynchronous (a device-side assert: one Triton launch, or five
    torch ones without Triton) unless MOELORA_DEBUG=1 asks for the synchronous ValueError.
    Skipped while tracing, where values are unknown."""
    if expert_indices.numel() == 0 or torch.compiler.is_compiling():
        return
    if expert_indices.device.type == "cpu" or os.environ.get("MOELORA_DEBUG", "0") == "1":
        lo, hi = int(expert_indices.min()), int(expert_indices.max())
        if lo < -1 or hi >= num_experts:
            raise ValueError(
                f"expert_indices must lie in [-1, {num_experts}) (E = {num_experts}, -1 = no "
                f"expert), got values in [{lo}, {hi}]"
            )
    elif expert_indices.is_cuda and _triton_id_check(expert_indices, num_experts):
        return
    else:
        in_range = ((expert_indices >= -1) & (expert_indices < num_experts)).all()
        torch._assert_async(in_range, "moelora: expert_indices out of range [-1, E)")


_triton_id_check_failed = False


def _triton_id_check(expert_indices: Tensor, num_experts: int) -> bool:
    """The one-launch device-side check; False (and torch's check instead, warned once) where
    Triton is missing or cannot compile for this GPU."""
    global _triton_id_check_failed
    routing = None if _triton_id_check_failed else triton_kernels("routing")
    if routing is None:
        return False
    try:
        routing.assert_ids_in_range(expert_indices, num_experts)
        return True
    except Exception as exc:  # e.g. a GPU this Triton cannot compile for
        _triton_id_check_failed = True
        warnings.warn(f"moelora: the Triton id check failed ({type(exc).__name__}: {exc}); "
                      "checking expert ids with torch ops instead", RuntimeWarning, stacklevel=3)
        return False


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
) -> tuple[Tensor, Tensor]:  # y [T, d_out], h [T, k, r] accumulate dtype
    return BACKENDS[backend].forward(
        x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling
    )


@_molora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling, backend):
    T, k = expert_indices.shape
    y = x.new_empty(T, weight.shape[0])
    h = x.new_empty(T, k, lora_a.shape[1], dtype=expert_weights.dtype)
    return y, h


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
    scaling: float,
    backend: str,
    compute_grad_x: bool,
    compute_grad_adapters: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # grad_x, grad_lora_a, grad_lora_b, grad_weights
    # grad_x is [0] when not compute_grad_x, grad_lora_a / grad_lora_b when not compute_grad_adapters
    return BACKENDS[backend].backward(
        grad_out, x, weight, lora_a, lora_b, expert_indices, expert_weights, h, scaling,
        compute_grad_x, compute_grad_adapters,
    )


@_molora_linear_bwd.register_fake
def _(grad_out, x, weight, lora_a, lora_b, expert_indices, expert_weights, h, scaling, backend,
      compute_grad_x, compute_grad_adapters):
    return (
        torch.empty_like(x) if compute_grad_x else x.new_empty(0),
        torch.empty_like(lora_a) if compute_grad_adapters else lora_a.new_empty(0),
        torch.empty_like(lora_b) if compute_grad_adapters else lora_b.new_empty(0),
        torch.empty_like(expert_weights),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling, backend = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    ctx.save_for_backward(x, weight, lora_a, lora_b, expert_indices, expert_weights, h)
    ctx.scaling = scaling
    ctx.backend = backend


def _backward(ctx, grad_y, _grad_h):
    x, weight, lora_a, lora_b, expert_indices, expert_weights, h = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_y = grad_y.contiguous()
    grad_x, grad_a, grad_b, grad_g = torch.ops.moelora.molora_linear_bwd(
        grad_y, x, weight, lora_a, lora_b, expert_indices, expert_weights, h, ctx.scaling,
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
    _validate(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling)
    backend = resolve_backend(backend, x.device, (x.dtype, lora_a.dtype))
    lead = x.shape[:-1]
    d_in = x.shape[-1]
    d_out = weight.shape[0]
    k = expert_indices.shape[-1]
    x2 = x.reshape(-1, d_in)
    if x2.shape[0] == 0:  # nothing to route; keep the autograd graph to x / weight / bias
        return torch.nn.functional.linear(x, weight, bias)
    y, _ = torch.ops.moelora.molora_linear_fwd(
        x2.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        lora_a.contiguous(),
        lora_b.contiguous(),
        expert_indices.reshape(-1, k).to(torch.int64).contiguous(),
        expert_weights.reshape(-1, k).to(accumulate_dtype(x.dtype, lora_a.dtype)).contiguous(),
        float(scaling),
        backend,
    )
    return y.reshape(*lead, d_out)
