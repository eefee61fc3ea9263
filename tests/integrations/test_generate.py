"""`moelora.generate`: per-sequence gates / preferences expanded with num_beams and
num_return_sequences give the sequences each row gets alone (tiny model, no downloads)."""
import pytest
import torch

import moelora
from moelora.integrations import MoLoRAConfig, inject

transformers = pytest.importorskip("transformers")

IDS = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(7))


def _model(router, num_experts):
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    torch.manual_seed(1)
    inject(model, MoLoRAConfig(num_experts=num_experts, r=4, lora_alpha=32, router=router,
                               init_lora_weights=False, target_modules=["q_proj", "v_proj", "up_proj"]))
    return model


GEN = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4)


def _alone(model, what, rows, **kwargs):
    outs = []
    for b in range(IDS.shape[0]):
        with moelora.routing_inputs(model, **{what: rows[b]}):
            outs.append(model.generate(IDS[b:b + 1], attention_mask=torch.ones_like(IDS[b:b + 1]), **GEN, **kwargs))
    return torch.cat(outs)


@pytest.mark.parametrize("kwargs", [dict(num_beams=2, num_return_sequences=2), dict(num_beams=3),
                                    dict()], ids=["beams2-return2", "beams3", "greedy"])
def test_per_sequence_gates_follow_the_expansion(kwargs):
    model = _model("fixed", 3)
    gates = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.2, 0.8]])
    mask = torch.ones_like(IDS)
    got = moelora.generate(model, IDS, attention_mask=mask, gates=gates, **GEN, **kwargs)
    assert got.shape[0] == IDS.shape[0] * kwargs.get("num_return_sequences", 1)
    expected = _alone(model, "gates", gates, **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # the two rows' gates do differ in what they generate, so a swap of rows would show
    swapped = _alone(model, "gates", gates.flip(0), **kwargs)
    assert not torch.equal(got, swapped)
    assert all(layer.router.gates is None for _, layer in moelora.layers.molora_layers(model))


def test_plain_generate_refuses_unexpanded_gates():
    """What moelora.generate fixes: transformers' expansion leaves [batch, E] gates behind."""
    model = _model("fixed", 3)
    with moelora.routing_inputs(model, gates=torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.2, 0.8]])):
        with pytest.raises(ValueError, match="rows"):
            model.generate(IDS, attention_mask=torch.ones_like(IDS), num_beams=2, **GEN)


def test_per_sequence_preference_with_beams_and_returned_sequences():
    model = _model({"type": "hierarchical"}, 2)
    preference = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    kwargs = dict(num_beams=2, num_return_sequences=2)
    got = moelora.generate(model, IDS, attention_mask=torch.ones_like(IDS), preference=preference, **GEN, **kwargs)
    expected = _alone(model, "preference", preference, **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_bad_arguments():
    model = _model("fixed", 3)
    with pytest.raises(ValueError, match="3 rows, but the input batch has 2"):
        moelora.generate(model, IDS, gates=torch.ones(3, 3) / 3, **GEN)
    with pytest.raises(ValueError, match="no MoLoRALinear with a hierarchical"):
        moelora.generate(model, IDS, preference=torch.tensor([0.5, 0.5]), **GEN)
