"""Structural performance facts of the Triton core op at docs/perf.md's real shapes, without a
GPU and without computing anything: the backend runs on meta tensors, configured as for the
H200 (`configs.simulate`), and `moelora.ops.traffic` records every launch and the bytes it
moves. The budgets asserted here are derived in benchmarks/NOTES.md ("GPU kernels v2")."""
from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")
kernels = importlib.import_module("moelora.ops.molora_linear.triton_backend")
configs = importlib.import_module("moelora.ops.molora_linear.configs")
from moelora.ops.traffic import Traffic  # noqa: E402

MIB = 2**20
D = 4096


def _inputs(T, E, r, k, d=D, dtype=torch.bfloat16):
    meta = dict(device="meta")
    return dict(
        x=torch.empty(T, d, dtype=dtype, **meta),
        weight=torch.empty(d, d, dtype=dtype, **meta),
        bias=None,
        lora_a=torch.empty(E, r, d, dtype=dtype, **meta),
        lora_b=torch.empty(E, d, r, dtype=dtype, **meta),
        expert_indices=torch.empty(T, k, dtype=torch.int64, **meta),
        expert_weights=torch.empty(T, k, dtype=torch.float32, **meta),
    )


def _run(T, E, r, k, gemm, monkeypatch):
    """(inputs, forward record, backward record, y, dx) for one case."""
    monkeypatch.setattr(configs, "FORCED_GEMM", gemm)
    monkeypatch.setattr(configs, "FORCED_ROUTE", None)
    p = _inputs(T, E, r, k)
    with configs.simulate():
        with Traffic() as fwd:
            y, h, state = kernels.forward(*p.values(), 2.0)
        dy = torch.empty_like(y)
        with Traffic() as bwd:
            dx, *_ = kernels.backward(dy, p["x"], p["weight"], p["lora_a"], p["lora_b"],
                                      p["expert_indices"], p["expert_weights"], h, state, 2.0, True, True)
    return p, fwd, bwd, y, dy, dx


def _bytes(t):
    return t.numel() * t.element_size()


def test_prefill_writes_y_once_and_reads_x_twice(monkeypatch):
    """docs/perf.md's prefill (T=8192, E=8, r=16, k=2), fused: the shrink and one GEMM; y is
    written by the GEMM alone and never read back; x is read once by each."""
    p, fwd, _, y, _, _ = _run(8192, 8, 16, 2, "fused", monkeypatch)
    assert fwd.names() == ["_shrink_dense_kernel", "_fused_gemm_kernel"], fwd.table()
    assert [launch.name for launch in fwd.writers(y)] == ["_fused_gemm_kernel"]
    assert fwd.readers(y) == []
    assert fwd.bytes_read(p["x"]) == 2 * _bytes(p["x"])
    gemm = fwd.launches[1]
    assert gemm.grid == (132,)  # persistent: one program per multiprocessor
    # beyond the base GEMM's own operands (x, W, y) it moves only the rank space and adapters
    extra = gemm.bytes_read + gemm.bytes_written - 2 * _bytes(p["x"]) - _bytes(p["weight"])
    assert extra <= 4 * MIB, fwd.table()


def test_prefill_on_cublas_reads_y_back_once(monkeypatch):
    """The unmeasured default: cuBLAS's linear, then addmm_ adds z B_all^T into y (one read and
    one write of y more: the 9% of docs/perf.md)."""
    p, fwd, _, y, _, _ = _run(8192, 8, 16, 2, "cublas", monkeypatch)
    assert fwd.names() == ["_shrink_dense_kernel", "aten.mm", "aten.clone", "aten.addmm_"], fwd.table()
    assert [launch.name for launch in fwd.writers(y)] == ["aten.mm", "aten.addmm_"]
    assert [launch.name for launch in fwd.readers(y)] == ["aten.addmm_"]


