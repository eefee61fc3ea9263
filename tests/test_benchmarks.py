"""Smoke tests of the benchmark suite (benchmarks/, `python -m benchmarks`) at --quick size.

torch.compile of the reference is left out (`--contestants`): its cold compile alone takes
~25 s on 2 cores; the full suite runs it.
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

import moelora

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import cli, harness  # noqa: E402
from benchmarks.cases import select, suite  # noqa: E402
from benchmarks.ops import Contestant, Prepared  # noqa: E402

CPU = torch.device("cpu")
NO_COMPILE = "naive*,dense*,peft,moelora*"
STATUSES = {"ok", "WRONG", "error", "unavailable", "not applicable"}


def _quiet(msg: str) -> None:
    pass


def test_quick_suite_writes_a_complete_record(tmp_path):
    cases = "train,decode-T1,multi-tenant,lora,moe-dpo-logprobs,sweep-T-*"
    rc = cli.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--cases", cases,
                   "--contestants", NO_COMPILE])
    assert rc == 0

    rec = json.loads((tmp_path / "latest-cpu.json").read_text())
    for key in ("created", "command", "device", "versions", "git", "settings", "cases", "rows"):
        assert key in rec, key
    assert rec["device"]["type"] == "cpu"
    assert rec["versions"]["torch"] == torch.__version__
    assert {c["name"] for c in rec["cases"]} == {
        "train", "decode-T1", "multi-tenant", "lora", "moe-dpo-logprobs", "sweep-T-8", "sweep-T-32"
    }
    for c in rec["cases"]:
        assert c["shape"] and c["dtypes"] == ["float32"] and c["work"]["float32"]["bytes"] > 0

    rows = rec["rows"]
    assert all(r["status"] in STATUSES for r in rows), {r["status"] for r in rows}
    contestants = {(r["case"], r["contestant"]) for r in rows}
    for name in ("base linear", "naive loop", "dense masked", "peft", "moelora:torch"):
        assert ("train", name) in contestants, name
    for name in ("K head GEMMs", "naive [T,K,V]", "moelora:torch"):
        assert ("moe-dpo-logprobs", name) in contestants, name
    for r in rows:
        if r["status"] != "ok":
            assert r["reason"], r  # a row that did not run says why
            continue
        value = r["peak_mib"] if r["mode"] == "memory" else r["median_ms"]
        assert value is not None and value >= 0 and math.isfinite(value), r
        if r["contestant"] == "base linear":
            assert r["ratio_over_base"] == pytest.approx(1.0), r
        elif r["ratio_over_base"] is not None:
            assert r["ratio_over_base"] > 0, r
        else:  # only a peak of zero bytes has no ratio
            assert r["mode"] == "memory", r
    modes = {r["mode"] for r in rows if r["case"] == "train" and r["contestant"] == "moelora:torch"}
    assert modes == {"forward", "backward", "fwd+bwd", "memory"}
    # PEFT applies where one adapter serves each token, and says why elsewhere.
    peft = {r["case"]: r for r in rows if r["contestant"] == "peft"}
    assert peft["train"]["status"] == "not applicable"
    if peft["lora"]["status"] != "unavailable":  # peft not installed
        assert peft["lora"]["status"] == "ok" and peft["multi-tenant"]["status"] == "ok"

    assert (tmp_path / "latest-cpu.md").read_text().count("| train |") >= 4
    assert "### Results" in (tmp_path / "README.md").read_text()  # the index embeds the table
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "latest-cpu.png").stat().st_size > 0


def _contestant(name: str, fn) -> tuple[Contestant, list]:
    """A contestant computing fn(**args), counting its calls."""
    calls = []

    def setup(case):
        def build(inp):
            a = inp.args

            def forward():
                calls.append(1)
                return fn(**a)

            return Prepared(forward, {n: [a[n]] for n in ("x", "lora_a", "lora_b")})

        return build

    return Contestant(name, setup), calls


def test_wrong_contestant_is_reported_and_not_timed():
    def gate_blind(expert_weights, **args):  # a classic bug: the gates are ignored
        return moelora.molora_linear(expert_weights=torch.ones_like(expert_weights), backend="torch", **args)

    def broken(**args):
        raise RuntimeError("kernel exploded")

    wrong, wrong_calls = _contestant("gate-blind", gate_blind)
    right, right_calls = _contestant("right", lambda **a: moelora.molora_linear(**a, backend="torch"))
    error, _ = _contestant("broken", broken)
    case = select(suite(CPU, quick=True), ["train"])[0]
    settings = harness.Settings.quick(CPU, contestants=("base linear",), modes=("forward", "fwd+bwd"))
    rows = harness.run_suite([case], None, settings, _quiet, {"molora": [wrong, right, error]})
    by = {(r.contestant, r.mode): r for r in rows}

    bad = by[("gate-blind", "*")]
    assert bad.status == "WRONG"
    assert bad.median_ms is None and bad.ratio_over_base is None
    assert bad.rel_error > bad.tolerance
    assert len(wrong_calls) == 1  # the check's call, and no timed call
    assert not any(r.contestant == "gate-blind" and r.mode != "*" for r in rows)

    assert by[("right", "forward")].status == "ok" and by[("right", "fwd+bwd")].status == "ok"
    assert by[("right", "forward")].rel_error <= by[("right", "forward")].tolerance
    assert len(right_calls) > 2  # checked, then timed
    assert by[("broken", "*")].status == "error" and "kernel exploded" in by[("broken", "*")].reason


def test_logprobs_case_runs():
    case = select(suite(CPU, quick=True), ["moe-dpo-logprobs"])[0]
    settings = harness.Settings.quick(CPU, contestants=("naive*", "moelora:*"))
    rows = harness.run_suite([case], None, settings, _quiet)
    assert {(r.contestant, r.mode, r.status) for r in rows} == {
        (name, mode, "ok")
        for name in ("K head GEMMs", "naive [T,K,V]", "moelora:torch")
        for mode in ("fwd+bwd", "memory")
    }
    peak = {r.contestant: r.peak_mib for r in rows if r.mode == "memory"}
    assert peak["naive [T,K,V]"] > 0


def test_passes_merge_by_median_and_keep_failures():
    def row(contestant, mode, median, ratio, status="ok", reason=""):
        return harness.Row("c", "float32", contestant, mode, status, reason, median_ms=median,
                           iqr_ms=0.1, ratio_over_base=ratio)

    first = [row("base linear", "forward", 10.0, 1.0), row("x", "forward", 12.0, 1.2),
             row("y", "forward", 5.0, 0.5)]
    second = [row("base linear", "forward", 14.0, 1.0), row("x", "forward", 15.0, 1.1),
              row("y", "forward", None, None, "error", "boom")]
    merged = {r.contestant: r for r in harness.merge_passes([first, second])}
    assert merged["base linear"].median_ms == 12.0 and merged["base linear"].ratio_over_base == 1.0
    assert merged["x"].pass_medians_ms == [12.0, 15.0]
    assert merged["x"].median_ms == 13.5
    assert merged["x"].ratio_over_base == pytest.approx(1.15)  # the passes' own ratios, not 13.5 / 12
    assert merged["y"].status == "error" and merged["y"].reason == "in pass 2 of 2: boom"


def test_peers_are_compared_by_their_per_round_ratios():
    """A pass that ran the host slow inflates one contestant's raw median but not its ratio over
    the floor timed in the same round: the verdict follows the ratios, and raw times only where
    a ratio is missing."""
    case = next(c for c in suite(torch.device("cpu")) if c.name == "train")

    def row(contestant, median, ratio):
        return harness.Row("train", "float32", contestant, "fwd+bwd", "ok", median_ms=median,
                           ratio_over_base=ratio)

    ours = row("moelora:cpu", 30.0, 1.10)
    slower_by_ratio = row("dense masked", 29.0, 1.20)  # faster raw median, slower ratio
    faster_by_ratio = row("compile(dense)", 31.0, 1.05)
    assert harness.verdict(ours, case, [slower_by_ratio]) == "met"
    assert harness.verdict(ours, case, [faster_by_ratio]) == "missed (slower than compile(dense))"
    no_ratio = row("peft", 29.0, None)
    assert harness.verdict(ours, case, [no_ratio]) == "missed (slower than peft)"


def test_default_run_writes_outside_the_tree_with_a_verdict_column(tmp_path, monkeypatch, capsys):
    """Without --record the run leaves benchmarks/results (tracked) untouched and writes to the
    default folder; the printed table has the target verdict per row."""
    from benchmarks import report

    results = {p: p.stat().st_mtime_ns for p in report.RESULTS_DIR.iterdir()}
    monkeypatch.setattr(report, "DEFAULT_OUT", tmp_path / "default-out")
    rc = cli.main(["--quick", "--device", "cpu", "--cases", "decode-T1", "--contestants", NO_COMPILE])
    assert rc == 0
    assert (tmp_path / "default-out" / "latest-cpu.json").exists()
    assert {p: p.stat().st_mtime_ns for p in report.RESULTS_DIR.iterdir()} == results
    table = capsys.readouterr().out
    assert "| target |" in table
    rows = [line for line in table.splitlines() if "| moelora:" in line]
    assert rows and all(line.rstrip().endswith(("met |", "n.a. |", ") |")) for line in rows), rows


def test_busy_host_warning():
    from benchmarks import report

    assert report.busy_host(0.4, cores=2) is None
    assert report.busy_host(None, cores=2) is None
    assert "busy" in report.busy_host(3.0, cores=2)


@pytest.mark.skipif(not any(map(shutil.which, ("c++", "g++", "clang++"))), reason="no C++ compiler")
def test_cpu_kernel_bench_builds_and_reports_every_kernel(capfd):
    """benchmarks.cpu_kernels compiles the kernels alone and times each one (an odd shape:
    column and rank tails, an expert count that no item size divides)."""
    from benchmarks import cpu_kernels

    rc = cpu_kernels.main(["--T", "33", "--d", "70", "--E", "5", "--r", "5", "--k", "2", "--reps", "1",
                           "--threads", "1"])
    assert rc == 0
    rows = {line.split("  ")[0].strip(): line for line in capfd.readouterr().out.splitlines()[1:]}
    for kernel in ("shrink", "expand", "outer", "shrink bf16"):
        assert kernel in rows, rows
        assert float(rows[kernel].split()[-3]) > 0  # the multiply-add rate
    with pytest.raises(SystemExit):
        cpu_kernels.main(["--k", "3", "--E", "2"])
