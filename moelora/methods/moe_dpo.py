"""Mix- and MoE-DPO models (docs/spec.md §5; seed: arXiv 2510.08256): gating and the model wrappers.

The policy is a mixture of K experts ``pi(y|x) = sum_k w_k(x) pi_k(y|x)``:

- Mix-DPO: shared backbone, K expert LM heads, fixed weights ``w`` (``FixedMixture``).
- MoE-DPO: the same with input-dependent gating ``w(x) = softmax(G phi(x))``
  (``SequenceGate``: phi = masked-mean or last-token pooling of the prompt's hidden states,
  optionally concatenated with a user embedding).
- LoRA experts in the backbone, driven by per-sequence gates: the core op's "dense soft
  mixture" regime at serve time (``sequence_gates_to_routing`` turns ``[B, E]`` gates into the
  ``expert_indices`` / ``expert_weights`` that ``moelora.molora_linear`` takes).

Two wrappers compute the mixture DPO loss of ``moelora.losses.dpo`` from per-expert sequence
log-probs ``log pi_k(y|x)``, and share the batching (chosen and rejected in one right-padded
batch), the label convention and the loss:

- ``MoEDPOModel``: experts are LM heads; one backbone pass, then ``moelora.expert_logprobs``
  (the K heads' log-probs without ``[T, K, V]`` logits).
- ``MoELoRADPOModel``: experts are K LoRA experts injected into the backbone with fixed-gate
  routers (``inject(model, MoLoRAConfig(router={"type": "fixed", "k": 1}, num_experts=K))``)
  and one shared, frozen LM head. Expert k's policy is the backbone with expert k alone
  active, so the 2B sequences are replicated K times and routed with one-hot per-sequence
  gates (replica k -> expert k: the core op's multi-tenant regime) in a single backbone pass.
  A second pass, under no_grad with the adapters disabled, gives the frozen base model's
  hidden states: the reference log-probs and the gate's features (the gate never sees an
  expert's hidden states, so it cannot favour an expert through that expert's own output).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from moelora.integrations.controls import disable_adapters, routing_inputs
from moelora.layers.molora_linear import molora_layers
from moelora.layers.pooling import POOLINGS, backbone_hidden_states, pool_hidden
from moelora.losses.dpo import MixtureDPOOutput, mixture_dpo_loss, sequence_logprobs
from moelora.ops.expert_logprobs import expert_logprobs

__all__ = [
    "sequence_gates_to_routing",
    "SequenceGate",
    "FixedMixture",
    "MoEDPOModel",
    "MoELoRADPOModel",
    "IndependentMoEDPOModel",
    "moe_dpo_model",
]


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
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
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


def _backbone_hidden(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                     weights: Optional[dict] = None) -> Tensor:
    """``backbone(input_ids, attention_mask=...)`` as ``[B, S, d]``, shape-checked; ``weights``
    overrides some of the backbone's parameters for this call (``torch.func.functional_call``)."""
    if weights is None:
        out = backbone(input_ids, attention_mask=attention_mask)
    else:
        out = torch.func.functional_call(backbone, weights, (input_ids,),
                                         {"attention_mask": attention_mask}, strict=False)
    hidden = backbone_hidden_states(out)
    if hidden.shape[:2] != input_ids.shape:
        raise ValueError(
            f"the backbone returned hidden states of shape {tuple(hidden.shape)}, expected "
            f"{tuple(input_ids.shape)} + (d,)"
        )
    return hidden


def _prompt_mask(attention_mask: Tensor, labels: Optional[Tensor], ignore_index: int) -> Tensor:
    """The tokens the gate pools: attended and not scored (the prompt)."""
    mask = attention_mask.bool()
    return mask if labels is None else mask & (labels == ignore_index)


