"""Loader for the compiled extension (`moelora._C`, built from csrc/).

The package works without it: if it is missing or fails to load we warn once and the `cpu` /
`cuda` backends report themselves unavailable. `MOELORA_DISABLE_EXTENSION=1` skips loading.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch


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
    return True


def has_op(name: str) -> bool:
    """Whether torch.ops.moelora.<name> exists (after loading the extension)."""
    if not load():
        return False
    return hasattr(torch.ops.moelora, name)
