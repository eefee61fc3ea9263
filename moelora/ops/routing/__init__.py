"""Routing: softmax + top-k + renormalisation (docs/spec.md §2)."""
from moelora.ops.routing.op import topk_route

__all__ = ["topk_route"]
