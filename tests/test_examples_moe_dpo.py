"""examples/moe_dpo_tiny.py at smoke size: MoE-DPO lowers the loss and the gate learns the domains."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "moe_dpo_tiny.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("moe_dpo_tiny", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("objective", ["em", "mixture"])
def test_moe_dpo_tiny_learns(objective, capsys):
    example = _load_example()
    summary = example.main(["--steps", "30", "--batch-size", "32", "--log-every", "10",
                            "--objective", objective, "--backend", "torch"])
    printed = capsys.readouterr().out
    assert "separation" in printed and "loss" in printed
    assert summary["last_loss"] < 0.5 * summary["first_loss"], summary
    assert summary["initial_separation"] < 0.05, summary  # a fresh gate is uniform
    # each domain's mean gate puts most of its mass on its own expert
    assert summary["separation"] > 0.5, summary
