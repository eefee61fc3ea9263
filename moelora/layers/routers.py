"""Routers: what decides, per token, which LoRA experts of a `MoLoRALinear` fire and how much.

Every router maps activations ``x [..., d_in]`` to a `RouterOutput`:

    expert_indices  [..., k] int64   expert ids, -1 = no expert (PMoL's empty expert)
    expert_weights  [..., k] float   gates g[t, j]
    probs           [..., E'] | None the full routing distribution (aux losses need it)
    logits          [..., E'] | None the router logits (z-loss, group-loss temperature)

which is exactly what `moelora.molora_linear` and the aux losses of `moelora.losses.pmol`
consume. The routing regimes of spec §1-4:

    TopKRouter          top-k of softmax(x W_r^T), optionally noisy, optional empty expert
    DenseRouter         softmax over all E experts (k = E), per token
    FixedGateRouter     gates given from outside, [E] or per sequence [batch, E], broadcast
                        over the sequence (soups at serve time, multi-tenant, MoE-DPO gating)
    HierarchicalRouter  HoE: g_t = sum_j pi_j(lambda) softmax(R_j x_t), lambda per sequence

Per-sequence inputs (fixed gates, HoE preferences) are ``[batch, C]`` tensors (or ``[C]``,
shared by the batch) that broadcast over every other leading dim of ``x``: ``x [batch, seq,
d_in]`` reads row b for all tokens of sequence b. They are set on the router (so they reach
layers deep inside a model: see `moelora.layers.set_gates` / `set_preference`) or passed to the
layer's forward, which wins.

No router syncs with the host in its forward: shapes depend only on shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from moelora.ops.routing import topk_route

__all__ = [
    "RouterOutput",
    "Router",
    "TopKRouter",
    "DenseRouter",
    "FixedGateRouter",
    "HierarchicalRouter",
    "ROUTERS",
    "build_router",
    "anchor_mixing",
    "broadcast_per_sequence",
]


@dataclass
class RouterOutput:
    expert_indices: Tensor  # [..., k] int64, -1 = no expert
    expert_weights: Tensor  # [..., k]
    probs: Optional[Tensor] = None  # [..., E'] (E' = E, or E + 1 with an empty expert)
    logits: Optional[Tensor] = None  # [..., E']


def broadcast_per_sequence(values: Tensor, lead: torch.Size, name: str) -> Tensor:
    """``[C]`` or ``[batch, C]`` -> ``[*lead, C]``: row b serves every token of sequence b.

    ``lead`` is x's leading shape (``[batch, seq]`` for a transformer). A ``[1, C]`` or ``[C]``
    tensor is shared by the whole batch.
    """
    if values.dim() == 1:
        return values.expand(*lead, values.shape[0])
    if values.dim() != 2:
        raise ValueError(f"{name} must be [C] or [batch, C], got shape {tuple(values.shape)}")
    batch, columns = values.shape
    if batch == 1:
        return values[0].expand(*lead, columns)
    if len(lead) == 0 or lead[0] != batch:
        raise ValueError(
            f"{name} has {batch} rows (one per sequence), but the input's leading shape is "
            f"{tuple(lead)}: expected x of shape [{batch}, ..., d_in]"
        )
    view = values.reshape(batch, *([1] * (len(lead) - 1)), columns)
    return view.expand(*lead, columns)


class Router(nn.Module):
    """Base class. Subclasses set `kind` (the name `build_router` knows them by) and implement
    `forward(x, *, gates=None, preference=None) -> RouterOutput` and `config()`."""

    kind: str = ""
    accepts_gates: bool = False
    accepts_preference: bool = False

    def __init__(self, in_features: int, num_experts: int):
        super().__init__()
        if in_features < 1 or num_experts < 1:
            raise ValueError(f"in_features and num_experts must be >= 1, got {in_features}, {num_experts}")
        self.in_features = in_features
        self.num_experts = num_experts

    def config(self) -> dict:
        """JSON-able constructor kwargs (besides in_features / num_experts) plus "type"."""
        return {"type": self.kind}

    def reset_parameters(self) -> None:
        pass

    def _linear(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        # The router runs in its own parameters' dtype (e.g. fp32 router on a bf16 model).
        return F.linear(x.to(weight.dtype), weight, None if bias is None else bias)


def _arange_ids(num_experts: int, lead: torch.Size, device) -> Tensor:
    return torch.arange(num_experts, device=device).expand(*lead, num_experts)


class TopKRouter(Router):
    """``logits = x W_r^T (+ b_r)``, ``probs = softmax(logits)``, top-k, renormalised gates.

    Args:
        in_features: d_in.
        num_experts: E real experts.
        k: experts per token, ``1 <= k <= E``.
        empty_expert: add PMoL's empty expert as logit column E; when it wins a slot the id is
            -1 and the token falls back on the frozen base weight for that slot.
        renormalize: divide the k gates by their sum (off: gates are raw probabilities).
        noisy: Shazeer et al. (2017) noisy top-k in training: ``logits + N(0, 1) *
            softplus(x W_noise^T)``, W_noise zero-initialised (std softplus(0) = 0.69 at start).
            The recorded logits / probs are the noisy ones (what was actually routed).
        bias: learnable router bias.
    """

    kind = "topk"

    def __init__(self, in_features: int, num_experts: int, k: int = 2, *, empty_expert: bool = False,
                 renormalize: bool = True, noisy: bool = False, bias: bool = False,
                 device=None, dtype=None):
        super().__init__(in_features, num_experts)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
            raise ValueError(f"k must be an int with 1 <= k <= num_experts = {num_experts}, got {k!r}")
        self.k = k
        self.empty_expert = bool(empty_expert)
        self.renormalize = bool(renormalize)
        self.noisy = bool(noisy)
        factory = {"device": device, "dtype": dtype}
        columns = num_experts + int(self.empty_expert)
        self.weight = nn.Parameter(torch.empty(columns, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(columns, **factory)) if bias else None
        self.noise_weight = nn.Parameter(torch.empty(columns, in_features, **factory)) if noisy else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default: uniform(-1/sqrt(d_in), 1/sqrt(d_in)).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)

    def config(self) -> dict:
        return {"type": self.kind, "k": self.k, "empty_expert": self.empty_expert,
                "renormalize": self.renormalize, "noisy": self.noisy, "bias": self.bias is not None}

    def forward(self, x: Tensor, *, gates=None, preference=None) -> RouterOutput:
        logits = self._linear(x, self.weight, self.bias)  # [..., E']
        if self.noise_weight is not None and self.training:
            std = F.softplus(self._linear(x, self.noise_weight, None))
            logits = logits + torch.randn_like(logits) * std
        probs, ids, weights = topk_route(logits, self.k, renormalize=self.renormalize,
                                         empty_expert=self.empty_expert)
        return RouterOutput(ids, weights, probs, logits)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_experts={self.num_experts}, k={self.k}, "
                f"empty_expert={self.empty_expert}, noisy={self.noisy}")


class DenseRouter(Router):
    """Soft mixture of all experts per token: ``g = softmax(x W_r^T)``, k = E."""

    kind = "dense"

    def __init__(self, in_features: int, num_experts: int, *, bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, num_experts)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_experts, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def config(self) -> dict:
        return {"type": self.kind, "bias": self.bias is not None}

    def forward(self, x: Tensor, *, gates=None, preference=None) -> RouterOutput:
        logits = self._linear(x, self.weight, self.bias)
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        probs = torch.softmax(logits.to(acc), dim=-1)
        return RouterOutput(_arange_ids(self.num_experts, x.shape[:-1], x.device), probs, probs, logits)


class FixedGateRouter(Router):
    """Gates chosen outside the model: one vector per sequence, no parameters.

    Gates come from, in order: the forward's ``gates=`` argument, the ``gates`` attribute set by
    `set_gates` (``[E]`` or ``[batch, E]``), the ``default_gates`` buffer (uniform 1/E unless
    given). With ``k`` (< E) only the k largest gates of each row are computed (no
    renormalisation), which saves work for one-hot (multi-tenant) gates.
    """

    kind = "fixed"
    accepts_gates = True

    def __init__(self, in_features: int, num_experts: int, *, k: Optional[int] = None,
                 default_gates: Optional[Sequence[float]] = None, device=None, dtype=None):
        super().__init__(in_features, num_experts)
        if k is not None and not 1 <= k <= num_experts:
            raise ValueError(f"k must be None or 1 <= k <= {num_experts}, got {k}")
        self.k = k
        if default_gates is None:
            default = torch.full((num_experts,), 1.0 / num_experts, device=device, dtype=torch.float32)
        else:
            default = torch.as_tensor(default_gates, dtype=torch.float32, device=device)
            if default.shape != (num_experts,):
                raise ValueError(f"default_gates must have {num_experts} entries, got {tuple(default.shape)}")
        self.register_buffer("default_gates", default)
        self.gates: Optional[Tensor] = None  # transient per-batch gates, not saved

    def config(self) -> dict:
        return {"type": self.kind, "k": self.k}

    def forward(self, x: Tensor, *, gates=None, preference=None) -> RouterOutput:
        g = gates if gates is not None else (self.gates if self.gates is not None else self.default_gates)
        g = torch.as_tensor(g, device=x.device)
        if not g.is_floating_point():  # e.g. one-hot int / bool tenant gates
            g = g.float()
        if g.shape[-1] != self.num_experts:
            raise ValueError(f"gates must have {self.num_experts} columns (one per expert), got {tuple(g.shape)}")
        g = broadcast_per_sequence(g, x.shape[:-1], "gates")
        if self.k is not None and self.k < self.num_experts:
            weights, ids = torch.topk(g, self.k, dim=-1)
            return RouterOutput(ids, weights)
        return RouterOutput(_arange_ids(self.num_experts, x.shape[:-1], x.device), g)


def _project_to_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of v onto the probability simplex (Duchi et al. 2008)."""
    n = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    ind = torch.arange(1, n + 1, device=v.device, dtype=v.dtype)
    cond = (u - css / ind) > 0
    rho = (cond * ind).amax(-1, keepdim=True)  # largest index where cond holds (1-based)
    theta = css.gather(-1, (rho - 1).long()) / rho
    return (v - theta).clamp(min=0)


