"""Gumbel-softmax mixture DPO at a fixed sample, its temperature schedule, and PMoL's soft /
multi-label group loss, against hand computations."""
import math

import pytest
import torch

from moelora.losses import (expert_group_soft_loss, gumbel_temperature, mixture_dpo_gumbel_loss,
                            mixture_dpo_loss)


def _logsig(x):
    return -math.log1p(math.exp(-x))


def test_gumbel_loss_at_fixed_sample_matches_hand_computation():
    margins = torch.tensor([[0.5, -1.0]])
    w = [0.25, 0.75]
    log_w = torch.log(torch.tensor([w]))
    g = torch.tensor([[0.3, -0.2]])
    tau = 0.5
    a = (math.log(w[0]) + 0.3) / tau
    b = (math.log(w[1]) - 0.2) / tau
    z0 = math.exp(a) / (math.exp(a) + math.exp(b))
    expected = -(z0 * _logsig(0.5) + (1 - z0) * _logsig(-1.0))
    loss, z = mixture_dpo_gumbel_loss(margins, log_w, temperature=tau, gumbel_noise=g)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert z[0, 0].item() == pytest.approx(z0, rel=1e-6)
    out = mixture_dpo_loss(torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 0.0]]), beta=0.5,
                           log_weights=log_w[0], objective="gumbel", gumbel_temperature=tau,
                           gumbel_noise=g)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_gumbel_gate_gets_gradient_and_low_temperature_is_one_hot():
    margins = torch.tensor([[2.0, -2.0]])
    logits = torch.zeros(1, 2, requires_grad=True)
    loss, _ = mixture_dpo_gumbel_loss(margins, torch.log_softmax(logits, -1), temperature=1.0,
                                      gumbel_noise=torch.zeros(1, 2))
    loss.backward()
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]  # mass moves toward the expert that explains the pair
    _, z = mixture_dpo_gumbel_loss(margins, torch.log(torch.tensor([0.4, 0.6])), temperature=1e-3,
                                   gumbel_noise=torch.tensor([[0.5, 0.0]]))
    assert z[0, 0].item() == pytest.approx(1.0)  # log .4 + .5 > log .6


def test_gumbel_temperature_schedule():
    assert gumbel_temperature(0, start=1.0, end=0.1, steps=10) == pytest.approx(1.0)
    assert gumbel_temperature(5, start=1.0, end=0.1, steps=10) == pytest.approx(math.sqrt(0.1))
    assert gumbel_temperature(50, start=1.0, end=0.1, steps=10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="steps"):
        gumbel_temperature(0, steps=0)


def test_soft_group_loss_matches_hand_computation():
    # 4 experts in groups [0, 0, 1, 1] plus an empty expert column; 2 tokens per sequence
    probs = torch.tensor([[[0.1, 0.2, 0.3, 0.1, 0.3], [0.4, 0.1, 0.1, 0.2, 0.2]],
                          [[0.25, 0.25, 0.25, 0.25, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6]]])
    groups = torch.tensor([0, 0, 1, 1])
    targets = torch.tensor([[1.0, 1.0], [0.25, 0.75]])
    eps = 1e-6

    def group_nll(b, g):
        cols = [0, 1] if g == 0 else [2, 3]
        return -sum(math.log(float(probs[b, t, cols].sum()) + eps) for t in range(2)) / 2

    s0 = (group_nll(0, 0) + group_nll(0, 1)) / 2
    s1 = 0.25 * group_nll(1, 0) + 0.75 * group_nll(1, 1)
    loss = expert_group_soft_loss(probs, groups, targets, eps=eps)
    assert loss.item() == pytest.approx((s0 + s1) / 2, rel=1e-6)
    # one-hot rows equal hard labels; an all-zero row is unlabelled like -1
    one_hot = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert expert_group_soft_loss(probs, groups, one_hot, eps=eps).item() == pytest.approx(
        expert_group_soft_loss(probs, groups, torch.tensor([1, -1]), eps=eps).item(), rel=1e-6)
    with pytest.raises(ValueError, match="non-negative"):
        expert_group_soft_loss(probs, groups, -targets)
    with pytest.raises(ValueError, match="P = 1"):
        expert_group_soft_loss(probs, groups, targets[:, :1])
