"""Per-expert head log-probs (docs/spec.md §5), the heavy op of Mix- and MoE-DPO: validation,
the registered ops, their fakes, autograd and the public functional.

    logp[t, k] = log_softmax(H_k h_t)[y_t]          (0 where y_t == ignore_index)

hidden ``h`` is ``[T, d]``, the K expert policy heads ``H`` are ``[K, V, d]`` (nn.Linear layout,
one LM head per expert), targets ``y`` are ``[T]``. Written naively this materialises
``[T, K, V]`` logits (2 GB at T = 8192, K = 4, V = 32000 in bf16, and as much again for their
gradient); both backends follow one chunked schedule (chunked.py: the logits of a chunk of rows
by cuBLAS, row-wise work by torch ops or one Triton launch) and keep only ``[T, K]`` numbers
between forward and backward: the log-sum-exp, from which the backward rebuilds the softmax
chunk by chunk.

    d logp[t, k] / d logits[t, k, :] = onehot(y_t) - softmax(H_k h_t)
    grad_hidden[t] = sum_k c[t, k] (H_k[y_t] - sum_v p[t, k, v] H_k[v])
    grad_heads[k]  = sum_t c[t, k] (onehot(y_t) - p[t, k])^T h_t       (c = upstream gradient)

Backends: torch (`torch_backend.py`), triton (`triton_backend.py`), and cpu = the torch
implementation (the compiled extension has no kernel for this op). The reference is
`reference.naive_expert_logprobs`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moelora.ops import dispatch
from moelora.ops.checks import check_range
from moelora.ops.dtypes import accumulate_dtype
from moelora.ops.expert_logprobs import chunked

__all__ = ["expert_logprobs", "BACKENDS"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_TORCH = dispatch.torch_backend("moelora.ops.expert_logprobs.torch_backend")
BACKENDS = dispatch.register(dispatch.OpDispatch("expert_logprobs", [
    _TORCH,
    dispatch.triton_backend("moelora.ops.expert_logprobs.triton_backend"),
    dispatch.on_device(_TORCH, "cpu", "cpu"),
]))


# --------------------------------------------------------------------------------------------
# validation: every check names the argument and what was expected, before any kernel runs
# --------------------------------------------------------------------------------------------
def _validate(hidden, heads, targets, ignore_index, ref_head) -> None:
    for name, t in (("hidden", hidden), ("heads", heads), ("targets", targets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() < 1:
        raise ValueError("hidden must be [..., d], got a scalar")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden has dtype {hidden.dtype}, expected one of {_FLOAT_DTYPES}")
    if heads.dim() != 3:
        raise ValueError(f"heads must be 3-D [K, V, d], got shape {tuple(heads.shape)}")
    K, V, d = heads.shape
    if K < 1 or V < 1:
        raise ValueError(f"heads must be [K, V, d] with K >= 1 and V >= 1, got {tuple(heads.shape)}")
    if d != hidden.shape[-1]:
        raise ValueError(
            f"heads has shape {tuple(heads.shape)}, expected [K, V, {hidden.shape[-1]}] "
            f"(d = hidden.shape[-1])"
        )
    if heads.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"heads has dtype {heads.dtype}, expected one of {_FLOAT_DTYPES}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets must be int32 or int64, got {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)}, expected {tuple(hidden.shape[:-1])} "
            f"(hidden's leading dims)"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be a Python int, got {type(ignore_index).__name__}")
    if ref_head is not None:
        if not isinstance(ref_head, Tensor):
            raise TypeError(f"ref_head must be a torch.Tensor or None, got {type(ref_head).__name__}")
        if ref_head.dim() != 2 or ref_head.shape[1] != d:
            raise ValueError(f"ref_head has shape {tuple(ref_head.shape)}, expected [V, {d}] ([V, d])")
        if ref_head.shape[0] != V:
            raise ValueError(
                f"ref_head has shape {tuple(ref_head.shape)}, expected [{V}, {d}] (V of heads)"
            )
        if ref_head.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"ref_head has dtype {ref_head.dtype}, expected one of {_FLOAT_DTYPES}")
    for name, t in (("heads", heads), ("targets", targets), ("ref_head", ref_head)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, expected {hidden.device} (the device of hidden)")
    _check_target_range(targets, V, ignore_index)


def _check_target_range(targets: Tensor, vocab: int, ignore_index: int) -> None:
    check_range(targets, 0, vocab, exempt=ignore_index, name="targets",
                expected=f"lie in [0, {vocab}) (V = {vocab}) or equal ignore_index = {ignore_index}")


# --------------------------------------------------------------------------------------------
# registered ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("moelora::expert_logprobs_fwd", mutates_args=())
def _expert_logprobs_fwd(
    hidden: Tensor,  # [T, d]
    heads: Tensor,  # [K, V, d]
    targets: Tensor,  # [T] int64
    ignore_index: int,
    backend: str,
    precompute: bool,  # frozen heads: keep the basis of hidden's gradient (no GEMM in backward)
) -> tuple[Tensor, Tensor, Tensor]:
    # logp [T, K], lse [T, K]: accumulate dtype (fp32; fp64 for fp64); basis [T, K, d] or [0]
    return chunked.forward(BACKENDS.impl(backend), hidden, heads, targets, ignore_index, precompute)


@_expert_logprobs_fwd.register_fake
def _(hidden, heads, targets, ignore_index, backend, precompute):
    acc = accumulate_dtype(hidden.dtype, heads.dtype)
    T, K = hidden.shape[0], heads.shape[0]
    return (hidden.new_empty(T, K, dtype=acc), hidden.new_empty(T, K, dtype=acc),
            chunked.basis_like(hidden, heads, precompute))


@torch.library.custom_op("moelora::expert_logprobs_bwd", mutates_args=())
def _expert_logprobs_bwd(
    grad_logp: Tensor,  # [T, K] accumulate dtype
    hidden: Tensor,  # [T, d]
    heads: Tensor,  # [K, V, d]
    targets: Tensor,  # [T] int64
    lse: Tensor,  # [T, K] accumulate dtype, saved by the forward
    basis: Tensor,  # [T, K, d] or [0], saved by the forward
    ignore_index: int,
    backend: str,
    compute_grad_hidden: bool,
    compute_grad_heads: bool,
) -> tuple[Tensor, Tensor]:  # grad_hidden [T, d] or [0], grad_heads [K, V, d] or [0]
    return chunked.backward(BACKENDS.impl(backend), grad_logp, hidden, heads, targets, lse, basis,
                            ignore_index, compute_grad_hidden, compute_grad_heads)


@_expert_logprobs_bwd.register_fake
def _(grad_logp, hidden, heads, targets, lse, basis, ignore_index, backend, compute_grad_hidden,
      compute_grad_heads):
    return (
        torch.empty_like(hidden) if compute_grad_hidden else hidden.new_empty(0),
        torch.empty_like(heads) if compute_grad_heads else heads.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, heads, targets, ignore_index, backend, precompute = inputs
    _, lse, basis = output
    ctx.mark_non_differentiable(lse, basis)
    ctx.save_for_backward(hidden, heads, targets, lse, basis)
    ctx.ignore_index = ignore_index
    ctx.backend = backend


def _backward(ctx, grad_logp, _grad_lse, _grad_basis):
    hidden, heads, targets, lse, basis = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_hidden, grad_heads = torch.ops.moelora.expert_logprobs_bwd(
        grad_logp.to(lse.dtype).contiguous(), hidden, heads, targets, lse, basis, ctx.ignore_index,
        ctx.backend, needs[0], needs[1],
    )
    return (grad_hidden if needs[0] else None, grad_heads if needs[1] else None, None, None, None, None)


_expert_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public functional
# --------------------------------------------------------------------------------------------
def _call(hidden2, heads, targets1, ignore_index, backend):
    if hidden2.shape[0] == 0:
        backend = "torch"  # no rows: nothing to launch
    # frozen heads, hidden to differentiate: the forward keeps hidden's gradient basis, so the
    # backward needs no GEMM (2 GEMM-equivalents in all instead of 3)
    precompute = (torch.is_grad_enabled() and hidden2.requires_grad and not heads.requires_grad)
    logp, _, _ = torch.ops.moelora.expert_logprobs_fwd(
        hidden2.contiguous(), heads.contiguous(), targets1.to(torch.int64).contiguous(),
        ignore_index, backend, precompute,
    )
    return logp


def expert_logprobs(
    hidden: Tensor,
    heads: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    ref_head: Optional[Tensor] = None,
    backend: str = "auto",
):
    """Log-prob of each target token under each of K expert heads, without ``[T, K, V]`` logits.

    ``logp[..., k] = log_softmax(heads[k] @ hidden[...])[targets[...]]``, 0 where
    ``targets == ignore_index``. Summed over a sequence's tokens (see
    ``moelora.losses.sequence_logprobs``) this gives the per-expert sequence log-probs of
    Mix-/MoE-DPO.

    Args:
        hidden: ``[..., d]`` final hidden states (float32 / bfloat16 / float16 / float64).
        heads: ``[K, V, d]`` expert LM heads (nn.Linear layout). May be fp32 while ``hidden``
            is 16-bit (the matmuls then run in fp32). Frozen heads (no requires_grad) with a
            differentiated ``hidden`` cost one GEMM fewer in the backward (see chunked.py).
        targets: ``[...]`` int32/int64 token ids in ``[0, V)``, or ``ignore_index``.
        ignore_index: targets with this id get log-prob 0 and no gradient.
        ref_head: optional ``[V, d]`` frozen reference head on the same hidden states; then the
            reference log-probs ``[...]`` are returned as well, computed under no_grad with
            the same fused op (K = 1). A reference with its own backbone is one more call on
            its own hidden states: ``expert_logprobs(ref_hidden, ref_head[None], targets)``
            under ``torch.no_grad()``, ``[..., 0]``.
        backend: ``"auto"`` (Triton on a GPU, torch elsewhere), ``"triton"`` or ``"torch"``.

    Returns:
        ``logp [..., K]`` in float32 (float64 for float64 inputs), differentiable w.r.t.
        hidden and heads; with ``ref_head``, the pair ``(logp, ref_logp [...])``.
    """
    _validate(hidden, heads, targets, ignore_index, ref_head)
    backend = BACKENDS.resolve(backend, hidden.device, (hidden.dtype, heads.dtype))
    lead = hidden.shape[:-1]
    d = hidden.shape[-1]
    hidden2 = hidden.reshape(-1, d)
    targets1 = targets.reshape(-1)
    logp = _call(hidden2, heads, targets1, ignore_index, backend).reshape(*lead, heads.shape[0])
    if ref_head is None:
        return logp
    with torch.no_grad():
        ref_backend = BACKENDS.resolve(backend, hidden.device, (hidden.dtype, ref_head.dtype))
        ref = _call(hidden2.detach(), ref_head.detach().unsqueeze(0), targets1, ignore_index,
                    ref_backend)
    return logp, ref.reshape(lead)
