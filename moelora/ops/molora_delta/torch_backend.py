"""The delta's backends: each is the core op's backend of the same name run with a zero base
weight, so the delta has no kernels of its own and agrees with the core op by construction.

Contract (the core op's, less weight and bias; see molora_linear/torch_backend.py):

    forward(x, lora_a, lora_b, expert_indices, expert_weights, scaling) -> y, h, state
    backward(grad_out, x, lora_a, lora_b, expert_indices, expert_weights, h, state, scaling,
             compute_grad_x, compute_grad_adapters) -> grad_x, grad_lora_a, grad_lora_b, grad_weights

Cost: the zero base adds one [T, d_in] x [d_in, d_out] GEMM per pass (the base layer's size)
and a zero [d_out, d_in] buffer; a base-free route inside each backend would remove it.
"""
from __future__ import annotations

import torch

__all__ = ["ZeroBase"]


def _zero_weight(x: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    # contiguous: the native and Triton kernels read the weight with its own strides
    return x.new_zeros(lora_b.shape[1], x.shape[1])


class ZeroBase:
    """A core-op backend (``impl``) seen as a delta backend."""

    def __init__(self, impl):
        self.impl = impl
        self.CHECKS_IDS = getattr(impl, "CHECKS_IDS", False)

    def forward(self, x, lora_a, lora_b, expert_indices, expert_weights, scaling):
        return self.impl.forward(x, _zero_weight(x, lora_b), None, lora_a, lora_b, expert_indices,
                                 expert_weights, scaling)

    def backward(self, grad_out, x, lora_a, lora_b, expert_indices, expert_weights, h, state,
                 scaling, compute_grad_x, compute_grad_adapters):
        return self.impl.backward(grad_out, x, _zero_weight(x, lora_b), lora_a, lora_b,
                                  expert_indices, expert_weights, h, state, scaling,
                                  compute_grad_x, compute_grad_adapters)

    def state_like(self, x, lora_a, expert_indices):
        return self.impl.state_like(x, lora_a, expert_indices)
