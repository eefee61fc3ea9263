"""MoLoRALinear on any base layer: nn.Linear (fused), transformers' GPT-2 Conv1D, torchao int8
weight-only and bitsandbytes 4-bit / 8-bit linears (those that run on this machine). Each:
values and every gradient against the base's own output plus the float64 delta reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import moelora.layers.molora_linear as layer_module
from moelora.integrations import MoLoRAConfig, inject, uninject
from moelora.layers import MoLoRALinear
from moelora.ops.molora_delta.reference import molora_delta_ref
from moelora.reference import molora_linear_ref

from helpers import bound, rel_error

D_IN, D_OUT = 16, 8


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # A later compile of the same code with another float scaling would otherwise recompile
    # with a symbolic float, which the op's validation cannot take yet (issue 15, item 2).
    yield
    torch._dynamo.reset()


def _float_linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(D_IN, D_OUT)


def _conv1d():
    from transformers.pytorch_utils import Conv1D

    base = Conv1D(D_OUT, D_IN)  # weight [d_in, d_out]
    nn.init.normal_(base.weight, std=0.2)
    nn.init.normal_(base.bias, std=0.2)
    return base


def _torchao_int8():
    quant = pytest.importorskip("torchao.quantization")
    model = nn.Sequential(_float_linear())
    quant.quantize_(model, quant.Int8WeightOnlyConfig())
    return model[0]


def _bnb(kind):
    bnb = pytest.importorskip("bitsandbytes")
    lin = _float_linear()
    if kind == "bnb4":
        base = bnb.nn.Linear4bit(D_IN, D_OUT, compute_dtype=torch.float32, quant_type="nf4")
    else:
        base = bnb.nn.Linear8bitLt(D_IN, D_OUT, has_fp16_weights=False)
    base.load_state_dict(lin.state_dict())
    base = base.to("cpu")  # bitsandbytes quantizes on the move to a device
    try:
        base(torch.randn(2, D_IN))
    except Exception as exc:  # a build without CPU kernels
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot run {type(base).__name__} on CPU: {exc}")
    assert base.weight.dtype in (torch.uint8, torch.int8)  # really quantized
    return base


BASES = {
    "linear": _float_linear,
    "conv1d": _conv1d,
    "torchao_int8": _torchao_int8,
    "bnb4": lambda: _bnb("bnb4"),
    "bnb8": lambda: _bnb("bnb8"),
}


@pytest.fixture
def delta_calls(monkeypatch):
    calls = []
    real = layer_module.molora_delta

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(layer_module, "molora_delta", spy)
    return calls


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("router", [{"type": "topk", "k": 2}, "dense"])
def test_values_and_gradients_match_reference(kind, router, delta_calls):
    base = BASES[kind]()
    layer = MoLoRALinear(base, 4, 3, lora_alpha=6.0, router=router, init_lora_weights=False).train()
    assert layer.in_features == D_IN and layer.out_features == D_OUT
    assert layer.lora_A.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    torch.manual_seed(1)
    x = torch.randn(2, 5, D_IN, requires_grad=True)
    w = torch.randn(2, 5, D_OUT)
    y = layer(x)
    (y * w).sum().backward()
    assert len(delta_calls) == (0 if kind == "linear" else 1)  # nn.Linear keeps the fused op
    trainable = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    got = {n: p.grad.clone() for n, p in trainable}
    got["x"] = x.grad.clone()
    layer.zero_grad()

    # reference: the base layer's own output and autograd, the experts in float64
    xr = x.detach().clone().requires_grad_()
    a64 = layer.lora_A.weight.detach().double().requires_grad_()
    b64 = layer.lora_B.weight.detach().double().requires_grad_()
    route = layer.router(xr)
    delta = molora_delta_ref(xr.double(), a64, b64, route.expert_indices, route.expert_weights.double(),
                             layer.scaling)
    y_ref = layer.base_layer(xr).double() + delta
    (y_ref * w.double()).sum().backward()
    expected = {n: p.grad for n, p in trainable if n.startswith("router.")}
    expected.update({"lora_A.weight": a64.grad, "lora_B.weight": b64.grad, "x": xr.grad})
    assert got.keys() == expected.keys()
    tol = bound(torch.float32, 0.0)
    assert rel_error(y, y_ref) <= tol
    for name in got:
        assert rel_error(got[name], expected[name]) <= tol, name


def test_conv1d_layer_is_the_transposed_linear_in_float64():
    base = _conv1d().double()
    layer = MoLoRALinear(base, 3, 2, router="dense", init_lora_weights=False)
    x = torch.randn(4, D_IN, dtype=torch.float64)
    route = layer.router(x)
    ref = molora_linear_ref(x, base.weight.t(), base.bias, layer.lora_A.weight, layer.lora_B.weight,
                            route.expert_indices, route.expert_weights, layer.scaling)
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_compile_fullgraph(kind):
    layer = MoLoRALinear(BASES[kind](), 4, 3, router={"type": "topk", "k": 2}, init_lora_weights=False)
    x = torch.randn(2, 5, D_IN)

    def step(inp):
        return layer(inp).square().sum()

    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    grad = torch.autograd.grad(loss, [layer.lora_A.weight])[0]
    ref_loss = step(x)
    ref_grad = torch.autograd.grad(ref_loss, [layer.lora_A.weight])[0]
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_fresh_layer_leaves_a_quantized_base_unchanged():
    base = _torchao_int8()
    layer = MoLoRALinear(base, 2, 4)
    x = torch.randn(3, D_IN)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_merge_conv1d_and_refuse_a_quantized_base():
    layer = MoLoRALinear(_conv1d(), 3, 2, router="fixed", init_lora_weights=False).eval()
    gates = torch.tensor([0.5, 1.0, -0.25])
    x = torch.randn(4, D_IN)
    before = layer(x, gates=gates)
    original = layer.base_layer.weight.detach().clone()
    layer.merge(gates)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)
    quantized = MoLoRALinear(_torchao_int8(), 3, 2, router="fixed")
    with pytest.raises(TypeError, match="merge\\(\\) needs a float nn.Linear or Conv1D"):
        quantized.merge(gates)


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_inject_gpt2_conv1d_targets():
    model = _tiny_gpt2()
    ids = torch.randint(0, 50, (2, 6))
    before = model(ids).logits
    inject(model, MoLoRAConfig(target_modules=["c_attn", "c_proj"], num_experts=2, r=2))
    names = sorted(n for n, m in model.named_modules() if isinstance(m, MoLoRALinear))
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]
    torch.testing.assert_close(model(ids).logits, before)  # B = 0: unchanged
    uninject(model)
    all_linear = inject(_tiny_gpt2(), MoLoRAConfig(target_modules="all-linear", num_experts=2, r=2))
    wrapped = {n for n, m in all_linear.named_modules() if isinstance(m, MoLoRALinear)}
    assert "transformer.h.0.mlp.c_fc" in wrapped and "lm_head" not in wrapped


class _Quantized(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.q_proj = make()
        self.v_proj = make()
        self.embed = nn.Embedding(5, D_IN)


@pytest.mark.parametrize("kind", ["torchao_int8", "bnb4", "bnb8"])
def test_inject_finds_quantized_targets(kind):
    model = _Quantized(BASES[kind])
    inject(model, MoLoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=2, r=2, init_lora_weights=False))
    assert isinstance(model.q_proj, MoLoRALinear) and isinstance(model.v_proj, MoLoRALinear)
    x = torch.randn(3, D_IN)
    model.q_proj(x).sum().backward()
    assert model.q_proj.lora_A.weight.grad is not None


def test_inject_names_the_unsupported_type():
    model = _Quantized(_float_linear)
    with pytest.raises(TypeError, match="'embed' is a torch.nn.modules.sparse.Embedding"):
        inject(model, MoLoRAConfig(target_modules=["q_proj", "embed"], num_experts=2, r=2))
    with pytest.raises(TypeError, match="base_layer must be .* got Embedding"):
        MoLoRALinear(model.embed, 2, 2)


def test_non_fused_base_dropout_only_on_the_experts_input():
    layer = MoLoRALinear(_conv1d(), 3, 2, lora_dropout=0.5, router="dense", init_lora_weights=False).train()
    x = torch.randn(6, D_IN)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    route = layer.router(x)
    x_drop = layer.lora_dropout(x)
    assert not torch.equal(x_drop, x)
    ref = layer.base_layer(x).double() + molora_delta_ref(
        x_drop.double(), layer.lora_A.weight.double(), layer.lora_B.weight.double(),
        route.expert_indices, route.expert_weights.double(), layer.scaling)
    assert rel_error(y, ref) <= bound(torch.float32, 0.0)


def test_non_fused_base_under_autocast():
    layer = MoLoRALinear(_conv1d(), 3, 2, router="dense", init_lora_weights=False).eval()
    x = torch.randn(2, 5, D_IN)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and rel_error(y, expected) < 2e-2


def test_conv1d_layer_compiles_with_inductor():
    layer = MoLoRALinear(_conv1d(), 4, 3, router={"type": "topk", "k": 2}, init_lora_weights=False).eval()
    x = torch.randn(2, 5, D_IN)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))
