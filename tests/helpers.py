"""Shared test helpers: routing generators and dtype-keyed error bounds."""
from __future__ import annotations

import torch

# Slack added to the allowed relative error per dtype (a few units of rounding): PyTorch's own
# error on a tiny problem can be ~0 by luck, and the kernels round at different points
# (e.g. the base GEMM's output before the LoRA term is added) and sum in a different order.
ERROR_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2.5e-3,
    torch.bfloat16: 2e-2,
}
# "At most twice the error of a PyTorch implementation at the same precision" (style.md).
ERROR_FACTOR = 2.0


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    ref = ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def bound(dtype: torch.dtype, torch_error: float, *more_dtypes: torch.dtype) -> float:
    """The allowed relative error: twice PyTorch's own, plus the floor of the least precise of
    the dtypes involved (activations, then e.g. the adapters')."""
    return ERROR_FACTOR * torch_error + max(ERROR_FLOOR[d] for d in (dtype, *more_dtypes))


ROUTINGS = ("topk", "dense", "tenant", "duplicates", "none", "skewed")


def make_routing(kind: str, T: int, E: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids [T, k] and gates [T, k] float64 for one routing regime of spec §1.

    topk: distinct ids per row with ~20% of slots -1; dense: every expert (k = E) in a random
    order; tenant: one uniform id per token (k = 1 expected); duplicates: ids drawn with
    replacement, -1 among them; none: every slot -1; skewed: nearly all slots on expert 0;
    zipf: ids drawn with probability ~ 1 / (rank + 1) (a realistic load imbalance), distinct per
    row; same: every token routes to the same k experts.
    """
    if kind in ("topk", "dense"):
        ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
        if kind == "topk":
            ids = torch.where(torch.rand(T, k) < 0.2, -1, ids)
    elif kind == "tenant":
        ids = torch.randint(0, E, (T, k))
    elif kind == "duplicates":
        ids = torch.randint(-1, E, (T, k))
    elif kind == "none":
        ids = torch.full((T, k), -1)
    elif kind == "skewed":
        ids = torch.where(torch.rand(T, k) < 0.9, 0, torch.randint(0, E, (T, k)))
    elif kind == "zipf":
        weights = 1.0 / torch.arange(1, E + 1, dtype=torch.float64)
        ids = (torch.multinomial(weights.expand(T, E), min(k, E)) if T
               else torch.zeros(0, min(k, E), dtype=torch.long))
        if k > E:
            ids = torch.cat([ids, torch.full((T, k - E), -1)], dim=1)
    elif kind == "same":
        ids = torch.randperm(E)[:k].expand(T, k).clone() if k <= E else torch.randint(0, E, (T, k))
    else:
        raise ValueError(kind)
    gates = torch.rand(T, k, dtype=torch.float64) + 0.1
    return ids.to(device), gates.to(device)
