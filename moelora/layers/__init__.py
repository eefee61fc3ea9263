"""nn.Modules on top of the ops: the drop-in `MoLoRALinear`, its routers, and the method
layers of PMoL (§3), HoE (§4), Personalized Soups (§6) and MOSLIM (§7).

Nothing here patches anything on import; models change only through explicit calls
(`moelora.integrations.inject`, `build_hoe`, `load_adapters_as_experts`, ...).
"""
from moelora.layers.routers import (
    DenseRouter,
    FixedGateRouter,
    HierarchicalRouter,
    Router,
    RouterOutput,
    TopKRouter,
    anchor_mixing,
    build_router,
)
from moelora.layers.molora_linear import (
    MoLoRALinear,
    RouterState,
    clear_router_states,
    disable_adapters,
    merge_layers,
    molora_layers,
    set_gates,
    set_preference,
    set_record_routing,
    unmerge_layers,
)
from moelora.layers.pmol import PMoLConfig, group_mass
from moelora.layers.hoe import HoEConfig, build_hoe, hoe_experts_from_models, task_vector_svd, tchebycheff
from moelora.layers.soups import SoupMerge, merge_adapters, serve_soups, soup_deltas
from moelora.layers.moslim import MultiObjectiveRewardHead, MultiObjectiveRewardModel, last_token_hidden

__all__ = [
    "Router", "RouterOutput", "TopKRouter", "DenseRouter", "FixedGateRouter", "HierarchicalRouter",
    "anchor_mixing", "build_router",
    "MoLoRALinear", "RouterState", "molora_layers", "set_gates", "set_preference",
    "set_record_routing", "clear_router_states", "disable_adapters", "merge_layers", "unmerge_layers",
    "PMoLConfig", "group_mass",
    "HoEConfig", "build_hoe", "hoe_experts_from_models", "task_vector_svd", "tchebycheff",
    "SoupMerge", "merge_adapters", "serve_soups", "soup_deltas",
    "MultiObjectiveRewardHead", "MultiObjectiveRewardModel", "last_token_hidden",
]
