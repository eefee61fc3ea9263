"""The routed LoRA delta alone (docs/spec.md §1 without the base term), for base layers that
compute their own output (quantized linears, GPT-2's Conv1D)."""
from moelora.ops.molora_delta.op import molora_delta

__all__ = ["molora_delta"]
