"""moelora: fused kernels for mixture-of-LoRA-experts layers.

Importing moelora registers its ops under ``torch.ops.moelora`` and patches nothing else:
models change only through explicit calls (`inject`, `build_hoe`, `load_adapters_as_experts`).
transformers, peft and safetensors are imported only by the functions that need them.

The package, bottom up (each part imports only the parts above it in this list):

    ops/            the registered ops, one folder each, and the one backend dispatch
    layers/         MoLoRALinear, its routers, pooling
    losses/         router aux losses, mixture DPO losses
    integrations/   configs, inject / uninject, model-wide controls, PEFT and checkpoint IO
    methods/        one file per paper: pmol, hoe, moe_dpo, soups, moslim
"""
from moelora import reference
from moelora.integrations import (
    MoLoRAConfig,
    inject,
    load_adapters_as_experts,
    load_moelora,
    routing_checkpoint_context,
    routing_inputs,
    save_moelora,
    set_gates,
    set_preference,
    uninject,
)
from moelora.integrations.export import export_expert, export_soup
from moelora.integrations.generation import generate
from moelora.integrations.hf import from_pretrained, save_pretrained
from moelora.layers import MoLoRALinear
from moelora.losses.pmol import aux_loss
from moelora.methods import (
    HoEConfig,
    MoEDPOModel,
    MoELoRADPOModel,
    MultiObjectiveRewardHead,
    PMoLConfig,
    SequenceGate,
    build_hoe,
    merge_adapters,
)
from moelora.ops.expert_logprobs import expert_logprobs
from moelora.ops.molora_linear import available_backends, molora_linear
from moelora.ops.routing import topk_route

__version__ = "0.1.0"
__all__ = [
    # ops
    "molora_linear", "topk_route", "expert_logprobs", "available_backends", "reference",
    # layers and model surgery
    "MoLoRALinear", "MoLoRAConfig", "inject", "uninject", "routing_inputs",
    "routing_checkpoint_context", "set_gates", "set_preference",
    "load_adapters_as_experts", "save_moelora", "load_moelora", "aux_loss",
    # transformers save / load
    "save_pretrained", "from_pretrained", "generate",
    # serving engines: PEFT adapter folders
    "export_soup", "export_expert",
    # methods
    "PMoLConfig", "HoEConfig", "build_hoe", "merge_adapters", "MoEDPOModel", "MoELoRADPOModel",
    "SequenceGate", "MultiObjectiveRewardHead",
    "__version__",
]
