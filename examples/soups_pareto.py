"""Personalized Soups end to end on a tiny Llama: one LoRA per preference dimension, soups on a
grid of weights, each soup scored per objective, the Pareto front written out.

The recipe (Jang et al., arXiv 2310.11564): train one LoRA adapter per preference dimension
independently, then serve a user who wants the mix w by merging the adapters post hoc with
weights w (`moelora.methods.soups.merge_adapters`), no retraining. Here the model is a Llama
built from a config (no download) and the preference dimensions are synthetic: objective i
prefers that the next token comes from a token set S_i (disjoint sets). Adapter i is trained a
few Adam steps to maximise the objective-i reward ``log p(S_i)`` (the log of the probability
mass the next-token distribution puts on S_i), a stand-in for the paper's per-dimension RL step;
its scorer is the same reward on held-out prompts. The sweep merges the soup at every grid
point (`simplex_grid`), scores it (`evaluate_preferences`, which unmerges after each point),
and writes the front (JSON, markdown, PNG if matplotlib is installed) into --out (default: a
new temp folder).

    python examples/soups_pareto.py                 # a few seconds on CPU
    python examples/soups_pareto.py --smoke --mode delta_w
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.nn as nn

from moelora.methods.pareto import evaluate_preferences, simplex_grid
from moelora.methods.soups import merge_adapters

VOCAB = 96
TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


class LoraHooks:
    """A minimal trainable LoRA on the target nn.Linear layers (forward hooks adding s B A x), so
    the example needs no PEFT; `state_dict()` uses PEFT's key names, which `merge_adapters`
    reads. PEFT-trained adapters (folders or state dicts) go into the same soup call."""

    def __init__(self, model: nn.Module, r: int, alpha: float, seed: int):
        self.scaling = alpha / r
        g = torch.Generator().manual_seed(seed)
        self.params, self.handles = {}, []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
                d_out, d_in = module.weight.shape
                # PEFT's init: A random, B zero, so a fresh adapter changes nothing
                a = nn.Parameter(torch.randn(r, d_in, generator=g) / d_in ** 0.5)
                b = nn.Parameter(torch.zeros(d_out, r))
                self.params[name] = (a, b)
                self.handles.append(module.register_forward_hook(self._hook(a, b)))

    def _hook(self, a, b):
        def hook(module, inputs, output):
            return output + self.scaling * (inputs[0] @ a.t()) @ b.t()
        return hook

    def parameters(self):
        return [p for pair in self.params.values() for p in pair]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def state_dict(self) -> dict:
        sd = {}
        for name, (a, b) in self.params.items():
            sd[f"base_model.model.{name}.lora_A.weight"] = a.detach().clone()
            sd[f"base_model.model.{name}.lora_B.weight"] = b.detach().clone()
        return sd


def log_mass(model, ids, token_set) -> torch.Tensor:
    """Mean over the batch and positions of log p(next token in token_set): objective i's reward."""
    logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    return torch.logsumexp(logp[..., token_set], -1).mean()


def train_adapter(model, ids, token_set, *, steps: int, lr: float, r: int, alpha: float, seed: int):
    """One preference dimension's adapter: maximise its reward, base model frozen."""
    lora = LoraHooks(model, r, alpha, seed)
    opt = torch.optim.Adam(lora.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        loss = -log_mass(model, ids, token_set)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(-loss.item())
    lora.remove()
    return lora.state_dict(), lora.scaling, history


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per adapter")
    parser.add_argument("--grid", type=int, default=4, help="simplex grid resolution (steps + 1 points)")
    parser.add_argument("--lr", type=float, default=2e-2, help="Adam learning rate of the adapters")
    parser.add_argument("--mode", default="average_ab", choices=["average_ab", "delta_w"])
    parser.add_argument("--out", default=None, help="output folder (default: a new temp folder)")
    parser.add_argument("--smoke", action="store_true", help="fewer steps, coarser grid")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.grid = 8, 2
    out = args.out or tempfile.mkdtemp(prefix="soups_front_")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()

    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    objectives = {"favour_A": list(range(0, 8)), "favour_B": list(range(8, 16))}
    g = torch.Generator().manual_seed(1)
    train_ids = torch.randint(16, VOCAB, (8, 12), generator=g)  # prompts avoid both token sets
    eval_ids = torch.randint(16, VOCAB, (8, 12), generator=g)

    adapters = []
    for i, (name, tokens) in enumerate(objectives.items()):
        sd, scaling, history = train_adapter(model, train_ids, tokens, steps=args.steps, lr=args.lr,
                                             r=4, alpha=8.0, seed=10 + i)
        adapters.append((sd, {"lora_alpha": scaling * 4, "r": 4}))
        print(f"adapter {name}: reward log p(S) {history[0]:.3f} -> {history[-1]:.3f} in {args.steps} steps")

    def scorer(tokens):
        @torch.no_grad()
        def score(w):
            return log_mass(model, eval_ids, tokens).item()
        return score

    def apply(w):
        return merge_adapters(adapters, w, args.mode, model=model).unmerge  # called after scoring

    grid = simplex_grid(len(objectives), args.grid)
    front = evaluate_preferences(grid, {name: scorer(t) for name, t in objectives.items()}, apply=apply)
    print(f"\nsoups ({args.mode}) on {len(grid)} weights, reward = log p(token set) on held-out prompts:")
    print(front.to_markdown(), end="")
    files = [front.write_json(os.path.join(out, "soups_front.json")),
             front.write_markdown(os.path.join(out, "soups_front.md"))]
    try:
        files.append(front.plot(os.path.join(out, "soups_front.png"), title=f"Personalized Soups ({args.mode})"))
    except ImportError:
        print("(matplotlib not installed: no PNG)")
    print("wrote " + ", ".join(files))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return {"front": front, "files": files, "adapters": adapters}


if __name__ == "__main__":
    main()
