"""Mixture DPO losses, gating and the MoE-DPO wrapper (spec §5), against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import moelora
from moelora.losses import (
    dpo_margins,
    mixture_dpo_em_loss,
    mixture_dpo_loss,
    mixture_dpo_nll_loss,
    sequence_logprobs,
)
from moelora.methods.moe_dpo import (
    FixedMixture,
    MoEDPOModel,
    SequenceGate,
    pool_hidden,
    sequence_gates_to_routing,
)
from moelora.ops.expert_logprobs.reference import naive_expert_logprobs
from moelora.reference import molora_linear_ref


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------------------------
# margins and the two losses on a 1 x 2 case worked by hand
# --------------------------------------------------------------------------------------------
def test_margins_by_hand():
    pc = torch.tensor([[-3.0, -5.0]])
    pr = torch.tensor([[-4.0, -4.5]])
    rc, rr = torch.tensor([-3.5]), torch.tensor([-4.0])
    D = dpo_margins(pc, pr, rc, rr, beta=0.5)
    # expert 0: 0.5 * ((-3 + 3.5) - (-4 + 4)) = 0.25; expert 1: 0.5 * ((-5 + 3.5) - (-4.5 + 4)) = -0.5
    torch.testing.assert_close(D, torch.tensor([[0.25, -0.5]]))
    per_expert_ref = dpo_margins(pc, pr, torch.tensor([[-3.5, -5.0]]), torch.tensor([[-4.0, -4.5]]), beta=0.5)
    torch.testing.assert_close(per_expert_ref, torch.tensor([[0.25, 0.0]]))
    torch.testing.assert_close(dpo_margins(pc, pr, beta=2.0), 2.0 * (pc - pr))


def test_em_and_mixture_losses_by_hand():
    D = torch.tensor([[0.25, -0.5]], dtype=torch.float64, requires_grad=True)
    logits = torch.tensor([[0.3, -0.2]], dtype=torch.float64, requires_grad=True)
    log_w = torch.log_softmax(logits, -1)
    w = [math.exp(v) for v in log_w[0].tolist()]
    s = [_sig(0.25), _sig(-0.5)]
    z = w[0] * s[0] + w[1] * s[1]
    q = [w[0] * s[0] / z, w[1] * s[1] / z]

    em, resp = mixture_dpo_em_loss(D, log_w)
    em_by_hand = -sum(q[k] * (math.log(s[k]) + math.log(w[k])) for k in range(2))
    assert em.item() == pytest.approx(em_by_hand, rel=1e-12)
    torch.testing.assert_close(resp, torch.tensor([q], dtype=torch.float64))
    assert not resp.requires_grad  # the responsibilities carry no gradient

    gD, gl = torch.autograd.grad(em, [D, logits])
    # d/dD_k = -q_k (1 - sigmoid(D_k)); d/dlogit_k = w_k - q_k (through log_softmax)
    want_gD = torch.tensor([[-q[0] * (1 - s[0]), -q[1] * (1 - s[1])]], dtype=torch.float64)
    torch.testing.assert_close(gD, want_gD)
    torch.testing.assert_close(gl, torch.tensor([[w[0] - q[0], w[1] - q[1]]], dtype=torch.float64))

    log_w = torch.log_softmax(logits, -1)
    nll = mixture_dpo_nll_loss(D, log_w)
    assert nll.item() == pytest.approx(-math.log(z), rel=1e-12)
    # the EM identity: at the current parameters both objectives have the same gradient
    gD2, gl2 = torch.autograd.grad(nll, [D, logits])
    torch.testing.assert_close(gD2, gD)
    torch.testing.assert_close(gl2, gl)


def test_responsibilities_are_stop_gradient():
    """Gradient of the EM loss = gradient with q held fixed as a constant."""
    D = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    log_w = torch.log_softmax(torch.randn(5, 3, dtype=torch.float64), -1).requires_grad_()
    loss, q = mixture_dpo_em_loss(D, log_w, reduction="sum")
    fixed = -(q * (F.logsigmoid(D) + log_w)).sum()
    for a, b in zip(torch.autograd.grad(loss, [D, log_w]), torch.autograd.grad(fixed, [D, log_w])):
        torch.testing.assert_close(a, b)


def test_single_expert_is_dpo_and_cdpo():
    D = torch.tensor([[1.5], [-0.7], [0.0]], dtype=torch.float64)
    log_w = torch.zeros(1, dtype=torch.float64)
    dpo = -F.logsigmoid(D[:, 0])
    for fn in (mixture_dpo_nll_loss, lambda *a, **k: mixture_dpo_em_loss(*a, **k)[0]):
        torch.testing.assert_close(fn(D, log_w, reduction="none"), dpo)
        eps = 0.1
        cdpo = -(1 - eps) * F.logsigmoid(D[:, 0]) - eps * F.logsigmoid(-D[:, 0])
        torch.testing.assert_close(fn(D, log_w, label_smoothing=eps, reduction="none"), cdpo)


def test_label_smoothing_mixture_by_hand():
    D = torch.tensor([[0.8, -1.2]], dtype=torch.float64)
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    eps = 0.2
    z_pos = sum(w[k].item() * _sig(D[0, k].item()) for k in range(2))
    z_neg = sum(w[k].item() * _sig(-D[0, k].item()) for k in range(2))
    got = mixture_dpo_nll_loss(D, w.log(), label_smoothing=eps)
    assert got.item() == pytest.approx(-(1 - eps) * math.log(z_pos) - eps * math.log(z_neg), rel=1e-12)


def test_label_smoothing_em_by_hand():
    """K = 2: (1 - eps) L(D) + eps L(-D), each term with its own (constant) responsibilities."""
    D = torch.tensor([[0.8, -1.2]], dtype=torch.float64, requires_grad=True)
    logits = torch.tensor([[0.4, -0.1]], dtype=torch.float64, requires_grad=True)
    log_w = torch.log_softmax(logits, -1)
    w = [math.exp(v) for v in log_w[0].tolist()]
    d = D[0].tolist()
    eps = 0.2

    def posterior(sign):
        s = [_sig(sign * d[k]) for k in range(2)]
        z = w[0] * s[0] + w[1] * s[1]
        return s, [w[k] * s[k] / z for k in range(2)]

    (s_pos, q_pos), (s_neg, q_neg) = posterior(1), posterior(-1)
    term = lambda s, q: -sum(q[k] * (math.log(s[k]) + math.log(w[k])) for k in range(2))
    loss, resp = mixture_dpo_em_loss(D, log_w, label_smoothing=eps)
    assert loss.item() == pytest.approx((1 - eps) * term(s_pos, q_pos) + eps * term(s_neg, q_neg), rel=1e-12)
    torch.testing.assert_close(resp, torch.tensor([q_pos], dtype=torch.float64))
    gD, gl = torch.autograd.grad(loss, [D, logits])
    # d/dD_k: -(1 - eps) q+_k (1 - sigmoid(D_k)) + eps q-_k sigmoid(D_k)
    want_gD = [-(1 - eps) * q_pos[k] * (1 - s_pos[k]) + eps * q_neg[k] * s_pos[k] for k in range(2)]
    torch.testing.assert_close(gD, torch.tensor([want_gD], dtype=torch.float64))
    # d/dlogit_k: w_k - ((1 - eps) q+_k + eps q-_k)
    want_gl = [w[k] - (1 - eps) * q_pos[k] - eps * q_neg[k] for k in range(2)]
    torch.testing.assert_close(gl, torch.tensor([want_gl], dtype=torch.float64))


def test_extreme_margins_and_zero_weight_stay_finite():
    D = torch.tensor([[1e4, -1e4, 30.0], [-1e4, -1e4, -1e4]], requires_grad=True)
    w = torch.tensor([0.5, 0.5, 0.0])  # expert 2 switched off
    for objective in ("em", "mixture"):
        loss = (mixture_dpo_em_loss(D, w.log())[0] if objective == "em"
                else mixture_dpo_nll_loss(D, w.log()))
        (g,) = torch.autograd.grad(loss, [D])
        assert torch.isfinite(loss) and torch.isfinite(g).all(), objective
        assert g[:, 2].abs().max() == 0  # no weight, no responsibility, no gradient


@pytest.mark.parametrize("objective", ["em", "mixture"])
def test_underflowed_softmax_weights_give_finite_gradients(objective):
    """weights = softmax(logits) with exact zeros: the same loss and logits gradient as the
    log_softmax form (d w_k / d logits = 0 there), not nan from log's 1/0."""
    logits = torch.tensor([[0.0, 200.0, -200.0], [1.0, -0.5, 0.3]], requires_grad=True)
    pc, pr = torch.randn(2, 3), torch.randn(2, 3)
    got = mixture_dpo_loss(pc, pr, weights=torch.softmax(logits, -1), objective=objective).loss
    want = mixture_dpo_loss(pc, pr, log_weights=torch.log_softmax(logits, -1), objective=objective).loss
    torch.testing.assert_close(got, want)
    (g_got,), (g_want,) = torch.autograd.grad(got, [logits]), torch.autograd.grad(want, [logits])
    assert torch.isfinite(g_got).all()
    torch.testing.assert_close(g_got, g_want)


