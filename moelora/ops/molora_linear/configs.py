"""Every launch choice of the core op's Triton backend, in one place: the route per call, the
tile of every kernel, and the measured table that may overrule the defaults.

Defaults are derived from the budget of benchmarks/NOTES.md (H200: ~790 TFLOP/s bf16 GEMM, ~4.3
TB/s) and kept spill-free by `python -m moelora.ops.compile_check` for sm_90a. Measurements
live in data: ``configs/*.json``, written by the tuning script (.ci/gpu_tune.py) on a GPU, one
file per device; an entry there beats a default, a default never beats a measurement.

Switches (environment, read at import): MOELORA_TRITON_DECODE_MAX_T (largest T of the decode
route, default 64; 0 turns it off), MOELORA_TRITON_ROUTE (dense / grouped / decode: force a
route where it applies), MOELORA_TRITON_GEMM (fused / cublas: force the large-T GEMM).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton

from moelora.ops.triton_common import env_int

DECODE_MAX_T = env_int("MOELORA_TRITON_DECODE_MAX_T", 64)
FORCED_ROUTE = os.environ.get("MOELORA_TRITON_ROUTE", "") or None
FORCED_GEMM = os.environ.get("MOELORA_TRITON_GEMM", "") or None

# Rows of sorted slots per program in the grouped kernels. tl.dot needs every dim >= 16.
GROUP_BLOCK_M = 64
# Output columns per program of the grouped expand and weight gradients.
BLOCK_N = 64

# Device yardsticks of the route's cost model (what cuBLAS reaches, docs/perf.md), by compute
# capability; the shrink's skinny dot is taken at 60% of the GEMM rate.
_PEAKS = {9: (790e12, 4.3e12), 8: (280e12, 1.8e12)}
_DEFAULT_PEAK = _PEAKS[9]
_LAUNCH_S = 3e-6


@dataclass(frozen=True)
class Target:
    """What a launch is configured for: the GPU's compute capability (major; 0 is Triton's
    interpreter on CPU tensors), its multiprocessor count and its name."""

    arch: int
    sms: int
    name: Optional[str] = None


_INTERPRETER = Target(0, 3)  # 3 "programs": fewer than tiles, so persistent loops are exercised
_SIMULATED: Optional[Target] = None


@contextlib.contextmanager
def simulate(arch: int = 9, sms: int = 132, name: Optional[str] = "NVIDIA H200"):
    """Configure launches on meta tensors as for this GPU (default: the H200 of docs/perf.md):
    the traffic test and the compile check see exactly what the launchers would pick there."""
    global _SIMULATED
    previous, _SIMULATED = _SIMULATED, Target(arch, sms, name)
    try:
        yield _SIMULATED
    finally:
        _SIMULATED = previous


def target(device: torch.device) -> Target:
    if _SIMULATED is not None and device.type == "meta":
        return _SIMULATED
    if device.type == "cuda" and torch.cuda.is_available():
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    return _INTERPRETER


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    return Target(props.major, props.multi_processor_count, props.name)


@dataclass(frozen=True)
class Route:
    kind: str  # "decode", "dense" or "grouped"
    gemm: str  # large-T GEMM with the rank-space extension: "fused" (one Triton launch) or "cublas"


def _peaks(device: torch.device) -> tuple:
    return _PEAKS.get(target(device).arch, _DEFAULT_PEAK)


def choose_route(device: torch.device, dtype: torch.dtype, T: int, d_in: int, E: int, r: int,
                 k: int) -> Route:
    """The route of one call, from shapes alone (the forward's state depends on it, so the
    backward and the fake implementation recompute the same one).

    decode for T <= DECODE_MAX_T; else dense (every expert's shrink at once: 2 T d E r FLOPs,
    one pass over x) or grouped (the routed work only, but x gathered once per slot: k passes,
    and a plan), whichever the yardsticks say is faster."""
    if FORCED_ROUTE in ("dense", "grouped") or (FORCED_ROUTE == "decode" and T <= 64):
        kind = FORCED_ROUTE
    elif T <= DECODE_MAX_T:
        kind = "decode"
    else:
        flops, bandwidth = _peaks(device)
        elt = torch.finfo(dtype).bits // 8
        x_pass = T * d_in * elt / bandwidth
        dense = max(2 * T * d_in * E * r / (0.6 * flops), x_pass)
        grouped = k * x_pass + 2 * _LAUNCH_S
        kind = "dense" if dense <= grouped else "grouped"
    return Route(kind, gemm_choice(device, dtype, T, d_in, E * r))


# --------------------------------------------------------------------------------------------
# the large-T GEMM with the rank-space extension
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    block_kx: int
    group_m: int
    num_warps: int
    num_stages: int
    tma: bool  # tensor descriptors (TMA) for A, W, Z and the output where aligned


def default_gemm_config(arch: int, dtype: torch.dtype, KX: int) -> GemmConfig:
    block_kx = max(16, min(64, triton.next_power_of_2(KX)))
    if arch == 0:  # the interpreter: small tiles, so tests cross tile and program boundaries
        return GemmConfig(16, 16, 16, 16, 2, 4, 1, True)
    if dtype == torch.float32:  # exact fp32 (FMA): registers bound the tile (4 warps spill 1.6 KB)
        return GemmConfig(64, 64, 32, min(block_kx, 32), 8, 8, 3, arch >= 9)
    if arch >= 9:  # Hopper: 128 x 128 wgmma tiles fed by TMA, 4 stages of 32 KiB
        return GemmConfig(128, 128, 64, block_kx, 8, 8, 4, True)
    return GemmConfig(128, 128, 32, min(block_kx, 32), 8, 8, 4, False)


def gemm_config(device: torch.device, dtype: torch.dtype, M: int, N: int, K: int, KX: int) -> GemmConfig:
    cfg = default_gemm_config(target(device).arch, dtype, KX)
    entry = _measured_gemm(device, dtype, M, N, K, KX)
    if entry and entry.get("tiles"):
        cfg = replace(cfg, **entry["tiles"])
    return cfg


def gemm_choice(device: torch.device, dtype: torch.dtype, M: int, K: int, KX: int) -> str:
    """"fused" where the tuning script measured the fused GEMM faster than cuBLAS at this shape
    class on this device, else "cublas": an unmeasured Triton GEMM is not trusted by default."""
    if FORCED_GEMM in ("fused", "cublas"):
        return FORCED_GEMM
    entry = _measured_gemm(device, dtype, M, None, K, KX)
    return entry["impl"] if entry else "cublas"


def persistent_programs(device: torch.device, cfg: GemmConfig) -> int:
    return target(device).sms  # one 128 x 128 tile's program per multiprocessor


# --------------------------------------------------------------------------------------------
# the dense shrink
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShrinkConfig:
    block_t: int
    block_k: int
    rank_p: int  # rank padded to a power of two: an expert's columns in the tile
    experts: int  # experts per program (their columns: experts * rank_p)
    num_warps: int


def shrink_config(device: torch.device, T: int, E: int, R: int, dot_fp32: bool) -> ShrinkConfig:
    """Whole experts per program, up to 256 rank columns (128 in fp32, whose FMA dot holds the
    tile in registers). Each program streams all of A_all from L2 (E r / block_t times x's
    bytes: 2x at E r = 128 and 64 tokens). 128 tokens per program halve that but spill (the
    accumulator and the rank-space tile together: 255 registers and 1-2 KB of spills at
    E r = 128 in ptxas for sm_90a); 64 tokens and 8 warps do not."""
    rank_p = triton.next_power_of_2(R)
    cols = 128 if dot_fp32 else 256
    experts = min(max(1, cols // rank_p), triton.next_power_of_2(E))
    experts = max(experts, triton.cdiv(16, rank_p))  # tl.dot: at least 16 columns
    width = experts * rank_p
    if target(device).arch == 0:
        return ShrinkConfig(16, 16, rank_p, experts, 4)
    if dot_fp32:
        return ShrinkConfig(32, 32 if width <= 64 else 16, rank_p, experts, 4 if width <= 64 else 8)
    return ShrinkConfig(64 if width <= 128 else 32, 64, rank_p, experts, 8)


# --------------------------------------------------------------------------------------------
# the decode route
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeConfig:
    block_t: int
    block_n: int  # rows of [W ; A_all] per partial-GEMV program
    block_k: int
    splits: int  # programs along d_in (split-K): enough programs to pull HBM bandwidth
    k_per_split: int
    block_n2: int  # output columns per epilogue program
    block_c: int  # rank columns per epilogue step
    num_warps: int


def decode_config(device: torch.device, T: int, N: int, K: int, ER: int) -> DecodeConfig:
    tgt = target(device)
    small = tgt.arch == 0  # the interpreter: small tiles, so tests cross their boundaries
    block_t = max(16, triton.next_power_of_2(T))
    block_n = 16 if small else 32
    block_k = 16 if small else (128 if block_t <= 16 else 64)
    tiles = triton.cdiv(N, block_n) + triton.cdiv(ER, block_n)
    programs = 2 * (2 if small else tgt.sms)  # two waves' worth of loads in flight
    splits = max(1, min(triton.cdiv(programs, tiles), K // (4 * block_k) or 1))
    k_per_split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    splits = triton.cdiv(K, k_per_split)
    # the epilogue holds [block_t, 64] tiles of partials, rank vectors and output: at 64 tokens
    # 128 rank columns or 4 warps spill (ptxas, sm_90a)
    block_c = max(16, min(64, triton.next_power_of_2(ER)))
    return DecodeConfig(block_t, block_n, block_k, splits, k_per_split, 16 if small else 64, block_c,
                        8 if block_t >= 64 else 4)


# --------------------------------------------------------------------------------------------
# the grouped route
# --------------------------------------------------------------------------------------------
def rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


# Grouped shrink and weight gradient, keyed by whether the dot runs as fp32 FMA and by the
# padded rank: (inner tile, num_warps); the inner tile is BLOCK_K for the shrink and the slots
# per step for the weight gradient. Each the largest tile with no register spill in ptxas -v
# for sm_90a, except fp32 at rank 256 and the 16-bit shrink at 256 (<= 0.3 KB).
_GROUPED_SHRINK = {
    False: {16: (64, 4), 32: (64, 8), 64: (64, 8), 128: (32, 8), 256: (16, 8)},
    True: {16: (32, 4), 32: (32, 4), 64: (16, 8), 128: (16, 8), 256: (16, 8)},
}
_GROUPED_WGRAD = {
    False: {16: (64, 4), 32: (64, 4), 64: (64, 8), 128: (32, 8), 256: (32, 8)},
    True: {16: (32, 4), 32: (32, 8), 64: (32, 8), 128: (16, 8), 256: (16, 8)},
}


def grouped_shrink_config(dot_fp32: bool, block_r: int) -> tuple[int, int]:
    return _GROUPED_SHRINK[dot_fp32][min(block_r, 256)]


def grouped_wgrad_config(dot_fp32: bool, block_r: int) -> tuple[int, int]:
    return _GROUPED_WGRAD[dot_fp32][min(block_r, 256)]


def expand_config(R: int) -> tuple[int, int, int]:
    """(chunk width, number of chunks, num_warps) covering rank R in the grouped expand: the
    rank in 16-wide chunks up to 256, then at most 16 chunks, so registers stay bounded."""
    chunk = max(16, rank_block(R) // 16)
    chunks = triton.cdiv(R, chunk)
    return chunk, chunks, 4 if chunks <= 1 else 8


# The routing plan's kernels.
PLAN_MAX_CHUNKS = 128  # programs per launch; the scatter reads every chunk's histogram row
PLAN_TILE = 4096  # slots x expert buckets held at once by one program


def plan_config(e_pad: int) -> dict:
    """Tiles of the plan kernels for E_PAD buckets: slots per step, histogram rows per load,
    blocks per table tile; each [tile, E_PAD] spill-free by ptxas -v for sm_90a."""
    return dict(SUB=max(16, min(1024, PLAN_TILE // e_pad)), HIST_ROWS=max(2, PLAN_TILE // e_pad),
                BLOCK_B=max(16, min(64, 2048 // e_pad)))


def plan_blocks(S: int, E: int, block_m: int) -> int:
    """sum_e ceil(c_e / m) <= floor(S / m) + E: a static bound on the plan's blocks."""
    return S // block_m + E


