"""Personalized Soups (docs/spec.md §6; seed: arXiv 2310.11564, code joeljang/RLPHF).

One LoRA adapter per preference dimension, merged post hoc with weights w:

    mode="average_ab"  the authors' merge: A_bar = sum_i w_i A_i, B_bar = sum_i w_i B_i,
                       dW = s B_bar A_bar   (note the cross terms B_i A_j, i != j)
    mode="delta_w"     the exact mixture dW = s sum_i w_i B_i A_i

`merge_adapters` computes dW per module and, given a model, adds it to the base weights for
zero-overhead serving at one preference; `SoupMerge.unmerge()` restores the base weights.
Per-request preferences need no merge at all: `serve_soups` turns the adapters into the
experts of fixed-gate `MoLoRALinear` layers, and ``set_gates(model, w [batch, N])`` serves each
sequence its own delta_w soup in one batch (the core op's dense-soft-mixture regime).

Adapters with different scalings: s_i is folded into B_i (B_i <- s_i B_i, s = 1), which is
the formula above when all s_i are equal. Different ranks: smaller A / B are zero-padded
(A rows, B columns), which changes no B_i A_i. An adapter that does not target a module
counts as zero there. Deltas are computed in fp32 (fp64 when an input is fp64).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn

from moelora.integrations.export import soup_modules
from moelora.integrations.peft_io import load_adapters_as_experts, read_peft_adapter

__all__ = ["SoupMerge", "soup_deltas", "merge_adapters", "serve_soups"]


def _weights(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} adapters")
    return weights


def soup_deltas(adapters: Sequence, weights: Optional[Sequence[float]] = None, mode: str = "average_ab",
                *, scaling: Optional[float] = None) -> dict:
    """``{module name: dW [d_out, d_in]}`` of the soup (see the module docstring).

    adapters: PEFT adapter folders, ``(state_dict, config)`` pairs or state dicts (with
    ``scaling``); weights: one per adapter (default uniform 1/N; not renormalised)."""
    loaded = [read_peft_adapter(a, scaling=scaling) for a in adapters]
    if not loaded:
        raise ValueError("merge_adapters needs at least one adapter")
    # the soup's factors, as exported for serving engines: one computation for both
    return {name: m.scaling * (m.B @ m.A) for name, m in
            soup_modules(loaded, _weights(weights, len(loaded)), mode).items()}


def _target_linear(model: nn.Module, name: str) -> nn.Linear:
    """The nn.Linear holding the base weight of module ``name``: through MoLoRALinear or PEFT
    wrappers (``base_layer``), and PeftModel's ``base_model.model.`` prefix."""
    for candidate in (name, "base_model.model." + name):
        try:
            module = model.get_submodule(candidate)
        except AttributeError:
            continue
        while not isinstance(module, nn.Linear) or hasattr(module, "base_layer"):
            inner = getattr(module, "base_layer", None)
            if inner is None:
                break
            module = inner
        if isinstance(module, nn.Linear):
            return module
        raise ValueError(f"module {candidate!r} is a {type(module).__name__}, expected an nn.Linear")
    raise ValueError(f"module {name!r} not found in the model")


@dataclass
class SoupMerge:
    """The result of `merge_adapters`: the deltas, and (given a model) the handle to unmerge."""

    deltas: dict
    mode: str
    weights: list
    model: Optional[nn.Module] = None
    merged: bool = False
    _originals: dict = field(default_factory=dict, repr=False)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weights: bit for bit from the kept copies (keep_original=True), else
        by subtracting the fp32 delta (exact in fp32 up to rounding; up to 1 ulp off in
        bf16 / fp16)."""
        if not self.merged:
            raise RuntimeError("nothing to unmerge (no model, or already unmerged)")
        for name, delta in self.deltas.items():
            weight = _target_linear(self.model, name).weight
            if name in self._originals:
                weight.copy_(self._originals[name])
            else:
                weight.copy_((weight.to(delta.dtype) - delta.to(weight.device)).to(weight.dtype))
        self._originals.clear()
        self.merged = False


@torch.no_grad()
def merge_adapters(adapters: Sequence, weights: Optional[Sequence[float]] = None, mode: str = "average_ab",
                   *, model: Optional[nn.Module] = None, scaling: Optional[float] = None,
                   keep_original: bool = True) -> SoupMerge:
    """Soup the LoRA adapters with ``weights`` (see module docstring); with ``model``, add each
    dW to the base weight of the same-named module (an nn.Linear, a MoLoRALinear's or a PEFT
    layer's ``base_layer``), adding in fp32 and rounding once. ``keep_original`` keeps a copy of
    each touched weight so `SoupMerge.unmerge` restores it bit for bit."""
    deltas = soup_deltas(adapters, weights, mode, scaling=scaling)
    result = SoupMerge(deltas, mode, _weights(weights, len(adapters)), model)
    if model is None:
        return result
    targets = {name: _target_linear(model, name) for name in deltas}  # check all before touching any
    for name, delta in deltas.items():
        weight = targets[name].weight
        if tuple(weight.shape) != tuple(delta.shape):
            raise ValueError(f"{name}: delta {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}")
    for name, delta in deltas.items():
        weight = targets[name].weight
        if keep_original:
            result._originals[name] = weight.detach().clone()
        weight.copy_((weight.to(delta.dtype) + delta.to(weight.device)).to(weight.dtype))
    result.merged = True
    return result


def serve_soups(model: nn.Module, adapters: Sequence, **kwargs) -> nn.Module:
    """Per-request soups without merging: the adapters become the experts of fixed-gate
    MoLoRALinear layers (`load_adapters_as_experts`); then ``set_gates(model, w)`` with w
    ``[batch, N]`` gives sequence b the delta_w soup with weights ``w[b]``."""
    return load_adapters_as_experts(model, adapters, router="fixed", **kwargs)
