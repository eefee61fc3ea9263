"""What every Triton kernel of moelora shares: the dot helper, the device guard, the launch
helper, environment parsing, and the one-launch range check.

Importing this module imports Triton; the ops import their Triton backends (and so this) lazily,
so the package works without Triton.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
import torch
import triton
import triton.language as tl

from torch.utils._python_dispatch import _disable_current_modes
from triton.tools.tensor_descriptor import TensorDescriptor

from moelora.ops import traffic
from moelora.ops.dispatch import interpreting

__all__ = ["INTERPRETING", "dot", "dot_in_fp32", "device_guard", "launch", "env_int",
           "assert_in_range"]

# Read when the kernels are defined: triton.jit picks the interpreter at decoration time.
INTERPRETING = interpreting()


def _patch_interpreter_dot() -> None:
    """Triton's interpreter (3.6) multiplies bfloat16 tiles as their raw uint16 bits. Widen
    them to fp32 first: a 16-bit product is exact in fp32, so the interpreted dot then matches
    the tensor cores' fp32-accumulated result up to summation order, and the kernels' 16-bit
    branches run under the interpreter exactly as written for the GPU."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_moelora_bf16", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(t):
            if t.dtype == tl.bfloat16:
                return interpreter.TensorHandle((t.data.astype(np.uint32) << 16).view(np.float32),
                                                tl.float32)
            return t

        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._moelora_bf16 = True
    builder.create_dot = create_dot


def _interpreter_asserts() -> None:
    """Kernels launched with debug=True compile their device asserts in; the interpreter has one
    set of options for every launch, so turn its asserts on (its overflow checks stay off, as
    they are in our GPU builds)."""
    from dataclasses import replace

    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    builder.options = replace(builder.options, debug=True, sanitize_overflow=False)


if INTERPRETING:
    _patch_interpreter_dot()
    _interpreter_asserts()


@triton.jit
def dot(a, b, DOT_FP32: tl.constexpr):
    """a @ b of two tiles into fp32. DOT_FP32: exact fp32 FMA (``input_precision="ieee"``).
    Otherwise the tensor cores in the 16-bit type of the operands, an fp32 operand (fp32
    adapters, fp32 rank vectors) rounded to the other's type first, as autocast would; two fp32
    operands never go through TF32."""
    if DOT_FP32 or (a.dtype == tl.float32 and b.dtype == tl.float32):
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif a.dtype == b.dtype:
        return tl.dot(a, b)
    elif a.dtype == tl.float32:
        return tl.dot(a.to(b.dtype), b)
    else:
        return tl.dot(a, b.to(a.dtype))


def dot_in_fp32(activation_dtype: torch.dtype) -> bool:
    """The precision rule of every kernel: exact fp32 dots when the activations (x, dy and the
    outputs) are fp32; the tensor cores when they are 16-bit, whatever the adapters' dtype
    (bf16 activations with fp32 adapters, PEFT's default, round the adapter tile as autocast
    would, docs/perf.md)."""
    return activation_dtype not in (torch.bfloat16, torch.float16)


def device_guard(t: torch.Tensor):
    # Triton launches on the *current* CUDA device and stream, not the tensors' device: a layer
    # on cuda:1 while cuda:0 is current (device_map="auto") would run on the wrong device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def launch(kernel, grid, *args, reads=None, writes=None, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` on the device of the first tensor argument.

    ``reads`` / ``writes`` ({label: tensor or (tensor, times)}) declare the launch's compulsory
    HBM traffic for `moelora.ops.traffic`; with a recorder active the launch is recorded, and on
    meta tensors it is not started."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)] + [
        a.base for a in args if isinstance(a, TensorDescriptor)]
    recorder = traffic.active()
    if recorder is not None:
        recorder.record_triton(kernel, grid, args, kwargs, reads or {}, writes or {})
        if any(t.is_meta for t in tensors):
            return
    with device_guard(tensors[0]), _disable_current_modes():  # the interpreter's own torch ops
        kernel[grid](*args, **kwargs)                           # are not launches


def env_int(name: str, default: int) -> int:
    # a bad value must not stop the import: that would hide the whole triton backend
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        warnings.warn(f"moelora: {name}={value!r} is not an integer; using {default}", RuntimeWarning)
        return default


# --------------------------------------------------------------------------------------------
# the range check (moelora.ops.checks): one launch, no host sync
# --------------------------------------------------------------------------------------------
# debug=True on this kernel alone makes tl.device_assert fire; sanitize_overflow off keeps the
# rest of its code as without debug.
@triton.jit(debug=True)
def _in_range_kernel(values_ptr, n, low, high, exempt,
                     HAS_EXEMPT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(values_ptr + offs, mask=offs < n, other=low)
    ok = (v >= low) & (v < high)
    if HAS_EXEMPT:
        ok = ok | (v == exempt)
    tl.device_assert(ok, "moelora: an index is out of its range (MOELORA_DEBUG=1 names it)")


def assert_in_range(values: torch.Tensor, low: int, high: int, exempt=None) -> None:
    """Device-side assert that every value lies in [low, high) or equals exempt: one launch,
    where torch's compare, reduce and _assert_async take several."""
    flat = values.reshape(-1).contiguous()  # the kernel reads with stride 1; a view may not have it
    block = 1024
    launch(_in_range_kernel, (triton.cdiv(flat.numel(), block),), flat, flat.numel(), low, high,
           0 if exempt is None else exempt, HAS_EXEMPT=exempt is not None, BLOCK=block,
           sanitize_overflow=False, reads={"values": flat})
