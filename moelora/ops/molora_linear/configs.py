"""Every launch choice of the core op's Triton kernels, in one place.

Tables are keyed by what decides them (whether the dot runs as exact fp32, the padded rank);
each entry is the largest tile with no register spill in `ptxas -v` for sm_90a. What has and
has not been measured is in benchmarks/NOTES.md.
"""
from __future__ import annotations

import triton

from moelora.ops.triton_common import env_int

# Rows of sorted slots per program in shrink / wgrad. tl.dot needs every dim >= 16.
GROUP_BLOCK_M = 64
# Largest T served without a routing plan. At 64 a single token tile (BLOCK_T = 64) covers every
# token, so the token-major kernels read each matrix as often as the grouped ones.
# MOELORA_TRITON_PLAN_FREE_MAX_T overrides it (e.g. 0 forces the grouped kernels).
PLAN_FREE_MAX_T = env_int("MOELORA_TRITON_PLAN_FREE_MAX_T", 64)


def rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def token_block(T: int) -> int:
    """Rows per token tile: the smallest tl.dot-able power of two covering T, at most 64."""
    return min(64, max(16, triton.next_power_of_2(T)))


# Launch configs, as data. Shrink and weight gradient: keyed by whether the dot runs as fp32
# FMA (DOT_FP32) and by the padded rank, (inner tile, num_warps); the inner tile is BLOCK_K for
# the shrinks and the slots (tokens) per step for the weight gradients. Each is the largest
# tile with no register spill in `ptxas -v` for sm_90a, except fp32 at rank 256 and 16-bit
# shrink at 256 (<= 0.3 KB).
SHRINK_CONFIGS = {
    False: {16: (64, 4), 32: (64, 8), 64: (64, 8), 128: (32, 8), 256: (16, 8)},
    True: {16: (32, 4), 32: (32, 4), 64: (16, 8), 128: (16, 8), 256: (16, 8)},
}
WGRAD_CONFIGS = {
    False: {16: (64, 4), 32: (64, 4), 64: (64, 8), 128: (32, 8), 256: (32, 8)},
    True: {16: (32, 4), 32: (32, 8), 64: (32, 8), 128: (16, 8), 256: (16, 8)},
}
# Output columns per program of the expands and the weight gradients.
BLOCK_N = 64
# The expands walk the rank in chunks (16 wide up to r = 256, then at most 16 chunks), so
# registers stay bounded at any r; warps in _expand_config, spill-free by the same check.
EXPAND_MAX_CHUNKS = 16


def config(table: dict, dot_fp32: bool, block_r: int) -> tuple[int, int]:
    return table[dot_fp32][min(block_r, 256)]


def expand_config(R: int, grouped: bool) -> tuple[int, int, int]:
    """(chunk width, number of chunks, num_warps) covering rank R in an expand."""
    chunk = max(16, rank_block(R) // EXPAND_MAX_CHUNKS)
    chunks = triton.cdiv(R, chunk)
    return chunk, chunks, 4 if chunks <= (1 if grouped else 2) else 8


# The routing plan's kernels.
PLAN_MAX_CHUNKS = 128  # programs per launch; the scatter reads every chunk's histogram row
PLAN_TILE = 4096  # slots x expert buckets held at once by one program


def plan_config(e_pad: int) -> dict:
    """Tiles of the plan kernels for E_PAD buckets: slots per step, histogram rows per load,
    blocks per table tile; each [tile, E_PAD] spill-free by ptxas -v for sm_90a."""
    return dict(SUB=max(16, min(1024, PLAN_TILE // e_pad)), HIST_ROWS=max(2, PLAN_TILE // e_pad),
                BLOCK_B=max(16, min(64, 2048 // e_pad)))
