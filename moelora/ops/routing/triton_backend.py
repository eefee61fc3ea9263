"""Triton kernel of routing (docs/spec.md §2): softmax + top-k + renormalise in one pass over the logits.

One program owns BLOCK_T rows and the whole expert axis (E' <= a few hundred in every method we
serve), so the logits are read once and probs / ids / gates written once, instead of the three
or four launches of softmax, topk and the division.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.triton_common import launch


@triton.jit
def _topk_route_kernel(
    logits_ptr, stride_logits_t,  # [T, E'] any float dtype
    probs_ptr,  # [T, E'] fp32
    index_ptr,  # [T, k] int64
    weight_ptr,  # [T, k] fp32
    T, num_columns, k, empty_column,  # empty_column = E' - 1 with an empty expert, else -1
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    row_mask = rows < T
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < num_columns
    mask = row_mask[:, None] & col_mask[None, :]
    logits = tl.load(logits_ptr + rows[:, None] * stride_logits_t + cols[None, :], mask=mask,
                     other=-float("inf")).to(tl.float32)
    # Degenerate rows (the policy of reference.topk_route_ref): -inf masks an expert; +inf
    # columns share the row's mass (softmax's limit); a fully masked row has probs 0.
    masked = logits == -float("inf")
    top = logits == float("inf")
    has_top = tl.max(tl.where(top, 1, 0), axis=1) > 0
    logits = tl.where(has_top[:, None], tl.where(top, 0.0, -float("inf")), logits)
    row_max = tl.max(logits, axis=1)
    # padded and fully masked rows: keep exp finite (every e is then 0, and so are the probs)
    row_max = tl.where(row_mask & (row_max != -float("inf")), row_max, 0.0)
    e = tl.exp(logits - row_max[:, None])
    e = tl.where(mask, e, 0.0)
    probs = e / tl.maximum(tl.sum(e, axis=1), 1e-30)[:, None]
    tl.store(probs_ptr + rows[:, None] * num_columns + cols[None, :], probs, mask=mask)

    # Selection: k rounds of arg-max (lowest column wins a tie), taking each winner out. The k
    # winners stay in registers ([BLOCK_T, BLOCK_K]): reading back our own global stores to
    # renormalise would race between threads on a GPU (no barrier orders global memory).
    # NaN ranks first, as in torch.topk, so a NaN row yields NaN gates and in-range ids.
    remaining = tl.where(mask, tl.where(probs == probs, probs, 2.0), -1.0)
    kcols = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in range(0, k):
        best = tl.max(remaining, axis=1)
        best_col = tl.min(tl.where(remaining == best[:, None], cols[None, :], BLOCK_E), axis=1)
        picked = cols[None, :] == best_col[:, None]
        remaining = tl.where(picked, -2.0, remaining)
        # a masked expert taken by the top-k: no expert, gate 0 (even in a NaN row)
        dead = tl.max(tl.where(picked & masked, 1, 0), axis=1) > 0
        best_p = tl.sum(tl.where(picked, probs, 0.0), axis=1)  # the prob itself (NaN stays NaN)
        best_p = tl.where(dead, 0.0, best_p)
        total += best_p
        expert = tl.where((best_col == empty_column) | dead, -1, best_col).to(tl.int64)
        top_w = tl.where(kcols[None, :] == j, best_p[:, None], top_w)
        top_i = tl.where(kcols[None, :] == j, expert[:, None], top_i)
    if RENORMALIZE:
        top_w = top_w / tl.where(total == 0.0, 1.0, total)[:, None]  # fully masked: gates 0
    out_offs = rows[:, None] * k + kcols[None, :]
    out_mask = row_mask[:, None] & (kcols[None, :] < k)
    tl.store(index_ptr + out_offs, top_i, mask=out_mask)
    tl.store(weight_ptr + out_offs, top_w, mask=out_mask)


def topk_route(logits: torch.Tensor, k: int, renormalize: bool, empty_expert: bool):
    """logits [T, E'] -> probs [T, E'] fp32, expert ids [T, k] int64, gates [T, k] fp32.

    With `empty_expert`, the last column is the empty expert and its id is written as -1.
    """
    T, num_columns = logits.shape
    probs = torch.empty(T, num_columns, dtype=torch.float32, device=logits.device)
    indices = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    block_e = triton.next_power_of_2(num_columns)
    block_t = max(1, min(64, 4096 // block_e))
    launch(_topk_route_kernel, (triton.cdiv(T, block_t),),
           logits, logits.stride(0), probs, indices, weights,
           T, num_columns, k, num_columns - 1 if empty_expert else -1,
           RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e,
           BLOCK_K=triton.next_power_of_2(k))
    return probs, indices, weights
