"""TRL's DPOTrainer on a PMoL-injected tiny Llama, offline: `MoLoRADPOTrainer`.

A 2-layer Llama (hidden 32) built from a config and a word-level tokenizer built here (no
download) get PMoL layers on q_proj / v_proj (2 preference groups x 2 experts + the empty
expert). A handful of preference pairs carry a ``preference_label`` column; the trainer uses the
model with its adapters disabled as the DPO reference (no second copy), adds the PMoL group /
balance / z losses to the DPO loss and logs them (``aux/group`` ... in ``log_history``).

    python examples/trl_dpo_tiny.py              # 3 steps, a few seconds on CPU
    python examples/trl_dpo_tiny.py --steps 20

Needs transformers, datasets and trl (``pip install moelora[trl]``).
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from moelora.integrations import inject
from moelora.methods.pmol import PMoLConfig

# preference 0 (users writing "x" words) prefers "a" answers, preference 1 ("y" words) prefers "b"
WORDS = [f"{kind}{i}" for kind in "xyab" for i in range(8)]
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def tiny_tokenizer():
    """A word-level tokenizer over a fixed vocabulary, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def preference_pairs(n: int, seed: int = 0):
    """n pairs as a datasets.Dataset: prompt / chosen / rejected text and preference_label."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)

    def words(kind, count):
        return " ".join(f"{kind}{int(i)}" for i in torch.randint(0, 8, (count,), generator=g))

    rows = {"prompt": [], "chosen": [], "rejected": [], "preference_label": []}
    for i in range(n):
        pref = i % 2
        good, bad = ("a", "b") if pref == 0 else ("b", "a")
        rows["prompt"].append(words("xy"[pref], 4))
        rows["chosen"].append(" " + words(good, 3))
        rows["rejected"].append(" " + words(bad, 3))
        rows["preference_label"].append(pref)
    return Dataset.from_dict(rows)


def main(argv=None) -> dict:
    from trl import DPOConfig

    from moelora.integrations.trl_dpo import MoLoRADPOTrainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--output-dir", default=None, help="default: a temporary folder")
    args = parser.parse_args(argv)

    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    pmol = PMoLConfig(num_preferences=2, experts_per_preference=2, r=4, lora_alpha=8, top_k=2,
                      target_modules=["q_proj", "v_proj"], group_loss_weight=0.5)
    inject(model, pmol)
    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=args.output_dir or tmp, max_steps=args.steps, per_device_train_batch_size=4,
                           learning_rate=args.lr, beta=0.5, logging_steps=1, save_strategy="no", report_to=[],
                           use_cpu=True, seed=0, disable_tqdm=True)
        trainer = MoLoRADPOTrainer(model, args=config, train_dataset=preference_pairs(args.pairs),
                                   processing_class=tokenizer, aux_weights=pmol)
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in logs:
        print(f"step {entry['step']}  loss {entry['loss']:.4f}  group {entry['aux/group']:.4f}  "
              f"balance {entry['aux/balance']:.4f}  z {entry['aux/z']:.4f}  "
              f"reward margin {entry['rewards/margins']:.4f}")
    return {"trainer": trainer, "model": model, "logs": logs}


if __name__ == "__main__":
    main()
