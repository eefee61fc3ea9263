"""Auxiliary router losses of PMoL (docs/spec.md §2-3), and `aux_loss`, which collects them from every
`MoLoRALinear` of a model after a forward.

    expert group soft loss  L_group = - mean_t log( sum_{e in G_p} p[t,e] + eps )
                            p = softmax(logits / T); a sequence labelled p = -1 adds nothing;
                            per-sequence token means, then the mean over labelled sequences
    load-balance loss       L_balance = E * sum_e f_e * P_e   (Switch Transformer)
                            f_e: fraction of routed slots (id >= 0) that went to e,
                            P_e: mean over tokens of p[:, e]  (e < E: the empty expert's column
                            is neither counted nor balanced)
    router z-loss           L_z = mean_t logsumexp(logits_t)^2

The routing comes from ``layer.router_state``, recorded (with its autograd graph) by each
layer's last forward in training mode; call `aux_loss` after the forward whose routing should
be regularised (one forward over chosen + rejected for DPO, not two). With activation
checkpointing use the non-reentrant kind (transformers: ``gradient_checkpointing_enable(
gradient_checkpointing_kwargs={"use_reentrant": False})``): the reentrant kind runs the first
forward without grad, so the recorded routing would carry no gradient to the routers.

Without a mask these equal `moelora.reference.load_balance_loss_ref` / `router_z_loss_ref`;
unlike the reference they make no host sync (no data-dependent shapes), so they run inside
torch.compile and CUDA graphs.
"""
from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from moelora.layers.molora_linear import molora_layers
from moelora.ops.checks import check_true
from moelora.ops.dtypes import accumulate_dtype

__all__ = [
    "expert_group_soft_loss",
    "load_balance_loss",
    "router_z_loss",
    "aux_loss",
    "DEFAULT_AUX_WEIGHTS",
]

# PMoLConfig's defaults: the group loss shapes routing; balance and z only regularise it.
DEFAULT_AUX_WEIGHTS = {"group": 0.1, "balance": 0.01, "z": 0.001}


def _token_weights(mask: Optional[Tensor], lead: torch.Size, device, dtype) -> Tensor:
    if mask is None:
        return torch.ones(lead, device=device, dtype=dtype)
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, expected the routing's "
                         f"leading shape {tuple(lead)}")
    return mask.to(device=device, dtype=dtype)


def _hard_group_loss(probs, groups, labels, eps, attention_mask):
    acc = accumulate_dtype(probs.dtype)
    batch, columns = probs.shape[0], probs.shape[-1]
    if labels.shape != (batch,):
        raise ValueError(f"preference labels must be [batch] = [{batch}] (int) or [batch, P] (float), "
                         f"got {tuple(labels.shape)}")
    weights = _token_weights(attention_mask, probs.shape[:-1], probs.device, acc).reshape(batch, -1)
    p = probs.to(acc).reshape(batch, -1, columns)  # [B, L, E']
    labels = labels.to(probs.device).long()
    # member[e, b] = 1 when expert e is in the group sequence b is labelled with
    member = (groups.unsqueeze(1) == labels.clamp(min=0).unsqueeze(0)).to(acc)  # [E, B]
    member = torch.cat([member, member.new_zeros(columns - len(groups), batch)])  # empty expert: no group
    mass = torch.einsum("ble,eb->bl", p, member)  # [B, L]
    nll = -torch.log(mass + eps)
    per_sequence = (nll * weights).sum(1) / weights.sum(1).clamp(min=1)
    labelled = (labels >= 0).to(acc)
    return (per_sequence * labelled).sum() / labelled.sum().clamp(min=1)


