"""What every router shares: its output, the per-sequence broadcast, the base class.

See `moelora.layers.routers` for the router kinds; a new kind subclasses `Router`, sets `kind`,
implements ``forward(x, *, gates=None, preference=None) -> RouterOutput`` and ``config()``, and
is added to `ROUTERS` in ``__init__.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from moelora.layers.routers.context import lookup

__all__ = ["RouterOutput", "Router", "broadcast_per_sequence", "arange_ids"]


@dataclass
class RouterOutput:
    expert_indices: Tensor  # [..., k] int64, -1 = no expert
    expert_weights: Tensor  # [..., k]
    probs: Optional[Tensor] = None  # [..., E'] (E' = E, or E + 1 with an empty expert)
    logits: Optional[Tensor] = None  # [..., E']
    num_experts: Optional[int] = None  # E real experts (column E of probs, if any, is the empty
    # expert); set by the layer when it records the routing for the aux losses


def broadcast_per_sequence(values: Tensor, lead: torch.Size, name: str) -> Tensor:
    """``[C]`` or ``[batch, C]`` -> ``[*lead, C]``: row b serves every token of sequence b.

    ``lead`` is x's leading shape (``[batch, seq]`` for a transformer). A ``[1, C]`` or ``[C]``
    tensor is shared by the whole batch.
    """
    if values.dim() == 1:
        return values.expand(*lead, values.shape[0])
    if values.dim() != 2:
        raise ValueError(f"{name} must be [C] or [batch, C], got shape {tuple(values.shape)}")
    batch, columns = values.shape
    if batch == 1:
        return values[0].expand(*lead, columns)
    if len(lead) == 0 or lead[0] != batch:
        raise ValueError(
            f"{name} has {batch} rows (one per sequence), but the input's leading shape is "
            f"{tuple(lead)}: expected x of shape [{batch}, ..., d_in]"
        )
    view = values.reshape(batch, *([1] * (len(lead) - 1)), columns)
    return view.expand(*lead, columns)


class Router(nn.Module):
    """Base class. Subclasses set `kind` (the name `build_router` knows them by) and implement
    `forward(x, *, gates=None, preference=None) -> RouterOutput` and `config()`."""

    kind: str = ""
    accepts_gates: bool = False
    accepts_preference: bool = False

    def __init__(self, in_features: int, num_experts: int):
        super().__init__()
        if in_features < 1 or num_experts < 1:
            raise ValueError(f"in_features and num_experts must be >= 1, got {in_features}, {num_experts}")
        self.in_features = in_features
        self.num_experts = num_experts

    def config(self) -> dict:
        """JSON-able constructor kwargs (besides in_features / num_experts) plus "type"."""
        return {"type": self.kind}

    def reset_parameters(self) -> None:
        pass

    def _routing_input(self, key: str, persistent: Optional[Tensor], what: str) -> Optional[Tensor]:
        """The per-call input ``key`` of this router when the forward got none: the innermost
        `moelora.integrations.routing_inputs` scope's, else the value a deprecated
        `set_gates` / `set_preference` left on the router, else None (the router's default);
        a router built with ``require_input=True`` has no default and raises instead."""
        value = lookup(self, key)
        if value is None:
            value = persistent
        if value is None and getattr(self, "require_input", False):
            raise ValueError(
                f"{type(self).__name__} (require_input=True) got no {what} for this forward: pass "
                f"{what}= to the layer, or run the model inside `with moelora.routing_inputs(model, "
                f"{what}=...)`")
        return value

    def _linear(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        # The router runs in its own parameters' dtype (e.g. fp32 router on a bf16 model).
        return F.linear(x.to(weight.dtype), weight, None if bias is None else bias)


def arange_ids(num_experts: int, lead: torch.Size, device) -> Tensor:
    return torch.arange(num_experts, device=device).expand(*lead, num_experts)
