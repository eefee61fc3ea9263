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
import math
import numbers
import os
import warnings
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["check_range", "check_true", "debug_checks", "as_number"]


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
        if isinstance(high, int) and (exempt is None or low <= exempt < high):
            # One pass and no [T, k] temporaries (instead of two compares, an and, an all):
            # the offender is looked for only when there is one.
            lo, hi = torch.aminmax(values)
            if int(lo) >= low and int(hi) < high:
                return
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


def as_number(value, name: str, *, integral: bool):
    """A scalar argument (``scaling``, ``k``) as the Python float / int an op's schema takes.

    Accepts Python and NumPy numbers (np.float32(2.0), np.int64(2)) and, under torch.compile, a
    traced (symbolic) value, returned as it is: its value is known only when the graph runs.
    Refuses bool and tensors (a tensor's value would cost a host sync per call on a GPU)
    with a TypeError naming ``name``; a float must be finite, an integral value must be one.
    """
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        if integral and not isinstance(value, torch.SymInt):
            raise TypeError(f"{name} must be an integer, got a symbolic float")
        return value
    kind = "an integer (int or a NumPy integer)" if integral else \
        "a real number (float, int or a NumPy scalar)"
    if isinstance(value, Tensor):
        raise TypeError(f"{name} must be {kind}, got a Tensor; pass {'int' if integral else 'float'}"
                        f"(t) (a tensor would cost a host sync per call)")
    # NumPy's number scalars are numbers.Real / numbers.Integral (np.bool_ is neither). Under
    # torch.compile dynamo traces them as 0-d arrays whose value is data (an unbacked symbol
    # the op's float argument cannot take): refused there, by name.
    if torch.compiler.is_compiling() and type(value).__module__ == "numpy":
        raise TypeError(f"{name} must be a Python number under torch.compile (a NumPy scalar is "
                        f"traced as data); pass {'int' if integral else 'float'}({name})")
    abc = numbers.Integral if integral else numbers.Real
    if isinstance(value, bool) or not isinstance(value, abc):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if integral:
        return int(value)
    value = float(value)
    # Under torch.compile a Python float argument is traced as a symbolic float (dynamo's
    # specialize_float=False), which math.isfinite cannot read: its check is the eager one.
    if not torch.compiler.is_compiling() and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value
