"""Gates chosen outside the model (soups at serve time, multi-tenant, MoE-DPO gating)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from moelora.layers.routers.base import Router, RouterOutput, arange_ids, broadcast_per_sequence

__all__ = ['FixedGateRouter']


class FixedGateRouter(Router):
    """Gates chosen outside the model: one vector per sequence, no parameters.

    Gates come from, in order: the forward's ``gates=`` argument, the innermost
    `moelora.integrations.routing_inputs` scope (``[E]`` or ``[batch, E]``, per call: threads
    and batches do not share it), the ``gates`` attribute a deprecated `set_gates` left, the
    ``default_gates`` buffer (uniform 1/E unless given). With ``require_input=True`` there is no
    default: a forward without gates raises (e.g. MoE-DPO's one-hot experts, multi-tenant
    serving, where uniform top-k gates would silently pick experts 0..k-1). With ``k`` (< E)
    only the k largest gates of each row are computed (no renormalisation), which saves work
    for one-hot (multi-tenant) gates.
    """

    kind = "fixed"
    accepts_gates = True

    def __init__(self, in_features: int, num_experts: int, *, k: Optional[int] = None,
                 default_gates: Optional[Sequence[float]] = None, require_input: bool = False,
                 device=None, dtype=None):
        super().__init__(in_features, num_experts)
        if k is not None and not 1 <= k <= num_experts:
            raise ValueError(f"k must be None or 1 <= k <= {num_experts}, got {k}")
        self.k = k
        self.require_input = bool(require_input)
        if default_gates is None:
            default = torch.full((num_experts,), 1.0 / num_experts, device=device, dtype=torch.float32)
        else:
            default = torch.as_tensor(default_gates, dtype=torch.float32, device=device)
            if default.shape != (num_experts,):
                raise ValueError(f"default_gates must have {num_experts} entries, got {tuple(default.shape)}")
        self.register_buffer("default_gates", default)
        self.gates: Optional[Tensor] = None  # set by the deprecated set_gates; not saved

    def config(self) -> dict:
        config = {"type": self.kind, "k": self.k}
        if self.require_input:
            config["require_input"] = True
        return config

    def check_gates(self, gates, device=None) -> Tensor:
        """``gates`` as a float tensor ``[E]`` or ``[batch, E]`` on ``device`` (default: the
        router's), validated; autograd flows through."""
        g = torch.as_tensor(gates, device=self.default_gates.device if device is None else device)
        if not g.is_floating_point():  # e.g. one-hot int / bool tenant gates
            g = g.float()
        if g.dim() not in (1, 2) or g.shape[-1] != self.num_experts:
            raise ValueError(f"gates must be [{self.num_experts}] or [batch, {self.num_experts}] (one "
                             f"column per expert), got shape {tuple(g.shape)}")
        return g

    def forward(self, x: Tensor, *, gates=None, preference=None) -> RouterOutput:
        g = gates if gates is not None else self._routing_input("gates", self.gates, "gates")
        g = self.check_gates(self.default_gates if g is None else g, x.device)
        g = broadcast_per_sequence(g, x.shape[:-1], "gates")
        if self.k is not None and self.k < self.num_experts:
            weights, ids = torch.topk(g, self.k, dim=-1)
            return RouterOutput(ids, weights)
        return RouterOutput(arange_ids(self.num_experts, x.shape[:-1], x.device), g)
