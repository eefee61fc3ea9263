"""MoEDPOModel with one frozen reference head per expert, and the Gumbel objective through it."""
import pytest
import torch
import torch.nn as nn

from moelora.losses import mixture_dpo_loss
from moelora.methods.moe_dpo import FixedMixture, MoEDPOModel


class _Embed(nn.Module):
    def __init__(self, V, d):
        super().__init__()
        self.e = nn.Embedding(V, d)

    def forward(self, ids, attention_mask=None):
        return self.e(ids)


def _seqlogp(hidden, head, labels):
    logp = torch.log_softmax(hidden[:, :-1] @ head.t(), -1)
    y = labels[:, 1:]
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(y != -100, picked, 0.0).sum(1)


@pytest.mark.parametrize("objective", ["em", "gumbel"])
def test_per_expert_reference_heads(objective):
    torch.manual_seed(0)
    V, d, K, B, S = 11, 6, 3, 2, 5
    backbone = _Embed(V, d)
    heads, refs = torch.randn(K, V, d), torch.randn(K, V, d)
    model = MoEDPOModel(backbone, heads, FixedMixture(K), reference_head=refs, beta=0.5,
                        objective=objective, backend="torch")
    ids_w, ids_l = torch.randint(0, V, (B, S)), torch.randint(0, V, (B, S))
    lab_w, lab_l = ids_w.clone(), ids_l.clone()
    lab_w[:, :2] = -100
    lab_l[:, :2] = -100
    mask = torch.ones(B, S, dtype=torch.long)
    torch.manual_seed(1)
    out = model(ids_w, mask, lab_w, ids_l, mask, lab_l)
    with torch.no_grad():
        hw, hl = backbone(ids_w), backbone(ids_l)
        pw = torch.stack([_seqlogp(hw, heads[k], lab_w) for k in range(K)], 1)
        pl = torch.stack([_seqlogp(hl, heads[k], lab_l) for k in range(K)], 1)
        rw = torch.stack([_seqlogp(hw, refs[k], lab_w) for k in range(K)], 1)
        rl = torch.stack([_seqlogp(hl, refs[k], lab_l) for k in range(K)], 1)
    torch.manual_seed(1)
    expected = mixture_dpo_loss(pw, pl, rw, rl, beta=0.5, objective=objective,
                                log_weights=torch.full((K,), -torch.log(torch.tensor(float(K)))))
    torch.testing.assert_close(out.margins, expected.margins, rtol=1e-5, atol=1e-5)
    if objective == "em":
        torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="per expert"):
        MoEDPOModel(backbone, heads, FixedMixture(K), reference_head=torch.randn(2, V, d))


@pytest.mark.parametrize("per_expert_ref", [False, True])
def test_fused_equals_unfused(per_expert_ref):
    from moelora.methods.moe_dpo import SequenceGate

    torch.manual_seed(0)
    V, d, K, B, S = 13, 8, 2, 3, 6
    heads = torch.randn(K, V, d)
    ref = torch.randn(K, V, d) if per_expert_ref else torch.randn(V, d)
    ids_w, ids_l = torch.randint(0, V, (B, S)), torch.randint(0, V, (B, S))
    lab_w, lab_l = ids_w.clone(), ids_l.clone()
    lab_w[:, :2] = -100
    lab_l[:, :3] = -100
    mask = torch.ones(B, S, dtype=torch.long)
    outs, grads = [], []
    for fused in (False, True):
        torch.manual_seed(3)
        backbone, gate = _Embed(V, d), SequenceGate(d, K)
        nn.init.normal_(gate.proj.weight)
        model = MoEDPOModel(backbone, heads, gate, reference_head=ref, backend="torch", fused=fused)
        out = model(ids_w, mask, lab_w, ids_l, mask, lab_l)
        out.loss.backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1].margins, outs[0].margins, rtol=1e-5, atol=1e-6)
    for g1, g0 in zip(grads[1], grads[0]):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)


class _LM(nn.Module):
    def __init__(self, V, d):
        super().__init__()
        self.e, self.h = nn.Embedding(V, d), nn.Linear(d, V, bias=False)

    def forward(self, ids, attention_mask=None):
        return self.h(self.e(ids))


def test_independent_variant_matches_hand_composition():
    from moelora.methods.moe_dpo import IndependentMoEDPOModel, moe_dpo_model

    torch.manual_seed(0)
    V, d, K, B, S = 9, 4, 2, 2, 5
    policies = [_LM(V, d) for _ in range(K)]
    refs = [_LM(V, d) for _ in range(K)]
    model = moe_dpo_model("independent", policies, FixedMixture(K), _Embed(V, d), refs, beta=0.3)
    assert isinstance(model, IndependentMoEDPOModel)
    ids_w, ids_l = torch.randint(0, V, (B, S)), torch.randint(0, V, (B, S))
    lab_w, lab_l = ids_w.clone(), ids_l.clone()
    lab_w[:, :2] = -100
    lab_l[:, :2] = -100
    mask = torch.ones(B, S, dtype=torch.long)
    out = model(ids_w, mask, lab_w, ids_l, mask, lab_l)

    def lp(m, ids, lab):
        logp = torch.log_softmax(m(ids)[:, :-1], -1)
        y = lab[:, 1:]
        return torch.where(y != -100, logp.gather(-1, y.clamp(min=0)[..., None])[..., 0], 0.0).sum(1)

    pw = torch.stack([lp(p, ids_w, lab_w) for p in policies], 1)
    pl = torch.stack([lp(p, ids_l, lab_l) for p in policies], 1)
    rw = torch.stack([lp(r, ids_w, lab_w) for r in refs], 1).detach()
    rl = torch.stack([lp(r, ids_l, lab_l) for r in refs], 1).detach()
    expected = mixture_dpo_loss(pw, pl, rw, rl, beta=0.3)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert all(p.grad is not None for p in policies[0].parameters())
    assert all(p.grad is None for p in refs[0].parameters())
    with pytest.raises(ValueError, match="variant"):
        moe_dpo_model("bogus")
