"""TRL's `DPOTrainer` on a moelora-injected model: `MoLoRADPOTrainer`.

What it adds to ``trl.DPOTrainer`` (trl >= 1.16, ``pip install moelora[trl]``):

* **Reference = adapters disabled.** With ``ref_model=None`` the reference log-probs come from the
  same network under `moelora.integrations.disable_adapters` (every MoLoRALinear computes its base
  layer alone), as TRL does for PEFT models: no second copy of the model. This also serves
  ``precompute_ref_log_probs=True``.
* **Aux losses.** After the policy forward (one forward over chosen + rejected), `aux_loss` of the
  routing it recorded (PMoL group / balance / z) is added to the DPO loss with ``aux_weights`` (a
  dict or a `PMoLConfig`; default `DEFAULT_AUX_WEIGHTS`), and each term is logged as
  ``aux/group``, ``aux/balance``, ``aux/z``, ``aux/total`` through TRL's metrics (so they reach
  ``trainer.state.log_history`` and every report_to backend).
* **Preference labels.** A dataset column (``preference_label_column``, default
  ``"preference_label"``; an int group id per pair, -1 = unlabelled, or a list of float weights
  for soft labels) is kept through TRL's column pruning (no ``remove_unused_columns=False``
  needed), collated to ``inputs["preference_labels"]`` and given to the group loss for both the
  chosen and the rejected sequence of each pair. Without the column the group loss is 0.

TRL is imported only by this module (``moelora.integrations`` imports it lazily).
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn as nn

from moelora.integrations.controls import disable_adapters
from moelora.layers.molora_linear import molora_layers
from moelora.losses.pmol import aux_loss

try:
    from trl import DPOTrainer
except ImportError as error:  # pragma: no cover - exercised only without trl
    raise ImportError("moelora.integrations.trl_dpo needs trl >= 1.16: pip install moelora[trl]") from error

__all__ = ["MoLoRADPOTrainer", "AdaptersDisabledReference", "PreferenceLabelCollator"]

AUX_TERMS = ("group", "balance", "z", "total")


class AdaptersDisabledReference(nn.Module):
    """The reference policy as a view of the policy with its adapters disabled.

    TRL calls ``ref_model(**kwargs)`` (with its ``fused_lm_head=True`` keyword, which the policy
    already accepts); this runs the policy itself under `disable_adapters` and no_grad. The policy
    is held outside the module tree on purpose: TRL / accelerate prepare, move and patch the
    reference model, and none of that may touch (or count twice) the policy's parameters.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self._policy = (policy,)  # a tuple: not registered as a submodule

    @property
    def policy(self) -> nn.Module:
        return self._policy[0]

    @property
    def config(self):  # TRL reads the reference's config (e.g. to patch a fused LM head)
        return self.policy.config

    def get_output_embeddings(self):
        return self.policy.get_output_embeddings()

    def state_dict(self, *args, **kwargs):
        # The reference's weights: the policy's minus its adapters. TRL hashes this to name its
        # precompute_ref_log_probs cache; an empty state_dict would give every model one hash.
        adapters = [f"{name}." if name else "" for name, _ in molora_layers(self.policy)]
        return {key: value for key, value in self.policy.state_dict(*args, **kwargs).items()
                if not any(key.startswith(prefix) and not key.startswith(prefix + "base_layer.")
                           for prefix in adapters)}

    def __call__(self, *args, **kwargs):
        # Bypass nn.Module.__call__ and any forward TRL patched onto this wrapper: the policy's own
        # (already patched) forward is the one to run.
        with torch.no_grad(), disable_adapters(self.policy):
            return self.policy(*args, **kwargs)


