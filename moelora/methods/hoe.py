"""HoE — Hierarchical Experts (docs/spec.md §4; seed: arXiv 2505.20925). Plug-and-play, no backbone
training:

1. LoRA experts from single-objective fine-tuned models, without training: per target linear,
   task vector ``tau_i = W_i - W_0`` and truncated SVD at rank r:
   ``B_i = U_r S_r^{1/2}``, ``A_i = S_r^{1/2} V_r^T``, so ``B_i A_i`` is the best rank-r
   approximation of tau_i (exact at full rank). Scaling is 1.
2. Router experts ``R_j [E, d_in]`` (`HierarchicalRouter`), one per anchor preference.
3. Parameter-free preference routing: ``g_t = sum_j pi_j(lambda) softmax(R_j x_t)``.

    model = build_hoe(base_model, [ft_model_1, ft_model_2], HoEConfig(r=16))
    with routing_inputs(model, preference=torch.tensor([[0.7, 0.3], [0.2, 0.8]])):  # a user per sequence
        out = model(input_ids)

Memory: experts are built one target layer at a time; a source is a model, a state dict or a
safetensors file / folder (tensors read lazily, one at a time), so only one layer's weights
per source are materialised at once.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from moelora.integrations.config import TargetConfig
from moelora.integrations.inject import find_targets, inject_named
from moelora.layers.molora_linear import MoLoRALinear, molora_layers
from moelora.ops.dtypes import accumulate_dtype

__all__ = ["HoEConfig", "task_vector_svd", "build_hoe", "hoe_experts_from_models", "tchebycheff"]


@dataclass
class HoEConfig(TargetConfig):
    """Configuration of a HoE model; `build_hoe` uses it. The fields of
    `moelora.integrations.TargetConfig` (target_modules, exclude_modules, r: the SVD rank of each
    expert, clipped to min(d_out, d_in) per layer; freeze_base) plus:

    Attributes:
        anchors: ``[J, N]`` anchor preferences of the router experts (default identity: one per
            objective, N = number of fine-tuned models).
        top_k: optional top-k of the mixed gates (None: dense mixture of all experts).
        router_init: "anchor" (default for one-hot anchors: an untrained router gives expert i
            weight ~ lambda_i), "uniform" or "random" (see `HierarchicalRouter`).
        anchor_logit: bias of the anchor's own expert with router_init="anchor".
        svd_method: "svd" (exact, torch.linalg.svd) or "lowrank" (torch.svd_lowrank, for large
            layers at small r).
        svd_device: where to run the SVD (default: the weight's device).
        dtype: dtype of the experts (default: the base weights').
    """

    anchors: Optional[Sequence[Sequence[float]]] = None
    top_k: Optional[int] = None
    router_init: Optional[str] = None
    anchor_logit: float = 8.0
    svd_method: str = "svd"
    svd_device: Optional[Union[str, torch.device]] = None
    dtype: Optional[torch.dtype] = None

    def make_layer(self, base_layer: nn.Linear, name: str = "", *, num_experts: int) -> MoLoRALinear:
        r = min(self.r, base_layer.in_features, base_layer.out_features)
        router = {"type": "hierarchical", "anchors": self.anchors, "k": self.top_k,
                  "init": self.router_init, "anchor_logit": self.anchor_logit}
        # scaling = lora_alpha / r = 1: B A is the truncated task vector itself
        return MoLoRALinear(base_layer, num_experts, r, float(r), 0.0, router=router, dtype=self.dtype)


def task_vector_svd(finetuned: Tensor, base: Tensor, r: int, *, method: str = "svd",
                    device=None) -> tuple[Tensor, Tensor]:
    """``tau = finetuned - base`` [d_out, d_in] -> (A [r, d_in], B [d_out, r]) in fp32 (fp64 in,
    fp64 out) with ``B A`` the best rank-r approximation of tau: ``B = U_r S_r^{1/2}``,
    ``A = S_r^{1/2} V_r^T`` (the square root splits the scale evenly between A and B)."""
    if finetuned.shape != base.shape or finetuned.dim() != 2:
        raise ValueError(f"weights must be matching 2-D tensors, got {tuple(finetuned.shape)} and {tuple(base.shape)}")
    acc = accumulate_dtype(finetuned.dtype, base.dtype)
    device = finetuned.device if device is None else device
    tau = finetuned.to(device, acc) - base.to(device, acc)
    r = min(r, *tau.shape)
    if method == "svd":
        U, S, Vh = torch.linalg.svd(tau, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    elif method == "lowrank":
        U, S, V = torch.svd_lowrank(tau, q=min(r + 8, *tau.shape), niter=4)
        U, S, Vh = U[:, :r], S[:r], V[:, :r].t()
    else:
        raise ValueError(f"method must be 'svd' or 'lowrank', got {method!r}")
    root = S.sqrt()
    return root.unsqueeze(1) * Vh, U * root.unsqueeze(0)


class _WeightSource:
    """Reads ``<module>.weight`` from a model, a state dict, or safetensors file(s), lazily."""

    def __init__(self, source):
        self.source = source
        self.files: dict[str, str] = {}  # key -> safetensors file
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if os.path.isdir(path):
                index = os.path.join(path, "model.safetensors.index.json")
                if os.path.exists(index):
                    with open(index, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                    self.files = {key: os.path.join(path, name) for key, name in weight_map.items()}
                else:
                    path = os.path.join(path, "model.safetensors")
            if not self.files:
                from safetensors import safe_open

                with safe_open(path, framework="pt") as f:
                    self.files = {key: path for key in f.keys()}

    def get(self, module_name: str) -> Tensor:
        keys = (f"{module_name}.weight", f"{module_name}.base_layer.weight")
        source = self.source
        if isinstance(source, nn.Module):
            module = source.get_submodule(module_name)
            module = getattr(module, "base_layer", module)
            return module.weight.detach()
        if isinstance(source, dict):
            for key in keys:
                if key in source:
                    return source[key]
        else:
            for key in keys:
                if key in self.files:
                    from safetensors import safe_open

                    with safe_open(self.files[key], framework="pt") as f:
                        return f.get_tensor(key)
        raise KeyError(f"no weight for module {module_name!r} in the fine-tuned source (tried {keys})")


@torch.no_grad()
def hoe_experts_from_models(model: nn.Module, finetuned: Sequence, *, method: str = "svd",
                            svd_device=None, layer_names: Optional[Sequence[str]] = None) -> None:
    """Fill the experts of every `MoLoRALinear` in model (or of those named in ``layer_names``)
    from the fine-tuned sources (expert i from source i), one layer at a time. The base weights
    W_0 are the layers' ``base_layer.weight``; each source is a model, a state dict or a
    safetensors path whose module names match model's."""
    sources = [_WeightSource(s) for s in finetuned]
    layers = molora_layers(model)
    if layer_names is not None:
        wanted = set(layer_names)
        layers = [(name, layer) for name, layer in layers if name in wanted]
    for name, layer in layers:
        if layer.num_experts != len(sources):
            raise ValueError(f"layer {name} has {layer.num_experts} experts for {len(sources)} fine-tuned models")
        base = layer.base_layer.weight
        for i, source in enumerate(sources):
            A, B = task_vector_svd(source.get(name), base, layer.r, method=method, device=svd_device)
            layer.lora_A.weight[i].copy_(A)
            layer.lora_B.weight[i].copy_(B)
            del A, B


def build_hoe(model: nn.Module, finetuned: Sequence, config: Optional[HoEConfig] = None) -> nn.Module:
    """Inject HoE layers into ``model`` (the base model, W_0) at ``config.target_modules`` with one
    expert per fine-tuned source, and fill them by task-vector SVD. Returns model (modified in
    place; everything but the routers frozen)."""
    config = HoEConfig() if config is None else config
    num_experts = len(finetuned)
    if num_experts < 1:
        raise ValueError("build_hoe needs at least one fine-tuned model")
    names = find_targets(model, config.target_modules, config.exclude_modules)
    if not names:
        raise ValueError(f"build_hoe: no nn.Linear module matches target_modules={config.target_modules!r}")
    # layers injected earlier stay as they are
    built = inject_named(model, names, lambda base, name: config.make_layer(base, name, num_experts=num_experts),
                         freeze_base=config.freeze_base)
    hoe_experts_from_models(model, finetuned, method=config.svd_method, svd_device=config.svd_device,
                            layer_names=[name for name, _ in built])
    for _, layer in built:  # experts are fixed by the SVD; routers train
        layer.lora_A.weight.requires_grad_(False)
        layer.lora_B.weight.requires_grad_(False)
    return model


def tchebycheff(rewards: Tensor, preference: Tensor, ideal: Tensor) -> Tensor:
    """Tchebycheff scalarisation ``max_i lambda_i (z_i* - r_i)`` (minimise it to train router
    experts): rewards ``[..., N]``, preference ``[N]`` or ``[..., N]``, ideal point ``z*``
    ``[N]`` or ``[..., N]`` -> ``[...]``."""
    return (preference * (ideal - rewards)).amax(dim=-1)
