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


# --- router-expert training (Tchebycheff) and spectral-energy ranks -------------------------

from moelora.methods.hoe import (  # noqa: E402
    RouterExpertTrainer,
    energy_rank,
    tchebycheff_router_loss,
    train_router_expert,
)


def _matrix_with_singular_values(values, d_out, d_in, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    S = torch.zeros(d_out, d_in, dtype=torch.float64)
    S[range(len(values)), range(len(values))] = torch.tensor(values, dtype=torch.float64)
    return U @ S @ V.t()


def test_energy_rank_known_singular_values():
    S = torch.linalg.svdvals(_matrix_with_singular_values([4.0, 2.0, 1.0, 1.0], 6, 7))
    # energies 16, 4, 1, 1 of 22: cumulative 0.727, 0.909, 0.955, 1
    assert [energy_rank(S, tau) for tau in (0.5, 0.7, 0.75, 0.9, 0.95, 0.96, 1.0)] == [1, 1, 2, 2, 3, 4, 4]
    assert energy_rank(S, 1.0, r_max=2) == 2
    assert energy_rank(torch.tensor([3.0, 1.0]), 0.9) == 1  # exactly 9 / 10: the threshold is met
    assert energy_rank(torch.zeros(3), 0.9) == 1
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="tau"):
            energy_rank(S, bad)
    with pytest.raises(ValueError, match="energy"):
        HoEConfig(energy=0.0)


def test_build_hoe_energy_rank_per_layer():
    base = TinyBlock(d=8).double()
    tuned = [copy.deepcopy(base), copy.deepcopy(base)]
    with torch.no_grad():
        # q_proj: singular values (4, 2, 1, 1) and (3, 1); v_proj: rank 1 for both models
        tuned[0].q_proj.weight.add_(_matrix_with_singular_values([4.0, 2.0, 1.0, 1.0], 8, 8, seed=1))
        tuned[1].q_proj.weight.add_(_matrix_with_singular_values([3.0, 1.0], 8, 8, seed=2))
        for i, t in enumerate(tuned):
            t.v_proj.weight.add_(_matrix_with_singular_values([2.0 + i], 6, 8, seed=3 + i))
    model = build_hoe(copy.deepcopy(base), tuned, HoEConfig(r=3, energy=0.9))
    layers = dict(molora_layers(model))
    # q_proj: model 0 needs 2 (0.909 >= 0.9), model 1 needs 1 (0.9): layer rank 2; v_proj: 1
    assert layers["q_proj"].r == 2 and layers["v_proj"].r == 1
    for name, layer in layers.items():
        for i, ft in enumerate(tuned):
            tau = ft.get_submodule(name).weight - base.get_submodule(name).weight
            A, B = task_vector_svd(ft.get_submodule(name).weight, base.get_submodule(name).weight, layer.r)
            torch.testing.assert_close(layer.lora_B.weight[i] @ layer.lora_A.weight[i], B @ A)
            kept = torch.linalg.matrix_norm(B @ A) ** 2 / torch.linalg.matrix_norm(tau) ** 2
            assert kept >= 0.9 - 1e-9
    capped = build_hoe(copy.deepcopy(base), tuned, HoEConfig(r=1, energy=0.99))
    assert dict(molora_layers(capped))["q_proj"].r == 1  # r is r_max


class _GateReadout(nn.Module):
    """y = sum_i g_i e_i = g: expert i's task vector maps x (x[0] = 1) to e_i."""

    def __init__(self, d_out):
        super().__init__()
        self.proj = nn.Linear(3, d_out)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        return self.proj(x)


def _gate_readout_hoe(columns, anchors, router_init="uniform"):
    base = _GateReadout(len(columns[0])).double()
    tuned = []
    for col in columns:
        t = copy.deepcopy(base)
        with torch.no_grad():
            t.proj.weight[:, 0] = torch.tensor(col, dtype=torch.float64)
        tuned.append(t)
    return build_hoe(base, tuned, HoEConfig(r=1, target_modules=["proj"], anchors=anchors, router_init=router_init))


def _inputs(n, seed):
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, 0] = 1.0
    return x


