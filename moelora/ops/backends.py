"""Backends of the core op and how `auto` picks one.

Every backend implements the same two functions on already-validated, canonical inputs
(shapes and dtypes below); the registered ops in `molora_linear.py` dispatch to them by name.

    forward(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling)
        x               [T, d_in]       contiguous, dtype = weight.dtype
        weight          [d_out, d_in]   contiguous
        bias            [d_out] | None  weight.dtype
        lora_a          [E, r, d_in]    contiguous, float32 / bfloat16 / float16 / float64
        lora_b          [E, d_out, r]   contiguous, lora_a.dtype
        expert_indices  [T, k] int64    values in [-1, E)
        expert_weights  [T, k] accumulate dtype (float32; float64 when x or lora_a is float64)
        -> y [T, d_out] (x.dtype), h [T, k, r] accumulate dtype (A_e x_t; 0 where e = -1)

    backward(grad_out, x, weight, lora_a, lora_b, expert_indices, expert_weights, h, scaling,
             compute_grad_x, compute_grad_adapters)
        -> grad_x [T, d_in] (x.dtype; shape [0] when not compute_grad_x),
           grad_lora_a (lora_a.dtype), grad_lora_b (lora_b.dtype) (both shape [0] when not
           compute_grad_adapters: frozen experts skip the weight-gradient passes),
           grad_expert_weights [T, k] (expert_weights.dtype)
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from moelora import extension

BACKEND_NAMES = ("auto", "triton", "cuda", "cpu", "torch")


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable
    supports: Callable[[torch.device, tuple], bool]  # (device, (x dtype, adapter dtype))


# --------------------------------------------------------------------------------------------
# torch: dense-masked formulation. Static shapes, no host sync; O(T * E * r * d) work, which
# is the right trade while E * r is small (perf.md) and acceptable as a portable fallback.
# --------------------------------------------------------------------------------------------
def _compute_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """Matmul dtype for two operands: a shared type stays, a mixed pair goes to fp32 (fp64)."""
    return a if a == b else accumulate_dtype(a, b)


def accumulate_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32 accumulation for 16/32-bit work; float64 stays float64 (the reference precision)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _slot_to_expert(values: torch.Tensor, idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Scatter per-slot vectors [T, k, r] into per-expert columns [T, E, r] (duplicates add)."""
    T, k, r = values.shape
    out = values.new_zeros(T, num_experts + 1, r)  # column E collects the -1 slots
    target = torch.where(idx >= 0, idx, num_experts)
    out.scatter_add_(1, target.unsqueeze(-1).expand(T, k, r), values)
    return out[:, :num_experts]


