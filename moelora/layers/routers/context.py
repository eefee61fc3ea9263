"""Per-call routing inputs: gates and preferences scoped to one block of code, not module state.

A scope maps routers to the inputs they take inside it (``gates [E] | [batch, E]`` for a
fixed-gate router, the mixing ``pi [J] | [batch, J]`` of a preference for a hierarchical one).
Scopes live in a `contextvars.ContextVar`, so

- each thread (and each asyncio task) sees only the scopes it opened: two threads can serve two
  preferences through one model at the same time;
- a scope ends with its block: nothing is left behind for the next batch to reuse;
- activation checkpointing replays them: `routing_checkpoint_context` (a ``context_fn`` for
  ``torch.utils.checkpoint``, non-reentrant) captures the scopes at the forward and restores
  them while the forward is recomputed in backward. A router that reads its inputs while a
  backward runs without that replay raises instead of reading whatever scope is open then.

The model-level entry point is `moelora.integrations.routing_inputs`; this module is the part
the routers read (layers may not import integrations).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["RoutingScope", "push_scope", "lookup", "routing_checkpoint_context"]


@dataclass(frozen=True)
class RoutingScope:
    # id(router) -> (router, {"gates": Tensor} or {"mixing": Tensor}); the router is kept so
    # its id cannot be reused by another module while the scope is open
    entries: dict = field(default_factory=dict)
    parent: Optional["RoutingScope"] = None
    replay: bool = False  # opened by a checkpoint recomputation (or inside one)


_SCOPE: contextvars.ContextVar[Optional[RoutingScope]] = contextvars.ContextVar(
    "moelora_routing_inputs", default=None)


@contextlib.contextmanager
def push_scope(entries: dict):
    """Open a scope giving ``entries`` (see `RoutingScope`) for the duration of the block."""
    top = _SCOPE.get()
    token = _SCOPE.set(RoutingScope(entries, top, replay=top is not None and top.replay))
    try:
        yield
    finally:
        _SCOPE.reset(token)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


@torch.compiler.disable  # dynamo cannot read a ContextVar: a graph break, not a wrong constant
def lookup(router, key: str):
    """The innermost scope's ``key`` input for ``router``, or None. Raises when called while a
    backward runs outside a replayed scope: that is a checkpoint recomputation that would not
    see the inputs of the forward it recomputes."""
    top = _SCOPE.get()
    if _in_backward() and (top is None or not top.replay):
        raise RuntimeError(
            f"{type(router).__name__} is being recomputed in backward (activation checkpointing) "
            f"without its routing inputs: checkpoint with use_reentrant=False and "
            f"context_fn=moelora.routing_checkpoint_context (transformers: gradient_checkpointing_"
            f"enable(gradient_checkpointing_kwargs={{'use_reentrant': False, 'context_fn': "
            f"moelora.routing_checkpoint_context}})), or pass {key if key == 'gates' else 'preference'}= "
            f"to the layer's forward; reentrant checkpointing cannot replay them")
    scope = top
    while scope is not None:
        entry = scope.entries.get(id(router))
        if entry is not None and entry[0] is router and key in entry[1]:
            return entry[1][key]
        scope = scope.parent
    return None


def routing_checkpoint_context():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the
    routing scopes open at the forward are the ones the recomputation in backward sees."""
    captured = []

    @contextlib.contextmanager
    def forward():
        captured.append(_SCOPE.get())
        yield

    @contextlib.contextmanager
    def recompute():
        token = _SCOPE.set(RoutingScope({}, captured[0] if captured else None, replay=True))
        try:
            yield
        finally:
            _SCOPE.reset(token)

    return forward(), recompute()
