"""The fused mixture-DPO loss against the unfused composition it replaces (expert_logprobs ->
sequence_logprobs -> mixture_dpo_loss): the loss, its other outputs and the gradients of the
hidden states, the heads and the gate's log-weights; chunks of one pair and of all."""
from __future__ import annotations

import importlib

import pytest
import torch

import moelora
from moelora.losses import mixture_dpo_loss, sequence_logprobs
from moelora.losses.fused_dpo import fused_mixture_dpo_loss

from conftest import DEVICE
from helpers import bound, rel_error

fused = importlib.import_module("moelora.losses.fused_dpo")
BACKENDS = [b for b in ("torch", "triton") if b in moelora.ops.expert_logprobs.op.BACKENDS.available(DEVICE)]


def _problem(B=3, L=7, d=16, V=40, K=3, dtype=torch.float64):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(2 * B, L, d, generator=g, dtype=torch.float64)
    heads = torch.randn(K, V, d, generator=g, dtype=torch.float64) * d**-0.5 * 2
    targets = torch.randint(0, V, (2 * B, L), generator=g)
    targets[:, :2] = -100  # the prompt is not scored
    targets[1, 5:] = -100  # padding
    log_weights = torch.log_softmax(torch.randn(B, K, generator=g, dtype=torch.float64), -1)
    ref_c, ref_r = torch.randn(B, generator=g, dtype=torch.float64) - 20, torch.randn(B, generator=g, dtype=torch.float64) - 20
    cast = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return dict(hidden=cast(hidden), heads=cast(heads), targets=targets.to(DEVICE),
                log_weights=log_weights.to(DEVICE), reference_chosen_logps=ref_c.to(DEVICE),
                reference_rejected_logps=ref_r.to(DEVICE))


def _unfused(hidden, heads, targets, log_weights, reference_chosen_logps, reference_rejected_logps,
             backend="torch", **kw):
    B = hidden.shape[0] // 2
    seq = sequence_logprobs(moelora.expert_logprobs(hidden, heads, targets, backend=backend))
    return mixture_dpo_loss(seq[:B], seq[B:], reference_chosen_logps, reference_rejected_logps,
                            log_weights=log_weights, **kw)


def _grads(fn, p):
    leaves = {n: (t.detach().requires_grad_() if n in ("hidden", "heads", "log_weights") else t)
              for n, t in p.items()}
    out = fn(**leaves)
    return out, torch.autograd.grad(out.loss, [leaves["hidden"], leaves["heads"], leaves["log_weights"]])


@pytest.mark.parametrize("pairs_per_chunk", ["one", "all"])
@pytest.mark.parametrize("objective,smoothing", [("em", 0.0), ("mixture", 0.1)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_matches_the_composition(backend, objective, smoothing, pairs_per_chunk, monkeypatch):
    if pairs_per_chunk == "one":
        monkeypatch.setitem(fused.CHUNK_BYTES, DEVICE.type, 1)
    dtype = torch.float32
    p = _problem(dtype=dtype)
    kw = dict(beta=0.3, label_smoothing=smoothing, objective=objective)
    out, grads = _grads(lambda **a: fused_mixture_dpo_loss(**a, backend=backend, **kw), p)
    ref, ref_grads = _grads(lambda **a: _unfused(**a, **kw), _problem(dtype=torch.float64))
    assert rel_error(out.loss, ref.loss) <= 1e-5
    assert rel_error(out.margins, ref.margins) <= 1e-5
    assert rel_error(out.responsibilities, ref.responsibilities) <= 1e-5
    for name, g, r in zip(("hidden", "heads", "log_weights"), grads, ref_grads):
        assert g.dtype == p[name].dtype and g.shape == r.shape, name
        assert rel_error(g, r) <= 1e-4, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_within_pytorchs_own_error(backend):
    p = _problem(dtype=torch.bfloat16)
    out, grads = _grads(lambda **a: fused_mixture_dpo_loss(**a, backend=backend), p)
    exact, exact_grads = _grads(lambda **a: _unfused(**a), _problem(dtype=torch.float64))
    low, low_grads = _grads(lambda **a: _unfused(**a), p)  # PyTorch's own composition in bf16
    assert rel_error(out.loss, exact.loss) <= bound(torch.bfloat16, rel_error(low.loss, exact.loss))
    for g, e, lo in zip(grads, exact_grads, low_grads):
        assert rel_error(g, e) <= bound(torch.bfloat16, rel_error(lo, e))


def test_three_gemm_equivalents_and_one_chunk_of_logits(monkeypatch):
    """One logits GEMM per expert per chunk, none recomputed: the forward's blocks serve the
    gradient; the unfused path multiplies each head twice more in its backward."""
    calls = []
    real = fused.chunked._logits
    monkeypatch.setattr(fused.chunked, "_logits", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setitem(fused.CHUNK_BYTES, DEVICE.type, 1)  # one pair a chunk: 3 chunks
    p = {n: (t.requires_grad_() if n in ("hidden", "heads") else t) for n, t in _problem(dtype=torch.float32).items()}
    fused_mixture_dpo_loss(**p, backend="torch").loss.backward()
    assert len(calls) == 3 * 3  # 3 chunks x 3 experts, all in the forward


def test_bad_shapes_are_named():
    p = _problem(dtype=torch.float32)
    with pytest.raises(ValueError, match="chosen then rejected"):
        fused_mixture_dpo_loss(p["hidden"][:5], p["heads"], p["targets"][:5])
    with pytest.raises(ValueError, match="log_weights must be"):
        fused_mixture_dpo_loss(p["hidden"], p["heads"], p["targets"], log_weights=torch.zeros(2, 3))
