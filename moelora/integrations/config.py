"""The configuration dataclasses of `inject`, each field documented once.

    TargetConfig      where adapters go: target_modules, exclude_modules, r, freeze_base
    LoRAConfig        + PEFT's LoRA hyper-parameters: lora_alpha, lora_dropout, use_rslora,
                      init_lora_weights
    MoLoRAConfig      + a generic mixture of E experts and its router

Method configs extend these (`moelora.methods.pmol.PMoLConfig` extends LoRAConfig,
`moelora.methods.hoe.HoEConfig` extends TargetConfig). `inject` needs of a config only
``target_modules``, ``exclude_modules``, ``freeze_base`` and ``make_layer(base_layer, name)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch.nn as nn

from moelora.layers.molora_linear import MoLoRALinear

__all__ = ["TargetConfig", "LoRAConfig", "MoLoRAConfig"]


@dataclass
class TargetConfig:
    """Where adapters go.

    Attributes:
        target_modules: module-name suffixes (like PEFT's, e.g. ["q_proj", "v_proj"]: a module
            matches when its name equals an entry or ends with "." + entry), a regex (full
            match on the module name), or "all-linear" (every nn.Linear but the output
            embedding).
        exclude_modules: names / regex never targeted.
        r: LoRA rank of every expert.
        freeze_base: freeze every parameter that is not a router's or an expert's.
    """

    target_modules: Union[Sequence[str], str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude_modules: Optional[Union[Sequence[str], str]] = None
    r: int = 8
    freeze_base: bool = True

    def make_layer(self, base_layer: nn.Linear, name: str = "") -> MoLoRALinear:
        raise NotImplementedError(f"{type(self).__name__} does not build layers itself")


@dataclass
class LoRAConfig(TargetConfig):
    """PEFT's LoRA hyper-parameters, shared by every expert of a layer.

    Attributes:
        lora_alpha: scaling numerator: scaling = lora_alpha / r (/ sqrt(r) with rsLoRA).
        lora_dropout: dropout on the experts' input (the base layer sees x undropped).
        use_rslora: rank-stabilised scaling lora_alpha / sqrt(r).
        init_lora_weights: True (PEFT's: B = 0, the model's output is unchanged), "gaussian",
            or False (A and B random: a non-trivial start, for tests).
    """

    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True


@dataclass
class MoLoRAConfig(LoRAConfig):
    """A generic mixture-of-LoRA-experts configuration for `inject`.

    Attributes:
        num_experts: E experts per target.
        router: "topk", "dense", "fixed", "hierarchical", or a dict {"type": ..., **kwargs}.
        top_k: k for router "topk", 1 <= top_k <= num_experts (ignored otherwise unless given
            in a router dict).
        empty_expert: an empty expert for router "topk".
        noisy_router: noisy top-k for router "topk".
    """

    num_experts: int = 4
    router: Union[str, dict] = "topk"
    top_k: int = 2
    empty_expert: bool = False
    noisy_router: bool = False

    def __post_init__(self):
        if self.router == "topk" and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts = {self.num_experts}], got {self.top_k}")

    def router_spec(self) -> Union[str, dict]:
        if self.router == "topk":
            return {"type": "topk", "k": self.top_k, "empty_expert": self.empty_expert,
                    "noisy": self.noisy_router}
        return self.router

    def make_layer(self, base_layer: nn.Linear, name: str = "") -> MoLoRALinear:
        return MoLoRALinear(base_layer, self.num_experts, self.r, self.lora_alpha, self.lora_dropout,
                            use_rslora=self.use_rslora, router=self.router_spec(),
                            init_lora_weights=self.init_lora_weights)