def _one_hot_columns(anchors: Tensor) -> Optional[Tensor]:
    """For anchors that are one-hot vectors, the objective each anchor stands for; else None."""
    if bool(((anchors == 0) | (anchors == 1)).all()) and bool((anchors.sum(-1) == 1).all()):
        return anchors.argmax(-1)
    return None


def anchor_mixing(preference: Tensor, anchors: Tensor, *, locality: float = 1e-3, iters: int = 1000) -> Tensor:
    """Mixing weights ``pi [..., J]`` over router experts for a user preference ``[..., N]``.

    ``anchors [J, N]`` are the preferences the J router experts were trained for; ``lambda`` is
    first normalised onto the simplex. When the anchors are the N one-hot vectors (the default,
    in any order), ``pi_j = lambda_{objective of anchor j}``. Otherwise pi are barycentric
    coordinates of lambda among the nearest anchors, in two steps:

    1. support: minimise ``||pi @ anchors - lambda||^2 + locality * sum_j pi_j ||a_j - lambda||^2``
       over the simplex (FISTA, fp64). Among the ways to write lambda as a mix of anchors, the
       locality term prefers close anchors (with 3 anchors on a line, the middle one alone
       serves the middle point, not a mix of the ends);
    2. exact coordinates on that support: the least-norm solution of ``pi_S @ anchors_S =
       lambda, sum pi_S = 1``, kept when non-negative (else step 1's answer, the closest point
       of the anchors' hull when lambda lies outside it).

    Routers compute it once per `set_preference`, not per token.
    """
    anchors = anchors.to(preference.device, torch.float64)
    lam = preference.to(torch.float64)
    lam = lam / lam.sum(-1, keepdim=True).clamp(min=1e-12)
    J, N = anchors.shape
    columns = _one_hot_columns(anchors)
    if columns is not None and J == N and bool((anchors.sum(0) == 1).all()):
        return lam[..., columns].to(torch.float32)
    lead = lam.shape[:-1]
    lam2 = lam.reshape(-1, N)
    gram = anchors @ anchors.t()  # [J, J]
    target = lam2 @ anchors.t()  # [B, J]
    dist = torch.cdist(lam2, anchors).square()  # [B, J]
    step = 1.0 / (2 * torch.linalg.matrix_norm(gram, ord=2))
    pi = torch.full((lam2.shape[0], J), 1.0 / J, dtype=torch.float64, device=lam.device)
    y, t = pi, 1.0
    for _ in range(iters):  # FISTA
        grad = 2 * (y @ gram - target) + locality * dist
        pi_next = _project_to_simplex(y - step * grad)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = pi_next + ((t - 1) / t_next) * (pi_next - pi)
        pi, t = pi_next, t_next
    support = (pi > 1e-4).to(torch.float64)  # [B, J]
    system = torch.cat([anchors.t(), anchors.new_ones(1, J)]).expand(len(pi), N + 1, J) * support.unsqueeze(1)
    rhs = torch.cat([lam2, lam2.new_ones(len(pi), 1)], dim=-1).unsqueeze(-1)
    exact = (torch.linalg.pinv(system) @ rhs).squeeze(-1) * support
    residual = (torch.cat([exact @ anchors, exact.sum(-1, keepdim=True)], -1) - rhs.squeeze(-1)).abs().amax(-1)
    ok = ((exact >= -1e-9).all(-1) & (residual < 1e-6)).unsqueeze(-1)
    pi = torch.where(ok, exact.clamp(min=0), pi)
    return (pi / pi.sum(-1, keepdim=True)).reshape(*lead, J).to(torch.float32)