def test_reductions():
    D = torch.randn(4, 3)
    log_w = torch.log_softmax(torch.randn(3), -1)
    none = mixture_dpo_nll_loss(D, log_w, reduction="none")
    assert none.shape == (4,)
    torch.testing.assert_close(mixture_dpo_nll_loss(D, log_w, reduction="sum"), none.sum())
    torch.testing.assert_close(mixture_dpo_nll_loss(D, log_w), none.mean())
    em_none, _ = mixture_dpo_em_loss(D, log_w, reduction="none")
    torch.testing.assert_close(mixture_dpo_em_loss(D, log_w)[0], em_none.mean())


def test_mixture_dpo_loss_front_door():
    pc, pr = torch.randn(4, 3), torch.randn(4, 3)
    rc, rr = torch.randn(4), torch.randn(4)
    w = torch.softmax(torch.randn(4, 3), -1)
    a = mixture_dpo_loss(pc, pr, rc, rr, weights=w, beta=0.2)
    b = mixture_dpo_loss(pc, pr, rc, rr, log_weights=w.log(), beta=0.2)
    torch.testing.assert_close(a.loss, b.loss)
    D = dpo_margins(pc, pr, rc, rr, beta=0.2)
    torch.testing.assert_close(a.margins, D)
    torch.testing.assert_close(a.loss, mixture_dpo_em_loss(D, w.log())[0])
    torch.testing.assert_close(a.responsibilities.sum(-1), torch.ones(4))
    m = mixture_dpo_loss(pc, pr, rc, rr, weights=w, beta=0.2, objective="mixture")
    torch.testing.assert_close(m.loss, mixture_dpo_nll_loss(D, w.log()))
    uniform = mixture_dpo_loss(pc, pr, rc, rr, beta=0.2)  # Mix-DPO, uniform weights
    torch.testing.assert_close(uniform.log_weights, torch.full((4, 3), -math.log(3)))


