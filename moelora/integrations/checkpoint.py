"""moelora's own adapter files: save / load every MoLoRALinear's experts and routers.

`save_moelora` / `load_moelora` write / read one safetensors file (``moelora_adapter.safetensors``
in a folder, or any ``*.safetensors`` path) holding every MoLoRALinear's parameters and buffers
except the frozen base layer, under the model's module names, PEFT-like with the expert dim
first:

    <module>.lora_A.weight          [E, r, d_in]
    <module>.lora_B.weight          [E, d_out, r]
    <module>.router.weight          router parameters / buffers, as the router names them:
    <module>.router.bias            topk / dense: weight [E', d_in], bias [E'], noise_weight [E', d_in]
    <module>.router.default_gates   fixed: default_gates [E]; hierarchical: weight [J, E, d_in],
    <module>.router.anchors         bias [J, E], anchors [J, N]

The header's metadata holds ``moelora_format = "1"``, ``moelora_modules``: a JSON object
mapping each module name to its `MoLoRALinear.layer_config()` (E, r, alpha, scaling, router
config, expert groups, shapes), so `load_moelora` can rebuild the layers in a fresh model, and
``moelora_frozen``: a JSON list of the saved parameters that were frozen (HoE's SVD experts,
imported adapters), so a reload trains what the saved model trained and nothing else.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch.nn as nn

from moelora.integrations.inject import inject_named
from moelora.layers.molora_linear import MoLoRALinear, molora_layers

__all__ = ["save_moelora", "load_moelora", "adapter_state", "MOELORA_ADAPTER_FILE"]

MOELORA_ADAPTER_FILE = "moelora_adapter.safetensors"
MOELORA_FORMAT = "1"


def _adapter_path(path: Union[str, os.PathLike], *, create: bool) -> str:
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        if create and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return path
    if create:
        os.makedirs(path, exist_ok=True)
    return os.path.join(path, MOELORA_ADAPTER_FILE)


def _is_adapter_key(key: str) -> bool:
    """A key of a MoLoRALinear's own state dict that moelora saves (not the base layer's)."""
    return not key.startswith("base_layer.") and not key.startswith("_")


def adapter_state(model: nn.Module, state_dict: Optional[dict] = None) -> tuple[dict, dict, list]:
    """``(tensors, configs, frozen)`` of every MoLoRALinear of model: the saved tensors under
    ``<module>.<key>``, each layer's `layer_config()`, the names of the frozen saved parameters.
    With ``state_dict`` (the model's, e.g. gathered by a trainer from FSDP shards) the tensors
    are taken from it rather than from the live layers."""
    tensors, configs, frozen = {}, {}, []
    for name, layer in molora_layers(model):
        configs[name] = layer.layer_config()
        for key, value in layer.state_dict().items():
            if not _is_adapter_key(key):
                continue
            if state_dict is not None:
                if f"{name}.{key}" not in state_dict:
                    raise ValueError(f"state_dict has no {name}.{key} (the model's MoLoRALinear {name} has it)")
                value = state_dict[f"{name}.{key}"]
            tensors[f"{name}.{key}"] = value.detach().cpu().contiguous().clone()
        frozen += [f"{name}.{key}" for key, param in layer.named_parameters()
                   if not key.startswith("base_layer.") and not param.requires_grad]
    return tensors, configs, frozen


def save_moelora(model: nn.Module, path: Union[str, os.PathLike], *, state_dict: Optional[dict] = None) -> str:
    """Write every MoLoRALinear's experts and router (not the base layer) to safetensors; see
    the module docstring for the key layout. ``path``: a folder or a ``.safetensors`` file;
    ``state_dict``: take the tensors from this state dict of model (see `adapter_state`).
    Returns the file written."""
    from safetensors.torch import save_file

    tensors, configs, frozen = adapter_state(model, state_dict)
    if not configs:
        raise ValueError("save_moelora: the model has no MoLoRALinear layer")
    file = _adapter_path(path, create=True)
    metadata = {"format": "pt", "moelora_format": MOELORA_FORMAT, "moelora_modules": json.dumps(configs),
                "moelora_frozen": json.dumps(frozen)}
    save_file(tensors, file, metadata=metadata)
    return file


def load_moelora(model: nn.Module, path: Union[str, os.PathLike], *, freeze_base: bool = True) -> nn.Module:
    """Load a `save_moelora` file into ``model``: modules that are still plain `nn.Linear` get a
    MoLoRALinear built from the saved config; existing MoLoRALinear layers must match it. Every
    saved tensor is loaded (strict), and the loaded layers' parameters that were frozen when
    saved are frozen again (the others trainable). Returns model."""
    from safetensors import safe_open

    file = _adapter_path(path, create=False)
    with safe_open(file, framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("moelora_format") != MOELORA_FORMAT:
            raise ValueError(f"{file} is not a moelora adapter file (moelora_format "
                             f"{metadata.get('moelora_format')!r}, expected {MOELORA_FORMAT!r})")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    configs = json.loads(metadata["moelora_modules"])
    frozen = set(json.loads(metadata.get("moelora_frozen", "[]")))  # files from before it: none frozen

    to_build = []
    for name, config in configs.items():
        module = model.get_submodule(name)
        if isinstance(module, MoLoRALinear):
            for key in ("num_experts", "r", "in_features", "out_features"):
                if getattr(module, key) != config[key]:
                    raise ValueError(f"{name}: saved {key}={config[key]}, the model's layer has {getattr(module, key)}")
        elif isinstance(module, nn.Linear):
            to_build.append(name)
        else:
            raise ValueError(f"{name} is a {type(module).__name__}, expected nn.Linear or MoLoRALinear")
    if to_build:
        # the experts / router in the dtype they were saved in (the base's may differ, e.g.
        # fp32 experts imported onto a bf16 model), so the round trip is exact
        def build(base, name):
            saved = tensors.get(f"{name}.lora_A.weight")
            return MoLoRALinear.from_config(base, configs[name], dtype=None if saved is None else saved.dtype)

        inject_named(model, to_build, build, freeze_base=freeze_base)

    for name in configs:
        layer = model.get_submodule(name)
        prefix = name + "."
        own = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        expected = {k for k in layer.state_dict() if not k.startswith("base_layer.")}
        missing, unexpected = expected - set(own), set(own) - expected
        if missing or unexpected:
            raise ValueError(f"{name}: saved tensors do not match the layer (missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)})")
        layer.load_state_dict(own, strict=False)
        for key, param in layer.named_parameters():
            if not key.startswith("base_layer."):
                param.requires_grad_(prefix + key not in frozen)
    return model
