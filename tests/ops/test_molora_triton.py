"""The core op's Triton backend, route by route (dense, grouped, decode) and GEMM by GEMM
(fused, cuBLAS), against the float64 reference. Under TRITON_INTERPRET=1 without a GPU: every
kernel runs as written, its 16-bit tensor-core branches included (moelora.ops.triton_common
widens the interpreter's bf16 dot), and its device asserts fire."""
from __future__ import annotations

import importlib
import types

import pytest
import torch

import moelora

from conftest import DEVICE
from helpers import make_routing
from test_molora_linear import DTYPES, SHAPES, _problem, _shape_id, _dtype_id, check_against_reference

if "triton" not in moelora.available_backends(DEVICE):
    pytest.skip("no triton backend here", allow_module_level=True)

kernels = importlib.import_module("moelora.ops.molora_linear.triton_backend")
configs = importlib.import_module("moelora.ops.molora_linear.configs")

ROUTES = [("dense", "cublas"), ("dense", "fused"), ("grouped", "cublas"), ("grouped", "fused"),
          ("decode", "cublas")]


@pytest.fixture(params=ROUTES, ids=["-".join(r) for r in ROUTES])
def route(request, monkeypatch):
    """Force one route and one large-T GEMM whatever the shapes; yields the route's name and a
    log of the launches made (each kernel's name)."""
    kind, gemm = request.param
    monkeypatch.setattr(configs, "FORCED_ROUTE", kind)
    monkeypatch.setattr(configs, "FORCED_GEMM", gemm)
    launched = []
    real = kernels.launch

    def spy(kernel, grid, *args, **kwargs):
        launched.append(kernel.__name__)
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(kernels, "launch", spy)
    yield kind, gemm, launched


def _decode_fits(kind, shape):
    if kind == "decode" and shape[0] > 64:
        pytest.skip("the decode route serves T <= 64")


@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[3]], ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_every_route_matches_reference(route, shape, dtypes):
    kind, gemm, launched = route
    _decode_fits(kind, shape)
    check_against_reference("triton", _problem(*shape), *dtypes)
    expected = {"dense": "_shrink_dense_kernel", "grouped": "_grouped_shrink_kernel",
                "decode": "_decode_partial_kernel"}[kind]
    assert expected in launched, launched
    assert ("_fused_gemm_kernel" in launched) == (gemm == "fused" and kind != "decode" and not (
        kind == "grouped" and shape[5] == 1)), launched


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(17, 33, 21, 5, 3, 2, "duplicates"), (65, 64, 48, 5, 17, 1, "tenant"),
                                   (40, 32, 48, 4, 8, 2, "topk")], ids=_shape_id)
def test_every_route_on_the_tensor_cores(route, shape, dtype):
    """The 16-bit tl.dot branches (the GPU's training and serving path), TMA-aligned shapes
    (d = 32, 48, 64) and unaligned ones (33, 21)."""
    _decode_fits(route[0], shape)
    check_against_reference("triton", _problem(*shape), dtype, dtype)


@pytest.mark.parametrize("shape", [(17, 33, 21, 5, 3, 2, "topk"), (33, 20, 24, 4, 5, 1, "tenant")],
                         ids=_shape_id)
def test_fp32_activations_with_half_adapters(route, shape):
    check_against_reference("triton", _problem(*shape), torch.float32, torch.float16)


def test_decode_with_several_k_splits(monkeypatch):
    """d_in long enough that the decode GEMV splits its reduction across programs; the
    epilogue sums the partials in a fixed order."""
    monkeypatch.setattr(configs, "FORCED_ROUTE", "decode")
    cfg = configs.decode_config(DEVICE, 5, 16, 256, 16)
    assert cfg.splits > 1
    check_against_reference("triton", _problem(5, 256, 16, 2, 8, 2, "topk"), torch.float32, torch.float32)


def test_fused_gemm_walks_more_tiles_than_programs(monkeypatch):
    """The persistent GEMM: 3 programs (the interpreter's count) over many tiles, with and
    without tensor descriptors."""
    monkeypatch.setattr(configs, "FORCED_ROUTE", "dense")
    monkeypatch.setattr(configs, "FORCED_GEMM", "fused")
    for d in (48, 45):  # TMA-aligned, then not
        check_against_reference("triton", _problem(70, d, d, 3, 4, 2, "topk"), torch.float32, torch.float32)


