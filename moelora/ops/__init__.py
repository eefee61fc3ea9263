"""Registered ops (namespace `moelora::`) and their public functionals."""
from moelora.ops.backends import available_backends
from moelora.ops.molora_linear import molora_linear

__all__ = ["molora_linear", "available_backends"]
