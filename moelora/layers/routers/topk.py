"""Top-k routing of softmax(x W_r^T): PMoL's router, with an optional empty expert."""
from __future__ import annotations

import math

import torch.nn as nn
import torch.nn.functional as F
import torch
from torch import Tensor

from moelora.layers.routers.base import Router, RouterOutput
from moelora.ops.routing import topk_route

__all__ = ['TopKRouter']


class TopKRouter(Router):
    """``logits = x W_r^T (+ b_r)``, ``probs = softmax(logits)``, top-k, renormalised gates.

    Args:
        in_features: d_in.
        num_experts: E real experts.
        k: experts per token, ``1 <= k <= E``.
        empty_expert: add PMoL's empty expert as logit column E; when it wins a slot the id is
            -1 and the token falls back on the frozen base weight for that slot.
        renormalize: divide the k gates by their sum (off: gates are raw probabilities).
        noisy: Shazeer et al. (2017) noisy top-k in training: ``logits + N(0, 1) *
            softplus(x W_noise^T)``, W_noise zero-initialised (std softplus(0) = 0.69 at start).
            The recorded logits / probs are the noisy ones (what was actually routed).
        bias: learnable router bias.
    """

    kind = "topk"

    def __init__(self, in_features: int, num_experts: int, k: int = 2, *, empty_expert: bool = False,
                 renormalize: bool = True, noisy: bool = False, bias: bool = False,
                 device=None, dtype=None):
        super().__init__(in_features, num_experts)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
            raise ValueError(f"k must be an int with 1 <= k <= num_experts = {num_experts}, got {k!r}")
        self.k = k
        self.empty_expert = bool(empty_expert)
        self.renormalize = bool(renormalize)
        self.noisy = bool(noisy)
        factory = {"device": device, "dtype": dtype}
        columns = num_experts + int(self.empty_expert)
        self.weight = nn.Parameter(torch.empty(columns, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(columns, **factory)) if bias else None
        self.noise_weight = nn.Parameter(torch.empty(columns, in_features, **factory)) if noisy else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default: uniform(-1/sqrt(d_in), 1/sqrt(d_in)).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)

    def config(self) -> dict:
        return {"type": self.kind, "k": self.k, "empty_expert": self.empty_expert,
                "renormalize": self.renormalize, "noisy": self.noisy, "bias": self.bias is not None}

    def forward(self, x: Tensor, *, gates=None, preference=None) -> RouterOutput:
        logits = self._linear(x, self.weight, self.bias)  # [..., E']
        if self.noise_weight is not None and self.training:
            std = F.softplus(self._linear(x, self.noise_weight, None))
            logits = logits + torch.randn_like(logits) * std
        probs, ids, weights = topk_route(logits, self.k, renormalize=self.renormalize,
                                         empty_expert=self.empty_expert)
        return RouterOutput(ids, weights, probs, logits)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_experts={self.num_experts}, k={self.k}, "
                f"empty_expert={self.empty_expert}, noisy={self.noisy}")
