"""HoE: task-vector SVD experts, preference routing, Tchebycheff scalarisation."""
import copy

import pytest
import torch
import torch.nn as nn

from moelora.integrations import set_preference
from moelora.layers import molora_layers
from moelora.methods.hoe import HoEConfig, build_hoe, task_vector_svd, tchebycheff


class TinyBlock(nn.Module):
    def __init__(self, d=10):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x):
        return self.out(self.v_proj(torch.relu(self.q_proj(x))))


def _finetuned(base, scale=0.3):
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name in ("q_proj", "v_proj"):
            w = getattr(model, name).weight
            w.add_(scale * torch.randn_like(w))
    return model


def test_task_vector_svd():
    base = torch.randn(9, 14, dtype=torch.float64)
    tuned = base + torch.randn(9, 14, dtype=torch.float64)
    A, B = task_vector_svd(tuned, base, r=100)  # clipped to full rank 9
    assert A.shape == (9, 14) and B.shape == (9, 9)
    torch.testing.assert_close(base + B @ A, tuned, rtol=0, atol=1e-12)
    A, B = task_vector_svd(tuned, base, r=3)
    S = torch.linalg.svdvals(tuned - base)
    err = torch.linalg.matrix_norm(tuned - base - B @ A)  # Eckart-Young: the tail singular values
    torch.testing.assert_close(err, S[3:].square().sum().sqrt())
    torch.testing.assert_close(A @ A.t(), B.t() @ B)  # S^1/2 split evenly between A and B
    A2, B2 = task_vector_svd(tuned, base, r=3, method="lowrank")
    torch.testing.assert_close(B2 @ A2, B @ A, rtol=1e-6, atol=1e-6)


def test_full_rank_hoe_reproduces_finetuned_models(tmp_path):
    base = TinyBlock().double()
    tuned = [_finetuned(base), _finetuned(base)]
    # sources as a model, a state dict, and a safetensors file (read lazily, tensor by tensor)
    save_file = pytest.importorskip("safetensors.torch").save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tuned[1].state_dict().items()}, str(path))
    model = build_hoe(copy.deepcopy(base), [tuned[0], str(tmp_path)], HoEConfig(r=10, top_k=1))
    for name, layer in molora_layers(model):
        for i, ft in enumerate(tuned):
            w_i = ft.get_submodule(name).weight
            recon = layer.base_layer.weight + layer.lora_B.weight[i] @ layer.lora_A.weight[i]
            torch.testing.assert_close(recon, w_i, rtol=0, atol=1e-12)
    x = torch.randn(2, 5, 10, dtype=torch.float64)
    set_preference(model, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # one user per sequence
    y = model(x)
    torch.testing.assert_close(y[0], tuned[0](x[0]))
    torch.testing.assert_close(y[1], tuned[1](x[1]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n for n in trainable)
    from_state_dicts = build_hoe(copy.deepcopy(base), [t.state_dict() for t in tuned], HoEConfig(r=10, top_k=1))
    for key, value in from_state_dicts.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key], rtol=0, atol=1e-12)


def test_preference_routing_dense_mixture():
    base = TinyBlock().double()
    tuned = [_finetuned(base), _finetuned(base)]
    model = build_hoe(copy.deepcopy(base), tuned, HoEConfig(r=4, router_init="uniform"))
    layer = dict(molora_layers(model))["q_proj"]
    x = torch.randn(3, 10, dtype=torch.float64)
    # with zero routers every router expert is uniform: g = 1/2 whatever lambda
    route = layer.router(x, preference=torch.tensor([0.9, 0.1]))
    torch.testing.assert_close(route.expert_weights, torch.full((3, 2), 0.5, dtype=torch.float64))
    # "anchor" init: g ~ lambda; outputs move monotonically from model 0 to model 1
    model = build_hoe(copy.deepcopy(base), tuned, HoEConfig(r=10, anchor_logit=30.0)).eval()
    outs = []
    for lam in (0.0, 0.5, 1.0):
        set_preference(model, torch.tensor([1 - lam, lam]))
        outs.append(model(x))
    d0 = [torch.dist(o, tuned[0](x)).item() for o in outs]
    assert d0[0] < 1e-8 < d0[1] < d0[2]
    with pytest.raises(ValueError):
        set_preference(model, torch.tensor([1.0, 0.0, 0.0]))


def test_hoe_router_training_and_non_identity_anchors():
    base = TinyBlock()
    tuned = [_finetuned(base), _finetuned(base)]
    config = HoEConfig(r=4, anchors=[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    model = build_hoe(copy.deepcopy(base), tuned, config)
    layer = dict(molora_layers(model))["v_proj"]
    assert layer.router.weight.shape == (3, 2, 10) and layer.router.init == "uniform"
    set_preference(model, torch.tensor([0.0, 1.0, 0.0]) @ torch.tensor(config.anchors))  # = anchor 1
    torch.testing.assert_close(layer.router._mixing, torch.tensor([0.0, 1.0, 0.0]), rtol=0, atol=1e-3)
    # train router expert 1 only (lambda = its anchor); the rest of the model stays frozen
    set_preference(model, torch.tensor([0.5, 0.5]))
    model(torch.randn(4, 10)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".router." in n for n in grads)
    for name, grad in grads.items():  # pi = (0, 1, 0): the other router experts get exactly 0
        assert grad[0].abs().max() == 0 and grad[2].abs().max() == 0, name
        assert grad[1].abs().max() > 0, name


def test_tchebycheff():
    rewards = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    lam = torch.tensor([0.25, 0.75])
    ideal = torch.tensor([4.0, 4.0])
    # row 0: max(0.25 * 3, 0.75 * 1) = 0.75; row 1: max(0.25 * 2, 0.75 * 4) = 3
    assert tchebycheff(rewards, lam, ideal).tolist() == [0.75, 3.0]


def test_build_hoe_leaves_layers_injected_before_alone():
    from moelora.integrations import inject
    from moelora import MoLoRAConfig

    base = TinyBlock().double()
    tuned = [_finetuned(base), _finetuned(base), _finetuned(base)]
    model = inject(copy.deepcopy(base), MoLoRAConfig(num_experts=2, r=2, target_modules=["q_proj"],
                                                     init_lora_weights=False))
    q_proj = model.q_proj
    before = {k: v.clone() for k, v in q_proj.state_dict().items()}
    build_hoe(model, tuned, HoEConfig(r=10, top_k=1, target_modules=["q_proj", "v_proj"]))
    assert model.q_proj is q_proj and q_proj.num_experts == 2  # not filled from 3 sources, not frozen
    for key, value in q_proj.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert q_proj.lora_A.weight.requires_grad and q_proj.lora_B.weight.requires_grad
    hoe = model.v_proj
    assert hoe.num_experts == 3 and not hoe.lora_A.weight.requires_grad
    for i, ft in enumerate(tuned):
        recon = hoe.base_layer.weight + hoe.lora_B.weight[i] @ hoe.lora_A.weight[i]
        torch.testing.assert_close(recon, ft.v_proj.weight, rtol=0, atol=1e-12)
