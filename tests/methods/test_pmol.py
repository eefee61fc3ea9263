"""PMoL: aux losses against the reference and hand-computed values, collection from a model."""
import math

import pytest
import torch
import torch.nn as nn

from moelora.integrations import inject
from moelora.layers import MoLoRALinear, molora_layers
from moelora.methods.pmol import PMoLConfig, group_mass
from moelora.losses.pmol import aux_loss, expert_group_soft_loss, load_balance_loss, router_z_loss
from moelora.reference import load_balance_loss_ref, router_z_loss_ref, topk_route_ref


class TinyBlock(nn.Module):
    def __init__(self, d=12):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out = nn.Linear(d, 5)

    def forward(self, x):
        return self.out(torch.tanh(self.q_proj(x)) * self.v_proj(x))


@pytest.mark.parametrize("empty_expert", [False, True])
def test_balance_and_z_loss_match_reference(empty_expert):
    E, k = 5, 2
    logits = torch.randn(37, E + int(empty_expert), dtype=torch.float64)
    probs, ids, _ = topk_route_ref(logits, k, empty_expert=empty_expert)
    torch.testing.assert_close(load_balance_loss(probs, ids, E), load_balance_loss_ref(probs, ids, E))
    torch.testing.assert_close(router_z_loss(logits), router_z_loss_ref(logits))
    # masked tokens: the same as dropping them
    mask = torch.rand(37) > 0.3
    torch.testing.assert_close(load_balance_loss(probs, ids, E, attention_mask=mask),
                               load_balance_loss_ref(probs[mask], ids[mask], E))
    torch.testing.assert_close(router_z_loss(logits, attention_mask=mask), router_z_loss_ref(logits[mask]))


def test_balance_loss_hand_computed():
    # 2 tokens, E = 2, k = 1: token 0 -> expert 0, token 1 -> expert 0
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5]], dtype=torch.float64)
    ids = torch.tensor([[0], [0]])
    # f = [1, 0], P = [0.625, 0.375] -> 2 * 0.625
    assert load_balance_loss(probs, ids).item() == pytest.approx(1.25)
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_group_soft_loss_hand_computed():
    # batch 3, seq 2, E = 4 experts in 2 groups (m = 2) + the empty expert column
    probs = torch.tensor([
        [[0.1, 0.2, 0.3, 0.3, 0.1], [0.4, 0.4, 0.1, 0.0, 0.1]],   # labelled 0
        [[0.1, 0.1, 0.2, 0.2, 0.4], [0.25, 0.25, 0.25, 0.25, 0.0]],  # labelled 1
        [[0.2, 0.2, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2, 0.2]],   # unlabelled
    ], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1])
    labels = torch.tensor([0, 1, -1])
    eps = 1e-6
    seq0 = -(math.log(0.3 + eps) + math.log(0.8 + eps)) / 2
    seq1 = -(math.log(0.4 + eps) + math.log(0.5 + eps)) / 2
    loss = expert_group_soft_loss(probs, groups, labels, eps=eps)
    assert loss.item() == pytest.approx((seq0 + seq1) / 2)
    # masking sequence 1's second token
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    seq1_masked = -math.log(0.4 + eps)
    loss = expert_group_soft_loss(probs, groups, labels, eps=eps, attention_mask=mask)
    assert loss.item() == pytest.approx((seq0 + seq1_masked) / 2)
    # nothing labelled: 0, not NaN
    assert expert_group_soft_loss(probs, groups, torch.tensor([-1, -1, -1])).item() == 0.0


def test_pmol_config_and_layers():
    config = PMoLConfig(num_preferences=3, experts_per_preference=2, r=4, top_k=2)
    assert config.num_experts == 6 and config.expert_groups == [0, 0, 1, 1, 2, 2]
    model = inject(TinyBlock(), config)
    layers = dict(molora_layers(model))
    assert set(layers) == {"q_proj", "v_proj"}
    layer = layers["q_proj"]
    assert layer.router.empty_expert and layer.router.weight.shape == (7, 12)
    assert layer.scaling == config.lora_alpha / config.r
    with pytest.raises(ValueError):
        PMoLConfig(num_preferences=2, experts_per_preference=1, top_k=3)


def test_aux_loss_collects_from_all_layers():
    config = PMoLConfig(num_preferences=2, experts_per_preference=2, r=4, group_temperature=2.0)
    model = inject(TinyBlock(), config).double().train()
    x = torch.randn(3, 6, 12, dtype=torch.float64)
    model(x)
    labels = torch.tensor([0, 1, -1])
    mask = torch.ones(3, 6)
    mask[0, 4:] = 0
    out = aux_loss(model, preference_labels=labels, weights=config, attention_mask=mask)
    groups = torch.tensor(config.expert_groups)
    exp = {"group": [], "balance": [], "z": []}
    keep = mask.bool()
    for _, layer in molora_layers(model):
        s = layer.router_state
        p_t = torch.softmax(s.logits / 2.0, -1)
        exp["group"].append(expert_group_soft_loss(p_t, groups, labels, attention_mask=mask))
        exp["balance"].append(load_balance_loss_ref(s.probs[keep], s.expert_indices[keep], 4))
        exp["z"].append(router_z_loss_ref(s.logits[keep]))
    for key in exp:
        torch.testing.assert_close(out[key], torch.stack(exp[key]).mean())
    total = (config.group_loss_weight * out["group"] + config.balance_loss_weight * out["balance"]
             + config.z_loss_weight * out["z"])
    torch.testing.assert_close(out["total"], total)
    only = aux_loss(model, labels, weights={"balance": 1.0}, return_dict=False)
    torch.testing.assert_close(only, aux_loss(model)["balance"])
    # gradients reach the routers
    out["total"].backward()
    for _, layer in molora_layers(model):
        assert layer.router.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown"):
        aux_loss(model, weights={"grp": 1.0})


def test_group_loss_pulls_mass_to_the_labelled_group():
    config = PMoLConfig(num_preferences=2, experts_per_preference=1, r=2, top_k=1, empty_expert=True)
    model = inject(TinyBlock(), config).train()
    x = torch.randn(8, 5, 12)
    labels = torch.tensor([0, 1] * 4)
    x[labels == 0] += 1.0  # the preferences are visible in the input
    x[labels == 1] -= 1.0
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(30):
        model(x)
        loss = aux_loss(model, labels, weights={"group": 1.0})["group"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model(x)
    mass = group_mass(model)  # [batch, 2 groups + empty]
    assert mass.shape == (8, 3)
    assert mass[labels == 0, 0].min() > 0.8 and mass[labels == 1, 1].min() > 0.8


def test_aux_loss_without_recorded_routing_raises():
    model = inject(TinyBlock(), PMoLConfig()).eval()
    model(torch.randn(2, 12))
    with pytest.raises(RuntimeError, match="eval mode"):  # not silently zero
        aux_loss(model)
    layers = molora_layers(model)
    assert layers and all(layer.router_state is None for _, layer in layers)  # eval: nothing recorded
