"""The torch backend of the per-expert head log-probs: the row-wise work of the shared chunked
schedule (chunked.py, which the op drives) in torch ops.

Contract (shared with triton_backend.py), on one chunk of fp32 logits [rows, V]:
    row_stats(logits, targets [rows], ignore_index) -> (logsumexp [rows], the target's logit [rows])
    grad_logits(logits, targets, lse [rows], coef [rows], dtype)
        -> G = coef (onehot(y) - exp(logits - lse)) [rows, V] in dtype (the logits buffer may
           be overwritten)
"""
from __future__ import annotations

import torch

__all__ = ["row_stats", "grad_logits"]


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

