"""Routing (docs/spec.md §2): softmax + top-k + optional renormalisation, as one registered op.

    probs = softmax(logits); e, g = top-k(probs); g /= sum(g) if renormalize
    (with an empty expert, the last column of logits is that expert and its id is -1)

Differentiable through both the gates and `probs` (the auxiliary losses use probs). The
backward is a few elementwise ops on [T, E'] and needs no kernel of its own. Backends: torch
(the reference in fp32), triton (one pass over the logits), and cpu, which is the torch
implementation (the compiled extension has no routing kernel: torch's softmax / topk are it).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moelora.ops import dispatch
from moelora.ops.checks import as_number
from moelora.ops.dtypes import accumulate_dtype

__all__ = ["topk_route", "BACKENDS"]

_TORCH = dispatch.torch_backend("moelora.ops.routing.torch_backend")
BACKENDS = dispatch.register(dispatch.OpDispatch("topk_route", [
    _TORCH,
    dispatch.triton_backend("moelora.ops.routing.triton_backend"),
    dispatch.on_device(_TORCH, "cpu", "cpu"),
]))


@torch.library.custom_op("moelora::topk_route", mutates_args=())
def _topk_route_op(
    logits: Tensor,  # [T, E']
    k: int,
    renormalize: bool,
    empty_expert: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:  # probs [T, E'], ids [T, k] int64, gates [T, k]
    return BACKENDS.impl(backend).topk_route(logits, k, renormalize, empty_expert)


@_topk_route_op.register_fake
def _(logits, k, renormalize, empty_expert, backend):
    T, num_columns = logits.shape
    acc = accumulate_dtype(logits.dtype)
    return (
        logits.new_empty(T, num_columns, dtype=acc),
        logits.new_empty(T, k, dtype=torch.int64),
        logits.new_empty(T, k, dtype=acc),
    )


def _setup_context(ctx, inputs, output):
    logits, k, renormalize, empty_expert, backend = inputs
    probs, indices, weights = output
    ctx.mark_non_differentiable(indices)
    ctx.save_for_backward(probs, indices, weights)
    ctx.renormalize = renormalize
    ctx.logits_dtype = logits.dtype


def _backward(ctx, grad_probs: Optional[Tensor], _grad_indices, grad_weights: Optional[Tensor]):
    probs, indices, weights = ctx.saved_tensors
    num_columns = probs.shape[-1]
    grad_p = torch.zeros_like(probs) if grad_probs is None else grad_probs.to(probs.dtype)
    if grad_weights is not None:
        # A live -1 came from the last column (the empty expert). A slot with id -1 and gate 0
        # is masked (its expert's logit was -inf) or an empty expert of probability 0: its gate
        # is the constant 0, and its column (unknown for a masked slot) gets nothing from it.
        live = (indices >= 0) | (weights != 0)
        columns = torch.where(indices < 0, num_columns - 1, indices)
        grad_w = torch.where(live, grad_weights.to(probs.dtype), 0.0)
        if ctx.renormalize:
            # g_j = p_j / S: dL/dp_j = (dL/dg_j - sum_i dL/dg_i g_i) / S; S = 0 only in a fully
            # masked row, whose probs are 0 and which has no gradient.
            total = torch.where(live, probs.gather(1, columns), 0.0).sum(-1, keepdim=True)
            grad_selected = (grad_w - (grad_w * weights).sum(-1, keepdim=True)) / torch.where(
                total == 0, 1.0, total)
            grad_selected = torch.where(live, grad_selected, 0.0)
        else:
            grad_selected = grad_w
        grad_p = grad_p.scatter_add(1, columns, grad_selected)
    grad_logits = probs * (grad_p - (probs * grad_p).sum(-1, keepdim=True))  # softmax backward
    return grad_logits.to(ctx.logits_dtype), None, None, None, None


_topk_route_op.register_autograd(_backward, setup_context=_setup_context)


def topk_route(
    logits: Tensor,
    k: int,
    *,
    renormalize: bool = True,
    empty_expert: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax + top-k routing in one op.

    Args:
        logits: ``[..., E']`` router logits.
        k: experts per token, ``1 <= k <= E'``.
        renormalize: divide the k gates by their sum.
        empty_expert: the last column is PMoL's empty expert: it takes probability mass like any
            other expert, but its id is ``-1`` (no compute in ``molora_linear``).
        backend: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"torch"`` (see moelora.ops.dispatch).

    Returns:
        ``probs [..., E']``, ``expert_indices [..., k]`` (int64), ``expert_weights [..., k]``;
        probs and weights in float32 (float64 for float64 logits), differentiable.

    Degenerate logits, on every backend (``reference.topk_route_ref`` states the policy):
    ``-inf`` masks an expert (never routed to; a slot that would take one is id -1, gate 0, so
    a fully masked row routes to no expert, never to NaN gates); ``+inf`` columns share the
    row's mass (softmax's limit); NaN in a row gives that row NaN probs and gates.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() < 1 or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor [..., E'], got {logits.dtype} "
                        f"of shape {tuple(logits.shape)}")
    num_columns = logits.shape[-1]
    k = as_number(k, "k", integral=True)
    if not 1 <= k <= num_columns:
        raise ValueError(f"k must be an int with 1 <= k <= E' = {num_columns}, got {k!r}")
    if empty_expert and num_columns < 2:
        raise ValueError("empty_expert=True needs at least 2 logit columns (experts + the empty one)")
    requested = backend
    backend = BACKENDS.resolve(backend, logits.device, (logits.dtype,))
    lead = logits.shape[:-1]
    if logits.numel() == 0:
        backend = "torch"  # no rows: nothing to launch
    args = (logits.reshape(-1, num_columns).contiguous(), k, renormalize, empty_expert)
    try:
        probs, indices, weights = torch.ops.moelora.topk_route(*args, backend)
    except Exception as exc:  # a Triton compile fault under "auto": see dispatch.fall_back
        backend = BACKENDS.fall_back(requested, backend, exc, logits.device, (logits.dtype,))
        probs, indices, weights = torch.ops.moelora.topk_route(*args, backend)
    return probs.reshape(*lead, num_columns), indices.reshape(*lead, k), weights.reshape(*lead, k)
