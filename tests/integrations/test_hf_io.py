"""transformers save_pretrained / from_pretrained on injected models: the base under its
original keys (the plain class loads it with nothing missing), moelora's part beside it, and
`moelora.from_pretrained` restoring identical logits; sharded and single-file, tiny models built
from configs (no downloads)."""
import copy
import os

import pytest
import torch

import moelora
from moelora.integrations import MoLoRAConfig, inject, load_adapters_as_experts, merge_layers, set_gates, uninject
from moelora.integrations.checkpoint import MOELORA_ADAPTER_FILE
from moelora.layers import molora_layers

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

IDS = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))


def _tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _injected(**overrides):
    model = _tiny_llama()
    config = dict(num_experts=3, r=4, router="topk", top_k=2, init_lora_weights=False,
                  target_modules=["q_proj", "v_proj", "down_proj"])
    config.update(overrides)
    inject(model, MoLoRAConfig(**config))
    with torch.no_grad():  # a router that is not at its init, so a lost router shows
        for _, layer in molora_layers(model):
            if hasattr(layer.router, "weight"):
                layer.router.weight.normal_()
    return model


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
def test_save_pretrained_round_trips_and_plain_class_loads_the_base(tmp_path, shard):
    model = _injected()
    # one expert frozen (as HoE / imported experts): the reload must keep it frozen
    model.model.layers[0].self_attn.q_proj.lora_A.weight.requires_grad_(False)
    expected = _logits(model)
    kwargs = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(tmp_path, **kwargs)
    files = os.listdir(tmp_path)
    assert MOELORA_ADAPTER_FILE in files
    assert ("model.safetensors.index.json" in files) == (shard is not None)

    # the plain class: every base weight under its original key, nothing missing, nothing extra
    plain, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    base = copy.deepcopy(model)
    uninject(base)
    for key, value in base.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(_logits(plain), _logits(base), rtol=0, atol=0)

    # one call restores the injected model
    restored = moelora.from_pretrained(tmp_path, transformers.LlamaForCausalLM)
    assert [n for n, _ in molora_layers(restored)] == [n for n, _ in molora_layers(model)]
    torch.testing.assert_close(_logits(restored), expected, rtol=0, atol=0)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert {n: p.requires_grad for n, p in restored.named_parameters()} == flags
    # restored with the Auto class too, and saved again from the restored model
    again = moelora.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(again), expected, rtol=0, atol=0)


def test_imported_experts_keep_their_dtype_and_gates_round_trip(tmp_path):
    """fp64 experts on an fp32 base (load_adapters_as_experts keeps the adapters' dtype): the
    reload builds them in fp64 again, so the logits are identical."""
    model = _tiny_llama()
    torch.manual_seed(1)
    adapters = []
    for _ in range(2):
        sd = {}
        for i in range(2):
            sd[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"] = torch.randn(2, 32, dtype=torch.float64)
            sd[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"] = torch.randn(32, 2, dtype=torch.float64)
        adapters.append((sd, {"lora_alpha": 4, "r": 2}))
    load_adapters_as_experts(model, adapters, gates=[0.25, 0.75])
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    restored = moelora.from_pretrained(tmp_path, transformers.LlamaForCausalLM)
    layer = restored.model.layers[0].self_attn.q_proj
    assert layer.lora_A.weight.dtype == torch.float64
    torch.testing.assert_close(_logits(restored), expected, rtol=0, atol=0)
    gates = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    set_gates(model, gates), set_gates(restored, gates)
    torch.testing.assert_close(_logits(restored), _logits(model), rtol=0, atol=0)


def test_trainer_style_state_dict_argument_is_renamed_too(tmp_path):
    """Trainer passes state_dict= (gathered from FSDP / DeepSpeed): it is the one saved."""
    model = _injected()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = "model.layers.1.self_attn.v_proj.lora_B.weight"
    state[key] = state[key] + 1.0  # differs from the live model: the saved one must be this
    model.save_pretrained(tmp_path, state_dict=state)
    restored = moelora.from_pretrained(tmp_path, transformers.LlamaForCausalLM)
    torch.testing.assert_close(restored.state_dict()[key], state[key], rtol=0, atol=0)


def test_merged_layers_are_refused(tmp_path):
    model = _injected(router="fixed")
    merge_layers(model)
    with pytest.raises(ValueError, match="merged"):
        model.save_pretrained(tmp_path)


def test_after_uninject_it_saves_the_plain_model_and_drops_a_stale_adapter_file(tmp_path):
    model = _injected()
    model.save_pretrained(tmp_path)
    uninject(model)
    model.save_pretrained(tmp_path)
    assert MOELORA_ADAPTER_FILE not in os.listdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=MOELORA_ADAPTER_FILE):
        moelora.from_pretrained(tmp_path, transformers.LlamaForCausalLM)
    plain, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_deepcopy_of_an_injected_model_saves_its_own_weights(tmp_path):
    model = _injected()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[0].self_attn.q_proj.lora_B.weight.add_(1.0)
    twin.save_pretrained(tmp_path)
    restored = moelora.from_pretrained(tmp_path, transformers.LlamaForCausalLM)
    torch.testing.assert_close(_logits(restored), _logits(twin), rtol=0, atol=0)
    assert not torch.equal(_logits(restored), _logits(model))