def plan_state_size(S: int, E: int, block_m: int) -> int:
    return S + 2 * E + 3 * plan_blocks(S, E, block_m)


# --------------------------------------------------------------------------------------------
# measured configs (configs/*.json, written by .ci/gpu_tune.py)
# --------------------------------------------------------------------------------------------
CONFIG_DIR = pathlib.Path(__file__).with_name("configs")


@functools.lru_cache(maxsize=None)
def _tables() -> tuple:
    tables = []
    for path in sorted(CONFIG_DIR.glob("*.json")):
        with open(path, encoding="utf-8") as f:
            tables.append(json.load(f))
    return tuple(tables)


def gemm_key(dtype: torch.dtype, K: int, KX: int) -> str:
    return f"{str(dtype).removeprefix('torch.')}:K{K}:KX{KX}"


def _measured_gemm(device, dtype, M, N, K, KX) -> Optional[dict]:
    """The tuning script's verdict for this device, dtype, reduction size and rank space, at the
    largest measured M not above this one: {"impl": "fused" | "cublas", "tiles": {...}}."""
    name = target(device).name
    if name is None:
        return None
    for table in _tables():
        if table.get("device") != name:
            continue
        rows = table.get("gemm", {}).get(gemm_key(dtype, K, KX), {})
        fits = [int(m) for m in rows if int(m) <= M]
        if fits:
            return rows[str(max(fits))]
    return None
