"""The examples run end to end at smoke size (in-process: no second interpreter start)."""
import importlib.util
import math
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pmol_tiny_dpo_smoke(capsys):
    result = _load("pmol_tiny_dpo").main(["--smoke"])
    losses = result["losses"]
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # fresh experts: policy == reference
    assert losses[-1] < losses[0]
    mass = result["group_mass"]  # [preference, group 0 / group 1 / empty]
    assert mass.shape == (2, 3)
    assert mass[0, 0] > mass[1, 0] and mass[1, 1] > mass[0, 1]  # routing follows the preference
    assert "mean router mass" in capsys.readouterr().out


def test_hoe_sweep_smoke(capsys):
    result = _load("hoe_sweep").main(["--smoke"])
    assert result["reconstruction_error"] < 1e-5
    rows = result["rows"]  # (t, KL to ft1, KL to ft2, ...)
    assert rows[0][1] < 1e-3 and rows[-1][2] < 1e-3
    assert rows[0][1] < rows[1][1] < rows[2][1] and rows[0][2] > rows[1][2] > rows[2][2]
    assert "tchebycheff" in capsys.readouterr().out


@pytest.mark.parametrize("objective", ["em", "mixture"])
def test_moe_dpo_tiny_learns(objective, capsys):
    summary = _load("moe_dpo_tiny").main(["--steps", "30", "--batch-size", "32", "--log-every", "10",
                                          "--objective", objective, "--backend", "torch"])
    printed = capsys.readouterr().out
    assert "separation" in printed and "loss" in printed
    assert summary["last_loss"] < 0.5 * summary["first_loss"], summary
    assert summary["initial_separation"] < 0.05, summary  # a fresh gate is uniform
    # each domain's mean gate puts most of its mass on its own expert
    assert summary["separation"] > 0.5, summary


def test_moe_dpo_variants_smoke(capsys):
    result = _load("moe_dpo_variants").main(["--steps", "15"])
    for variant in ("heads", "independent"):
        losses = result[variant]
        assert all(math.isfinite(x) for x in losses)
        assert losses[-1] < losses[0], (variant, losses)
    assert "independent: loss" in capsys.readouterr().out


def test_hoe_train_routers_smoke(tmp_path, capsys):
    result = _load("hoe_train_routers").main(["--smoke", "--out", str(tmp_path)])
    for history in result["histories"]:
        assert all(math.isfinite(t) for t in history)
    assert result["histories"][0][-1] < result["histories"][0][0]  # router 0 lowers its objective
    assert result["ranks"] and max(result["ranks"]) <= 4  # rank-4 task vectors: energy never asks more
    front = result["front"]
    assert len(front.preferences) == 3 and any(front.front)
    # the ends of the sweep favour their own objective
    assert front.scores[0]["-KL(ft1)"] > front.scores[-1]["-KL(ft1)"]
    assert front.scores[-1]["-KL(ft2)"] > front.scores[0]["-KL(ft2)"]
    assert all(str(tmp_path) in f for f in result["files"])
    assert "non-dominated" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["average_ab", "delta_w"])
def test_soups_pareto_smoke(mode, tmp_path, capsys):
    result = _load("soups_pareto").main(["--smoke", "--mode", mode, "--out", str(tmp_path)])
    front = result["front"]
    assert [tuple(p) for p in front.preferences] == [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)]
    assert front.front[0] and front.front[-1]  # each end is best at its own objective
    # the ends of the sweep favour their own objective
    assert front.scores[0]["favour_A"] > front.scores[-1]["favour_A"]
    assert front.scores[-1]["favour_B"] > front.scores[0]["favour_B"]
    assert all(str(tmp_path) in f for f in result["files"])
    assert (tmp_path / "soups_front.json").exists() and (tmp_path / "soups_front.md").exists()
    assert "non-dominated" in capsys.readouterr().out


def test_trl_dpo_tiny_runs(capsys):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    result = _load("trl_dpo_tiny").main(["--steps", "3"])
    logs = result["logs"]
    assert len(logs) == 3 and all(math.isfinite(entry["loss"]) for entry in logs)
    assert all(entry["aux/group"] > 0 for entry in logs)  # preference labels reached the group loss
    assert "reward margin" in capsys.readouterr().out


def test_moslim_grpo_tiny_runs(capsys):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    result = _load("moslim_grpo_tiny").main(["--steps", "2", "--rm-steps", "10"])
    assert len(result["rewards"]) == 2 and all(math.isfinite(r) for r in result["rewards"])
    assert result["base_frozen"]  # GRPO moved only the experts and routers
    assert "MOSLIM reward per step" in capsys.readouterr().out
