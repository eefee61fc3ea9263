"""Triton kernels of the per-expert head log-probs (docs/spec.md §5, the heavy op of Mix-/MoE-DPO).

    logp[t, k] = log_softmax(H_k h_t)[y_t]          hidden h [T, d], heads H [K, V, d], y [T]

The [T, K, V] logits (2 GB at T = 8192, K = 4, V = 32000 in bf16) are never stored: every
kernel walks the vocabulary in BLOCK_V chunks, rebuilding a [BLOCK_T, BLOCK_V] logits tile with
tl.dot over d, and keeps per-row state only (the fused-linear-cross-entropy idea, K heads).

    forward     grid (T-blocks, K): online max / sum-exp over V chunks, pick the target logit;
                writes logp [T, K] and lse [T, K] (fp32; saved for the backward)
    d_hidden    grid (T-blocks, K): per V chunk, grad tile G = c * (onehot(y) - softmax) from the
                saved lse, then dh_k[t-block, :] += G @ H_k[v-chunk, :]; each program owns its
                rows of its expert's partial [K, T, d] fp32, summed over K by the launcher
    d_heads     grid (V-blocks,), one launch per expert: per T chunk, the same G, then
                dH_k[v-block, :] += G^T @ h[t-chunk, :]; each program owns its V rows

(c[t, k] = grad_logp[t, k], zero for ignored targets.) Every output row has exactly one writer,
so the backward needs no atomics and is deterministic. The price is recomputing the logits
twice in the backward: 5 head-sized GEMMs' worth of FLOPs in all, against 3 for the
materialising version; what it buys is memory that does not grow with T * K * V.
The d_hidden partials are per expert (rather than one program looping over K) to give the GPU
K times more programs: T = 4096 in 64-row blocks is only 64 programs for 132 SMs.

Accumulators are read-modify-written in global memory across the chunk loop (a [BLOCK_T, d] or
[BLOCK_V, d] fp32 row block does not fit in registers for d = 4096); each program only touches
its own rows, and a barrier orders its threads' stores before the next chunk's loads.
Every offset that multiplies a row index is int64 (K * V * d passes 2^31 at V = 128k, d = 8192).

"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelora.ops.triton_common import dot, dot_in_fp32, launch

# V rows per chunk and the tile width over d. tl.dot needs every dim >= 16.
BLOCK_V = 64
BLOCK_D = 64
BLOCK_T = 64


@triton.jit
def _logits_tile(
    hidden_ptr, head_ptr,  # hidden [T, D]; head [V, D] (one expert)
    offs_t, t_mask, offs_v, v_mask, D,
    DOT_FP32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """[BLOCK_T, BLOCK_V] fp32 logits h_t . H[v]; masked V columns are -inf."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(hidden_ptr + offs_t[:, None] * D + offs_d[None, :],
                    mask=t_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(head_ptr + offs_v[None, :] * D + offs_d[:, None],
                    mask=d_mask[:, None] & v_mask[None, :], other=0.0)  # [BLOCK_D, BLOCK_V]
        acc += dot(h, w, DOT_FP32)
    return tl.where(v_mask[None, :], acc, float("-inf"))


@triton.jit
def _grad_logits_tile(logits, offs_v, y, lse, coef):
    """G = c * (onehot(y) - softmax), the softmax rebuilt from the saved lse."""
    p = tl.exp(logits - lse[:, None])  # masked columns: exp(-inf) = 0
    onehot = (offs_v[None, :] == y[:, None]).to(tl.float32)
    return coef[:, None] * (onehot - p)


