"""Soft mixture of all experts per token."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from moelora.layers.routers.base import Router, RouterOutput, arange_ids
from moelora.ops.dtypes import accumulate_dtype

__all__ = ['DenseRouter']


class DenseRouter(Router):
    """Soft mixture of all experts per token: ``g = softmax(x W_r^T)``, k = E."""

    kind = "dense"

    def __init__(self, in_features: int, num_experts: int, *, bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, num_experts)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_experts, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def config(self) -> dict:
        return {"type": self.kind, "bias": self.bias is not None}

    def forward(self, x: Tensor, *, gates=None, preference=None) -> RouterOutput:
        logits = self._linear(x, self.weight, self.bias)
        acc = accumulate_dtype(logits.dtype)
        probs = torch.softmax(logits.to(acc), dim=-1)
        return RouterOutput(arange_ids(self.num_experts, x.shape[:-1], x.device), probs, probs, logits)
