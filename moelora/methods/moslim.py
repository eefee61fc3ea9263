"""MOSLIM — multi-head reward classification (docs/spec.md §7; seed: arXiv 2505.20336).

One reward model for many objectives: for each objective i a classification head ``[C_i, d]``
on the last-token hidden state, ``p_i = softmax``. All heads are one `nn.Linear` GEMM into
``sum_i C_i`` outputs followed by a segmented softmax (a gather into ``[..., N, C_max]`` with
-inf padding: one kernel, no Python loop over heads). Heads train with a masked cross-entropy
(objectives a sample does not label are masked). The scalar reward for a prompt that asks
for objectives M at levels target_i:

    r = (1/|M|) sum_{i in M} (p_i[target_i] - mu_i) / sigma_i

with mu_i, sigma_i running statistics of p_i[target_i] (buffers, updated in training mode;
shared by the replicas under torch.distributed).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from moelora.layers.pooling import backbone_hidden_states, last_token_hidden
from moelora.ops.checks import check_range

__all__ = ["MultiObjectiveRewardHead", "MultiObjectiveRewardModel"]


def _distributed_world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class MultiObjectiveRewardHead(nn.Module):
    """N classification heads as one GEMM, with segmented softmax and scalar-reward mapping.

    Args:
        hidden_size: d.
        num_classes: ``[C_1, ..., C_N]`` classes (levels) per objective.
        bias: bias of the fused projection.
        momentum: None (default): exact cumulative mean / variance over every score seen in
            training; a float: exponential moving averages with this momentum (like BatchNorm).
        eps: added to the variance before the square root.
        sync_stats: under torch.distributed (world size > 1), merge every rank's scores into
            the statistics (two all-reduces per update, like SyncBatchNorm), so the replicas
            keep equal statistics and normalise rewards alike; every rank must then update
            together. Off: each rank keeps its own (and DDP's buffer broadcast overwrites them
            with rank 0's at the next forward).
        device, dtype: of the projection.

    Buffers: ``running_mean [N]``, ``running_var [N]`` (start 0 and 1: an untrained head's
    reward is the mean raw probability), ``num_samples [N]`` (scores seen per objective).
    """

    def __init__(self, hidden_size: int, num_classes: Sequence[int], *, bias: bool = True,
                 momentum: Optional[float] = None, eps: float = 1e-5, sync_stats: bool = True,
                 device=None, dtype=None):
        super().__init__()
        num_classes = [int(c) for c in num_classes]
        if not num_classes or min(num_classes) < 1:
            raise ValueError(f"num_classes must be a non-empty list of positive ints, got {num_classes}")
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.num_objectives = len(num_classes)
        self.momentum = momentum
        self.eps = eps
        self.sync_stats = bool(sync_stats)
        total, c_max = sum(num_classes), max(num_classes)
        self.proj = nn.Linear(hidden_size, total, bias=bias, device=device, dtype=dtype)
        # gather_index[i, c] = column of class c of objective i in the fused output; padding
        # points at column `total`, a -inf sentinel appended in `segment_logits`.
        offsets = torch.tensor([0] + num_classes[:-1]).cumsum(0)
        classes = torch.arange(c_max)
        valid = classes.unsqueeze(0) < torch.tensor(num_classes).unsqueeze(1)  # [N, C_max]
        index = torch.where(valid, offsets.unsqueeze(1) + classes.unsqueeze(0), total)
        self.register_buffer("gather_index", index.to(device), persistent=False)
        self.register_buffer("class_mask", valid.to(device), persistent=False)
        self.register_buffer("running_mean", torch.zeros(self.num_objectives, device=device))
        self.register_buffer("running_var", torch.ones(self.num_objectives, device=device))
        self.register_buffer("num_samples", torch.zeros(self.num_objectives, device=device))

    def reset_parameters(self) -> None:
        self.proj.reset_parameters()
        self.reset_running_stats()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_samples.zero_()

    def forward(self, hidden: Tensor) -> Tensor:
        """``hidden [..., d]`` (e.g. `last_token_hidden`) -> fused logits ``[..., sum_i C_i]``."""
        return self.proj(hidden)

    def segment_logits(self, logits: Tensor) -> Tensor:
        """Fused ``[..., sum C]`` -> ``[..., N, C_max]`` in fp32, padding classes at -inf."""
        logits = logits.float()
        sentinel = logits.new_full((*logits.shape[:-1], 1), float("-inf"))
        padded = torch.cat([logits, sentinel], dim=-1)
        index = self.gather_index.reshape(-1).expand(*logits.shape[:-1], -1)
        return padded.gather(-1, index).reshape(*logits.shape[:-1], self.num_objectives, -1)

    def log_probs(self, logits: Tensor) -> Tensor:
        """Segmented log-softmax: ``[..., N, C_max]``, -inf at padding classes."""
        return torch.log_softmax(self.segment_logits(logits), dim=-1)

    def probs(self, logits: Tensor) -> Tensor:
        """Segmented softmax: ``[..., N, C_max]``, 0 at padding classes."""
        return torch.softmax(self.segment_logits(logits), dim=-1)

    def _check_levels(self, name: str, levels: Tensor) -> None:
        """Levels must lie in [-1, C_i) per objective: a level in [C_i, C_max) would read a
        padding class (log-prob -inf, an infinite loss), one past C_max out of bounds."""
        limit = self.gather_index.new_tensor(self.num_classes)
        check_range(levels, -1, limit, name=name,
                    expected=f"be -1 (none) or a level in [0, C_i) of its objective, C = {self.num_classes}")

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Masked cross-entropy: ``labels [..., N]`` class per objective, -1 where the sample has
        no label for that objective. Mean over the labelled (sample, objective) pairs."""
        if labels.shape != (*logits.shape[:-1], self.num_objectives):
            raise ValueError(f"labels must be {tuple(logits.shape[:-1]) + (self.num_objectives,)}, "
                             f"got {tuple(labels.shape)}")
        self._check_levels("labels", labels)
        logp = self.log_probs(logits)  # [..., N, C_max]
        labelled = labels >= 0
        picked = logp.gather(-1, labels.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)  # [..., N]
        picked = torch.where(labelled, picked, torch.zeros_like(picked))
        return -picked.sum() / labelled.sum().clamp(min=1)

    @torch.no_grad()
    def update_stats(self, scores: Tensor, mask: Tensor) -> None:
        """Merge the scores ``[..., N]`` where mask (the requested objectives) into the running
        statistics (Chan et al.'s parallel mean / variance update; no host sync). With
        ``sync_stats`` under torch.distributed, the batch is every rank's scores."""
        scores = scores.reshape(-1, self.num_objectives).float()
        mask = mask.reshape(-1, self.num_objectives).to(scores.dtype)
        sync = self.sync_stats and _distributed_world_size() > 1
        counts_sums = torch.stack([mask.sum(0), (scores * mask).sum(0)])  # [2, N]
        if sync:
            torch.distributed.all_reduce(counts_sums)
        n_b, sum_b = counts_sums
        has = n_b > 0
        mean_b = sum_b / n_b.clamp(min=1)
        m2_b = (((scores - mean_b) ** 2) * mask).sum(0)
        if sync:
            torch.distributed.all_reduce(m2_b)
        var_b = m2_b / n_b.clamp(min=1)
        if self.momentum is None:
            n_a = self.num_samples
            n = n_a + n_b
            delta = mean_b - self.running_mean
            mean = self.running_mean + delta * n_b / n.clamp(min=1)
            var_a = torch.where(n_a > 0, self.running_var, torch.zeros_like(self.running_var))
            var = (var_a * n_a + var_b * n_b + delta ** 2 * n_a * n_b / n.clamp(min=1)) / n.clamp(min=1)
        else:
            m = self.momentum
            mean = (1 - m) * self.running_mean + m * mean_b
            var = (1 - m) * self.running_var + m * var_b
        self.running_mean.copy_(torch.where(has, mean, self.running_mean))
        self.running_var.copy_(torch.where(has, var, self.running_var))
        self.num_samples.add_(n_b)

    def reward(self, logits: Tensor, targets: Tensor, objective_mask: Optional[Tensor] = None,
               *, update_stats: Optional[bool] = None) -> Tensor:
        """Scalar reward ``[...]`` for ``targets [..., N]`` (requested level per objective) and
        ``objective_mask [..., N]`` (the objectives M the prompt asks for; default targets >= 0).

        In training mode (or with update_stats=True) the running statistics first absorb this
        batch's scores; the reward is normalised with the updated statistics. A prompt with no
        objective gets reward 0.
        """
        self._check_levels("targets", targets)
        if objective_mask is None:
            objective_mask = targets >= 0
        probs = self.probs(logits)  # [..., N, C_max]
        scores = probs.gather(-1, targets.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)  # [..., N]
        if update_stats or (update_stats is None and self.training):
            self.update_stats(scores.detach(), objective_mask)
        z = (scores - self.running_mean) / torch.sqrt(self.running_var + self.eps)
        mask = objective_mask.to(z.dtype)
        return (z * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_classes={self.num_classes}, momentum={self.momentum}"


class MultiObjectiveRewardModel(nn.Module):
    """A backbone (anything returning hidden states: a transformers ``AutoModel``, or a module
    returning ``[batch, seq, d]``) plus a `MultiObjectiveRewardHead` on the last real token."""

    def __init__(self, backbone: nn.Module, hidden_size: int, num_classes: Sequence[int], **head_kwargs):
        super().__init__()
        self.backbone = backbone
        self.head = MultiObjectiveRewardHead(hidden_size, num_classes, **head_kwargs)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
        hidden = backbone_hidden_states(self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs))
        return self.head(last_token_hidden(hidden, attention_mask))
