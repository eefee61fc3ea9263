"""Mix- and MoE-DPO models (spec §5; seed: arXiv 2510.08256): gating and the model wrapper.

The policy is a mixture of K experts ``pi(y|x) = sum_k w_k(x) pi_k(y|x)``:

- Mix-DPO: shared backbone, K expert LM heads, fixed weights ``w`` (``FixedMixture``).
- MoE-DPO: the same with input-dependent gating ``w(x) = softmax(G phi(x))``
  (``SequenceGate``: phi = masked-mean or last-token pooling of the prompt's hidden states,
  optionally concatenated with a user embedding).
- LoRA experts in the backbone, driven by the same per-sequence gates: the core op's "dense
  soft mixture" regime; ``sequence_gates_to_routing`` turns ``[B, E]`` gates into the
  ``expert_indices`` / ``expert_weights`` that ``moelora.molora_linear`` takes.

``MoEDPOModel`` wires backbone, heads and gate to ``moelora.expert_logprobs`` (the K heads'
log-probs without ``[T, K, V]`` logits) and the losses of ``moelora.losses.dpo``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from moelora.losses.dpo import MixtureDPOOutput, mixture_dpo_loss, sequence_logprobs
from moelora.ops.backends import accumulate_dtype
from moelora.ops.expert_logprobs import expert_logprobs

__all__ = [
    "pool_hidden",
    "sequence_gates_to_routing",
    "SequenceGate",
    "FixedMixture",
    "MoEDPOModel",
]

_POOLINGS = ("mean", "last")


def pool_hidden(hidden: Tensor, attention_mask: Optional[Tensor] = None, mode: str = "mean") -> Tensor:
    """Pool ``[B, S, d]`` hidden states to ``[B, d]`` over the tokens where the mask is set.

    ``"mean"``: masked mean (a row with no token pools to 0). ``"last"``: the last masked
    token, which handles left and right padding alike (a row with no token takes position 0).
    """
    if mode not in _POOLINGS:
        raise ValueError(f"pooling must be one of {_POOLINGS}, got {mode!r}")
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


def sequence_gates_to_routing(gates: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Per-sequence gates ``[B, E]`` -> dense routing for ``moelora.molora_linear``.

    Returns ``expert_indices [B, S, E]`` (``0..E-1`` for every token) and ``expert_weights
    [B, S, E]`` (the sequence's gates on each of its tokens): the core op's k = E regime, so
    every token of sequence b computes ``W x + s sum_e gates[b, e] B_e A_e x``. Both are
    expanded views (no copy); gradients flow back to ``gates``.
    """
    if gates.dim() != 2:
        raise ValueError(f"gates must be [B, E], got shape {tuple(gates.shape)}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be a non-negative int, got {seq_len!r}")
    B, E = gates.shape
    indices = torch.arange(E, device=gates.device).expand(B, seq_len, E)
    weights = gates.unsqueeze(1).expand(B, seq_len, E)
    return indices, weights


class SequenceGate(nn.Module):
    """MoE-DPO gating network ``w(x) = softmax(G [phi(x); u])``, returned as log-weights.

    Args:
        hidden_size: d of the backbone's hidden states.
        num_experts: K.
        pooling: ``"mean"`` (masked mean) or ``"last"`` (last masked token) for phi.
        user_embedding_dim: size of an optional per-sequence user embedding ``u`` concatenated
            to phi (0: none).
        bias: whether G has a bias.

    ``G`` starts at zero, so a fresh gate is the uniform mixture (an identity change, like a
    fresh LoRA's ``B = 0``); the gradient ``w - q`` of the EM loss moves it off that point as
    soon as the experts differ.
    """

    def __init__(self, hidden_size: int, num_experts: int, *, pooling: str = "mean",
                 user_embedding_dim: int = 0, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.pooling = pooling
        self.user_embedding_dim = user_embedding_dim
        self.proj = nn.Linear(hidden_size + user_embedding_dim, num_experts, bias=bias,
                              device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor, attention_mask: Optional[Tensor] = None,
                user_embedding: Optional[Tensor] = None) -> Tensor:
        """``hidden [B, S, d]``, ``attention_mask [B, S]`` (the tokens to pool, e.g. the prompt),
        ``user_embedding [B, u]`` -> log-weights ``[B, K]`` (fp32)."""
        phi = pool_hidden(hidden, attention_mask, self.pooling)
        if self.user_embedding_dim:
            if user_embedding is None:
                raise ValueError(f"this gate takes a user_embedding [B, {self.user_embedding_dim}]")
            if tuple(user_embedding.shape) != (phi.shape[0], self.user_embedding_dim):
                raise ValueError(
                    f"user_embedding has shape {tuple(user_embedding.shape)}, expected "
                    f"[{phi.shape[0]}, {self.user_embedding_dim}]"
                )
            phi = torch.cat([phi, user_embedding.to(phi.dtype)], dim=-1)
        elif user_embedding is not None:
            raise ValueError("user_embedding given, but the gate was built with user_embedding_dim=0")
        logits = self.proj(phi.to(self.proj.weight.dtype))
        return torch.log_softmax(logits.float(), dim=-1)


class FixedMixture(nn.Module):
    """Mix-DPO's input-independent weights, as log-weights ``[B, K]``.

    ``weights [K]`` (default uniform); ``learnable=True`` makes them a trained global softmax
    (what an M-step over fixed weights would estimate) instead of a constant.
    """

    def __init__(self, num_experts: int, weights: Optional[Tensor] = None, *,
                 learnable: bool = False, device=None):
        super().__init__()
        if weights is None:
            logits = torch.zeros(num_experts, device=device)
        else:
            weights = torch.as_tensor(weights, dtype=torch.float32, device=device)
            if tuple(weights.shape) != (num_experts,) or bool((weights < 0).any()) or not weights.sum() > 0:
                raise ValueError(f"weights must be [{num_experts}] non-negative with a positive sum")
            logits = torch.log(weights / weights.sum())
        self.num_experts = num_experts
        if learnable:
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)

    def forward(self, hidden: Tensor, attention_mask: Optional[Tensor] = None,
                user_embedding: Optional[Tensor] = None) -> Tensor:
        return torch.log_softmax(self.logits.float(), dim=-1).expand(hidden.shape[0], -1)


