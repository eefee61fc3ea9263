"""Per-expert head log-probs without [T, K, V] logits (docs/spec.md §5)."""
from moelora.ops.expert_logprobs.op import expert_logprobs

__all__ = ["expert_logprobs"]
