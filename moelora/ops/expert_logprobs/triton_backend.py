"""The Triton backend of the per-expert head log-probs: the row-wise work of the shared chunked
schedule (chunked.py: the logits by cuBLAS, one chunk of rows at a time) in one Triton launch
each, where torch takes three to five (logsumexp, gather; sub, exp, mul, scatter, cast).
Contract: see torch_backend.py.

    row_stats     one program per row: an online max / sum-exp over the row's V logits in
                  BLOCK_V steps, and the target's logit: reads the chunk once
    grad_logits   G = c (onehot(y) - exp(logit - lse)) in the GEMMs' dtype: reads the chunk
                  once, writes G once

Every offset that multiplies a row index is int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.triton_common import launch

__all__ = ["row_stats", "grad_logits"]

BLOCK_V = 1024


@triton.jit
def _row_stats_kernel(logits_ptr, stride, targets_ptr, lse_ptr, picked_ptr, V, ignore_index,
                      BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    # per lane: a running max (a finite floor below any logit, so no -inf - -inf) and the sum
    # of exp(x - max); lanes past V load -inf and add exp(-inf) = 0
    run_max = tl.full((BLOCK_V,), -1e30, dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf"))
        new_max = tl.maximum(run_max, x)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(x - new_max)
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    total = tl.sum(run_sum * tl.exp(run_max - row_max), axis=0)
    tl.store(lse_ptr + row, row_max + tl.log(total))
    y = tl.load(targets_ptr + row)
    picked = tl.load(base + tl.where(y != ignore_index, y, 0))
    tl.store(picked_ptr + row, picked)


@triton.jit
def _grad_logits_kernel(logits_ptr, stride, out_ptr, stride_out, targets_ptr, lse_ptr, coef_ptr, V,
                        BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    x = tl.load(logits_ptr + row * stride + offs, mask=mask, other=0.0)
    lse = tl.load(lse_ptr + row)
    coef = tl.load(coef_ptr + row)
    y = tl.load(targets_ptr + row)
    g = coef * (tl.where(offs == y, 1.0, 0.0) - tl.exp(x - lse))
    tl.store(out_ptr + row * stride_out + offs, g.to(out_ptr.dtype.element_ty), mask=mask)


def row_stats(logits, targets, ignore_index):
    rows, V = logits.shape
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    picked = torch.empty_like(lse)
    launch(_row_stats_kernel, (rows,), logits, logits.stride(0), targets, lse, picked, V, ignore_index,
           BLOCK_V=min(BLOCK_V, triton.next_power_of_2(V)),
           reads={"logits": logits, "targets": targets}, writes={"lse": lse, "picked": picked})
    return lse, picked


def grad_logits(logits, targets, lse, coef, dtype):
    rows, V = logits.shape
    out = logits if dtype == torch.float32 else torch.empty(rows, V, dtype=dtype, device=logits.device)
    block = min(BLOCK_V, triton.next_power_of_2(V))
    launch(_grad_logits_kernel, (rows, triton.cdiv(V, block)), logits, logits.stride(0), out, out.stride(0),
           targets, lse.contiguous(), coef.contiguous(), V, BLOCK_V=block,
           reads={"logits": logits}, writes={"grad_logits": out})
    return out

