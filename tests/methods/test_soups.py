"""Personalized Soups: merge formulas, exact unmerge, per-request serving through gates."""
import copy

import pytest
import torch
import torch.nn as nn

from moelora.integrations import set_gates
from moelora.layers import molora_layers
from moelora.methods.soups import merge_adapters, serve_soups, soup_deltas

D_IN, D_OUT = 12, 8


class Tiny(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.q_proj = nn.Linear(D_IN, D_OUT, dtype=dtype)
        self.v_proj = nn.Linear(D_IN, D_IN, dtype=dtype)
        self.head = nn.Linear(D_OUT, 3, dtype=dtype)

    def forward(self, x):
        return self.head(self.q_proj(torch.relu(self.v_proj(x))))


def _adapter(r, modules=("q_proj", "v_proj"), dtype=torch.float32):
    sd = {}
    for name in modules:
        d_out = D_OUT if name == "q_proj" else D_IN
        sd[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, D_IN, dtype=dtype)
        sd[f"base_model.model.{name}.lora_B.weight"] = torch.randn(d_out, r, dtype=dtype)
    return sd


def _ab(sd, name):
    return sd[f"base_model.model.{name}.lora_A.weight"], sd[f"base_model.model.{name}.lora_B.weight"]


def test_formulas():
    adapters = [_adapter(4, dtype=torch.float64) for _ in range(3)]
    w = [0.5, 0.3, 0.2]
    s = 2.0
    configs = [(a, {"r": 4, "lora_alpha": 8}) for a in adapters]
    avg = soup_deltas(configs, w, "average_ab")
    exact = soup_deltas(configs, w, "delta_w")
    for name in ("q_proj", "v_proj"):
        A = [_ab(a, name)[0] for a in adapters]
        B = [_ab(a, name)[1] for a in adapters]
        a_bar = sum(wi * Ai for wi, Ai in zip(w, A))
        b_bar = sum(wi * Bi for wi, Bi in zip(w, B))
        torch.testing.assert_close(avg[name], s * b_bar @ a_bar)
        torch.testing.assert_close(exact[name], s * sum(wi * Bi @ Ai for wi, Bi, Ai in zip(w, B, A)))
    # the cross terms make the two merges differ
    assert not torch.allclose(avg["q_proj"], exact["q_proj"])
    # uniform default weights
    torch.testing.assert_close(soup_deltas(configs, None, "delta_w")["q_proj"],
                               soup_deltas(configs, [1 / 3] * 3, "delta_w")["q_proj"])
    with pytest.raises(ValueError, match="mode"):
        soup_deltas(configs, w, "ties")


def test_mixed_ranks_scalings_and_missing_modules():
    a1 = _adapter(2, dtype=torch.float64)
    a2 = _adapter(5, modules=("q_proj",), dtype=torch.float64)
    configs = [(a1, {"lora_alpha": 4}), (a2, {"lora_alpha": 4, "use_rslora": True})]
    s1, s2 = 4 / 2, 4 / 5 ** 0.5
    w = [0.25, 0.75]
    A1, B1 = _ab(a1, "q_proj")
    A2, B2 = _ab(a2, "q_proj")
    exact = soup_deltas(configs, w, "delta_w")
    torch.testing.assert_close(exact["q_proj"], w[0] * s1 * B1 @ A1 + w[1] * s2 * B2 @ A2)
    avg = soup_deltas(configs, w, "average_ab")
    A1p = torch.cat([A1, torch.zeros(3, D_IN, dtype=torch.float64)])
    B1p = torch.cat([B1, torch.zeros(D_OUT, 3, dtype=torch.float64)], 1)
    torch.testing.assert_close(avg["q_proj"], (w[0] * s1 * B1p + w[1] * s2 * B2) @ (w[0] * A1p + w[1] * A2))
    torch.testing.assert_close(avg["v_proj"], s1 * (w[0] * _ab(a1, "v_proj")[1]) @ (w[0] * _ab(a1, "v_proj")[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["average_ab", "delta_w"])
def test_merge_then_unmerge_restores_weights(dtype, mode):
    model = Tiny(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = [_adapter(4) for _ in range(2)]
    merged = merge_adapters(adapters, [0.6, 0.4], mode, model=model, scaling=0.5)
    assert merged.merged
    for name, delta in merged.deltas.items():
        w = getattr(model, name).weight
        torch.testing.assert_close(w, (before[f"{name}.weight"].float() + delta).to(dtype))
    merged.unmerge()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # without a kept copy: subtract the fp32 delta (exact up to rounding)
    merged = merge_adapters(adapters, [0.6, 0.4], mode, model=model, scaling=0.5, keep_original=False)
    merged.unmerge()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=tol, atol=tol)


def test_serving_per_sequence_soups_without_merging():
    base = Tiny()
    adapters = [(_adapter(4), {"lora_alpha": 8}) for _ in range(3)]
    model = serve_soups(copy.deepcopy(base), adapters).eval()
    assert len(dict(molora_layers(model))) == 2
    x = torch.randn(2, 5, D_IN)
    w = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    set_gates(model, w)
    y = model(x)
    for b in range(2):
        reference = copy.deepcopy(base)
        merge_adapters(adapters, w[b].tolist(), "delta_w", model=reference)
        torch.testing.assert_close(y[b], reference(x[b]), rtol=1e-5, atol=1e-5)


def test_merge_into_peft_folders(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("safetensors")
    from peft import LoraConfig, get_peft_model

    base = Tiny()
    dirs = []
    for i in range(2):
        torch.manual_seed(i)
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                     init_lora_weights=False))
        peft_model.save_pretrained(tmp_path / f"a{i}")
        dirs.append(str(tmp_path / f"a{i}"))
    model = copy.deepcopy(base)
    merged = merge_adapters(dirs, [0.5, 0.5], "delta_w", model=model)
    x = torch.randn(3, D_IN)
    ref = copy.deepcopy(base)
    for i, d in enumerate(dirs):  # the exact mixture = averaging the two PEFT-merged weights
        from peft import PeftModel

        pm = PeftModel.from_pretrained(copy.deepcopy(base), d).merge_and_unload()
        if i == 0:
            acc = pm.q_proj.weight.detach() * 0.5
        else:
            acc = acc + pm.q_proj.weight.detach() * 0.5
    with torch.no_grad():
        ref.q_proj.weight.copy_(acc)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    merged.unmerge()
    assert torch.equal(model.q_proj.weight, base.q_proj.weight)


@pytest.mark.parametrize("mode", ["average_ab", "delta_w"])
def test_deltas_stay_on_the_adapters_device(mode):
    # "meta" stands in for a GPU: the soup is computed where the adapters live, not on the CPU
    adapters = [{k: v.to("meta") for k, v in _adapter(r).items()} for r in (2, 3)]
    deltas = soup_deltas(adapters, [0.5, 0.5], mode, scaling=1.0)
    assert {d.device.type for d in deltas.values()} == {"meta"}
    assert deltas["q_proj"].shape == (D_OUT, D_IN)