class HierarchicalRouter(Router):
    """HoE preference routing (spec §4): ``g_t = sum_j pi_j(lambda) softmax(R_j x_t + c_j)``.

    ``R`` is ``weight [J, E, d_in]`` (J router experts), ``c`` is ``bias [J, E]``. ``lambda``
    (N objectives) comes per sequence from the forward's ``preference=`` or from
    `set_preference` (``[N]`` or ``[batch, N]``); ``pi = anchor_mixing(lambda, anchors)``, and pi
    is uniform over the router experts when no preference is given. Optional top-k of g with
    renormalisation.

    Router expert j is trained for anchor j by setting lambda = anchor j (pi one-hot: the other
    router experts get exactly zero gradient; use weight_decay=0 when training one at a time).

    Args:
        num_router_experts: J (default N, or E when anchors are not given).
        anchors: ``[J, N]`` anchor preferences (default: identity, one per objective).
        k: optional top-k of the mixed gates.
        init: "anchor" (default when the anchors are one-hot and N == E): zero R and bias
            ``c_j = anchor_logit * e_{objective of anchor j}``, so an untrained router sends
            preference lambda to the experts with weights ~ lambda (close to the exact
            per-sequence mixture soup: weight 0.9997 on the own expert for E = 2 and the default
            anchor_logit 8); "uniform": zero R and zero bias (g uniform); "random":
            nn.Linear's init for R.
    """

    kind = "hierarchical"
    accepts_preference = True

    def __init__(self, in_features: int, num_experts: int, *, num_router_experts: Optional[int] = None,
                 anchors: Optional[Sequence[Sequence[float]]] = None, k: Optional[int] = None,
                 renormalize: bool = True, init: Optional[str] = None, anchor_logit: float = 8.0,
                 device=None, dtype=None):
        super().__init__(in_features, num_experts)
        if anchors is None:
            J = num_router_experts if num_router_experts is not None else num_experts
            anchors_t = torch.eye(J)
        else:
            anchors_t = torch.as_tensor(anchors, dtype=torch.float32)
            if anchors_t.dim() != 2:
                raise ValueError(f"anchors must be [J, N], got shape {tuple(anchors_t.shape)}")
            if num_router_experts is not None and num_router_experts != anchors_t.shape[0]:
                raise ValueError(f"num_router_experts={num_router_experts} but {anchors_t.shape[0]} anchors given")
        J, N = anchors_t.shape
        if k is not None and not 1 <= k <= num_experts:
            raise ValueError(f"k must be None or 1 <= k <= {num_experts}, got {k}")
        self.num_router_experts = J
        self.num_objectives = N
        self.k = k
        self.renormalize = bool(renormalize)
        columns = _one_hot_columns(anchors_t)
        if init is None:
            init = "anchor" if (columns is not None and N == num_experts) else "uniform"
        if init not in ("anchor", "uniform", "random"):
            raise ValueError(f"init must be 'anchor', 'uniform' or 'random', got {init!r}")
        if init == "anchor" and (columns is None or N != num_experts):
            raise ValueError("init='anchor' needs one-hot anchors and one LoRA expert per objective (N == E)")
        # one-hot anchors that cover each objective once: pi is a reordering of lambda, no solve
        self._permutation = columns if (columns is not None and J == N and
                                        bool((anchors_t.sum(0) == 1).all())) else None
        self.init = init
        self.anchor_logit = float(anchor_logit)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("anchors", anchors_t.to(device))
        self.weight = nn.Parameter(torch.empty(J, num_experts, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(J, num_experts, **factory))
        self.preference: Optional[Tensor] = None  # transient [N] / [batch, N]
        self._mixing: Optional[Tensor] = None  # pi for self.preference, computed once
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "random":
                for j in range(self.num_router_experts):
                    nn.init.kaiming_uniform_(self.weight[j], a=math.sqrt(5))
            else:
                self.weight.zero_()
            self.bias.zero_()
            if self.init == "anchor":  # router expert j prefers the expert of its anchor's objective
                columns = self.anchors.argmax(-1).to(self.bias.device)
                self.bias.scatter_(1, columns.unsqueeze(1), self.anchor_logit)

    def config(self) -> dict:
        return {"type": self.kind, "num_router_experts": self.num_router_experts,
                "anchors": self.anchors.tolist(), "k": self.k, "renormalize": self.renormalize,
                "init": self.init, "anchor_logit": self.anchor_logit}

    def set_preference(self, preference: Optional[Tensor]) -> None:
        if preference is None:
            self.preference, self._mixing = None, None
            return
        preference = torch.as_tensor(preference, dtype=torch.float32, device=self.bias.device)
        _check_preference(preference, self.num_objectives)
        self.preference = preference
        self._mixing = anchor_mixing(preference, self.anchors)

    def mixing(self, preference: Optional[Tensor] = None) -> Tensor:
        """pi [J] or [batch, J] for a preference (default: the one set, else uniform)."""
        if preference is not None:
            preference = torch.as_tensor(preference, device=self.bias.device)
            if self._permutation is not None:  # the hot path: no solve, no host sync
                lam = preference.float() / preference.float().sum(-1, keepdim=True)
                return lam[..., self._permutation.to(lam.device)]
            return anchor_mixing(preference, self.anchors)
        if self._mixing is not None:
            return self._mixing
        return torch.full((self.num_router_experts,), 1.0 / self.num_router_experts, device=self.bias.device)

    def forward(self, x: Tensor, *, gates=None, preference=None) -> RouterOutput:
        J, E = self.num_router_experts, self.num_experts
        lead = x.shape[:-1]
        pi = broadcast_per_sequence(self.mixing(preference).to(x.device), lead, "preference")  # [..., J]
        logits = self._linear(x, self.weight.reshape(J * E, -1), self.bias.reshape(J * E))
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        probs = torch.softmax(logits.to(acc).reshape(*lead, J, E), dim=-1)
        g = (pi.to(acc).unsqueeze(-1) * probs).sum(-2)  # [..., E]
        if self.k is not None and self.k < E:
            weights, ids = torch.topk(g, self.k, dim=-1)
            if self.renormalize:
                weights = weights / weights.sum(-1, keepdim=True)
            return RouterOutput(ids, weights, g, None)
        return RouterOutput(_arange_ids(E, lead, x.device), g, g, None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_experts={self.num_experts}, "
                f"num_router_experts={self.num_router_experts}, num_objectives={self.num_objectives}, "
                f"k={self.k}")


def _check_preference(preference: Tensor, num_objectives: int) -> None:
    if preference.dim() not in (1, 2) or preference.shape[-1] != num_objectives:
        raise ValueError(f"preference must be [{num_objectives}] or [batch, {num_objectives}], "
                         f"got shape {tuple(preference.shape)}")
    if bool((preference < 0).any()) or not bool((preference.sum(-1) > 0).all()):
        raise ValueError("preference weights must be >= 0 with a positive sum (they are "
                         "normalised onto the simplex)")


ROUTERS = {cls.kind: cls for cls in (TopKRouter, DenseRouter, FixedGateRouter, HierarchicalRouter)}


def build_router(spec, in_features: int, num_experts: int, *, device=None, dtype=None) -> Router:
    """A router from a `Router` instance (returned as is), a name in `ROUTERS`, or a config dict
    ``{"type": name, **kwargs}`` as returned by `Router.config()`."""
    if isinstance(spec, Router):
        if spec.in_features != in_features or spec.num_experts != num_experts:
            raise ValueError(f"router is for d_in={spec.in_features}, E={spec.num_experts}; the layer "
                             f"has d_in={in_features}, E={num_experts}")
        return spec
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict) or "type" not in spec:
        raise TypeError(f"router must be a Router, one of {sorted(ROUTERS)}, or a dict with 'type'; got {spec!r}")
    kwargs = dict(spec)
    kind = kwargs.pop("type")
    if kind not in ROUTERS:
        raise ValueError(f"unknown router type {kind!r}; known: {sorted(ROUTERS)}")
    return ROUTERS[kind](in_features, num_experts, device=device, dtype=dtype, **kwargs)
