"""`inject`: put `MoLoRALinear` layers into any torch / transformers model, explicitly.

    model = moelora.inject(model, MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4))
    ...
    moelora.uninject(model)          # back to the original modules (and requires_grad flags)

Targets follow PEFT's ``target_modules`` rules: a list of names matches a module whose name
equals an entry or ends with ``"." + entry``; a string is a regex that must match the whole
name; "all-linear" is every supported base but the output embedding. Supported bases: an
`nn.Linear` (bitsandbytes' `Linear4bit` / `Linear8bitLt` and torchao-quantized linears are
nn.Linear too), transformers' GPT-2 `Conv1D`, or any module with int ``in_features`` /
``out_features`` (`moelora.layers.molora_linear.base_features`). A targeted leaf module of another
type is an error naming its type; a second `inject` on injected targets says so. Nothing is
patched on import.

The config is any object with ``target_modules``, ``exclude_modules`` and
``make_layer(base_layer, name) -> MoLoRALinear`` (see `moelora.integrations.config`):
`MoLoRAConfig` (generic), `PMoLConfig`, `HoEConfig` (via `build_hoe`).
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import torch.nn as nn

from moelora.layers.molora_linear import MoLoRALinear, is_supported_base, molora_layers

__all__ = ["inject", "inject_named", "uninject", "match_target", "find_targets"]


def _matches(patterns, name: str) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def match_target(name: str, target_modules, exclude_modules=None) -> bool:
    """PEFT-style target matching on a module's qualified name (no all-linear handling)."""
    return _matches(target_modules, name) and not _matches(exclude_modules, name)


def find_targets(model: nn.Module, target_modules, exclude_modules=None) -> list[str]:
    """Names of the supported base layers of model that the patterns select (outside
    MoLoRALinear layers already there). Raises TypeError for a selected leaf module of an
    unsupported type (a selected container, e.g. a block a regex also matches, is passed over)."""
    return _select(model, target_modules, exclude_modules)[0]


def _select(model: nn.Module, target_modules, exclude_modules=None) -> tuple[list[str], list[str]]:
    """(targets, names of MoLoRALinear layers the patterns select: injected before)."""
    inside = {name for name, _ in molora_layers(model)}
    output_embeddings = None
    if target_modules == "all-linear" and hasattr(model, "get_output_embeddings"):
        output_embeddings = model.get_output_embeddings()
    names, injected = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if target_modules == "all-linear":
            selected = (is_supported_base(module) and module is not output_embeddings
                        and not _matches(exclude_modules, name))
        else:
            selected = match_target(name, target_modules, exclude_modules)
        if not selected:
            continue
        if name in inside:
            injected.append(name)
        elif is_supported_base(module):
            names.append(name)
        elif not any(True for _ in module.children()):
            raise TypeError(f"inject: target {name!r} is a {type(module).__module__}.{type(module).__name__}; "
                            f"supported bases are nn.Linear (incl. bitsandbytes / torchao quantized "
                            f"linears), transformers' Conv1D, or modules with int in_features / out_features")
    return names, injected


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, config, *, make_layer: Optional[Callable] = None) -> nn.Module:
    """Replace the target base layers of ``model`` by `MoLoRALinear` layers built by
    ``config.make_layer`` (or ``make_layer(base_layer, name)``), and freeze every other parameter
    (unless ``config.freeze_base`` is False). Returns model, modified in place.

    Raises ValueError when nothing matches or every match is injected already, TypeError when a
    targeted leaf module has an unsupported type. The original modules stay inside the new layers
    (``.base_layer``), so `uninject` undoes it.
    """
    make_layer = config.make_layer if make_layer is None else make_layer
    names, injected = _select(model, config.target_modules, getattr(config, "exclude_modules", None))
    if not names and injected:
        raise ValueError(f"inject: the targets of target_modules={config.target_modules!r} are already "
                         f"injected ({', '.join(injected)}); uninject first, or target other modules")
    if not names:
        raise ValueError(f"inject: no nn.Linear (or other supported base) module matches "
                         f"target_modules={config.target_modules!r}")
    inject_named(model, names, make_layer, freeze_base=getattr(config, "freeze_base", True))
    return model


def inject_named(model: nn.Module, names, make_layer: Callable, *, freeze_base: bool = True) -> list:
    """`inject` at exactly the modules ``names``; returns the new ``(name, layer)`` pairs.
    Layers injected before keep their requires_grad flags (HoE's or imported adapters' frozen
    experts); the new layers' experts and routers train."""
    existing = [(param, param.requires_grad) for _, layer in molora_layers(model)
                for pname, param in layer.named_parameters() if not pname.startswith("base_layer.")]
    if freeze_base:
        flags = getattr(model, "_moelora_requires_grad", None)
        if flags is None:  # remember the first injection's flags, for uninject
            model._moelora_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
    new_layers = []
    for name in names:
        base = model.get_submodule(name)
        layer = make_layer(base, name)
        if not isinstance(layer, MoLoRALinear):
            raise TypeError(f"make_layer must return a MoLoRALinear, got {type(layer).__name__}")
        _set_submodule(model, name, layer)
        new_layers.append((name, layer))
    for _, layer in new_layers:  # base_layer stays frozen
        for pname, param in layer.named_parameters():
            if not pname.startswith("base_layer."):
                param.requires_grad_(True)
    for param, flag in existing:
        param.requires_grad_(flag)
    from moelora.integrations.hf import attach_save_pretrained  # (here: hf imports this module)

    attach_save_pretrained(model)  # transformers models: save_pretrained keeps the base keys
    return new_layers


def uninject(model: nn.Module, *, merge: bool = False) -> nn.Module:
    """Put every MoLoRALinear's ``base_layer`` back in its place. With ``merge``, each layer's
    fixed gates are folded into the base weight first (`MoLoRALinear.merge`); otherwise a
    merged layer is unmerged. Restores the requires_grad flags recorded by `inject`."""
    for name, layer in list(molora_layers(model)):
        if merge and not layer.merged:
            layer.merge(keep_original=False)
        elif not merge and layer.merged:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    flags = getattr(model, "_moelora_requires_grad", None)
    if flags is not None:
        for pname, param in model.named_parameters():
            if pname in flags:
                param.requires_grad_(flags[pname])
        del model._moelora_requires_grad
    return model
