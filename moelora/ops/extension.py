"""Loader of the compiled extension `moelora._C` (built from csrc/).

The package works without it: when it is missing or fails to load we warn once, and the `cpu`
/ `cuda` backends report themselves unavailable with the reason. `MOELORA_DISABLE_EXTENSION=1`
skips loading it.

Importing `moelora._C` defines the native ops (one schema per op, `TORCH_LIBRARY_FRAGMENT` in
csrc/) with a kernel per dispatch key (CPU always, CUDA in CUDA builds). Their fake (meta)
implementations are the Python ops' own fakes, handed over with `register_fake` and attached
when the library loads, so torch.compile and FakeTensor tracing see shapes without a kernel.

Run-time switches of the extension (build switches: see setup.py):
    MOELORA_DISABLE_EXTENSION=1   do not load it
    MOELORA_CPU_ISA               cap the CPU kernels' instruction set: avx512bf16, avx512, avx2 or base
                                  (default: the best the CPU has; `_C.set_cpu_isa` at run time)
    MOELORA_CPU_ROUTE             the cpu backend's route: routed or dense (default auto: per call,
                                  from measured thresholds; `_C.set_cpu_route` at run time)
    MOELORA_CUDA_DECODE_MAX_T     largest T served by the one-launch decode kernel (default 64)
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings
from typing import Callable, Optional

import torch

__all__ = ["load", "module", "has_kernel", "unavailable_reason", "register_fake"]

logger = logging.getLogger("moelora")

_FAKES: dict[str, Callable] = {}  # native op name -> fake implementation
_load_error: Optional[str] = None


def register_fake(op: str, fake: Callable) -> None:
    """Fake implementation of native op ``moelora::<op>``, attached once the extension loads
    (at once if it already has)."""
    _FAKES[op] = fake
    if load.cache_info().currsize and load():
        _attach_fake(op, fake)


def _attach_fake(op: str, fake: Callable) -> None:
    if not hasattr(torch.ops.moelora, op):
        return
    try:
        torch.library.register_fake(f"moelora::{op}")(fake)
    except RuntimeError:  # already registered (load() re-run after cache_clear)
        pass


def _import_native():
    """Import `moelora._C` (its own function so tests can make it fail)."""
    return importlib.import_module("moelora._C")


@functools.lru_cache(maxsize=None)
def load() -> bool:
    """Import the compiled ops once; True when they are registered under torch.ops.moelora.

    A missing or broken build (ImportError, OSError from the loader, an ABI mismatch ...) is
    not fatal: one warning (warnings.warn and the `moelora` logger), and the `cpu` / `cuda`
    backends report ``_load_error`` as why they are unavailable."""
    global _load_error
    _load_error = None
    if os.environ.get("MOELORA_DISABLE_EXTENSION", "0") == "1":
        _load_error = "MOELORA_DISABLE_EXTENSION=1"
        return False
    try:
        _import_native()  # importing registers the TORCH_LIBRARY ops
    except Exception as exc:  # missing build, ABI mismatch, missing CUDA runtime ...
        _load_error = f"moelora._C did not load ({type(exc).__name__}: {exc})"
        message = (f"moelora: compiled extension not loaded ({type(exc).__name__}: {exc}); "
                   "the 'cpu' and 'cuda' backends are unavailable, falling back to triton/torch. "
                   "Set MOELORA_DISABLE_EXTENSION=1 to silence this.")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        logger.warning(message)
        return False
    for op, fake in _FAKES.items():
        _attach_fake(op, fake)
    return True


def module():
    """The loaded `moelora._C` module, or None."""
    if not load():
        return None
    return _import_native()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether native op ``moelora::<op>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    return unavailable_reason(op, dispatch_key) is None


def unavailable_reason(op: str, dispatch_key: str) -> Optional[str]:
    """None when ``moelora::<op>`` runs on ``dispatch_key``, else why not."""
    if not load():
        return f"compiled extension not loaded: {_load_error}"
    if not hasattr(torch.ops.moelora, op):
        return f"this build of moelora._C has no op {op!r}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"moelora::{op}", dispatch_key):
        return f"moelora._C was built without {dispatch_key} kernels"
    return None
