"""HoE — Hierarchical Experts (docs/spec.md §4; seed: arXiv 2505.20925). Plug-and-play, no backbone
training:

1. LoRA experts from single-objective fine-tuned models, without training: per target linear,
   task vector ``tau_i = W_i - W_0`` and truncated SVD at rank r:
   ``B_i = U_r S_r^{1/2}``, ``A_i = S_r^{1/2} V_r^T``, so ``B_i A_i`` is the best rank-r
   approximation of tau_i (exact at full rank). Scaling is 1.
2. Router experts ``R_j [E, d_in]`` (`HierarchicalRouter`), one per anchor preference.
3. Parameter-free preference routing: ``g_t = sum_j pi_j(lambda) softmax(R_j x_t)``.

    model = build_hoe(base_model, [ft_model_1, ft_model_2], HoEConfig(r=16))
    with routing_inputs(model, preference=torch.tensor([[0.7, 0.3], [0.2, 0.8]])):  # a user per sequence
        out = model(input_ids)

Memory: experts are built one target layer at a time; a source is a model, a state dict or a
safetensors file / folder (tensors read lazily, one at a time), so only one layer's weights
per source are materialised at once.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from moelora.integrations.config import TargetConfig
from moelora.integrations.inject import find_targets, inject_named
from moelora.layers.molora_linear import MoLoRALinear, molora_layers
from moelora.ops.dtypes import accumulate_dtype

__all__ = ["HoEConfig", "task_vector_svd", "energy_rank", "build_hoe", "hoe_experts_from_models", "tchebycheff",
           "tchebycheff_router_loss", "RouterExpertTrainer", "train_router_expert"]


@dataclass
class HoEConfig(TargetConfig):
    """Configuration of a HoE model; `build_hoe` uses it. The fields of
    `moelora.integrations.TargetConfig` (target_modules, exclude_modules, r: the SVD rank of each
    expert, clipped to min(d_out, d_in) per layer; freeze_base) plus:

    Attributes:
        anchors: ``[J, N]`` anchor preferences of the router experts (default identity: one per
            objective, N = number of fine-tuned models).
        top_k: optional top-k of the mixed gates (None: dense mixture of all experts).
        router_init: "anchor" (default for one-hot anchors: an untrained router gives expert i
            weight ~ lambda_i), "uniform" or "random" (see `HierarchicalRouter`).
        anchor_logit: bias of the anchor's own expert with router_init="anchor".
        svd_method: "svd" (exact, torch.linalg.svd) or "lowrank" (torch.svd_lowrank, for large
            layers at small r).
        svd_device: where to run the SVD (default: the weight's device).
        dtype: dtype of the experts (default: the base weights').
        energy: optional spectral-energy threshold tau in (0, 1]: each layer gets the smallest
            rank that keeps ``>= tau`` of ``sum sigma^2`` of every expert's task vector (the max
            over its experts, see `energy_rank`), capped at ``r`` (then r_max). None (default):
            the fixed rank r everywhere.
    """

    anchors: Optional[Sequence[Sequence[float]]] = None
    top_k: Optional[int] = None
    router_init: Optional[str] = None
    anchor_logit: float = 8.0
    svd_method: str = "svd"
    svd_device: Optional[Union[str, torch.device]] = None
    dtype: Optional[torch.dtype] = None
    energy: Optional[float] = None

    def __post_init__(self):
        super_post = getattr(super(), "__post_init__", None)
        if super_post is not None:
            super_post()
        if self.energy is not None and not 0.0 < float(self.energy) <= 1.0:
            raise ValueError(f"energy must be None or a fraction in (0, 1], got {self.energy!r}")

    def make_layer(self, base_layer: nn.Linear, name: str = "", *, num_experts: int,
                   r: Optional[int] = None) -> MoLoRALinear:
        r = min(self.r if r is None else r, base_layer.in_features, base_layer.out_features)
        router = {"type": "hierarchical", "anchors": self.anchors, "k": self.top_k,
                  "init": self.router_init, "anchor_logit": self.anchor_logit}
        # scaling = lora_alpha / r = 1: B A is the truncated task vector itself
        return MoLoRALinear(base_layer, num_experts, r, float(r), 0.0, router=router, dtype=self.dtype)


def task_vector_svd(finetuned: Tensor, base: Tensor, r: int, *, method: str = "svd",
                    device=None) -> tuple[Tensor, Tensor]:
    """``tau = finetuned - base`` [d_out, d_in] -> (A [r, d_in], B [d_out, r]) in fp32 (fp64 in,
    fp64 out) with ``B A`` the best rank-r approximation of tau: ``B = U_r S_r^{1/2}``,
    ``A = S_r^{1/2} V_r^T`` (the square root splits the scale evenly between A and B)."""
    if finetuned.shape != base.shape or finetuned.dim() != 2:
        raise ValueError(f"weights must be matching 2-D tensors, got {tuple(finetuned.shape)} and {tuple(base.shape)}")
    acc = accumulate_dtype(finetuned.dtype, base.dtype)
    device = finetuned.device if device is None else device
    tau = finetuned.to(device, acc) - base.to(device, acc)
    r = min(r, *tau.shape)
    if method == "svd":
        U, S, Vh = torch.linalg.svd(tau, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    elif method == "lowrank":
        U, S, V = torch.svd_lowrank(tau, q=min(r + 8, *tau.shape), niter=4)
        U, S, Vh = U[:, :r], S[:r], V[:, :r].t()
    else:
        raise ValueError(f"method must be 'svd' or 'lowrank', got {method!r}")
    root = S.sqrt()
    return root.unsqueeze(1) * Vh, U * root.unsqueeze(0)


def energy_rank(singular_values: Tensor, tau: float, r_max: Optional[int] = None) -> int:
    """Smallest r with ``sum_{i<r} sigma_i^2 >= tau * sum_i sigma_i^2`` (singular values in
    descending order, as torch.linalg.svdvals returns them), capped at ``r_max``; at least 1
    (a zero task vector gets rank 1: a zero expert)."""
    if not 0.0 < float(tau) <= 1.0:
        raise ValueError(f"tau must be a fraction in (0, 1], got {tau!r}")
    if singular_values.dim() != 1:
        raise ValueError(f"singular_values must be 1-D, got shape {tuple(singular_values.shape)}")
    energy = singular_values.double().square()
    total = energy.sum()
    if total <= 0:
        return 1
    # relative slack: a threshold met exactly (tau = 0.9 of [3, 1] squared) must not miss by rounding
    kept = energy.cumsum(0) >= (tau * total) * (1 - 1e-12)
    r = int(kept.nonzero()[0, 0]) + 1
    return max(1, min(r, r_max)) if r_max is not None else r


class _WeightSource:
    """Reads ``<module>.weight`` from a model, a state dict, or safetensors file(s), lazily."""

    def __init__(self, source):
        self.source = source
        self.files: dict[str, str] = {}  # key -> safetensors file
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if os.path.isdir(path):
                index = os.path.join(path, "model.safetensors.index.json")
                if os.path.exists(index):
                    with open(index, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                    self.files = {key: os.path.join(path, name) for key, name in weight_map.items()}
                else:
                    path = os.path.join(path, "model.safetensors")
            if not self.files:
                from safetensors import safe_open

                with safe_open(path, framework="pt") as f:
                    self.files = {key: path for key in f.keys()}

    def get(self, module_name: str) -> Tensor:
        keys = (f"{module_name}.weight", f"{module_name}.base_layer.weight")
        source = self.source
        if isinstance(source, nn.Module):
            module = source.get_submodule(module_name)
            module = getattr(module, "base_layer", module)
            return module.weight.detach()
        if isinstance(source, dict):
            for key in keys:
                if key in source:
                    return source[key]
        else:
            for key in keys:
                if key in self.files:
                    from safetensors import safe_open

                    with safe_open(self.files[key], framework="pt") as f:
                        return f.get_tensor(key)
        raise KeyError(f"no weight for module {module_name!r} in the fine-tuned source (tried {keys})")


@torch.no_grad()
def hoe_experts_from_models(model: nn.Module, finetuned: Sequence, *, method: str = "svd",
                            svd_device=None, layer_names: Optional[Sequence[str]] = None) -> None:
    """Fill the experts of every `MoLoRALinear` in model (or of those named in ``layer_names``)
    from the fine-tuned sources (expert i from source i), one layer at a time. The base weights
    W_0 are the layers' ``base_layer.weight``; each source is a model, a state dict or a
    safetensors path whose module names match model's."""
    sources = [s if isinstance(s, _WeightSource) else _WeightSource(s) for s in finetuned]
    layers = molora_layers(model)
    if layer_names is not None:
        wanted = set(layer_names)
        layers = [(name, layer) for name, layer in layers if name in wanted]
    for name, layer in layers:
        if layer.num_experts != len(sources):
            raise ValueError(f"layer {name} has {layer.num_experts} experts for {len(sources)} fine-tuned models")
        base = layer.base_layer.weight
        for i, source in enumerate(sources):
            A, B = task_vector_svd(source.get(name), base, layer.r, method=method, device=svd_device)
            layer.lora_A.weight[i].copy_(A)
            layer.lora_B.weight[i].copy_(B)
            del A, B


def _task_svdvals(finetuned: Tensor, base: Tensor, device=None) -> Tensor:
    acc = accumulate_dtype(finetuned.dtype, base.dtype)
    device = finetuned.device if device is None else device
    return torch.linalg.svdvals(finetuned.to(device, acc) - base.to(device, acc))


def build_hoe(model: nn.Module, finetuned: Sequence, config: Optional[HoEConfig] = None) -> nn.Module:
    """Inject HoE layers into ``model`` (the base model, W_0) at ``config.target_modules`` with one
    expert per fine-tuned source, and fill them by task-vector SVD. Returns model (modified in
    place; everything but the routers frozen)."""
    config = HoEConfig() if config is None else config
    num_experts = len(finetuned)
    if num_experts < 1:
        raise ValueError("build_hoe needs at least one fine-tuned model")
    names = find_targets(model, config.target_modules, config.exclude_modules)
    if not names:
        raise ValueError(f"build_hoe: no nn.Linear module matches target_modules={config.target_modules!r}")
    sources = [_WeightSource(s) for s in finetuned]

    def make_layer(base: nn.Linear, name: str) -> MoLoRALinear:
        r = None
        if config.energy is not None:  # per-layer rank from the task vectors' spectra
            r = max(energy_rank(_task_svdvals(source.get(name), base.weight, config.svd_device),
                                config.energy, config.r) for source in sources)
        return config.make_layer(base, name, num_experts=num_experts, r=r)

    # layers injected earlier stay as they are
    built = inject_named(model, names, make_layer, freeze_base=config.freeze_base)
    hoe_experts_from_models(model, sources, method=config.svd_method, svd_device=config.svd_device,
                            layer_names=[name for name, _ in built])
    for _, layer in built:  # experts are fixed by the SVD; routers train
        layer.lora_A.weight.requires_grad_(False)
        layer.lora_B.weight.requires_grad_(False)
    return model


def tchebycheff(rewards: Tensor, preference: Tensor, ideal: Tensor) -> Tensor:
    """Tchebycheff scalarisation ``max_i lambda_i (z_i* - r_i)`` (minimise it to train router
    experts): rewards ``[..., N]``, preference ``[N]`` or ``[..., N]``, ideal point ``z*``
    ``[N]`` or ``[..., N]`` -> ``[...]``."""
    return (preference * (ideal - rewards)).amax(dim=-1)


# ---------------------------------------------------------------------------------------------
# Level 2: training router expert j for its anchor preference lambda^(j) (backbone and experts
# frozen). The rewards come from whatever reward models the user has, one vector per sample.
# ---------------------------------------------------------------------------------------------


def tchebycheff_router_loss(rewards: Tensor, preference: Tensor, ideal: Tensor,
                            logprobs: Optional[Tensor] = None, *, baseline: str = "mean") -> Tensor:
    """Loss whose minimisation lowers the Tchebycheff objective ``T = max_i lambda_i (z_i* - r_i)``
    of per-sample reward vectors ``rewards [B, N]``.

    Two cases:
      * ``logprobs`` None: the rewards are differentiable functions of the model's output (a
        reward model run on hidden states or logits, or a surrogate); the loss is ``mean_b T_b``.
      * ``logprobs [B]`` given (sequence log-probs of sampled completions under the routed
        policy): the rewards are plain numbers (scored text); the loss is the REINFORCE surrogate
        ``mean_b (T_b - baseline) * logprobs_b`` whose gradient is that of ``E[T]``; baseline
        "mean" (the batch mean of T, detached: lower variance, same expectation) or "none".
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [batch, N] reward vectors, got shape {tuple(rewards.shape)}")
    t = tchebycheff(rewards, preference.to(rewards), ideal.to(rewards))  # [B]
    if logprobs is None:
        if not rewards.requires_grad:
            raise ValueError("rewards do not require grad: pass logprobs= (sequence log-probs of the "
                             "scored samples) to train on non-differentiable rewards")
        return t.mean()
    if logprobs.shape != t.shape:
        raise ValueError(f"logprobs must be [batch] = {tuple(t.shape)}, got {tuple(logprobs.shape)}")
    t = t.detach()
    if baseline == "mean":
        t = t - t.mean()
    elif baseline != "none":
        raise ValueError(f"baseline must be 'mean' or 'none', got {baseline!r}")
    return (t * logprobs).mean()


def _hoe_routers(model: nn.Module) -> list:
    routers = [layer.router for _, layer in molora_layers(model) if getattr(layer.router, "accepts_preference", False)]
    if not routers:
        raise ValueError("the model has no HoE (hierarchical) router; build it with build_hoe")
    return routers


class RouterExpertTrainer:
    """Trains router expert ``anchor`` (index j) of every HoE layer for its anchor preference
    ``lambda^(j)``: a step object to call from any training loop (or a transformers
    ``Trainer.compute_loss`` / a TRL reward loop).

        trainer = RouterExpertTrainer(model, anchor=0, ideal=torch.tensor([1.0, 1.0]))
        for batch in batches:
            trainer.activate()                 # preference := anchor j (pi one-hot on j)
            rewards = reward_vectors(model, batch)          # [B, N], differentiable, or
            stats = trainer.step(rewards)                   # ... step(rewards, logprobs=...)

    Only the routers' ``weight [J, E, d_in]`` / ``bias [J, E]`` are in the optimizer, and only
    their slice j changes: with pi one-hot on j the other router experts get exactly zero
    gradient, and `step` restores their slices after the optimizer's update (so weight decay or
    optimizer state from an earlier anchor cannot move them). Backbone and experts are never
    in the optimizer (build_hoe also sets requires_grad False on them).

    Args:
        model: a model with HoE layers (`build_hoe`).
        anchor: j, the router expert to train; the preference is the routers' ``anchors[j]``.
        ideal: the ideal point z* ``[N]`` (e.g. each reward model's maximum); None: the running
            per-objective max of the rewards seen so far (updated before each loss).
        optimizer: a ``callable(params) -> torch.optim.Optimizer`` (default Adam, lr, no decay).
        lr: learning rate of the default optimizer.
        baseline: of the REINFORCE surrogate (see `tchebycheff_router_loss`).
        max_grad_norm: optional gradient clipping over the router parameters.
    """

    def __init__(self, model: nn.Module, anchor: int, *, ideal: Optional[Tensor] = None, optimizer=None,
                 lr: float = 1e-2, baseline: str = "mean", max_grad_norm: Optional[float] = None):
        self.model = model
        self.routers = _hoe_routers(model)
        J = self.routers[0].num_router_experts
        if any(r.num_router_experts != J or not torch.equal(r.anchors.cpu(), self.routers[0].anchors.cpu())
               for r in self.routers):
            raise ValueError("all HoE layers must share the same anchors")
        if not isinstance(anchor, int) or not 0 <= anchor < J:
            raise ValueError(f"anchor must be an int in [0, {J}), got {anchor!r}")
        self.anchor = anchor
        self.preference = self.routers[0].anchors[anchor].detach().clone()
        self.ideal = None if ideal is None else torch.as_tensor(ideal, dtype=torch.float32)
        self._running_ideal = ideal is None
        self.baseline = baseline
        self.max_grad_norm = max_grad_norm
        self.params = [p for r in self.routers for p in (r.weight, r.bias)]
        for p in self.params:
            p.requires_grad_(True)
        make = optimizer if optimizer is not None else (lambda ps: torch.optim.Adam(ps, lr=lr, weight_decay=0.0))
        self.optimizer = make(self.params)

    def activate(self) -> "RouterExpertTrainer":
        """Set every HoE layer's preference to anchor j (call before the forward)."""
        for router in self.routers:
            router.set_preference(self.preference)
        return self

    def loss(self, rewards: Tensor, logprobs: Optional[Tensor] = None) -> Tensor:
        if self._running_ideal:
            batch_max = rewards.detach().float().amax(0).cpu()
            self.ideal = batch_max if self.ideal is None else torch.maximum(self.ideal, batch_max)
        return tchebycheff_router_loss(rewards, self.preference.to(rewards.device), self.ideal.to(rewards.device),
                                       logprobs, baseline=self.baseline)

    def step(self, rewards: Tensor, logprobs: Optional[Tensor] = None) -> dict:
        """One update from this batch's reward vectors; returns ``{"loss", "tchebycheff"}``
        (the batch's mean Tchebycheff objective before the update)."""
        loss = self.loss(rewards, logprobs)
        with torch.no_grad():
            objective = tchebycheff(rewards.detach(), self.preference.to(rewards.device),
                                    self.ideal.to(rewards.device)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        keep = [p.detach().clone() for p in self.params]
        self.optimizer.step()
        with torch.no_grad():  # router experts other than j stay exactly as they were
            others = torch.ones(self.routers[0].num_router_experts, dtype=torch.bool)
            others[self.anchor] = False
            for p, old in zip(self.params, keep):
                p[others.to(p.device)] = old[others.to(p.device)]
        return {"loss": loss.item(), "tchebycheff": objective.item()}


def train_router_expert(model: nn.Module, anchor: int, batches, reward_fn, *, ideal: Optional[Tensor] = None,
                        steps: Optional[int] = None, **trainer_kwargs) -> list:
    """The small loop: for each batch, set anchor j's preference, ``reward_fn(model, batch)``
    -> ``rewards [B, N]`` (differentiable) or ``(rewards, logprobs)`` (sampled completions), one
    `RouterExpertTrainer` step. Stops after ``steps`` batches (default: all). Returns the
    per-step stats dicts."""
    trainer = RouterExpertTrainer(model, anchor, ideal=ideal, **trainer_kwargs)
    history = []
    for i, batch in enumerate(batches):
        if steps is not None and i >= steps:
            break
        trainer.activate()
        out = reward_fn(model, batch)
        rewards, logprobs = out if isinstance(out, tuple) else (out, None)
        history.append(trainer.step(rewards, logprobs))
    return history
