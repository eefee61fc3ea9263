"""The shared index range check (moelora.ops.checks) and the Triton helpers every kernel uses."""
from __future__ import annotations

import pytest
import torch

from moelora.ops import checks


@pytest.mark.parametrize("values,low,high,exempt,ok", [
    (torch.tensor([[-1, 0], [2, 1]]), -1, 3, None, True),
    (torch.tensor([[-1, 3]]), -1, 3, None, False),
    (torch.tensor([-2]), -1, 3, None, False),
    (torch.tensor([-100, 0, 9]), 0, 10, -100, True),
    (torch.tensor([-99, 0]), 0, 10, -100, False),
    (torch.tensor([[0, 4], [-1, 1]]), -1, torch.tensor([1, 5]), None, True),  # a bound per column
    (torch.tensor([[1, 4]]), -1, torch.tensor([1, 5]), None, False),
    (torch.zeros(0, 3, dtype=torch.long), 0, 1, None, True),
])
def test_range_check_names_the_first_offender(values, low, high, exempt, ok):
    call = lambda: checks.check_range(values, low, high, exempt=exempt, name="ids", expected="be fine")  # noqa: E731
    if ok:
        call()
    else:
        with pytest.raises(ValueError, match=r"ids must be fine; got ids\[.*\] = -?\d+"):
            call()


def test_check_true_raises_on_cpu():
    checks.check_true(torch.tensor([True, True]), "never")
    with pytest.raises(ValueError, match="the message"):
        checks.check_true(torch.tensor([True, False]), "the message")


def test_triton_check_falls_back_to_torch_once(monkeypatch):
    """A Triton that cannot compile the one-launch check (say, for an unsupported GPU) costs a
    warning and torch's check from then on, never the call."""
    import types

    calls = []

    def broken(values, low, high, exempt):
        calls.append(high)
        raise RuntimeError("no compiler for this GPU")

    monkeypatch.setattr(checks, "_triton_failed", False)
    monkeypatch.setattr(checks.importlib, "import_module",
                        lambda name: types.SimpleNamespace(assert_in_range=broken))
    ids = torch.zeros(3, 2, dtype=torch.long)
    with pytest.warns(RuntimeWarning, match="checking ids with torch ops instead"):
        assert checks._triton_check(ids, -1, 4, None, "ids") is False
    assert checks._triton_check(ids, -1, 4, None, "ids") is False  # not tried again
    assert calls == [4]


@pytest.mark.parametrize("view", ["column", "expanded", "int32-transposed"])
def test_triton_range_check_reads_the_logical_values(view, monkeypatch):
    """The one-launch check reads with stride 1: a strided or expanded view must reach it as a
    contiguous copy, or it checks the wrong elements (or reads past the end)."""
    common = pytest.importorskip("moelora.ops.triton_common")
    if view == "column":  # one column of a top-2 result: flattened stride 2
        base = torch.zeros(8, 2, dtype=torch.long)
        base[:, 1] = -7
        base[7, 0] = 2
        ids = base[:, :1]
    elif view == "expanded":  # one adapter for every token: stride 0
        ids = torch.full((1, 1), 2, dtype=torch.long).expand(8, 1)
    else:
        ids = torch.arange(-1, 3, dtype=torch.int32).repeat(2, 1).t()
    seen = []

    def launch(kernel, grid, flat, n, *args, **kwargs):
        seen.append(flat.is_contiguous() and torch.equal(flat, ids.reshape(-1)) and n == ids.numel())

    monkeypatch.setattr(common, "launch", launch)
    common.assert_in_range(ids, -1, 3)
    assert seen == [True]


def test_range_kernel_runs_under_the_interpreter():
    common = pytest.importorskip("moelora.ops.triton_common")
    if not common.INTERPRETING:
        pytest.skip("the interpreter is not on")
    common.assert_in_range(torch.tensor([-1, 0, 2]), -1, 3)  # in range: no assert


def test_bad_environment_integer_warns_and_keeps_the_default(monkeypatch):
    common = pytest.importorskip("moelora.ops.triton_common")
    monkeypatch.setenv("MOELORA_TRITON_DECODE_MAX_T", "sixty")
    with pytest.warns(RuntimeWarning, match="not an integer; using 64"):
        assert common.env_int("MOELORA_TRITON_DECODE_MAX_T", 64) == 64
    monkeypatch.setenv("MOELORA_TRITON_DECODE_MAX_T", "0")
    assert common.env_int("MOELORA_TRITON_DECODE_MAX_T", 64) == 0


def test_every_triton_launch_runs_under_the_device_guard(monkeypatch):
    """Triton launches on the current CUDA device, not the tensors': every kernel of every op
    must start inside moelora's device guard (a head on cuda:1 ran on cuda:0 before). Under the
    interpreter: count the kernels run, and those run inside the guard."""
    common = pytest.importorskip("moelora.ops.triton_common")
    if not common.INTERPRETING:
        pytest.skip("the interpreter is not on")
    import contextlib

    from triton.runtime.interpreter import InterpretedFunction

    import moelora

    depth, runs = [0], []

    @contextlib.contextmanager
    def guard(t):
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    real_run = InterpretedFunction.run

    def run(self, *args, **kwargs):
        runs.append((self.fn.__name__, depth[0] > 0))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(common, "device_guard", guard)
    monkeypatch.setattr(InterpretedFunction, "run", run)
    x = torch.randn(70, 16, requires_grad=True)
    a = torch.randn(3, 4, 16, requires_grad=True)
    b = torch.randn(3, 8, 4, requires_grad=True)
    probs, ids, gates = moelora.topk_route(torch.randn(70, 3), 2, backend="triton")
    y = moelora.molora_linear(x, torch.randn(8, 16), None, a, b, ids, gates, 0.5, backend="triton")
    heads = torch.randn(2, 33, 16, requires_grad=True)
    logp = moelora.expert_logprobs(x, heads, torch.randint(0, 33, (70,)), backend="triton")
    (y.sum() + logp.sum()).backward()
    names = {name for name, _ in runs}
    assert {"_topk_route_kernel", "_row_stats_kernel", "_grad_logits_kernel"} <= names, names
    assert any("shrink" in n for n in names), names
    assert all(inside for _, inside in runs), [n for n, inside in runs if not inside]
