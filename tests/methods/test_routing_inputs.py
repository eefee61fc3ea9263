"""Per-call routing inputs (issue 15, item 4): gates and preferences scoped to a block by
`moelora.routing_inputs`, never module state: threads serve their own preference at the same
time, a forgotten input raises or falls back to the router's own default (never the last
batch's), and activation checkpointing replays them (so MoELoRADPOModel trains checkpointed,
with the same gradients)."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as checkpoint

import moelora
from moelora.integrations import MoLoRAConfig, inject, routing_checkpoint_context, routing_inputs
from moelora.integrations import set_gates, set_preference
from moelora.layers import MoLoRALinear, molora_layers
from moelora.methods.moe_dpo import MoELoRADPOModel, SequenceGate

D, E = 8, 3
HOE = {"type": "hierarchical", "init": "random"}  # random router experts: pi matters per token


class _Blocks(nn.Module):
    """Two residual MoLoRA blocks, optionally checkpointed like a transformers layer stack."""

    def __init__(self, router, checkpoint_kwargs=None):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            MoLoRALinear(nn.Linear(D, D, dtype=torch.float64), E, r=2, router=router, init_lora_weights=False)
            for _ in range(2))
        self.checkpoint_kwargs = checkpoint_kwargs

    def forward(self, x):
        for block in self.blocks:
            if self.checkpoint_kwargs is not None and torch.is_grad_enabled():
                x = x + checkpoint.checkpoint(block, x, **self.checkpoint_kwargs)
            else:
                x = x + block(x)
        return x.tanh()


def _x(batch=2, seq=5):
    return torch.randn(batch, seq, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _per_sequence(model, x, **inputs):
    """What each sequence gets when served alone, through the layer's own forward argument."""
    key, value = next(iter(inputs.items()))
    rows = []
    for b in range(x.shape[0]):
        h = x[b:b + 1]
        for layer in model.blocks:
            h = h + layer(h, **{key: value[b]})
        rows.append(h.tanh())
    return torch.cat(rows)


@pytest.mark.parametrize("key, router", [("preference", HOE), ("gates", "fixed")])
def test_scope_routes_each_sequence_and_ends_with_the_block(key, router):
    model = _Blocks(router)
    x = _x()
    value = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.3, 0.7]], dtype=torch.float64)
    default = model(x)  # uniform mixing / the default gates
    with routing_inputs(model, **{key: value}):
        routed = model(x)
    torch.testing.assert_close(routed, _per_sequence(model, x, **{key: value}), rtol=1e-12, atol=1e-12)
    assert (routed - default).abs().max() > 1e-3
    # the block is over: the next forward does not reuse its input
    torch.testing.assert_close(model(x), default, rtol=0, atol=0)


def test_threads_serve_two_preferences_at_once():
    model = _Blocks(HOE).eval()
    x = _x()
    prefs = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.1, 0.2, 0.7])]
    with torch.no_grad():
        expected = []
        for lam in prefs:  # sequential runs
            with routing_inputs(model, preference=lam):
                expected.append(model(x))
    assert (expected[0] - expected[1]).abs().max() > 1e-3
    both_open = threading.Barrier(2)
    results, errors = {}, []

    def serve(i):
        try:
            with torch.no_grad(), routing_inputs(model, preference=prefs[i]):
                both_open.wait(timeout=30)  # both scopes are open before either forward runs
                outs = [model(x) for _ in range(5)]
                both_open.wait(timeout=30)
            results[i] = outs
        except Exception as error:  # noqa: BLE001 -- re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        for out in results[i]:
            torch.testing.assert_close(out, expected[i], rtol=0, atol=0)


def test_nested_scopes_and_forward_argument_win():
    model = _Blocks(HOE)
    x = _x()
    outer, inner = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    with routing_inputs(model, preference=inner):
        want_inner = model(x)
    with routing_inputs(model, preference=outer):
        want_outer = model(x)
        with routing_inputs(model, preference=inner):
            torch.testing.assert_close(model(x), want_inner, rtol=0, atol=0)
        torch.testing.assert_close(model(x), want_outer, rtol=0, atol=0)
        layer = model.blocks[0]
        with routing_inputs(layer, preference=outer):  # the layer's own argument still wins
            torch.testing.assert_close(layer(x, preference=inner), layer(x, preference=inner.clone()))
            assert (layer(x, preference=inner) - layer(x)).abs().max() > 1e-3


def test_forgotten_or_misdirected_inputs_raise():
    required = _Blocks({"type": "fixed", "k": 1, "require_input": True})
    x = _x()
    with pytest.raises(ValueError, match="got no gates"):
        required(x)
    with routing_inputs(required, gates=torch.eye(E)[[2, 0]]):
        required(x)
    with pytest.raises(ValueError, match="got no gates"):  # the scope is over
        required(x)
    hoe = _Blocks(dict(HOE, require_input=True))
    with pytest.raises(ValueError, match="got no preference"):
        hoe(x)
    # require_input survives the layer config (checkpoints rebuild routers from it)
    assert hoe.blocks[0].layer_config()["router"]["require_input"] is True

    topk = _Blocks({"type": "topk", "k": 1})
    with pytest.raises(ValueError, match="gates= given.*fixed-gate"):
        with routing_inputs(topk, gates=torch.ones(E)):
            pass
    with pytest.raises(ValueError, match="preference= given.*hierarchical"):
        with routing_inputs(topk, preference=torch.ones(E)):
            pass
    with pytest.raises(ValueError, match="gates= given"):
        set_gates(topk, torch.ones(E))
    with pytest.raises(ValueError, match="preference= given"):
        set_preference(topk, torch.ones(E))
    with pytest.raises(ValueError, match="gates= and/or preference="):
        with routing_inputs(required):
            pass
    with pytest.raises(ValueError, match=r"gates must be \[3\] or \[batch, 3\]"):  # checked on entry
        with routing_inputs(required, gates=torch.ones(4)):
            pass
    with pytest.raises(ValueError, match="preference"):
        with routing_inputs(hoe, preference=torch.tensor([1.0, -1.0, 0.0])):
            pass


