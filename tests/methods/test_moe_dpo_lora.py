"""MoELoRADPOModel (spec §5, LoRA experts in the backbone) on a tiny Llama built from a config
(no downloads): per-expert log-probs from one K-times-replicated pass vs K separate passes,
fresh experts = the reference, gradients, and a few training steps."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from moelora.integrations import MoLoRAConfig, inject
from moelora.integrations import disable_adapters, set_gates
from moelora.layers import molora_layers
from moelora.losses.dpo import mixture_dpo_loss
from moelora.methods.moe_dpo import FixedMixture, MoELoRADPOModel, SequenceGate

from helpers import bound, rel_error

transformers = pytest.importorskip("transformers")

V, D, K = 64, 32, 3
ONE_HOT = {"type": "fixed", "k": 1}  # each token computes its own expert only


def _tiny_llama(num_experts=K, router=ONE_HOT, dtype=torch.float32, layers=1):
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    inject(model, MoLoRAConfig(target_modules="all-linear", num_experts=num_experts, r=4,
                               lora_alpha=8, router=router))
    return model


def _perturb_experts(model, std=0.05, seed=1):
    """Non-zero B (and so distinct experts): a fresh expert (B = 0) is the base model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in molora_layers(model):
            noise = torch.randn(layer.lora_B.weight.shape, generator=gen) * std
            layer.lora_B.weight.copy_(noise.to(layer.lora_B.weight.dtype))


def _pairs(B=3, prompt=4, chosen_len=7, rejected_len=5, seed=2):
    """B pairs sharing a prompt; chosen and rejected of different lengths (rejected padded in
    the batch), and one chosen sequence right-padded inside its own batch."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, V, (B, prompt), generator=gen)

    def side(length):
        ids = torch.cat([prompts, torch.randint(0, V, (B, length - prompt), generator=gen)], 1)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        labels[:, :prompt] = -100
        return ids, mask, labels

    chosen, rejected = side(chosen_len), side(rejected_len)
    chosen[1][0, -2:] = 0  # the first chosen response is 2 tokens shorter: padding
    chosen[2][0, -2:] = -100
    return chosen, rejected


def _flat(pairs):
    chosen, rejected = pairs
    return (*chosen, *rejected)


def _hf_logps(model, ids, mask, labels):
    """Sequence log-probs of each row through the full HF causal LM, one unpadded row at a time."""
    out = []
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        logits = model(input_ids=ids[i:i + 1, :n]).logits[0, :-1].double()
        target = labels[i, 1:n]
        keep = target != -100
        out.append(torch.log_softmax(logits, -1)[keep].gather(1, target[keep, None]).sum())
    return torch.stack(out)


def _batched(chosen, rejected):
    """The wrapper's padded 2B-row batch (what MoELoRADPOModel.forward builds)."""
    S = max(chosen[0].shape[1], rejected[0].shape[1])
    pad = lambda t, v: torch.nn.functional.pad(t, (0, S - t.shape[1]), value=v)
    return (torch.cat([pad(chosen[0], 0), pad(rejected[0], 0)]),
            torch.cat([pad(chosen[1], 0), pad(rejected[1], 0)]),
            torch.cat([pad(chosen[2], -100), pad(rejected[2], -100)]))


def _separate_passes(model, ids, mask, labels):
    """Per-expert ``[N, K]`` (K passes, expert k alone via set_gates) and base ``[N]`` log-probs."""
    with torch.no_grad():
        per_expert = []
        for k in range(K):
            set_gates(model, torch.nn.functional.one_hot(torch.tensor(k), K).float())
            per_expert.append(_hf_logps(model, ids, mask, labels))
        set_gates(model, None)
        with disable_adapters(model):
            base = _hf_logps(model, ids, mask, labels)
    return torch.stack(per_expert, 1), base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("router", [ONE_HOT, "fixed"], ids=["fixed-k1", "fixed-dense"])
def test_per_expert_logprobs_match_separate_passes(router, dtype):
    model32 = _tiny_llama(router=router)
    _perturb_experts(model32)
    model = copy.deepcopy(model32).to(dtype)
    gate = SequenceGate(D, K)
    torch.nn.init.normal_(gate.proj.weight)
    policy = MoELoRADPOModel.from_causal_lm(model, gate, beta=0.2)
    chosen, rejected = _pairs()
    ids, mask, labels = _batched(chosen, rejected)
    with torch.no_grad():
        logps, ref, log_w = policy.sequence_logprobs(ids, mask, labels, gate_rows=3)
        with disable_adapters(model):
            base_hidden = model.model(ids, attention_mask=mask).last_hidden_state[:3]
    assert logps.shape == (6, K) and ref.shape == (6,) and log_w.shape == (3, K)
    assert all(layer.router.gates is None for _, layer in molora_layers(model))  # this pass only
    want, want_ref = _separate_passes(model, ids, mask, labels)  # same dtype, unpadded rows
    truth, truth_ref = _separate_passes(copy.deepcopy(model32).double(), ids, mask, labels)
    if dtype == torch.float32:
        torch.testing.assert_close(logps, want.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref, want_ref.float(), rtol=1e-5, atol=1e-5)
    # at most twice the error of the HF model's own passes at this precision (vs fp64)
    assert rel_error(logps, truth) <= bound(dtype, rel_error(want, truth))
    assert rel_error(ref, truth_ref) <= bound(dtype, rel_error(want_ref, truth_ref))
    # the experts differ from each other and from the base (so the checks above mean something)
    assert (truth - truth_ref[:, None]).abs().mean() > 1e-2
    # the gate pools the base model's prompt states (attended, unlabelled tokens)
    torch.testing.assert_close(log_w, gate(base_hidden, (labels[:3] == -100) & mask[:3].bool()))

    # the loss is mixture_dpo_loss of those log-probs
    out = policy(*chosen, *rejected)
    expect = mixture_dpo_loss(logps[:3], logps[3:], ref[:3], ref[3:], log_weights=log_w, beta=0.2)
    torch.testing.assert_close(out.loss, expect.loss, rtol=1e-5, atol=1e-5)


