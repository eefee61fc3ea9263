"""The core op: routed multi-LoRA linear (docs/spec.md §1)."""
from moelora.ops.molora_linear.op import available_backends, molora_linear

__all__ = ["molora_linear", "available_backends"]