def test_deprecated_setters_warn_and_still_work():
    model = _Blocks(HOE)
    x = _x()
    lam = torch.tensor([0.2, 0.3, 0.5])
    with routing_inputs(model, preference=lam):
        want = model(x)
    with pytest.warns(DeprecationWarning, match="routing_inputs"):
        set_preference(model, lam)
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    with routing_inputs(model, preference=torch.tensor([1.0, 0.0, 0.0])):  # a scope wins
        assert (model(x) - want).abs().max() > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_preference(model, None)  # going back to the default is not deprecated


def _grads(model, x, **inputs):
    model.zero_grad()
    with routing_inputs(model, **inputs):
        loss = model(x).square().sum()
    loss.backward()  # outside the block: checkpointing recomputes here
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("key, router", [("preference", HOE), ("gates", "fixed")])
def test_checkpoint_recomputation_replays_the_inputs(key, router):
    value = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.3, 0.7]], dtype=torch.float64)
    x = _x()
    plain = _Blocks(router)
    want_loss, want = _grads(plain, x, **{key: value})
    assert any(n.startswith("blocks.0.router.") for n in want) == (key == "preference")
    replayed = _Blocks(router, {"use_reentrant": False, "context_fn": routing_checkpoint_context})
    replayed.load_state_dict(plain.state_dict())
    loss, got = _grads(replayed, x, **{key: value})
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12, msg=name)
    # without the replay the recomputation would route with whatever is open in backward
    # (here nothing, i.e. the defaults): it raises instead, for both kinds of checkpointing
    for kwargs in ({"use_reentrant": False}, {"use_reentrant": True}):
        model = _Blocks(router, kwargs)
        model.load_state_dict(plain.state_dict())
        with pytest.raises(RuntimeError, match="recomputed in backward"):
            _grads(model, x.clone().requires_grad_(), **{key: value})


transformers = pytest.importorskip("transformers")
V, K = 48, 2


def _tiny_llama():
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    inject(model, MoLoRAConfig(target_modules=["q_proj", "v_proj", "down_proj"], num_experts=K, r=2,
                               lora_alpha=4, router={"type": "fixed", "k": 1}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in molora_layers(model):  # distinct experts
            layer.lora_B.weight.copy_(0.05 * torch.randn(layer.lora_B.weight.shape, generator=gen))
    return model


def _pairs(B=2, prompt=3, length=6):
    gen = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, V, (B, prompt), generator=gen)
    sides = []
    for _ in range(2):
        ids = torch.cat([prompts, torch.randint(0, V, (B, length - prompt), generator=gen)], 1)
        labels = ids.clone()
        labels[:, :prompt] = -100
        sides += [ids, torch.ones_like(ids), labels]
    return sides


def _dpo_grads(checkpoint_kwargs):
    model = _tiny_llama()
    if checkpoint_kwargs is not None:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
    gate = SequenceGate(16, K)
    torch.nn.init.normal_(gate.proj.weight, generator=torch.Generator().manual_seed(4))
    policy = MoELoRADPOModel.from_causal_lm(model, gate).train()
    out = policy(*_pairs())
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}


def test_moe_lora_dpo_trains_checkpointed_with_the_same_gradients():
    want_loss, want = _dpo_grads(None)
    assert any(".lora_A." in n for n in want) and any(n.startswith("gate.") for n in want)
    loss, got = _dpo_grads({"use_reentrant": False, "context_fn": moelora.routing_checkpoint_context})
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
    with pytest.raises(RuntimeError, match="context_fn=moelora.routing_checkpoint_context"):
        _dpo_grads({"use_reentrant": False})  # checkpointed without the replay: refused, not wrong


def test_scope_opened_inside_a_checkpointed_function_is_replayed_too():
    torch.manual_seed(0)
    layer = MoLoRALinear(nn.Linear(D, D, dtype=torch.float64), E, r=2, router=HOE, init_lora_weights=False)
    x = _x().requires_grad_()
    lam = torch.tensor([0.1, 0.6, 0.3])

    def fn(h):  # the recomputation opens this scope again, inside the replayed one
        with routing_inputs(layer, preference=lam):
            return layer(h)

    fn(x).square().sum().backward()
    want = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    checkpoint.checkpoint(fn, x, use_reentrant=False, context_fn=routing_checkpoint_context).square().sum().backward()
    for name, grad in want.items():
        torch.testing.assert_close(dict(layer.named_parameters())[name].grad, grad, rtol=1e-12, atol=1e-12)
