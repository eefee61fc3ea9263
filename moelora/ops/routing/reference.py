"""Float64-capable ground truth of routing and its auxiliary losses (docs/spec.md §2)."""
from __future__ import annotations

import torch

__all__ = ["topk_route_ref", "load_balance_loss_ref", "router_z_loss_ref"]


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
