"""Registered ops (namespace `moelora::`) and their public functionals."""
from moelora.ops.backends import available_backends
from moelora.ops.molora_linear import molora_linear
from moelora.ops.routing import topk_route

__all__ = ["molora_linear", "topk_route", "available_backends"]
