"""The float64 ground truth of every op, in one namespace (each lives beside its op as
``moelora/ops/<op>/reference.py``): the formulas of docs/spec.md written for clarity, not speed,
differentiable by autograd. Every backend is tested against these; nothing on a hot path calls
them."""
from moelora.ops.expert_logprobs.reference import naive_expert_logprobs as expert_logprobs_ref
from moelora.ops.molora_linear.reference import molora_linear_ref
from moelora.ops.routing.reference import load_balance_loss_ref, router_z_loss_ref, topk_route_ref

__all__ = [
    "molora_linear_ref",
    "topk_route_ref",
    "load_balance_loss_ref",
    "router_z_loss_ref",
    "expert_logprobs_ref",
]
