"""The torch backend of routing: the reference itself, in the accumulate dtype.

Contract (shared with triton_backend.py): ``topk_route(logits [T, E'], k, renormalize,
empty_expert) -> probs [T, E'], expert_indices [T, k] int64, expert_weights [T, k]``, probs
and weights in the accumulate dtype (float32; float64 for float64 logits).
"""
from __future__ import annotations

from moelora.ops.dtypes import accumulate_dtype
from moelora.ops.routing.reference import topk_route_ref

__all__ = ["topk_route"]


def topk_route(logits, k: int, renormalize: bool, empty_expert: bool):
    return topk_route_ref(logits.to(accumulate_dtype(logits.dtype)), k, renormalize, empty_expert)
