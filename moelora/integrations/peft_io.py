"""PEFT interop: reading PEFT LoRA adapters, and turning them into experts.

`read_peft_adapter` accepts a folder written by PEFT's ``save_pretrained`` (adapter_config.json
+ adapter_model.safetensors, or adapter_model.bin), a ``(state_dict, config)`` pair, or a
plain state dict with ``scaling=``. Keys look like
``base_model.model.<module>.lora_A.weight [r, d_in]`` / ``...lora_B.weight [d_out, r]`` (an
adapter name before ``.weight``, as in a live PeftModel's state dict, is accepted too). The
per-module scaling follows PEFT: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), alpha from
``alpha_pattern`` when a pattern matches. What moelora cannot reproduce is refused rather than
silently dropped: DoRA, LoRA bias, fan_in_fan_out (GPT-2 Conv1D), aLoRA, layer replication,
target_parameters; and, unless ``strict=False`` skips them with a warning, keys that are not
LoRA A / B weights (embedding LoRA, modules_to_save, trainable tokens).

`load_adapters_as_experts(model, adapters)` turns N such adapters into the N experts of one
`MoLoRALinear` per targeted module (router "fixed" by default: set per-sequence gates with
`moelora.layers.set_gates`; one adapter with gate 1 reproduces PEFT's output). Experts need one
rank and one scaling per layer: smaller ranks are zero-padded (A rows, B columns) and each
expert's B is multiplied by ``s_i / s`` (s: the scaling of the first adapter that has the
module), which changes no product ``s B_i A_i``.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from moelora.integrations.inject import inject_named
from moelora.layers.molora_linear import MoLoRALinear

__all__ = [
    "LoraModule",
    "PeftLoraAdapter",
    "read_peft_adapter",
    "load_adapters_as_experts",
]

_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+?)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass
class LoraModule:
    A: Tensor  # [r, d_in]
    B: Tensor  # [d_out, r]
    scaling: float


@dataclass
class PeftLoraAdapter:
    modules: dict  # module name (in the base model) -> LoraModule
    config: dict = field(default_factory=dict)

    def delta(self, name: str) -> Tensor:
        """``s B A`` [d_out, d_in] in fp32 for one module."""
        m = self.modules[name]
        return m.scaling * (m.B.float() @ m.A.float())


def _peft_model_class():
    """peft.PeftModel if peft is already imported (a model can't be one otherwise)."""
    peft = sys.modules.get("peft")
    return getattr(peft, "PeftModel", None) if peft is not None else None


def _is_peft_model(model) -> bool:
    cls = _peft_model_class()
    return cls is not None and isinstance(model, cls)


def _config_dict(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    raise TypeError(f"adapter config must be a dict or a peft LoraConfig, got {type(config).__name__}")


def _check_config(config: dict, where: str) -> None:
    unsupported = []
    if config.get("peft_type", "LORA") not in ("LORA", None):
        unsupported.append(f"peft_type={config['peft_type']}")
    for key in ("use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"):
        if config.get(key):
            unsupported.append(f"{key}=True")
    # (modules_to_save / trainable tokens show up as non-LoRA keys: refused or skipped by `strict`)
    for key in ("alora_invocation_tokens", "layer_replication", "target_parameters"):
        if config.get(key):
            unsupported.append(f"{key}={config[key]!r}")
    if unsupported:
        raise ValueError(f"{where}: unsupported PEFT LoRA options for moelora experts: {', '.join(unsupported)}")


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's get_pattern_key: the first pattern key k with re.match(rf"(.*\\.)?({k})$", name)."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default


def _load_state_dict_file(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_folder(path: str) -> tuple[dict, dict]:
    if os.path.isdir(path):
        config_path = os.path.join(path, "adapter_config.json")
        for name in ("adapter_model.safetensors", "adapter_model.bin"):
            weights = os.path.join(path, name)
            if os.path.exists(weights):
                break
        else:
            raise FileNotFoundError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
    else:
        weights, config_path = path, os.path.join(os.path.dirname(path), "adapter_config.json")
    config = {}
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    return _load_state_dict_file(weights), config


def read_peft_adapter(source, *, scaling: Optional[float] = None, strict: bool = True) -> PeftLoraAdapter:
    """One PEFT LoRA adapter as ``{module name: (A [r, d_in], B [d_out, r], scaling)}``.

    Args:
        source: a PEFT adapter folder (or its weights file), a ``(state_dict, config)`` pair
            (config: dict or peft LoraConfig), a state dict (then ``scaling`` is required), or
            a `PeftLoraAdapter` (returned as is).
        scaling: overrides the scaling of every module (needed without a config).
        strict: raise on keys moelora cannot use (else warn and skip them).
    """
    if isinstance(source, PeftLoraAdapter):
        return source
    if isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        state_dict, config = _read_folder(where)
    elif isinstance(source, tuple) and len(source) == 2:
        where = "adapter"
        state_dict, config = source[0], _config_dict(source[1])
    elif isinstance(source, dict):
        where = "adapter state dict"
        state_dict, config = source, {}
    else:
        raise TypeError(f"cannot read a LoRA adapter from {type(source).__name__}")
    _check_config(config, where)
    if scaling is None and "lora_alpha" not in config:
        raise ValueError(f"{where}: no adapter config with lora_alpha; pass scaling= (alpha / r)")

    parts: dict = {}
    skipped = []
    for key, tensor in state_dict.items():
        match = _LORA_KEY.match(key)
        if match is None:
            skipped.append(key)
            continue
        module = match["module"]
        if module.startswith(_PEFT_PREFIX):
            module = module[len(_PEFT_PREFIX):]
        parts.setdefault(module, {})[match["which"]] = tensor
    if skipped:
        message = f"{where}: keys moelora cannot turn into experts: {skipped[:5]}{' ...' if len(skipped) > 5 else ''}"
        if strict:
            raise ValueError(message + " (pass strict=False to skip them)")
        warnings.warn(message, stacklevel=2)

    modules = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where}: module {module} has lora_{''.join(ab)} but not both A and B")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"{where}: module {module} has lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}; "
                             "expected [r, d_in] and [d_out, r]")
        r = A.shape[0]
        if scaling is not None:
            s = float(scaling)
        else:
            alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
            s = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[module] = LoraModule(A, B, s)
    if not modules:
        raise ValueError(f"{where}: no LoRA weights found")
    return PeftLoraAdapter(modules, config)


