"""Per-expert head log-probs (spec §5): the heavy op of Mix- and MoE-DPO.

    logp[t, k] = log_softmax(H_k h_t)[y_t]          (0 where y_t == ignore_index)

hidden ``h`` is ``[T, d]``, the K expert policy heads ``H`` are ``[K, V, d]`` (nn.Linear layout,
one LM head per expert), targets ``y`` are ``[T]``. Written naively this materialises
``[T, K, V]`` logits (2 GB at T = 8192, K = 4, V = 32000 in bf16, and as much again for their
gradient); both backends here walk T (torch) or T and V (Triton) in chunks with an online
logsumexp, forward and backward, and keep only ``[T, K]`` numbers between the two: the
log-sum-exp, from which the backward rebuilds the softmax chunk by chunk.

    d logp[t, k] / d logits[t, k, :] = onehot(y_t) - softmax(H_k h_t)
    grad_hidden[t] = sum_k c[t, k] (H_k[y_t] - sum_v p[t, k, v] H_k[v])
    grad_heads[k]  = sum_t c[t, k] (onehot(y_t) - p[t, k])^T h_t       (c = upstream gradient)

Layers of this file, bottom up: the float64 reference (also the naive materialising version
the benchmarks compare against); the torch backend; input validation; the registered ops
``moelora::expert_logprobs_fwd`` / ``moelora::expert_logprobs_bwd`` (fake implementations,
autograd registration); the public functional ``expert_logprobs``. The Triton kernels are in
``moelora/kernels/expert_logprobs.py``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from moelora.ops.backends import accumulate_dtype, resolve_backend, triton_kernels

__all__ = ["expert_logprobs", "expert_logprobs_ref", "naive_expert_logprobs"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_BACKENDS = ("auto", "torch", "triton")


# --------------------------------------------------------------------------------------------
# reference: the spec's formula, materialising [T, K, V]
# --------------------------------------------------------------------------------------------
def naive_expert_logprobs(
    hidden: Tensor,  # [..., d]
    heads: Tensor,  # [K, V, d]
    targets: Tensor,  # [...] integer
    ignore_index: int = -100,
) -> Tensor:  # [..., K] (float32; float64 for float64 inputs)
    """What one writes without a fused op: all ``[T, K, V]`` logits in the inputs' dtype, then
    an fp32 log_softmax and a gather. Differentiable by autograd. Run in float64 it is the
    reference of the tests (``expert_logprobs_ref``); run in the training dtype it is the
    baseline of the memory / time benchmark."""
    acc = accumulate_dtype(hidden.dtype, heads.dtype)
    cd = hidden.dtype if hidden.dtype == heads.dtype else acc
    logits = torch.einsum("...d,kvd->...kv", hidden.to(cd), heads.to(cd))  # [..., K, V]
    logp = torch.log_softmax(logits.to(acc), dim=-1)
    valid = targets != ignore_index
    index = torch.where(valid, targets, 0).long()
    index = index[..., None, None].expand(*targets.shape, heads.shape[0], 1)
    picked = logp.gather(-1, index).squeeze(-1)
    return torch.where(valid.unsqueeze(-1), picked, torch.zeros_like(picked))


expert_logprobs_ref = naive_expert_logprobs


# --------------------------------------------------------------------------------------------
# torch backend: chunks of T rows, one expert at a time; a [rows, V] logits block at most
# --------------------------------------------------------------------------------------------
# Elements of one expert's logits block: 2^21 fp32 = 8 MiB (262 rows at V = 8000, 65 at
# V = 32000). At T=512, d=256, V=8000, K=4, fp32 forward+backward peaked at 48 MiB (2^20: 44,
# 2^22: 63; the naive version 188), 31 MiB of it grad_heads itself. Bigger blocks are bigger,
# more efficient GEMMs; on the 2 shared CPU cores we had, timings were too noisy to rank them.
TORCH_CHUNK_ELEMENTS = 1 << 21


def _compute_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """Matmul dtype: a shared type stays (tensor cores / bf16 GEMM), a mixed pair goes to fp32."""
    return a if a == b else accumulate_dtype(a, b)


def _chunk_rows(num_rows: int, vocab: int) -> int:
    return max(1, min(num_rows, TORCH_CHUNK_ELEMENTS // vocab))


def _torch_forward(hidden, heads, targets, ignore_index):
    T = hidden.shape[0]
    K = heads.shape[0]
    acc = accumulate_dtype(hidden.dtype, heads.dtype)
    cd = _compute_dtype(hidden.dtype, heads.dtype)
    logp = hidden.new_empty(T, K, dtype=acc)
    lse = hidden.new_empty(T, K, dtype=acc)
    valid = targets != ignore_index
    index = torch.where(valid, targets, 0).unsqueeze(1)
    rows = _chunk_rows(T, heads.shape[1])
    for k in range(K):
        head = heads[k].to(cd)
        for s in range(0, T, rows):
            e = min(T, s + rows)
            logits = (hidden[s:e].to(cd) @ head.t()).to(acc)  # [rows, V]
            chunk_lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, index[s:e]).squeeze(1)
            logp[s:e, k] = torch.where(valid[s:e], picked - chunk_lse, 0.0)
            lse[s:e, k] = chunk_lse
    return logp, lse


def _torch_backward(grad_logp, hidden, heads, targets, lse, ignore_index, compute_grad_hidden,
                    compute_grad_heads):
    T, d = hidden.shape
    K, V, _ = heads.shape
    acc = lse.dtype
    cd = _compute_dtype(hidden.dtype, heads.dtype)
    valid = targets != ignore_index
    index = torch.where(valid, targets, 0).unsqueeze(1)
    coef = torch.where(valid.unsqueeze(1), grad_logp.to(acc), 0.0)  # ignored rows: constant
    grad_hidden = hidden.new_zeros(T, d, dtype=acc) if compute_grad_hidden else None
    grad_heads = torch.empty_like(heads) if compute_grad_heads else heads.new_empty(0)
    rows = _chunk_rows(T, V)
    for k in range(K):
        head = heads[k].to(cd)
        grad_head = None
        if compute_grad_heads:  # accumulate in place when the heads are in the accumulate dtype
            grad_head = grad_heads[k].zero_() if heads.dtype == acc else hidden.new_zeros(V, d, dtype=acc)
        for s in range(0, T, rows):
            e = min(T, s + rows)
            h = hidden[s:e].to(cd)
            c = coef[s:e, k, None]
            # G = c * (onehot(y) - softmax), the softmax rebuilt from the saved lse
            g = (h @ head.t()).to(acc).sub_(lse[s:e, k, None]).exp_().mul_(-c)
            g.scatter_add_(1, index[s:e], c)
            g = g.to(cd)
            if compute_grad_hidden:
                grad_hidden[s:e] += (g @ head).to(acc)
            if compute_grad_heads:
                grad_head += (g.t() @ h).to(acc)
        if compute_grad_heads and heads.dtype != acc:
            grad_heads[k] = grad_head.to(heads.dtype)
    grad_hidden = grad_hidden.to(hidden.dtype) if compute_grad_hidden else hidden.new_empty(0)
    return grad_hidden, grad_heads


# --------------------------------------------------------------------------------------------
# triton backend: kernels in moelora.kernels.expert_logprobs (GPU, or CPU tensors under
# TRITON_INTERPRET=1 for the tests)
# --------------------------------------------------------------------------------------------
def _triton_module():
    return triton_kernels("expert_logprobs")


@torch.compiler.assume_constant_result
def _kernels_importable() -> bool:
    # Evaluated eagerly and treated as a constant under torch.compile: the probe imports.
    return _triton_module() is not None


def _resolve_backend(name: str, device: torch.device, dtypes: tuple) -> str:
    """The core op's resolution (``moelora.ops.backends.resolve_backend``: ``auto`` order per
    device, ``MOELORA_BACKEND``, the interpreter never picked by ``auto``, the same "not
    available" error), restricted to the backends this op has. The compiled extension's
    ``cpu`` / ``cuda`` have no kernel for it: where ``auto`` lands on one, this op runs torch."""
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS} for expert_logprobs, got {name!r}")
    resolved = resolve_backend(name, device, dtypes)
    if resolved == "triton" and not _kernels_importable():
        if name == "auto":
            return "torch"
        raise ValueError(f"backend 'triton' is not available for expert_logprobs: "
                         f"moelora.kernels.expert_logprobs failed to import")
    return resolved if resolved == "triton" else "torch"


def _forward_impl(backend, hidden, heads, targets, ignore_index):
    if backend == "triton":
        return _triton_module().forward(hidden, heads, targets, ignore_index)
    return _torch_forward(hidden, heads, targets, ignore_index)


def _backward_impl(backend, *args):
    if backend == "triton":
        return _triton_module().backward(*args)
    return _torch_backward(*args)


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
    """Targets must lie in [0, V) or equal ignore_index. Always checked on CPU; on GPU a host
    sync would stall the stream, so the check is asynchronous (a device-side assert) unless
    MOELORA_DEBUG=1 asks for the synchronous ValueError. Skipped while tracing."""
    if targets.numel() == 0 or torch.compiler.is_compiling():
        return
    ok = (targets == ignore_index) | ((targets >= 0) & (targets < vocab))
    if targets.device.type == "cpu" or os.environ.get("MOELORA_DEBUG", "0") == "1":
        if not bool(ok.all()):
            bad = targets[~ok]
            raise ValueError(
                f"targets must lie in [0, {vocab}) (V = {vocab}) or equal ignore_index = "
                f"{ignore_index}, got values in [{int(bad.min())}, {int(bad.max())}]"
            )
    else:
        torch._assert_async(ok.all(), "moelora: targets out of range [0, V) and not ignore_index")


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
) -> tuple[Tensor, Tensor]:  # logp [T, K], lse [T, K]: accumulate dtype (fp32; fp64 for fp64)
    return _forward_impl(backend, hidden, heads, targets, ignore_index)


@_expert_logprobs_fwd.register_fake
def _(hidden, heads, targets, ignore_index, backend):
    acc = accumulate_dtype(hidden.dtype, heads.dtype)
    T, K = hidden.shape[0], heads.shape[0]
    return hidden.new_empty(T, K, dtype=acc), hidden.new_empty(T, K, dtype=acc)


@torch.library.custom_op("moelora::expert_logprobs_bwd", mutates_args=())
def _expert_logprobs_bwd(
    grad_logp: Tensor,  # [T, K] accumulate dtype
    hidden: Tensor,  # [T, d]
    heads: Tensor,  # [K, V, d]
    targets: Tensor,  # [T] int64
    lse: Tensor,  # [T, K] accumulate dtype, saved by the forward
    ignore_index: int,
    backend: str,
    compute_grad_hidden: bool,
    compute_grad_heads: bool,
) -> tuple[Tensor, Tensor]:  # grad_hidden [T, d] or [0], grad_heads [K, V, d] or [0]
    return _backward_impl(backend, grad_logp, hidden, heads, targets, lse, ignore_index,
                          compute_grad_hidden, compute_grad_heads)


@_expert_logprobs_bwd.register_fake
def _(grad_logp, hidden, heads, targets, lse, ignore_index, backend, compute_grad_hidden,
      compute_grad_heads):
    return (
        torch.empty_like(hidden) if compute_grad_hidden else hidden.new_empty(0),
        torch.empty_like(heads) if compute_grad_heads else heads.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    hidden, heads, targets, ignore_index, backend = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(hidden, heads, targets, lse)
    ctx.ignore_index = ignore_index
    ctx.backend = backend


def _backward(ctx, grad_logp, _grad_lse):
    hidden, heads, targets, lse = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_hidden, grad_heads = torch.ops.moelora.expert_logprobs_bwd(
        grad_logp.to(lse.dtype).contiguous(), hidden, heads, targets, lse, ctx.ignore_index,
        ctx.backend, needs[0], needs[1],
    )
    return (grad_hidden if needs[0] else None, grad_heads if needs[1] else None, None, None, None)


_expert_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# public functional
# --------------------------------------------------------------------------------------------
def _call(hidden2, heads, targets1, ignore_index, backend):
    if hidden2.shape[0] == 0:
        backend = "torch"  # no rows: nothing to launch
    logp, _ = torch.ops.moelora.expert_logprobs_fwd(
        hidden2.contiguous(), heads.contiguous(), targets1.to(torch.int64).contiguous(),
        ignore_index, backend,
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
            is 16-bit (the matmuls then run in fp32).
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
    backend = _resolve_backend(backend, hidden.device, (hidden.dtype, heads.dtype))
    lead = hidden.shape[:-1]
    d = hidden.shape[-1]
    hidden2 = hidden.reshape(-1, d)
    targets1 = targets.reshape(-1)
    logp = _call(hidden2, heads, targets1, ignore_index, backend).reshape(*lead, heads.shape[0])
    if ref_head is None:
        return logp
    with torch.no_grad():
        ref_backend = _resolve_backend(backend, hidden.device, (hidden.dtype, ref_head.dtype))
        ref = _call(hidden2.detach(), ref_head.detach().unsqueeze(0), targets1, ignore_index,
                    ref_backend)
    return logp, ref.reshape(lead)
