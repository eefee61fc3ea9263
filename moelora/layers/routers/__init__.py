"""Routers: what decides, per token, which LoRA experts of a `MoLoRALinear` fire and how much.

Every router maps activations ``x [..., d_in]`` to a `RouterOutput`:

    expert_indices  [..., k] int64   expert ids, -1 = no expert (PMoL's empty expert)
    expert_weights  [..., k] float   gates g[t, j]
    probs           [..., E'] | None the full routing distribution (aux losses need it)
    logits          [..., E'] | None the router logits (z-loss, group-loss temperature)

which is exactly what `moelora.molora_linear` and the aux losses of `moelora.losses.pmol`
consume. The routing regimes of docs/spec.md §1-4:

    TopKRouter          top-k of softmax(x W_r^T), optionally noisy, optional empty expert
    DenseRouter         softmax over all E experts (k = E), per token
    FixedGateRouter     gates given from outside, [E] or per sequence [batch, E], broadcast
                        over the sequence (soups at serve time, multi-tenant, MoE-DPO gating)
    HierarchicalRouter  HoE: g_t = sum_j pi_j(lambda) softmax(R_j x_t), lambda per sequence

Per-sequence inputs (fixed gates, HoE preferences) are ``[batch, C]`` tensors (or ``[C]``,
shared by the batch) that broadcast over every other leading dim of ``x``: ``x [batch, seq,
d_in]`` reads row b for all tokens of sequence b. They flow with the call, never as module
state a later batch could reuse: passed to the layer's forward (which wins), or scoped to a
block by `moelora.integrations.routing_inputs` (so they reach layers deep inside a model; per
thread, replayed by activation checkpointing through `routing_checkpoint_context`, see
`moelora.layers.routers.context`).

No router syncs with the host in its forward: shapes depend only on shapes.
"""
from __future__ import annotations

from moelora.layers.routers.base import Router, RouterOutput, broadcast_per_sequence
from moelora.layers.routers.context import routing_checkpoint_context
from moelora.layers.routers.dense import DenseRouter
from moelora.layers.routers.fixed import FixedGateRouter
from moelora.layers.routers.hierarchical import HierarchicalRouter, anchor_mixing
from moelora.layers.routers.topk import TopKRouter

__all__ = [
    "RouterOutput", "Router", "TopKRouter", "DenseRouter", "FixedGateRouter", "HierarchicalRouter",
    "ROUTERS", "build_router", "anchor_mixing", "broadcast_per_sequence", "routing_checkpoint_context",
]

ROUTERS = {cls.kind: cls for cls in (TopKRouter, DenseRouter, FixedGateRouter, HierarchicalRouter)}


def build_router(spec, in_features: int, num_experts: int, *, device=None, dtype=None) -> Router:
    """A router from a `Router` instance (returned as is), a name in `ROUTERS`, or a config dict
    ``{"type": name, **kwargs}`` as returned by `Router.config()`."""
    if isinstance(spec, Router):
        if spec.in_features != in_features or spec.num_experts != num_experts:
            raise ValueError(f"router is for d_in={spec.in_features}, E={spec.num_experts}; the layer "
                             f"has d_in={in_features}, E={num_experts}")
        return spec
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict) or "type" not in spec:
        raise TypeError(f"router must be a Router, one of {sorted(ROUTERS)}, or a dict with 'type'; got {spec!r}")
    kwargs = dict(spec)
    kind = kwargs.pop("type")
    if kind not in ROUTERS:
        raise ValueError(f"unknown router type {kind!r}; known: {sorted(ROUTERS)}")
    return ROUTERS[kind](in_features, num_experts, device=device, dtype=dtype, **kwargs)
