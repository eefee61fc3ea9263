"""Model-wide controls over every `MoLoRALinear` of a model: per-batch gates and preferences
(`routing_inputs`, scoped to a block; the model-wide `set_gates` / `set_preference` are
deprecated), recorded routing, adapters off, merging."""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from moelora.integrations.routing_context import routers_taking, routing_checkpoint_context, routing_inputs
from moelora.layers.molora_linear import molora_layers

__all__ = [
    "routing_inputs", "routing_checkpoint_context", "set_gates", "set_preference", "set_record_routing", "clear_router_states",
    "disable_adapters", "merge_layers", "unmerge_layers",
]


_STATE_WARNING = (
    "{name} sets the routers' {what} model-wide until the next call: a forgotten call reuses the "
    "last batch's, every thread shares it, and activation checkpointing cannot replay it. Use "
    "`with moelora.routing_inputs(model, {what}=...)` (scoped to the block, per thread), or the "
    "layer's {what}= forward argument")


def set_gates(model: nn.Module, gates: Optional[Tensor]) -> int:
    """Deprecated: use `routing_inputs`. Set the gates of every fixed-gate router model-wide:
    ``[E]`` (whole batch) or ``[batch, E]`` (one row per sequence, broadcast over its tokens);
    None goes back to the default gates. Returns how many layers took them; ValueError when
    the model has no fixed-gate router."""
    routers = routers_taking(model, "gates")
    if gates is not None:
        warnings.warn(_STATE_WARNING.format(name="set_gates", what="gates"), DeprecationWarning, stacklevel=2)
    for router in routers:
        router.gates = None if gates is None else router.check_gates(gates)
    return sum(1 for _, layer in molora_layers(model) if layer.router.accepts_gates)


def set_preference(model: nn.Module, preference: Optional[Tensor]) -> int:
    """Deprecated: use `routing_inputs`. Set the user preference ``lambda`` (``[N]`` or
    ``[batch, N]``, on the simplex) of every hierarchical (HoE) router model-wide; None goes
    back to uniform. Returns how many layers took it; ValueError when the model has no
    hierarchical router."""
    routers = routers_taking(model, "preference")
    if preference is not None:
        warnings.warn(_STATE_WARNING.format(name="set_preference", what="preference"), DeprecationWarning,
                      stacklevel=2)
    for router in routers:
        router.set_preference(preference)
    return sum(1 for _, layer in molora_layers(model) if layer.router.accepts_preference)


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
