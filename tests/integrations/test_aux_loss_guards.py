"""Aux losses that were silently zero or wrong (issue 15, item 3): after an eval-mode forward,
with an out-of-range preference label, with reentrant activation checkpointing; and routing
inputs given to a model without the routers to take them."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as checkpoint

from moelora.integrations import (
    clear_router_states,
    inject,
    routing_inputs,
    set_gates,
    set_preference,
    set_record_routing,
)
from moelora.layers import molora_layers
from moelora.losses.pmol import aux_loss
from moelora.methods.pmol import PMoLConfig


class _Stack(nn.Module):
    def __init__(self, checkpoint_kwargs=None):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(12, 12) for _ in range(2))
        self.checkpoint_kwargs = checkpoint_kwargs

    def forward(self, x):
        for block in self.blocks:
            if self.checkpoint_kwargs is not None and torch.is_grad_enabled():
                x = x + checkpoint.checkpoint(block, x, **self.checkpoint_kwargs)
            else:
                x = x + block(x)
        return x


def _pmol(checkpoint_kwargs=None):
    torch.manual_seed(0)
    config = PMoLConfig(num_preferences=2, experts_per_preference=2, r=2, init_lora_weights=False,
                        target_modules=["blocks.0", "blocks.1"])
    return inject(_Stack(checkpoint_kwargs), config).double().train(), config


def _x():
    return torch.randn(3, 5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


LABELS = torch.tensor([0, 1, -1])


def test_eval_forward_does_not_give_silent_zeros():
    model, config = _pmol()
    model.eval()
    with torch.no_grad():
        model(_x())
    with pytest.raises(RuntimeError, match="no MoLoRALinear of the model recorded"):
        aux_loss(model, LABELS, weights=config)
    # a training forward, then eval: the recording is the training forward's, not the last one's
    model.train()
    model(_x())
    model.eval()
    with torch.no_grad():
        model(_x() + 1)
    with pytest.raises(RuntimeError, match="earlier training forward"):
        aux_loss(model, LABELS, weights=config)
    set_record_routing(model)  # the documented way to get eval-mode aux losses
    with torch.no_grad():
        model(_x())
        assert aux_loss(model, LABELS, weights=config)["total"] > 0
    clear_router_states(model)
    with pytest.raises(RuntimeError, match="recorded"):
        aux_loss(model)


def test_preference_labels_out_of_range_raise():
    model, config = _pmol()
    model(_x())
    for bad in ([0, 5, -1], [0, 2, 1], [-2, 0, 1]):
        with pytest.raises(ValueError, match=r"preference_labels must be -1 \(unlabelled\) or a "
                                             r"preference group in \[0, 2\)"):
            aux_loss(model, torch.tensor(bad), weights=config)
    with pytest.raises(TypeError, match="preference_labels must be an integer tensor"):
        aux_loss(model, torch.tensor([0.0, 1.0, 1.0]), weights=config)
    assert torch.isfinite(aux_loss(model, LABELS, weights=config)["group"])


def _router_grads(checkpoint_kwargs):
    model, config = _pmol(checkpoint_kwargs)
    x = _x().requires_grad_()  # reentrant checkpointing needs an input that requires grad
    out = model(x)
    loss = out.square().mean() + aux_loss(model, LABELS, weights=config)["total"]
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if ".router." in n}


def test_checkpointing_keeps_the_router_gradient_or_refuses():
    want = _router_grads(None)
    assert want and all(g.abs().sum() > 0 for g in want.values())
    got = _router_grads({"use_reentrant": False})
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-14, msg=name)
    # the reentrant kind runs the forward under no_grad: the recorded routing has no graph,
    # so the aux losses would not reach the routers (the gradient silently dropped before)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        _router_grads({"use_reentrant": True})


def test_routing_inputs_need_routers_that_take_them():
    model, _ = _pmol()  # top-k routers only
    with pytest.raises(ValueError, match="gates= given"):
        set_gates(model, torch.ones(4))
    with pytest.raises(ValueError, match="preference= given"):
        set_preference(model, torch.ones(2))
    with pytest.raises(ValueError, match="gates= given"):
        with routing_inputs(model, gates=torch.ones(4)):
            pass
    assert all(getattr(layer.router, "gates", None) is None for _, layer in molora_layers(model))
