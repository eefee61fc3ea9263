"""Export to serving engines: soups (average_ab, delta_w) and single experts as PEFT adapter
folders, loaded by PEFT's own `PeftModel.from_pretrained` on the plain base model and compared
with moelora's logits. Tiny models from configs, adapters of different ranks, alphas and
targets (padding and scaling folding exercised)."""
import copy
import json
import os

import pytest
import torch

from moelora.integrations import MoLoRAConfig, inject, load_adapters_as_experts, set_gates
from moelora.integrations.export import export_expert, export_soup
from moelora.methods.soups import merge_adapters

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(5))
ATOL = 2e-5  # fp32: the PEFT graph and moelora's sum the same products in another order


def _tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two PEFT adapters: r=2 alpha=4 on q/v, r=4 alpha=2 with rsLoRA on q/o (v absent)."""
    specs = [dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
             dict(r=4, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "o_proj"])]
    folders = []
    for i, spec in enumerate(specs):
        torch.manual_seed(10 + i)
        model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(init_lora_weights=False, **spec))
        folder = tmp_path_factory.mktemp(f"adapter{i}")
        model.save_pretrained(folder)
        folders.append(str(folder))
    return folders


def _peft_logits(folder):
    model = peft.PeftModel.from_pretrained(_tiny_llama(), folder).eval()
    return _logits(model)


def _read_config(folder):
    with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
        return json.load(f)


def test_delta_w_soup_is_exact_at_rank_sum(adapters, tmp_path):
    w = [0.3, 0.7]
    served = load_adapters_as_experts(_tiny_llama(), adapters, gates=w)  # moelora's delta_w soup
    expected = _logits(served)
    folder = export_soup(adapters, tmp_path / "soup", w, mode="delta_w")
    assert _read_config(folder)["r"] == 2 + 4
    got = _peft_logits(folder)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    assert (got - _logits(_tiny_llama())).abs().max() > 1e-2  # the adapters do change the output
    # from the served model itself (its experts are the adapters): the same soup
    folder2 = export_soup(served, tmp_path / "soup2", w, mode="delta_w")
    torch.testing.assert_close(_peft_logits(folder2), expected, rtol=0, atol=ATOL)


def test_average_ab_soup_matches_merge_adapters_at_rank_r(adapters, tmp_path):
    w = [0.6, 0.4]
    merged = _tiny_llama()
    merge_adapters(adapters, w, mode="average_ab", model=merged)
    expected = _logits(merged)
    folder = export_soup(adapters, tmp_path / "soup", w, mode="average_ab")
    assert _read_config(folder)["r"] == 4
    torch.testing.assert_close(_peft_logits(folder), expected, rtol=0, atol=ATOL)
    # average_ab is not delta_w (cross terms): the test tells them apart
    delta = load_adapters_as_experts(_tiny_llama(), adapters, gates=w)
    assert (_logits(delta) - expected).abs().max() > 10 * ATOL
    folder2 = export_soup(load_adapters_as_experts(_tiny_llama(), adapters), tmp_path / "soup2", w)
    torch.testing.assert_close(_peft_logits(folder2), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("expert", [0, 2])
def test_single_expert_of_a_trained_mixture(tmp_path, expert):
    model = _tiny_llama()
    inject(model, MoLoRAConfig(num_experts=3, r=3, lora_alpha=5, router="fixed", init_lora_weights=False,
                               target_modules=["q_proj", "v_proj", "up_proj"]))
    gates = torch.zeros(3)
    gates[expert] = 1.0
    set_gates(model, gates)
    expected = _logits(model)
    folder = export_expert(model, expert, tmp_path / "expert")
    config = _read_config(folder)
    assert config["r"] == 3 and config["lora_alpha"] == pytest.approx(5.0)
    torch.testing.assert_close(_peft_logits(folder), expected, rtol=0, atol=ATOL)


def test_imported_adapter_exported_again_is_the_adapter(adapters, tmp_path):
    """Adapter 1 (r=4, rsLoRA) imported as expert 1 beside a rank-2 one, exported again: PEFT
    serves the same logits as the original adapter."""
    served = load_adapters_as_experts(_tiny_llama(), adapters)
    folder = export_expert(served, 1, tmp_path / "e1")
    torch.testing.assert_close(_peft_logits(folder), _peft_logits(adapters[1]), rtol=0, atol=ATOL)


def test_bad_arguments(adapters, tmp_path):
    model = load_adapters_as_experts(_tiny_llama(), adapters)
    with pytest.raises(ValueError, match="expert must be in"):
        export_expert(model, 2, tmp_path / "x")
    with pytest.raises(ValueError, match="mode must be one of"):
        export_soup(adapters, tmp_path / "x", mode="ties")
    with pytest.raises(ValueError, match="weights has 3 entries"):
        export_soup(adapters, tmp_path / "x", [0.2, 0.3, 0.5])
    with pytest.raises(TypeError, match="sequence of adapter sources"):
        export_soup(adapters[0], tmp_path / "x")
    with pytest.raises(ValueError, match="no MoLoRALinear"):
        export_expert(copy.deepcopy(_tiny_llama()), 0, tmp_path / "x")