def test_fresh_experts_are_the_reference():
    model = _tiny_llama()  # B = 0: every expert is the base model
    policy = MoELoRADPOModel.from_causal_lm(model, SequenceGate(D, K), objective="mixture")
    chosen, rejected = _pairs()
    logps, ref, _ = policy.sequence_logprobs(*_batched(chosen, rejected), gate_rows=3)
    torch.testing.assert_close(logps, ref[:, None].expand(-1, K), rtol=1e-6, atol=1e-5)
    out = policy(*chosen, *rejected)
    torch.testing.assert_close(out.margins, torch.zeros(3, K), rtol=0, atol=1e-5)
    # every sigmoid(D_k) = 1/2: the mixture likelihood is log 2 whatever the weights
    torch.testing.assert_close(out.loss, torch.tensor(math.log(2.0)), rtol=0, atol=1e-5)


def test_gradients_reach_experts_and_gate_only():
    model = _tiny_llama()
    _perturb_experts(model)
    gate = SequenceGate(D, K)
    policy = MoELoRADPOModel.from_causal_lm(model, gate)
    policy.train()
    out = policy(*_flat(_pairs()))
    out.loss.backward()
    assert gate.proj.weight.grad is not None and gate.proj.weight.grad.abs().sum() > 0
    layers = list(molora_layers(model))
    assert len(layers) == 7  # q k v o gate up down
    for name, layer in layers:
        for weight in (layer.lora_A.weight, layer.lora_B.weight):
            assert weight.grad is not None, name
            # every expert is trained by its own replica
            assert (weight.grad.flatten(1).abs().sum(1) > 0).all(), name
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert not p.requires_grad and p.grad is None, name
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("gate.") for n in trainable), trainable


def test_precomputed_reference_skips_the_reference_rows():
    model = _tiny_llama()
    _perturb_experts(model)
    policy = MoELoRADPOModel.from_causal_lm(model, SequenceGate(D, K), beta=0.3)
    chosen, rejected = _pairs()
    rows = []  # the batch size of every backbone pass
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append((args[0] if args else kwargs["input_ids"]).shape[0]),
        with_kwargs=True)
    try:
        out = policy(*chosen, *rejected)
        ref = policy.sequence_logprobs(*_batched(chosen, rejected))[1]
        pre = policy(*chosen, *rejected, reference_chosen_logps=ref[:3] + 1.0,
                     reference_rejected_logps=ref[3:])
    finally:
        hook.remove()
    # on the fly: base pass over 2B rows, expert pass over K * 2B; precomputed: the gate's B rows
    assert rows == [6, 6 * K, 6, 6 * K, 3, 6 * K]
    torch.testing.assert_close(pre.margins, out.margins - 0.3)


def test_gate_sees_the_base_model_only():
    model = _tiny_llama()
    gate = SequenceGate(D, K)
    torch.nn.init.normal_(gate.proj.weight)
    policy = MoELoRADPOModel.from_causal_lm(model, gate)
    ids, mask, labels = _batched(*_pairs())
    before = policy.gate_weights(ids, mask, labels)
    _perturb_experts(model, std=0.5)
    torch.testing.assert_close(policy.gate_weights(ids, mask, labels), before, rtol=0, atol=0)
    torch.testing.assert_close(before.sum(-1), torch.ones(6))


def test_lm_head_as_tensor_and_plain_backbone():
    model = _tiny_llama()
    _perturb_experts(model)
    chosen, rejected = _pairs()
    a = MoELoRADPOModel.from_causal_lm(model, FixedMixture(K))(*chosen, *rejected)
    b = MoELoRADPOModel(model.model, model.lm_head.weight, FixedMixture(K))(*chosen, *rejected)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)


def test_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="no MoLoRALinear"):
        MoELoRADPOModel(torch.nn.Linear(4, 4), torch.randn(8, 4), FixedMixture(2))
    with pytest.raises(ValueError, match="fixed-gate router"):
        MoELoRADPOModel.from_causal_lm(_tiny_llama(router="dense"), FixedMixture(K))
    with pytest.raises(ValueError, match="gate mixes 2"):
        MoELoRADPOModel.from_causal_lm(_tiny_llama(), SequenceGate(D, 2))
    model = _tiny_llama()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    policy = MoELoRADPOModel.from_causal_lm(model, SequenceGate(D, K)).train()
    with pytest.raises(RuntimeError, match="checkpointing"):  # the recomputation cannot see the gates
        policy(*_flat(_pairs())).loss.backward()


