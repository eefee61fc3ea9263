"""Float64-capable ground truth of the core op (docs/spec.md §1).

Written for clarity, not speed: the formula reads like the spec, works in any floating dtype
(the tests run it in float64) and is differentiable by autograd. Every backend is checked
against it; nothing on a hot path calls it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["molora_linear_ref"]


def molora_linear_ref(
    x: torch.Tensor,  # [..., d_in]
    weight: torch.Tensor,  # [d_out, d_in]
    bias: torch.Tensor | None,  # [d_out]
    lora_a: torch.Tensor,  # [E, r, d_in]
    lora_b: torch.Tensor,  # [E, d_out, r]
    expert_indices: torch.Tensor,  # [..., k], -1 = no expert
    expert_weights: torch.Tensor,  # [..., k]
    scaling: float = 1.0,
) -> torch.Tensor:  # [..., d_out]
    """y_t = W x_t + b + s * sum_j g[t,j] * B_{e[t,j]} A_{e[t,j]} x_t, one gather per slot."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    k = expert_indices.shape[-1]
    idx = expert_indices.reshape(-1, k).long()
    gates = expert_weights.reshape(-1, k)
    y = F.linear(x2, weight, bias)
    for j in range(k):
        active = idx[:, j] >= 0
        e = idx[:, j].clamp(min=0)
        h = torch.einsum("tc,trc->tr", x2, lora_a[e])  # A_e x_t
        delta = torch.einsum("tr,tor->to", h, lora_b[e])  # B_e h
        coef = torch.where(active, gates[:, j], torch.zeros_like(gates[:, j]))
        y = y + scaling * coef.unsqueeze(-1).to(delta.dtype) * delta
    return y.reshape(*lead, weight.shape[0])