def _adapters_from_peft_model(model, adapter_names: Optional[Sequence[str]]) -> list:
    from peft import get_peft_model_state_dict

    names = list(model.peft_config) if adapter_names is None else list(adapter_names)
    return [(get_peft_model_state_dict(model, adapter_name=name), model.peft_config[name]) for name in names]


def load_adapters_as_experts(
    model: nn.Module,
    adapters: Optional[Sequence] = None,
    *,
    router: Union[str, dict] = "fixed",
    gates: Optional[Sequence[float]] = None,
    scaling: Optional[float] = None,
    dtype: Optional[torch.dtype] = None,
    lora_dropout: float = 0.0,
    trainable_experts: bool = False,
    strict: bool = True,
) -> nn.Module:
    """N PEFT LoRA adapters -> the N experts of one `MoLoRALinear` per module they target.

    Args:
        model: the base model the adapters were trained on (module names must match the
            adapters' after their ``base_model.model.`` prefix), or a `peft.PeftModel`: its
            loaded adapters are used (all, or those named in ``adapters``) and its LoRA layers
            removed first.
        adapters: adapter sources (see `read_peft_adapter`); with a PeftModel, adapter names.
        router: "fixed" (default: per-sequence gates from `set_gates`, default ``gates`` or
            uniform 1/N), or any router spec to train a mixture over the imported experts.
        gates: the fixed router's default gates [N].
        scaling: override every adapter's scaling (only for configless state dicts).
        dtype: experts' dtype (default: the adapters' tensors', as PEFT keeps them).
        lora_dropout: dropout for further training.
        trainable_experts: leave the experts trainable (default: only the router trains).
        strict: refuse adapter keys moelora cannot use.

    Returns:
        the model with MoLoRALinear layers (a new object when given a PeftModel: its base
        model); everything but routers (and experts if trainable_experts) is frozen.
    """
    if _is_peft_model(model):
        names = None if adapters is None else [a for a in adapters]
        if names is not None and not all(isinstance(n, str) and n in model.peft_config for n in names):
            raise ValueError(f"with a PeftModel, adapters must be names among {list(model.peft_config)}")
        sources = _adapters_from_peft_model(model, names)
        model = model.unload()
    else:
        if not adapters:
            raise ValueError("load_adapters_as_experts needs at least one adapter")
        sources = list(adapters)
    loaded = [read_peft_adapter(s, scaling=scaling, strict=strict) for s in sources]
    num_experts = len(loaded)
    module_names = []
    for adapter in loaded:
        module_names += [n for n in adapter.modules if n not in module_names]
    for name in module_names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"adapter module {name!r} not found in the model; adapters must come from "
                             "this base model (module names without the 'base_model.model.' prefix)") from None
        if not isinstance(module, nn.Linear) or isinstance(module, MoLoRALinear):
            raise ValueError(f"adapter module {name!r} is a {type(module).__name__}, expected an nn.Linear")

    router_spec = router
    if gates is not None:
        if router != "fixed":
            raise ValueError("gates= sets the default gates of the 'fixed' router")
        router_spec = {"type": "fixed", "default_gates": [float(g) for g in gates]}

    def make_layer(base: nn.Linear, name: str) -> MoLoRALinear:
        present = [a.modules[name] for a in loaded if name in a.modules]
        r = max(m.A.shape[0] for m in present)
        s = present[0].scaling
        expert_dtype = dtype
        if expert_dtype is None:
            expert_dtype = present[0].A.dtype
            for m in present[1:]:
                expert_dtype = torch.promote_types(expert_dtype, m.A.dtype)
        layer = MoLoRALinear(base, num_experts, r, s * r, lora_dropout, router=router_spec,
                             scaling=s, dtype=expert_dtype)
        with torch.no_grad():
            layer.lora_A.weight.zero_()
            layer.lora_B.weight.zero_()
            for e, adapter in enumerate(loaded):
                m = adapter.modules.get(name)
                if m is None:
                    continue  # this adapter leaves the module alone: a zero expert
                if tuple(m.A.shape[1:]) != (base.in_features,) or m.B.shape[0] != base.out_features:
                    raise ValueError(f"adapter {e} module {name}: lora_A {tuple(m.A.shape)}, lora_B "
                                     f"{tuple(m.B.shape)} do not fit nn.Linear({base.in_features}, "
                                     f"{base.out_features})")
                rank = m.A.shape[0]
                layer.lora_A.weight[e, :rank].copy_(m.A)
                ratio = m.scaling / s
                B = m.B if ratio == 1.0 else m.B.double() * ratio  # fold s_i / s into B_i
                layer.lora_B.weight[e, :, :rank].copy_(B)
        return layer

    new_layers = inject_named(model, module_names, make_layer)
    if not trainable_experts:  # only the layers built here: earlier layers keep their flags
        for _, layer in new_layers:
            layer.lora_A.weight.requires_grad_(False)
            layer.lora_B.weight.requires_grad_(False)
    return model
