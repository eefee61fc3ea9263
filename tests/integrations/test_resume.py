"""Resume exactly (issue 15): a tiny PMoL and a tiny HoE model trained N steps, saved (moelora's
own adapter file, and HF-style: the model's state dict) with the optimizer state, reloaded into
a fresh model and optimizer, then one more step: the loss and every parameter are bit-identical
to the run that was not interrupted (CPU, deterministic)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from moelora.integrations import inject, load_moelora, routing_inputs, save_moelora
from moelora.losses.pmol import aux_loss
from moelora.methods.hoe import HoEConfig, build_hoe
from moelora.methods.pmol import PMoLConfig

pytest.importorskip("safetensors")

STEPS = 3
D = 12


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out = nn.Linear(D, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.q_proj(x)) + self.v_proj(x))


def _base(seed=0):
    torch.manual_seed(seed)
    return _Net()


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(4, 5, D, generator=g)
    target = torch.randn(4, 5, 4, generator=g)
    labels = torch.tensor([0, 1, -1, 1])
    preference = torch.rand(4, 2, generator=g) + 0.05
    return x, target, labels, preference


# --- the two methods: how to build, how to take one step --------------------------------------
# noisy routing and LoRA dropout draw from the RNG: its state is part of the checkpoint, as in
# transformers' Trainer (rng_state.pth)
PMOL = PMoLConfig(num_preferences=2, experts_per_preference=2, r=2, top_k=2, empty_expert=True,
                  router_bias=True, noisy_router=True, lora_dropout=0.1, init_lora_weights=False,
                  target_modules=["q_proj", "v_proj"])


def _pmol_model():
    return inject(_base(), PMOL)


def _pmol_loss(model, step):
    x, target, labels, _ = _batch(step)
    out = model(x)
    return (out - target).square().mean() + aux_loss(model, labels, weights=PMOL)["total"]


def _hoe_sources():
    sources = []
    for i in range(2):  # two "fine-tuned" models: the base plus a fixed perturbation
        model = _base()
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        sources.append(model.state_dict())
    return sources


HOE = HoEConfig(r=3, router_init="random", target_modules=["q_proj", "v_proj"])


def _hoe_model():
    torch.manual_seed(1)  # the routers' random init
    return build_hoe(_base(), _hoe_sources(), HOE)


def _hoe_loss(model, step):
    x, target, _, preference = _batch(step)
    with routing_inputs(model, preference=preference):
        out = model(x)
    return (out - target).square().mean()


METHODS = {"pmol": (_pmol_model, _pmol_loss), "hoe": (_hoe_model, _hoe_loss)}


def _optimizer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def _step(model, opt, loss_fn, step):
    model.train()
    loss = loss_fn(model, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def _save(model, opt, path, kind):
    if kind == "moelora":
        save_moelora(model, path / "adapter")
    else:  # HF-style: the whole model's state dict, as save_pretrained writes it
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    torch.save(opt.state_dict(), path / "optimizer.pt")
    torch.save(torch.get_rng_state(), path / "rng_state.pt")


def _reload(build, path, kind):
    if kind == "moelora":  # a fresh base model; the layers are rebuilt from the file
        model = load_moelora(_base(seed=0), path / "adapter")
    else:
        model = build()
        with torch.no_grad():  # scramble the fresh layers: everything must come from the file
            for p in model.parameters():
                p.add_(1.0)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path / "model.safetensors"))
    opt = _optimizer(model)
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    torch.manual_seed(12345)  # building the fresh model drew from the RNG: the file restores it
    torch.set_rng_state(torch.load(path / "rng_state.pt", weights_only=True))
    return model, opt


@pytest.mark.parametrize("kind", ["moelora", "hf"])
@pytest.mark.parametrize("method", list(METHODS))
def test_resume_is_bit_identical(method, kind, tmp_path):
    build, loss_fn = METHODS[method]
    model = build()
    opt = _optimizer(model)
    for step in range(STEPS):
        _step(model, opt, loss_fn, step)
    _save(model, opt, tmp_path, kind)
    want_loss = _step(model, opt, loss_fn, STEPS)

    resumed, resumed_opt = _reload(build, tmp_path, kind)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in resumed.named_parameters() if p.requires_grad] == trainable
    loss = _step(resumed, resumed_opt, loss_fn, STEPS)
    assert torch.equal(loss, want_loss), (loss.item(), want_loss.item())
    want = dict(model.named_parameters())
    for name, p in resumed.named_parameters():
        assert torch.equal(p, want[name]), name
    for name, buffer in model.named_buffers():
        assert torch.equal(dict(resumed.named_buffers())[name], buffer), name
    # and the optimizer continues from the same moments
    state = opt.state_dict()["state"]
    for index, values in resumed_opt.state_dict()["state"].items():
        for key, value in values.items():
            assert torch.equal(value, state[index][key]), (index, key)
