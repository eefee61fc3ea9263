"""Fault injection in the extension path (issue 15): a missing or unloadable compiled extension,
or a Triton kernel that fails to compile at its first call, leaves a working fallback with
exactly one warning, never a wrong result; a backend asked for by name re-raises."""
from __future__ import annotations

import logging
import sys
import warnings

import pytest
import torch

import moelora
from moelora.ops import dispatch, extension
from moelora.ops.molora_linear.op import BACKENDS


def _inputs(T=5, d_in=8, d_out=6, E=3, r=2, k=2):
    return dict(
        x=torch.randn(T, d_in), weight=torch.randn(d_out, d_in), bias=torch.randn(d_out),
        lora_a=torch.randn(E, r, d_in), lora_b=torch.randn(E, d_out, r),
        expert_indices=torch.randint(0, E, (T, k)), expert_weights=torch.rand(T, k),
    )


def _count(records, text):
    return sum(text in str(r.message) for r in records)


@pytest.fixture
def fresh_extension(monkeypatch):
    """load() re-run under the test's fault, and re-run (unpatched) by whoever calls it next."""
    monkeypatch.delenv("MOELORA_DISABLE_EXTENSION", raising=False)
    monkeypatch.delenv("MOELORA_BACKEND", raising=False)
    extension.load.cache_clear()
    yield
    extension.load.cache_clear()


def _raise_oserror():
    raise OSError("libc10.so: cannot open shared object file")


@pytest.mark.parametrize("fault", ["missing", "oserror"])
def test_extension_fault_falls_back_to_torch_with_one_warning(fault, fresh_extension, monkeypatch,
                                                              caplog):
    if fault == "missing":  # the import itself fails: ModuleNotFoundError
        monkeypatch.delattr(moelora, "_C", raising=False)
        monkeypatch.setitem(sys.modules, "moelora._C", None)
        expected = "ModuleNotFoundError"
    else:  # the shared library is found but the loader refuses it
        monkeypatch.setattr(extension, "_import_native", _raise_oserror)
        expected = "OSError"
    p = _inputs()
    with warnings.catch_warnings(record=True) as records, caplog.at_level(logging.WARNING, "moelora"):
        warnings.simplefilter("always")
        ref = moelora.molora_linear(**p, scaling=0.5, backend="torch")
        reasons = {name: BACKENDS.reasons(torch.device(name), (torch.float32,) * 2)[name]
                   for name in ("cpu", "cuda")}
        assert BACKENDS.resolve("auto", torch.device("cpu"), (torch.float32,) * 2) == "torch"
        out = [moelora.molora_linear(**p, scaling=0.5) for _ in range(2)]
    for name in ("cpu", "cuda"):
        assert "compiled extension not loaded" in reasons[name] and expected in reasons[name]
    assert "cpu" not in moelora.available_backends("cpu")
    for y in out:
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert _count(records, "compiled extension not loaded") == 1
    assert sum("compiled extension not loaded" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="backend 'cpu' cannot run.*compiled extension not loaded"):
        moelora.molora_linear(**p, scaling=0.5, backend="cpu")


def test_extension_loads_again_after_fault(fresh_extension, monkeypatch):
    monkeypatch.setattr(extension, "_import_native", _raise_oserror)
    with pytest.warns(RuntimeWarning, match="compiled extension not loaded"):
        assert extension.load() is False
    assert "OSError" in extension._load_error
    monkeypatch.undo()
    extension.load.cache_clear()
    if extension.load():  # built here: the error of the failed attempt does not linger
        assert extension._load_error is None


# --------------------------------------------------------------------------------------------
# Triton compile failure at first call
# --------------------------------------------------------------------------------------------
triton = pytest.importorskip("triton")
from triton.compiler.errors import CompilationError  # noqa: E402


class _CompileFault(CompilationError):
    """What triton raises when a kernel fails to compile (its own __init__ wants an AST node)."""

    def __init__(self, message):
        Exception.__init__(self, message)

    def __str__(self):
        return self.args[0]


