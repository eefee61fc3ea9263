"""MoE-DPO on a tiny model, on CPU, in seconds: the loss falls and the gate learns the domains.

Synthetic two-domain preferences. A prompt starts with a domain token (A or B) followed by
random filler; responses are strings of content tokens. Domain A prefers "low" tokens and
domain B "high" ones, so no single policy can please both without knowing the domain.

The backbone is a frozen per-token network (embedding + MLP, no mixing across positions): the
hidden state that scores a response token has not seen the prompt, so an expert head cannot
condition on the domain, and the only way to lower the loss is the MoE-DPO way: experts that
specialise (one head learns "low", the other "high") and a gate that reads the prompt and picks
the right one. Both heads start as copies of the base LM head (plus a little noise to break
their symmetry), which is also the frozen reference.

    python examples/moe_dpo_tiny.py                       # defaults: ~5 s on 2 CPU cores
    python examples/moe_dpo_tiny.py --objective mixture   # direct mixture likelihood
    python examples/moe_dpo_tiny.py --experts-in lora     # K LoRA experts in the MLP instead
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn

from moelora.integrations import MoLoRAConfig, inject
from moelora.layers import molora_layers
from moelora.methods.moe_dpo import MoEDPOModel, MoELoRADPOModel, SequenceGate

PAD, DOMAIN_A, DOMAIN_B, SEP = 0, 1, 2, 3
FIRST_CONTENT = 4


class TinyBackbone(nn.Module):
    """Embedding + a residual per-token MLP: hidden [B, S, d], no attention across positions."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        return self.norm(x + self.mlp(x))


def make_batch(num_pairs: int, vocab_size: int, prompt_len: int, response_len: int,
               generator: torch.Generator):
    """Preference pairs: ids / masks / labels for chosen and rejected, and the domain of each."""
    half = FIRST_CONTENT + (vocab_size - FIRST_CONTENT) // 2  # low: [4, half), high: [half, V)
    domain = torch.randint(0, 2, (num_pairs,), generator=generator)  # 0 = A, 1 = B
    filler = torch.randint(FIRST_CONTENT, vocab_size, (num_pairs, prompt_len - 2), generator=generator)
    prompt = torch.cat([torch.where(domain == 0, DOMAIN_A, DOMAIN_B)[:, None], filler,
                        torch.full((num_pairs, 1), SEP)], dim=1)
    low = torch.randint(FIRST_CONTENT, half, (num_pairs, response_len), generator=generator)
    high = torch.randint(half, vocab_size, (num_pairs, response_len), generator=generator)
    chosen = torch.where(domain[:, None] == 0, low, high)
    rejected = torch.where(domain[:, None] == 0, high, low)

    def sequence(response):
        ids = torch.cat([prompt, response], dim=1)
        labels = torch.cat([torch.full_like(prompt, -100), response], dim=1)
        return ids, torch.ones_like(ids), labels

    return sequence(chosen), sequence(rejected), domain


def gate_separation(model: MoEDPOModel, batch, domain) -> tuple[float, list, list]:
    """Total-variation distance between the mean gates of the two domains (0: the gate ignores
    the domain; 1: each domain goes wholly to its own expert)."""
    (ids, mask, labels), _, _ = batch
    w = model.gate_weights(ids, mask, labels)
    w_a, w_b = w[domain == 0].mean(0), w[domain == 1].mean(0)
    return 0.5 * (w_a - w_b).abs().sum().item(), w_a.tolist(), w_b.tolist()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64, help="preference pairs per step")
    parser.add_argument("--vocab-size", type=int, default=96)
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--experts-in", choices=("heads", "lora"), default="heads",
                        help="heads: K LM heads (MoEDPOModel); lora: K LoRA experts in the "
                             "backbone's MLP, one shared head (MoELoRADPOModel)")
    parser.add_argument("--objective", choices=("em", "mixture"), default="em")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    prompt_len, response_len = 6, 6
    backbone = TinyBackbone(args.vocab_size, args.hidden_size).requires_grad_(False)
    lm_head = torch.randn(args.vocab_size, args.hidden_size) / args.hidden_size**0.5
    # Mean pooling over the prompt: with this position-wise backbone only the domain token's own
    # hidden state knows the domain ("last" pooling would see the SEP token, the same for both).
    gate = SequenceGate(args.hidden_size, args.experts, pooling="mean")
    if args.experts_in == "lora":
        inject(backbone, MoLoRAConfig(target_modules=["mlp.0", "mlp.2"], num_experts=args.experts,
                                      r=4, lora_alpha=4, router={"type": "fixed", "k": 1}))
        with torch.no_grad():  # fresh experts (B = 0) are identical: break their symmetry
            for _, layer in molora_layers(backbone):
                layer.lora_B.weight.normal_(std=0.01, generator=gen)
        model = MoELoRADPOModel(backbone, lm_head, gate, beta=args.beta, objective=args.objective,
                                backend=args.backend)
    else:
        model = MoEDPOModel.from_lm_head(backbone, lm_head, args.experts, gate, init_noise=0.1,
                                         generator=gen, beta=args.beta, objective=args.objective,
                                         backend=args.backend)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    eval_batch = make_batch(512, args.vocab_size, prompt_len, response_len, gen)
    sep0, _, _ = gate_separation(model, eval_batch, eval_batch[2])

    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        chosen, rejected, _ = make_batch(args.batch_size, args.vocab_size, prompt_len,
                                         response_len, gen)
        out = model(*chosen, *rejected)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        if args.log_every and (step % args.log_every == 0 or step == args.steps - 1):
            sep, w_a, w_b = gate_separation(model, eval_batch, eval_batch[2])
            print(f"step {step:4d}  loss {out.loss.item():.4f}  "
                  f"gates A {[round(v, 2) for v in w_a]}  B {[round(v, 2) for v in w_b]}  "
                  f"separation {sep:.2f}")
    seconds = time.perf_counter() - start
    sep, w_a, w_b = gate_separation(model, eval_batch, eval_batch[2])
    k = max(1, len(losses) // 10)
    summary = {
        "first_loss": sum(losses[:k]) / k,
        "last_loss": sum(losses[-k:]) / k,
        "initial_separation": sep0,
        "separation": sep,
        "gates_domain_a": w_a,
        "gates_domain_b": w_b,
        "seconds": seconds,
        "losses": losses,
    }
    print(f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} (mean of first / last "
          f"{k} steps); gate separation {sep0:.2f} -> {sep:.2f}; {seconds:.1f} s")
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "losses"}))
    return summary


if __name__ == "__main__":
    main()
