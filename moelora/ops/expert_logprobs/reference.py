"""Ground truth of the per-expert head log-probs (docs/spec.md §5), materialising [T, K, V].

Run in float64 it is the reference of the tests; run in the training dtype it is the naive
baseline of the memory / time benchmark.
"""
from __future__ import annotations

import torch
from torch import Tensor

from moelora.ops.dtypes import accumulate_dtype, compute_dtype

__all__ = ["naive_expert_logprobs", "expert_logprobs_ref"]


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
    cd = compute_dtype(hidden.dtype, heads.dtype)
    logits = torch.einsum("...d,kvd->...kv", hidden.to(cd), heads.to(cd))  # [..., K, V]
    logp = torch.log_softmax(logits.to(acc), dim=-1)
    valid = targets != ignore_index
    index = torch.where(valid, targets, 0).long()
    index = index[..., None, None].expand(*targets.shape, heads.shape[0], 1)
    picked = logp.gather(-1, index).squeeze(-1)
    return torch.where(valid.unsqueeze(-1), picked, torch.zeros_like(picked))


expert_logprobs_ref = naive_expert_logprobs