def test_train_backward_reuses_z_and_passes_over_dy_three_times(monkeypatch):
    """Backward at the train case: no plan and no second shrink over x (z is the forward's
    state); dy is read by the shrink (u and the gate gradient), the dB GEMM and the fused dx
    GEMM; x once, by the dA GEMM; dx written once."""
    p, _, bwd, _, dy, dx = _run(8192, 8, 16, 2, "fused", monkeypatch)
    assert bwd.names() == ["_shrink_dense_kernel", "aten.mm", "aten.clone", "aten.mm",
                           "_fused_gemm_kernel"], bwd.table()
    assert bwd.bytes_read(dy) == 3 * _bytes(dy)
    assert bwd.bytes_read(p["x"]) == _bytes(p["x"])
    assert [launch.name for launch in bwd.writers(dx)] == ["_fused_gemm_kernel"]
    assert not any("plan" in name for name in bwd.names())


@pytest.mark.parametrize("T", [1, 16, 64])
def test_decode_is_two_launches_that_read_w_once(T, monkeypatch):
    """Decode at T = 1, 16, 64: the split-K GEMV (with the id check) and its epilogue, nothing
    else; enough programs for HBM (two per multiprocessor); W read once, the adapters once."""
    p, fwd, _, y, _, _ = _run(T, 8, 16, 2, "cublas", monkeypatch)
    assert fwd.names() == ["_decode_partial_kernel", "_decode_epilogue_kernel"], fwd.table()
    gemv, epilogue = fwd.launches
    assert gemv.grid[0] * gemv.grid[1] >= 2 * 132
    assert gemv.touches(p["weight"], "read") == _bytes(p["weight"])
    adapters = _bytes(p["lora_a"]) + _bytes(p["lora_b"])
    total = sum(launch.bytes_read + launch.bytes_written for launch in fwd.launches)
    floor = _bytes(p["weight"]) + _bytes(p["x"]) + _bytes(y)
    assert total <= floor + adapters + 5 * MIB, fwd.table()


def test_fine_grained_takes_the_grouped_route_and_keeps_its_plan(monkeypatch):
    """E=64 r=8 k=2: the routed work only (one expert per tile over sorted slots); the plan is
    built once, in the forward."""
    p, fwd, bwd, y, _, _ = _run(8192, 64, 8, 2, "fused", monkeypatch)
    assert fwd.names()[:2] == ["_plan_histogram_kernel", "_plan_scatter_kernel"], fwd.table()
    assert "_grouped_shrink_kernel" in fwd.names()
    assert not any("plan" in name for name in bwd.names()), bwd.table()
    assert [launch.name for launch in fwd.writers(y)] == ["_fused_gemm_kernel"]
    # x gathered once per slot: k passes
    assert fwd.bytes_read(p["x"]) == 2 * _bytes(p["x"]) + _bytes(p["x"])  # shrink (k = 2), GEMM


def test_multi_tenant_reads_x_once_in_its_shrink(monkeypatch):
    """64 adapters, one per token: the grouped shrink reads each token once (k = 1); the
    grouped expand is the only launch besides cuBLAS's that touches y."""
    p, fwd, _, y, _, _ = _run(4096, 64, 16, 1, "cublas", monkeypatch)
    shrink = [launch for launch in fwd.launches if launch.name == "_grouped_shrink_kernel"]
    assert len(shrink) == 1 and shrink[0].touches(p["x"], "read") == _bytes(p["x"])
    assert [launch.name for launch in fwd.writers(y)] == ["aten.mm", "_grouped_expand_kernel"]
    assert len(fwd.launches) == 6, fwd.table()


def test_the_id_check_adds_no_launch_on_gpu(monkeypatch):
    """The Triton backend's kernels assert on the ids themselves, so the op launches no check
    of its own for GPU tensors (the torch backend's check is one launch)."""
    from moelora.ops.molora_linear import op

    calls = []
    monkeypatch.setattr(op, "check_range", lambda *a, **kw: calls.append(1))
    ids = torch.zeros(4, 2, dtype=torch.long, device="meta")
    op._check_expert_range(ids, 3, "triton")
    assert calls == []
    op._check_expert_range(ids, 3, "torch")
    assert calls == [1]
