"""MOSLIM's mapped reward driving TRL's GRPOTrainer on a moelora-injected tiny Llama, offline.

A multi-head classification reward model (`MultiObjectiveRewardModel`, two objectives with 3
and 2 levels, on a tiny Llama backbone) is trained a few steps with masked cross-entropy on
labelled samples; each GRPO prompt asks for objectives and levels with the
``[objectives: name=level, ...]`` tag; `moslim_reward_function` maps the reward model's output to
the scalar reward for the requested levels, as a `reward_funcs` entry. The policy is a tiny
Llama with LoRA experts (`MoLoRAConfig`, top-2 of 4); GRPO trains only the experts and routers.

    python examples/moslim_grpo_tiny.py            # 2 GRPO steps, seconds on CPU

Needs transformers, datasets and trl (``pip install moelora[trl]``).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trl_dpo_tiny import tiny_llama, tiny_tokenizer  # noqa: E402

from moelora.integrations import MoLoRAConfig, inject  # noqa: E402
from moelora.methods import MultiObjectiveRewardModel, format_objectives, moslim_reward_function  # noqa: E402

OBJECTIVES = ["helpfulness", "harmlessness"]


def train_reward_model(tokenizer, steps: int, seed: int = 0) -> MultiObjectiveRewardModel:
    """Labels from the text: helpfulness = how many "a" words (0-2), harmlessness = no "b" word."""
    torch.manual_seed(seed)
    texts = ["a1 a2 x1", "a3 y2", "x3 y4", "b1 a1", "b2 b3", "a4 a5 y1", "x5", "b4 y3"]
    labels = torch.tensor([[min(t.count("a"), 2), int("b" not in t)] for t in texts])
    model = MultiObjectiveRewardModel(tiny_llama(len(tokenizer), seed=seed).model, 32, num_classes=[3, 2])
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(**enc, labels=labels)["loss"].backward()
        opt.step()
    with torch.no_grad():  # calibrate the reward mapping's running statistics on the labelled data
        model.head.reward(model(**enc), labels, update_stats=True)
    return model.eval()


def main(argv=None) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rm-steps", type=int, default=20)
    parser.add_argument("--output-dir", default=None, help="default: a temporary folder")
    args = parser.parse_args(argv)

    tokenizer = tiny_tokenizer()
    reward = moslim_reward_function(train_reward_model(tokenizer, args.rm_steps), tokenizer, OBJECTIVES)
    prompts = [format_objectives({"helpfulness": 2, "harmlessness": 1}) + " x1 x2",
               format_objectives({"harmlessness": 1}) + " y1 y2"] * 2

    policy = tiny_llama(len(tokenizer), seed=1)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    inject(policy, MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4, r=4, top_k=2))
    base_before = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(output_dir=args.output_dir or tmp, max_steps=args.steps, per_device_train_batch_size=4,
                            num_generations=2, max_completion_length=4, learning_rate=1e-2, logging_steps=1,
                            save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
        trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=config,
                              train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)
        trainer.train()
    rewards = [h[k] for h in trainer.state.log_history for k in h if k.startswith("rewards/moslim_reward")
               and k.endswith("mean")]
    frozen = all(torch.equal(p, base_before[n]) for n, p in policy.named_parameters() if n in base_before)
    print(f"MOSLIM reward per step: {[round(r, 3) for r in rewards]}; base weights untouched: {frozen}")
    return {"rewards": rewards, "base_frozen": frozen, "log_history": trainer.state.log_history}


if __name__ == "__main__":
    main()
