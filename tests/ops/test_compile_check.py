"""What the GPU will run, checked on a machine without one: every Triton kernel of the core op,
compiled for sm_90a (the H200) exactly as the launchers specialise it at docs/perf.md's shapes
(`moelora.ops.compile_check`), must not spill registers, and the fused GEMM's 16-bit main loop
must be TMA loads feeding wgmma (HGMMA / UTMALDG in its SASS)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels themselves run")
def test_kernels_compile_for_hopper_without_spills(tmp_path):
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TRITON_INTERPRET", None)
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, "-m", "moelora.ops.compile_check", "--json", str(report)],
                         env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    kernels = json.loads(report.read_text())
    names = {k["kernel"] for k in kernels}
    assert {"_shrink_dense_kernel", "_fused_gemm_kernel", "_decode_partial_kernel",
            "_decode_epilogue_kernel", "_grouped_shrink_kernel", "_plan_scatter_kernel"} <= names
    assert all(k["spill_bytes"] == 0 for k in kernels), [k for k in kernels if k["spill_bytes"]]
    gemms = [k for k in kernels if k["kernel"] == "_fused_gemm_kernel" and k["case"] == "prefill"]
    assert gemms and all(k["wgmma"] and k["tma_loads"] for k in gemms), gemms
