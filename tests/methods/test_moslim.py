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


# --- prompt format, GRPO reward function, Trainer-style loss (issue 16.4) ---------------------
import math

from moelora.methods.moslim import format_objectives, moslim_reward_function, objective_targets, parse_objectives


def test_objectives_tag_round_trip():
    req = {"helpfulness": 3, "harmlessness": 1}
    tag = format_objectives(req)
    assert tag == "[objectives: helpfulness=3, harmlessness=1]"
    assert parse_objectives(tag) == req
    assert list(parse_objectives(tag)) == ["helpfulness", "harmlessness"]  # order kept
    assert parse_objectives("User: hi\n[objectives:humor=0 ,  brevity = 12]\nAssistant:") == {"humor": 0, "brevity": 12}


@pytest.mark.parametrize("text", [
    "no tag here", "[objectives: ]", "[objectives: a=1,]", "[objectives: a=-1]", "[objectives: a=1.5]",
    "[objectives: a=1, a=2]", "[objectives: 1a=1]", "[objectives: a]", "[objectives: a=1] [objectives: b=1]",
])
def test_parse_objectives_rejects_malformed(text):
    with pytest.raises(ValueError):
        parse_objectives(text)


@pytest.mark.parametrize("bad", [{}, {"a b": 1}, {"a": -1}, {"a": 1.0}, {"a": True}])
def test_format_objectives_rejects_bad(bad):
    with pytest.raises(ValueError):
        format_objectives(bad)


def test_objective_targets():
    prompts = ["[objectives: b=2] x", "[objectives: a=0, b=1]"]
    assert objective_targets(prompts, ["a", "b"]).tolist() == [[-1, 2], [0, 1]]
    with pytest.raises(ValueError, match="unknown objective 'c'"):
        objective_targets(["[objectives: c=0]"], ["a", "b"])
    with pytest.raises(ValueError, match="3 levels"):
        objective_targets(["[objectives: b=3]"], ["a", "b"], [2, 3])


class _Embed(torch.nn.Embedding):
    """A backbone taking input_ids: token embeddings as hidden states."""

    def forward(self, input_ids, attention_mask=None):
        return super().forward(input_ids)


