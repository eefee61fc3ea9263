"""moelora: fused kernels for mixture-of-LoRA-experts layers.

Importing moelora registers its ops under ``torch.ops.moelora`` and patches nothing else:
models change only through explicit calls (`inject`, `build_hoe`, `load_adapters_as_experts`).
transformers, peft and safetensors are imported only by the functions that need them.
"""
from moelora import reference
from moelora.ops import available_backends, molora_linear, topk_route
from moelora.ops.expert_logprobs import expert_logprobs
from moelora.layers import (
    HoEConfig,
    MoLoRALinear,
    PMoLConfig,
    build_hoe,
    merge_adapters,
    set_gates,
    set_preference,
)
from moelora.losses.pmol import aux_loss
from moelora.integrations import (
    MoLoRAConfig,
    inject,
    load_adapters_as_experts,
    load_moelora,
    save_moelora,
    uninject,
)

__version__ = "0.1.0"
__all__ = [
    # ops
    "molora_linear", "topk_route", "expert_logprobs", "available_backends", "reference",
    # layers and model surgery
    "MoLoRALinear", "MoLoRAConfig", "PMoLConfig", "HoEConfig", "inject", "uninject", "build_hoe",
    "set_gates", "set_preference", "merge_adapters", "load_adapters_as_experts",
    "save_moelora", "load_moelora", "aux_loss",
    "__version__",
]