def expert_group_soft_loss(
    probs: Tensor,  # [batch, ..., E'] router probabilities (already at the wanted temperature)
    expert_groups: Tensor,  # [E] int: group of each expert (E <= E'; extra columns: empty expert)
    labels: Tensor,  # [batch] int (-1 = unlabelled) or [batch, P] float soft / multi-label weights
    *,
    eps: float = 1e-6,
    attention_mask: Optional[Tensor] = None,  # [batch, ...] (1 = real token)
) -> Tensor:
    """``- mean_t log(sum_{e in G_p} p[t, e] + eps)`` per labelled sequence, averaged over them.

    Hard labels ``[batch]``: one group per sequence (-1: unlabelled, no loss). Soft or
    multi-label targets ``[batch, P]`` (float, non-negative): a sequence with weights ``c_p``
    adds ``- sum_p c_p mean_t log(sum_{e in G_p} p[t, e] + eps) / sum_p c_p`` (each labelled
    group pulled in proportion to its weight, e.g. ``[1, 1]`` for helpful and harmless); an
    all-zero row is unlabelled. A one-hot row equals the hard label.
    """
    acc = accumulate_dtype(probs.dtype)
    batch, columns = probs.shape[0], probs.shape[-1]
    groups = expert_groups.to(probs.device).long()
    if labels.dim() == 2 and labels.is_floating_point():
        P = labels.shape[1]
        if labels.shape[0] != batch:
            raise ValueError(f"soft preference labels must be [batch, P] = [{batch}, P], got {tuple(labels.shape)}")
        if bool((labels < 0).any()):
            raise ValueError("soft preference labels must be non-negative weights")
        if len(groups) and int(groups.max()) >= P:
            raise ValueError(f"soft preference labels have P = {P} columns, but expert_groups names group {int(groups.max())}")
        targets = labels.to(device=probs.device, dtype=acc)  # [B, P]
    else:
        return _hard_group_loss(probs, groups, labels, eps, attention_mask)
    weights = _token_weights(attention_mask, probs.shape[:-1], probs.device, acc).reshape(batch, -1)
    p = probs.to(acc).reshape(batch, -1, columns)  # [B, L, E']
    # member[e, q] = 1 when expert e is in group q; the empty expert's columns are in none
    member = (groups.unsqueeze(1) == torch.arange(P, device=probs.device).unsqueeze(0)).to(acc)  # [E, P]
    member = torch.cat([member, member.new_zeros(columns - len(groups), P)])
    mass = torch.einsum("ble,ep->blp", p, member)  # [B, L, P]
    nll = -torch.log(mass + eps)
    per_group = (nll * weights.unsqueeze(-1)).sum(1) / weights.sum(1).clamp(min=1).unsqueeze(-1)  # [B, P]
    total = targets.sum(1)
    labelled = (total > 0).to(acc)
    per_sequence = (per_group * targets).sum(1) / total.clamp(min=torch.finfo(acc).tiny)
    return (per_sequence * labelled).sum() / labelled.sum().clamp(min=1)


def load_balance_loss(
    probs: Tensor,  # [..., E'] router probabilities
    expert_indices: Tensor,  # [..., k], -1 = not routed
    num_experts: Optional[int] = None,  # E (default E'): columns past E are not balanced
    *,
    attention_mask: Optional[Tensor] = None,  # [...] (1 = real token)
) -> Tensor:
    """Switch-style ``E * sum_e f_e * P_e`` over real (unmasked) tokens."""
    acc = accumulate_dtype(probs.dtype)
    columns = probs.shape[-1]
    E = columns if num_experts is None else num_experts
    weights = _token_weights(attention_mask, probs.shape[:-1], probs.device, acc).reshape(-1)
    p = probs.to(acc).reshape(-1, columns)[:, :E]
    idx = expert_indices.reshape(p.shape[0], -1).long()
    routed = (idx >= 0) & (weights > 0).unsqueeze(-1)
    bins = torch.where(routed, idx, E).reshape(-1)  # bin E collects what is not routed
    counts = torch.zeros(E + 1, device=p.device, dtype=acc).scatter_add_(0, bins, torch.ones_like(bins, dtype=acc))
    f = counts[:E] / routed.sum().to(acc).clamp(min=1)
    p_mean = (p * weights.unsqueeze(-1)).sum(0) / weights.sum().clamp(min=1)
    return E * (f * p_mean).sum()


def router_z_loss(logits: Tensor, *, attention_mask: Optional[Tensor] = None) -> Tensor:
    """``mean_t logsumexp(logits_t)^2`` (ST-MoE), over real tokens."""
    acc = accumulate_dtype(logits.dtype)
    weights = _token_weights(attention_mask, logits.shape[:-1], logits.device, acc).reshape(-1)
    z = torch.logsumexp(logits.to(acc).reshape(-1, logits.shape[-1]), dim=-1).pow(2)
    return (z * weights).sum() / weights.sum().clamp(min=1)


def _check_labels(labels: Tensor, num_groups: int) -> None:
    if labels.is_floating_point() and labels.dim() == 2:
        return  # soft / multi-label weights: expert_group_soft_loss checks them
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"preference_labels must be an integer tensor [batch] (group ids, -1 = "
                        f"unlabelled) or float weights [batch, P], got dtype {labels.dtype} and "
                        f"shape {tuple(labels.shape)}")
    check_true((labels >= -1) & (labels < num_groups),
               f"preference_labels must be -1 (unlabelled) or a preference group in [0, {num_groups})")


