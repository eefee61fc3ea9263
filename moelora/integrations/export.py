"""Export to serving engines: a soup or a single expert as a standard PEFT LoRA adapter folder.

Any engine that reads PEFT adapters (vLLM, SGLang, TGI, LoRAX, PEFT itself) serves the result
without moelora:

    export_expert(model, e, path)          expert e of every MoLoRALinear: rank r, exact
    export_soup(source, path, w, mode)     a Personalized Soup (moelora.methods.soups):
        mode="average_ab"   A = sum_i w_i A_i, B = sum_i w_i B_i: rank r (the authors' merge)
        mode="delta_w"      sum_i w_i s B_i A_i exactly, as one adapter of rank sum_i r_i:
                            A = [A_1; ...; A_N], B = [w_1 B_1 | ... | w_N B_N]

``source``: a model with MoLoRALinear layers (expert i of every layer is adapter i), or PEFT
adapter sources as `read_peft_adapter` takes them (folders, ``(state_dict, config)`` pairs).

The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's keys
(``base_model.model.<module>.lora_A.weight [r, d_in]``, ``...lora_B.weight [d_out, r]``). Engines
take one rank and one ``lora_alpha`` for every module (few read PEFT's rank / alpha patterns),
so modules are written alike: a smaller rank is zero-padded (A rows, B columns) to the largest,
and a module whose scaling s_m differs from the first module's s has ``s_m / s`` folded into
its B; neither changes any ``s B A``. Soups are computed in fp32 (fp64 for fp64 inputs) and
written in that dtype.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from moelora.integrations.peft_io import LoraModule, PeftLoraAdapter, read_peft_adapter
from moelora.layers.molora_linear import molora_layers
from moelora.ops.dtypes import accumulate_dtype

__all__ = ["experts_as_adapters", "soup_modules", "write_peft_adapter", "export_expert", "export_soup"]

_PEFT_PREFIX = "base_model.model."
_MODES = ("average_ab", "delta_w")


def experts_as_adapters(model: nn.Module) -> list[PeftLoraAdapter]:
    """The experts of model's MoLoRALinear layers as adapters: adapter i holds expert i of
    every layer (A_i, B_i and the layer's scaling). Every layer needs the same expert count."""
    layers = list(molora_layers(model))
    if not layers:
        raise ValueError("the model has no MoLoRALinear layer")
    counts = {layer.num_experts for _, layer in layers}
    if len(counts) != 1:
        raise ValueError(f"layers have different expert counts {sorted(counts)}: expert i is not one adapter")
    return [PeftLoraAdapter({name: LoraModule(layer.lora_A.weight[e].detach(), layer.lora_B.weight[e].detach(),
                                              layer.scaling) for name, layer in layers})
            for e in range(counts.pop())]


def _adapters(source) -> list[PeftLoraAdapter]:
    if isinstance(source, nn.Module):
        return experts_as_adapters(source)
    if isinstance(source, (str, os.PathLike, dict, PeftLoraAdapter)) or not isinstance(source, Sequence):
        raise TypeError("source must be a model with MoLoRALinear layers or a sequence of adapter sources, "
                        f"got {type(source).__name__}")
    if not source:
        raise ValueError("source holds no adapter")
    return [read_peft_adapter(a) for a in source]


def soup_modules(adapters: Sequence[PeftLoraAdapter], weights: Optional[Sequence[float]] = None,
                 mode: str = "average_ab") -> dict:
    """``{module: LoraModule}`` of the soup: the A / B factors (see the module docstring) whose
    ``s B A`` is `moelora.methods.soups.soup_deltas`' dW. An adapter without a module counts as
    zero there; different scalings are folded into the B_i (then s = 1)."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    n = len(adapters)
    w = [1.0 / n] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"weights has {len(w)} entries for {n} adapters")
    names = []
    for adapter in adapters:
        names += [name for name in adapter.modules if name not in names]
    out = {}
    for name in names:
        present = [(wi, a.modules[name]) for wi, a in zip(w, adapters) if name in a.modules]
        acc = accumulate_dtype(*(d for _, m in present for d in (m.A.dtype, m.B.dtype)))
        device = present[0][1].A.device
        scalings = {m.scaling for _, m in present}
        s = scalings.pop() if len(scalings) == 1 else 1.0
        # the weight (and, with mixed scalings, s_i / s) of each adapter goes into its B
        parts = [(m.A.to(device, acc), (wi * m.scaling / s) * m.B.to(device, acc)) for wi, m in present]
        if mode == "delta_w":
            out[name] = LoraModule(torch.cat([A for A, _ in parts]), torch.cat([B for _, B in parts], dim=1), s)
            continue
        r = max(A.shape[0] for A, _ in parts)
        a_bar = torch.zeros(r, parts[0][0].shape[1], dtype=acc, device=device)
        b_bar = torch.zeros(parts[0][1].shape[0], r, dtype=acc, device=device)
        for (wi, _), (A, B) in zip(present, parts):
            a_bar[:A.shape[0]] += wi * A
            b_bar[:, :B.shape[1]] += B
        out[name] = LoraModule(a_bar, b_bar, s)
    return out


def write_peft_adapter(modules: dict, path: Union[str, os.PathLike], *,
                       base_model_name_or_path: Optional[str] = None, task_type: Optional[str] = None) -> str:
    """Write ``{module: LoraModule}`` as a PEFT LoRA adapter folder (one rank and one alpha for
    all modules, see the module docstring). Returns the folder."""
    from safetensors.torch import save_file

    if not modules:
        raise ValueError("no module to export")
    r = max(m.A.shape[0] for m in modules.values())
    s = next(iter(modules.values())).scaling
    if s == 0:
        raise ValueError("the first module's scaling is 0: nothing to export")
    tensors = {}
    for name, m in modules.items():
        rank, d_in, d_out = m.A.shape[0], m.A.shape[1], m.B.shape[0]
        A = torch.zeros(r, d_in, dtype=m.A.dtype, device=m.A.device)
        B = torch.zeros(d_out, r, dtype=m.B.dtype, device=m.B.device)
        A[:rank] = m.A
        # fold in the accumulation dtype and round once
        B[:, :rank] = m.B if m.scaling == s else (m.B.to(accumulate_dtype(m.B.dtype)) * (m.scaling / s)).to(B.dtype)
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = A.detach().cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = B.detach().cpu().contiguous()
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": s * r, "use_rslora": False, "target_modules": sorted(modules),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "inference_mode": True,
    }
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def export_expert(model: nn.Module, expert: int, path: Union[str, os.PathLike], **kwargs) -> str:
    """Expert ``expert`` of every MoLoRALinear of model as a PEFT adapter folder (its output is
    the model's with one-hot gates on that expert). kwargs: `write_peft_adapter`'s."""
    layers = list(molora_layers(model))
    if not layers:
        raise ValueError("the model has no MoLoRALinear layer")
    if isinstance(expert, bool) or not isinstance(expert, int):
        raise TypeError(f"expert must be an int, got {type(expert).__name__}")
    smallest = min(layer.num_experts for _, layer in layers)
    if not 0 <= expert < smallest:
        raise ValueError(f"expert must be in [0, {smallest}) (the fewest experts of a layer), got {expert}")
    modules = {name: LoraModule(layer.lora_A.weight[expert].detach(), layer.lora_B.weight[expert].detach(),
                                layer.scaling) for name, layer in layers}
    return write_peft_adapter(modules, path, **kwargs)


def export_soup(source, path: Union[str, os.PathLike], weights: Optional[Sequence[float]] = None,
                mode: str = "average_ab", **kwargs) -> str:
    """A Personalized Soup of ``source``'s adapters with ``weights`` (default uniform) as a PEFT
    adapter folder: "average_ab" rank r, "delta_w" exact at rank sum r_i. ``source``: a model
    with MoLoRALinear layers or PEFT adapter sources. kwargs: `write_peft_adapter`'s."""
    return write_peft_adapter(soup_modules(_adapters(source), weights, mode), path, **kwargs)
