"""Triton kernel for routing (spec §2): softmax + top-k + renormalise in one pass over the logits.

One program owns BLOCK_T rows and the whole expert axis (E' <= a few hundred in every method we
serve), so the logits are read once and probs / ids / gates written once, instead of the three
or four launches of softmax, topk and the division.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _topk_route_kernel(
    logits_ptr, stride_logits_t,  # [T, E'] any float dtype
    probs_ptr,  # [T, E'] fp32
    index_ptr,  # [T, k] int64
    weight_ptr,  # [T, k] fp32
    T, num_columns, k, empty_column,  # empty_column = E' - 1 with an empty expert, else -1
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    row_mask = rows < T
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < num_columns
    mask = row_mask[:, None] & col_mask[None, :]
    logits = tl.load(logits_ptr + rows[:, None] * stride_logits_t + cols[None, :], mask=mask,
                     other=-float("inf")).to(tl.float32)
    row_max = tl.max(logits, axis=1)
    row_max = tl.where(row_mask, row_max, 0.0)  # padded rows: keep exp finite
    e = tl.exp(logits - row_max[:, None])
    e = tl.where(mask, e, 0.0)
    probs = e / tl.maximum(tl.sum(e, axis=1), 1e-30)[:, None]
    tl.store(probs_ptr + rows[:, None] * num_columns + cols[None, :], probs, mask=mask)

    # Selection: k rounds of arg-max (lowest column wins a tie), taking each winner out.
    remaining = tl.where(mask, probs, -1.0)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in range(0, k):
        best = tl.max(remaining, axis=1)
        best_col = tl.min(tl.where(remaining == best[:, None], cols[None, :], BLOCK_E), axis=1)
        remaining = tl.where(cols[None, :] == best_col[:, None], -2.0, remaining)
        total += best
        expert = tl.where(best_col == empty_column, -1, best_col).to(tl.int64)
        tl.store(index_ptr + rows * k + j, expert, mask=row_mask)
        tl.store(weight_ptr + rows * k + j, best, mask=row_mask)
    if RENORMALIZE:
        for j in range(0, k):
            w = tl.load(weight_ptr + rows * k + j, mask=row_mask, other=0.0)
            tl.store(weight_ptr + rows * k + j, w / tl.maximum(total, 1e-30), mask=row_mask)


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
    _topk_route_kernel[(triton.cdiv(T, block_t),)](
        logits, logits.stride(0), probs, indices, weights,
        T, num_columns, k, num_columns - 1 if empty_expert else -1,
        RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e,
    )
    return probs, indices, weights