def _two_domain_batch(num_pairs, gen, prompt=4, response=4):
    """Domain token 1 (A) or 2 (B), filler, SEP (3); A prefers low content tokens, B high."""
    half = 4 + (V - 4) // 2
    domain = torch.randint(0, 2, (num_pairs,), generator=gen)
    filler = torch.randint(4, V, (num_pairs, prompt - 2), generator=gen)
    prompts = torch.cat([(1 + domain)[:, None], filler, torch.full((num_pairs, 1), 3)], 1)
    low = torch.randint(4, half, (num_pairs, response), generator=gen)
    high = torch.randint(half, V, (num_pairs, response), generator=gen)
    a = domain[:, None] == 0

    def side(resp):
        ids = torch.cat([prompts, resp], 1)
        return ids, torch.ones_like(ids), torch.cat([torch.full_like(prompts, -100), resp], 1)

    return side(torch.where(a, low, high)), side(torch.where(a, high, low))


STEPS, LR = 25, 1e-2  # ~0.1 s a step on 2 CPU cores


@pytest.mark.parametrize("objective,dtype", [("em", torch.float32), ("mixture", torch.float32),
                                             ("em", torch.bfloat16)], ids=["em", "mixture", "em-bf16"])
def test_training_lowers_the_loss(objective, dtype):
    model = _tiny_llama(num_experts=2, dtype=dtype)
    _perturb_experts(model, std=0.01)  # break the experts' symmetry
    policy = MoELoRADPOModel.from_causal_lm(model, SequenceGate(D, 2), beta=1.0,
                                            objective=objective).train()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=LR)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(STEPS):
        out = policy(*_flat(_two_domain_batch(16, gen)))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses


@pytest.mark.parametrize("objective", ["em", "mixture"])
def test_example_with_lora_experts_learns(objective):
    """examples/moe_dpo_tiny.py --experts-in lora at smoke size: the experts specialise and the
    gate (on the base model's prompt states) learns the domains."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "moe_dpo_tiny.py"
    spec = importlib.util.spec_from_file_location("moe_dpo_tiny_lora", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    summary = example.main(["--experts-in", "lora", "--steps", "30", "--batch-size", "32",
                            "--log-every", "0", "--objective", objective, "--backend", "torch"])
    assert summary["last_loss"] < 0.5 * summary["first_loss"], summary
    assert summary["initial_separation"] < 0.05, summary
    assert summary["separation"] > 0.5, summary


def test_per_expert_frozen_lora_reference():
    """reference_experts='snapshot': expert k's reference is expert k as it was (a frozen LoRA
    set, e.g. per-expert SFT), not the base model; training the experts leaves it alone."""
    model = _tiny_llama()
    _perturb_experts(model)
    policy = MoELoRADPOModel.from_causal_lm(model, SequenceGate(D, K), reference_experts="snapshot")
    batch = _batched(*_pairs())
    logps, ref, _ = policy.sequence_logprobs(*batch)
    assert ref.shape == logps.shape == (6, K)
    torch.testing.assert_close(ref, logps.detach(), rtol=0, atol=1e-6)  # unchanged experts: equal
    base = MoELoRADPOModel.from_causal_lm(model, SequenceGate(D, K)).sequence_logprobs(*batch)[1]
    assert (ref - base[:, None]).abs().max() > 1e-3  # not the base model's reference
    _perturb_experts(model, seed=7)  # "training" moves the live experts
    logps2, ref2, _ = policy.sequence_logprobs(*batch)
    torch.testing.assert_close(ref2, ref, rtol=0, atol=1e-6)
    assert (logps2 - ref2).abs().max() > 1e-3
    out = policy(*_pairs()[0], *_pairs()[1])
    out.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n)


def test_reference_experts_dict_is_checked():
    model = _tiny_llama()
    names = [n for n, _ in model.base_model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    with pytest.raises(ValueError, match="missing"):
        MoELoRADPOModel.from_causal_lm(model, SequenceGate(D, K), reference_experts={})
    with pytest.raises(ValueError, match="must be None, 'snapshot'"):
        MoELoRADPOModel.from_causal_lm(model, SequenceGate(D, K), reference_experts="base")
    weights = dict(model.base_model.named_parameters())
    policy = MoELoRADPOModel.from_causal_lm(
        model, SequenceGate(D, K), reference_experts={n: torch.zeros_like(weights[n]) for n in names})
    batch = _batched(*_pairs())
    ref = policy.sequence_logprobs(*batch)[1]
    base = MoELoRADPOModel.from_causal_lm(model, SequenceGate(D, K)).sequence_logprobs(*batch)[1]
    torch.testing.assert_close(ref, base[:, None].expand(-1, K), rtol=1e-6, atol=1e-5)  # zero experts = base
