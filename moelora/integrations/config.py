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
from moelora.ops.dispatch import BACKEND_NAMES

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
        top_k: k for router "topk" (by name, or a {"type": "topk"} dict without its own "k"),
            1 <= top_k <= num_experts, checked here (as PMoLConfig does); ignored by other routers.
        empty_expert: an empty expert for router "topk".
        noisy_router: noisy top-k for router "topk".
        backend: the op backend of every injected layer (`moelora.ops.dispatch.BACKEND_NAMES`;
            "auto": MOELORA_BACKEND, then the fastest available).
    """

    num_experts: int = 4
    router: Union[str, dict] = "topk"
    top_k: int = 2
    empty_expert: bool = False
    noisy_router: bool = False
    backend: str = "auto"

    def __post_init__(self):
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {self.num_experts!r}")
        if not isinstance(self.backend, str) or self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {self.backend!r}")
        spec = self.router_spec()
        if isinstance(spec, dict) and spec.get("type") == "topk":
            k = spec["k"]
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts:
                what = "router k" if isinstance(self.router, dict) and "k" in self.router else "top_k"
                raise ValueError(f"{what} must be an int in [1, num_experts = {self.num_experts}], got {k!r}")

    def router_spec(self) -> Union[str, dict]:
        if self.router == "topk":
            return {"type": "topk", "k": self.top_k, "empty_expert": self.empty_expert,
                    "noisy": self.noisy_router}
        if isinstance(self.router, dict) and self.router.get("type") == "topk" and "k" not in self.router:
            return {**self.router, "k": self.top_k}  # the config's top_k, as for router="topk"
        return self.router

    def make_layer(self, base_layer: nn.Linear, name: str = "") -> MoLoRALinear:
        return MoLoRALinear(base_layer, self.num_experts, self.r, self.lora_alpha, self.lora_dropout,
                            use_rslora=self.use_rslora, router=self.router_spec(),
                            init_lora_weights=self.init_lora_weights, backend=self.backend)
