"""The suite through pytest-benchmark, at CI-sized shapes:

    pytest benchmarks --benchmark-only [--benchmark-json out.json] [-k train]

Each test sets its contestant up through the harness, checks it against the float64
reference (a wrong contestant fails, untimed), then hands the measured call to the `benchmark`
fixture. The repo's addopts carry --benchmark-skip, so a plain `pytest benchmarks` skips them
(and `pytest` from the root collects only tests/).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks import harness
from benchmarks.cases import suite
from benchmarks.ops import OPS, Skip

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
D = 256  # CI size: d_in = d_out


def _ci_cases() -> dict:
    """The suite's core-op cases that CI should track, shrunk to d = 256, T <= 256."""
    cases = {c.name: c for c in suite(torch.device("cpu"))}
    shrunk = {}
    for name in ("train", "decode-T1", "multi-tenant", "lora"):
        c = cases[name]
        shape = dict(c.shape, T=min(c.shape["T"], 256), d_in=D, d_out=D)
        shrunk[name] = dataclasses.replace(c, shape=shape, dtype=None)
    return shrunk


CASES = _ci_cases()
CONTESTANTS = [c.name for c in OPS["molora"].contestants(DEVICE, DTYPE, None)]
PARAMS = [
    pytest.param(case, mode, name, id=f"{case}-{mode}-{name}")
    for case, c in CASES.items()
    for mode in c.modes
    if mode != "memory"  # a peak, not a time
    for name in CONTESTANTS
]


@pytest.mark.parametrize("case_name, mode, contestant_name", PARAMS)
def test_molora(benchmark, case_name, mode, contestant_name):
    case = CASES[case_name]
    settings = harness.Settings(DEVICE)
    contestant = next(c for c in OPS[case.op].contestants(DEVICE, DTYPE, None) if c.name == contestant_name)
    sets = harness.input_sets(case, DTYPE, settings, seed=0)[:1]
    with_grads = harness.differentiates(case, (mode,))
    ref = harness.reference(case, sets[0], with_grads)
    try:
        prepared, _ = harness.prepare(case, contestant, sets, ref, with_grads, harness.TOLERANCE[DTYPE])
        call = harness.call_for(mode, case, prepared[0], sets[0])
    except Skip as s:
        pytest.skip(f"{s.status}: {s.reason}")
    except harness.Wrong as w:
        pytest.fail(f"{contestant_name} is WRONG: {w}")
    benchmark.extra_info.update(case=case.describe(), dtype=str(DTYPE), device=str(DEVICE))
    if DEVICE.type == "cuda":
        call = _synchronized(call)
    benchmark(call)


def _synchronized(call):
    """pytest-benchmark times on the host: wait for the GPU inside the timed call."""
    def run():
        out = call()
        torch.cuda.synchronize()
        return out

    return run