def _last_hidden(output) -> Tensor:
    """A backbone's output as [B, S, d]: a tensor, an HF ModelOutput, or a tuple."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return output[0]


def _pad_to(t: Tensor, length: int, value) -> Tensor:
    return t if t.shape[1] == length else F.pad(t, (0, length - t.shape[1]), value=value)


class MoEDPOModel(nn.Module):
    """A mixture policy: backbone -> K expert LM heads, mixed by a gate, trained with DPO.

    Args:
        backbone: ``backbone(input_ids, attention_mask=mask)`` returning hidden states
            ``[B, S, d]`` (a tensor, an HF model output with ``last_hidden_state``, or a tuple).
        heads: ``[K, V, d]`` initial expert heads (copied into a parameter).
        gate: ``SequenceGate`` (MoE-DPO), ``FixedMixture`` (Mix-DPO), or any module mapping
            ``(hidden, prompt_mask, user_embedding)`` to log-weights ``[B, K]``.
        reference_head: optional ``[V, d]`` frozen reference head on the *same* hidden states,
            for reference log-probs computed on the fly (right when the backbone is frozen, as
            in Mix-DPO over a shared backbone). When the backbone trains, pass precomputed
            reference log-probs to ``forward`` instead.
        beta, label_smoothing, objective: see ``moelora.losses.mixture_dpo_loss``.
        ignore_index: label id of tokens that are not scored (prompt, padding).
        backend: ``expert_logprobs`` backend.

    Labels follow the Hugging Face convention: ``labels [B, S]`` aligned with ``input_ids``,
    ``ignore_index`` on prompt and padding; position s's hidden state scores ``labels[s + 1]``.
    The gate pools the prompt: tokens with ``attention_mask`` set and no label.
    """

    def __init__(self, backbone: nn.Module, heads: Tensor, gate: nn.Module,
                 reference_head: Optional[Tensor] = None, *, beta: float = 0.1,
                 label_smoothing: float = 0.0, objective: str = "em", ignore_index: int = -100,
                 backend: str = "auto"):
        super().__init__()
        if heads.dim() != 3:
            raise ValueError(f"heads must be [K, V, d], got shape {tuple(heads.shape)}")
        self.backbone = backbone
        self.heads = nn.Parameter(heads.detach().clone())
        self.gate = gate
        if reference_head is not None:
            if tuple(reference_head.shape) != tuple(heads.shape[1:]):
                raise ValueError(
                    f"reference_head has shape {tuple(reference_head.shape)}, expected "
                    f"{list(heads.shape[1:])} ([V, d] of heads)"
                )
            reference_head = reference_head.detach().clone()
        self.register_buffer("reference_head", reference_head)
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.objective = objective
        self.ignore_index = ignore_index
        self.backend = backend

    @classmethod
    def from_lm_head(cls, backbone: nn.Module, lm_head_weight: Tensor, num_experts: int,
                     gate: nn.Module, *, init_noise: float = 0.0,
                     generator: Optional[torch.Generator] = None, **kwargs) -> "MoEDPOModel":
        """Experts start as copies of the base LM head ``[V, d]``, which is also the frozen
        reference. ``init_noise`` (relative to the head's std) breaks the experts' symmetry:
        identical experts have identical margins, so the EM responsibilities equal the gate's
        weights and nothing would pull the experts apart."""
        base = lm_head_weight.detach()
        heads = base.unsqueeze(0).repeat(num_experts, 1, 1)
        if init_noise:
            noise = torch.randn(heads.shape, generator=generator, dtype=torch.float32,
                                device=heads.device if generator is None else generator.device)
            heads = heads + (init_noise * base.float().std() * noise.to(heads.device)).to(heads.dtype)
        return cls(backbone, heads, gate, reference_head=base, **kwargs)

    @property
    def num_experts(self) -> int:
        return self.heads.shape[0]

    def sequence_logprobs(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *,
                          user_embedding: Optional[Tensor] = None,
                          gate_rows: Optional[int] = None, with_reference: bool = True):
        """-> ``(policy [B, K], reference [B] or None, log_weights [gate_rows or B, K])``.

        The gate is evaluated on the first ``gate_rows`` sequences only (chosen and rejected
        share a prompt, so their gates are one). The reference is None without a
        ``reference_head`` or with ``with_reference=False`` (reference log-probs precomputed).
        """
        hidden = _last_hidden(self.backbone(input_ids, attention_mask=attention_mask))
        if hidden.shape[:2] != input_ids.shape:
            raise ValueError(
                f"the backbone returned hidden states of shape {tuple(hidden.shape)}, expected "
                f"{tuple(input_ids.shape)} + (d,)"
            )
        rows = hidden.shape[0] if gate_rows is None else gate_rows
        prompt_mask = attention_mask.bool() & (labels == self.ignore_index)
        log_weights = self.gate(hidden[:rows], prompt_mask[:rows], user_embedding)
        # position s scores token s + 1; prompt and padding labels are ignore_index -> logp 0
        targets = labels[:, 1:]
        ref_head = self.reference_head if with_reference else None
        out = expert_logprobs(
            hidden[:, :-1], self.heads, targets, ignore_index=self.ignore_index,
            ref_head=ref_head, backend=self.backend,
        )
        if ref_head is None:
            return sequence_logprobs(out), None, log_weights
        token_logps, token_ref = out
        return sequence_logprobs(token_logps), sequence_logprobs(token_ref.unsqueeze(-1))[:, 0], log_weights

    def forward(self, chosen_input_ids: Tensor, chosen_attention_mask: Tensor,
                chosen_labels: Tensor, rejected_input_ids: Tensor,
                rejected_attention_mask: Tensor, rejected_labels: Tensor, *,
                user_embedding: Optional[Tensor] = None,
                reference_chosen_logps: Optional[Tensor] = None,
                reference_rejected_logps: Optional[Tensor] = None) -> MixtureDPOOutput:
        """The mixture DPO loss of a batch of B preference pairs (one backbone pass over the
        2B sequences, right-padded to a common length)."""
        B = chosen_input_ids.shape[0]
        S = max(chosen_input_ids.shape[1], rejected_input_ids.shape[1])
        input_ids = torch.cat([_pad_to(chosen_input_ids, S, 0), _pad_to(rejected_input_ids, S, 0)])
        mask = torch.cat([_pad_to(chosen_attention_mask, S, 0), _pad_to(rejected_attention_mask, S, 0)])
        labels = torch.cat([_pad_to(chosen_labels, S, self.ignore_index),
                            _pad_to(rejected_labels, S, self.ignore_index)])
        # precomputed reference log-probs take precedence: then no on-the-fly reference pass
        precomputed = reference_chosen_logps is not None or reference_rejected_logps is not None
        policy, reference, log_weights = self.sequence_logprobs(
            input_ids, mask, labels, user_embedding=user_embedding, gate_rows=B,
            with_reference=not precomputed)
        if not precomputed and reference is not None:
            reference_chosen_logps, reference_rejected_logps = reference[:B], reference[B:]
        return mixture_dpo_loss(
            policy[:B], policy[B:], reference_chosen_logps, reference_rejected_logps,
            log_weights=log_weights, beta=self.beta, label_smoothing=self.label_smoothing,
            objective=self.objective,
        )

    @torch.no_grad()
    def gate_weights(self, input_ids: Tensor, attention_mask: Tensor, labels: Optional[Tensor] = None,
                     *, user_embedding: Optional[Tensor] = None) -> Tensor:
        """The mixture weights ``[B, K]`` for a batch of prompts (labels: to mask responses)."""
        hidden = _last_hidden(self.backbone(input_ids, attention_mask=attention_mask))
        prompt_mask = attention_mask.bool()
        if labels is not None:
            prompt_mask = prompt_mask & (labels == self.ignore_index)
        return self.gate(hidden, prompt_mask, user_embedding).exp()
