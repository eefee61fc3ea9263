"""Plain-PyTorch ground truth for the ops of spec §1-2.

Written for clarity, not speed: every formula reads like the spec, works in any floating dtype
(the tests run it in float64) and is differentiable by autograd. The fast backends are checked
against these functions; nothing on a hot path calls them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "molora_linear_ref",
    "topk_route_ref",
    "load_balance_loss_ref",
    "router_z_loss_ref",
]


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


def topk_route_ref(
    logits: torch.Tensor,  # [..., E'] router logits
    k: int,
    renormalize: bool = True,
    empty_expert: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax, top-k, optional renormalisation; the last column is the empty expert (id -1)."""
    probs = torch.softmax(logits, dim=-1)
    weights, indices = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if empty_expert:
        indices = torch.where(indices == logits.shape[-1] - 1, -1, indices)
    return probs, indices, weights


def load_balance_loss_ref(
    probs: torch.Tensor,  # [T, E'] router probabilities
    expert_indices: torch.Tensor,  # [T, k]
    num_experts: int | None = None,
) -> torch.Tensor:
    """Switch-style E * sum_e f_e * P_e; f_e counts routed slots (id -1 slots are not routed)."""
    num_experts = probs.shape[-1] if num_experts is None else num_experts
    idx = expert_indices.reshape(-1)
    routed = idx[idx >= 0]
    counts = torch.bincount(routed, minlength=num_experts)[:num_experts].to(probs.dtype)
    f = counts / max(routed.numel(), 1)
    p_mean = probs.reshape(-1, probs.shape[-1])[:, :num_experts].mean(dim=0)
    return num_experts * (f * p_mean).sum()


def router_z_loss_ref(logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits.reshape(-1, logits.shape[-1]), dim=-1).pow(2).mean()