def test_router_training_differentiable_rewards_reaches_tchebycheff_optimum():
    # rewards r = g (the gates); z* = (1, 1); anchor (0.75, 0.25):
    # T = max(0.75 (1 - g0), 0.25 (1 - g1)) = max(0.75 g1, 0.25 g0), minimal at g = (0.75, 0.25), T* = 0.1875
    anchors = [[0.75, 0.25], [0.25, 0.75]]
    model = _gate_readout_hoe([[1.0, 0.0], [0.0, 1.0]], anchors)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [_inputs(16, seed) for seed in range(300)]
    history = train_router_expert(model, 0, batches, lambda m, x: m(x), ideal=torch.tensor([1.0, 1.0]), lr=0.05)
    assert history[0]["tchebycheff"] == pytest.approx(0.375, abs=1e-6)  # uniform start: g = (1/2, 1/2)
    assert history[-1]["tchebycheff"] < history[0]["tchebycheff"]
    assert history[-1]["tchebycheff"] == pytest.approx(0.1875, abs=5e-3)
    router = model.proj.router
    set_preference(model, torch.tensor(anchors[0]))
    g = model(_inputs(64, 999)).detach()
    torch.testing.assert_close(g.mean(0), torch.tensor([0.75, 0.25], dtype=torch.float64), rtol=0, atol=2e-2)
    after = model.state_dict()
    for key, value in before.items():  # only router expert 0 moved
        if key in ("proj.router.weight", "proj.router.bias"):
            assert torch.equal(after[key][1], value[1]) and not torch.equal(after[key][0], value[0]), key
        else:
            assert torch.equal(after[key], value), key
    # router expert 1 trained next for its anchor: optimum g = (0.25, 0.75); router 0 is kept
    kept0 = router.weight[0].detach().clone()
    history = train_router_expert(model, 1, batches[:250], lambda m, x: m(x), ideal=torch.tensor([1.0, 1.0]), lr=0.05)
    assert history[-1]["tchebycheff"] == pytest.approx(0.1875, abs=5e-3)
    assert torch.equal(router.weight[0], kept0)


def test_router_training_reinforce_on_sampled_actions():
    # a 3-armed bandit: logits = g0 (4, 0, 3) + g1 (0, 4, 3); arms' reward vectors (1, 0), (0, 1),
    # (0.6, 0.6); anchor 0 = (1, 0), z* = (1, 1): T = (0, 1, 0.4) per arm, best gate g = (1, 0)
    model = _gate_readout_hoe([[4.0, 0.0, 3.0], [0.0, 4.0, 3.0]], None, router_init="uniform")
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.6]], dtype=torch.float64)
    cost = torch.tensor([0.0, 1.0, 0.4], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)

    def expected_t():
        set_preference(model, torch.tensor([1.0, 0.0]))
        with torch.no_grad():
            return (torch.softmax(model(_inputs(256, 7)), -1) @ cost).mean().item()

    start = expected_t()
    assert start == pytest.approx(0.4417, abs=1e-3)  # g = (1/2, 1/2): p = softmax(2, 2, 3)

    def sample(m, x):
        logp = torch.log_softmax(m(x), -1)
        arms = torch.multinomial(logp.exp().detach(), 1, generator=gen).squeeze(1)
        return table[arms], logp.gather(-1, arms.unsqueeze(1)).squeeze(1)

    train_router_expert(model, 0, [_inputs(64, s) for s in range(150)], sample, ideal=torch.tensor([1.0, 1.0]), lr=0.1)
    end = expected_t()
    # the optimum g = (1, 0): p = softmax(4, 0, 3) = (0.7214, 0.0132, 0.2654), E[T] = 0.1194
    assert 0.1194 - 1e-4 < end < 0.2
    g = model.proj.router(_inputs(8, 3), preference=torch.tensor([1.0, 0.0])).expert_weights
    assert g[:, 0].min() > 0.9


def test_tchebycheff_router_loss_checks_and_running_ideal():
    rewards = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    lam = torch.tensor([0.25, 0.75])
    with pytest.raises(ValueError, match="logprobs"):
        tchebycheff_router_loss(rewards, lam, torch.tensor([4.0, 4.0]))  # no grad, no logprobs
    with pytest.raises(ValueError, match="batch"):
        tchebycheff_router_loss(rewards[0], lam, torch.tensor([4.0, 4.0]))
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss = tchebycheff_router_loss(rewards, lam, torch.tensor([4.0, 4.0]), logp)
    # T = (0.75, 3), mean 1.875: ((0.75 - 1.875) * -1 + (3 - 1.875) * -2) / 2 = -0.5625
    assert loss.item() == pytest.approx(-0.5625)
    with pytest.raises(ValueError, match="no HoE"):
        RouterExpertTrainer(TinyBlock(), 0)
    model = _gate_readout_hoe([[1.0, 0.0], [0.0, 1.0]], None)
    with pytest.raises(ValueError, match="anchor"):
        RouterExpertTrainer(model, 2)
    trainer = RouterExpertTrainer(model, 1)  # ideal: the running max of the rewards seen
    trainer.activate()
    trainer.step(model(_inputs(4, 0)))
    torch.testing.assert_close(trainer.ideal, torch.tensor([0.5, 0.5]), rtol=0, atol=1e-6)
