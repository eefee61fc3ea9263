"""Mixture DPO losses (docs/spec.md §5; seed: Mix- and MoE-DPO, arXiv 2510.08256).

The policy is a mixture ``pi(y|x) = sum_k w_k(x) pi_k(y|x)`` of K experts. For a preference
pair (chosen ``y_w``, rejected ``y_l``) each expert has the usual DPO margin

    D_k = beta * [(log pi_k(y_w) - log pi_ref(y_w)) - (log pi_k(y_l) - log pi_ref(y_l))]

and ``sigmoid(D_k)`` is expert k's Bradley-Terry probability of the observed preference.

    direct mixture likelihood   L_mix = - log sum_k w_k sigmoid(D_k)
    variational EM              q_k   = w_k sigmoid(D_k) / sum_j w_j sigmoid(D_j)   (no gradient)
                                L_em  = - sum_k q_k log sigmoid(D_k) - sum_k q_k log w_k

At the current parameters the two have the same gradient (q is the posterior of the expert given
the pair: the EM identity), while L_em's value is the expected complete-data loss, which is what
makes the experts specialise: each pair trains mostly the expert that explains it best, and the
gate learns to predict that expert.

Everything is in log space (logsigmoid, logsumexp, log-weights), so large margins and
near-zero weights stay finite. Label smoothing (conservative DPO, eps = the probability that a
label is flipped) is the eps-mixture of the loss on the observed and on the flipped preference:
``(1 - eps) L(D) + eps L(-D)``, which for K = 1 is cDPO's
``-(1 - eps) log sigmoid(D) - eps log sigmoid(-D)``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "sequence_logprobs",
    "dpo_margins",
    "mixture_dpo_em_loss",
    "mixture_dpo_nll_loss",
    "mixture_dpo_gumbel_loss",
    "gumbel_temperature",
    "mixture_dpo_loss",
    "MixtureDPOOutput",
]

_REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= float(label_smoothing) < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")


# --------------------------------------------------------------------------------------------
# token log-probs -> sequence log-probs
# --------------------------------------------------------------------------------------------
def sequence_logprobs(
    token_logprobs: Tensor,
    *,
    mask: Optional[Tensor] = None,
    sequence_ids: Optional[Tensor] = None,
    num_sequences: Optional[int] = None,
    average: bool = False,
) -> Tensor:
    """Sum (or average) per-token log-probs over each sequence's counted tokens.

    Two layouts:

    - padded: ``token_logprobs [B, S, K]`` (or ``[B, S]``) with an optional ``mask [B, S]``
      (bool / 0-1; tokens with mask 0 are not counted). Returns ``[B, K]`` (or ``[B]``).
    - packed: ``token_logprobs [T, K]`` (or ``[T]``) with ``sequence_ids [T]`` giving each
      token's sequence in ``[0, num_sequences)``, ``-1`` for tokens not counted, and
      ``num_sequences`` (a Python int, so shapes are static and nothing syncs).

    Tokens whose target was ``ignore_index`` already have log-prob 0 in ``expert_logprobs``'
    output, so a plain sum is right without a mask; the mask matters for ``average=True``
    (length-normalised log-probs, as in IPO / SimPO), which divides by the number of counted
    tokens (at least 1).
    """
    if not isinstance(token_logprobs, torch.Tensor) or not token_logprobs.is_floating_point():
        raise TypeError("token_logprobs must be a floating-point torch.Tensor")
    if sequence_ids is not None:
        if mask is not None:
            raise ValueError("give either mask (padded layout) or sequence_ids (packed), not both")
        if isinstance(num_sequences, bool) or not isinstance(num_sequences, int) or num_sequences < 0:
            raise ValueError(
                f"num_sequences must be a non-negative int with sequence_ids, got {num_sequences!r}"
            )
        if sequence_ids.dim() != 1 or token_logprobs.shape[0] != sequence_ids.shape[0]:
            raise ValueError(
                f"sequence_ids has shape {tuple(sequence_ids.shape)}, expected "
                f"[{token_logprobs.shape[0]}] (one id per row of token_logprobs)"
            )
        if sequence_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"sequence_ids must be int32 or int64, got {sequence_ids.dtype}")
        counted = sequence_ids >= 0
        slot = torch.where(counted, sequence_ids.long(), num_sequences)  # -1 -> a dropped row
        values = token_logprobs * counted.view(-1, *([1] * (token_logprobs.dim() - 1)))
        out = token_logprobs.new_zeros(num_sequences + 1, *token_logprobs.shape[1:])
        out = out.index_add(0, slot, values)[:num_sequences]
        if average:
            counts = torch.zeros(num_sequences + 1, dtype=token_logprobs.dtype,
                                 device=token_logprobs.device)
            counts = counts.index_add(0, slot, counted.to(token_logprobs.dtype))[:num_sequences]
            out = out / counts.clamp(min=1).view(-1, *([1] * (out.dim() - 1)))
        return out
    if token_logprobs.dim() < 2:
        raise ValueError(
            f"token_logprobs must be [B, S] or [B, S, K] in the padded layout, got shape "
            f"{tuple(token_logprobs.shape)} (packed [T, K] needs sequence_ids)"
        )
    B, S = token_logprobs.shape[:2]
    if mask is None:
        weights = token_logprobs.new_ones(B, S)
    else:
        if tuple(mask.shape) != (B, S):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected [{B}, {S}] ([B, S])")
        weights = mask.to(token_logprobs.dtype)
    w = weights.view(B, S, *([1] * (token_logprobs.dim() - 2)))
    # where, not a bare product: an uncounted -inf (a masked-out pad token's log-prob) * 0 is nan
    out = torch.where(w != 0, token_logprobs * w, 0.0).sum(1)
    if average:
        out = out / weights.sum(1).clamp(min=1).view(B, *([1] * (out.dim() - 1)))
    return out


# --------------------------------------------------------------------------------------------
# margins and losses
# --------------------------------------------------------------------------------------------
def dpo_margins(
    policy_chosen_logps: Tensor,  # [B, K]
    policy_rejected_logps: Tensor,  # [B, K]
    reference_chosen_logps: Optional[Tensor] = None,  # [B] or [B, K]
    reference_rejected_logps: Optional[Tensor] = None,  # [B] or [B, K]
    *,
    beta: float = 0.1,
) -> Tensor:  # [B, K]
    """``D_k = beta * [(pi_k(y_w) - ref(y_w)) - (pi_k(y_l) - ref(y_l))]`` in log space.

    One reference for all experts (``[B]``, the usual frozen base model) or one per expert
    (``[B, K]``). Without reference log-probs (both None) the margin is reference-free.
    """
    if policy_chosen_logps.dim() != 2 or policy_rejected_logps.shape != policy_chosen_logps.shape:
        raise ValueError(
            f"policy_chosen_logps and policy_rejected_logps must both be [B, K], got "
            f"{tuple(policy_chosen_logps.shape)} and {tuple(policy_rejected_logps.shape)}"
        )
    if (reference_chosen_logps is None) != (reference_rejected_logps is None):
        raise ValueError("give both reference_chosen_logps and reference_rejected_logps, or neither")
    B, K = policy_chosen_logps.shape
    logratio = policy_chosen_logps - policy_rejected_logps
    if reference_chosen_logps is not None:
        for name, ref in (("reference_chosen_logps", reference_chosen_logps),
                          ("reference_rejected_logps", reference_rejected_logps)):
            if tuple(ref.shape) not in ((B,), (B, K)):
                raise ValueError(f"{name} has shape {tuple(ref.shape)}, expected [{B}] or [{B}, {K}]")
        ref_logratio = reference_chosen_logps - reference_rejected_logps
        if ref_logratio.dim() == 1:
            ref_logratio = ref_logratio.unsqueeze(1)
        logratio = logratio - ref_logratio.detach()
    return beta * logratio


def _as_log_weights(margins: Tensor, log_weights: Tensor) -> Tensor:
    B, K = margins.shape
    if tuple(log_weights.shape) not in ((K,), (B, K)):
        raise ValueError(
            f"log_weights has shape {tuple(log_weights.shape)}, expected [{K}] or [{B}, {K}] "
            f"(the mixture's log-weights over K = {K} experts)"
        )
    return log_weights.to(margins.dtype).expand(B, K)


def _em_term(loglik: Tensor, log_w: Tensor) -> tuple[Tensor, Tensor]:
    """- sum_k q_k (loglik_k + log w_k), q = softmax(log w + loglik) without gradient."""
    q = torch.softmax((log_w + loglik).detach(), dim=-1)
    # q_k log w_k with w_k = 0 (a switched-off expert) is 0, not 0 * -inf = nan
    q_log_w = torch.where(q > 0, q * log_w, torch.zeros_like(q))
    return -(q * loglik).sum(-1) - q_log_w.sum(-1), q


def mixture_dpo_em_loss(
    margins: Tensor,  # [B, K]
    log_weights: Tensor,  # [K] or [B, K]
    *,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """Variational EM loss ``- sum_k q_k log sigmoid(D_k) - sum_k q_k log w_k``.

    Returns ``(loss, responsibilities [B, K])``; the responsibilities are the posterior over
    experts of the observed preference, ``q ∝ w sigmoid(D)``, detached (no gradient flows
    through them). With label smoothing eps, ``(1 - eps) L(D) + eps L(-D)`` where the flipped
    term has its own responsibilities; the returned ones are the observed preference's.
    """
    _check_reduction(reduction)
    _check_label_smoothing(label_smoothing)
    log_w = _as_log_weights(margins, log_weights)
    loss, q = _em_term(F.logsigmoid(margins), log_w)
    if label_smoothing > 0:
        flipped, _ = _em_term(F.logsigmoid(-margins), log_w)
        loss = (1.0 - label_smoothing) * loss + label_smoothing * flipped
    return _reduce(loss, reduction), q


def mixture_dpo_nll_loss(
    margins: Tensor,  # [B, K]
    log_weights: Tensor,  # [K] or [B, K]
    *,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Direct mixture likelihood ``- log sum_k w_k sigmoid(D_k)`` (a logsumexp of
    ``log w_k + logsigmoid(D_k)``); with label smoothing eps,
    ``(1 - eps) L(D) + eps L(-D)``."""
    _check_reduction(reduction)
    _check_label_smoothing(label_smoothing)
    log_w = _as_log_weights(margins, log_weights)
    loss = -torch.logsumexp(log_w + F.logsigmoid(margins), dim=-1)
    if label_smoothing > 0:
        flipped = -torch.logsumexp(log_w + F.logsigmoid(-margins), dim=-1)
        loss = (1.0 - label_smoothing) * loss + label_smoothing * flipped
    return _reduce(loss, reduction)


