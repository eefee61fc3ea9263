"""nn.Modules on top of the ops: the drop-in `MoLoRALinear`, its routers (one file per kind in
`routers/`) and the pooling helpers the method models share.

Nothing here patches anything on import; models change only through explicit calls
(`moelora.integrations.inject`, `moelora.methods.hoe.build_hoe`, ...). The layers import only
from `moelora.ops`.
"""
from moelora.layers.molora_linear import ExpertWeight, MoLoRALinear, molora_layers
from moelora.layers.pooling import backbone_hidden_states, last_token_hidden, pool_hidden
from moelora.layers.routers import (
    ROUTERS,
    DenseRouter,
    FixedGateRouter,
    HierarchicalRouter,
    Router,
    RouterOutput,
    TopKRouter,
    anchor_mixing,
    build_router,
)

# The routing a layer recorded for the aux losses is its router's output (num_experts set).
RouterState = RouterOutput

__all__ = [
    "MoLoRALinear", "ExpertWeight", "molora_layers",
    "Router", "RouterOutput", "RouterState", "TopKRouter", "DenseRouter", "FixedGateRouter",
    "HierarchicalRouter", "ROUTERS", "anchor_mixing", "build_router",
    "pool_hidden", "last_token_hidden", "backbone_hidden_states",
]
