"""One backend resolution for every op.

Each op declares its backends with `OpDispatch`: a name, how to get the implementation, and
where it can run. `resolve` maps what a caller asked for to one of them:

    backend="auto"    MOELORA_BACKEND when set (and this op has that backend), else the first
                      available of AUTO_ORDER for the device type. `auto` never picks the
                      Triton interpreter: it exists for tests and is orders of magnitude slower.
    backend=<name>    that backend, or a ValueError naming why it cannot run here and what can.

The reason a backend is missing (triton not installed, the extension not built, the interpreter
not enabled, float64 without a tensor-core path) is kept, logged once on the `moelora` logger
at INFO with the choice made, and shown by `python -m moelora.env`.

A Triton kernel that fails to compile at its first call is a fault `auto` recovers from: under
backend="auto" the op calls `fall_back`, which marks triton unavailable for that op with the
reason, warns once (warnings.warn and the `moelora` logger) and names the next backend to
rerun the call on. A backend asked for by name re-raises: no silent switch.
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from moelora.ops import extension

__all__ = ["BACKEND_NAMES", "AUTO_ORDER", "Backend", "OpDispatch", "interpreting"]

logger = logging.getLogger("moelora")

BACKEND_NAMES = ("auto", "triton", "cuda", "cpu", "torch")
# Fastest first, per device type, by the budget of benchmarks/NOTES.md. The compiled `cuda`
# backend (fp32 FMA kernels, y read back by its expand) wins no case by that budget, so `auto`
# never picks it; it stays selectable by name.
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}


def interpreting() -> bool:
    """Triton kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class Backend:
    """One implementation of an op.

    ``load()`` returns the implementation (a module or object with the op's backend functions)
    or raises; ``check(device, dtypes)`` returns None where it can run, else the reason.
    """

    name: str
    load: Callable[[], object]
    check: Callable[[torch.device, tuple], Optional[str]]
    alias_of: Optional[str] = None  # another backend's implementation under this name
    _impl: object = field(default=None, repr=False)
    _error: Optional[str] = field(default=None, repr=False)

    def impl(self):
        if self._impl is None and self._error is None:
            try:
                self._impl = self.load()
            except Exception as exc:  # e.g. triton missing or broken
                self._error = f"{type(exc).__name__}: {exc}"
        return self._impl

    def unavailable(self, device: torch.device, dtypes: tuple) -> Optional[str]:
        reason = self.check(device, dtypes)
        if reason is None and self.impl() is None:
            reason = f"its implementation failed to import ({self._error})"
        return reason


def _import(module: str) -> Callable[[], object]:
    return lambda: importlib.import_module(module)


def torch_backend(module: str) -> Backend:
    """Plain PyTorch: runs anywhere, in any floating dtype."""
    return Backend("torch", _import(module), lambda device, dtypes: None)


def triton_backend(module: str) -> Backend:
    """Triton kernels: CUDA tensors, or CPU tensors under the interpreter; no float64."""

    def check(device, dtypes):
        if torch.float64 in dtypes:
            return "float64 has no tensor-core path"
        if device.type == "cpu" and not interpreting():
            return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1, for tests)"
        if device.type not in ("cuda", "cpu"):
            return f"no Triton target for {device.type} tensors"
        return None

    return Backend("triton", _import(module), check)


def native_backend(name: str, forward: str, backward: str, state_like: Callable) -> Backend:
    """The compiled extension's kernels for one dispatch key (``name`` "cpu" or "cuda") of an op
    whose native forward returns the op's outputs without a state and whose native backward
    takes none: ``state_like`` makes the empty state the op's contract carries."""
    key = name.upper()

    class _Native:  # the native op is one schema; the dispatcher picks the kernel by device
        def forward(self, *args):
            return (*getattr(torch.ops.moelora, forward)(*args), state_like(*_state_args(args)))

        def backward(self, *args):
            *head, state, scaling, need_x, need_adapters = args  # the state sits after h
            return getattr(torch.ops.moelora, backward)(*head, scaling, need_x, need_adapters)

        @staticmethod
        def state_like(*args):
            return state_like(*args)

    def check(device, dtypes):
        if device.type != name:
            return f"runs on {name} tensors only"
        return extension.unavailable_reason(forward, key)

    return Backend(name, _Native, check)


def _state_args(forward_args):
    x, _, _, lora_a, _, expert_indices = forward_args[:6]
    return x, lora_a, expert_indices


def on_device(backend: Backend, name: str, device_type: str) -> Backend:
    """``backend``'s implementation under another name, on one device type only (an op with no
    compiled kernel serves its ``cpu`` backend from its torch implementation, say)."""

    def check(device, dtypes):
        if device.type != device_type:
            return f"runs on {device_type} tensors only"
        return backend.check(device, dtypes)

    return Backend(name, backend.load, check, alias_of=backend.name)


