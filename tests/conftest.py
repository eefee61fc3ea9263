"""Test setup: without a GPU, Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before `triton.jit` wraps the kernels, i.e. before moelora's
kernels are imported, hence here at collection time.
"""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random inputs per test, but reproducible from the test id when one fails.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _fresh_backend_choices():
    # Tests monkeypatch what the availability probes see (extension missing, Triton broken);
    # a process never changes it, so moelora memoises the choices: forget them per test.
    from moelora.ops import dispatch

    dispatch.clear_decisions()
    yield
    dispatch.clear_decisions()