def _expert_to_slot(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather per-expert columns [T, E, r] into slots [T, k, r]; -1 slots read 0."""
    T, k = idx.shape
    r = values.shape[-1]
    picked = values.gather(1, idx.clamp(min=0).unsqueeze(-1).expand(T, k, r))
    return picked * (idx >= 0).unsqueeze(-1)


def _torch_forward(x, weight, bias, lora_a, lora_b, idx, gates, scaling):
    T = x.shape[0]
    E, r, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    acc = gates.dtype
    cd = _compute_dtype(x.dtype, lora_a.dtype)
    h_all = (x.to(cd) @ lora_a.reshape(E * r, d_in).to(cd).t()).to(acc).view(T, E, r)
    h = _expert_to_slot(h_all, idx)
    z = _slot_to_expert(h * (scaling * gates).unsqueeze(-1), idx, E).reshape(T, E * r)
    b_flat = lora_b.permute(1, 0, 2).reshape(d_out, E * r)  # column e*r+i = B_e[:, i]
    cd_b = _compute_dtype(x.dtype, lora_b.dtype)
    delta = z.to(cd_b) @ b_flat.to(cd_b).t()
    y = (F.linear(x, weight, bias).to(acc) + delta.to(acc)).to(x.dtype)
    return y, h


def _torch_backward(grad_out, x, weight, lora_a, lora_b, idx, gates, h, scaling, compute_grad_x,
                    compute_grad_adapters):
    T = x.shape[0]
    E, r, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    acc = gates.dtype
    cd_b = _compute_dtype(grad_out.dtype, lora_b.dtype)
    b_flat = lora_b.permute(1, 0, 2).reshape(d_out, E * r)
    u_all = (grad_out.to(cd_b) @ b_flat.to(cd_b)).to(acc).view(T, E, r)  # B_e^T dy_t
    u = _expert_to_slot(u_all, idx)
    grad_gates = scaling * (u * h).sum(-1)
    coef = (scaling * gates).unsqueeze(-1)
    uz = _slot_to_expert(u * coef, idx, E).reshape(T, E * r)  # s g u, by expert column
    if compute_grad_adapters:
        hz = _slot_to_expert(h * coef, idx, E).reshape(T, E * r)  # s g h, by expert column
        grad_b = (hz.t() @ grad_out.to(acc)).view(E, r, d_out).transpose(1, 2).to(lora_b.dtype).contiguous()
        grad_a = (uz.t() @ x.to(acc)).view(E, r, d_in).to(lora_a.dtype).contiguous()
    else:
        grad_a, grad_b = lora_a.new_empty(0), lora_b.new_empty(0)
    if compute_grad_x:
        cd_a = _compute_dtype(x.dtype, lora_a.dtype)
        lora_dx = uz.to(cd_a) @ lora_a.reshape(E * r, d_in).to(cd_a)
        grad_x = (torch.mm(grad_out, weight).to(acc) + lora_dx.to(acc)).to(x.dtype)
    else:
        grad_x = x.new_empty(0)
    return grad_x, grad_a, grad_b, grad_gates


# --------------------------------------------------------------------------------------------
# triton: fused kernels in moelora.kernels (GPU, or CPU tensors under TRITON_INTERPRET=1).
# --------------------------------------------------------------------------------------------
_triton_modules: dict = {}  # name -> module, or None where it failed to import


def triton_kernels(name: str):
    """``moelora.kernels.<name>``, imported on first use (importing Triton is slow and it may be
    missing); None when it cannot be imported: the op's triton backend is then unavailable."""
    if name not in _triton_modules:
        try:
            module = importlib.import_module(f"moelora.kernels.{name}")
        except Exception:  # triton missing or broken
            module = None
        _triton_modules[name] = module
    return _triton_modules[name]


def _triton_module():
    return triton_kernels("molora")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_supports(device: torch.device, dtypes: tuple) -> bool:
    if _triton_module() is None or torch.float64 in dtypes:  # fp64 has no tensor-core path
        return False
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


def _triton_forward(*args):
    return _triton_module().forward(*args)


def _triton_backward(*args):
    return _triton_module().backward(*args)


# --------------------------------------------------------------------------------------------
# cpu / cuda: the compiled extension from csrc/ (ops moelora::{cpu,cuda}_{forward,backward}).
# --------------------------------------------------------------------------------------------
def _extension_backend(kind: str) -> Backend:
    def forward(*args):
        return getattr(torch.ops.moelora, f"{kind}_forward")(*args)

    def backward(*args):
        return getattr(torch.ops.moelora, f"{kind}_backward")(*args)

    def supports(device: torch.device, dtypes: tuple) -> bool:
        return device.type == kind and extension.has_op(f"{kind}_forward")

    return Backend(kind, forward, backward, supports)


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", _torch_forward, _torch_backward, lambda device, dtypes: True),
    "triton": Backend("triton", _triton_forward, _triton_backward, triton_supports),
    "cuda": _extension_backend("cuda"),
    "cpu": _extension_backend("cpu"),
}

# `auto` order per device type: fastest first. The interpreter is never chosen by `auto`: it
# exists for tests, and is orders of magnitude slower than the torch backend.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


def available_backends(
    device: torch.device | str, dtype: torch.dtype = torch.float32
) -> list[str]:
    """Backends that can run the op on this device for activations and adapters of `dtype`."""
    device = torch.device(device)
    return [name for name, b in BACKENDS.items() if b.supports(device, (dtype,))]


@torch.compiler.assume_constant_result
def _usable_backends(device: torch.device, dtypes: tuple) -> tuple:
    # Evaluated eagerly and treated as a constant under torch.compile: availability probes
    # import modules and may warn, which dynamo cannot trace.
    return tuple(name for name, b in BACKENDS.items() if b.supports(device, dtypes))


def resolve_backend(name: str, device: torch.device, dtypes: tuple) -> str:
    """Map a user's backend name to an available backend's name, or raise naming the choices.

    `auto` (or the MOELORA_BACKEND environment variable, which overrides it) takes the first
    available of _AUTO_ORDER for the device type.
    """
    if name == "auto":
        name = os.environ.get("MOELORA_BACKEND", "auto")
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    usable = _usable_backends(device, dtypes)
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            if candidate in usable:
                return candidate
        return "torch"
    if name not in usable:
        raise ValueError(
            f"backend {name!r} is not available for {'/'.join(map(str, dtypes))} tensors on "
            f"{device}; available: {list(usable)}"
        )
    return name
