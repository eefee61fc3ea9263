"""One file per paper: what each method adds on top of the layers, losses and integrations.

    pmol      PMoL, Preference Mixture of LoRAs (docs/spec.md §3)
    hoe       HoE, Hierarchical Experts (§4)
    moe_dpo   Mix- and MoE-DPO models (§5)
    soups     Personalized Soups (§6)
    moslim    MOSLIM multi-head reward classification (§7)

A new method is a new file here; it may import anything below it (integrations, losses,
layers, ops) and nothing imports it but the top-level package.
"""
from moelora.methods.hoe import (
    HoEConfig,
    RouterExpertTrainer,
    build_hoe,
    energy_rank,
    hoe_experts_from_models,
    task_vector_svd,
    tchebycheff,
    tchebycheff_router_loss,
    train_router_expert,
)
from moelora.methods.moe_dpo import (
    FixedMixture,
    MoEDPOModel,
    MoELoRADPOModel,
    SequenceGate,
    sequence_gates_to_routing,
)
from moelora.methods.moslim import (
    MultiObjectiveRewardHead,
    MultiObjectiveRewardModel,
    format_objectives,
    moslim_reward_function,
    objective_targets,
    parse_objectives,
)
from moelora.methods.pmol import PMoLConfig, group_mass
from moelora.methods.soups import SoupMerge, merge_adapters, serve_soups, soup_deltas

__all__ = [
    "PMoLConfig", "group_mass",
    "HoEConfig", "build_hoe", "hoe_experts_from_models", "task_vector_svd", "tchebycheff", "energy_rank",
    "RouterExpertTrainer", "tchebycheff_router_loss", "train_router_expert",
    "MoEDPOModel", "MoELoRADPOModel", "SequenceGate", "FixedMixture", "sequence_gates_to_routing",
    "SoupMerge", "merge_adapters", "serve_soups", "soup_deltas",
    "MultiObjectiveRewardHead", "MultiObjectiveRewardModel", "format_objectives", "parse_objectives",
    "objective_targets", "moslim_reward_function",
]
