"""HoE end to end on a tiny Llama: SVD experts (rank by spectral energy), router experts trained
for their anchor preferences with the Tchebycheff scalarisation, then the Pareto front.

Two "fine-tuned" models (the base Llama moved by rank-4 task vectors, see hoe_sweep.py) give
two LoRA experts per q/v/o projection; `HoEConfig(energy=0.9, r=8)` picks each layer's rank as
the smallest that keeps 90 % of every task vector's squared singular values. Three router
experts with anchors (1, 0), (0.5, 0.5), (0, 1) start uniform and are trained one by one,
backbone and experts frozen, on per-sequence reward vectors r_i = -KL(ft_i || hoe) of the
next-token distributions (what a user would get from two reward models), ideal point z* = 0.
The preference sweep over the simplex then scores each lambda and writes the table and the
front (JSON, markdown, PNG if matplotlib is installed) into --out (default: a temp folder).

    python examples/hoe_train_routers.py            # a few seconds on CPU
    python examples/hoe_train_routers.py --smoke
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hoe_sweep import VOCAB, finetune_like, tiny_llama  # noqa: E402

from moelora.integrations import set_preference  # noqa: E402
from moelora.layers import molora_layers  # noqa: E402
from moelora.methods.hoe import HoEConfig, build_hoe, train_router_expert  # noqa: E402
from moelora.methods.pareto import evaluate_preferences, simplex_grid  # noqa: E402

ANCHORS = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]


def reward_vectors(model, ids, targets):
    """[B, 2]: r_i = -KL(ft_i || model) per sequence, averaged over positions (differentiable)."""
    logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    return torch.stack([-(t.exp() * (t - logp)).sum(-1).mean(-1) for t in targets], dim=-1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help="training steps per router expert")
    parser.add_argument("--grid", type=int, default=4, help="simplex grid steps of the sweep")
    parser.add_argument("--out", default=None, help="output folder (default: a new temp folder)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.grid = 8, 2
    out = args.out or tempfile.mkdtemp(prefix="hoe_front_")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()

    base = tiny_llama()
    tuned = [finetune_like(base, seed=1), finetune_like(base, seed=2)]
    config = HoEConfig(r=8, energy=0.9, anchors=ANCHORS, target_modules=["q_proj", "v_proj", "o_proj"])
    model = build_hoe(copy.deepcopy(base), tuned, config)
    ranks = sorted({layer.r for _, layer in molora_layers(model)})
    print(f"HoE: {len(list(molora_layers(model)))} layers, energy-chosen ranks {ranks} (r_max 8, tau 0.9)")

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB, (8, 12), generator=gen) for _ in range(args.steps)]
    with torch.no_grad():
        cached = {id(ids): [torch.log_softmax(m(input_ids=ids).logits.float(), -1) for m in tuned] for ids in batches}
    ideal = torch.zeros(2)
    histories = []
    for j, anchor in enumerate(ANCHORS):
        history = train_router_expert(model, j, batches, lambda m, ids: reward_vectors(m, ids, cached[id(ids)]),
                                      ideal=ideal, lr=0.05)
        histories.append([h["tchebycheff"] for h in history])
        print(f"router expert {j} (anchor {tuple(anchor)}): Tchebycheff {history[0]['tchebycheff']:.4f} "
              f"-> {history[-1]['tchebycheff']:.4f} over {len(history)} steps")

    model.eval()
    eval_ids = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        eval_targets = [torch.log_softmax(m(input_ids=eval_ids).logits.float(), -1) for m in tuned]
    current = {}

    @torch.no_grad()
    def apply(w):
        set_preference(model, torch.tensor(w))
        current["r"] = reward_vectors(model, eval_ids, eval_targets).mean(0)

    front = evaluate_preferences(simplex_grid(2, args.grid),
                                 {"-KL(ft1)": lambda w: current["r"][0], "-KL(ft2)": lambda w: current["r"][1]},
                                 apply=apply)
    print("\n" + front.to_markdown())
    files = [front.write_json(os.path.join(out, "hoe_front.json")),
             front.write_markdown(os.path.join(out, "hoe_front.md"))]
    try:
        files.append(front.plot(os.path.join(out, "hoe_front.png"), title="HoE preference sweep"))
    except ImportError as err:
        print(f"(no PNG: {err})")
    print("wrote " + ", ".join(files))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return {"histories": histories, "front": front, "files": files, "ranks": ranks}


if __name__ == "__main__":
    main()
