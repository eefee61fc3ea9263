"""Training losses built on moelora's ops: the routers' auxiliary losses (PMoL's group soft
loss, load balance, z-loss, and `aux_loss`, which collects them from a model) and the mixture
DPO losses of Mix- / MoE-DPO."""
from moelora.losses.dpo import (
    MixtureDPOOutput,
    dpo_margins,
    gumbel_temperature,
    mixture_dpo_em_loss,
    mixture_dpo_gumbel_loss,
    mixture_dpo_loss,
    mixture_dpo_nll_loss,
    sequence_logprobs,
)
from moelora.losses.pmol import aux_loss, expert_group_soft_loss, load_balance_loss, router_z_loss

__all__ = [
    "MixtureDPOOutput",
    "dpo_margins",
    "gumbel_temperature",
    "mixture_dpo_em_loss",
    "mixture_dpo_gumbel_loss",
    "mixture_dpo_loss",
    "mixture_dpo_nll_loss",
    "sequence_logprobs",
    "aux_loss",
    "expert_group_soft_loss",
    "load_balance_loss",
    "router_z_loss",
]
