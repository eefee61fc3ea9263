"""Seeded fuzz of molora_linear and topk_route: values and every gradient against the float64
reference (the tolerance table of tests/helpers.py), over random shapes, routings (every kind of
helpers.make_routing, zipf-skewed and all-same included), dtype pairs and non-contiguous x;
routing logits with masked (-inf) experts. MOELORA_FUZZ_CASES scales the number of cases per backend (default 300; the
Triton interpreter gets a twentieth)."""
from __future__ import annotations

import os
import random

import pytest
import torch

import moelora

from conftest import DEVICE
from helpers import ROUTINGS, bound, rel_error
from moelora.ops.routing.op import BACKENDS as ROUTE
from moelora.reference import topk_route_ref
from test_molora_linear import DTYPES, _problem, check_against_reference

CASES = int(os.environ.get("MOELORA_FUZZ_CASES", "300"))
BACKENDS = [b for b in ("torch", "cpu", "triton") if b in moelora.available_backends(DEVICE)]


def _config(rng: random.Random):
    E = rng.randint(1, 6)
    routing = rng.choice(ROUTINGS + ("zipf", "same"))
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


ROUTE_BACKENDS = [b for b in ("torch", "cpu", "triton") if b in ROUTE.available(DEVICE)]


@pytest.mark.parametrize("backend", ROUTE_BACKENDS)
def test_fuzz_topk_route_against_reference(backend):
    n = max(1, CASES // 20) if backend == "triton" else CASES // 6
    rng = random.Random(f"moelora-route-fuzz-{backend}")
    for case in range(n):
        T, E = rng.choice([0, 1, 3, 17, 64]), rng.randint(1, 12)
        k, renormalize = rng.randint(1, E), rng.random() < 0.7
        empty_expert = E >= 2 and rng.random() < 0.3
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
        torch.manual_seed(case)
        # distinct quarter-integers: exact in every dtype, no ties (tie order is unspecified)
        ranks = torch.stack([torch.randperm(E) for _ in range(T)]).double() if T else torch.zeros(0, E, dtype=torch.float64)
        logits = (ranks - E / 2) * 0.25
        if rng.random() < 0.4:  # some experts masked, whole rows too
            logits = logits.masked_fill(torch.rand(T, E) < 0.3, float("-inf"))
        logits = logits.to(DEVICE, dtype)
        x = logits.detach().requires_grad_()
        probs, ids, gates = moelora.topk_route(x, k, renormalize=renormalize, empty_expert=empty_expert,
                                               backend=backend)
        x64 = logits.double().requires_grad_()
        rprobs, rids, rgates = topk_route_ref(x64, k, renormalize, empty_expert)
        where = f"case {case}: T={T} E={E} k={k} renorm={renormalize} empty={empty_expert} {dtype}"
        assert torch.equal(ids, rids), where
        assert torch.isfinite(probs).all() and torch.isfinite(gates).all(), where
        assert rel_error(probs, rprobs) <= bound(torch.float32, 0.0), where
        assert rel_error(gates, rgates) <= bound(torch.float32, 0.0), where
        if T:
            c_p = torch.randn(T, E, dtype=torch.float64, device=DEVICE)
            c_g = torch.randn(T, k, dtype=torch.float64, device=DEVICE)
            (g,) = torch.autograd.grad((probs.double() * c_p).sum() + (gates.double() * c_g).sum(), [x])
            (rg,) = torch.autograd.grad((rprobs * c_p).sum() + (rgates * c_g).sum(), [x64])
            assert torch.isfinite(g).all(), where
            rg = rg.nan_to_num()  # the plain-softmax reference has NaN gradients in fully masked rows; ours 0
            limit = bound(dtype, rel_error(rg.to(dtype), rg))
            assert rel_error(g, rg) <= limit, where
