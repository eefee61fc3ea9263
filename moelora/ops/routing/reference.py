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
    """softmax, top-k, optional renormalisation; the last column is the empty expert (id -1).

    Degenerate logits (the policy every backend follows):
      - ``-inf`` marks a masked expert: it gets probability 0 and is never routed to. A slot
        the top-k gives to a masked expert (k larger than the unmasked experts of the row) is
        ``id -1, gate 0``; a fully masked row has probs 0 and routes to no expert.
      - ``+inf``: the limit of softmax: the ``+inf`` columns of the row share its mass equally,
        every other column gets 0.
      - NaN anywhere in a row makes that row's probs and gates NaN (ids stay in range): a
        diverged router shows in the loss instead of being routed around silently.
    """
    masked = logits == -float("inf")
    top = logits == float("inf")
    logits = torch.where(top.any(-1, keepdim=True), torch.where(top, 0.0, -float("inf")), logits)
    probs = torch.softmax(logits, dim=-1)
    probs = torch.where(masked.all(-1, keepdim=True), 0.0, probs)  # softmax gives NaN there
    weights, indices = torch.topk(probs, k, dim=-1)
    dead = masked.gather(-1, indices)
    weights = torch.where(dead, 0.0, weights)
    if renormalize:
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / torch.where(total == 0, 1.0, total)  # a fully masked row stays 0
    if empty_expert:
        indices = torch.where(indices == logits.shape[-1] - 1, -1, indices)
    indices = torch.where(dead, -1, indices)
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
