"""PMoL on a tiny Llama: DPO on synthetic preference pairs for two preferences.

A Llama built from a config (no download) gets PMoL layers on q_proj / v_proj: 2 preference
groups of 2 LoRA experts plus the empty expert, top-2 routing. Users of preference 0 write
prompts from one half of the vocabulary and prefer answers from token set A; users of
preference 1 write from the other half and prefer set B. Training adds the expert group soft
loss (labels = the preference of each pair) and the balance / z losses to the DPO loss; the
reference model is the same network with its adapters disabled.

    python examples/pmol_tiny_dpo.py            # ~20 s on 2 CPU cores
    python examples/pmol_tiny_dpo.py --smoke    # a few steps, for the tests

Prints the DPO loss falling and, at the end, the router's mean mass per preference group for
the sequences of each preference (the router specialises: group p's mass grows on
preference-p prompts).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from moelora.integrations import inject
from moelora.integrations import disable_adapters
from moelora.methods.pmol import PMoLConfig, group_mass
from moelora.losses.pmol import aux_loss

VOCAB = 96
SET_A = torch.arange(8, 16)  # answers preferred by preference 0
SET_B = torch.arange(16, 24)  # answers preferred by preference 1


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def make_pairs(n: int, prompt_len: int, answer_len: int, generator: torch.Generator):
    """n preference pairs: (chosen [n, L], rejected [n, L], preference [n], prompt_len)."""
    prefs = torch.arange(n) % 2
    half = (VOCAB - 24) // 2
    low = torch.where(prefs == 0, 24, 24 + half).unsqueeze(1)  # each preference has its own topics
    prompt = low + torch.randint(0, half, (n, prompt_len), generator=generator)
    a = SET_A[torch.randint(0, len(SET_A), (n, answer_len), generator=generator)]
    b = SET_B[torch.randint(0, len(SET_B), (n, answer_len), generator=generator)]
    good = torch.where(prefs.unsqueeze(1) == 0, a, b)
    bad = torch.where(prefs.unsqueeze(1) == 0, b, a)
    return torch.cat([prompt, good], 1), torch.cat([prompt, bad], 1), prefs


def answer_logps(model, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Sum of log p(answer tokens | prefix) per sequence."""
    logits = model(input_ids=ids).logits[:, prompt_len - 1:-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, prompt_len:].unsqueeze(-1)).squeeze(-1)
    return logp.sum(-1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--smoke", action="store_true", help="tiny run for tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.pairs = 6, 8
    torch.manual_seed(0)
    start = time.perf_counter()
    model = tiny_llama()
    config = PMoLConfig(num_preferences=2, experts_per_preference=2, r=4, lora_alpha=8, top_k=2,
                        empty_expert=True, target_modules=["q_proj", "v_proj"], group_loss_weight=0.5)
    inject(model, config)
    generator = torch.Generator().manual_seed(1)
    prompt_len, answer_len = 6, 4
    chosen, rejected, prefs = make_pairs(args.pairs, prompt_len, answer_len, generator)
    ids = torch.cat([chosen, rejected])  # one forward for both halves of every pair
    labels = torch.cat([prefs, prefs])  # both sequences of a pair carry its preference
    with torch.no_grad(), disable_adapters(model):
        ref = answer_logps(model.eval(), ids, prompt_len)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"PMoL on q/v of a 2-layer Llama: {sum(p.numel() for p in params)} trainable parameters "
          f"(of {sum(p.numel() for p in model.parameters())})")
    opt = torch.optim.Adam(params, lr=args.lr)
    losses = []
    n = args.pairs
    for step in range(args.steps):
        logp = answer_logps(model, ids, prompt_len)
        margin = args.beta * ((logp[:n] - ref[:n]) - (logp[n:] - ref[n:]))
        dpo = -F.logsigmoid(margin).mean()
        aux = aux_loss(model, preference_labels=labels, weights=config)
        loss = dpo + aux["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(dpo.item())
        if step % max(1, args.steps // 6) == 0 or step == args.steps - 1:
            print(f"step {step:3d}  dpo {dpo.item():.4f}  group {aux['group'].item():.4f}  "
                  f"balance {aux['balance'].item():.4f}  z {aux['z'].item():.4f}")
    with torch.no_grad():
        model(input_ids=ids)  # training mode: routing recorded
        mass = group_mass(model)  # [2n, groups + empty]
    per_pref = torch.stack([mass[labels == p].mean(0) for p in (0, 1)])
    print("\nmean router mass   group 0   group 1   empty")
    for p in (0, 1):
        print(f"preference {p}      {per_pref[p, 0]:.3f}     {per_pref[p, 1]:.3f}     {per_pref[p, 2]:.3f}")
    print(f"\nDPO loss {losses[0]:.4f} -> {losses[-1]:.4f} in {time.perf_counter() - start:.1f} s")
    return {"losses": losses, "group_mass": per_pref}


if __name__ == "__main__":
    main()