class OpDispatch:
    """The backends of one op and the one rule that picks among them."""

    def __init__(self, op: str, backends: list[Backend]):
        self.op = op
        self.backends = {b.name: b for b in backends}
        self._logged: set = set()
        self._failed: dict = {}  # backend -> why it was dropped at run time (see fall_back)
        # resolve()'s answers: availability probes cost ~20 us a call (dispatch-key lookups),
        # and what they answer changes only with what the key holds (the interpreter switch and
        # MOELORA_BACKEND are read from the environment) or with _failed (a fall_back clears).
        # Availability itself is fixed once probed (the extension loads once, imports are
        # tried once); clear_decisions() forgets for code that changes it (tests).
        self._decisions: dict = {}

    def impl(self, name: str):
        return self.backends[name].impl()

    def reasons(self, device: torch.device, dtypes: tuple) -> dict:
        """{backend: None if it runs here, else why not}, over every name in BACKEND_NAMES."""
        out = {}
        for name in BACKEND_NAMES[1:]:
            backend = self.backends.get(name)
            if backend is None:
                out[name] = f"{self.op} has no {name} backend"
            elif name in self._failed:
                out[name] = self._failed[name]
            else:
                out[name] = backend.unavailable(device, dtypes)
        return out

    def available(self, device, dtypes: tuple = (torch.float32,)) -> list[str]:
        device = torch.device(device)
        return [name for name, why in self.reasons(device, dtypes).items() if why is None]

    def resolve(self, name: str, device: torch.device, dtypes: tuple) -> str:
        """Map a caller's backend name to an available backend of this op, or raise naming why
        it cannot run and what can."""
        if not isinstance(name, str) or name not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
        preferred = os.environ.get("MOELORA_BACKEND", "") if name == "auto" else ""
        resolved, error = _decide(self.op, name, preferred, device, tuple(dtypes))
        if error is not None:
            raise ValueError(error)
        return resolved

    def fall_back(self, requested: str, failed: str, exc: BaseException,
                  device: torch.device, dtypes: tuple) -> str:
        """Called from the op's ``except`` around its backend call: the backend to rerun the
        call on, or ``exc`` re-raised. Only a Triton compile-time fault (an exception of
        Triton's own, e.g. CompilationError) under backend="auto" falls back; any other error,
        or an explicitly requested backend, propagates unchanged."""
        if requested != "auto" or failed != "triton" or not _is_triton_error(exc):
            raise exc
        if failed not in self._failed:  # another thread may have got here first: warn once
            self._warn_failed(failed, exc)
        return self.resolve("auto", device, dtypes)

    def _warn_failed(self, failed: str, exc: BaseException) -> None:
        reason = f"its kernels failed to compile at first call ({type(exc).__name__}: {exc})"
        self._failed[failed] = reason
        self._decisions.clear()  # every memoised choice may have named the failed backend
        message = (f"moelora: {self.op}: backend 'triton' disabled for this process, {reason}; "
                   "falling back to the next backend")
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        logger.warning(message)


def _is_triton_error(exc: BaseException) -> bool:
    """An exception class defined by Triton (CompilationError, OutOfResources, ...): a fault of
    the compiler or the target, not a wrong input (those are ValueErrors raised before)."""
    return any(cls.__module__.split(".")[0] == "triton" for cls in type(exc).__mro__)


_REGISTRY: dict[str, OpDispatch] = {}


def clear_decisions() -> None:
    """Forget every op's memoised backend choices (after changing what availability probes see)."""
    for dispatch in _REGISTRY.values():
        dispatch._decisions.clear()


def register(dispatch: OpDispatch) -> OpDispatch:
    _REGISTRY[dispatch.op] = dispatch
    return dispatch


def registry() -> dict:
    """Every op's dispatch, by op name (for `python -m moelora.env` and the benchmarks)."""
    return dict(_REGISTRY)


# Evaluated eagerly and treated as a constant under torch.compile: availability probes import
# modules, load the extension and log, none of which dynamo can trace.
@torch.compiler.assume_constant_result
def _decide(op: str, name: str, preferred: str, device: torch.device, dtypes: tuple):
    dispatch = _REGISTRY[op]
    key = (name, preferred, device, dtypes, interpreting(), AUTO_ORDER.get(device.type))
    decided = dispatch._decisions.get(key)
    if decided is None:
        decided = dispatch._decisions[key] = _decide_uncached(dispatch, op, name, preferred, device, dtypes)
    return decided


def _decide_uncached(dispatch, op, name, preferred, device, dtypes):
    reasons = dispatch.reasons(device, dtypes)
    usable = [n for n, why in reasons.items() if why is None]
    if name != "auto":
        if reasons[name] is not None:
            return None, (f"backend {name!r} cannot run {op} on {device} for "
                          f"{'/'.join(str(d).removeprefix('torch.') for d in dtypes)}: "
                          f"{reasons[name]}; available: {usable}")
        return name, None
    if preferred:
        if preferred not in BACKEND_NAMES:
            return None, f"MOELORA_BACKEND must be one of {BACKEND_NAMES}, got {preferred!r}"
        if preferred != "auto" and preferred in dispatch.backends and reasons[preferred] is None:
            _log_choice(dispatch, device, dtypes, preferred, reasons, "MOELORA_BACKEND")
            return preferred, None
    for candidate in AUTO_ORDER.get(device.type, ("torch",)):
        if reasons.get(candidate) is None:
            _log_choice(dispatch, device, dtypes, candidate, reasons, "auto")
            return candidate, None
    return None, f"no backend of {op} runs on {device}: {reasons}"


def _log_choice(dispatch: OpDispatch, device, dtypes, chosen: str, reasons: dict, why: str) -> None:
    key = (device.type, dtypes, chosen)
    if key in dispatch._logged:
        return
    dispatch._logged.add(key)
    # Every other backend of the op that cannot run here, with why (triton missing because
    # numpy is absent, say), not only those before the choice in AUTO_ORDER.
    skipped = [f"{n} ({reasons[n]})" for n in dispatch.backends if n != chosen and reasons.get(n)]
    logger.info("moelora: %s on %s %s uses backend %r (%s)%s", dispatch.op, device.type,
                "/".join(str(d).removeprefix("torch.") for d in dtypes), chosen, why,
                f"; skipped: {', '.join(skipped)}" if skipped else "")
