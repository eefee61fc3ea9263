"""MoLoRADPOTrainer: TRL's DPOTrainer on a PMoL-injected tiny Llama (offline, CPU, a few steps)."""
import importlib.util
import math
import pathlib

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("trl")

from moelora.integrations import inject  # noqa: E402
from moelora.layers import molora_layers  # noqa: E402
from moelora.methods.pmol import PMoLConfig  # noqa: E402

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "trl_dpo_tiny.py"


def _example():
    spec = importlib.util.spec_from_file_location("example_trl_dpo_tiny", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trainer(tmp_path, dataset, steps=3, config_kwargs=None, **kwargs):
    from trl import DPOConfig

    from moelora.integrations.trl_dpo import MoLoRADPOTrainer

    ex = _example()
    tokenizer = ex.tiny_tokenizer()
    model = ex.tiny_llama(len(tokenizer))
    pmol = PMoLConfig(num_preferences=2, experts_per_preference=2, r=4, lora_alpha=8, top_k=2,
                      target_modules=["q_proj", "v_proj"], group_loss_weight=0.5)
    inject(model, pmol)
    # transformers' default optimizer (fused AdamW on CPU: no version-counter bump) on purpose
    config = DPOConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                       beta=0.5, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                       disable_tqdm=True, **(config_kwargs or {}))
    trainer = MoLoRADPOTrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer,
                               aux_weights=pmol, **kwargs)
    return trainer, model


def _logged(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_only_router_and_expert_parameters_move_and_aux_is_logged(tmp_path):
    ex = _example()
    trainer, model = _trainer(tmp_path, ex.preference_pairs(8))
    assert trainer.args.remove_unused_columns  # the label column survives TRL's pruning anyway
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    adapter = {name for name in before if ".lora_A." in name or ".lora_B." in name or ".router." in name}
    assert moved, "nothing trained"
    assert moved <= adapter, f"base weights changed: {sorted(moved - adapter)}"
    assert any(".router." in name for name in moved) and any(".lora_B." in name for name in moved)
    logs = _logged(trainer)
    assert len(logs) == 3
    for entry in logs:
        for key in ("aux/group", "aux/balance", "aux/z", "aux/total"):
            assert key in entry and math.isfinite(entry[key]), (key, entry)
        assert entry["aux/group"] > 0  # the preference labels reached the group loss
        w = {"group": 0.5, "balance": 0.01, "z": 0.001}
        total = sum(w[k] * entry[f"aux/{k}"] for k in w)
        assert entry["aux/total"] == pytest.approx(total, rel=1e-4)
    # fresh experts (B = 0): policy == reference, so the DPO part is log 2 and the aux total is on top
    assert logs[0]["rewards/margins"] == 0
    assert logs[0]["loss"] == pytest.approx(math.log(2) + logs[0]["aux/total"], rel=1e-3)


def test_reference_is_the_model_with_adapters_disabled(tmp_path):
    from moelora.integrations.trl_dpo import AdaptersDisabledReference

    ex = _example()
    dataset = ex.preference_pairs(8)
    trainer, model = _trainer(tmp_path, dataset)
    assert isinstance(trainer.ref_model, AdaptersDisabledReference)
    assert list(trainer.ref_model.parameters()) == []  # no second copy
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    assert batch["preference_labels"].tolist() == [0, 1, 0, 1]
    batch = {k: v for k, v in batch.items() if k != "preference_labels"}
    with torch.no_grad():
        base_chosen, base_rejected = trainer.compute_ref_log_probs(model, batch)  # B = 0: the base model
    trainer.train()
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    policy_chosen, policy_rejected = trainer.compute_ref_log_probs(model, batch)
    torch.testing.assert_close(ref_chosen, base_chosen)
    torch.testing.assert_close(ref_rejected, base_rejected)
    assert not torch.allclose(policy_chosen, base_chosen)  # the policy moved, the reference did not
    assert not any(layer.disabled for _, layer in molora_layers(model))
    assert any(entry["rewards/margins"] != 0 for entry in _logged(trainer)[1:])


def test_without_labels_the_group_loss_is_zero(tmp_path):
    ex = _example()
    trainer, _ = _trainer(tmp_path, ex.preference_pairs(8).remove_columns("preference_label"), steps=1)
    trainer.train()
    entry = _logged(trainer)[0]
    assert entry["aux/group"] == 0 and entry["aux/balance"] > 0


def test_bad_arguments(tmp_path):
    from moelora.integrations.trl_dpo import MoLoRADPOTrainer

    ex = _example()
    with pytest.raises(ValueError, match="no MoLoRALinear"):
        MoLoRADPOTrainer(ex.tiny_llama(len(ex.WORDS) + 3))
    trainer_kwargs = {"aux_weights": [0.1]}
    with pytest.raises(TypeError, match="aux_weights"):
        _trainer(tmp_path, ex.preference_pairs(4), **trainer_kwargs)


def test_precomputed_reference(tmp_path):
    from trl.trainer.utils import hash_module

    from moelora.integrations.trl_dpo import AdaptersDisabledReference

    ex = _example()
    trainer, model = _trainer(tmp_path, ex.preference_pairs(8), steps=2,
                              config_kwargs={"precompute_ref_log_probs": True})
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    trainer.train()
    logs = _logged(trainer)
    assert logs[0]["rewards/margins"] == 0 and logs[0]["aux/group"] > 0
    # the precompute cache is named by the reference's weights: different bases, different names
    other = ex.tiny_llama(len(ex.WORDS) + 3, seed=1)
    inject(other, PMoLConfig(num_preferences=2, experts_per_preference=2, r=4, target_modules=["q_proj"]))
    ref = AdaptersDisabledReference(model)
    assert hash_module(ref) != hash_module(AdaptersDisabledReference(other))
    assert not any(".lora_" in key or ".router." in key for key in ref.state_dict())
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in ref.state_dict()


@pytest.mark.parametrize("precompute", [False, True])
def test_evaluate(tmp_path, precompute):
    ex = _example()
    trainer, _ = _trainer(tmp_path, ex.preference_pairs(4), steps=1, eval_dataset=ex.preference_pairs(4, seed=1),
                          config_kwargs={"precompute_ref_log_probs": precompute})
    metrics = trainer.evaluate()
    # fresh experts: policy == reference; an eval-mode forward records no routing, so no aux terms
    assert metrics["eval_loss"] == pytest.approx(math.log(2), rel=1e-4)
    assert not any(key.startswith("eval_aux/") for key in metrics)
