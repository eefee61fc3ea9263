"""Gates chosen outside the model (soups at serve time, multi-tenant, MoE-DPO gating)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from moelora.layers.routers.base import Router, RouterOutput, arange_ids, broadcast_per_sequence

__all__ = ['FixedGateRouter']


class FixedGateRouter(Router):
    """Gates chosen outside the model: one vector per sequence, no parameters.

    Gates come from, in order: the forward's ``gates=`` argument, the ``gates`` attribute set by
    `set_gates` (``[E]`` or ``[batch, E]``), the ``default_gates`` buffer (uniform 1/E unless
    given). With ``k`` (< E) only the k largest gates of each row are computed (no
    renormalisation), which saves work for one-hot (multi-tenant) gates.
    """

    kind = "fixed"
    accepts_gates = True

    def __init__(self, in_features: int, num_experts: int, *, k: Optional[int] = None,
                 default_gates: Optional[Sequence[float]] = None, device=None, dtype=None):
        super().__init__(in_features, num_experts)
        if k is not None and not 1 <= k <= num_experts:
            raise ValueError(f"k must be None or 1 <= k <= {num_experts}, got {k}")
        self.k = k
        if default_gates is None:
            default = torch.full((num_experts,), 1.0 / num_experts, device=device, dtype=torch.float32)
        else:
            default = torch.as_tensor(default_gates, dtype=torch.float32, device=device)
            if default.shape != (num_experts,):
                raise ValueError(f"default_gates must have {num_experts} entries, got {tuple(default.shape)}")
        self.register_buffer("default_gates", default)
        self.gates: Optional[Tensor] = None  # transient per-batch gates, not saved

    def config(self) -> dict:
        return {"type": self.kind, "k": self.k}

    def forward(self, x: Tensor, *, gates=None, preference=None) -> RouterOutput:
        g = gates if gates is not None else (self.gates if self.gates is not None else self.default_gates)
        g = torch.as_tensor(g, device=x.device)
        if not g.is_floating_point():  # e.g. one-hot int / bool tenant gates
            g = g.float()
        if g.shape[-1] != self.num_experts:
            raise ValueError(f"gates must have {self.num_experts} columns (one per expert), got {tuple(g.shape)}")
        g = broadcast_per_sequence(g, x.shape[:-1], "gates")
        if self.k is not None and self.k < self.num_experts:
            weights, ids = torch.topk(g, self.k, dim=-1)
            return RouterOutput(ids, weights)
        return RouterOutput(arange_ids(self.num_experts, x.shape[:-1], x.device), g)