@pytest.mark.parametrize("call,match", [
    (lambda: mixture_dpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), objective="max"), "objective"),
    (lambda: mixture_dpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), reduction="avg"), "reduction"),
    (lambda: mixture_dpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), label_smoothing=0.5), "label_smoothing"),
    (lambda: mixture_dpo_loss(torch.zeros(2, 3), torch.zeros(2, 2)), "policy_rejected_logps"),
    (lambda: mixture_dpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2)), "or neither"),
    (lambda: mixture_dpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.zeros(3)),
     "reference_chosen_logps has shape"),
    (lambda: mixture_dpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), log_weights=torch.zeros(2)),
     "log_weights has shape"),
    (lambda: mixture_dpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), log_weights=torch.zeros(3),
                              weights=torch.ones(3)), "not both"),
])
def test_bad_loss_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------------------------
# token log-probs -> sequence log-probs
# --------------------------------------------------------------------------------------------
def test_sequence_logprobs_padded_and_packed():
    tok = torch.arange(12, dtype=torch.float32).view(2, 3, 2)  # [B=2, S=3, K=2]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(sequence_logprobs(tok), tok.sum(1))
    torch.testing.assert_close(sequence_logprobs(tok, mask=mask), torch.tensor([[2.0, 4.0], [24.0, 27.0]]))
    torch.testing.assert_close(sequence_logprobs(tok, mask=mask, average=True),
                               torch.tensor([[1.0, 2.0], [8.0, 9.0]]))
    torch.testing.assert_close(sequence_logprobs(tok[..., 0], mask=mask), torch.tensor([2.0, 24.0]))

    packed = tok.reshape(6, 2)
    ids = torch.tensor([0, 0, -1, 2, 2, 2])  # sequence 1 is empty, one token dropped
    out = sequence_logprobs(packed, sequence_ids=ids, num_sequences=3)
    torch.testing.assert_close(out, torch.tensor([[2.0, 4.0], [0.0, 0.0], [24.0, 27.0]]))
    avg = sequence_logprobs(packed, sequence_ids=ids, num_sequences=3, average=True)
    torch.testing.assert_close(avg, torch.tensor([[1.0, 2.0], [0.0, 0.0], [8.0, 9.0]]))
    x = packed.clone().requires_grad_()
    (g,) = torch.autograd.grad(sequence_logprobs(x, sequence_ids=ids, num_sequences=3).sum(), [x])
    torch.testing.assert_close(g[:, 0], (ids >= 0).float())
    # an uncounted -inf (a pad token's log-prob under a vocab mask) is dropped, not nan
    poisoned = tok.clone().requires_grad_()
    masked_inf = torch.where(mask.bool().unsqueeze(-1), poisoned, float("-inf"))
    out = sequence_logprobs(masked_inf, mask=mask)
    torch.testing.assert_close(out, torch.tensor([[2.0, 4.0], [24.0, 27.0]]))
    (g,) = torch.autograd.grad(out.sum(), [poisoned])
    torch.testing.assert_close(g, mask.float().unsqueeze(-1).expand(2, 3, 2))
    out = sequence_logprobs(masked_inf.reshape(6, 2), sequence_ids=torch.tensor([0, 0, -1, 1, 1, 1]),
                            num_sequences=2)
    torch.testing.assert_close(out, torch.tensor([[2.0, 4.0], [24.0, 27.0]]))
    with pytest.raises(ValueError, match="num_sequences"):
        sequence_logprobs(packed, sequence_ids=ids)
    with pytest.raises(ValueError, match="mask has shape"):
        sequence_logprobs(tok, mask=mask[:, :2])