class _CharTokenizer:
    """HF-style call: byte ids, right padding, attention mask."""

    def __call__(self, texts, return_tensors="pt", padding=True, truncation=False, max_length=None):
        ids = [list(t.encode())[:max_length] if truncation else list(t.encode()) for t in texts]
        n = max(len(i) for i in ids)
        return {"input_ids": torch.tensor([i + [0] * (n - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids])}


def _fixed_model():
    """Objectives a (2 levels), b (3 levels); zero weights, so p comes from the bias alone:
    p_a = (1/4, 3/4), p_b = (1/4, 1/4, 1/2). Running stats mu = (0.25, 0.5), sigma = 0.25."""
    model = MultiObjectiveRewardModel(_Embed(256, 4), 4, [2, 3])
    with torch.no_grad():
        model.head.proj.weight.zero_()
        model.head.proj.bias.copy_(torch.tensor([0.0, math.log(3), 0.0, 0.0, math.log(2)]))
        model.head.running_mean.copy_(torch.tensor([0.25, 0.5]))
        model.head.running_var.fill_(0.0625 - model.head.eps)
    return model


def test_reward_function_hand_computed():
    model = _fixed_model()
    f = moslim_reward_function(model, _CharTokenizer(), ["a", "b"])
    assert f.__name__ == "moslim_reward" and callable(f)
    prompts = ["[objectives: a=1, b=2] Q:", "[objectives: b=0] Q:", "Q: [objectives: a=0]"]
    rewards = f(prompts, [" yes", " a longer answer", ""], completion_ids=None)
    # a=1: (3/4 - 1/4)/(1/4) = 2, b=2: (1/2 - 1/2)/(1/4) = 0 -> mean 1
    # b=0: (1/4 - 1/2)/(1/4) = -1;  a=0: (1/4 - 1/4)/(1/4) = 0
    assert rewards == pytest.approx([1.0, -1.0, 0.0], abs=1e-5)
    assert isinstance(rewards, list) and all(isinstance(r, float) for r in rewards)
    torch.testing.assert_close(model.head.running_mean, torch.tensor([0.25, 0.5]))  # stats only read
    # the way TRL's GRPOTrainer calls a reward function: keywords plus extras
    assert f(prompts=prompts, completions=[" yes", "", "z"], completion_ids=[[1], [], [2]], trainer_state=None,
             log_extra=print, log_metric=print) == pytest.approx([1.0, -1.0, 0.0], abs=1e-5)
    # conversational prompts / completions (TRL's chat format), chunked scoring
    chat = [[{"role": "user", "content": "[objectives: b=0] Q:"}]]
    g = moslim_reward_function(model, _CharTokenizer(), ["a", "b"], batch_size=1, name="rm")
    assert g.__name__ == "rm"
    assert g(chat * 2, [[{"role": "assistant", "content": "x"}]] * 2) == pytest.approx([-1.0, -1.0], abs=1e-5)
    with pytest.raises(ValueError, match="2 prompts for 1"):
        f(prompts[:2], ["x"])
    with pytest.raises(ValueError, match="objective_names"):
        moslim_reward_function(model, _CharTokenizer(), ["a"])


def test_reward_function_reads_the_model():
    """Trained weights change the reward: right-padded batches score each text's last token."""
    torch.manual_seed(0)
    model = MultiObjectiveRewardModel(_Embed(256, 8), 8, [2, 3])
    f = moslim_reward_function(model, _CharTokenizer(), ["a", "b"])
    texts = ["[objectives: a=1] hi", "[objectives: a=1] a much longer prompt"]
    tok = _CharTokenizer()
    for text, r in zip(texts, f(texts, ["!", "?"])):
        enc = tok([text + ("!" if text.endswith("hi") else "?")])
        logits = model(**enc)
        expected = model.head.reward(logits, torch.tensor([[1, -1]]), update_stats=False)
        assert r == pytest.approx(expected.item(), abs=1e-6)


def test_forward_with_labels_is_trainer_style():
    torch.manual_seed(0)
    model = MultiObjectiveRewardModel(_Embed(256, 8), 8, [2, 3])
    ids = torch.randint(0, 256, (3, 5))
    mask = torch.ones_like(ids)
    logits = model(ids, mask)
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 5)  # unchanged without labels
    labels = torch.tensor([[1, -100], [-100, 2], [0, 1]])
    out = model(ids, mask, labels=labels)
    assert set(out) == {"loss", "logits"}
    torch.testing.assert_close(out["logits"], logits)
    # hand-computed masked CE over the 4 labelled (sample, head) pairs
    la, lb = torch.log_softmax(logits[:, :2], -1), torch.log_softmax(logits[:, 2:], -1)
    expected = -(la[0, 1] + lb[1, 2] + la[2, 0] + lb[2, 1]) / 4
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert model.head.proj.weight.grad is not None and model.backbone.weight.grad.abs().sum() > 0
    # a few optimiser steps lower the loss (what HF Trainer would do with this output)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    first = None
    for _ in range(20):
        loss = model(ids, mask, labels=labels)["loss"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_hf_trainer_trains_the_reward_model(tmp_path):
    """Trainer needs no subclass: forward(labels=...) gives the loss, and Trainer's
    num_items_in_batch never reaches the backbone (which would reject it)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = MultiObjectiveRewardModel(_Embed(256, 8), 8, [2, 3])
    data = [{"input_ids": torch.randint(0, 256, (5,)), "attention_mask": torch.ones(5, dtype=torch.long),
             "labels": torch.tensor([i % 2, -100 if i % 3 else 2])} for i in range(16)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
                                          learning_rate=0.05, report_to=[], logging_steps=1, save_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0], losses
