"""The three MoE-DPO variants by one argument, with the Gumbel-softmax objective and an annealed
temperature, per-expert references, and the fused heads loss; tiny, CPU, about a second.

    python examples/moe_dpo_variants.py [--steps 20]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from moelora.losses import gumbel_temperature
from moelora.methods.moe_dpo import FixedMixture, SequenceGate, moe_dpo_model

V, D, K = 16, 8, 2


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(V, D)

    def forward(self, ids, attention_mask=None):
        return self.e(ids)


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.h = nn.Embedding(V, D), nn.Linear(D, V, bias=False)

    def forward(self, ids, attention_mask=None):
        return self.h(self.e(ids))


def batch(g, B=8, S=6):
    ids_w, ids_l = torch.randint(0, V // 2, (B, S), generator=g), torch.randint(V // 2, V, (B, S), generator=g)
    ids_l[:, :2] = ids_w[:, :2]  # shared prompt
    lab_w, lab_l = ids_w.clone(), ids_l.clone()
    lab_w[:, :2] = lab_l[:, :2] = -100
    mask = torch.ones(B, S, dtype=torch.long)
    return ids_w, mask, lab_w, ids_l, mask, lab_l


def build(variant):
    torch.manual_seed(0)
    if variant == "heads":
        base = LM()
        refs = base.h.weight.detach().unsqueeze(0).repeat(K, 1, 1)  # one frozen pi_ref(k) per expert
        heads = refs + 0.01 * torch.randn_like(refs)
        return moe_dpo_model("heads", Embed(), heads, SequenceGate(D, K), reference_head=refs,
                             objective="mixture", fused=True, backend="torch")
    policies, refs = [LM() for _ in range(K)], [LM() for _ in range(K)]
    for p, r in zip(policies, refs):
        r.load_state_dict(p.state_dict())
    return moe_dpo_model("independent", policies, FixedMixture(K, learnable=True), Embed(), refs,
                         objective="gumbel")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    result = {}
    for variant in ("heads", "independent"):
        model = build(variant)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
        g = torch.Generator().manual_seed(0)
        losses = []
        for step in range(args.steps):
            model.gumbel_temperature = gumbel_temperature(step, start=1.0, end=0.2, steps=args.steps)
            out = model(*batch(g))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
        print(f"{variant}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        result[variant] = losses
    return result


if __name__ == "__main__":
    main()
