"""`MoLoRALinear`: a drop-in replacement for a linear layer with E routed LoRA experts.

    y = base_layer(x) + s * sum_{j<k} g[t,j] B_{e[t,j]} A_{e[t,j]} dropout(x)

A plain float `nn.Linear` base is fused into the core op `moelora.molora_linear` (W x + b and
the experts in one op; backend "auto": the compiled CPU kernel or the torch backend on CPU,
Triton / CUDA on GPU). Any other base (bitsandbytes `Linear4bit` / `Linear8bitLt`, a
torchao-quantized linear, transformers' GPT-2 `Conv1D`, any module with ``in_features`` /
``out_features``) computes its own output and the experts add `moelora.ops.molora_delta`; dx
flows through the base layer's own autograd plus the experts'. PEFT's conventions hold: the wrapped layer is
kept as the child ``base_layer`` (frozen), ``scaling = lora_alpha / r`` (rsLoRA: ``lora_alpha /
sqrt(r)``), A is initialised like PEFT's (kaiming-uniform, a = sqrt(5), per expert) and B to
zero, so a fresh layer leaves the model's output unchanged.

Parameters (state-dict keys, PEFT-like with an expert dim in front):

    base_layer.*      the wrapped layer's own keys (frozen; an nn.Linear: weight [d_out, d_in], bias)
    lora_A.weight     [E, r, d_in]
    lora_B.weight     [E, d_out, r]
    router.*          the router's parameters / buffers (see routers.py)

After every forward in training mode (or with ``record_routing = True``), the routing is kept
in ``layer.router_state`` (the router's `RouterOutput`, with ``num_experts`` set) for the aux
losses of `moelora.losses.pmol`. Model-wide controls (gates, preferences, disabling, merging)
are in `moelora.integrations.controls`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from moelora.layers.routers import Router, RouterOutput, build_router
from moelora.ops.dispatch import BACKEND_NAMES
from moelora.ops.dtypes import accumulate_dtype
from moelora.ops.molora_delta import molora_delta
from moelora.ops.molora_linear import molora_linear

__all__ = ["MoLoRALinear", "ExpertWeight", "molora_layers", "base_features", "is_supported_base"]


class ExpertWeight(nn.Module):
    """Holds one stacked expert weight as ``.weight`` so state-dict keys read like PEFT's
    (``q_proj.lora_A.weight``), with the expert dim first: ``[E, r, d_in]`` or ``[E, d_out, r]``."""

    def __init__(self, *shape: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return "x".join(map(str, self.weight.shape))


def _lora_scaling(lora_alpha: float, r: int, use_rslora: bool) -> float:
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D` (weight [d_in, d_out]), recognised without importing
    transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def base_features(module: nn.Module) -> Optional[tuple[int, int]]:
    """(d_in, d_out) of a supported base layer, else None: an nn.Linear (bitsandbytes' and
    torchao's quantized linears are nn.Linear too), a GPT-2 Conv1D, or any module with int
    ``in_features`` / ``out_features`` whose forward maps [..., d_in] to [..., d_out]."""
    if isinstance(module, MoLoRALinear):  # one layer of experts per base
        return None
    if _is_conv1d(module):
        return int(module.weight.shape[0]), int(module.nf)
    d_in, d_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(module, nn.Linear) or (type(d_in) is int and type(d_out) is int):
        return int(d_in), int(d_out)
    return None


def is_supported_base(module: nn.Module) -> bool:
    return base_features(module) is not None


def _is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear whose forward is nn.Linear's and whose weight is a plain float tensor: the
    base the fused op computes itself. Quantized linears (bitsandbytes' own forward, torchao's
    tensor-subclass weights) run their own forward instead."""
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and type(module.weight) in (nn.Parameter, torch.Tensor) and module.weight.is_floating_point()
            and (module.bias is None or type(module.bias) in (nn.Parameter, torch.Tensor)))