@triton.jit
def _forward_kernel(
    hidden_ptr,  # [T, D]
    heads_ptr,  # [K, V, D]
    targets_ptr,  # [T] int64
    logp_ptr, lse_ptr,  # [T, K] fp32
    T, V, D, K, ignore_index,
    DOT_FP32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    k = tl.program_id(1)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_mask = offs_t < T
    y = tl.load(targets_ptr + offs_t, mask=t_mask, other=ignore_index)
    head_ptr = heads_ptr + tl.cast(k, tl.int64) * V * D
    run_max = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    picked = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < V
        logits = _logits_tile(hidden_ptr, head_ptr, offs_t, t_mask, offs_v, v_mask, D,
                              DOT_FP32, BLOCK_T, BLOCK_V, BLOCK_D)
        # every chunk holds >= 1 real column, so the new max is finite
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
        picked += tl.sum(tl.where(offs_v[None, :] == y[:, None], logits, 0.0), axis=1)
    lse = run_max + tl.log(run_sum)
    logp = tl.where(y != ignore_index, picked - lse, 0.0)
    tl.store(logp_ptr + offs_t * K + k, logp, mask=t_mask)
    tl.store(lse_ptr + offs_t * K + k, lse, mask=t_mask)


@triton.jit
def _grad_hidden_kernel(
    hidden_ptr,  # [T, D]
    heads_ptr,  # [K, V, D]
    targets_ptr,  # [T] int64
    lse_ptr, coef_ptr,  # [T, K] fp32
    partial_ptr,  # [K, T, D] fp32, zero-initialised: dh_k = sum_v G[:, v] H_k[v]
    T, V, D, K,
    DOT_FP32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    k = tl.program_id(1)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_mask = offs_t < T
    y = tl.load(targets_ptr + offs_t, mask=t_mask, other=-1)
    lse = tl.load(lse_ptr + offs_t * K + k, mask=t_mask, other=0.0)
    coef = tl.load(coef_ptr + offs_t * K + k, mask=t_mask, other=0.0)
    k64 = tl.cast(k, tl.int64)
    head_ptr = heads_ptr + k64 * V * D
    out_ptr = partial_ptr + k64 * T * D
    for v0 in range(0, V, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = offs_v < V
        logits = _logits_tile(hidden_ptr, head_ptr, offs_t, t_mask, offs_v, v_mask, D,
                              DOT_FP32, BLOCK_T, BLOCK_V, BLOCK_D)
        g = _grad_logits_tile(logits, offs_v, y, lse, coef)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            w = tl.load(head_ptr + offs_v[:, None] * D + offs_d[None, :],
                        mask=v_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_V, BLOCK_D]
            out = out_ptr + offs_t[:, None] * D + offs_d[None, :]
            out_mask = t_mask[:, None] & d_mask[None, :]
            tl.debug_barrier()  # this program's stores of the previous chunk land first
            acc = tl.load(out, mask=out_mask, other=0.0)
            tl.store(out, acc + dot(g, w, DOT_FP32), mask=out_mask)


@triton.jit
def _grad_head_kernel(
    hidden_ptr,  # [T, D]
    head_ptr,  # [V, D]: expert k
    targets_ptr,  # [T] int64
    lse_ptr, coef_ptr,  # [T, K] fp32; column k is read
    out_ptr,  # [V, D] fp32, zero-initialised: dH_k = sum_t G[t, :]^T h_t
    T, V, D, K, k,
    DOT_FP32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_v = tl.program_id(0)
    offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    v_mask = offs_v < V
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_mask = offs_t < T
        y = tl.load(targets_ptr + offs_t, mask=t_mask, other=-1)
        lse = tl.load(lse_ptr + offs_t * K + k, mask=t_mask, other=0.0)
        coef = tl.load(coef_ptr + offs_t * K + k, mask=t_mask, other=0.0)
        logits = _logits_tile(hidden_ptr, head_ptr, offs_t, t_mask, offs_v, v_mask, D,
                              DOT_FP32, BLOCK_T, BLOCK_V, BLOCK_D)
        g_t = tl.trans(_grad_logits_tile(logits, offs_v, y, lse, coef))  # [BLOCK_V, BLOCK_T]
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            h = tl.load(hidden_ptr + offs_t[:, None] * D + offs_d[None, :],
                        mask=t_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_T, BLOCK_D]
            out = out_ptr + offs_v[:, None] * D + offs_d[None, :]
            out_mask = v_mask[:, None] & d_mask[None, :]
            tl.debug_barrier()  # this program's stores of the previous chunk land first
            acc = tl.load(out, mask=out_mask, other=0.0)
            tl.store(out, acc + dot(g_t, h, DOT_FP32), mask=out_mask)


# --------------------------------------------------------------------------------------------
# launchers (inputs validated and contiguous; contract in torch_backend.py)
# --------------------------------------------------------------------------------------------
def _blocks(T: int, D: int) -> tuple[int, int, int]:
    block_t = min(BLOCK_T, max(16, triton.next_power_of_2(T)))
    block_d = min(BLOCK_D, max(16, triton.next_power_of_2(D)))
    return block_t, BLOCK_V, block_d


def forward(hidden, heads, targets, ignore_index):
    """hidden [T, d], heads [K, V, d], targets [T] int64 -> logp [T, K] fp32, lse [T, K] fp32."""
    T, D = hidden.shape
    K, V, _ = heads.shape
    logp = torch.empty(T, K, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(T, K, dtype=torch.float32, device=hidden.device)
    block_t, block_v, block_d = _blocks(T, D)
    launch(
        _forward_kernel, (triton.cdiv(T, block_t), K),
        hidden, heads, targets, logp, lse,
        T, V, D, K, ignore_index,
        DOT_FP32=hidden.dtype != heads.dtype or dot_in_fp32(hidden.dtype),
        BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_D=block_d,
    )
    return logp, lse


def backward(grad_logp, hidden, heads, targets, lse, ignore_index, compute_grad_hidden,
             compute_grad_heads):
    """-> grad_hidden [T, d] (hidden.dtype) or [0], grad_heads [K, V, d] (heads.dtype) or [0]."""
    T, D = hidden.shape
    K, V, _ = heads.shape
    device = hidden.device
    # c[t, k]: the upstream gradient, zero where the target is ignored (its logp is a constant)
    coef = torch.where((targets != ignore_index).unsqueeze(1), grad_logp.float(), 0.0).contiguous()
    block_t, block_v, block_d = _blocks(T, D)
    dot_fp32 = hidden.dtype != heads.dtype or dot_in_fp32(hidden.dtype)
    grad_hidden = hidden.new_empty(0)
    if compute_grad_hidden:
        partial = torch.zeros(K, T, D, dtype=torch.float32, device=device)
        launch(
            _grad_hidden_kernel, (triton.cdiv(T, block_t), K),
            hidden, heads, targets, lse, coef, partial,
            T, V, D, K,
            DOT_FP32=dot_fp32, BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_D=block_d,
        )
        grad_hidden = (partial[0] if K == 1 else partial.sum(0)).to(hidden.dtype)
    grad_heads = heads.new_empty(0)
    if compute_grad_heads:
        # fp32 heads accumulate in place; 16-bit heads go through one expert's fp32 scratch
        # ([V, d], not [K, V, d]: 0.5 GB rather than 2 GB at V = 32000, d = 4096) and every
        # expert's slice is overwritten by its copy, so only the in-place case needs zeros.
        scratch = None if heads.dtype == torch.float32 else torch.empty(
            V, D, dtype=torch.float32, device=device)
        grad_heads = torch.zeros_like(heads) if scratch is None else torch.empty_like(heads)
        for k in range(K):
            out = grad_heads[k] if scratch is None else scratch.zero_()
            launch(
                _grad_head_kernel, (triton.cdiv(V, block_v),),
                hidden, heads[k], targets, lse, coef, out,
                T, V, D, K, k,
                DOT_FP32=dot_fp32, BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_D=block_d,
            )
            if scratch is not None:
                grad_heads[k].copy_(scratch)
    return grad_hidden, grad_heads
