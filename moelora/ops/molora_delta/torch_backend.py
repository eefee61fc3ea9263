"""The delta's backends: each is the core op's backend of the same name, run without a base
(weight=None, where the backend has that path: the torch backend's ACCEPTS_NO_BASE) or with a
zero base weight, so the delta has no kernels of its own and agrees with the core op by
construction.

Contract (the core op's, less weight and bias; see molora_linear/torch_backend.py):

    forward(x, lora_a, lora_b, expert_indices, expert_weights, scaling) -> y, h, state
    backward(grad_out, x, lora_a, lora_b, expert_indices, expert_weights, h, state, scaling,
             compute_grad_x, compute_grad_adapters) -> grad_x, grad_lora_a, grad_lora_b, grad_weights

Cost on the backends without a base-free path (triton, cpu, cuda): the zero base adds one
[T, d_in] x [d_in, d_out] GEMM per pass (the base layer's size) and a transient zero
[d_out, d_in] buffer; a weight=None route inside those kernels would remove it.
"""
from __future__ import annotations

import torch

__all__ = ["ZeroBase"]


def _zero_weight(x: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    # contiguous: the native and Triton kernels read the weight with its own strides
    return x.new_zeros(lora_b.shape[1], x.shape[1])


def _no_weight(x: torch.Tensor, lora_b: torch.Tensor) -> None:
    return None


class ZeroBase:
    """A core-op backend (``impl``) seen as a delta backend."""

    def __init__(self, impl):
        self.impl = impl
        self.CHECKS_IDS = getattr(impl, "CHECKS_IDS", False)
        self._base = _no_weight if getattr(impl, "ACCEPTS_NO_BASE", False) else _zero_weight

    def forward(self, x, lora_a, lora_b, expert_indices, expert_weights, scaling):
        return self.impl.forward(x, self._base(x, lora_b), None, lora_a, lora_b, expert_indices,
                                 expert_weights, scaling)

    def backward(self, grad_out, x, lora_a, lora_b, expert_indices, expert_weights, h, state,
                 scaling, compute_grad_x, compute_grad_adapters):
        return self.impl.backward(grad_out, x, self._base(x, lora_b), lora_a, lora_b,
                                  expert_indices, expert_weights, h, state, scaling,
                                  compute_grad_x, compute_grad_adapters)

    def state_like(self, x, lora_a, expert_indices):
        return self.impl.state_like(x, lora_a, expert_indices)
