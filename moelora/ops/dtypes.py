"""The precision rules every op and layer follows (one place, so they cannot drift apart)."""
from __future__ import annotations

import torch

__all__ = ["accumulate_dtype", "compute_dtype", "HALF_DTYPES"]

HALF_DTYPES = (torch.bfloat16, torch.float16)


def accumulate_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32 accumulation for 16/32-bit work; float64 stays float64 (the reference precision)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def compute_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """Matmul dtype of two operands: a shared type stays (tensor cores / a bf16 GEMM), a mixed
    pair (e.g. bf16 activations with fp32 adapters) goes to the accumulate dtype."""
    return a if a == b else accumulate_dtype(a, b)
