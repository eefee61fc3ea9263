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

Prompt format. A prompt states the objectives it asks for and their levels with one tag,
anywhere in its text (conventionally first):

    [objectives: helpfulness=3, harmlessness=1]

names ``[A-Za-z_][A-Za-z0-9_-]*``, levels non-negative integers (classes of that objective's
head), entries separated by commas, spaces optional, each name at most once, at least one entry.
`format_objectives` writes it, `parse_objectives` reads it back (ValueError on a missing,
repeated or malformed tag). `moslim_reward_function` turns a reward model into a TRL GRPO
``reward_funcs`` entry that parses this tag from each prompt.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from moelora.layers.pooling import backbone_hidden_states, last_token_hidden
from moelora.ops.checks import check_range

__all__ = ["MultiObjectiveRewardHead", "MultiObjectiveRewardModel", "format_objectives", "parse_objectives",
           "objective_targets", "moslim_reward_function"]

_NAME = r"[A-Za-z_][A-Za-z0-9_-]*"
_TAG = re.compile(r"\[objectives:([^\]]*)\]")
_ENTRY = re.compile(rf"^\s*({_NAME})\s*=\s*([0-9]+)\s*$")


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

    # HF Trainer: the loss is a mean over labelled pairs, so Trainer scales it for gradient
    # accumulation itself and must not pass num_items_in_batch (which the backbone won't take).
    accepts_loss_kwargs = False

    def __init__(self, backbone: nn.Module, hidden_size: int, num_classes: Sequence[int], **head_kwargs):
        super().__init__()
        self.backbone = backbone
        self.head = MultiObjectiveRewardHead(hidden_size, num_classes, **head_kwargs)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                **kwargs):
        """Fused logits ``[batch, sum C]``; with ``labels [batch, N]`` (a level per objective,
        negative = unlabelled: -1 or HF's -100), ``{"loss": masked CE, "logits": ...}``, which
        HF's Trainer trains directly (its collator passes the dataset's ``labels`` column)."""
        kwargs.pop("num_items_in_batch", None)  # older Trainers pass it regardless
        hidden = backbone_hidden_states(self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs))
        logits = self.head(last_token_hidden(hidden, attention_mask))
        if labels is None:
            return logits
        labels = labels.to(logits.device)
        labels = torch.where(labels < 0, torch.full_like(labels, -1), labels)  # -100 (HF) and -1 both mean missing
        return {"loss": self.head.loss(logits, labels), "logits": logits}


def format_objectives(objectives: Mapping[str, int]) -> str:
    """``{"helpfulness": 3, "harmlessness": 1}`` -> ``"[objectives: helpfulness=3, harmlessness=1]"``
    (insertion order kept)."""
    if not isinstance(objectives, Mapping) or not objectives:
        raise ValueError(f"objectives must be a non-empty mapping name -> level, got {objectives!r}")
    parts = []
    for name, level in objectives.items():
        if not isinstance(name, str) or re.fullmatch(_NAME, name) is None:
            raise ValueError(f"objective name must match {_NAME}, got {name!r}")
        if isinstance(level, bool) or not isinstance(level, int) or level < 0:
            raise ValueError(f"level of {name!r} must be a non-negative int, got {level!r}")
        parts.append(f"{name}={level}")
    return "[objectives: " + ", ".join(parts) + "]"


def parse_objectives(text: str) -> dict:
    """The ``{name: level}`` of the one ``[objectives: ...]`` tag in ``text`` (see the module
    docstring); ValueError if there is none, more than one, or it is malformed."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    tags = _TAG.findall(text)
    if len(tags) != 1:
        raise ValueError(f"text must hold exactly one '[objectives: name=level, ...]' tag, found {len(tags)}: "
                         f"{text[:80]!r}")
    result = {}
    for entry in tags[0].split(","):
        match = _ENTRY.match(entry)
        if match is None:
            raise ValueError(f"malformed objectives entry {entry.strip()!r}: expected name=level "
                             f"(name {_NAME}, level a non-negative integer)")
        name, level = match[1], int(match[2])
        if name in result:
            raise ValueError(f"objective {name!r} requested twice")
        result[name] = level
    return result


def objective_targets(prompts: Sequence[str], names: Sequence[str],
                      num_classes: Optional[Sequence[int]] = None) -> Tensor:
    """``targets [batch, N]`` (long) for the reward: the level each prompt's tag requests for
    objective ``names[i]``, -1 where it requests none. Unknown names, and levels >= C_i when
    ``num_classes`` is given, are ValueErrors."""
    names = list(names)
    targets = torch.full((len(prompts), len(names)), -1, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        for name, level in parse_objectives(prompt).items():
            if name not in names:
                raise ValueError(f"prompt {b} requests unknown objective {name!r}; the model's objectives are {names}")
            i = names.index(name)
            if num_classes is not None and level >= num_classes[i]:
                raise ValueError(f"prompt {b} requests {name}={level}, but {name} has {num_classes[i]} levels")
            targets[b, i] = level
    return targets


def _as_text(item) -> str:
    """A TRL prompt / completion: a string, or a conversation (list of {"role", "content"})."""
    if isinstance(item, str):
        return item
    if isinstance(item, (list, tuple)) and all(isinstance(m, Mapping) and "content" in m for m in item):
        return "\n".join(str(m["content"]) for m in item)
    raise TypeError(f"prompts / completions must be strings or lists of messages, got {type(item).__name__}")


def moslim_reward_function(model: "MultiObjectiveRewardModel", tokenizer, objective_names: Sequence[str], *,
                           max_length: Optional[int] = None, batch_size: Optional[int] = None,
                           update_stats: bool = False, name: str = "moslim_reward") -> Callable:
    """A TRL GRPO ``reward_funcs`` entry: ``f(prompts, completions, **kwargs) -> list[float]``.

    Each prompt's ``[objectives: ...]`` tag gives the targets (`objective_targets`); the reward
    model scores ``prompt + completion`` (conversations: their contents joined by newlines) and
    returns the MOSLIM scalar reward `MultiObjectiveRewardHead.reward`. ``tokenizer`` is called
    HF-style (``tokenizer(texts, return_tensors="pt", padding=True, truncation=..., max_length=...)``);
    left or right padding both work. The running statistics are read, not updated, unless
    ``update_stats`` (they should come from the reward model's training or a calibration pass).
    ``batch_size`` chunks the scoring (default: all at once). The function's ``__name__`` is
    ``name`` (TRL logs rewards under it)."""
    names = list(objective_names)
    if len(names) != model.head.num_objectives:
        raise ValueError(f"objective_names has {len(names)} names for {model.head.num_objectives} heads")

    def reward(prompts, completions, **kwargs) -> list:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions")
        prompt_texts = [_as_text(p) for p in prompts]
        texts = [p + _as_text(c) for p, c in zip(prompt_texts, completions)]
        targets = objective_targets(prompt_texts, names, model.head.num_classes)
        device = next(model.parameters()).device
        step = batch_size or max(len(texts), 1)
        out = []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(texts), step):
                    enc = tokenizer(texts[start:start + step], return_tensors="pt", padding=True,
                                    truncation=max_length is not None, max_length=max_length)
                    logits = model(input_ids=enc["input_ids"].to(device),
                                   attention_mask=enc["attention_mask"].to(device))
                    r = model.head.reward(logits, targets[start:start + step].to(device), update_stats=update_stats)
                    out += r.float().tolist()
        finally:
            model.train(was_training)
        return out

    reward.__name__ = reward.__qualname__ = name
    return reward
