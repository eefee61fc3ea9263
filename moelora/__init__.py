"""moelora: fused kernels for mixture-of-LoRA-experts layers.

Importing moelora registers its ops under ``torch.ops.moelora`` and patches nothing else.
"""
from moelora.ops import available_backends, molora_linear, topk_route
from moelora import reference

__version__ = "0.1.0"
__all__ = ["molora_linear", "topk_route", "available_backends", "reference", "__version__"]
