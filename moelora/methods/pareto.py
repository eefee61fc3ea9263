"""The Pareto picture of a multi-objective model: evaluate a grid of preference vectors on the
simplex (HoE preferences, soup weights, MoE-DPO gates), keep the non-dominated points, write the
table (JSON / markdown) and a PNG of the front.

    grid = simplex_grid(2, 4)                      # (1, 0), (0.75, 0.25), ..., (0, 1)
    front = evaluate_preferences(grid, {"helpful": score_helpful, "harmless": score_harmless},
                                 apply=lambda w: set_preference(model, torch.tensor(w)))
    front.write_json("out/front.json"); front.write_markdown("out/front.md")
    front.plot("out/front.png")                    # needs matplotlib (imported only here)

Every objective is maximised (negate a cost in its scorer). Nothing here imports matplotlib or
torch at module level: the table side works in any environment.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

__all__ = ["simplex_grid", "non_dominated", "ParetoFront", "evaluate_preferences"]


def simplex_grid(num_objectives: int, steps: int) -> list[tuple[float, ...]]:
    """Every ``w`` with ``w_i = k_i / steps`` (k_i >= 0 integers) and ``sum w = 1``:
    ``C(steps + N - 1, N - 1)`` points, in lexicographic order of k from (steps, 0, ..., 0) down.
    ``steps=0`` is not a grid; N=1 gives the single point (1,)."""
    if not isinstance(num_objectives, int) or num_objectives < 1:
        raise ValueError(f"num_objectives must be a positive int, got {num_objectives!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")

    def compositions(total: int, parts: int):
        if parts == 1:
            yield (total,)
            return
        for first in range(total, -1, -1):
            for rest in compositions(total - first, parts - 1):
                yield (first, *rest)

    return [tuple(k / steps for k in ks) for ks in compositions(steps, num_objectives)]


def non_dominated(points: Sequence[Sequence[float]]) -> list[bool]:
    """Mask of the points no other point dominates (all objectives maximised): q dominates p
    when q >= p everywhere and q > p somewhere. Duplicates do not dominate each other; a point
    with a NaN objective is never on the front."""
    points = [tuple(float(v) for v in p) for p in points]
    if points and len({len(p) for p in points}) != 1:
        raise ValueError("points must all have the same number of objectives")

    def dominates(q, p):
        return all(a >= b for a, b in zip(q, p)) and any(a > b for a, b in zip(q, p))

    return [not any(math.isnan(v) for v in p) and not any(dominates(q, p) for q in points if q is not p)
            for p in points]


@dataclass
class ParetoFront:
    """The evaluated grid: ``preferences[k]`` scored ``scores[k][name]``; ``front[k]``: whether
    point k is non-dominated over all objectives."""

    objectives: list
    preferences: list
    scores: list
    front: list = field(default_factory=list)

    def __post_init__(self):
        if not self.front:
            self.front = non_dominated([[row[name] for name in self.objectives] for row in self.scores])

    def rows(self) -> list[dict]:
        return [{"preference": list(p), **s, "non_dominated": f}
                for p, s, f in zip(self.preferences, self.scores, self.front)]

    def to_dict(self) -> dict:
        return {"objectives": list(self.objectives), "rows": self.rows()}

    def write_json(self, path) -> str:
        path = os.fspath(path)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path

    def to_markdown(self, digits: int = 4) -> str:
        head = ["preference", *self.objectives, "non-dominated"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows():
            pref = "(" + ", ".join(f"{v:.3g}" for v in row["preference"]) + ")"
            values = [f"{row[name]:.{digits}f}" for name in self.objectives]
            lines.append("| " + " | ".join([pref, *values, "yes" if row["non_dominated"] else ""]) + " |")
        return "\n".join(lines) + "\n"

    def write_markdown(self, path, digits: int = 4) -> str:
        path = os.fspath(path)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_markdown(digits))
        return path

    def plot(self, path, x: int = 0, y: int = 1, *, title: Optional[str] = None) -> str:
        """PNG of objective ``x`` vs objective ``y`` (indices or names): every point labelled by
        its preference, the points non-dominated in these two objectives joined by a line."""
        try:
            import matplotlib

            matplotlib.use("Agg")  # files only: no display needed
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise ImportError("ParetoFront.plot needs matplotlib (pip install matplotlib); "
                              "the JSON / markdown tables do not") from err
        names = [self.objectives[i] if isinstance(i, int) else i for i in (x, y)]
        for name in names:
            if name not in self.objectives:
                raise ValueError(f"unknown objective {name!r}; objectives are {self.objectives}")
        xs = [row[names[0]] for row in self.scores]
        ys = [row[names[1]] for row in self.scores]
        on_front = non_dominated(list(zip(xs, ys)))
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        ax.scatter(xs, ys, c=["tab:red" if f else "tab:gray" for f in on_front], zorder=3)
        for px, py, pref in zip(xs, ys, self.preferences):
            ax.annotate("(" + ",".join(f"{v:.2g}" for v in pref) + ")", (px, py), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        front = sorted((px, py) for px, py, f in zip(xs, ys, on_front) if f)
        if front:
            ax.plot(*zip(*front), color="tab:red", label="non-dominated", zorder=2)
            ax.legend(loc="best")
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        ax.set_title(title or f"Pareto front: {names[0]} vs {names[1]}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.fspath(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def evaluate_preferences(preferences: Sequence[Sequence[float]], scorers: Mapping[str, Callable],
                         apply: Optional[Callable] = None) -> ParetoFront:
    """Score every preference: for each w, ``apply(w)`` (e.g. set the HoE preference, merge a
    soup, set MoE-DPO gates; if it returns a callable, that is called after scoring, e.g. a soup's
    unmerge), then ``scorers[name](w) -> float`` for each objective (maximised)."""
    if not scorers:
        raise ValueError("scorers must name at least one objective")
    if not all(callable(s) for s in scorers.values()):
        raise TypeError("scorers must map objective names to callables (preference -> float)")
    prefs, rows = [], []
    for w in preferences:
        w = tuple(float(v) for v in w)
        undo = apply(w) if apply is not None else None
        try:
            rows.append({name: float(scorer(w)) for name, scorer in scorers.items()})
        finally:
            if callable(undo):
                undo()
        prefs.append(w)
    return ParetoFront(list(scorers), prefs, rows)
