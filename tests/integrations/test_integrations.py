"""inject / PEFT adapters as experts / safetensors round trip / DDP, on tiny models built from
configs (no downloads)."""
import copy
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.nn as nn

from moelora.integrations import (
    MoLoRAConfig,
    find_targets,
    inject,
    load_adapters_as_experts,
    load_moelora,
    save_moelora,
    uninject,
)
from moelora.integrations import set_gates
from moelora.layers import molora_layers
from moelora.methods.pmol import PMoLConfig
from moelora.losses.pmol import aux_loss

from helpers import bound, rel_error


def _tiny_llama(dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("config", [
    MoLoRAConfig(num_experts=3, r=4, router="topk", top_k=2, empty_expert=True),
    MoLoRAConfig(num_experts=2, r=2, router="dense", target_modules="all-linear"),
    PMoLConfig(num_preferences=2, experts_per_preference=2, r=4),
], ids=["topk", "dense-all-linear", "pmol"])
def test_inject_keeps_logits_and_trains_only_experts_and_routers(config):
    model = _tiny_llama()
    before = _logits(model, IDS)
    inject(model, config)
    names = [n for n, _ in molora_layers(model)]
    if config.target_modules == "all-linear":
        assert len(names) == 14 and "lm_head" not in names
    else:
        assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    torch.testing.assert_close(_logits(model, IDS), before, rtol=0, atol=0)
    model.train()
    out = model(input_ids=IDS, labels=IDS)
    (out.loss + aux_loss(model)["total"]).backward()
    for name, p in model.named_parameters():
        trainable = ("lora_" in name or ".router." in name) and "base_layer" not in name
        assert p.requires_grad == trainable, name
        assert (p.grad is not None) == trainable, name
    uninject(model)
    assert not list(molora_layers(model)) and all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(_logits(model.eval(), IDS), before, rtol=0, atol=0)


def test_target_matching_rules():
    model = _tiny_llama()
    assert find_targets(model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert find_targets(model, r"model\.layers\.1\.mlp\.(up|down)_proj") == [
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert find_targets(model, ["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.v_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject(model, MoLoRAConfig(target_modules=["nope"]))


def test_second_inject_keeps_the_first_layers_flags():
    model = inject(_Small(), MoLoRAConfig(target_modules=["q_proj"], num_experts=2, r=2))
    model.q_proj.lora_A.weight.requires_grad_(False)  # e.g. frozen imported / HoE experts
    inject(model, MoLoRAConfig(target_modules=["v_proj"], num_experts=2, r=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj.lora_B.weight", "q_proj.router.weight", "v_proj.lora_A.weight",
                         "v_proj.lora_B.weight", "v_proj.router.weight"}
    uninject(model)
    assert all(p.requires_grad for p in model.parameters())


def _peft_adapter(base, path, seed, **lora_kwargs):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, **lora_kwargs)
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    model.save_pretrained(path)
    return model


def test_peft_adapter_as_single_expert_reproduces_peft(tmp_path):
    base = _tiny_llama()
    peft_model = _peft_adapter(base, tmp_path / "a", 3, r=4, lora_alpha=8)
    expected = _logits(peft_model, IDS)
    assert not torch.allclose(expected, _logits(base, IDS))
    model = load_adapters_as_experts(copy.deepcopy(base), [str(tmp_path / "a")]).eval()
    layer = dict(molora_layers(model))["model.layers.0.self_attn.q_proj"]
    assert layer.num_experts == 1 and layer.scaling == 2.0 and layer.router.kind == "fixed"
    torch.testing.assert_close(_logits(model, IDS), expected, rtol=1e-5, atol=1e-5)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set()  # fixed gates, frozen experts


def test_peft_adapter_bf16_within_dtype_tolerance(tmp_path):
    base = _tiny_llama()
    peft_fp32 = _peft_adapter(base, tmp_path / "a", 4, r=4, lora_alpha=16)
    reference = _logits(peft_fp32, IDS)
    peft_bf16 = _logits(peft_fp32.to(torch.bfloat16), IDS)  # PEFT's own error at bf16
    model = load_adapters_as_experts(copy.deepcopy(base).to(torch.bfloat16), [str(tmp_path / "a")])
    ours = _logits(model, IDS)
    assert ours.dtype == torch.bfloat16
    assert rel_error(ours, reference) <= bound(torch.bfloat16, rel_error(peft_bf16, reference))


def test_two_adapters_as_gated_experts(tmp_path):
    peft = pytest.importorskip("peft")
    base = _tiny_llama()
    first = _peft_adapter(base, tmp_path / "a", 5, r=4, lora_alpha=8)
    second = _peft_adapter(base, tmp_path / "b", 6, r=2, lora_alpha=4, use_rslora=True)  # other r and s
    expected = [_logits(first, IDS), _logits(second, IDS)]
    model = load_adapters_as_experts(copy.deepcopy(base), [str(tmp_path / "a"), str(tmp_path / "b")]).eval()
    set_gates(model, torch.eye(2))  # sequence 0 -> adapter a, sequence 1 -> adapter b
    got = _logits(model, IDS)
    torch.testing.assert_close(got[0], expected[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1][1], rtol=1e-5, atol=1e-5)
    # the same from a PeftModel holding both adapters
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"), adapter_name="a")
    pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    model2 = load_adapters_as_experts(pm).eval()
    assert not any("lora_A.a" in n for n, _ in model2.named_parameters())
    set_gates(model2, torch.eye(2))
    torch.testing.assert_close(_logits(model2, IDS), got, rtol=1e-6, atol=1e-6)


def test_rank_and_alpha_patterns(tmp_path):
    base = _tiny_llama()
    peft_model = _peft_adapter(base, tmp_path / "p", 8, r=4, lora_alpha=8, rank_pattern={"v_proj": 2},
                               alpha_pattern={"v_proj": 16})
    model = load_adapters_as_experts(copy.deepcopy(base), [str(tmp_path / "p")])
    layers = dict(molora_layers(model))
    assert layers["model.layers.1.self_attn.v_proj"].r == 2 and layers["model.layers.1.self_attn.v_proj"].scaling == 8.0
    assert layers["model.layers.1.self_attn.q_proj"].r == 4 and layers["model.layers.1.self_attn.q_proj"].scaling == 2.0
    torch.testing.assert_close(_logits(model, IDS), _logits(peft_model, IDS), rtol=1e-5, atol=1e-5)


def test_unsupported_adapters_are_refused(tmp_path):
    base = _tiny_llama()
    _peft_adapter(base, tmp_path / "dora", 7, r=2, use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        load_adapters_as_experts(copy.deepcopy(base), [str(tmp_path / "dora")])
    sd = dict(_lora_sd())
    sd["base_model.model.lm_head.weight"] = torch.zeros(97, 32)  # e.g. modules_to_save
    with pytest.raises(ValueError, match="cannot turn into experts"):
        load_adapters_as_experts(copy.deepcopy(base), [(sd, {"lora_alpha": 4})])
    with pytest.warns(UserWarning, match="cannot turn into experts"):
        model = load_adapters_as_experts(copy.deepcopy(base), [(sd, {"lora_alpha": 4})], strict=False)
    assert [n for n, _ in molora_layers(model)] == ["model.layers.0.mlp.up_proj"]


def test_save_load_round_trip(tmp_path):
    safe_open = pytest.importorskip("safetensors").safe_open

    base = _tiny_llama()
    config = PMoLConfig(num_preferences=2, experts_per_preference=2, r=4, init_lora_weights=False,
                        router_bias=True)
    model = inject(copy.deepcopy(base), config).eval()
    expected = _logits(model, IDS)
    file = save_moelora(model, tmp_path / "ckpt")
    assert os.path.basename(file) == "moelora_adapter.safetensors"
    with safe_open(file, framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.lora_A.weight").shape == (4, 4, 32)
        assert f.get_tensor("model.layers.0.self_attn.v_proj.lora_B.weight").shape == (4, 16, 4)
        assert f.get_tensor("model.layers.1.self_attn.v_proj.router.weight").shape == (5, 32)
    assert not any("base_layer" in k for k in keys)
    fresh = load_moelora(copy.deepcopy(base), tmp_path / "ckpt").eval()
    layer = dict(molora_layers(fresh))["model.layers.1.self_attn.q_proj"]
    assert layer.expert_groups == [0, 0, 1, 1] and layer.router.empty_expert
    torch.testing.assert_close(_logits(fresh, IDS), expected, rtol=0, atol=0)
    # into a model that already has the layers (e.g. re-initialised)
    again = inject(copy.deepcopy(base), config)
    load_moelora(again, file)
    torch.testing.assert_close(_logits(again.eval(), IDS), expected, rtol=0, atol=0)
    # fixed-gate routers keep their default gates
    gated = load_adapters_as_experts(copy.deepcopy(base), [({k: v for k, v in _lora_sd().items()}, {"lora_alpha": 4})],
                                     gates=[0.5])
    save_moelora(gated, tmp_path / "gated.safetensors")
    reloaded = load_moelora(copy.deepcopy(base), tmp_path / "gated.safetensors")
    torch.testing.assert_close(_logits(reloaded, IDS), _logits(gated, IDS), rtol=0, atol=0)


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(10, 10)
        self.v_proj = nn.Linear(10, 6)

    def forward(self, x):
        return self.v_proj(torch.relu(self.q_proj(x)))


@pytest.mark.parametrize("router", ["dense", {"type": "fixed", "k": 2}, {"type": "topk", "k": 1, "noisy": True},
                                    "hoe"], ids=["dense", "fixed-k", "noisy-topk", "hoe"])
def test_save_load_round_trip_every_router(tmp_path, router):
    pytest.importorskip("safetensors")
    from moelora.integrations import set_preference
    from moelora.methods.hoe import HoEConfig, build_hoe

    base = _Small()
    x = torch.randn(2, 3, 10)
    if router == "hoe":  # non-identity anchors, random routers, top-1: config + buffers must survive
        tuned = [copy.deepcopy(base) for _ in range(2)]
        for t in tuned:
            with torch.no_grad():
                for p in t.parameters():
                    p.add_(0.3 * torch.randn_like(p))
        model = build_hoe(copy.deepcopy(base), tuned, HoEConfig(r=4, anchors=[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]],
                                                                router_init="random", top_k=1))
    else:
        model = inject(copy.deepcopy(base), MoLoRAConfig(num_experts=3, r=2, router=router, init_lora_weights=False))
        if isinstance(router, dict) and router["type"] == "fixed":
            set_gates(model, None)
            for _, layer in molora_layers(model):
                layer.router.default_gates.copy_(torch.tensor([0.5, 0.125, 0.375]))
    model.eval()
    lam = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    if router == "hoe":
        set_preference(model, lam)
    expected = model(x)
    save_moelora(model, tmp_path)
    fresh = load_moelora(copy.deepcopy(base), tmp_path).eval()
    if router == "hoe":
        set_preference(fresh, lam)  # the preference is per request, not saved
    assert [n for n, _ in molora_layers(fresh)] == ["q_proj", "v_proj"]
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    # what trained before the save trains after the load, and nothing else (HoE: routers only)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == trainable
    fixed_gates = isinstance(router, dict) and router["type"] == "fixed"  # no router parameters
    assert fixed_gates != any("router" in n for n in trainable)
    assert (router == "hoe") != any("lora_" in n for n in trainable)


def test_load_restores_frozen_parameters(tmp_path):
    pytest.importorskip("safetensors")
    model = inject(_Small(), MoLoRAConfig(num_experts=2, r=2, router="topk"))
    model.q_proj.lora_B.weight.requires_grad_(False)  # e.g. a partly frozen fine-tune
    save_moelora(model, tmp_path)
    # into a model whose layers exist and are all trainable: the saved flags win
    target = inject(_Small(), MoLoRAConfig(num_experts=2, r=2, router="topk"))
    load_moelora(target, tmp_path)
    assert not target.q_proj.lora_B.weight.requires_grad
    assert target.q_proj.lora_A.weight.requires_grad and target.v_proj.lora_B.weight.requires_grad
    assert target.q_proj.router.weight.requires_grad
    assert not target.q_proj.base_layer.weight.requires_grad


def _lora_sd():
    g = torch.Generator().manual_seed(0)
    return {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.randn(2, 32, generator=g),
            "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.randn(48, 2, generator=g)}


def _functions_defined_in(package_dir, classes):
    """(class, attribute) pairs whose function's code lives under package_dir (catches patches,
    also functools.wraps wrappers, which copy __module__ but not __code__)."""
    found = []
    for cls in classes:
        for attr, value in vars(cls).items():
            for fn in (value, getattr(value, "__func__", None), getattr(value, "fget", None)):
                code = getattr(fn, "__code__", None)
                if code is not None and os.path.abspath(code.co_filename).startswith(package_dir):
                    found.append(f"{cls.__module__}.{cls.__qualname__}.{attr}")
    return found


def test_nothing_patched_on_import():
    import importlib
    import inspect

    import moelora

    forward = nn.Linear.forward
    for module in ("moelora", "moelora.layers", "moelora.integrations", "moelora.losses.pmol"):
        importlib.reload(importlib.import_module(module))
    assert nn.Linear.forward is forward
    # no torch.nn / transformers class carries a function written in moelora (imports are done:
    # anything patched at import time would show here)
    package_dir = os.path.dirname(os.path.abspath(moelora.__file__))
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    classes = {cls for module in (nn, nn.modules.linear, nn.modules.module, modeling_llama)
               for _, cls in inspect.getmembers(module, inspect.isclass)}
    assert _functions_defined_in(package_dir, classes) == []
    assert _functions_defined_in(package_dir, [torch.Tensor]) == []


# --------------------------------------------------------------------------------------------
# DDP: two CPU processes (gloo, localhost); replicas must end with identical gradients equal
# to the mean of the per-rank gradients.
# --------------------------------------------------------------------------------------------
DDP_TIMEOUT_S = 90


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.q_proj(x)) + self.v_proj(x))


def _ddp_model():
    torch.manual_seed(0)
    config = PMoLConfig(num_preferences=2, experts_per_preference=2, r=4, init_lora_weights=False)
    return inject(_Net(), config).train()


def _ddp_batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(3, 5, 16, generator=g), torch.tensor([0, 1, -1])


def _ddp_step(model, rank, module=None):
    x, labels = _ddp_batch(rank)
    loss = model(x).square().mean() + aux_loss(module or model, labels)["total"]
    loss.backward()


def _moslim_head():
    from moelora.methods.moslim import MultiObjectiveRewardHead

    torch.manual_seed(0)
    return MultiObjectiveRewardHead(16, [3, 2, 4])


def _moslim_batch(rank):
    g = torch.Generator().manual_seed(200 + rank)
    targets = torch.stack([torch.randint(0, c, (4 + rank,), generator=g) for c in (3, 2, 4)], -1)
    return torch.randn(4 + rank, 16, generator=g), targets, torch.rand(4 + rank, 3, generator=g) > 0.3


def _ddp_worker(rank, world_size, port, out_dir):
    import datetime
    import faulthandler

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    faulthandler.dump_traceback_later(DDP_TIMEOUT_S, exit=True)  # a hung worker fails, with a traceback
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=DDP_TIMEOUT_S))
    model = _ddp_model()
    ddp = DistributedDataParallel(model)
    _ddp_step(ddp, rank, module=model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    # MOSLIM's running reward statistics: each rank scores its own batch, all end with the same
    head = _moslim_head().train()
    hidden, targets, mask = _moslim_batch(rank)
    head.reward(head(hidden), targets, mask)
    grads["moslim"] = torch.stack([head.running_mean, head.running_var, head.num_samples])
    torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    # Tear down in order: both ranks done, then the DDP reducer, then the process group.
    # (Letting the reducer die after destroy_process_group hung ~1 run in 10.)
    dist.barrier()
    del ddp
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gradients_agree():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.spawn(_ddp_worker, args=(2, _free_port(), out_dir), nprocs=2, join=False)
        deadline = time.monotonic() + DDP_TIMEOUT_S + 30
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail("DDP workers did not finish in time")
        grads = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    stats = [g.pop("moslim") for g in grads]
    assert torch.equal(stats[0], stats[1])  # the replicas agree on the reward normalisation ...
    head = _moslim_head().train()  # ... and it is the statistics of both ranks' scores
    batches = [_moslim_batch(rank) for rank in range(2)]
    head.reward(head(torch.cat([b[0] for b in batches])), torch.cat([b[1] for b in batches]),
                torch.cat([b[2] for b in batches]))
    torch.testing.assert_close(stats[0], torch.stack([head.running_mean, head.running_var, head.num_samples]))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 6
    local = []
    for rank in range(2):
        model = _ddp_model()
        _ddp_step(model, rank)
        local.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
        torch.testing.assert_close(grads[0][name], (local[0][name] + local[1][name]) / 2, rtol=1e-5, atol=1e-6)


def test_imported_frozen_experts_leave_earlier_layers_trainable():
    """load_adapters_as_experts(trainable_experts=False) freezes the experts it builds, not
    those of every MoLoRALinear already in the model."""
    model = inject(_Small(), MoLoRAConfig(target_modules=["q_proj"], num_experts=2, r=2))
    adapter = {"base_model.model.v_proj.lora_A.weight": torch.randn(2, 10),
               "base_model.model.v_proj.lora_B.weight": torch.randn(6, 2)}
    load_adapters_as_experts(model, [adapter], scaling=1.0, trainable_experts=False)
    assert model.q_proj.lora_A.weight.requires_grad and model.q_proj.lora_B.weight.requires_grad
    assert not model.v_proj.lora_A.weight.requires_grad and not model.v_proj.lora_B.weight.requires_grad