class _Poisoned(types.SimpleNamespace):
    """The backend's `torch` with `empty` filled with NaN: an output a kernel does not write
    in full shows."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))


@pytest.mark.parametrize("shape", [(3, 8, 8, 5, 3, 2, "none"), (70, 8, 8, 3, 2, 1, "none"),
                                   (33, 17, 9, 1, 2, 1, "topk"), (17, 33, 21, 5, 3, 2, "duplicates")],
                         ids=_shape_id)
def test_every_output_is_written_without_a_memset(route, shape, monkeypatch):
    """h, z, u, the gate gradient and every output come from uninitialised memory: each kernel
    writes all of its output, slots with no expert included."""
    _decode_fits(route[0], shape)
    monkeypatch.setattr(kernels, "torch", _Poisoned())
    check_against_reference("triton", _problem(*shape), torch.float32, torch.float32)


@pytest.mark.parametrize("kind", ["dense", "grouped", "decode"])
def test_bad_ids_trip_the_fused_device_assert(kind, monkeypatch):
    """The id check costs no launch of its own: the route's first kernel asserts on the device
    (on a GPU the process dies with it; the interpreter raises)."""
    monkeypatch.setattr(configs, "FORCED_ROUTE", kind)
    T = 9 if kind == "decode" else 70
    x, w = torch.randn(T, 16, device=DEVICE), torch.randn(8, 16, device=DEVICE)
    a, b = torch.randn(3, 4, 16, device=DEVICE), torch.randn(3, 8, 4, device=DEVICE)
    ids = torch.zeros(T, 2, dtype=torch.long, device=DEVICE)
    ids[5, 1] = 3
    with pytest.raises(Exception, match="expert_indices out of range"):
        kernels.forward(x, w, None, a, b, ids, torch.rand(T, 2, device=DEVICE), 0.5)


def test_backward_reuses_the_forward_state(monkeypatch):
    """The forward's z (dense) or plan (grouped) reaches the backward: no second plan, no
    second pass over x in the backward for z."""
    builds = []
    real = kernels.GroupPlan.build
    monkeypatch.setattr(kernels.GroupPlan, "build", classmethod(
        lambda cls, *a, **kw: builds.append(1) or real(*a, **kw)))
    monkeypatch.setattr(configs, "FORCED_ROUTE", "grouped")
    check_against_reference("triton", _problem(70, 16, 12, 4, 3, 2, "topk"), torch.float32, torch.float32)
    assert builds == [1]


# --------------------------------------------------------------------------------------------
# the routing plan of the grouped route
# --------------------------------------------------------------------------------------------
def _reference_plan(ids, E, block_m):
    """The grouped kernels' plan from torch's stable sort, block by block in Python."""
    key = torch.where((ids >= 0) & (ids < E), ids, E)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=E + 1)[:E]
    starts = torch.cumsum(counts, 0) - counts
    blocks = []  # (expert, first row, end row)
    for e in range(E):
        for row in range(int(starts[e]), int(starts[e] + counts[e]), block_m):
            blocks.append((e, row, int(starts[e] + counts[e])))
    return order, starts, counts, blocks


@pytest.mark.parametrize("S,E,max_chunks,tile", [
    (0, 3, 128, 4096), (1, 1, 128, 4096), (70, 5, 128, 4096), (5000, 3, 128, 4096),
    (5000, 3, 3, 64),  # several chunks, several steps per chunk: the carried offsets
    (777, 64, 5, 4096),  # 65 buckets pad to 128
])
def test_routing_plan_is_a_stable_sort(S, E, max_chunks, tile, monkeypatch):
    monkeypatch.setattr(configs, "PLAN_MAX_CHUNKS", max_chunks)
    monkeypatch.setattr(configs, "PLAN_TILE", tile)
    g = torch.Generator().manual_seed(S + E)
    ids = torch.randint(-1, E, (S,), generator=g).to(DEVICE)
    plan = kernels.GroupPlan.build(ids, E, block_m=16)
    order, starts, counts, blocks = _reference_plan(ids.cpu(), E, 16)
    assert torch.equal(plan.sorted_slots.cpu(), order)
    assert torch.equal(plan.expert_start.cpu(), starts) and torch.equal(plan.expert_count.cpu(), counts)
    assert plan.num_blocks == S // 16 + E
    table = list(zip(plan.block_expert.tolist(), plan.block_start.tolist(), plan.block_end.tolist()))
    assert table[:len(blocks)] == blocks
    assert all(e == -1 for e, _, _ in table[len(blocks):])


@pytest.mark.parametrize("routing", ["topk", "skewed", "none", "duplicates"])
@pytest.mark.parametrize("T,E,k,block_m", [(0, 3, 2, 4), (1, 1, 1, 16), (37, 5, 2, 4), (200, 7, 3, 16)])
def test_routing_plan_covers_every_slot_once(T, E, k, block_m, routing):
    ids, _ = make_routing(routing, T, E, k, DEVICE)
    plan = kernels.GroupPlan.build(ids, E, block_m)
    flat = ids.reshape(-1).cpu()
    seen = torch.zeros(flat.numel(), dtype=torch.long)
    for b in range(plan.num_blocks):
        expert = int(plan.block_expert[b])
        if expert < 0:
            continue
        start, end = int(plan.block_start[b]), int(plan.block_end[b])
        rows = range(start, min(start + block_m, end))
        assert len(rows) > 0, "a live block must own rows"
        slots = plan.sorted_slots[list(rows)].cpu()
        assert (flat[slots] == expert).all(), "a block must not straddle experts"
        seen[slots] += 1
    assert torch.equal(seen, (flat >= 0).long()), "every routed slot exactly once, no -1 slot"
    assert torch.equal(plan.expert_count.cpu(), torch.bincount(flat[flat >= 0], minlength=E))


# --------------------------------------------------------------------------------------------
# the route's cost model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,E,r,k,kind", [
    (1, 8, 16, 2, "decode"), (64, 8, 16, 2, "decode"),
    (8192, 8, 16, 2, "dense"),  # docs/perf.md's prefill / train: the shrink is one pass over x
    (8192, 64, 8, 2, "grouped"),  # fine-grained: 2 T d E r FLOPs cost more than gathering x twice
    (4096, 64, 16, 1, "grouped"),  # multi-tenant
])
def test_route_follows_the_budget(T, E, r, k, kind, monkeypatch):
    monkeypatch.setattr(configs, "FORCED_ROUTE", None)
    assert configs.choose_route(torch.device("cuda"), torch.bfloat16, T, 4096, E, r, k).kind == kind


def test_unmeasured_gemm_stays_on_cublas(monkeypatch):
    monkeypatch.setattr(configs, "FORCED_GEMM", None)
    assert configs.choose_route(torch.device("cuda"), torch.bfloat16, 8192, 4096, 8, 16, 2).gemm == "cublas"
