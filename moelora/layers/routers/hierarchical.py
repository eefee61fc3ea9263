"""HoE's preference routing (docs/spec.md §4): router experts mixed by a user preference."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from moelora.layers.routers.base import Router, RouterOutput, arange_ids, broadcast_per_sequence
from moelora.ops.checks import check_true
from moelora.ops.dtypes import accumulate_dtype

__all__ = ['HierarchicalRouter', 'anchor_mixing']


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
    """For anchors that are one-hot vectors, the objective each anchor stands for; else None.
    (Reads the anchors' values: call it where they are set, not per forward.)"""
    if bool(((anchors == 0) | (anchors == 1)).all()) and bool((anchors.sum(-1) == 1).all()):
        return anchors.argmax(-1)
    return None


def _anchor_permutation(anchors: Tensor) -> Optional[Tensor]:
    """For one-hot anchors that cover each objective once, the objective of each anchor: then
    pi is lambda reordered, with no solve. None otherwise."""
    columns = _one_hot_columns(anchors)
    if columns is not None and anchors.shape[0] == anchors.shape[1] and bool((anchors.sum(0) == 1).all()):
        return columns
    return None


# Up to this many anchors the simplex QP is solved exactly by trying every support (2^J - 1 KKT
# systems, all in one batched solve); beyond it, by FISTA.
_MAX_ENUMERATED_ANCHORS = 10


def _supports(J: int, device) -> Tensor:
    """Every non-empty subset of J anchors as a [2^J - 1, J] float64 0/1 mask."""
    codes = torch.arange(1, 2 ** J, device=device)
    return ((codes.unsqueeze(1) >> torch.arange(J, device=device)) & 1).to(torch.float64)


def _simplex_qp(lam: Tensor, anchors: Tensor, locality: float, iters: int) -> Tensor:
    """argmin over the simplex of ``||pi @ anchors - lam||^2 + locality * sum_j pi_j d_j`` with
    ``d_j = ||a_j - lam||^2``, per row of ``lam [B, N]``.

    Exact for J <= _MAX_ENUMERATED_ANCHORS: the minimiser is the stationary point of the
    objective on the affine hull of its own support, so among the supports whose KKT point is
    feasible (pi >= 0) the one of least objective is optimal. No host sync, a fixed number of
    launches whatever the input."""
    B, N = lam.shape
    J = anchors.shape[0]
    gram = anchors @ anchors.t()  # [J, J]
    target = lam @ anchors.t()  # [B, J]
    dist = torch.cdist(lam, anchors).square()  # [B, J]
    linear = 2 * target - locality * dist  # [B, J]

    if J > _MAX_ENUMERATED_ANCHORS:
        step = 1.0 / (2 * torch.linalg.matrix_norm(gram, ord=2))
        pi = torch.full((B, J), 1.0 / J, dtype=torch.float64, device=lam.device)
        y, t = pi, 1.0
        for _ in range(iters):  # FISTA
            pi_next = _project_to_simplex(y - step * (2 * y @ gram - linear))
            t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
            y = pi_next + ((t - 1) / t_next) * (pi_next - pi)
            pi, t = pi_next, t_next
        return pi
    m = _supports(J, lam.device)  # [S, J]
    S = m.shape[0]
    # KKT system on support m: [[2 G_mm, 1_m], [1_m^T, 0]] [pi; mu] = [linear_m; 1], and pi_j = 0
    # off the support (identity rows there)
    kkt = torch.zeros(S, J + 1, J + 1, dtype=torch.float64, device=lam.device)
    kkt[:, :J, :J] = 2 * gram * m.unsqueeze(2) * m.unsqueeze(1) + torch.diag_embed(1 - m)
    kkt[:, :J, J] = m
    kkt[:, J, :J] = m
    rhs = torch.cat([linear.unsqueeze(1) * m, lam.new_ones(B, S, 1)], dim=-1)  # [B, S, J + 1]
    solution = (torch.linalg.pinv(kkt) @ rhs.unsqueeze(-1)).squeeze(-1)  # least-norm when singular
    residual = ((kkt @ solution.unsqueeze(-1)).squeeze(-1) - rhs).abs().amax(-1)  # [B, S]
    pi = solution[..., :J] * m
    feasible = (pi >= -1e-9).all(-1) & (residual < 1e-7)
    objective = (pi @ anchors - lam.unsqueeze(1)).square().sum(-1) + locality * (pi * dist.unsqueeze(1)).sum(-1)
    value = torch.where(feasible, objective, torch.full_like(residual, float("inf")))
    best = value.argmin(-1)  # a singleton support is always feasible
    return pi[torch.arange(B, device=lam.device), best].clamp(min=0)


def _mixing(lam: Tensor, anchors: Tensor, permutation: Optional[Tensor], locality: float,
            iters: int) -> Tensor:
    """`anchor_mixing` of a preference already on the simplex, the anchors' analysis given."""
    if permutation is not None:
        return lam[..., permutation].to(torch.float32)
    anchors = anchors.to(lam.device, torch.float64)
    lam = lam.to(torch.float64)
    J, N = anchors.shape
    lead = lam.shape[:-1]
    lam2 = lam.reshape(-1, N)
    pi = _simplex_qp(lam2, anchors, locality, iters)
    support = (pi > 1e-4).to(torch.float64)  # [B, J]
    system = torch.cat([anchors.t(), anchors.new_ones(1, J)]).expand(len(pi), N + 1, J) * support.unsqueeze(1)
    rhs = torch.cat([lam2, lam2.new_ones(len(pi), 1)], dim=-1).unsqueeze(-1)
    exact = (torch.linalg.pinv(system) @ rhs).squeeze(-1) * support
    residual = (torch.cat([exact @ anchors, exact.sum(-1, keepdim=True)], -1) - rhs.squeeze(-1)).abs().amax(-1)
    ok = ((exact >= -1e-9).all(-1) & (residual < 1e-6)).unsqueeze(-1)
    pi = torch.where(ok, exact.clamp(min=0), pi)
    return (pi / pi.sum(-1, keepdim=True)).reshape(*lead, J).to(torch.float32)


def _normalised(preference: Tensor) -> Tensor:
    lam = preference.to(accumulate_dtype(preference.dtype))
    return lam / lam.sum(-1, keepdim=True).clamp(min=1e-12)


def anchor_mixing(preference: Tensor, anchors: Tensor, *, locality: float = 1e-3, iters: int = 1000) -> Tensor:
    """Mixing weights ``pi [..., J]`` over router experts for a user preference ``[..., N]``.

    ``anchors [J, N]`` are the preferences the J router experts were trained for; ``lambda`` is
    first normalised onto the simplex. When the anchors are the N one-hot vectors (the default,
    in any order), ``pi_j = lambda_{objective of anchor j}``. Otherwise pi are barycentric
    coordinates of lambda among the nearest anchors, in two steps:

    1. support: minimise ``||pi @ anchors - lambda||^2 + locality * sum_j pi_j ||a_j - lambda||^2``
       over the simplex (fp64; exact for up to 10 anchors, FISTA with ``iters`` steps beyond).
       Among the ways to write lambda as a mix of anchors, the locality term prefers close
       anchors (with 3 anchors on a line, the middle one alone serves the middle point, not a
       mix of the ends);
    2. exact coordinates on that support: the least-norm solution of ``pi_S @ anchors_S =
       lambda, sum pi_S = 1``, kept when non-negative (else step 1's answer, the closest point
       of the anchors' hull when lambda lies outside it).
    """
    permutation = _anchor_permutation(anchors)
    return _mixing(_normalised(preference), anchors,
                   None if permutation is None else permutation.to(preference.device), locality, iters)


class HierarchicalRouter(Router):
    """HoE preference routing (docs/spec.md §4): ``g_t = sum_j pi_j(lambda) softmax(R_j x_t + c_j)``.

    ``R`` is ``weight [J, E, d_in]`` (J router experts), ``c`` is ``bias [J, E]``. ``lambda``
    (N objectives, ``[N]`` or ``[batch, N]``) comes from, in order: the forward's
    ``preference=``, the innermost `moelora.integrations.routing_inputs` scope (per call: threads
    and batches do not share it), the value a deprecated `set_preference` left; ``pi =
    anchor_mixing(lambda, anchors)``, and pi is uniform over the router experts when no
    preference is given (with ``require_input=True``: an error instead). Optional top-k of g
    with renormalisation.

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
                 require_input: bool = False, device=None, dtype=None):
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
        self.require_input = bool(require_input)
        columns = _one_hot_columns(anchors_t)
        if init is None:
            init = "anchor" if (columns is not None and N == num_experts) else "uniform"
        if init not in ("anchor", "uniform", "random"):
            raise ValueError(f"init must be 'anchor', 'uniform' or 'random', got {init!r}")
        if init == "anchor" and (columns is None or N != num_experts):
            raise ValueError("init='anchor' needs one-hot anchors and one LoRA expert per objective (N == E)")
        # one-hot anchors that cover each objective once: pi is a reordering of lambda, no solve;
        # analysed here, once: no forward reads the anchors' values on the host
        # (a buffer: it follows the module to its device, so no forward copies it there)
        permutation = _anchor_permutation(anchors_t)
        self.register_buffer("_permutation", None if permutation is None else permutation.to(device),
                             persistent=False)
        self.init = init
        self.anchor_logit = float(anchor_logit)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("anchors", anchors_t.to(device))
        self.weight = nn.Parameter(torch.empty(J, num_experts, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(J, num_experts, **factory))
        # set by the deprecated set_preference (model-wide, not saved): [N] / [batch, N], and its pi
        self.preference: Optional[Tensor] = None
        self._mixing: Optional[Tensor] = None
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
        config = {"type": self.kind, "num_router_experts": self.num_router_experts,
                  "anchors": self.anchors.tolist(), "k": self.k, "renormalize": self.renormalize,
                  "init": self.init, "anchor_logit": self.anchor_logit}
        if self.require_input:
            config["require_input"] = True
        return config

    def set_preference(self, preference: Optional[Tensor]) -> None:
        """Model-wide preference (deprecated: see `moelora.integrations.routing_inputs`)."""
        if preference is None:
            self.preference, self._mixing = None, None
            return
        preference = torch.as_tensor(preference, dtype=torch.float32, device=self.bias.device)
        self._mixing = self.mixing(preference)
        self.preference = preference

    def mixing(self, preference: Optional[Tensor] = None) -> Tensor:
        """pi [J] or [batch, J] for a preference (default: the routing scope's, else the one set,
        else uniform). Validated; no host sync on GPU, a fixed number of launches whatever the
        anchors."""
        if preference is not None:
            preference = torch.as_tensor(preference, device=self.bias.device)
            _check_preference(preference, self.num_objectives)
            return _mixing(_normalised(preference), self.anchors, self._permutation, 1e-3, 1000)
        pi = self._routing_input("mixing", self._mixing, "preference")
        if pi is not None:
            return pi
        return torch.full((self.num_router_experts,), 1.0 / self.num_router_experts, device=self.bias.device)

    def forward(self, x: Tensor, *, gates=None, preference=None) -> RouterOutput:
        J, E = self.num_router_experts, self.num_experts
        lead = x.shape[:-1]
        pi = broadcast_per_sequence(self.mixing(preference).to(x.device), lead, "preference")  # [..., J]
        logits = self._linear(x, self.weight.reshape(J * E, -1), self.bias.reshape(J * E))
        acc = accumulate_dtype(logits.dtype)
        probs = torch.softmax(logits.to(acc).reshape(*lead, J, E), dim=-1)
        g = (pi.to(acc).unsqueeze(-1) * probs).sum(-2)  # [..., E]
        if self.k is not None and self.k < E:
            weights, ids = torch.topk(g, self.k, dim=-1)
            if self.renormalize:
                weights = weights / weights.sum(-1, keepdim=True)
            return RouterOutput(ids, weights, g, None)
        return RouterOutput(arange_ids(E, lead, x.device), g, g, None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_experts={self.num_experts}, "
                f"num_router_experts={self.num_router_experts}, num_objectives={self.num_objectives}, "
                f"k={self.k}")


def _check_preference(preference: Tensor, num_objectives: int) -> None:
    if preference.dim() not in (1, 2) or preference.shape[-1] != num_objectives:
        raise ValueError(f"preference must be [{num_objectives}] or [batch, {num_objectives}], "
                         f"got shape {tuple(preference.shape)}")
    if not preference.is_floating_point():
        preference = preference.float()
    check_true((preference >= 0).all(-1) & (preference.sum(-1) > 0),
               "preference weights must be >= 0 with a positive sum (they are normalised onto "
               "the simplex)")
