"""`generate`: transformers' ``model.generate`` with per-sequence gates / preferences.

``model.generate`` runs the batch expanded to ``batch * max(num_beams, num_return_sequences)``
rows, each input row repeated in place (``repeat_interleave``): beams and returned sequences
of input b are rows ``b * n ... b * n + n - 1``, and beam reordering stays inside those rows.
Gates ``[batch, E]`` or a preference ``[batch, N]`` set for the input batch therefore no longer
fit (the routers refuse: "gates has 2 rows ... leading shape is (4, 5)"); `generate` repeats
each row the same way and gives them to the routers for the call only (`routing_inputs`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from moelora.integrations.routing_context import routing_inputs

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
    sequence, expanded for ``num_beams`` / ``num_return_sequences``, given to the routers for this
    call only (`routing_inputs`)."""
    n = generation_expand_size(model, kwargs)
    batch = _input_batch(args, kwargs)
    gates = expand_rows(gates, n, "gates", batch)
    preference = expand_rows(preference, n, "preference", batch)
    if gates is None and preference is None:
        return model.generate(*args, **kwargs)
    # scoped to this call and thread: nothing is left on the routers afterwards
    with routing_inputs(model, gates=gates, preference=preference):
        return model.generate(*args, **kwargs)
