"""The torch backend of the per-expert head log-probs: the shared chunked schedule
(chunked.py) with its row-wise work in torch ops.

Contract (shared with triton_backend.py; inputs validated and contiguous):
    forward(hidden [T, d], heads [K, V, d], targets [T] int64, ignore_index, precompute)
        -> logp [T, K], lse [T, K] (accumulate dtype), basis [T, K, d] or [0] (precompute:
           frozen heads, the backward's gradient of hidden without a GEMM)
    backward(grad_logp [T, K], hidden, heads, targets, lse, basis, ignore_index,
             compute_grad_hidden, compute_grad_heads) -> grad_hidden [T, d] or [0],
             grad_heads [K, V, d] or [0]
"""
from __future__ import annotations

import sys

import torch

from moelora.ops.expert_logprobs import chunked

__all__ = ["forward", "backward", "row_stats", "grad_logits", "basis_like"]

basis_like = chunked.basis_like


def row_stats(logits, targets, ignore_index):
    """(logsumexp, the target's logit) of each row of fp32 logits [rows, V]."""
    index = torch.where(targets != ignore_index, targets, 0).unsqueeze(1)
    return torch.logsumexp(logits, dim=-1), logits.gather(1, index).squeeze(1)


def grad_logits(logits, targets, lse, coef, dtype):
    """G = coef (onehot(y) - exp(logits - lse)) in ``dtype``, over the logits buffer in place."""
    index = torch.where(coef != 0, targets, 0).unsqueeze(1)
    g = logits.sub_(lse.unsqueeze(1)).exp_().mul_(-coef.unsqueeze(1))
    g.scatter_add_(1, index, coef.unsqueeze(1))
    return g.to(dtype)


def forward(hidden, heads, targets, ignore_index, precompute):
    return chunked.forward(sys.modules[__name__], hidden, heads, targets, ignore_index, precompute)


def backward(grad_logp, hidden, heads, targets, lse, basis, ignore_index, compute_grad_hidden,
             compute_grad_heads):
    return chunked.backward(sys.modules[__name__], grad_logp, hidden, heads, targets, lse, basis,
                            ignore_index, compute_grad_hidden, compute_grad_heads)
