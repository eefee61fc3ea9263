"""`generate`: transformers' ``model.generate`` with per-sequence gates / preferences.

``model.generate`` runs the batch expanded to ``batch * max(num_beams, num_return_sequences)``
rows, each input row repeated in place (``repeat_interleave``): beams and returned sequences
of input b are rows ``b * n ... b * n + n - 1``, and beam reordering stays inside those rows.
Gates ``[batch, E]`` or a preference ``[batch, N]`` set for the input batch therefore no longer
fit (the routers refuse: "gates has 2 rows ... leading shape is (4, 5)"); `generate` repeats
each row the same way for the call and puts the default routing back afterwards.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from moelora.integrations.controls import set_gates, set_preference

__all__ = ["generate", "generation_expand_size", "expand_rows"]


def generation_expand_size(model: nn.Module, generate_kwargs: dict) -> int:
    """How many rows transformers' ``generate`` runs per input row for these kwargs:
    ``max(num_beams, num_return_sequences)`` (sampling: the returned sequences; beam search:
    the beams, of which up to num_beams are returned)."""
    config = generate_kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def value(key: str) -> int:
        v = generate_kwargs.get(key, getattr(config, key, None))
        return 1 if v is None else int(v)

    return max(value("num_beams"), value("num_return_sequences"), 1)


def expand_rows(values: Optional[Tensor], n: int, name: str, batch: Optional[int] = None):
    """``[batch, C]`` -> ``[batch * n, C]``, row b repeated n times in place (as transformers
    expands its inputs); ``[C]`` / ``[1, C]`` serve every row and stay as they are."""
    if values is None:
        return None
    values = torch.as_tensor(values)
    if values.dim() == 1 or (values.dim() == 2 and values.shape[0] == 1):
        return values
    if values.dim() != 2:
        raise ValueError(f"{name} must be [C] or [batch, C], got shape {tuple(values.shape)}")
    if batch is not None and values.shape[0] != batch:
        raise ValueError(f"{name} has {values.shape[0]} rows, but the input batch has {batch} sequences")
    return values.repeat_interleave(n, dim=0)


def _input_batch(args: tuple, kwargs: dict) -> Optional[int]:
    for value in (args[0] if args else None, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(value, Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None


def generate(model: nn.Module, *args, gates: Optional[Tensor] = None, preference: Optional[Tensor] = None,
             **kwargs):
    """``model.generate(*args, **kwargs)`` with ``gates`` (``[E]`` or ``[batch, E]``, fixed-gate
    routers) and / or ``preference`` (``[N]`` or ``[batch, N]``, hierarchical routers) per input
    sequence, expanded for ``num_beams`` / ``num_return_sequences``. The routers go back to their
    defaults (``set_gates(model, None)`` / ``set_preference(model, None)``) afterwards."""
    n = generation_expand_size(model, kwargs)
    batch = _input_batch(args, kwargs)
    gates = expand_rows(gates, n, "gates", batch)
    preference = expand_rows(preference, n, "preference", batch)
    try:
        if gates is not None and set_gates(model, gates) == 0:
            raise ValueError("gates given, but the model has no fixed-gate router to take them")
        if preference is not None and set_preference(model, preference) == 0:
            raise ValueError("preference given, but the model has no hierarchical router to take it")
        return model.generate(*args, **kwargs)
    finally:
        if gates is not None:
            set_gates(model, None)
        if preference is not None:
            set_preference(model, None)