class PreferenceLabelCollator:
    """Wraps a preference collator: takes ``column`` out of every example, collates the rest with
    ``base``, and adds ``preference_labels``: ``[batch]`` long (one int per pair) or
    ``[batch, P]`` float (a list of weights per pair)."""

    def __init__(self, base: Callable, column: str = "preference_label"):
        self.base = base
        self.column = column

    def __call__(self, examples: list) -> dict:
        if not examples or self.column not in examples[0]:
            return self.base(examples)
        values = [example[self.column] for example in examples]
        rest = [{k: v for k, v in example.items() if k != self.column} for example in examples]
        batch = self.base(rest)
        if isinstance(values[0], (list, tuple)):
            batch["preference_labels"] = torch.tensor(values, dtype=torch.float32)
        elif all(isinstance(v, (int, bool)) or (torch.is_tensor(v) and not v.is_floating_point())
                 for v in values):
            batch["preference_labels"] = torch.tensor([int(v) for v in values], dtype=torch.long)
        else:
            raise TypeError(f"dataset column {self.column!r} must hold an int preference group per pair "
                            f"(-1 = unlabelled) or a list of float weights, got {values[0]!r}")
        return batch


class MoLoRADPOTrainer(DPOTrainer):
    """`trl.DPOTrainer` for a model injected with moelora (see the module docstring).

    Args (besides DPOTrainer's):
        aux_weights: ``{"group", "balance", "z"}`` weights or a `PMoLConfig` (its weights,
            temperature, eps); default `moelora.losses.pmol.DEFAULT_AUX_WEIGHTS`.
        preference_label_column: the dataset column holding the preference labels.
    """

    def __init__(self, model, ref_model=None, args=None, *, aux_weights=None,
                 preference_label_column: str = "preference_label", **kwargs):
        if isinstance(model, str):
            raise TypeError("MoLoRADPOTrainer: model must be a moelora-injected model instance, "
                            "not a model id (inject moelora layers first)")
        if not any(True for _ in molora_layers(model)):
            raise ValueError("MoLoRADPOTrainer: model holds no MoLoRALinear layer; call "
                             "moelora.integrations.inject(model, config) first")
        if args is not None and getattr(args, "sync_ref_model", False) and ref_model is None:
            raise ValueError("MoLoRADPOTrainer: sync_ref_model=True needs a separate ref_model; the "
                             "default reference (adapters disabled) is fixed by construction")
        if aux_weights is not None and not isinstance(aux_weights, Mapping) and not hasattr(aux_weights, "loss_weights"):
            raise TypeError(f"aux_weights must be None, a dict or a PMoLConfig, got {type(aux_weights).__name__}")
        if not isinstance(preference_label_column, str) or not preference_label_column:
            raise TypeError(f"preference_label_column must be a non-empty str, got {preference_label_column!r}")
        self.aux_weights = aux_weights
        self.preference_label_column = preference_label_column
        if ref_model is None:
            ref_model = AdaptersDisabledReference(model)
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        self.data_collator = PreferenceLabelCollator(self.data_collator, preference_label_column)

    def _set_signature_columns_if_needed(self):
        # Keep the label column through Trainer's remove_unused_columns pruning.
        super()._set_signature_columns_if_needed()
        if self.preference_label_column not in self._signature_columns:
            self._signature_columns = list(self._signature_columns) + [self.preference_label_column]

    def compute_ref_log_probs(self, model, inputs):
        # evaluate() precomputes with the wrapped collator: the labels are not a model input
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k != "preference_labels"})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("preference_labels", None)  # not a model input
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        if labels is not None:
            # TRL's batch is [chosen; rejected]: both sequences of a pair carry its label
            labels = torch.cat([labels, labels]).to(inputs["input_ids"].device)
        unwrapped = self.accelerator.unwrap_model(model)
        if not (unwrapped.training or any(layer.record_routing for _, layer in molora_layers(unwrapped))):
            return result  # an eval-mode forward records no routing (set_record_routing to get eval aux)
        # The reference forward (adapters disabled) leaves the policy forward's recorded routing
        # in place, so this regularises the routing of the forward that produced the DPO loss.
        aux = aux_loss(unwrapped, preference_labels=labels,
                       weights=self.aux_weights, attention_mask=inputs.get("attention_mask"))
        loss = loss + aux["total"].to(loss.dtype)
        mode = "train" if self.model.training else "eval"
        for key in AUX_TERMS:
            value = self.accelerator.gather_for_metrics(aux[key].detach().reshape(1)).mean().item()
            self._metrics[mode][f"aux/{key}"].append(value)
        return (loss, outputs) if return_outputs else loss