def gumbel_temperature(step: int, *, start: float = 1.0, end: float = 0.1, steps: int = 1000) -> float:
    """Exponential annealing of the Gumbel-softmax temperature: ``start`` at step 0, ``end`` from
    ``steps`` on, ``tau = start * (end / start) ** (step / steps)`` in between (the usual
    schedule of Jang et al.: a soft assignment early, close to one-hot late)."""
    if not (start > 0 and end > 0):
        raise ValueError(f"start and end must be positive, got {start}, {end}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return float(start * (end / start) ** (min(step, steps) / steps))


def mixture_dpo_gumbel_loss(
    margins: Tensor,  # [B, K]
    log_weights: Tensor,  # [K] or [B, K]
    *,
    temperature: float = 1.0,
    gumbel_noise: Optional[Tensor] = None,  # [B, K] a fixed sample (tests, reproducibility)
    generator: Optional[torch.Generator] = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """Gumbel-softmax relaxation of the expert assignment: ``z = softmax((log w + g) / tau)``,
    ``g_k = -log(-log u_k)``, and the loss ``- sum_k z_k log sigmoid(D_k)``.

    The assignment is sampled from the gate (the reparameterisation trick), so the gate learns
    through ``z`` and each pair trains mostly its sampled expert; as ``tau -> 0`` (see
    `gumbel_temperature`) ``z`` becomes one-hot. Returns ``(loss, z [B, K])``; ``z`` carries the
    gate's gradient inside the loss and is returned detached.
    """
    _check_reduction(reduction)
    _check_label_smoothing(label_smoothing)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_w = _as_log_weights(margins, log_weights)
    if gumbel_noise is None:
        u = torch.rand(log_w.shape, generator=generator, dtype=torch.float32,
                       device=log_w.device if generator is None else generator.device).to(log_w.device)
        tiny = torch.finfo(torch.float32).tiny
        gumbel_noise = -torch.log(-torch.log(u.clamp(min=tiny, max=1 - 1e-7)))
    elif tuple(gumbel_noise.shape) != tuple(log_w.shape):
        raise ValueError(f"gumbel_noise has shape {tuple(gumbel_noise.shape)}, expected {tuple(log_w.shape)}")
    z = torch.softmax((log_w + gumbel_noise.to(log_w.dtype)) / temperature, dim=-1)
    loss = -(z * F.logsigmoid(margins)).sum(-1)
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * (z * F.logsigmoid(-margins)).sum(-1)
    return _reduce(loss, reduction), z.detach()


class MixtureDPOOutput(NamedTuple):
    loss: Tensor  # scalar, or [B] with reduction="none"
    margins: Tensor  # [B, K] per-expert DPO margins D_k (differentiable)
    responsibilities: Tensor  # [B, K] posterior q_k ∝ w_k sigmoid(D_k), detached
    log_weights: Tensor  # [B, K] the mixture's log-weights as used


def mixture_dpo_loss(
    policy_chosen_logps: Tensor,  # [B, K] sequence log-probs under each expert
    policy_rejected_logps: Tensor,  # [B, K]
    reference_chosen_logps: Optional[Tensor] = None,  # [B] or [B, K]
    reference_rejected_logps: Optional[Tensor] = None,  # [B] or [B, K]
    *,
    log_weights: Optional[Tensor] = None,  # [K] or [B, K]
    weights: Optional[Tensor] = None,  # [K] or [B, K]
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    objective: str = "em",
    reduction: str = "mean",
    gumbel_temperature: float = 1.0,
    gumbel_noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> MixtureDPOOutput:
    """Mix-DPO / MoE-DPO loss from sequence log-probs.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B, K]`` per-expert sequence log-probs
            (e.g. ``sequence_logprobs(expert_logprobs(...))``).
        reference_chosen_logps, reference_rejected_logps: ``[B]`` (shared reference) or
            ``[B, K]``, precomputed or computed on the fly under no_grad; None for both means
            reference-free margins.
        log_weights: the mixture's log-weights (``log_softmax`` of a gate, the stable form);
            ``[K]`` for Mix-DPO's fixed weights, ``[B, K]`` for MoE-DPO's gating.
        weights: the same as probabilities (give one of the two; neither means uniform).
        beta: DPO temperature.
        label_smoothing: conservative-DPO flip probability eps in ``[0, 0.5)``.
        objective: ``"em"`` (variational EM, responsibilities without gradient) or
            ``"mixture"`` (direct mixture likelihood) or ``"gumbel"`` (Gumbel-softmax relaxed
            assignment, `mixture_dpo_gumbel_loss`; its responsibilities are the sampled ``z``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the B pairs.
        gumbel_temperature, gumbel_noise, generator: for ``objective="gumbel"`` (anneal the
            temperature with `gumbel_temperature`).
    """
    if objective not in ("em", "mixture", "gumbel"):
        raise ValueError(f"objective must be 'em', 'mixture' or 'gumbel', got {objective!r}")
    margins = dpo_margins(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                          reference_rejected_logps, beta=beta)
    K = margins.shape[1]
    if log_weights is not None and weights is not None:
        raise ValueError("give log_weights or weights, not both")
    if weights is not None:
        # log(0) = -inf is right, but its gradient 1/0 times 0 is nan; a weight that is exactly
        # 0 (e.g. an underflowed softmax) passes no gradient instead, as through the softmax
        positive = weights > 0
        log_weights = torch.where(positive, torch.where(positive, weights, 1.0).log(), float("-inf"))
    elif log_weights is None:
        log_weights = margins.new_full((K,), -math.log(K))
    log_w = _as_log_weights(margins, log_weights)
    if objective == "em":
        loss, q = mixture_dpo_em_loss(margins, log_w, label_smoothing=label_smoothing,
                                      reduction=reduction)
    elif objective == "gumbel":
        loss, q = mixture_dpo_gumbel_loss(margins, log_w, temperature=gumbel_temperature,
                                          gumbel_noise=gumbel_noise, generator=generator,
                                          label_smoothing=label_smoothing, reduction=reduction)
    else:
        loss = mixture_dpo_nll_loss(margins, log_w, label_smoothing=label_smoothing,
                                    reduction=reduction)
        q = torch.softmax((log_w + F.logsigmoid(margins)).detach(), dim=-1)
    return MixtureDPOOutput(loss, margins, q, log_w)
