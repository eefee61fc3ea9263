"""Float64-capable ground truth of the routed LoRA delta: the core op's reference with a zero
base (one formula, not a second copy of it)."""
from __future__ import annotations

import torch

from moelora.ops.molora_linear.reference import molora_linear_ref

__all__ = ["molora_delta_ref"]


def molora_delta_ref(x, lora_a, lora_b, expert_indices, expert_weights, scaling: float = 1.0) -> torch.Tensor:
    """s * sum_j g[t,j] * B_{e[t,j]} A_{e[t,j]} x_t  ([..., d_out])."""
    zero = x.new_zeros(lora_b.shape[1], x.shape[-1])
    return molora_linear_ref(x, zero, None, lora_a, lora_b, expert_indices, expert_weights, scaling)
