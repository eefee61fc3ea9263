"""Putting moelora layers into existing models: `inject` / `uninject` (any torch or
transformers model), PEFT adapters as experts, and moelora's safetensors adapter files.
transformers, peft and safetensors are optional (``pip install moelora[hf]``); nothing is
imported from them until a function needs it, and nothing is patched on import."""
from moelora.integrations.inject import MoLoRAConfig, find_targets, inject, match_target, uninject
from moelora.integrations.peft_io import (
    PeftLoraAdapter,
    load_adapters_as_experts,
    load_moelora,
    read_peft_adapter,
    save_moelora,
)

__all__ = [
    "MoLoRAConfig", "inject", "uninject", "match_target", "find_targets",
    "PeftLoraAdapter", "read_peft_adapter", "load_adapters_as_experts", "save_moelora", "load_moelora",
]
