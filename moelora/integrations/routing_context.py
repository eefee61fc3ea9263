"""`routing_inputs`: per-batch gates and preferences for every router of a model, scoped to a
``with`` block (see `moelora.layers.routers.context` for how the scope is kept and replayed).

    with moelora.routing_inputs(model, preference=torch.tensor([[0.7, 0.3], [0.2, 0.8]])):
        out = model(input_ids)          # sequence 0 at (0.7, 0.3), sequence 1 at (0.2, 0.8)

The inputs are validated (and a HoE preference's mixing solved, once per router) when the
block opens. Inside it every fixed-gate router of ``model`` takes ``gates`` and every
hierarchical router ``preference``; outside it they are gone (the next batch cannot reuse
them), and other threads never see them. With activation checkpointing, checkpoint with
``use_reentrant=False, context_fn=routing_checkpoint_context`` so the recomputation in backward
sees the inputs of its forward (without it a router raises rather than guess).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch.nn as nn
from torch import Tensor

from moelora.layers.molora_linear import molora_layers
from moelora.layers.routers.context import push_scope, routing_checkpoint_context

__all__ = ["routing_inputs", "routing_checkpoint_context", "routers_taking"]


def routers_taking(model: nn.Module, what: str) -> list:
    """The distinct routers of model's MoLoRALinear layers that take ``what`` ("gates" or
    "preference"); ValueError naming the argument when there is none."""
    attribute = {"gates": "accepts_gates", "preference": "accepts_preference"}[what]
    routers, seen = [], set()
    for _, layer in molora_layers(model):
        router = layer.router
        if getattr(router, attribute) and id(router) not in seen:
            seen.add(id(router))
            routers.append(router)
    if not routers:
        kind = "fixed-gate ('fixed')" if what == "gates" else "hierarchical (HoE)"
        raise ValueError(f"{what}= given, but {type(model).__name__} has no MoLoRALinear with a "
                         f"{kind} router to take it")
    return routers


@contextlib.contextmanager
def routing_inputs(model: nn.Module, *, gates: Optional[Tensor] = None,
                   preference: Optional[Tensor] = None):
    """Inside the block, every fixed-gate router of ``model`` routes with ``gates`` (``[E]``, or
    ``[batch, E]``: row b for every token of sequence b) and every hierarchical router with the
    user preference ``preference`` (``[N]`` or ``[batch, N]``, normalised onto the simplex).
    Scopes nest (the inner one wins for the routers it covers) and are per thread. A layer's
    own ``gates=`` / ``preference=`` forward argument still wins over the scope."""
    if gates is None and preference is None:
        raise ValueError("routing_inputs needs gates= and/or preference=")
    entries: dict = {}
    if gates is not None:
        for router in routers_taking(model, "gates"):
            entries.setdefault(id(router), (router, {}))[1]["gates"] = router.check_gates(gates)
    if preference is not None:
        for router in routers_taking(model, "preference"):
            entries.setdefault(id(router), (router, {}))[1]["mixing"] = router.mixing(preference)
    with push_scope(entries):
        yield model
