"""Training losses built on moelora's ops."""
from moelora.losses.dpo import (
    MixtureDPOOutput,
    dpo_margins,
    mixture_dpo_em_loss,
    mixture_dpo_loss,
    mixture_dpo_nll_loss,
    sequence_logprobs,
)

__all__ = [
    "MixtureDPOOutput",
    "dpo_margins",
    "mixture_dpo_em_loss",
    "mixture_dpo_loss",
    "mixture_dpo_nll_loss",
    "sequence_logprobs",
]
