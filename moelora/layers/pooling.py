"""Pooling of a backbone's hidden states, shared by the method models (MoE-DPO's gate,
MOSLIM's reward head)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moelora.ops.dtypes import accumulate_dtype

__all__ = ["POOLINGS", "pool_hidden", "last_token_hidden", "backbone_hidden_states"]

POOLINGS = ("mean", "last")


def pool_hidden(hidden: Tensor, attention_mask: Optional[Tensor] = None, mode: str = "mean") -> Tensor:
    """Pool ``[B, S, d]`` hidden states to ``[B, d]`` over the tokens where the mask is set.

    ``"mean"``: masked mean (a row with no token pools to 0). ``"last"``: the last masked
    token, which handles left and right padding alike (a row with no token takes position 0).
    """
    if mode not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {mode!r}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, S, d], got shape {tuple(hidden.shape)}")
    B, S, _ = hidden.shape
    if attention_mask is None:
        attention_mask = hidden.new_ones(B, S)
    elif tuple(attention_mask.shape) != (B, S):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected [{B}, {S}]")
    if mode == "mean":
        # sum and count in fp32 (fp64 stays): an fp16 sum over a long prompt overflows (4096
        # tokens of a feature of size 20 is past 65504); 16-bit counts are inexact past 256
        acc = accumulate_dtype(hidden.dtype)
        total = (hidden * attention_mask.to(hidden.dtype).unsqueeze(-1)).sum(1, dtype=acc)
        count = attention_mask.sum(1, keepdim=True, dtype=acc).clamp(min=1)
        return (total / count).to(hidden.dtype)
    positions = torch.arange(S, device=hidden.device)
    last = torch.where(attention_mask.bool(), positions, -1).amax(1).clamp(min=0)  # [B]
    return hidden[torch.arange(B, device=hidden.device), last]


def last_token_hidden(hidden_states: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """``[batch, seq, d] -> [batch, d]``: the hidden state of each sequence's last real token
    (right or left padding; without a mask, the last position)."""
    return pool_hidden(hidden_states, attention_mask, "last")


def backbone_hidden_states(output) -> Tensor:
    """A backbone's output as ``[B, S, d]``: a tensor, an HF ModelOutput with
    ``last_hidden_state``, or a tuple whose first item is the hidden states."""
    if isinstance(output, Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is not None:
        return hidden
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot read hidden states [batch, seq, d] from a {type(output).__name__} "
                    "(expected a tensor, an output with last_hidden_state, or a tuple; use the "
                    "base AutoModel, not a *ForCausalLM)")