# --------------------------------------------------------------------------------------------
# gating
# --------------------------------------------------------------------------------------------
def test_pool_hidden():
    h = torch.arange(24, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]])  # right and left padding
    torch.testing.assert_close(pool_hidden(h, mask, "mean"), torch.stack([h[0, :2].mean(0), h[1, 2:].mean(0)]))
    torch.testing.assert_close(pool_hidden(h, mask, "last"), torch.stack([h[0, 1], h[1, 3]]))
    torch.testing.assert_close(pool_hidden(h, None, "last"), h[:, -1])
    with pytest.raises(ValueError, match="pooling"):
        pool_hidden(h, mask, "max")


def test_pool_hidden_mean_of_a_long_fp16_prompt():
    """fp16: 5000 tokens of value 20 sum past 65504; the mean must still be 20. bf16: a count
    of 301 tokens, which rounds to 300 in bf16, must not bias the mean."""
    h = torch.full((2, 5000, 3), 20.0, dtype=torch.float16)
    mask = torch.ones(2, 5000, dtype=torch.bool)
    mask[1, :4699] = False  # 301 tokens
    out = pool_hidden(h, mask, "mean")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, torch.full((2, 3), 20.0, dtype=torch.float16))
    hb = torch.zeros(1, 301, 1, dtype=torch.bfloat16)
    hb[0, 0] = 300.0  # mean 300 / 301 = 0.9967 -> bf16 0.9961; a count rounded to 300 gives 1
    assert pool_hidden(hb, None, "mean").item() == torch.tensor(300 / 301).bfloat16().item()


def test_sequence_gate_and_fixed_mixture():
    h = torch.randn(3, 5, 8)
    gate = SequenceGate(8, 4, user_embedding_dim=2)
    u = torch.randn(3, 2)
    log_w = gate(h, None, u)
    torch.testing.assert_close(log_w, torch.full((3, 4), -math.log(4)))  # fresh gate: uniform
    torch.nn.init.normal_(gate.proj.weight)
    expected = torch.log_softmax(gate.proj(torch.cat([h.mean(1), u], -1)), -1)
    torch.testing.assert_close(gate(h, None, u), expected)
    with pytest.raises(ValueError, match="user_embedding"):
        gate(h)
    fixed = FixedMixture(3, torch.tensor([1.0, 1.0, 2.0]))
    torch.testing.assert_close(fixed(h).exp(), torch.tensor([[0.25, 0.25, 0.5]]).expand(3, 3))
    assert not list(fixed.parameters()) and len(list(FixedMixture(3, learnable=True).parameters())) == 1


