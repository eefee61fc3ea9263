"""The one range check of integer inputs (expert ids, target tokens, class labels).

Where it can afford to, it raises a ValueError that names the argument, what was expected and
the first offending element: always on CPU, and on GPU with MOELORA_DEBUG=1. On GPU by default
a host sync would stall the stream on every call, so the check is asynchronous: a device-side
assert that kills the process with the argument's name (one Triton launch for scalar bounds,
torch's compare / reduce / `_assert_async` otherwise). Skipped while tracing (the values are
unknown then) and for empty tensors.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["check_range", "check_true", "debug_checks"]


def debug_checks() -> bool:
    """MOELORA_DEBUG=1: synchronous, named errors on GPU too."""
    return os.environ.get("MOELORA_DEBUG", "0") == "1"


def check_range(values: Tensor, low: int, high: Union[int, Tensor], *, name: str, expected: str,
                exempt: Optional[int] = None) -> None:
    """Every element must lie in ``[low, high)`` or equal ``exempt``.

    ``high`` is an int or a tensor broadcast against ``values`` (one bound per column, e.g. the
    classes of each objective). ``expected`` completes "``name`` must ...".
    """
    if values.numel() == 0 or torch.compiler.is_compiling():
        return
    if values.device.type == "cpu" or debug_checks():
        ok = _in_range(values, low, high, exempt)
        if not bool(ok.all()):
            position = tuple((~ok).nonzero()[0].tolist())
            raise ValueError(f"{name} must {expected}; got {name}{list(position)} = "
                             f"{int(values[position])}")
        return
    if isinstance(high, int) and _triton_check(values, low, high, exempt, name):
        return
    torch._assert_async(_in_range(values, low, high, exempt).all(),
                        f"moelora: {name} out of range: it must {expected}")


def check_true(ok: Tensor, message: str) -> None:
    """``ok`` (a bool tensor) must hold everywhere: a ValueError with ``message`` on CPU (or
    with MOELORA_DEBUG=1), a device-side assert on GPU; skipped while tracing."""
    if ok.numel() == 0 or torch.compiler.is_compiling():
        return
    if ok.device.type == "cpu" or debug_checks():
        if not bool(ok.all()):
            raise ValueError(message)
    else:
        torch._assert_async(ok.all(), f"moelora: {message}")


def _in_range(values: Tensor, low: int, high: Union[int, Tensor], exempt: Optional[int]) -> Tensor:
    if isinstance(high, Tensor):
        high = high.to(values.device)
    ok = (values >= low) & (values < high)
    return ok if exempt is None else ok | (values == exempt)


_triton_failed = False


def _triton_check(values: Tensor, low: int, high: int, exempt: Optional[int], name: str) -> bool:
    """The one-launch device-side check; False (and torch's check instead, warned once) where
    Triton is missing or cannot compile for this GPU."""
    global _triton_failed
    if _triton_failed:
        return False
    try:
        kernels = importlib.import_module("moelora.ops.triton_common")
        kernels.assert_in_range(values, low, high, exempt)
        return True
    except Exception as exc:  # e.g. no triton, or a GPU this Triton cannot compile for
        _triton_failed = True
        warnings.warn(f"moelora: the Triton range check failed ({type(exc).__name__}: {exc}); "
                      f"checking {name} with torch ops instead", RuntimeWarning, stacklevel=3)
        return False
