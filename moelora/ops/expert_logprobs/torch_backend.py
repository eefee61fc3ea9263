"""The torch backend of the per-expert head log-probs: chunks of T rows, one expert at a time,
a [rows, V] logits block at most.

Contract (shared with triton_backend.py; inputs validated and contiguous):
    forward(hidden [T, d], heads [K, V, d], targets [T] int64, ignore_index)
        -> logp [T, K], lse [T, K] (accumulate dtype)
    backward(grad_logp [T, K], hidden, heads, targets, lse, ignore_index, compute_grad_hidden,
             compute_grad_heads) -> grad_hidden [T, d] or [0], grad_heads [K, V, d] or [0]
"""
from __future__ import annotations

import torch

from moelora.ops.dtypes import accumulate_dtype, compute_dtype

__all__ = ["forward", "backward", "TORCH_CHUNK_ELEMENTS"]

# Elements of one expert's logits block: 2^21 fp32 = 8 MiB (262 rows at V = 8000, 65 at
# V = 32000). At T=512, d=256, V=8000, K=4, fp32 forward+backward peaked at 48 MiB (2^20: 44,
# 2^22: 63; the naive version 188), 31 MiB of it grad_heads itself. Bigger blocks are bigger,
# more efficient GEMMs; on the 2 shared CPU cores we had, timings were too noisy to rank them.
TORCH_CHUNK_ELEMENTS = 1 << 21


def _chunk_rows(num_rows: int, vocab: int) -> int:
    return max(1, min(num_rows, TORCH_CHUNK_ELEMENTS // vocab))


def forward(hidden, heads, targets, ignore_index):
    T = hidden.shape[0]
    K = heads.shape[0]
    acc = accumulate_dtype(hidden.dtype, heads.dtype)
    cd = compute_dtype(hidden.dtype, heads.dtype)
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


def backward(grad_logp, hidden, heads, targets, lse, ignore_index, compute_grad_hidden,
             compute_grad_heads):
    T, d = hidden.shape
    K, V, _ = heads.shape
    acc = lse.dtype
    cd = compute_dtype(hidden.dtype, heads.dtype)
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
