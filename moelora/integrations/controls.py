"""Model-wide controls over every `MoLoRALinear` of a model: per-batch gates and preferences,
recorded routing, adapters off, merging."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from moelora.layers.molora_linear import molora_layers

__all__ = [
    "set_gates", "set_preference", "set_record_routing", "clear_router_states",
    "disable_adapters", "merge_layers", "unmerge_layers",
]


def set_gates(model: nn.Module, gates: Optional[Tensor]) -> int:
    """Set the gates of every fixed-gate router: ``[E]`` (whole batch) or ``[batch, E]`` (one
    row per sequence, broadcast over its tokens); None goes back to the default gates.
    Returns how many layers took them."""
    count = 0
    for _, layer in molora_layers(model):
        if layer.router.accepts_gates:
            layer.router.gates = None if gates is None else torch.as_tensor(gates).to(
                layer.router.default_gates.device)
            count += 1
    return count


def set_preference(model: nn.Module, preference: Optional[Tensor]) -> int:
    """Set the user preference ``lambda`` (``[N]`` or ``[batch, N]``, on the simplex) of every
    hierarchical (HoE) router; None goes back to uniform. Returns how many layers took it."""
    count = 0
    for _, layer in molora_layers(model):
        if layer.router.accepts_preference:
            layer.router.set_preference(preference)
            count += 1
    return count


def set_record_routing(model: nn.Module, enabled: bool = True) -> None:
    """Record ``router_state`` in eval mode too (training mode always records)."""
    for _, layer in molora_layers(model):
        layer.record_routing = bool(enabled)


def clear_router_states(model: nn.Module) -> None:
    """Drop the recorded routing (and the autograd graph it holds)."""
    for _, layer in molora_layers(model):
        layer.router_state = None


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block every MoLoRALinear computes its base layer alone (e.g. the DPO
    reference model). Merged layers must be unmerged first."""
    layers = [layer for _, layer in molora_layers(model)]
    if any(layer.merged for layer in layers):
        raise RuntimeError("disable_adapters: unmerge the merged layers first")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous):
            layer.disabled = flag


def merge_layers(model: nn.Module, gates: Optional[Tensor] = None, *, keep_original: bool = True) -> int:
    """`MoLoRALinear.merge` on every layer (same gate vector [E] for all, or each router's
    fixed gates). Returns the number of merged layers."""
    count = 0
    for _, layer in molora_layers(model):
        layer.merge(gates, keep_original=keep_original)
        count += 1
    return count


def unmerge_layers(model: nn.Module) -> int:
    count = 0
    for _, layer in molora_layers(model):
        if layer.merged:
            layer.unmerge()
            count += 1
    return count
