"""Launch and byte accounting: the structural performance facts a machine without a GPU can check.

Inside ``with Traffic() as t:`` every kernel launch a backend makes is recorded as a `Launch`:

- Triton kernels started through `moelora.ops.triton_common.launch`, with the bytes the launcher
  declares each one reads and writes (its compulsory HBM traffic: each operand once, a gathered
  operand once per gather);
- every torch op that launches work (cuBLAS GEMMs, copies, casts, memsets; views and
  allocations are not launches), its tensor inputs counted as read, its outputs (and mutated
  inputs) as written.

Run on meta tensors, nothing is computed and no GPU is needed: the backends run at the real
shapes of docs/perf.md's cases and the record says how many launches they make and what each
moves (tests/ops/test_traffic.py asserts the budgets of benchmarks/NOTES.md). A recorded Triton
launch on meta tensors is not started; its kernel and arguments are kept, so
`moelora.ops.compile_check` can compile exactly what the launcher would have run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Traffic", "Launch", "active", "storage_key"]

_STACK: list["Traffic"] = []

# torch ops that allocate or reinterpret memory without a kernel
_NOT_LAUNCHES = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
    "lift_fresh", "_unsafe_view", "view", "reshape", "expand", "permute", "t", "transpose",
    "as_strided", "slice", "select", "unsqueeze", "squeeze", "split", "split_with_sizes",
    "unbind", "_reshape_alias", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "is_same_size", "_local_scalar_dense", "resolve_conj", "resolve_neg", "set_",
}


def storage_key(t: torch.Tensor) -> int:
    """Identifies a tensor's storage (meta tensors included: all their data pointers are 0).
    Unique while the storage lives: a recorder keeps every storage it saw alive, so a freed
    temporary's address is not reused by a later tensor within one record."""
    storage = t.untyped_storage()
    if _STACK:
        _STACK[-1]._alive.append(storage)
    return storage._cdata


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class Launch:
    name: str
    kind: str  # "triton" or "torch"
    grid: tuple = ()
    reads: list = field(default_factory=list)  # [(storage key, bytes, label)]
    writes: list = field(default_factory=list)
    kernel: object = None  # Triton: the JITFunction and its arguments, for compile_check
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @property
    def bytes_read(self) -> int:
        return sum(b for _, b, _ in self.reads)

    @property
    def bytes_written(self) -> int:
        return sum(b for _, b, _ in self.writes)

    def touches(self, t: torch.Tensor, how: str) -> int:
        """Bytes of ``t``'s storage this launch reads (``how="read"``) or writes."""
        key = storage_key(t)
        return sum(b for k, b, _ in (self.reads if how == "read" else self.writes) if k == key)


class _TorchOps(TorchDispatchMode):
    def __init__(self, sink: "Traffic"):
        super().__init__()
        self.sink = sink

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in _NOT_LAUNCHES:
            return out
        reads, writes = [], []
        schema_args = func._schema.arguments
        values = list(args) + [kwargs.get(a.name) for a in schema_args[len(args):]]
        for arg, value in zip(schema_args, values):
            for t in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(t, torch.Tensor):
                    reads.append((storage_key(t), _nbytes(t), arg.name))
                    if arg.alias_info is not None and arg.alias_info.is_write:
                        writes.append((storage_key(t), _nbytes(t), arg.name))
        if not any(a.alias_info is not None and a.alias_info.is_write for a in schema_args):
            for t in (out if isinstance(out, (list, tuple)) else [out]):
                if isinstance(t, torch.Tensor):
                    writes.append((storage_key(t), _nbytes(t), "out"))
        self.sink.launches.append(Launch(f"aten.{name}", "torch", reads=reads, writes=writes))
        return out


class Traffic:
    """Records every launch made inside the block (see the module docstring)."""

    def __init__(self):
        self.launches: list[Launch] = []
        self._mode: Optional[_TorchOps] = None
        self._alive: list = []  # the storages recorded (see storage_key)

    def __enter__(self) -> "Traffic":
        _STACK.append(self)
        self._mode = _TorchOps(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        _STACK.remove(self)
        self._alive.clear()  # after the block, keys of tensors the caller holds stay valid
        return False

    def record_triton(self, kernel, grid, args, kwargs, reads, writes) -> None:
        def entries(items):
            out = []
            for label, item in items.items():
                t, times = item if isinstance(item, tuple) else (item, 1)
                out.append((storage_key(t), int(_nbytes(t) * times), label))
            return out

        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "?")
        self.launches.append(Launch(name, "triton", tuple(grid), entries(reads), entries(writes),
                                    kernel, tuple(args), dict(kwargs)))

    # summaries ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        return [launch.name for launch in self.launches]

    def writers(self, t: torch.Tensor) -> list[Launch]:
        return [launch for launch in self.launches if launch.touches(t, "write")]

    def readers(self, t: torch.Tensor) -> list[Launch]:
        return [launch for launch in self.launches if launch.touches(t, "read")]

    def bytes_read(self, t: torch.Tensor) -> int:
        return sum(launch.touches(t, "read") for launch in self.launches)

    def table(self) -> str:
        rows = [f"{'launch':<40} {'grid':<18} {'read MiB':>9} {'write MiB':>9}"]
        for launch in self.launches:
            rows.append(f"{launch.name:<40} {str(launch.grid):<18} {launch.bytes_read / 2**20:>9.2f} "
                        f"{launch.bytes_written / 2**20:>9.2f}")
        return "\n".join(rows)


def active() -> Optional[Traffic]:
    """The innermost active recorder, or None."""
    return _STACK[-1] if _STACK else None
