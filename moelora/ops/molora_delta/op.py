"""The routed LoRA delta (docs/spec.md §1 without the base term) — validation, the registered
ops, their fake, autograd, and the public functional.

    delta_t = s * sum_{j<k} g[t,j] * B_{e[t,j]} A_{e[t,j]} x_t          (e = -1: no expert)

For a base layer that computes its own output (bitsandbytes / torchao quantized linears, GPT-2's
Conv1D): ``y = base_layer(x) + molora_delta(x, ...)``, dx through the base layer's own autograd
plus this op's. A plain nn.Linear keeps the fused ``molora_linear``. The delta's backends are the
core op's, run with a zero base (torch_backend.py), resolved by the same rule under the op name
``molora_delta``. Ground truth: ``reference.molora_delta_ref``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from moelora.ops import dispatch
from moelora.ops.dtypes import accumulate_dtype
from moelora.ops.molora_delta.torch_backend import ZeroBase
from moelora.ops.molora_delta.reference import molora_delta_ref
from moelora.ops.molora_linear import op as linear_op

__all__ = ["molora_delta", "BACKENDS"]


def _zero_based(source: dispatch.Backend) -> dispatch.Backend:
    def load():
        impl = source.impl()
        if impl is None:
            raise ImportError(f"the core op's {source.name} backend failed to import ({source._error})")
        return ZeroBase(impl)

    return dispatch.Backend(source.name, load, source.check)


BACKENDS = dispatch.register(dispatch.OpDispatch(
    "molora_delta", [_zero_based(b) for b in linear_op.BACKENDS.backends.values()]))


def _validate(x, lora_a, lora_b, expert_indices, expert_weights, scaling) -> None:
    """The core op's checks, with a stand-in base of the shape the adapters imply."""
    linear_op._check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., d_in], got a scalar")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    linear_op._check_tensor("lora_b", lora_b, 3)
    base = x.new_zeros(()).expand(lora_b.shape[1], x.shape[-1])  # one element, never read
    linear_op._validate(x, base, None, lora_a, lora_b, expert_indices, expert_weights, scaling)


# --------------------------------------------------------------------------------------------
# registered ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("moelora::molora_delta_fwd", mutates_args=())
def _molora_delta_fwd(
    x: Tensor,  # [T, d_in]
    lora_a: Tensor,  # [E, r, d_in]
    lora_b: Tensor,  # [E, d_out, r]
    expert_indices: Tensor,  # [T, k] int64
    expert_weights: Tensor,  # [T, k] accumulate dtype
    scaling: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:  # delta [T, d_out] (x.dtype), h [T, k, r], state
    return BACKENDS.impl(backend).forward(x, lora_a, lora_b, expert_indices, expert_weights, scaling)


@_molora_delta_fwd.register_fake
def _(x, lora_a, lora_b, expert_indices, expert_weights, scaling, backend):
    T, k = expert_indices.shape
    y = x.new_empty(T, lora_b.shape[1])
    h = x.new_empty(T, k, lora_a.shape[1], dtype=expert_weights.dtype)
    return y, h, BACKENDS.impl(backend).state_like(x, lora_a, expert_indices)


@torch.library.custom_op("moelora::molora_delta_bwd", mutates_args=())
def _molora_delta_bwd(
    grad_out: Tensor,  # [T, d_out]
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    expert_indices: Tensor,
    expert_weights: Tensor,
    h: Tensor,
    state: Tensor,
    scaling: float,
    backend: str,
    compute_grad_x: bool,
    compute_grad_adapters: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # grad_x, grad_lora_a, grad_lora_b, grad_weights
    return BACKENDS.impl(backend).backward(grad_out, x, lora_a, lora_b, expert_indices,
                                           expert_weights, h, state, scaling, compute_grad_x,
                                           compute_grad_adapters)


@_molora_delta_bwd.register_fake
def _(grad_out, x, lora_a, lora_b, expert_indices, expert_weights, h, state, scaling, backend,
      compute_grad_x, compute_grad_adapters):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if compute_grad_x else x.new_empty(0),
        torch.empty_like(lora_a) if compute_grad_adapters else lora_a.new_empty(0),
        torch.empty_like(lora_b) if compute_grad_adapters else lora_b.new_empty(0),
        torch.empty_like(expert_weights),
    )


def _setup_context(ctx, inputs, output):
    x, lora_a, lora_b, expert_indices, expert_weights, scaling, backend = inputs
    _, h, state = output
    ctx.mark_non_differentiable(h, state)
    ctx.save_for_backward(x, lora_a, lora_b, expert_indices, expert_weights, h, state)
    ctx.scaling = scaling
    ctx.backend = backend


def _backward(ctx, grad_y, _grad_h, _grad_state):
    x, lora_a, lora_b, expert_indices, expert_weights, h, state = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x, grad_a, grad_b, grad_g = torch.ops.moelora.molora_delta_bwd(
        grad_y.contiguous(), x, lora_a, lora_b, expert_indices, expert_weights, h, state,
        ctx.scaling, ctx.backend, needs[0], needs[1] or needs[2],
    )
    return (grad_x if needs[0] else None, grad_a if needs[1] else None,
            grad_b if needs[2] else None, None, grad_g if needs[4] else None, None, None)


_molora_delta_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public functional
# --------------------------------------------------------------------------------------------
def molora_delta(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    expert_indices: Tensor,
    expert_weights: Tensor,
    scaling: float = 1.0,
    *,
    backend: str = "auto",
) -> Tensor:
    """Routed LoRA delta: ``scaling * sum_j g_j B_{e_j} A_{e_j} x`` (``molora_linear`` without
    the base term).

    Args: as ``molora_linear`` without weight and bias; ``x [..., d_in]`` floating point,
    ``lora_a [E, r, d_in]``, ``lora_b [E, d_out, r]``, ``expert_indices / expert_weights [..., k]``.

    Returns:
        ``[..., d_out]`` in ``x``'s dtype, differentiable w.r.t. x, lora_a, lora_b and
        expert_weights.
    """
    _validate(x, lora_a, lora_b, expert_indices, expert_weights, scaling)
    requested, dtypes = backend, (x.dtype, lora_a.dtype)
    backend = BACKENDS.resolve(backend, x.device, dtypes)
    # the same implementation under the same name: the core op's rule for who checks the ids
    linear_op._check_expert_range(expert_indices, lora_a.shape[0], backend)
    lead, d_in, d_out = x.shape[:-1], x.shape[-1], lora_b.shape[1]
    k = expert_indices.shape[-1]
    x2 = x.reshape(-1, d_in)
    acc = accumulate_dtype(x.dtype, lora_a.dtype)
    if x2.shape[0] == 0:  # nothing to route; the empty formula keeps x and the adapters in the graph
        return molora_delta_ref(x, lora_a.to(x.dtype), lora_b.to(x.dtype), expert_indices,
                                expert_weights.to(x.dtype), scaling)
    args = (
        x2.contiguous(), lora_a.contiguous(), lora_b.contiguous(),
        expert_indices.reshape(-1, k).to(torch.int64).contiguous(),
        expert_weights.reshape(-1, k).to(acc).contiguous(),
        float(scaling),
    )
    try:
        y, _, _ = torch.ops.moelora.molora_delta_fwd(*args, backend)
    except Exception as exc:  # a Triton compile fault under "auto": see dispatch.fall_back
        backend = BACKENDS.fall_back(requested, backend, exc, x.device, dtypes)
        linear_op._check_expert_range(expert_indices, lora_a.shape[0], backend)
        y, _, _ = torch.ops.moelora.molora_delta_fwd(*args, backend)
    return y.reshape(*lead, d_out)