def _base_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype the adapters default to: the weight's, else a quantized layer's compute
    dtype (bitsandbytes' ``compute_dtype``), else float32."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.is_floating_point():
        return weight.dtype
    compute = getattr(module, "compute_dtype", None)
    return compute if isinstance(compute, torch.dtype) and compute.is_floating_point else torch.float32


def _base_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


class MoLoRALinear(nn.Module):
    """A linear base layer plus E routed LoRA experts.

    Args:
        base_layer: the layer to wrap, kept as ``self.base_layer`` and frozen: an `nn.Linear`
            (fused with the experts into one op), or any base `base_features` accepts
            (bitsandbytes / torchao quantized linears, GPT-2 `Conv1D`): its own forward, plus
            the experts' delta.
        num_experts: E.
        r: LoRA rank (shared by the experts).
        lora_alpha: scaling numerator: ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
        lora_dropout: dropout on the experts' input (the base GEMM sees x undropped, as in PEFT).
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        router: a `Router`, a router name ("topk", "dense", "fixed", "hierarchical") or a config
            dict ``{"type": ..., **kwargs}``; built for (d_in, E). Default "dense".
        init_lora_weights: True: PEFT's init (A kaiming-uniform, B zero: the layer starts as an
            identity change); "gaussian": A ~ N(0, 1/r), B zero; False: A and B both
            kaiming-uniform (a non-trivial start, for tests).
        expert_groups: optional group id per expert (PMoL preference groups), length E.
        scaling: set the scaling directly, overriding lora_alpha / r (e.g. experts imported
            from adapters with another alpha / r).
        backend: the op backend of this layer (one of `moelora.ops.dispatch.BACKEND_NAMES`),
            passed to every call of the op; "auto" (default) follows MOELORA_BACKEND, then the
            fastest available.
        device, dtype: for the new parameters (default: the base layer's; a quantized base's
            compute dtype, else float32).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        num_experts: int = 1,
        r: int = 8,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.0,
        *,
        use_rslora: bool = False,
        router=None,
        init_lora_weights=True,
        expert_groups: Optional[Sequence[int]] = None,
        scaling: Optional[float] = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(base_layer, MoLoRALinear):
            raise TypeError("base_layer is already a MoLoRALinear; wrap its base_layer, or add experts to it")
        features = base_features(base_layer) if isinstance(base_layer, nn.Module) else None
        if features is None:
            raise TypeError(f"base_layer must be an nn.Linear, a GPT-2 Conv1D or a module with int "
                            f"in_features / out_features, got {type(base_layer).__name__}")
        if not isinstance(backend, str) or backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if expert_groups is not None and len(expert_groups) != num_experts:
            raise ValueError(f"expert_groups must have one entry per expert ({num_experts}), got {len(expert_groups)}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.in_features, self.out_features = features
        self.backend = backend
        self.num_experts = num_experts
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = float(scaling) if scaling is not None else _lora_scaling(self.lora_alpha, r, self.use_rslora)
        self.lora_dropout_p = float(lora_dropout)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.init_lora_weights = init_lora_weights
        self.expert_groups = None if expert_groups is None else [int(g) for g in expert_groups]
        if device is None:
            device = _base_device(base_layer)
        if dtype is None:
            dtype = _base_dtype(base_layer)
        factory = {"device": device, "dtype": dtype}
        self.lora_A = ExpertWeight(num_experts, r, self.in_features, **factory)
        self.lora_B = ExpertWeight(num_experts, self.out_features, r, **factory)
        self.router: Router = build_router("dense" if router is None else router, self.in_features,
                                           num_experts, **factory)
        self.record_routing = False  # record the routing in eval mode too
        self.router_state: Optional[RouterOutput] = None
        self.disabled = False  # adapters off: the base layer alone (see moelora.integrations.disable_adapters)
        self.merged = False
        self._merged_gates: Optional[Tensor] = None
        self._original_weight: Optional[Tensor] = None
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """PEFT's init, per expert: fan_in of a 3-D tensor would be r * d_in, so each expert's
        [r, d_in] slice is initialised as its own matrix (bound 1/sqrt(d_in))."""
        with torch.no_grad():
            for e in range(self.num_experts):
                if self.init_lora_weights == "gaussian":
                    nn.init.normal_(self.lora_A.weight[e], std=1.0 / self.r)
                else:
                    nn.init.kaiming_uniform_(self.lora_A.weight[e], a=math.sqrt(5))
                if self.init_lora_weights is False:
                    nn.init.kaiming_uniform_(self.lora_B.weight[e], a=math.sqrt(5))
                else:
                    self.lora_B.weight[e].zero_()
        self.router.reset_parameters()

    def layer_config(self) -> dict:
        """JSON-able description that rebuilds this layer around a base `nn.Linear`."""
        return {
            "num_experts": self.num_experts,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout_p,
            "use_rslora": self.use_rslora,
            "router": self.router.config(),
            "expert_groups": self.expert_groups,
            "scaling": self.scaling,
            "backend": self.backend,
            "in_features": self.in_features,
            "out_features": self.out_features,
        }

    @classmethod
    def from_config(cls, base_layer: nn.Linear, config: dict, *, device=None, dtype=None) -> "MoLoRALinear":
        kwargs = {key: config[key] for key in ("num_experts", "r", "lora_alpha", "lora_dropout",
                                               "use_rslora", "router", "expert_groups", "scaling",
                                               "backend")
                  if key in config}
        return cls(base_layer, device=device, dtype=dtype, **kwargs)

    # ------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, *, gates: Optional[Tensor] = None, preference: Optional[Tensor] = None) -> Tensor:
        """``x [..., d_in] -> [..., d_out]``. ``gates [E] | [batch, E]`` (fixed-gate routers) and
        ``preference [N] | [batch, N]`` (hierarchical routers) override what was set on the router."""
        self._check_input(x)
        if self.disabled or self.merged:
            return self.base_layer(x)
        fused = _is_plain_linear(self.base_layer)
        autocast = torch.is_autocast_enabled(x.device.type)  # the custom ops are not autocast-aware
        if fused and not autocast and x.dtype != self.base_layer.weight.dtype:
            # as nn.Linear: no silent cast (use torch.autocast for mixed precision)
            raise TypeError(f"x has dtype {x.dtype}, expected the base layer's dtype "
                            f"{self.base_layer.weight.dtype} (nn.Linear raises too; cast x or use torch.autocast)")
        route = self.router(x, gates=gates, preference=preference)
        if self.training or self.record_routing:
            self.router_state = dataclasses.replace(route, num_experts=self.num_experts)
        dropout = self.training and self.lora_dropout_p > 0
        if not fused:  # the base computes itself (quantized, Conv1D, ...); the experts add their delta
            x_lora = self.lora_dropout(x) if dropout else x
            if autocast:
                x_lora = x_lora.to(torch.get_autocast_dtype(x.device.type))
            y = self.base_layer(x)
            delta = molora_delta(x_lora, self.lora_A.weight, self.lora_B.weight, route.expert_indices,
                                 route.expert_weights, self.scaling, backend=self.backend)
            return y + delta.to(y.dtype)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if autocast:
            compute = torch.get_autocast_dtype(x.device.type)
            weight = weight.to(compute)
            bias = None if bias is None else bias.to(compute)
            x = x.to(compute)
        x_lora = self.lora_dropout(x) if dropout else x
        y = molora_linear(x_lora, weight, bias, self.lora_A.weight, self.lora_B.weight,
                          route.expert_indices, route.expert_weights, self.scaling, backend=self.backend)
        if dropout:
            # The op feeds one x to both the base GEMM and the experts; PEFT's base sees x
            # undropped. By linearity W x = W x_drop + W (x - x_drop): one extra GEMM, and only
            # in training with dropout on.
            y = y + F.linear(x - x_lora, weight)
        return y

    def _check_input(self, x) -> None:
        """The op's errors at the layer: before the router, whose GEMM would say 'mat1 and mat2'."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype} (the layer does not cast it)")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected [..., {self.in_features}] "
                             f"(last dim = in_features = {self.in_features})")

    def _mergeable_weight(self) -> Tensor:
        """The base weight as a [d_out, d_in] view to merge into: a float nn.Linear's, or a
        Conv1D's transposed; a quantized base has no float weight to fold the experts into."""
        base = self.base_layer
        if _is_plain_linear(base):
            return base.weight
        if _is_conv1d(base) and base.weight.is_floating_point():
            return base.weight.t()
        raise TypeError(f"merge() needs a float nn.Linear or Conv1D base, got {type(base).__name__} "
                        f"(a quantized weight cannot hold the merged delta exactly)")

    # ------------------------------------------------------------------------------------------
    def delta_weight(self, gates: Tensor) -> Tensor:
        """``s * sum_e gates_e B_e A_e`` as ``[d_out, d_in]`` in fp32 (fp64 for fp64 weights)."""
        weight = getattr(self.base_layer, "weight", None)
        plain = isinstance(weight, Tensor) and weight.is_floating_point()
        acc = accumulate_dtype(weight.dtype if plain else self.lora_A.weight.dtype)
        gates = torch.as_tensor(gates, device=self.lora_A.weight.device).to(acc)
        if gates.shape != (self.num_experts,):
            raise ValueError(f"gates must be [{self.num_experts}] (one fixed gate per expert), "
                             f"got {tuple(gates.shape)}")
        b = self.lora_B.weight.to(acc) * gates.view(-1, 1, 1)
        delta = torch.einsum("eor,eri->oi", b, self.lora_A.weight.to(acc))
        return self.scaling * delta

    def _fixed_gates(self, gates) -> Tensor:
        fixed = gates
        if fixed is None:
            fixed = getattr(self.router, "gates", None)
        if fixed is None:
            fixed = getattr(self.router, "default_gates", None)
        if fixed is None:
            raise ValueError(f"merge() needs a fixed gate vector [E]: pass gates= (the router "
                             f"{type(self.router).__name__} routes per token)")
        fixed = torch.as_tensor(fixed)
        if fixed.dim() == 2 and fixed.shape[0] == 1:
            fixed = fixed[0]
        if fixed.dim() != 1:
            raise ValueError("merge() needs one gate vector for the whole batch, got per-sequence gates")
        k = getattr(self.router, "k", None) if self.router.accepts_gates else None
        if k is not None and k < fixed.shape[-1]:
            # a fixed router with k < E computes only the k largest gates (not renormalised):
            # merge exactly what the forward computes
            weights, ids = torch.topk(fixed, k)
            fixed = torch.zeros_like(fixed).scatter(0, ids, weights)
        return fixed

    @torch.no_grad()
    def merge(self, gates: Optional[Tensor] = None, *, keep_original: bool = True) -> None:
        """Fold ``s * sum_e gates_e B_e A_e`` into the base weight (zero-overhead serving at one
        fixed gate vector; default: the fixed router's current / default gates).

        The delta is computed in fp32 and added before one rounding to the weight's dtype.
        ``keep_original`` (default) keeps a copy of the weight so `unmerge` restores it bit for
        bit (one weight's memory); without it, unmerge subtracts the same fp32 delta, exact in
        fp32 up to rounding, and off by up to one ulp per element in bf16 / fp16.
        """
        if self.merged:
            raise RuntimeError("layer is already merged; unmerge() first")
        weight = self._mergeable_weight()
        g = self._fixed_gates(gates).to(self.lora_A.weight.device)
        delta = self.delta_weight(g)
        self._original_weight = weight.detach().clone() if keep_original else None
        weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))
        self._merged_gates = g.detach().clone()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("layer is not merged")
        weight = self._mergeable_weight()
        if self._original_weight is not None:
            weight.copy_(self._original_weight)
        else:
            delta = self.delta_weight(self._merged_gates)
            weight.copy_((weight.to(delta.dtype) - delta).to(weight.dtype))
        self._original_weight = None
        self._merged_gates = None
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, r={self.r}, scaling={self.scaling:g}, "
                f"lora_dropout={self.lora_dropout_p}, merged={self.merged}")


# --------------------------------------------------------------------------------------------
# model-level helpers: reach every MoLoRALinear of a model (explicit calls, nothing implicit)
# --------------------------------------------------------------------------------------------
def molora_layers(model: nn.Module) -> Iterator[tuple[str, MoLoRALinear]]:
    """(name, layer) for every `MoLoRALinear` in model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, MoLoRALinear):
            yield name, module
