"""Seeded fuzz of molora_linear: values and every gradient against the float64 reference
(the tolerance table of tests/helpers.py), over random shapes, routings, dtype pairs and
non-contiguous x. MOELORA_FUZZ_CASES scales the number of cases per backend (default 300; the
Triton interpreter gets a twentieth)."""
from __future__ import annotations

import os
import random

import pytest
import torch

import moelora

from conftest import DEVICE
from helpers import ROUTINGS
from test_molora_linear import DTYPES, _problem, check_against_reference

CASES = int(os.environ.get("MOELORA_FUZZ_CASES", "300"))
BACKENDS = [b for b in ("torch", "cpu", "triton") if b in moelora.available_backends(DEVICE)]


def _config(rng: random.Random):
    E = rng.randint(1, 6)
    routing = rng.choice(ROUTINGS)
    k = E if routing == "dense" else rng.randint(1, E)
    return dict(T=rng.choice([1, 2, 7, 16, 33, 65]), d_in=rng.randint(1, 40),
                d_out=rng.randint(1, 40), E=E, r=rng.randint(1, 18), k=k, routing=routing,
                dtypes=rng.choice(DTYPES), strided=rng.random() < 0.3, bias=rng.random() < 0.7,
                scaling=rng.choice([0.5, 1.0, 2.0, 16.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_against_reference(backend):
    n = max(1, CASES // 20) if backend == "triton" else CASES
    rng = random.Random(f"moelora-fuzz-{backend}")
    for case in range(n):
        c = _config(rng)
        torch.manual_seed(case)
        p = _problem(c["T"], c["d_in"], c["d_out"], c["E"], c["r"], c["k"], c["routing"], bias=c["bias"])
        if c["strided"]:  # a transposed view: x is not contiguous
            p["x"] = torch.randn(c["d_in"], c["T"], dtype=torch.float64, device=DEVICE).t()
        try:
            check_against_reference(backend, p, *c["dtypes"], scaling=c["scaling"])
        except AssertionError as exc:
            raise AssertionError(f"case {case}: {c}: {exc}") from None
