"""Putting moelora layers into existing models and getting them out again: the configs,
`inject` / `uninject` (any torch or transformers model), model-wide controls, PEFT adapters as
experts, and moelora's safetensors adapter files.

transformers, peft and safetensors are optional (``pip install moelora[hf]``); nothing is
imported from them until a function needs it, and nothing is patched on import. Imports only
from `moelora.layers` and `moelora.ops`.
"""
from moelora.integrations.checkpoint import MOELORA_ADAPTER_FILE, load_moelora, save_moelora
from moelora.integrations.config import LoRAConfig, MoLoRAConfig, TargetConfig
from moelora.integrations.controls import (
    clear_router_states,
    disable_adapters,
    merge_layers,
    routing_checkpoint_context,
    routing_inputs,
    set_gates,
    set_preference,
    set_record_routing,
    unmerge_layers,
)
from moelora.integrations.inject import find_targets, inject, inject_named, match_target, uninject
from moelora.integrations.peft_io import (
    LoraModule,
    PeftLoraAdapter,
    load_adapters_as_experts,
    read_peft_adapter,
)

__all__ = [
    "TargetConfig", "LoRAConfig", "MoLoRAConfig",
    "inject", "inject_named", "uninject", "match_target", "find_targets",
    "routing_inputs", "routing_checkpoint_context", "set_gates", "set_preference", "set_record_routing",
    "clear_router_states", "disable_adapters",
    "merge_layers", "unmerge_layers",
    "LoraModule", "PeftLoraAdapter", "read_peft_adapter", "load_adapters_as_experts",
    "save_moelora", "load_moelora", "MOELORA_ADAPTER_FILE",
]


def __getattr__(name):
    # trl is heavy and optional: import it only when the trainer is asked for (and keep it out of
    # __all__, so that `import *` works without trl)
    if name == "MoLoRADPOTrainer":
        from moelora.integrations.trl_dpo import MoLoRADPOTrainer

        return MoLoRADPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