def aux_loss(
    model: nn.Module,
    preference_labels: Optional[Tensor] = None,
    weights: Union[None, Mapping[str, float], object] = None,
    *,
    attention_mask: Optional[Tensor] = None,
    temperature: Optional[float] = None,
    eps: Optional[float] = None,
    return_dict: bool = True,
):
    """The aux losses of every `MoLoRALinear` in model, from the routing its last forward recorded.

    Each loss is averaged over the layers it applies to: group loss over layers with
    ``expert_groups`` (PMoL) when ``preference_labels`` are given, balance loss over layers that
    routed top-k, z-loss over layers whose router has logits. Losses with no layer are 0 (e.g.
    a model whose routers have no logits), but never silently for lack of a recording: a
    RuntimeError when no layer recorded its routing (an eval-mode forward records nothing,
    unless `set_record_routing`), when a layer in eval mode holds a recording from an earlier
    training forward (not the last forward's), or when the routing was recorded without autograd
    while its router trains (reentrant activation checkpointing runs the forward under no_grad:
    the routers would get no gradient from the aux losses; use ``use_reentrant=False``).

    Args:
        model: any model holding MoLoRALinear layers (after a forward in training mode, or with
            `set_record_routing`).
        preference_labels: ``[batch]`` integer preference group per sequence, -1 = unlabelled
            (a label outside ``[-1, groups)`` is a ValueError), or ``[batch, P]`` float soft /
            multi-label weights (see `expert_group_soft_loss`).
        weights: ``{"group": w, "balance": w, "z": w}`` (missing keys: 0), or a `PMoLConfig`
            (its weights, temperature and eps). Default `DEFAULT_AUX_WEIGHTS`.
        attention_mask: ``[batch, seq]``, 1 for real tokens: padding adds to no loss.
        temperature, eps: of the group loss (default: from a PMoLConfig, else 1.0 and 1e-6).
        return_dict: return ``{"group", "balance", "z", "total"}`` (default) or just the total.
    """
    if weights is None:
        w = dict(DEFAULT_AUX_WEIGHTS)
    elif isinstance(weights, Mapping):
        unknown = set(weights) - {"group", "balance", "z"}
        if unknown:
            raise ValueError(f"unknown aux loss weights {sorted(unknown)}; known: group, balance, z")
        w = {key: float(weights.get(key, 0.0)) for key in ("group", "balance", "z")}
    elif hasattr(weights, "loss_weights"):  # PMoLConfig
        w = dict(weights.loss_weights)
        temperature = weights.group_temperature if temperature is None else temperature
        eps = weights.eps if eps is None else eps
    else:
        raise TypeError(f"weights must be None, a dict or a PMoLConfig, got {type(weights).__name__}")
    temperature = 1.0 if temperature is None else float(temperature)
    eps = 1e-6 if eps is None else float(eps)

    group, balance, z = [], [], []
    device = None
    recorded = 0
    for name, layer in molora_layers(model):
        state = layer.router_state
        if state is None:
            continue
        if not (layer.training or layer.record_routing):
            raise RuntimeError(
                f"aux_loss: {name or 'the layer'} is in eval mode and does not record its routing, so "
                f"its router_state is from an earlier training forward, not the last forward: call "
                f"aux_loss after a training-mode forward, or moelora.integrations.set_record_routing("
                f"model) before an eval-mode one (clear_router_states drops old recordings)")
        recorded += 1
        if (torch.is_grad_enabled() and layer.training and state.expert_weights.grad_fn is None
                and any(p.requires_grad for p in layer.router.parameters())):
            raise RuntimeError(
                f"aux_loss: {name or 'the layer'}'s routing was recorded without autograd while its "
                f"router trains (a forward under no_grad, e.g. reentrant activation checkpointing): "
                f"the aux losses would not reach the router. Checkpoint with use_reentrant=False "
                f"(transformers: gradient_checkpointing_kwargs={{'use_reentrant': False}})")
        probs, logits = state.probs, state.logits
        device = state.expert_weights.device
        lead = state.expert_indices.shape[:-1]
        mask = attention_mask if (attention_mask is not None and tuple(attention_mask.shape) == tuple(lead)) else None
        if attention_mask is not None and mask is None:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but layer routing "
                             f"has leading shape {tuple(lead)}")
        if preference_labels is not None and layer.expert_groups is not None and probs is not None:
            p = probs
            if temperature != 1.0 and logits is not None:
                p = torch.softmax(logits.to(accumulate_dtype(logits.dtype)) / temperature, dim=-1)
            groups = torch.tensor(layer.expert_groups, device=p.device)
            labels = torch.as_tensor(preference_labels)
            _check_labels(labels, max(layer.expert_groups) + 1)
            group.append(expert_group_soft_loss(p, groups, labels, eps=eps, attention_mask=mask))
        if probs is not None and state.expert_indices.shape[-1] < probs.shape[-1]:  # sparse top-k
            balance.append(load_balance_loss(probs, state.expert_indices, state.num_experts,
                                             attention_mask=mask))
        if logits is not None:
            z.append(router_z_loss(logits, attention_mask=mask))

    if recorded == 0:
        raise RuntimeError(
            "aux_loss: no MoLoRALinear of the model recorded its routing (none exists, or the last "
            "forward ran in eval mode, which records nothing): run the forward in training mode, "
            "or call moelora.integrations.set_record_routing(model) first")

    def mean(values):
        return torch.stack(values).mean() if values else torch.zeros((), device=device)

    losses = {"group": mean(group), "balance": mean(balance), "z": mean(z)}
    losses["total"] = sum(w[key] * losses[key] for key in ("group", "balance", "z"))
    return losses if return_dict else losses["total"]