@pytest.fixture
def broken_triton(monkeypatch):
    """`auto` on CPU tries triton first (it runs there under the interpreter) and triton's
    forward raises a compile error; returns the list of its calls."""
    if not dispatch.interpreting() and not torch.cuda.is_available():
        pytest.skip("triton runs on CPU tensors only under TRITON_INTERPRET=1")
    monkeypatch.delenv("MOELORA_BACKEND", raising=False)
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("triton", "torch"))
    monkeypatch.setattr(BACKENDS, "_failed", {})  # this op's run-time faults, fresh per test
    impl = BACKENDS.impl("triton")
    calls = []

    def forward(*args):
        calls.append(1)
        raise _CompileFault("at 12:4: invalid tl.dot operand shapes")

    monkeypatch.setattr(impl, "forward", forward)
    return calls


def test_triton_compile_fault_under_auto_reruns_on_torch(broken_triton, caplog):
    p = _inputs()
    ref = moelora.molora_linear(**p, scaling=0.5, backend="torch")
    with warnings.catch_warnings(record=True) as records, caplog.at_level(logging.WARNING, "moelora"):
        warnings.simplefilter("always")
        out = [moelora.molora_linear(**p, scaling=0.5, backend="auto") for _ in range(2)]
    for y in out:
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert len(broken_triton) == 1  # the second call goes straight to torch
    assert _count(records, "backend 'triton' disabled") == 1
    assert sum("backend 'triton' disabled" in r.getMessage() for r in caplog.records) == 1
    reason = BACKENDS.reasons(torch.device("cpu"), (torch.float32,) * 2)["triton"]
    assert "failed to compile at first call" in reason and "invalid tl.dot" in reason
    # Gradients flow through the fallback backend too.
    x = p["x"].clone().requires_grad_()
    moelora.molora_linear(**{**p, "x": x}, scaling=0.5).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_explicit_triton_reraises(broken_triton):
    p = _inputs()
    with pytest.raises(CompilationError, match="invalid tl.dot"):
        moelora.molora_linear(**p, scaling=0.5, backend="triton")
    assert BACKENDS._failed == {}  # nothing marked: the caller saw the error


def test_non_triton_error_is_not_swallowed(broken_triton, monkeypatch):
    """Only Triton's own exceptions count as a compile fault; a bug elsewhere propagates."""
    def forward(*args):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(BACKENDS.impl("triton"), "forward", forward)
    with pytest.raises(RuntimeError, match="a real bug"):
        moelora.molora_linear(**_inputs(), scaling=0.5, backend="auto")
    assert BACKENDS._failed == {}


def _break_triton(monkeypatch, op_backends, method):
    monkeypatch.setattr(op_backends, "_failed", {})
    calls = []

    def broken(*args):
        calls.append(1)
        raise _CompileFault("at 3:8: unsupported layout")

    monkeypatch.setattr(op_backends.impl("triton"), method, broken)
    return calls


def test_delta_and_routing_fall_back_too(broken_triton, monkeypatch):
    """The same rule in every op with a Triton backend whose call sits in the op's functional."""
    from moelora.ops.molora_delta.op import BACKENDS as DELTA, molora_delta
    from moelora.ops.routing.op import BACKENDS as ROUTE

    p = _inputs()
    del p["weight"], p["bias"]
    delta_calls = _break_triton(monkeypatch, DELTA, "forward")
    route_calls = _break_triton(monkeypatch, ROUTE, "topk_route")
    logits = torch.randn(7, 4)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        for _ in range(2):
            torch.testing.assert_close(molora_delta(**p, scaling=0.5),
                                       molora_delta(**p, scaling=0.5, backend="torch"),
                                       rtol=0, atol=0)
            for got, want in zip(moelora.topk_route(logits, 2), moelora.topk_route(logits, 2, backend="torch")):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert delta_calls == [1] and route_calls == [1]
    assert _count(records, "molora_delta: backend 'triton' disabled") == 1
    assert _count(records, "topk_route: backend 'triton' disabled") == 1
    # Once auto has dropped it, asking for triton by name names the fault instead of retrying.
    with pytest.raises(ValueError, match="backend 'triton' cannot run topk_route.*failed to compile"):
        moelora.topk_route(logits, 2, backend="triton")
