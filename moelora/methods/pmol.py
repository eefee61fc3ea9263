"""PMoL — Preference Mixture of LoRAs (docs/spec.md §3; seed: arXiv 2411.01245).

Each target linear gets ``E = P * m`` LoRA experts in P preference groups of m experts (group p
owns experts ``[p*m, (p+1)*m)``), plus an optional empty expert (id -1: the token falls back
on the frozen base weight), routed top-k from context. Only routers and experts train; the
training loss adds the expert group soft loss, the load-balance loss and the router z-loss,
all computed from the routing each layer recorded in its forward:

    model = moelora.inject(model, PMoLConfig(num_preferences=2, experts_per_preference=2))
    out = model(input_ids)                            # training mode: routing is recorded
    aux = moelora.aux_loss(model, preference_labels=labels, weights=config)
    loss = dpo_loss + aux["total"]

See `moelora.losses.pmol` for the loss formulas.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from moelora.integrations.config import LoRAConfig
from moelora.layers.molora_linear import MoLoRALinear, molora_layers

__all__ = ["PMoLConfig", "group_mass"]


@dataclass
class PMoLConfig(LoRAConfig):
    """Configuration of a PMoL model; pass it to `moelora.inject`. The fields of
    `moelora.integrations.LoRAConfig` (target_modules, exclude_modules, r, freeze_base,
    lora_alpha, lora_dropout, use_rslora, init_lora_weights) plus:

    Attributes:
        num_preferences: P, the number of preference groups (e.g. helpful / harmless).
        experts_per_preference: m, LoRA experts per group; E = P * m.
        empty_expert: add the empty expert (an extra router column; id -1, no compute).
        top_k: experts per token (1 <= top_k <= E).
        noisy_router: Shazeer-style noisy top-k in training.
        router_bias: learnable router bias.
        group_loss_weight: w_group for the expert group soft loss.
        balance_loss_weight: w_balance for the Switch load-balance loss.
        z_loss_weight: weight of the router z-loss.
        group_temperature: temperature T of the group loss: probabilities softmax(logits / T).
        eps: inside log(group mass + eps).
    """

    num_preferences: int = 2
    experts_per_preference: int = 1
    empty_expert: bool = True
    top_k: int = 2
    noisy_router: bool = False
    router_bias: bool = False
    group_loss_weight: float = 0.1
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    group_temperature: float = 1.0
    eps: float = 1e-6

    def __post_init__(self):
        if self.num_preferences < 1 or self.experts_per_preference < 1:
            raise ValueError("num_preferences and experts_per_preference must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, {self.num_experts}] (E = P * m), got {self.top_k}")
        if self.group_temperature <= 0:
            raise ValueError(f"group_temperature must be > 0, got {self.group_temperature}")

    @property
    def num_experts(self) -> int:
        return self.num_preferences * self.experts_per_preference

    @property
    def expert_groups(self) -> list[int]:
        """Preference group of each expert: expert e belongs to group e // m."""
        return [e // self.experts_per_preference for e in range(self.num_experts)]

    @property
    def loss_weights(self) -> dict:
        return {"group": self.group_loss_weight, "balance": self.balance_loss_weight,
                "z": self.z_loss_weight}

    def make_layer(self, base_layer: nn.Linear, name: str = "") -> MoLoRALinear:
        router = {"type": "topk", "k": self.top_k, "empty_expert": self.empty_expert,
                  "noisy": self.noisy_router, "bias": self.router_bias}
        return MoLoRALinear(base_layer, self.num_experts, self.r, self.lora_alpha, self.lora_dropout,
                            use_rslora=self.use_rslora, router=router,
                            init_lora_weights=self.init_lora_weights, expert_groups=self.expert_groups)


def group_mass(model: nn.Module, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Mean router probability mass per preference group, per sequence: ``[batch, G]`` averaged
    over tokens and over the PMoL layers that recorded routing in their last forward (training
    mode or ``set_record_routing``). With an empty expert, a last column holds its mass. For
    logging and for checking that the router specialises by preference."""
    masses = []
    for _, layer in molora_layers(model):
        state = layer.router_state
        if layer.expert_groups is None or state is None or state.probs is None:
            continue
        probs = state.probs.detach().float()
        batch = probs.shape[0]
        probs = probs.reshape(batch, -1, probs.shape[-1])  # [B, L, E']
        groups = torch.tensor(layer.expert_groups, device=probs.device)
        num_groups = int(groups.max()) + 1
        member = torch.zeros(probs.shape[-1], num_groups + 1, device=probs.device)
        member[torch.arange(len(groups)), groups] = 1.0
        if probs.shape[-1] > len(groups):  # the empty expert's column
            member[len(groups):, num_groups] = 1.0
        else:
            member = member[:, :num_groups]
        mass = probs @ member  # [B, L, G(+1)]
        if attention_mask is not None:
            w = attention_mask.reshape(batch, -1).to(mass.dtype)
            masses.append((mass * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1))
        else:
            masses.append(mass.mean(1))
    if not masses:
        raise RuntimeError("group_mass: no PMoL layer recorded its routing (run a forward in training "
                           "mode, or call moelora.layers.set_record_routing(model) first)")
    return torch.stack(masses).mean(0)