def test_sequence_gates_drive_molora_linear():
    """Per-sequence gates as dense routing: every token of sequence b mixes all E experts."""
    B, S, d, E, r = 2, 3, 6, 3, 2
    x = torch.randn(B, S, d, dtype=torch.float64)
    W = torch.randn(5, d, dtype=torch.float64)
    A = torch.randn(E, r, d, dtype=torch.float64)
    Bm = torch.randn(E, 5, r, dtype=torch.float64)
    gates = torch.softmax(torch.randn(B, E, dtype=torch.float64), -1).requires_grad_()
    idx, g = sequence_gates_to_routing(gates, S)
    assert idx.shape == g.shape == (B, S, E)
    want = x @ W.t() + 0.5 * torch.einsum("be,erd,eor,bsd->bso", gates, A, Bm, x)
    torch.testing.assert_close(molora_linear_ref(x, W, None, A, Bm, idx, g, 0.5), want)
    y = moelora.molora_linear(x.float(), W.float(), None, A.float(), Bm.float(), idx, g.float(), 0.5,
                              backend="torch")
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
    (grad,) = torch.autograd.grad(y.sum(), [gates])
    (want_grad,) = torch.autograd.grad(want.sum(), [gates])
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# the model wrapper
# --------------------------------------------------------------------------------------------
class _Embed(torch.nn.Module):
    def __init__(self, V, d):
        super().__init__()
        self.embed = torch.nn.Embedding(V, d)

    def forward(self, input_ids, attention_mask=None):
        return self.embed(input_ids)


def _pairs(B, S, V, prompt=2):
    def seq():
        ids = torch.randint(0, V, (B, S))
        labels = ids.clone()
        labels[:, :prompt] = -100
        return ids, torch.ones_like(ids), labels
    chosen, rejected = seq(), seq()
    rejected[0][:, :prompt] = chosen[0][:, :prompt]  # a shared prompt
    return chosen, rejected


def test_moe_dpo_model_matches_hand_computation():
    V, d, K, B, S = 11, 6, 3, 4, 5
    backbone = _Embed(V, d)
    lm_head = torch.randn(V, d)
    gate = SequenceGate(d, K)
    torch.nn.init.normal_(gate.proj.weight)
    model = MoEDPOModel.from_lm_head(backbone, lm_head, K, gate, init_noise=0.5, beta=0.3)
    chosen, rejected = _pairs(B, S, V)
    out = model(*chosen, *rejected)

    def logps(ids, labels, heads):
        h = backbone(ids)[:, :-1]
        return naive_expert_logprobs(h, heads, labels[:, 1:]).sum(1)

    pc, pr = logps(chosen[0], chosen[2], model.heads), logps(rejected[0], rejected[2], model.heads)
    rc = logps(chosen[0], chosen[2], lm_head[None])[:, 0]
    rr = logps(rejected[0], rejected[2], lm_head[None])[:, 0]
    prompt_mask = chosen[2] == -100
    log_w = gate(backbone(chosen[0]), prompt_mask)
    want = mixture_dpo_loss(pc, pr, rc, rr, log_weights=log_w, beta=0.3)
    torch.testing.assert_close(out.loss, want.loss)
    grads = torch.autograd.grad(out.loss, [model.heads, gate.proj.weight, backbone.embed.weight])
    want_grads = torch.autograd.grad(want.loss,
                                     [model.heads, gate.proj.weight, backbone.embed.weight])
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)
    assert not model.reference_head.requires_grad

    # precomputed reference log-probs take precedence over the on-the-fly reference head,
    # which then is not run at all
    import moelora.methods.moe_dpo as moe_dpo
    seen = []
    real = moe_dpo.expert_logprobs

    def spy(*args, **kwargs):
        seen.append(kwargs.get("ref_head"))
        return real(*args, **kwargs)

    moe_dpo.expert_logprobs = spy
    try:
        pre = model(*chosen, *rejected, reference_chosen_logps=rc + 1.0, reference_rejected_logps=rr)
    finally:
        moe_dpo.expert_logprobs = real
    torch.testing.assert_close(pre.margins, out.margins - 0.3)
    assert seen == [None]
