"""HoE on a tiny Llama: LoRA experts from two "fine-tuned" models, then a preference sweep.

The two fine-tuned models are copies of a base Llama (built from a config, no download) whose
q/v/o projections were moved by rank-4 task vectors, one per objective. `build_hoe` turns each
task vector into a LoRA expert by truncated SVD (rank 4: exact here), one layer at a time; the
hierarchical routers start at their "anchor" init (router expert j prefers expert j), so the
preference lambda = (1 - t, t) mixes the experts with weights ~ lambda per token. The sweep
prints, for each t, how far the next-token distribution is from each fine-tuned model (KL) and
the expected reward of a toy two-objective reward, with the Tchebycheff scalarisation of it.

    python examples/hoe_sweep.py            # a few seconds on CPU
    python examples/hoe_sweep.py --smoke
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from moelora.integrations import set_preference
from moelora.layers import molora_layers
from moelora.methods.hoe import HoEConfig, build_hoe, tchebycheff

VOCAB = 96


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def finetune_like(base, seed: int, targets=("q_proj", "v_proj", "o_proj"), rank: int = 4, scale: float = 0.5):
    """A copy of base whose target projections moved by a random rank-`rank` task vector."""
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            d_out, d_in = module.weight.shape
            u = torch.randn(d_out, rank, generator=g) / rank ** 0.5
            v = torch.randn(rank, d_in, generator=g) / d_in ** 0.5
            module.weight.add_(scale * u @ v)
    return model


def next_token_logp(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits[:, -1].float(), -1)


def kl(p_log, q_log):
    """KL(p || q) averaged over the batch."""
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean().item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=9, help="preferences in the sweep")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.points = 3
    start = time.perf_counter()
    base = tiny_llama()
    tuned = [finetune_like(base, seed=1), finetune_like(base, seed=2)]
    config = HoEConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"])
    model = build_hoe(copy.deepcopy(base), tuned, config).eval()
    worst = 0.0
    for name, layer in molora_layers(model):
        for i, ft in enumerate(tuned):
            recon = layer.base_layer.weight + layer.lora_B.weight[i] @ layer.lora_A.weight[i]
            worst = max(worst, (recon - ft.get_submodule(name).weight).abs().max().item())
    print(f"HoE: {len(list(molora_layers(model)))} layers x 2 SVD experts (r=4); "
          f"max |W_0 + B_i A_i - W_i| = {worst:.2e}")

    ids = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(3))
    targets = [next_token_logp(m, ids) for m in tuned]
    # a toy reward per objective: log-prob mass that fine-tuned model i puts on the chosen tokens
    top = [t.argmax(-1) for t in targets]
    ideal = torch.tensor([0.0, 0.0])
    print("\n    t   lambda        KL(ft1||hoe)  KL(ft2||hoe)   r1      r2     tchebycheff")
    rows = []
    for t in torch.linspace(0, 1, args.points).tolist():
        lam = torch.tensor([1 - t, t])
        set_preference(model, lam)
        out = next_token_logp(model, ids)
        rewards = torch.stack([out.gather(-1, top[i].unsqueeze(-1)).mean() for i in range(2)])
        cheb = tchebycheff(rewards, lam, ideal).item()
        row = (t, kl(targets[0], out), kl(targets[1], out), rewards[0].item(), rewards[1].item(), cheb)
        rows.append(row)
        print(f"{t:5.2f}  ({1 - t:.2f}, {t:.2f})   {row[1]:10.4f}  {row[2]:12.4f}  "
              f"{row[3]:7.3f} {row[4]:7.3f}  {cheb:8.3f}")
    # per-sequence preferences in one batch: each user gets their own mixture
    set_preference(model, torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]).repeat(4, 1))
    mixed = next_token_logp(model, ids)
    print(f"\none batch, alternating users (1,0)/(0,1): KL to ft1 on user-1 rows "
          f"{kl(targets[0][0::2], mixed[0::2]):.4f}, to ft2 on user-2 rows {kl(targets[1][1::2], mixed[1::2]):.4f}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return {"rows": rows, "reconstruction_error": worst}


if __name__ == "__main__":
    main()
