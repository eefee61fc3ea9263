"""Layer-level errors as clear as the op's (issue 15, item 5) and a backend per layer
(issue 14, item 6): each check named, each raised before any kernel or the router's GEMM."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import moelora.ops.molora_delta.op as delta_op
import moelora.ops.molora_linear.op as linear_op
from moelora.integrations import MoLoRAConfig, inject
from moelora.layers import MoLoRALinear


def _layer(**kw):
    return MoLoRALinear(nn.Linear(13, 7), 2, 3, router={"type": "topk", "k": 2}, init_lora_weights=False, **kw)


def test_wrong_d_in_names_x_and_the_expected_last_dim():
    with pytest.raises(ValueError, match=r"x has shape \(4, 12\), expected \[\.\.\., 13\]"):
        _layer()(torch.randn(4, 12))


def test_int_input_is_refused_not_cast():
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        _layer()(torch.ones(4, 13, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        _layer()([[0.0] * 13])


def test_bf16_input_on_an_fp32_layer_raises_as_nn_linear_does():
    layer = _layer()
    x = torch.randn(4, 13, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):  # nn.Linear's own behaviour
        layer.base_layer(x)
    with pytest.raises(TypeError, match="x has dtype torch.bfloat16, expected the base layer's dtype torch.float32"):
        layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision stays the way to do it
        assert layer(x).dtype == torch.bfloat16


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)


def test_second_inject_on_the_same_targets_says_already_injected():
    model = inject(_Model(), MoLoRAConfig(target_modules=["q_proj"], num_experts=2, r=2))
    with pytest.raises(ValueError, match="already injected \\(q_proj\\)"):
        inject(model, MoLoRAConfig(target_modules=["q_proj"], num_experts=2, r=2))


def test_molora_config_top_k_above_num_experts_raises_as_pmol_config():
    with pytest.raises(ValueError, match="top_k must be an int in \\[1, num_experts = 2\\], got 5"):
        MoLoRAConfig(num_experts=2, top_k=5)
    with pytest.raises(ValueError, match="top_k must be an int in \\[1, num_experts = 2\\], got 5"):
        MoLoRAConfig(num_experts=2, top_k=5, router={"type": "topk", "empty_expert": True})
    with pytest.raises(ValueError, match="router k"):
        MoLoRAConfig(num_experts=2, router={"type": "topk", "k": 3})
    spec = MoLoRAConfig(num_experts=3, top_k=3, router={"type": "topk"}).router_spec()
    assert spec["k"] == 3  # a topk dict without k takes the config's top_k
    MoLoRAConfig(num_experts=1, router="dense")  # top_k is not a dense router's


# --------------------------------------------------------------------------------------------
# a backend per layer
# --------------------------------------------------------------------------------------------
def test_unknown_backend_errors_at_construction():
    with pytest.raises(ValueError, match="backend must be one of"):
        _layer(backend="nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        MoLoRAConfig(backend="nope")


def _spy_impl(monkeypatch, dispatch):
    names = []
    real = dispatch.impl

    def impl(name):
        names.append(name)
        return real(name)

    monkeypatch.setattr(dispatch, "impl", impl)
    return names


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_layer_backend_reaches_the_op(monkeypatch, backend):
    if backend not in linear_op.BACKENDS.available("cpu"):
        pytest.skip(f"backend {backend} is not available here")
    layer = _layer(backend=backend)
    assert layer.layer_config()["backend"] == backend
    assert MoLoRALinear.from_config(nn.Linear(13, 7), layer.layer_config()).backend == backend
    names = _spy_impl(monkeypatch, linear_op.BACKENDS)
    x = torch.randn(4, 13, requires_grad=True)
    layer(x).sum().backward()
    assert names and set(names) == {backend}  # forward and backward, nothing else


def test_config_backend_reaches_every_injected_layer_and_the_delta_op(monkeypatch):
    from transformers.pytorch_utils import Conv1D

    model = _Model()
    model.c_attn = Conv1D(8, 8)  # a non-fused base: the delta op
    inject(model, MoLoRAConfig(target_modules=["q_proj", "c_attn"], num_experts=2, r=2, backend="torch",
                               init_lora_weights=False))
    assert model.q_proj.backend == "torch" and model.c_attn.backend == "torch"
    linear_names = _spy_impl(monkeypatch, linear_op.BACKENDS)
    delta_names = _spy_impl(monkeypatch, delta_op.BACKENDS)
    x = torch.randn(3, 8)
    (model.q_proj(x).sum() + model.c_attn(x).sum()).backward()
    assert set(linear_names) == {"torch"} and set(delta_names) == {"torch"}


def test_a_molora_layer_is_not_a_base():
    with pytest.raises(TypeError, match="already a MoLoRALinear"):
        MoLoRALinear(_layer(), 2, 2)
