"""Loader for the compiled extension (`moelora._C`, built from csrc/).

The package works without it: if it is missing or fails to load we warn once and the `cpu` /
`cuda` backends report themselves unavailable. `MOELORA_DISABLE_EXTENSION=1` skips loading.

Importing `moelora._C` registers the C++ ops `torch.ops.moelora.{cpu,cuda}_{forward,backward}`
(the cuda ones only in CUDA builds); `load()` then adds their fake (meta) implementations, so
that torch.compile and FakeTensor tracing see the output shapes without running a kernel.

Run-time switches of the extension (build switches: see setup.py):
    MOELORA_DISABLE_EXTENSION=1   do not load it
    MOELORA_CPU_ISA               cap the CPU kernels' instruction set: avx512, avx2 or base
                                  (default: the best the CPU has; `_C.set_cpu_isa` at run time)
    MOELORA_CUDA_DECODE_MAX_T     largest T served by the one-launch decode kernel (default 64)
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

# Ops of the extension, by kind: forward, backward (schemas in csrc/bindings.cpp).
_OPS = {
    "cpu": ("cpu_forward", "cpu_backward"),
    "cuda": ("cuda_forward", "cuda_backward"),
}


@functools.lru_cache(maxsize=None)
def load() -> bool:
    """Import the compiled ops once; True when they are registered under torch.ops.moelora."""
    if os.environ.get("MOELORA_DISABLE_EXTENSION", "0") == "1":
        return False
    try:
        from moelora import _C  # noqa: F401  (importing registers the TORCH_LIBRARY ops)
    except Exception as exc:  # missing build, ABI mismatch, missing CUDA runtime ...
        warnings.warn(
            f"moelora: compiled extension not loaded ({type(exc).__name__}: {exc}); "
            "the 'cpu' and 'cuda' backends are unavailable, falling back to triton/torch. "
            "Set MOELORA_DISABLE_EXTENSION=1 to silence this.",
            stacklevel=2,
        )
        return False
    _register_fakes()
    return True


def has_op(name: str) -> bool:
    """Whether torch.ops.moelora.<name> exists (after loading the extension)."""
    if not load():
        return False
    return hasattr(torch.ops.moelora, name)


def module():
    """The loaded `moelora._C` module, or None."""
    if not load():
        return None
    from moelora import _C

    return _C


# --------------------------------------------------------------------------------------------
# fake (meta) implementations: shapes and dtypes only, per the contract in csrc/molora.h
# --------------------------------------------------------------------------------------------
def _fake_forward(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling):
    T, k = expert_indices.shape
    y = x.new_empty(T, weight.shape[0])
    h = x.new_empty(T, k, lora_a.shape[1], dtype=expert_weights.dtype)
    return y, h


def _fake_backward(grad_out, x, weight, lora_a, lora_b, expert_indices, expert_weights, h,
                   scaling, compute_grad_x, compute_grad_adapters):
    def grad_like(t, needed):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if needed else t.new_empty(0)

    return (
        grad_like(x, compute_grad_x),
        grad_like(lora_a, compute_grad_adapters),
        grad_like(lora_b, compute_grad_adapters),
        grad_like(expert_weights, True),
    )


def _register_fakes() -> None:
    for forward, backward in _OPS.values():
        if not hasattr(torch.ops.moelora, forward):
            continue  # e.g. cuda_* in a CPU-only build
        for name, fake in ((forward, _fake_forward), (backward, _fake_backward)):
            try:
                torch.library.register_fake(f"moelora::{name}")(fake)
            except RuntimeError:  # already registered (load() re-run after cache_clear)
                pass
