"""The one schedule of both backends of the per-expert head log-probs (docs/spec.md §5).

Per expert k and chunk of rows: the logits ``h_chunk @ H_k^T`` by cuBLAS (``torch.mm``: on a
GPU the 3 GEMM-sized products are the whole cost, and cuBLAS is the fastest GEMM there is),
into one fp32 ``[rows, V]`` buffer; then row-wise work on it by the backend's kernels
(``row_stats``, ``grad_logits``: torch ops, or one Triton launch each). Peak memory beyond the
inputs and gradients is one chunk of logits.

    forward   logits -> (lse, the target's logit) per row        1 GEMM-equivalent
    backward  logits again -> G = c (onehot(y) - softmax) -> grad_hidden += G H_k,
              grad_H_k += G^T h                                   3 GEMM-equivalents

Four in all for trainable heads: without the upstream gradient c the forward cannot form G,
and keeping the logits for the backward is the [T, K, V] memory the op exists to avoid (the
fused mixture-DPO loss, which knows c, does 3). With frozen heads (``precompute``: MoE-DPO's
shared reference / LM head) the forward also forms, per (t, k), the vector
``D[t, k] = H_k[y_t] - softmax(H_k h_t) @ H_k`` (one more GEMM, [T, K, d] fp32 kept), and the
backward is ``grad_hidden[t] = sum_k c[t, k] D[t, k]``: 2 GEMM-equivalents in all.
"""
from __future__ import annotations

import torch

from moelora.ops.dtypes import accumulate_dtype, compute_dtype

__all__ = ["forward", "backward", "basis_like", "CHUNK_ELEMENTS"]

# Elements of one chunk of logits (fp32). CPU: 2^21 = 8 MiB (at T=512, d=256, V=8000, K=4 the
# peak of forward + backward was 48 MiB with 2^21, 44 with 2^20, 63 with 2^22, 188 naive; 31 MiB
# of it grad_heads itself). GPU: 2^26 = 256 MiB, GEMMs of >= 2048 rows at V = 32000.
CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 26}


def _chunk_rows(T: int, V: int, device: torch.device) -> int:
    return max(1, min(T, CHUNK_ELEMENTS.get(device.type, 1 << 21) // V))


def _logits(h: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """fp32 [rows, V] = h @ head^T in the pair's compute dtype (16-bit: the tensor cores,
    accumulated in fp32, the product written in fp32 where cuBLAS can)."""
    cd = compute_dtype(h.dtype, head.dtype)
    a, b = h.to(cd), head.to(cd)
    if cd != torch.float32 and a.is_cuda and hasattr(torch.ops.aten.mm, "dtype"):
        return torch.ops.aten.mm.dtype(a, b.t(), torch.float32)
    return (a @ b.t()).to(accumulate_dtype(h.dtype, head.dtype))


def basis_like(hidden, heads, precompute: bool) -> torch.Tensor:
    T, d = hidden.shape
    K = heads.shape[0]
    acc = accumulate_dtype(hidden.dtype, heads.dtype)
    return hidden.new_empty(T, K, d, dtype=acc) if precompute else hidden.new_empty(0, dtype=acc)


def forward(ops, hidden, heads, targets, ignore_index, precompute: bool):
    """-> logp [T, K], lse [T, K] (accumulate dtype), basis D [T, K, d] (or [0])."""
    T, d = hidden.shape
    K, V, _ = heads.shape
    acc = accumulate_dtype(hidden.dtype, heads.dtype)
    logp = hidden.new_empty(T, K, dtype=acc)
    lse = hidden.new_empty(T, K, dtype=acc)
    basis = basis_like(hidden, heads, precompute)
    valid = targets != ignore_index
    rows = _chunk_rows(T, V, hidden.device)
    for k in range(K):
        head = heads[k]
        for s in range(0, T, rows):
            e = min(T, s + rows)
            logits = _logits(hidden[s:e], head)
            chunk_lse, picked = ops.row_stats(logits, targets[s:e], ignore_index)
            logp[s:e, k] = torch.where(valid[s:e], picked - chunk_lse, 0.0)
            lse[s:e, k] = chunk_lse
            if precompute:  # D = (onehot - softmax) @ H_k, ignored rows 0
                coef = valid[s:e].to(acc)
                g = ops.grad_logits(logits, targets[s:e], chunk_lse, coef, compute_dtype(hidden.dtype, heads.dtype))
                basis[s:e, k] = (g @ head.to(g.dtype)).to(acc)
    return logp, lse, basis


def backward(ops, grad_logp, hidden, heads, targets, lse, basis, ignore_index, compute_grad_hidden,
             compute_grad_heads):
    """-> grad_hidden [T, d] (hidden.dtype) or [0], grad_heads [K, V, d] (heads.dtype) or [0]."""
    T, d = hidden.shape
    K, V, _ = heads.shape
    acc = lse.dtype
    cd = compute_dtype(hidden.dtype, heads.dtype)
    valid = targets != ignore_index
    coef = torch.where(valid.unsqueeze(1), grad_logp.to(acc), 0.0)  # ignored rows: constants
    if compute_grad_hidden and not compute_grad_heads and basis.numel():  # frozen heads: no GEMM
        grad_hidden = torch.einsum("tk,tkd->td", coef, basis).to(hidden.dtype)
        return grad_hidden, heads.new_empty(0)
    grad_hidden = hidden.new_zeros(T, d, dtype=acc) if compute_grad_hidden else None
    grad_heads = torch.empty_like(heads) if compute_grad_heads else heads.new_empty(0)
    if compute_grad_heads and T == 0:
        grad_heads.zero_()
    rows = _chunk_rows(T, V, hidden.device)
    for k in range(K):
        head = heads[k].to(cd)
        for s in range(0, T, rows):
            e = min(T, s + rows)
            h = hidden[s:e].to(cd)
            g = ops.grad_logits(_logits(hidden[s:e], heads[k]), targets[s:e], lse[s:e, k],
                                coef[s:e, k], cd)
            if compute_grad_hidden:
                grad_hidden[s:e] += (g @ head).to(acc)
            if compute_grad_heads:  # accumulated in the heads' own dtype: no [V, d] fp32 scratch
                part = g.t() @ h
                if s == 0:
                    grad_heads[k].copy_(part)
                else:
                    grad_heads[k].add_(part.to(heads.dtype))
    grad_hidden = grad_hidden.to(hidden.dtype) if compute_grad_hidden else hidden.new_empty(0)
    return grad_hidden, grad_heads
