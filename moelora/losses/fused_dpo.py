"""The Mix- / MoE-DPO loss fused with its K expert heads (docs/spec.md §5): 3 GEMM-equivalents.

The unfused path, ``expert_logprobs`` -> ``sequence_logprobs`` -> ``mixture_dpo_loss``, does 4:
the op's backward must rebuild the logits, because the gradient of each token's log-prob is
known only once the loss is. Here the loss is computed inside the chunk loop, the way Liger's
fused-linear DPO does it for one head: the pairs are independent terms of the loss, so a chunk of
whole preference pairs (their chosen and rejected sequences) carries everything its part of the
loss needs. Per chunk:

    logits_k = h @ H_k^T for every expert (cuBLAS; one chunk of K logits blocks in memory)
    -> token and sequence log-probs -> the chunk's loss and its gradient w.r.t. the sequence
    log-probs and the gate's log-weights (a small autograd graph)
    -> G_k = c (onehot(y) - softmax_k) -> grad_hidden = sum_k G_k H_k, grad_H_k += G_k^T h

and the backward only scales the stored gradients by the upstream one. Peak memory beyond the
inputs and gradients: one chunk of K [rows, V] fp32 logits blocks (at least one pair).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moelora.losses.dpo import MixtureDPOOutput, mixture_dpo_loss
from moelora.ops.dtypes import accumulate_dtype, compute_dtype
from moelora.ops.expert_logprobs import chunked
from moelora.ops.expert_logprobs.op import BACKENDS

__all__ = ["fused_mixture_dpo_loss", "CHUNK_BYTES"]

# fp32 logits per chunk (all K experts' blocks together), by device type.
CHUNK_BYTES = {"cpu": 1 << 25, "cuda": 1 << 29}


class _FusedMixtureDPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, heads, log_weights, targets, ref_chosen, ref_rejected, settings):
        ops, ignore_index, beta, label_smoothing, objective = settings
        N, L, d = hidden.shape
        B = N // 2
        K, V, _ = heads.shape
        acc = accumulate_dtype(hidden.dtype, heads.dtype)
        cd = compute_dtype(hidden.dtype, heads.dtype)
        want_h, want_H = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_w = log_weights is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.zeros(N, L, d, dtype=acc, device=hidden.device) if want_h else None
        grad_heads = torch.zeros(K, V, d, dtype=acc, device=hidden.device) if want_H else None
        grad_w = torch.zeros_like(log_weights, dtype=acc) if want_w else None
        budget = CHUNK_BYTES.get(hidden.device.type, 1 << 25)
        pairs = max(1, min(B, budget // max(1, 2 * L * K * V * 4)))
        losses, margins, resp, used_w = [], [], [], []
        for b0 in range(0, B, pairs):
            b1 = min(B, b0 + pairs)
            rows = torch.cat([torch.arange(b0, b1), torch.arange(B + b0, B + b1)]).to(hidden.device)
            h = hidden[rows].reshape(-1, d)  # [2 cb L, d]: the chunk's chosen, then rejected rows
            y = targets[rows].reshape(-1)
            valid = y != ignore_index
            logits, lse, token_logp = [], [], []
            for k in range(K):
                block = chunked._logits(h, heads[k])
                block_lse, picked = ops.row_stats(block, y, ignore_index)
                logits.append(block)
                lse.append(block_lse)
                token_logp.append(torch.where(valid, picked - block_lse, 0.0))
            seq = torch.stack(token_logp, -1).view(2 * (b1 - b0), L, K).sum(1)  # [2 cb, K]
            with torch.enable_grad():
                policy = seq.detach().requires_grad_()
                lw = None if log_weights is None else log_weights[b0:b1].detach().to(acc).requires_grad_(want_w)
                out = mixture_dpo_loss(
                    policy[: b1 - b0], policy[b1 - b0:],
                    None if ref_chosen is None else ref_chosen[b0:b1],
                    None if ref_rejected is None else ref_rejected[b0:b1],
                    log_weights=lw, beta=beta, label_smoothing=label_smoothing, objective=objective,
                    reduction="sum")
                wrt = [policy] + ([lw] if want_w else [])
                grads = torch.autograd.grad(out.loss, wrt) if (want_h or want_H or want_w) else None
            losses.append(out.loss.detach())
            margins.append(out.margins.detach())
            resp.append(out.responsibilities.detach())
            used_w.append(out.log_weights.detach())
            if grads is None:
                continue
            if want_w:
                grad_w[b0:b1] = grads[1]
            coef = grads[0].repeat_interleave(L, dim=0)  # [2 cb L, K]: d loss / d token log-prob
            coef = torch.where(valid.unsqueeze(1), coef, 0.0)
            hc = h.to(cd)
            grad_h = torch.zeros(h.shape[0], d, dtype=acc, device=h.device) if want_h else None
            for k in range(K):
                g = ops.grad_logits(logits[k], y, lse[k], coef[:, k].contiguous(), cd)
                if want_h:
                    grad_h += (g @ heads[k].to(cd)).to(acc)
                if want_H:
                    grad_heads[k] += (g.t() @ hc).to(acc)
                logits[k] = None  # the chunk's blocks go as soon as their gradient is formed
            if want_h:
                grad_hidden[rows] = grad_h.view(-1, L, d)
        scale = 1.0 / B  # reduction "mean" over the pairs
        ctx.save_for_backward(*(t * scale if t is not None else torch.empty(0) for t in (grad_hidden, grad_heads, grad_w)))
        ctx.dtypes = (hidden.dtype, heads.dtype, None if log_weights is None else log_weights.dtype)
        ctx.present = (want_h, want_H, want_w)
        loss = torch.stack(losses).sum() * scale
        extras = torch.cat(margins), torch.cat(resp), torch.cat(used_w)
        ctx.mark_non_differentiable(*extras)
        return (loss, *extras)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grads = []
        for t, dtype, present in zip(ctx.saved_tensors, ctx.dtypes, ctx.present):
            grads.append((t * grad_loss).to(dtype) if present else None)
        return grads[0], grads[1], grads[2], None, None, None, None


def fused_mixture_dpo_loss(
    hidden: Tensor,  # [2B, L, d]: the B chosen sequences, then their B rejected ones
    heads: Tensor,  # [K, V, d] expert LM heads
    targets: Tensor,  # [2B, L]: the token scored at each position, ignore_index where none
    *,
    log_weights: Optional[Tensor] = None,  # [B, K] the gate's log-weights (or [K]; None: uniform)
    reference_chosen_logps: Optional[Tensor] = None,  # [B] or [B, K]
    reference_rejected_logps: Optional[Tensor] = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    objective: str = "em",
    ignore_index: int = -100,
    backend: str = "auto",
) -> MixtureDPOOutput:
    """``mixture_dpo_loss`` of the per-expert sequence log-probs ``sum_t log_softmax(H_k h_t)[y_t]``,
    mean over the B pairs, with 3 GEMM-equivalents and one chunk of logits (module docstring).
    Differentiable w.r.t. ``hidden``, ``heads`` and ``log_weights``; the references are
    constants (precompute them, e.g. with ``expert_logprobs(..., ref_head=...)`` under no_grad).
    Returns the same fields as ``mixture_dpo_loss``; only ``loss`` carries gradients."""
    if hidden.dim() != 3 or hidden.shape[0] % 2:
        raise ValueError(f"hidden must be [2B, L, d] (chosen then rejected), got {tuple(hidden.shape)}")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets must be {tuple(hidden.shape[:2])}, got {tuple(targets.shape)}")
    if heads.dim() != 3 or heads.shape[2] != hidden.shape[2]:
        raise ValueError(f"heads must be [K, V, {hidden.shape[2]}], got {tuple(heads.shape)}")
    B, K = hidden.shape[0] // 2, heads.shape[0]
    if log_weights is not None:
        log_weights = log_weights.expand(B, K) if log_weights.dim() == 1 else log_weights
        if log_weights.shape != (B, K):
            raise ValueError(f"log_weights must be [{K}] or [{B}, {K}], got {tuple(log_weights.shape)}")
    name = BACKENDS.resolve(backend, hidden.device, (hidden.dtype, heads.dtype))
    settings = (BACKENDS.impl(name), ignore_index, beta, label_smoothing, objective)
    loss, margins, resp, used = _FusedMixtureDPO.apply(
        hidden.contiguous(), heads.contiguous(), log_weights, targets.long(), reference_chosen_logps,
        reference_rejected_logps, settings)
    return MixtureDPOOutput(loss, margins, resp, used)
