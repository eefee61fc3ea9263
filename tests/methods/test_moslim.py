"""MOSLIM: the fused heads equal N separate heads; masked CE; scalar reward and its statistics."""
import pytest
import torch
import torch.nn.functional as F

from moelora.layers import last_token_hidden
from moelora.methods.moslim import MultiObjectiveRewardHead, MultiObjectiveRewardModel

CLASSES = [3, 1, 5, 2]


def _split(head, logits):
    return list(torch.split(logits, CLASSES, dim=-1))


def test_segmented_softmax_equals_separate_heads():
    head = MultiObjectiveRewardHead(16, CLASSES).double()
    h = torch.randn(4, 7, 16, dtype=torch.float64)
    logits = head(h)
    assert logits.shape == (4, 7, sum(CLASSES))
    # one GEMM for all heads: the only parameters are one [sum C, d] projection (+ bias)
    assert [n for n, _ in head.named_parameters()] == ["proj.weight", "proj.bias"]
    assert head.proj.weight.shape == (sum(CLASSES), 16)
    probs = head.probs(logits)
    assert probs.shape == (4, 7, 4, 5)
    for i, chunk in enumerate(_split(head, logits)):
        torch.testing.assert_close(probs[..., i, :CLASSES[i]], torch.softmax(chunk, -1).float())
        assert (probs[..., i, CLASSES[i]:] == 0).all()


def test_masked_cross_entropy():
    head = MultiObjectiveRewardHead(16, CLASSES)
    logits = head(torch.randn(6, 16))
    labels = torch.tensor([[0, 0, 4, -1], [2, -1, -1, 1], [-1, -1, -1, -1],
                           [1, 0, 0, 0], [-1, 0, 3, -1], [2, 0, 1, 1]])
    loss = head.loss(logits, labels)
    terms = []
    for i, chunk in enumerate(_split(head, logits)):
        keep = labels[:, i] >= 0
        if keep.any():
            terms.append(F.cross_entropy(chunk[keep], labels[keep, i], reduction="none"))
    torch.testing.assert_close(loss, torch.cat(terms).mean())
    loss.backward()
    assert head.proj.weight.grad is not None
    assert head.loss(logits.detach(), torch.full((6, 4), -1)).item() == 0.0


def test_reward_and_running_statistics():
    head = MultiObjectiveRewardHead(8, CLASSES).train()
    seen = [[] for _ in CLASSES]
    for _ in range(3):
        logits = head(torch.randn(5, 8))
        targets = torch.stack([torch.randint(0, c, (5,)) for c in CLASSES], -1)
        mask = torch.rand(5, 4) > 0.4
        mask[0] = True
        probs = head.probs(logits)
        scores = probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).detach()
        for i in range(4):
            seen[i] += scores[mask[:, i], i].tolist()
        r = head.reward(logits, targets, mask)
        mean = torch.tensor([torch.tensor(s).mean() for s in seen])
        var = torch.tensor([torch.tensor(s).var(unbiased=False) for s in seen])
        torch.testing.assert_close(head.running_mean, mean)
        torch.testing.assert_close(head.running_var, var, rtol=1e-4, atol=1e-6)
        z = (scores - mean) / torch.sqrt(var + head.eps)
        expected = (z * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        torch.testing.assert_close(r, expected, rtol=1e-4, atol=1e-5)
    head.eval()
    before = head.running_mean.clone()
    head.reward(logits, targets, mask)
    assert torch.equal(head.running_mean, before)
    # no objective requested: reward 0
    assert head.reward(logits, targets, torch.zeros(5, 4, dtype=torch.bool)).abs().max() == 0
    state = head.state_dict()
    assert {"running_mean", "running_var", "num_samples"} <= set(state)


def test_ema_statistics_and_last_token():
    head = MultiObjectiveRewardHead(8, [2, 2], momentum=0.5).train()
    logits = head(torch.randn(3, 8))
    head.reward(logits, torch.zeros(3, 2, dtype=torch.long), torch.tensor([[1, 0]] * 3).bool())
    assert head.running_mean[1] == 0 and head.running_var[1] == 1  # objective 1 not requested
    assert 0 < head.running_mean[0] < 0.5
    hidden = torch.arange(2 * 4 * 1.0).reshape(2, 4, 1)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])  # right padding, left padding
    assert last_token_hidden(hidden, mask).flatten().tolist() == [1.0, 7.0]
    assert last_token_hidden(hidden).flatten().tolist() == [3.0, 7.0]


def test_reward_model_wrapper():
    class Backbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)

        def forward(self, input_ids, attention_mask=None):
            return self.emb(input_ids)

    model = MultiObjectiveRewardModel(Backbone(), 8, [3, 2])
    ids = torch.randint(0, 10, (2, 5))
    out = model(ids, attention_mask=torch.ones(2, 5))
    assert out.shape == (2, 5)
    with pytest.raises(ValueError):
        MultiObjectiveRewardHead(8, [])


def test_out_of_range_levels_are_named():
    head = MultiObjectiveRewardHead(8, [3, 5])
    logits = head(torch.randn(2, 8))
    # level 3 of objective 0 is a padding class of the fused [N, C_max] layout: an infinite
    # loss if it went through; level 5 would index past C_max
    for bad in ([[3, 0], [0, 0]], [[0, 5], [0, 0]], [[0, 0], [-2, 0]]):
        with pytest.raises(ValueError, match=r"a level in \[0, C_i\) of its objective, C = \[3, 5\]; got "):
            head.loss(logits, torch.tensor(bad))
        with pytest.raises(ValueError, match=r"a level in \[0, C_i\) of its objective, C = \[3, 5\]; got "):
            head.reward(logits, torch.tensor(bad))
    assert torch.isfinite(head.loss(logits, torch.tensor([[2, 4], [-1, 0]])))