def _score(hidden: Tensor, heads: Tensor, labels: Tensor, *, ignore_index: int, backend: str,
           ref_head: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Sequence log-probs of ``labels [N, S]`` from ``hidden [N, S, d]`` under ``heads [K, V, d]``:
    ``[N, K]``, and ``[N]`` under ``ref_head [V, d]`` (None without one). Position s scores
    token s + 1; prompt and padding labels are ignore_index and count 0."""
    out = expert_logprobs(hidden[:, :-1], heads, labels[:, 1:], ignore_index=ignore_index,
                          ref_head=ref_head, backend=backend)
    if ref_head is None:
        return sequence_logprobs(out), None
    token_logps, token_ref = out
    return sequence_logprobs(token_logps), sequence_logprobs(token_ref.unsqueeze(-1))[:, 0]


def _pad_to(t: Tensor, length: int, value) -> Tensor:
    return t if t.shape[1] == length else F.pad(t, (0, length - t.shape[1]), value=value)


class _MixtureDPOPolicy(nn.Module):
    """What the two wrappers share: the loss settings, chosen + rejected in one batch, the loss.

    Subclasses set ``self.gate`` and implement ``sequence_logprobs`` (per-expert and reference
    sequence log-probs, gate log-weights) and ``_gate_hidden`` (what the gate pools).
    """

    def __init__(self, *, beta: float, label_smoothing: float, objective: str, ignore_index: int,
                 backend: str):
        super().__init__()
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.objective = objective
        self.ignore_index = ignore_index
        self.backend = backend
        # objective="gumbel": the relaxation's temperature; anneal it between steps with
        # moelora.losses.gumbel_temperature (model.gumbel_temperature = gumbel_temperature(step))
        self.gumbel_temperature = 1.0

    def sequence_logprobs(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *,
                          user_embedding: Optional[Tensor] = None,
                          gate_rows: Optional[int] = None, with_reference: bool = True):
        raise NotImplementedError

    def _gate_hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, chosen_input_ids: Tensor, chosen_attention_mask: Tensor,
                chosen_labels: Tensor, rejected_input_ids: Tensor,
                rejected_attention_mask: Tensor, rejected_labels: Tensor, *,
                user_embedding: Optional[Tensor] = None,
                reference_chosen_logps: Optional[Tensor] = None,
                reference_rejected_logps: Optional[Tensor] = None) -> MixtureDPOOutput:
        """The mixture DPO loss of a batch of B preference pairs (the 2B sequences right-padded
        to a common length and scored in one batch). Precomputed reference log-probs ``[B]``
        take precedence over the wrapper's own reference, which then is not computed."""
        B = chosen_input_ids.shape[0]
        S = max(chosen_input_ids.shape[1], rejected_input_ids.shape[1])
        input_ids = torch.cat([_pad_to(chosen_input_ids, S, 0), _pad_to(rejected_input_ids, S, 0)])
        mask = torch.cat([_pad_to(chosen_attention_mask, S, 0), _pad_to(rejected_attention_mask, S, 0)])
        labels = torch.cat([_pad_to(chosen_labels, S, self.ignore_index),
                            _pad_to(rejected_labels, S, self.ignore_index)])
        precomputed = reference_chosen_logps is not None or reference_rejected_logps is not None
        if getattr(self, "fused", False):
            return self._fused_forward(input_ids, mask, labels, B, user_embedding,
                                       reference_chosen_logps, reference_rejected_logps)
        policy, reference, log_weights = self.sequence_logprobs(
            input_ids, mask, labels, user_embedding=user_embedding, gate_rows=B,
            with_reference=not precomputed)
        if not precomputed and reference is not None:
            reference_chosen_logps, reference_rejected_logps = reference[:B], reference[B:]
        return mixture_dpo_loss(
            policy[:B], policy[B:], reference_chosen_logps, reference_rejected_logps,
            log_weights=log_weights, beta=self.beta, label_smoothing=self.label_smoothing,
            objective=self.objective, gumbel_temperature=self.gumbel_temperature,
        )

    @torch.no_grad()
    def gate_weights(self, input_ids: Tensor, attention_mask: Tensor, labels: Optional[Tensor] = None,
                     *, user_embedding: Optional[Tensor] = None) -> Tensor:
        """The mixture weights ``[B, K]`` for a batch of prompts (labels: to mask responses)."""
        hidden = self._gate_hidden(input_ids, attention_mask)
        return self.gate(hidden, _prompt_mask(attention_mask, labels, self.ignore_index),
                         user_embedding).exp()


class MoEDPOModel(_MixtureDPOPolicy):
    """A mixture policy: backbone -> K expert LM heads, mixed by a gate, trained with DPO.

    Args:
        backbone: ``backbone(input_ids, attention_mask=mask)`` returning hidden states
            ``[B, S, d]`` (a tensor, an HF model output with ``last_hidden_state``, or a tuple).
        heads: ``[K, V, d]`` initial expert heads (copied into a parameter).
        gate: ``SequenceGate`` (MoE-DPO), ``FixedMixture`` (Mix-DPO), or any module mapping
            ``(hidden, prompt_mask, user_embedding)`` to log-weights ``[B, K]``.
        reference_head: optional ``[V, d]`` frozen reference head (or ``[K, V, d]``: a frozen
            reference ``pi_ref(k)`` per expert, margins against each expert's own) on the *same* hidden states, for
            reference log-probs computed on the fly (right when the backbone is frozen, as in
            Mix-DPO over a shared backbone). When the backbone trains, pass precomputed
            reference log-probs to ``forward`` instead.
        beta, label_smoothing, objective: see ``moelora.losses.mixture_dpo_loss``.
        ignore_index: label id of tokens that are not scored (prompt, padding).
        backend: ``expert_logprobs`` backend.
        fused: compute the loss with ``moelora.losses.fused_mixture_dpo_loss`` (the loss inside
            the heads' chunk loop: 3 GEMM-equivalents instead of 4); same values and gradients.

    Labels follow the Hugging Face convention: ``labels [B, S]`` aligned with ``input_ids``,
    ``ignore_index`` on prompt and padding; position s's hidden state scores ``labels[s + 1]``.
    The gate pools the prompt: tokens with ``attention_mask`` set and no label.
    """

    def __init__(self, backbone: nn.Module, heads: Tensor, gate: nn.Module,
                 reference_head: Optional[Tensor] = None, *, beta: float = 0.1,
                 label_smoothing: float = 0.0, objective: str = "em", ignore_index: int = -100,
                 backend: str = "auto", fused: bool = False):
        super().__init__(beta=beta, label_smoothing=label_smoothing, objective=objective,
                         ignore_index=ignore_index, backend=backend)
        if fused and objective not in ("em", "mixture"):
            raise ValueError(f"fused=True supports objective 'em' or 'mixture', got {objective!r}")
        # fused: the loss inside the K heads' chunk loop (moelora.losses.fused_dpo), same values
        self.fused = fused
        if heads.dim() != 3:
            raise ValueError(f"heads must be [K, V, d], got shape {tuple(heads.shape)}")
        self.backbone = backbone
        self.heads = nn.Parameter(heads.detach().clone())
        self.gate = gate
        if reference_head is not None:
            if tuple(reference_head.shape) not in (tuple(heads.shape[1:]), tuple(heads.shape)):
                raise ValueError(
                    f"reference_head has shape {tuple(reference_head.shape)}, expected "
                    f"{list(heads.shape[1:])} (one shared [V, d]) or {list(heads.shape)} "
                    f"(one frozen reference head per expert, [K, V, d])"
                )
            reference_head = reference_head.detach().clone()
        self.register_buffer("reference_head", reference_head)

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

    def _gate_hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return _backbone_hidden(self.backbone, input_ids, attention_mask)

    def _fused_forward(self, input_ids, mask, labels, B, user_embedding, ref_chosen, ref_rejected):
        from moelora.losses.fused_dpo import fused_mixture_dpo_loss

        hidden = _backbone_hidden(self.backbone, input_ids, mask)
        prompt_mask = _prompt_mask(mask, labels, self.ignore_index)
        log_weights = self.gate(hidden[:B], prompt_mask[:B], user_embedding)
        if ref_chosen is None and ref_rejected is None and self.reference_head is not None:
            with torch.no_grad():
                ref_heads = self.reference_head if self.reference_head.dim() == 3 else self.reference_head.unsqueeze(0)
                reference, _ = _score(hidden, ref_heads, labels, ignore_index=self.ignore_index,
                                      backend=self.backend)
                reference = reference if self.reference_head.dim() == 3 else reference[:, 0]
            ref_chosen, ref_rejected = reference[:B], reference[B:]
        return fused_mixture_dpo_loss(
            hidden[:, :-1], self.heads, labels[:, 1:], log_weights=log_weights,
            reference_chosen_logps=ref_chosen, reference_rejected_logps=ref_rejected,
            beta=self.beta, label_smoothing=self.label_smoothing, objective=self.objective,
            ignore_index=self.ignore_index, backend=self.backend)

    def sequence_logprobs(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *,
                          user_embedding: Optional[Tensor] = None,
                          gate_rows: Optional[int] = None, with_reference: bool = True):
        """-> ``(policy [B, K], reference [B] or None, log_weights [gate_rows or B, K])``.

        The gate is evaluated on the first ``gate_rows`` sequences only (chosen and rejected
        share a prompt, so their gates are one). The reference is None without a
        ``reference_head`` or with ``with_reference=False`` (reference log-probs precomputed).
        """
        hidden = _backbone_hidden(self.backbone, input_ids, attention_mask)
        rows = hidden.shape[0] if gate_rows is None else gate_rows
        prompt_mask = _prompt_mask(attention_mask, labels, self.ignore_index)
        log_weights = self.gate(hidden[:rows], prompt_mask[:rows], user_embedding)
        if with_reference and self.reference_head is not None and self.reference_head.dim() == 3:
            policy, _ = _score(hidden, self.heads, labels, ignore_index=self.ignore_index,
                               backend=self.backend)
            with torch.no_grad():  # per-expert references [N, K]
                reference, _ = _score(hidden, self.reference_head, labels,
                                      ignore_index=self.ignore_index, backend=self.backend)
            return policy, reference, log_weights
        return (*_score(hidden, self.heads, labels, ignore_index=self.ignore_index,
                        backend=self.backend,
                        ref_head=self.reference_head if with_reference else None), log_weights)


class MoELoRADPOModel(_MixtureDPOPolicy):
    """A mixture policy whose K experts are LoRA experts in the backbone, trained with DPO.

    Expert k's policy ``pi_k`` is the backbone with LoRA expert k alone active (gate one-hot
    on k in every layer) followed by the shared LM head; the mixture ``sum_k w_k(x) pi_k`` is
    weighted by a gate on the prompt. Per batch of N = 2B sequences (chosen + rejected):

    1. base pass, under no_grad with the adapters disabled (``moelora.integrations.disable_adapters``)
       over the N sequences: the reference log-probs (the frozen base model is the reference)
       and the hidden states the gate pools. With precomputed reference log-probs, this pass
       covers the B chosen sequences only (the gate's). The gate sees neither an expert's
       hidden states (replica 0's would make ``w`` depend on expert 0 alone) nor their
       gradient; the base features are also what a deployed gate would see before choosing.
    2. expert pass: the N sequences replicated K times (``[K * N, S]``, replica-major), routed
       with one-hot per-sequence gates (replica k -> expert k) given to every fixed-gate router
       for this pass only (``moelora.routing_inputs``: per call, per thread); then the shared head's log-probs of the labels through
       ``moelora.expert_logprobs`` (chunked over the vocabulary; no ``[T, V]`` logits).

    Memory and compute of the expert pass are K times a plain DPO step's. Inject with
    ``router={"type": "fixed", "k": 1}``: each token then computes its own expert only; the
    plain ``"fixed"`` router (k = E) gives the same values but computes all E experts with
    zero weights. Activation checkpointing works when it replays the gates: checkpoint with
    ``use_reentrant=False, context_fn=moelora.routing_checkpoint_context`` (transformers:
    ``gradient_checkpointing_kwargs``); without that context the recomputation raises.

    Args:
        backbone: a module whose target linears were injected with K LoRA experts behind
            fixed-gate routers (``moelora.inject``); ``backbone(input_ids,
            attention_mask=mask)`` returns hidden states ``[B, S, d]`` (a tensor, an HF output
            with ``last_hidden_state``, or a tuple), e.g. ``causal_lm.model``.
        lm_head: the frozen LM head: a module with ``.weight [V, d]`` (kept as a submodule,
            so a tied or moved weight stays shared) or a ``[V, d]`` tensor (kept, uncopied, as
            a buffer).
        gate: ``SequenceGate`` (MoE-DPO), ``FixedMixture`` (Mix-DPO), or any module mapping
            ``(hidden, prompt_mask, user_embedding)`` to log-weights ``[B, K]``.
        beta, label_smoothing, objective: see ``moelora.losses.mixture_dpo_loss``.
        ignore_index: label id of tokens that are not scored (prompt, padding).
        backend: ``expert_logprobs`` backend.
        reference_experts: each expert's own reference ``pi_ref(k)`` as a frozen LoRA set: None
            (default: the base model, adapters disabled, is every expert's reference),
            ``"snapshot"`` (the experts as they are now, e.g. after per-expert SFT, copied and
            frozen), or a ``{parameter name: tensor}`` dict of the backbone's expert weights
            (``...lora_A.weight`` / ``...lora_B.weight`` as in ``backbone.named_parameters()``).
            The reference of expert k is then the backbone with expert k at those weights: one
            more K-replicated pass, under no_grad; ``reference`` becomes ``[N, K]``.

    Labels and prompt masks follow ``MoEDPOModel``'s conventions. Trainable: the experts'
    A / B (and routers' parameters, none for fixed-gate routers) and the gate.
    """

    def __init__(self, backbone: nn.Module, lm_head, gate: nn.Module, *, beta: float = 0.1,
                 label_smoothing: float = 0.0, objective: str = "em", ignore_index: int = -100,
                 backend: str = "auto", reference_experts=None):
        super().__init__(beta=beta, label_smoothing=label_smoothing, objective=objective,
                         ignore_index=ignore_index, backend=backend)
        layers = list(molora_layers(backbone))
        if not layers:
            raise ValueError("backbone has no MoLoRALinear layers: inject K LoRA experts with a "
                             "fixed-gate router first (moelora.inject, router={'type': 'fixed', 'k': 1})")
        not_fixed = [name for name, layer in layers if not layer.router.accepts_gates]
        if not_fixed:
            raise ValueError(f"every MoLoRALinear needs a fixed-gate router (router='fixed'); "
                             f"these route by themselves: {not_fixed}")
        sizes = sorted({layer.num_experts for _, layer in layers})
        if len(sizes) != 1:
            raise ValueError(f"every MoLoRALinear must have the same number of experts, got {sizes}")
        self._num_experts = sizes[0]
        gate_experts = getattr(gate, "num_experts", self._num_experts)
        if gate_experts != self._num_experts:
            raise ValueError(f"the gate mixes {gate_experts} experts, the backbone's layers have "
                             f"{self._num_experts}")
        weight = lm_head if isinstance(lm_head, Tensor) else getattr(lm_head, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError("lm_head must be a [V, d] tensor or a module with a [V, d] .weight "
                             "(a LoRA'd head is not supported: heads as experts is MoEDPOModel)")
        self.backbone = backbone
        self.gate = gate
        if isinstance(lm_head, Tensor):
            self.lm_head = None
            self.register_buffer("lm_head_weight", lm_head.detach())
        else:
            self.lm_head = lm_head
            self.register_buffer("lm_head_weight", None)
        self._reference_experts = self._frozen_expert_set(reference_experts)

    def _frozen_expert_set(self, reference_experts) -> Optional[dict]:
        """``{backbone parameter name: frozen tensor}`` of the experts' reference weights."""
        if reference_experts is None:
            return None
        experts = {name: p for name, p in self.backbone.named_parameters()
                   if ".lora_A." in name or ".lora_B." in name}
        if isinstance(reference_experts, str):
            if reference_experts != "snapshot":
                raise ValueError(f"reference_experts must be None, 'snapshot' or a dict of expert "
                                 f"weights, got {reference_experts!r}")
            return {name: p.detach().clone() for name, p in experts.items()}
        if not isinstance(reference_experts, dict):
            raise TypeError(f"reference_experts must be None, 'snapshot' or a dict, got "
                            f"{type(reference_experts).__name__}")
        missing = sorted(set(experts) - set(reference_experts))
        unknown = sorted(set(reference_experts) - set(experts))
        if missing or unknown:
            raise ValueError(f"reference_experts must name exactly the backbone's expert weights: "
                             f"missing {missing[:3]}, unknown {unknown[:3]}")
        for name, t in reference_experts.items():
            if tuple(t.shape) != tuple(experts[name].shape):
                raise ValueError(f"reference_experts[{name!r}] has shape {tuple(t.shape)}, expected "
                                 f"{tuple(experts[name].shape)}")
        return {name: t.detach().to(experts[name]) for name, t in reference_experts.items()}

    def _expert_pass(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                     weights: Optional[dict] = None) -> Tensor:
        """``[N, K]`` sequence log-probs of each expert alone: the N sequences replicated K times
        (replica k -> expert k); ``weights`` overrides the experts' parameters (a reference)."""
        N, K = input_ids.shape[0], self.num_experts
        gates = torch.eye(K, device=input_ids.device).repeat_interleave(N, dim=0)  # [K * N, K]
        with routing_inputs(self.backbone, gates=gates):
            hidden = _backbone_hidden(self.backbone, input_ids.repeat(K, 1), attention_mask.repeat(K, 1),
                                      weights)  # [K * N, S, d]
        policy, _ = _score(hidden, self.head_weight.unsqueeze(0), labels.repeat(K, 1),
                           ignore_index=self.ignore_index, backend=self.backend)  # [K * N, 1]
        return policy.view(K, N).t()

    @classmethod
    def from_causal_lm(cls, model: nn.Module, gate: nn.Module, **kwargs) -> "MoELoRADPOModel":
        """From a transformers causal LM injected with fixed-gate LoRA experts: the backbone is
        ``model.base_model`` (e.g. ``LlamaModel``), the head ``model.get_output_embeddings()``."""
        return cls(model.base_model, model.get_output_embeddings(), gate, **kwargs)

    @property
    def num_experts(self) -> int:
        return self._num_experts

    @property
    def head_weight(self) -> Tensor:
        """The shared LM head ``[V, d]``."""
        return self.lm_head_weight if self.lm_head is None else self.lm_head.weight

    def _gate_hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        with torch.no_grad(), disable_adapters(self.backbone):
            return _backbone_hidden(self.backbone, input_ids, attention_mask)

    def sequence_logprobs(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *,
                          user_embedding: Optional[Tensor] = None,
                          gate_rows: Optional[int] = None, with_reference: bool = True):
        """-> ``(policy [N, K], reference [N] or None, log_weights [gate_rows or N, K])`` for
        ``input_ids``, ``attention_mask``, ``labels [N, S]``.

        ``policy[:, k]`` is expert k's sequence log-prob, ``reference`` the base model's ``[N]``
        (or ``[N, K]``, each expert's own, with ``reference_experts``; None with
        ``with_reference=False``: reference log-probs precomputed), ``log_weights`` the gate's on
        the first ``gate_rows`` sequences.
        """
        N = input_ids.shape[0]
        rows = N if gate_rows is None else gate_rows
        head = self.head_weight.unsqueeze(0)  # [1, V, d]: one shared head
        base_rows = N if with_reference else rows
        base = self._gate_hidden(input_ids[:base_rows], attention_mask[:base_rows])
        prompt_mask = _prompt_mask(attention_mask[:rows], labels[:rows], self.ignore_index)
        log_weights = self.gate(base[:rows], prompt_mask, user_embedding)
        reference = None
        if with_reference:
            with torch.no_grad():
                if self._reference_experts is None:  # the base model is every expert's reference
                    reference = _score(base, head, labels, ignore_index=self.ignore_index,
                                       backend=self.backend)[0][:, 0]
                else:  # expert k's own frozen LoRA set
                    reference = self._expert_pass(input_ids, attention_mask, labels, self._reference_experts)
        return self._expert_pass(input_ids, attention_mask, labels), reference, log_weights


def _module_logps(module: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                  ignore_index: int) -> Tensor:
    """Sequence log-probs ``[N]`` of ``labels`` under a causal LM returning logits (a tensor,
    an HF output with ``.logits``, or a tuple whose first item is the logits)."""
    out = module(input_ids, attention_mask=attention_mask)
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    y = labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(y != ignore_index, picked, 0.0).sum(1)


class IndependentMoEDPOModel(_MixtureDPOPolicy):
    """The "fully independent expert models" variant: K separate policies and one gate.

    Args:
        policies: K causal LMs (``policy(input_ids, attention_mask=mask)`` -> logits ``[N, S, V]``
            or an HF output with ``.logits``); expert k is ``policies[k]``.
        gate: maps ``(hidden, prompt_mask, user_embedding)`` to log-weights ``[B, K]``.
        gate_backbone: frozen module giving the hidden states the gate pools (e.g. the base
            model's backbone), run under no_grad.
        references: None (reference-free, or pass precomputed log-probs to ``forward``), one
            frozen model shared by all experts, or K frozen models (``pi_ref(k)`` per expert).
        beta, label_smoothing, objective, ignore_index: as ``MoEDPOModel``.

    Same ``forward`` / loss API as the other wrappers. Memory: K full models.
    """

    def __init__(self, policies, gate: nn.Module, gate_backbone: nn.Module, references=None, *,
                 beta: float = 0.1, label_smoothing: float = 0.0, objective: str = "em",
                 ignore_index: int = -100):
        super().__init__(beta=beta, label_smoothing=label_smoothing, objective=objective,
                         ignore_index=ignore_index, backend="torch")
        policies = list(policies)
        if not policies:
            raise ValueError("policies must hold at least one model")
        gate_experts = getattr(gate, "num_experts", len(policies))
        if gate_experts != len(policies):
            raise ValueError(f"the gate mixes {gate_experts} experts, got {len(policies)} policies")
        if isinstance(references, nn.Module):
            references = [references]
        references = None if references is None else list(references)
        if references is not None and len(references) not in (1, len(policies)):
            raise ValueError(f"references must be one model or {len(policies)} (one per expert), "
                             f"got {len(references)}")
        self.policies = nn.ModuleList(policies)
        self.gate = gate
        self.gate_backbone = gate_backbone
        self.references = None if references is None else nn.ModuleList(references)
        for frozen in ([gate_backbone] + (references or [])):
            frozen.requires_grad_(False)

    @property
    def num_experts(self) -> int:
        return len(self.policies)

    def _gate_hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        with torch.no_grad():
            return _backbone_hidden(self.gate_backbone, input_ids, attention_mask)

    def sequence_logprobs(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *,
                          user_embedding: Optional[Tensor] = None,
                          gate_rows: Optional[int] = None, with_reference: bool = True):
        """-> ``(policy [N, K], reference [N] / [N, K] or None, log_weights [gate_rows, K])``."""
        rows = input_ids.shape[0] if gate_rows is None else gate_rows
        hidden = self._gate_hidden(input_ids[:rows], attention_mask[:rows])
        log_weights = self.gate(hidden, _prompt_mask(attention_mask[:rows], labels[:rows],
                                                     self.ignore_index), user_embedding)
        policy = torch.stack([_module_logps(p, input_ids, attention_mask, labels, self.ignore_index)
                              for p in self.policies], dim=1)
        reference = None
        if with_reference and self.references is not None:
            with torch.no_grad():
                refs = [_module_logps(r, input_ids, attention_mask, labels, self.ignore_index)
                        for r in self.references]
            reference = refs[0] if len(refs) == 1 else torch.stack(refs, dim=1)
        return policy, reference, log_weights


VARIANTS = {"heads": MoEDPOModel, "lora": MoELoRADPOModel, "independent": IndependentMoEDPOModel}


def moe_dpo_model(variant: str, *args, **kwargs) -> _MixtureDPOPolicy:
    """The paper's three variants by one argument: ``"heads"`` (shared backbone + K expert
    heads, ``MoEDPOModel``), ``"lora"`` (K LoRA experts in the backbone, ``MoELoRADPOModel``),
    ``"independent"`` (K separate models, one gate, ``IndependentMoEDPOModel``); the other
    arguments go to that class."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    return VARIANTS[variant](*args, **kwargs)
