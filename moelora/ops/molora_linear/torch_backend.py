"""The torch backend of the core op: the dense-masked formulation in rank space.

Static shapes, no host sync; O(T * E * r * d) work, the right trade while E * r is small
(docs/perf.md) and a portable fallback everywhere else. Contract (shared by every backend; the
op validates and makes inputs contiguous first):

    forward(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling)
        x               [T, d_in]       dtype = weight.dtype
        weight          [d_out, d_in]
        bias            [d_out] | None  weight.dtype
        lora_a          [E, r, d_in]    float32 / bfloat16 / float16 / float64
        lora_b          [E, d_out, r]   lora_a.dtype
        expert_indices  [T, k] int64    values in [-1, E)
        expert_weights  [T, k] accumulate dtype (float32; float64 when x or lora_a is float64)
        -> y [T, d_out] (x.dtype), h [T, k, r] accumulate dtype (A_e x_t; 0 where e = -1),
           state: a tensor the backend's own backward reuses (its routing plan, say; shape
           ``state_like(x, lora_a, expert_indices)``, [0] where there is nothing to keep)

    backward(grad_out, x, weight, lora_a, lora_b, expert_indices, expert_weights, h, state,
             scaling, compute_grad_x, compute_grad_adapters)
        -> grad_x [T, d_in] (x.dtype; shape [0] when not compute_grad_x),
           grad_lora_a (lora_a.dtype), grad_lora_b (lora_b.dtype) (both shape [0] when not
           compute_grad_adapters: frozen experts skip the weight-gradient passes),
           grad_expert_weights [T, k] (expert_weights.dtype)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moelora.ops.dtypes import compute_dtype

__all__ = ["forward", "backward", "state_like", "no_state", "ACCEPTS_NO_BASE"]

# weight=None (and bias None) computes the LoRA delta alone: the base-free op molora_delta
# runs this backend without a zero base GEMM.
ACCEPTS_NO_BASE = True


def no_state(x, lora_a, expert_indices) -> torch.Tensor:
    """The state of a backend that keeps nothing between forward and backward."""
    return expert_indices.new_empty(0)


state_like = no_state


def _slot_to_expert(values: torch.Tensor, idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Scatter per-slot vectors [T, k, r] into per-expert columns [T, E, r] (duplicates add)."""
    T, k, r = values.shape
    out = values.new_zeros(T, num_experts + 1, r)  # column E collects the -1 slots
    target = torch.where(idx >= 0, idx, num_experts)
    out.scatter_add_(1, target.unsqueeze(-1).expand(T, k, r), values)
    return out[:, :num_experts]


def _expert_to_slot(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather per-expert columns [T, E, r] into slots [T, k, r]; -1 slots read 0."""
    T, k = idx.shape
    r = values.shape[-1]
    picked = values.gather(1, idx.clamp(min=0).unsqueeze(-1).expand(T, k, r))
    return picked * (idx >= 0).unsqueeze(-1)


def forward(x, weight, bias, lora_a, lora_b, idx, gates, scaling):
    T = x.shape[0]
    E, r, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    acc = gates.dtype
    cd = compute_dtype(x.dtype, lora_a.dtype)
    h_all = (x.to(cd) @ lora_a.reshape(E * r, d_in).to(cd).t()).to(acc).view(T, E, r)
    h = _expert_to_slot(h_all, idx)
    z = _slot_to_expert(h * (scaling * gates).unsqueeze(-1), idx, E).reshape(T, E * r)
    b_flat = lora_b.permute(1, 0, 2).reshape(d_out, E * r)  # column e*r+i = B_e[:, i]
    cd_b = compute_dtype(x.dtype, lora_b.dtype)
    delta = z.to(cd_b) @ b_flat.to(cd_b).t()
    if weight is None:
        return delta.to(acc).to(x.dtype), h, no_state(x, lora_a, idx)
    y = (F.linear(x, weight, bias).to(acc) + delta.to(acc)).to(x.dtype)
    return y, h, no_state(x, lora_a, idx)


def backward(grad_out, x, weight, lora_a, lora_b, idx, gates, h, state, scaling, compute_grad_x,
             compute_grad_adapters):
    T = x.shape[0]
    E, r, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    acc = gates.dtype
    cd_b = compute_dtype(grad_out.dtype, lora_b.dtype)
    b_flat = lora_b.permute(1, 0, 2).reshape(d_out, E * r)
    u_all = (grad_out.to(cd_b) @ b_flat.to(cd_b)).to(acc).view(T, E, r)  # B_e^T dy_t
    u = _expert_to_slot(u_all, idx)
    grad_gates = scaling * (u * h).sum(-1)
    coef = (scaling * gates).unsqueeze(-1)
    uz = _slot_to_expert(u * coef, idx, E).reshape(T, E * r)  # s g u, by expert column
    if compute_grad_adapters:
        hz = _slot_to_expert(h * coef, idx, E).reshape(T, E * r)  # s g h, by expert column
        grad_b = (hz.t() @ grad_out.to(acc)).view(E, r, d_out).transpose(1, 2).to(lora_b.dtype).contiguous()
        grad_a = (uz.t() @ x.to(acc)).view(E, r, d_in).to(lora_a.dtype).contiguous()
    else:
        grad_a, grad_b = lora_a.new_empty(0), lora_b.new_empty(0)
    if compute_grad_x:
        cd_a = compute_dtype(x.dtype, lora_a.dtype)
        lora_dx = uz.to(cd_a) @ lora_a.reshape(E * r, d_in).to(cd_a)
        base_dx = 0 if weight is None else torch.mm(grad_out, weight).to(acc)
        grad_x = (base_dx + lora_dx.to(acc)).to(x.dtype)
    else:
        grad_x = x.new_empty(0)
    return grad_x, grad_a, grad_b, grad_gates
