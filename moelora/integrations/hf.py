"""transformers' ``save_pretrained`` / ``from_pretrained`` on injected models, without loss.

A MoLoRALinear keeps the layer it wraps as its child ``base_layer``, so an injected model's
state dict holds ``q_proj.base_layer.weight`` where the plain model has ``q_proj.weight``: saved
as is, the plain class would re-initialise those weights at random. So `inject` (and every call
that injects: `load_moelora`, `load_adapters_as_experts`, `build_hoe`) gives a transformers
model its own ``save_pretrained`` (`save_pretrained` below), which writes the folder as two parts:

    config.json, model.safetensors (or model-0000i-of-0000n.safetensors + index, as
    max_shard_size asks)      the base model exactly as the plain class saves it: every weight
                              under its original key, no moelora tensor, so
                              ``LlamaForCausalLM.from_pretrained(d)`` loads the base with no
                              missing or unexpected key
    moelora_adapter.safetensors  every MoLoRALinear's experts, routers and layer config
                              (`moelora.save_moelora`'s file)

and `from_pretrained(d, model_class)` restores the injected model: the base through
``model_class.from_pretrained(d, **kwargs)``, then `load_moelora` (the same layers, routers,
frozen flags; identical logits). A merged layer is refused (its base weight holds the experts'
delta); `uninject(model, merge=True)` first saves a plain merged model instead.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Union

import torch.nn as nn

from moelora.integrations.checkpoint import MOELORA_ADAPTER_FILE, load_moelora, save_moelora
from moelora.layers.molora_linear import molora_layers

__all__ = ["save_pretrained", "from_pretrained", "base_state_dict", "attach_save_pretrained"]


def _is_transformers_model(model) -> bool:
    transformers = sys.modules.get("transformers")  # a model can't be one unless it is imported
    cls = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    return cls is not None and isinstance(model, cls)


def base_state_dict(model: nn.Module, state_dict: Optional[dict] = None) -> dict:
    """The state dict of the model without its MoLoRALinear layers: each layer's base-layer
    tensors under the layer's own name (``q_proj.base_layer.weight`` -> ``q_proj.weight``), the
    experts and routers left out. ``state_dict``: the model's (default ``model.state_dict()``)."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    layers = [name for name, _ in molora_layers(model)]
    merged = [name for name, layer in molora_layers(model) if layer.merged]
    if merged:
        raise ValueError(f"cannot save the base model of merged MoLoRALinear layers {merged[:3]}: their base "
                         "weights hold the experts' delta. unmerge_layers(model) first, or "
                         "uninject(model, merge=True) to save a plain merged model")
    prefixes = sorted((name + "." for name in layers), key=len, reverse=True)
    out = {}
    for key, value in state_dict.items():
        owner = next((p for p in prefixes if key.startswith(p)), None)
        if owner is None:
            out[key] = value
            continue
        rest = key[len(owner):]
        if rest.startswith("base_layer."):
            new_key = owner + rest[len("base_layer."):]
            if new_key in state_dict:
                raise ValueError(f"{key}: its base key {new_key} is taken by another tensor of the layer")
            out[new_key] = value
    return out


def save_pretrained(model: nn.Module, save_directory: Union[str, os.PathLike], *args, state_dict=None,
                    **kwargs) -> None:
    """``model.save_pretrained`` of an injected transformers model (see the module docstring):
    the base model under its original keys through transformers' own ``save_pretrained`` (every
    argument passed on: max_shard_size, safe_serialization, push_to_hub, ...), and
    ``moelora_adapter.safetensors`` beside it (on the main process)."""
    cls_save = type(model).save_pretrained  # the class's own method, not the instance's wrapper
    main = kwargs.get("is_main_process", args[0] if args else True)
    if not any(True for _ in molora_layers(model)):  # e.g. after uninject: a plain model
        result = cls_save(model, save_directory, *args, state_dict=state_dict, **kwargs)
        stale = os.path.join(save_directory, MOELORA_ADAPTER_FILE)
        if main and os.path.isfile(stale):  # as transformers drops stale shards: never restore old experts
            os.remove(stale)
        return result
    full = model.state_dict() if state_dict is None else state_dict
    result = cls_save(model, save_directory, *args, state_dict=base_state_dict(model, full), **kwargs)
    if main:
        save_moelora(model, save_directory, state_dict=full)
    return result


class _SavePretrained:
    """The instance attribute ``model.save_pretrained`` that `attach_save_pretrained` sets: an
    object (not a bound method) so the model still deep-copies and pickles."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, *args, **kwargs):
        return save_pretrained(self.model, save_directory, *args, **kwargs)


def attach_save_pretrained(model: nn.Module) -> None:
    """Route ``model.save_pretrained`` (and so Trainer checkpoints and ``push_to_hub``) through
    `save_pretrained` for a transformers model; other models are left alone. Called by
    `inject_named`; with no MoLoRALinear left (after `uninject`) it saves as the class does."""
    if _is_transformers_model(model) and not isinstance(model.__dict__.get("save_pretrained"), _SavePretrained):
        model.__dict__["save_pretrained"] = _SavePretrained(model)


def from_pretrained(path: Union[str, os.PathLike], model_class=None, **kwargs) -> nn.Module:
    """Restore an injected model saved with ``model.save_pretrained(path)``: the base model
    through ``model_class.from_pretrained(path, **kwargs)`` (default
    ``transformers.AutoModelForCausalLM``; kwargs such as ``dtype`` / ``device_map`` go there),
    then its MoLoRALinear layers with `load_moelora`. Refuses a folder with no moelora adapter
    file, and a base checkpoint that leaves weights of the model uninitialised."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, MOELORA_ADAPTER_FILE)):
        raise FileNotFoundError(f"{path} has no {MOELORA_ADAPTER_FILE}: not saved from a model with moelora "
                                "layers (load it with its model class's from_pretrained)")
    if model_class is None:
        import transformers

        model_class = transformers.AutoModelForCausalLM
    model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks base weights {missing[:5]} (saved by a moelora older than "
                         "this save format, or by another model class?)")
    return load_moelora(model, path)
