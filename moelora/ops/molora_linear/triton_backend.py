"""Triton kernels of the core op (docs/spec.md §1), designed from the byte and FLOP budget of
docs/perf.md (the budget of every path, and what has been measured, is in benchmarks/NOTES.md).

Three routes, chosen per call from shapes alone (configs.choose_route; no host sync):

dense (E*r small; the common case)   the rank-space form of docs/spec.md §1
    forward   1. shrink: one pass over x for every expert at once,
                 h [T, k, r] = the routed slots of x A_all^T, and
                 z [T, E*r] = s * gates * h in each expert's columns (zero elsewhere);
                 the expert-id check rides along (a device assert, no extra launch)
              2. y = [x | z] @ [W | B_all]^T + b: the expand is E*r more steps of the GEMM's
                 reduction, so y is written once and never read back ("fused"), or cuBLAS's
                 y = x W^T + b then y += z B_all^T ("cublas", a read-modify-write of y)
    backward  the same shrink over dy gives u, the gate gradient and z_u = s g u;
              dx = [dy | z_u] @ [W ; A_all] (fused, or cuBLAS + addmm);
              dB_all = dy^T z and dA_all = z_u^T x as cuBLAS GEMMs (one pass over dy / x each).
              z is the forward's state: the backward does not rebuild it.

grouped (E*r large: many experts)    one expert per tile over slots sorted by expert
    a routing plan (a stable counting sort, two launches, kept as the forward's state), then
    shrink / weight-gradient kernels that each multiply one expert's matrix per tile, so the
    work is the routed work only; the expand is the grouped one (k = 1: one writer per row) or,
    with k > 1, the rank-space GEMM extension fed by z built from h.

decode (T <= DECODE_MAX_T)           two launches, the id check included
    1. split-K GEMV over the stacked rows [W ; A_all]: enough programs to pull HBM bandwidth;
    2. a deterministic reduction of the partials, + b, + the expand from the reduced rank
       vectors (rank space: B_all read once), writing y, h and z.

Every offset that multiplies a token or row index is int64. Rank vectors (h, u) are fp32; z and
z_u are in the activations' dtype, the tensor cores' operand (docs/perf.md: keep the rank
intermediate in registers or fp32 — the fp32 h is what the gate gradient uses). Launch choices
live in configs.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moelora.ops.molora_linear import configs
from moelora.ops.triton_common import dot, dot_in_fp32, launch

__all__ = ["forward", "backward", "state_like", "CHECKS_IDS"]

# Every route's first kernel asserts that the ids lie in [-1, E): the op adds no check launch.
CHECKS_IDS = True

# A device assert compiles only into kernels built with debug=True; the overflow checks debug
# would add to every integer op stay off.
_CHECKED = dict(debug=True, sanitize_overflow=False)


# ============================================================================================
# kernels
# ============================================================================================
@triton.jit
def _shrink_dense_kernel(
    src_ptr, stride_src,  # src [T, K]: x (forward) or dy (backward)
    mat_ptr, stride_me, stride_mi, stride_mk,  # M[e, i, c]: A [E, r, d_in], or B^T read from B [E, d_out, r]
    index_ptr, gate_ptr,  # [T, k] int64 ids, [T, k] fp32 gates
    vec_ptr,  # [T, k, R] fp32 out: h or u; zeros where a slot names no expert
    z_ptr, stride_z,  # [T, E * R] out, src dtype: s * g * vec in each expert's columns, 0 elsewhere
    h_ptr, grad_gate_ptr,  # FUSE_GATE_GRAD: dg[t, j] = s * <vec[t, j], h[t, j]>
    T, K, E, R, num_slots, scaling,
    FUSE_GATE_GRAD: tl.constexpr, CHECK_IDS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, RANK_P: tl.constexpr, EXPERTS: tl.constexpr,
):
    # program (token tile, expert group): x_tile @ M^T for EXPERTS experts at once; each rank
    # column c' = expert * RANK_P + i is padded to a power of two so a group holds whole experts
    # (the gate gradient then needs no reduction across programs)
    pid_t = tl.program_id(0)
    pid_e = tl.program_id(1)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_mask = offs_t < T
    offs_c = tl.arange(0, EXPERTS * RANK_P)
    e_c = pid_e * EXPERTS + offs_c // RANK_P
    i_c = offs_c % RANK_P
    c_mask = (e_c < E) & (i_c < R)
    mat_cols = mat_ptr + e_c.to(tl.int64) * stride_me + i_c * stride_mi
    acc = tl.zeros((BLOCK_T, EXPERTS * RANK_P), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(src_ptr + offs_t[:, None] * stride_src + offs_k[None, :],
                    mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        m = tl.load(mat_cols[None, :] + offs_k[:, None] * stride_mk,
                    mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        acc += dot(a, m, DOT_FP32)
    zacc = tl.zeros((BLOCK_T, EXPERTS * RANK_P), dtype=tl.float32)
    first = pid_e * EXPERTS
    for j in range(0, num_slots):
        slot = offs_t * num_slots + j
        ids = tl.load(index_ptr + slot, mask=t_mask, other=-1)
        if CHECK_IDS:
            tl.device_assert(~t_mask | ((ids >= -1) & (ids < E)),
                             "moelora: expert_indices out of range [-1, E)")
        gate = tl.load(gate_ptr + slot, mask=t_mask, other=0.0)
        sel = (ids[:, None] == e_c[None, :]) & c_mask[None, :] & t_mask[:, None]
        vec_offs = slot[:, None] * R + i_c[None, :]
        tl.store(vec_ptr + vec_offs, acc, mask=sel)
        zacc += tl.where(sel, gate[:, None] * acc, 0.0)
        mine = t_mask & (ids >= first) & (ids < first + EXPERTS) & (ids < E)
        none = t_mask & ((ids < 0) | (ids >= E)) & (pid_e == 0)  # no expert: zeros, from group 0
        zero_cols = (offs_c < RANK_P) & (i_c < R)
        tl.store(vec_ptr + vec_offs, tl.zeros_like(acc), mask=none[:, None] & zero_cols[None, :])
        if FUSE_GATE_GRAD:
            h = tl.load(h_ptr + vec_offs, mask=sel, other=0.0)
            dg = scaling * tl.sum(tl.where(sel, acc * h, 0.0), axis=1)
            tl.store(grad_gate_ptr + slot, tl.where(none, 0.0, dg), mask=mine | none)
    z_cols = e_c.to(tl.int64) * R + i_c
    tl.store(z_ptr + offs_t[:, None] * stride_z + z_cols[None, :],
             (scaling * zacc).to(z_ptr.dtype.element_ty), mask=t_mask[:, None] & c_mask[None, :])


@triton.jit
def _tile_of(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tile index -> (pid_m, pid_n), GROUP_M row tiles at a time, so tiles that run together
    share their A rows and W columns in L2."""
    in_group = GROUP_M * num_pid_n
    group = tile // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % in_group) % size_m
    pid_n = (tile % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _fused_gemm_kernel(
    a_ptr, stride_am,  # A [M, K]: x (forward) or dy (backward); a TensorDescriptor with USE_TMA
    w_ptr, stride_w,  # base weight: [N, K] (W_KN False: y = x W^T) or [K, N] (W_KN True: dx = dy W)
    z_ptr, stride_zm,  # [M, KX] rank-space operand: z or z_u (a TensorDescriptor with USE_TMA)
    ext_ptr, stride_xe, stride_xi, stride_xn,  # X[e, i, n], rank column c = e * RANK + i:
    #                                            B [E, d_out, r] (forward), A [E, r, d_in] (backward)
    bias_ptr,  # [N] or unused
    c_ptr, stride_cm,  # out [M, N] (a TensorDescriptor with USE_TMA)
    M, N, K, KX, RANK,
    HAS_BIAS: tl.constexpr, W_KN: tl.constexpr, USE_TMA: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KX: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    # out = [A | Z] @ [W^T ; X]: the base GEMM's reduction over K, then KX more reduction steps
    # over the rank space, into the same accumulator; the tile is stored once. Persistent: each
    # program walks tiles pid, pid + NUM_PROGRAMS, ...
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
        pid_m, pid_n = _tile_of(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        offs_m = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if USE_TMA:
                a = a_ptr.load([off_m, k0])
                if W_KN:
                    w = w_ptr.load([k0, off_n])
                else:
                    w = w_ptr.load([off_n, k0]).T
            else:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                            mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                if W_KN:
                    w = tl.load(w_ptr + offs_k[:, None].to(tl.int64) * stride_w + offs_n[None, :],
                                mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                else:
                    w = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * stride_w + offs_k[:, None],
                                mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc += dot(a, w, DOT_FP32)
        for c0 in range(0, KX, BLOCK_KX):  # the expand, as more reduction steps
            offs_c = c0 + tl.arange(0, BLOCK_KX)
            cx_mask = offs_c < KX
            if USE_TMA:
                zt = z_ptr.load([off_m, c0])
            else:
                zt = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_c[None, :],
                             mask=m_mask[:, None] & cx_mask[None, :], other=0.0)
            e = (offs_c // RANK).to(tl.int64)
            xt = tl.load(ext_ptr + e[:, None] * stride_xe + (offs_c % RANK)[:, None] * stride_xi
                         + offs_n[None, :] * stride_xn,
                         mask=cx_mask[:, None] & n_mask[None, :], other=0.0)
            acc += dot(zt, xt, DOT_FP32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if USE_TMA:
            c_ptr.store([off_m, off_n], acc.to(c_ptr.dtype))
        else:
            tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :],
                     acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gemv_rows(x_ptr, stride_x, rows_ptr, stride_row, offs_t, t_mask, row0, num_rows, k_begin, k_end,
               DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    """[BLOCK_T, BLOCK_N] fp32: x[t, k_begin:k_end] . rows[row0 + n, k_begin:k_end]."""
    offs_n = row0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < num_rows
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        a = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_k[None, :],
                    mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(rows_ptr + offs_n[None, :].to(tl.int64) * stride_row + offs_k[:, None],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += dot(a, w, DOT_FP32)
    return acc


@triton.jit
def _decode_partial_kernel(
    x_ptr, stride_x,  # [T, K]
    w_ptr, stride_w,  # [N, K]
    a_ptr,  # [E * R, K] (lora_a, contiguous)
    part_ptr,  # [SPLITS, T, N + E * R] fp32 out: partial sums over this split's K range
    index_ptr,  # [T, k] ids, checked here
    T, N, K, ER, E, num_ids, k_per_split,
    DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_IDS: tl.constexpr,
):
    # program (row tile, K split) over the stacked rows [W ; A_all]: W's tiles first, then A's
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T).to(tl.int64)
    t_mask = offs_t < T
    k_begin = pid_s * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    tiles_w = tl.cdiv(N, BLOCK_N)
    width = N + ER
    out = part_ptr + pid_s.to(tl.int64) * T * width + offs_t[:, None] * width
    if pid_n < tiles_w:
        row0 = pid_n * BLOCK_N
        acc = _gemv_rows(x_ptr, stride_x, w_ptr, stride_w, offs_t, t_mask, row0, N, k_begin, k_end,
                         DOT_FP32, BLOCK_N, BLOCK_K, BLOCK_T)
        cols = row0 + tl.arange(0, BLOCK_N)
        tl.store(out + cols[None, :], acc, mask=t_mask[:, None] & (cols < N)[None, :])
    else:
        row0 = (pid_n - tiles_w) * BLOCK_N
        acc = _gemv_rows(x_ptr, stride_x, a_ptr, K, offs_t, t_mask, row0, ER, k_begin, k_end,
                         DOT_FP32, BLOCK_N, BLOCK_K, BLOCK_T)
        cols = row0 + tl.arange(0, BLOCK_N)
        tl.store(out + N + cols[None, :], acc, mask=t_mask[:, None] & (cols < ER)[None, :])
    if (pid_n == 0) & (pid_s == 0):  # the expert-id check, in the same launch
        offs = tl.arange(0, BLOCK_IDS)
        ids = tl.load(index_ptr + offs, mask=offs < num_ids, other=0)
        tl.device_assert((ids >= -1) & (ids < E), "moelora: expert_indices out of range [-1, E)")


@triton.jit
def _decode_epilogue_kernel(
    part_ptr,  # [SPLITS, T, N + E * R] fp32
    bias_ptr,  # [N]
    y_ptr, stride_y,  # [T, N] out
    h_ptr,  # [T, k, R] fp32 out (written by program 0)
    z_ptr, stride_z,  # [T, E * R] out, x dtype (program 0): the backward's state
    index_ptr, gate_ptr,  # [T, k]
    b_ptr, stride_be, stride_bn, stride_bi,  # B [E, N, R]
    T, N, ER, R, E, num_slots, SPLITS, scaling,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T).to(tl.int64)
    t_mask = offs_t < T
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    width = N + ER
    rows = part_ptr + offs_t[:, None] * width
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for s in range(0, SPLITS):  # a fixed order: the same sums every run
        acc += tl.load(rows + s * T * width + offs_n[None, :], mask=t_mask[:, None] & n_mask[None, :], other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    for c0 in range(0, ER, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < ER
        e_c = offs_c // R
        i_c = offs_c % R
        tile_mask = t_mask[:, None] & c_mask[None, :]
        h_all = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for s in range(0, SPLITS):
            h_all += tl.load(rows + s * T * width + N + offs_c[None, :], mask=tile_mask, other=0.0)
        zacc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for j in range(0, num_slots):
            slot = offs_t * num_slots + j
            ids = tl.load(index_ptr + slot, mask=t_mask, other=-1)
            gate = tl.load(gate_ptr + slot, mask=t_mask, other=0.0)
            sel = (ids[:, None] == e_c[None, :]) & tile_mask
            zacc += tl.where(sel, gate[:, None] * h_all, 0.0)
            if pid_n == 0:
                tl.store(h_ptr + slot[:, None] * R + i_c[None, :], h_all, mask=sel)
                none = t_mask & ((ids < 0) | (ids >= E))
                tl.store(h_ptr + slot[:, None] * R + offs_c[None, :], tl.zeros_like(h_all),
                         mask=none[:, None] & (offs_c < R)[None, :])
        z = (scaling * zacc).to(z_ptr.dtype.element_ty)
        if pid_n == 0:
            tl.store(z_ptr + offs_t[:, None] * stride_z + offs_c[None, :], z, mask=tile_mask)
        bt = tl.load(b_ptr + e_c[:, None].to(tl.int64) * stride_be + offs_n[None, :] * stride_bn
                     + i_c[:, None] * stride_bi, mask=c_mask[:, None] & n_mask[None, :], other=0.0)
        acc += dot(z, bt, DOT_FP32)
    tl.store(y_ptr + offs_t[:, None] * stride_y + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=t_mask[:, None] & n_mask[None, :])


@triton.jit
def _rank_space_kernel(
    vec_ptr,  # [T, k, R] fp32
    index_ptr, gate_ptr,  # [T, k]
    z_ptr, stride_z,  # [T, E * R] out: s * sum_j g[t, j] vec[t, j] in expert e[t, j]'s columns
    T, ER, R, num_slots, scaling,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # slots -> rank space, for the grouped route's GEMM extension (every column written)
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_mask = offs_t < T
    c_mask = offs_c < ER
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for j in range(0, num_slots):
        slot = offs_t * num_slots + j
        ids = tl.load(index_ptr + slot, mask=t_mask, other=-1)
        gate = tl.load(gate_ptr + slot, mask=t_mask, other=0.0)
        sel = (ids[:, None] == (offs_c // R)[None, :]) & t_mask[:, None] & c_mask[None, :]
        acc += tl.where(sel, gate[:, None] * tl.load(vec_ptr + slot[:, None] * R + (offs_c % R)[None, :],
                                                       mask=sel, other=0.0), 0.0)
    tl.store(z_ptr + offs_t[:, None] * stride_z + offs_c[None, :],
             (scaling * acc).to(z_ptr.dtype.element_ty), mask=t_mask[:, None] & c_mask[None, :])


# --------------------------------------------------------------------------------------------
# the grouped route: a routing plan, then one expert per tile
# --------------------------------------------------------------------------------------------
@triton.jit
def _plan_histogram_kernel(
    index_ptr,  # [S] expert ids
    hist_ptr,  # [num_chunks, E_PAD] int64: slots of each expert bucket (E: none) per chunk
    S, E, chunk_len,
    E_PAD: tl.constexpr, SUB: tl.constexpr,
):
    pid = tl.program_id(0)
    first = pid.to(tl.int64) * chunk_len
    offs_e = tl.arange(0, E_PAD)
    counts = tl.zeros((E_PAD,), dtype=tl.int64)
    for s0 in range(0, chunk_len, SUB):
        local = s0 + tl.arange(0, SUB)
        offs = first + local
        mask = (local < chunk_len) & (offs < S)
        ids = tl.load(index_ptr + offs, mask=mask, other=-1)
        tl.device_assert(~mask | ((ids >= -1) & (ids < E)), "moelora: expert_indices out of range [-1, E)")
        key = tl.where((ids >= 0) & (ids < E), ids, E)
        onehot = (key[:, None] == offs_e[None, :]) & mask[:, None]
        counts += tl.sum(onehot.to(tl.int64), axis=0)
    tl.store(hist_ptr + pid * E_PAD + offs_e, counts)


@triton.jit
def _plan_scatter_kernel(
    index_ptr, hist_ptr,
    sorted_ptr,  # [S] int64 out: slot ids grouped by expert, in slot order within an expert
    expert_start_ptr, expert_count_ptr,  # [E] int64 out
    block_expert_ptr, block_start_ptr, block_end_ptr,  # [num_blocks] int64 out
    S, E, chunk_len, num_chunks, num_blocks,
    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, SUB: tl.constexpr, HIST_ROWS: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_e = tl.arange(0, E_PAD)
    counts = tl.zeros((E_PAD,), dtype=tl.int64)
    earlier = tl.zeros((E_PAD,), dtype=tl.int64)  # slots of each bucket in chunks before this one
    for c0 in range(0, num_chunks, HIST_ROWS):  # the histogram rows in a few wide loads
        rows = c0 + tl.arange(0, HIST_ROWS)
        tile = tl.load(hist_ptr + rows[:, None] * E_PAD + offs_e[None, :],
                       mask=(rows < num_chunks)[:, None], other=0)
        counts += tl.sum(tile, axis=0)
        earlier += tl.sum(tl.where((rows < pid)[:, None], tile, 0), axis=0)
    starts = tl.cumsum(counts, axis=0) - counts
    next_pos = starts + earlier
    first = pid.to(tl.int64) * chunk_len
    for s0 in range(0, chunk_len, SUB):
        local = s0 + tl.arange(0, SUB)
        offs = first + local
        mask = (local < chunk_len) & (offs < S)
        ids = tl.load(index_ptr + offs, mask=mask, other=-1)
        key = tl.where((ids >= 0) & (ids < E), ids, E)
        onehot = ((key[:, None] == offs_e[None, :]) & mask[:, None]).to(tl.int64)
        rank = tl.cumsum(onehot, axis=0) - onehot  # earlier slots of the same bucket in this step
        pos = tl.sum(onehot * (next_pos[None, :] + rank), axis=1)
        tl.store(sorted_ptr + pos, offs, mask=mask)
        next_pos += tl.sum(onehot, axis=0)
    is_expert = offs_e < E
    if pid == 0:
        tl.store(expert_start_ptr + offs_e, starts, mask=is_expert)
        tl.store(expert_count_ptr + offs_e, counts, mask=is_expert)
    # the block table, its tiles dealt round the programs
    blocks = tl.where(is_expert, (counts + BLOCK_M - 1) // BLOCK_M, 0)
    blocks_end = tl.cumsum(blocks, axis=0)
    blocks_first = blocks_end - blocks
    ends = starts + counts
    for b0 in range(pid * BLOCK_B, num_blocks, num_chunks * BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b_mask = b < num_blocks
        # one-hot of the expert owning block b; no owner: an idle block past the last one
        own = (b[:, None] >= blocks_first[None, :]) & (b[:, None] < blocks_end[None, :]) & is_expert[None, :]
        owned = tl.sum(own.to(tl.int32), axis=1) > 0
        owner = tl.sum(tl.where(own, offs_e[None, :], 0), axis=1)
        row0 = tl.sum(tl.where(own, starts[None, :] + (b[:, None] - blocks_first[None, :]) * BLOCK_M, 0), axis=1)
        row_end = tl.sum(tl.where(own, ends[None, :], 0), axis=1)
        tl.store(block_expert_ptr + b, tl.where(owned, owner, -1), mask=b_mask)
        tl.store(block_start_ptr + b, row0, mask=b_mask)
        tl.store(block_end_ptr + b, row_end, mask=b_mask)


@triton.jit
def _block_slots(pid, block_start_ptr, block_end_ptr, sorted_slots_ptr, BLOCK_M: tl.constexpr):
    """The sorted slots of plan block ``pid`` (one expert's) and the mask of its real rows."""
    start = tl.load(block_start_ptr + pid)
    end = tl.load(block_end_ptr + pid)
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    return tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0).to(tl.int64), row_mask


@triton.jit
def _grouped_shrink_kernel(
    src_ptr, stride_src,  # src [T, K]: rows gathered by token
    mat_ptr, stride_me, stride_mi, stride_mk,  # M[e, i, c]: [E, R, K]
    out_ptr,  # [S, R] fp32, slot-major (zero where not written)
    h_ptr, grad_gate_ptr, scaling,  # FUSE_GATE_GRAD: dg[slot] = s * <out[slot], h[slot]>
    sorted_slots_ptr, block_expert_ptr, block_start_ptr, block_end_ptr,
    K, R, num_slots,
    FUSE_GATE_GRAD: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid)
    if expert < 0:  # idle block past the last expert's rows
        return
    slots, row_mask = _block_slots(pid, block_start_ptr, block_end_ptr, sorted_slots_ptr, BLOCK_M)
    tokens = slots // num_slots
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    mat_base = mat_ptr + expert.to(tl.int64) * stride_me
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(src_ptr + tokens[:, None] * stride_src + offs_k[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(mat_base + offs_k[:, None] * stride_mk + offs_r[None, :] * stride_mi,
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc += dot(a, b, DOT_FP32)
    out_offs = slots[:, None] * R + offs_r[None, :]
    out_mask = row_mask[:, None] & r_mask[None, :]
    tl.store(out_ptr + out_offs, acc, mask=out_mask)
    if FUSE_GATE_GRAD:
        h = tl.load(h_ptr + out_offs, mask=out_mask, other=0.0)
        tl.store(grad_gate_ptr + slots, scaling * tl.sum(acc * h, axis=1), mask=row_mask)


@triton.jit
def _grouped_expand_kernel(
    dst_ptr, stride_dst,  # dst [T, N], updated in place; one slot per token (k = 1)
    vec_ptr,  # [S, R] fp32 rank vectors, S = T
    gate_ptr,  # [S] fp32
    mat_ptr, stride_me, stride_mn, stride_mi,  # M[e, n, i]: [E, N, R]
    sorted_slots_ptr, block_expert_ptr, block_start_ptr, block_end_ptr,
    N, R, scaling,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, RANK_CHUNKS: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid)
    if expert < 0:
        return
    slots, row_mask = _block_slots(pid, block_start_ptr, block_end_ptr, sorted_slots_ptr, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    gate = tl.load(gate_ptr + slots, mask=row_mask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in tl.static_range(RANK_CHUNKS):  # rank in chunks: registers stay bounded whatever r is
        offs_r = c * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        vec = tl.load(vec_ptr + slots[:, None] * R + offs_r[None, :],
                      mask=row_mask[:, None] & r_mask[None, :], other=0.0) * gate[:, None]
        mat = tl.load(mat_ptr + expert.to(tl.int64) * stride_me + offs_r[:, None] * stride_mi
                      + offs_n[None, :] * stride_mn, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if not DOT_FP32:  # the 16-bit output's type: tensor cores, as autocast would
            vec = vec.to(dst_ptr.dtype.element_ty)
        acc += dot(vec, mat, DOT_FP32)
    dst = dst_ptr + slots[:, None] * stride_dst + offs_n[None, :]  # slot == token when k = 1
    dst_mask = row_mask[:, None] & n_mask[None, :]
    base = tl.load(dst, mask=dst_mask, other=0.0)
    tl.store(dst, (base.to(tl.float32) + scaling * acc).to(base.dtype), mask=dst_mask)


@triton.jit
def _grouped_wgrad_kernel(
    src_ptr, stride_src,  # src [T, N]: dy for dB, x for dA
    vec_ptr,  # [S, R] fp32: h for dB, u for dA
    gate_ptr,  # [S] fp32
    sorted_slots_ptr, expert_start_ptr, expert_count_ptr,
    out_ptr, stride_oe, stride_on, stride_oi,  # out[e, n, i]
    N, R, num_slots, scaling,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    expert = tl.program_id(0)
    pid_n = tl.program_id(1)
    start = tl.load(expert_start_ptr + expert)
    count = tl.load(expert_count_ptr + expert)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(0, count, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < count
        slots = tl.load(sorted_slots_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
        tokens = slots // num_slots
        src = tl.load(src_ptr + tokens[None, :] * stride_src + offs_n[:, None],
                      mask=n_mask[:, None] & m_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_M]: rows transposed
        gate = tl.load(gate_ptr + slots, mask=m_mask, other=0.0)
        vec = tl.load(vec_ptr + slots[:, None] * R + offs_r[None, :],
                      mask=m_mask[:, None] & r_mask[None, :], other=0.0) * gate[:, None]
        acc += dot(src, vec, DOT_FP32)
    out = (out_ptr + expert.to(tl.int64) * stride_oe + offs_n[:, None] * stride_on
           + offs_r[None, :] * stride_oi)
    tl.store(out, (scaling * acc).to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & r_mask[None, :])


# ============================================================================================
# launchers
# ============================================================================================
class GroupPlan:
    """Slots grouped by expert in blocks of ``block_m`` rows that never straddle two experts,
    all in one int64 tensor (the forward's state), so the backward reuses it.

    Layout: sorted slots [S] | expert start [E] | expert count [E] | block expert, start, end
    [3, max_blocks]. Static shapes (functions of S, E): no host sync, CUDA-graph safe. Ids outside
    [0, E) sort after every expert, so a bad id is never used as an address."""

    def __init__(self, state: torch.Tensor, S: int, E: int, block_m: int):
        self.state, self.block_m = state, block_m
        self.num_blocks = configs.plan_blocks(S, E, block_m)
        self.sorted_slots, self.expert_start, self.expert_count, blocks = torch.split(
            state, [S, E, E, 3 * self.num_blocks])
        self.block_expert, self.block_start, self.block_end = blocks.view(3, self.num_blocks)

    @classmethod
    def build(cls, expert_indices: torch.Tensor, num_experts: int, block_m: int = configs.GROUP_BLOCK_M):
        flat = expert_indices.reshape(-1)
        S, E = flat.numel(), num_experts
        plan = cls(flat.new_empty(configs.plan_state_size(S, E, block_m)), S, E, block_m)
        e_pad = triton.next_power_of_2(E + 1)  # bucket E: no expert
        tiles = configs.plan_config(e_pad)
        sub = tiles["SUB"]
        num_chunks = max(1, min(configs.PLAN_MAX_CHUNKS, triton.cdiv(S, sub)))
        chunk_len = triton.cdiv(triton.cdiv(max(S, 1), num_chunks), sub) * sub
        num_chunks = max(1, triton.cdiv(S, chunk_len))
        hist = flat.new_empty(num_chunks, e_pad)
        launch(_plan_histogram_kernel, (num_chunks,), flat, hist, S, E, chunk_len, E_PAD=e_pad, SUB=sub,
               reads={"expert_indices": flat}, writes={"histogram": hist}, **_CHECKED)
        launch(_plan_scatter_kernel, (num_chunks,),
               flat, hist, plan.sorted_slots, plan.expert_start, plan.expert_count,
               plan.block_expert, plan.block_start, plan.block_end,
               S, E, chunk_len, num_chunks, plan.num_blocks,
               BLOCK_M=block_m, E_PAD=e_pad, **tiles,
               reads={"expert_indices": flat, "histogram": hist}, writes={"plan": plan.state})
        return plan


def _strides(t, *dims):
    """t's strides in the order a kernel indexes it, e.g. B [E, d_out, r] read as B^T[e, i, n]:
    ``_strides(lora_b, 0, 2, 1)``."""
    return tuple(t.stride(d) for d in dims)


def _shrink_dense(src, mat, strides, R, indices, gates, scaling, *, h=None, check_ids=False):
    """(vec [T, k, R] fp32, z [T, E * R] src dtype[, gate gradient [T, k]]) in one launch."""
    T, K = src.shape
    k = indices.shape[1]
    E = mat.shape[0]
    vec = torch.empty(T, k, R, dtype=torch.float32, device=src.device)
    z = torch.empty(T, E * R, dtype=src.dtype, device=src.device)
    grad_gates = torch.empty(T, k, dtype=torch.float32, device=src.device) if h is not None else vec
    dot_fp32 = dot_in_fp32(src.dtype)
    cfg = configs.shrink_config(src.device, T, E, R, dot_fp32)
    grid = (triton.cdiv(T, cfg.block_t), triton.cdiv(E, cfg.experts))
    # x once per expert group (one group when E * r fits a tile); the adapters once
    reads = {"src": (src, grid[1]), "mat": mat, "expert_indices": indices, "expert_weights": gates}
    writes = {"vec": vec, "z": z}
    if h is not None:
        reads["h"], writes["grad_gates"] = h, grad_gates
    launch(_shrink_dense_kernel, grid, src, src.stride(0), mat, *strides, indices, gates, vec,
           z, z.stride(0), h if h is not None else vec, grad_gates, T, K, E, R, k, scaling,
           FUSE_GATE_GRAD=h is not None, CHECK_IDS=check_ids, DOT_FP32=dot_fp32,
           BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, RANK_P=cfg.rank_p, EXPERTS=cfg.experts,
           num_warps=cfg.num_warps, reads=reads, writes=writes, **_CHECKED)
    return (vec, z, grad_gates) if h is not None else (vec, z)


def _tma_ok(*tensors) -> bool:
    """Tensor descriptors need 16-byte aligned bases and row strides (and a unit inner stride)."""
    return all(t.stride(-1) == 1 and (t.data_ptr() % 16 == 0) and (t.stride(0) * t.element_size()) % 16 == 0
               for t in tensors)


def _gemm(a, w, z, ext, ext_strides, rank, bias, out_dtype, *, w_kn: bool):
    """out = [a | z] @ [W^T ; X] (+ bias) in one launch (see _fused_gemm_kernel)."""
    M, K = a.shape
    N = w.shape[1] if w_kn else w.shape[0]
    KX = z.shape[1]
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    cfg = configs.gemm_config(a.device, a.dtype, M, N, K, KX)
    use_tma = cfg.tma and _tma_ok(a, w, z, out)
    operands = [a, w, z, out]
    if use_tma:
        blocks = ([cfg.block_m, cfg.block_k], [cfg.block_k, cfg.block_n] if w_kn else [cfg.block_n, cfg.block_k],
                  [cfg.block_m, cfg.block_kx], [cfg.block_m, cfg.block_n])
        operands = [TensorDescriptor.from_tensor(t, b) for t, b in zip(operands, blocks)]
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    programs = min(tiles, configs.persistent_programs(a.device, cfg))
    dot_fp32 = dot_in_fp32(a.dtype)
    launch(_fused_gemm_kernel, (programs,),
           operands[0], a.stride(0), operands[1], w.stride(0), operands[2], z.stride(0),
           ext, *ext_strides, bias if bias is not None else out, operands[3], out.stride(0),
           M, N, K, KX, rank,
           HAS_BIAS=bias is not None, W_KN=w_kn, USE_TMA=use_tma, DOT_FP32=dot_fp32,
           BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_KX=cfg.block_kx,
           GROUP_M=cfg.group_m, NUM_PROGRAMS=programs, num_warps=cfg.num_warps,
           num_stages=cfg.num_stages,
           reads={"a": a, "w": w, "z": z, "ext": ext, **({"bias": bias} if bias is not None else {})},
           writes={"out": out})
    return out


def _b_all_t(lora_b, dtype):
    """B_all^T [E * r, d_out] (row e * r + i = B_e[:, i]) in the GEMM's dtype, for cuBLAS."""
    E, d_out, r = lora_b.shape
    return lora_b.transpose(1, 2).reshape(E * r, d_out).to(dtype)


def _linear_with_rank_space(x, weight, bias, z, lora_b, route):
    """y = x W^T + b + z B_all^T: one fused launch, or cuBLAS twice (y read back once)."""
    if route.gemm == "fused":
        return _gemm(x, weight, z, lora_b, _strides(lora_b, 0, 2, 1), lora_b.shape[2], bias, x.dtype, w_kn=False)
    y = F.linear(x, weight, bias)
    return y.addmm_(z, _b_all_t(lora_b, x.dtype))


def _grad_x_with_rank_space(grad_out, weight, z_u, lora_a, route):
    """dx = dy W + z_u A_all: one fused launch, or cuBLAS twice."""
    E, r, d_in = lora_a.shape
    if route.gemm == "fused":
        return _gemm(grad_out, weight, z_u, lora_a, _strides(lora_a, 0, 1, 2), r, None, grad_out.dtype, w_kn=True)
    return torch.mm(grad_out, weight).addmm_(z_u, lora_a.reshape(E * r, d_in).to(grad_out.dtype))


def _decode(x, weight, bias, lora_a, lora_b, indices, gates, scaling):
    """y, h, z for T <= DECODE_MAX_T in two launches."""
    T, K = x.shape
    N = weight.shape[0]
    E, R, _ = lora_a.shape
    ER = E * R
    k = indices.shape[1]
    cfg = configs.decode_config(x.device, T, N, K, ER)
    part = torch.empty(cfg.splits, T, N + ER, dtype=torch.float32, device=x.device)
    tiles = triton.cdiv(N, cfg.block_n) + triton.cdiv(ER, cfg.block_n)
    a_rows = lora_a.reshape(ER, K)
    launch(_decode_partial_kernel, (tiles, cfg.splits), x, x.stride(0), weight, weight.stride(0), a_rows,
           part, indices, T, N, K, ER, E, indices.numel(), cfg.k_per_split,
           DOT_FP32=dot_in_fp32(x.dtype),
           BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
           BLOCK_IDS=triton.next_power_of_2(max(indices.numel(), 16)), num_warps=cfg.num_warps,
           reads={"x": x, "weight": weight, "lora_a": lora_a, "expert_indices": indices},
           writes={"partials": part}, **_CHECKED)
    y = torch.empty(T, N, dtype=x.dtype, device=x.device)
    h = torch.empty(T, k, R, dtype=torch.float32, device=x.device)
    z = torch.empty(T, ER, dtype=x.dtype, device=x.device)
    launch(_decode_epilogue_kernel, (triton.cdiv(N, cfg.block_n2),), part, bias if bias is not None else y,
           y, y.stride(0), h, z, z.stride(0), indices, gates, lora_b, *_strides(lora_b, 0, 1, 2),
           T, N, ER, R, E, k, cfg.splits, scaling,
           HAS_BIAS=bias is not None, DOT_FP32=dot_in_fp32(x.dtype),
           BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n2, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
           reads={"partials": part, "lora_b": lora_b, "expert_indices": indices, "expert_weights": gates,
                  **({"bias": bias} if bias is not None else {})},
           writes={"y": y, "h": h, "z": z})
    return y, h, z


def _grouped_shrink(src, mat, strides, plan, out, k, *, h=None, grad_gates=None, scaling=1.0):
    K = src.shape[1]
    R = out.shape[-1]
    dot_fp32 = dot_in_fp32(src.dtype)
    block_k, warps = configs.grouped_shrink_config(dot_fp32, configs.rank_block(R))
    fuse = h is not None
    launch(_grouped_shrink_kernel, (plan.num_blocks,), src, src.stride(0), mat, *strides, out,
           h if fuse else out, grad_gates if fuse else out, scaling,
           plan.sorted_slots, plan.block_expert, plan.block_start, plan.block_end, K, R, k,
           FUSE_GATE_GRAD=fuse, DOT_FP32=dot_fp32, BLOCK_M=plan.block_m,
           BLOCK_R=configs.rank_block(R), BLOCK_K=block_k, num_warps=warps,
           reads={"src": (src, k), "mat": mat, "plan": plan.state, **({"h": h} if fuse else {})},
           writes={"vec": out, **({"grad_gates": grad_gates} if fuse else {})})


def _grouped_wgrad(src, vec, gates, plan, out, strides, k, scaling):
    N = src.shape[1]
    R = vec.shape[-1]
    E = out.shape[0]
    dot_fp32 = dot_in_fp32(src.dtype)
    step, warps = configs.grouped_wgrad_config(dot_fp32, configs.rank_block(R))
    launch(_grouped_wgrad_kernel, (E, triton.cdiv(N, configs.BLOCK_N)), src, src.stride(0), vec, gates,
           plan.sorted_slots, plan.expert_start, plan.expert_count, out, *strides, N, R, k, scaling,
           DOT_FP32=dot_fp32, BLOCK_M=step, BLOCK_N=configs.BLOCK_N, BLOCK_R=configs.rank_block(R),
           num_warps=warps, reads={"src": (src, k), "vec": vec, "plan": plan.state}, writes={"out": out})


def _grouped_expand(dst, vec, gates, plan, mat, strides, scaling):
    N = dst.shape[1]
    R = vec.shape[-1]
    chunk, chunks, warps = configs.expand_config(R)
    launch(_grouped_expand_kernel, (plan.num_blocks, triton.cdiv(N, configs.BLOCK_N)), dst, dst.stride(0),
           vec, gates, mat, *strides, plan.sorted_slots, plan.block_expert, plan.block_start, plan.block_end,
           N, R, scaling, DOT_FP32=dot_in_fp32(dst.dtype), BLOCK_M=plan.block_m,
           BLOCK_N=configs.BLOCK_N, BLOCK_R=chunk, RANK_CHUNKS=chunks, num_warps=warps,
           reads={"dst": dst, "vec": vec, "mat": mat, "plan": plan.state}, writes={"dst": dst})


def _rank_space(vec, indices, gates, num_experts, scaling, dtype):
    """z [T, E * r] from slot vectors [T, k, r] (the grouped route's GEMM extension)."""
    T, k, R = vec.shape
    ER = num_experts * R
    z = torch.empty(T, ER, dtype=dtype, device=vec.device)
    block_t, block_c = 32, 64
    launch(_rank_space_kernel, (triton.cdiv(T, block_t), triton.cdiv(ER, block_c)), vec, indices, gates,
           z, z.stride(0), T, ER, R, k, scaling, BLOCK_T=block_t, BLOCK_C=block_c,
           reads={"vec": vec, "expert_indices": indices, "expert_weights": gates}, writes={"z": z})
    return z


# ============================================================================================
# the backend contract (see torch_backend.py)
# ============================================================================================
def state_like(x, lora_a, expert_indices):
    """The forward's state: z [T, E * r] (dense and decode routes) or the routing plan."""
    T, k = expert_indices.shape
    E, r, _ = lora_a.shape
    route = configs.choose_route(x.device, x.dtype, T, x.shape[1], E, r, k)
    if route.kind == "grouped":
        return expert_indices.new_empty(configs.plan_state_size(T * k, E, configs.GROUP_BLOCK_M))
    return x.new_empty(T, E * r)


def forward(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling):
    T, d_in = x.shape
    E, r, _ = lora_a.shape
    k = expert_indices.shape[1]
    route = configs.choose_route(x.device, x.dtype, T, d_in, E, r, k)
    if route.kind == "decode":
        return _decode(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling)
    if route.kind == "dense":
        h, z = _shrink_dense(x, lora_a, _strides(lora_a, 0, 1, 2), r, expert_indices, expert_weights,
                             scaling, check_ids=True)
        return _linear_with_rank_space(x, weight, bias, z, lora_b, route), h, z
    plan = GroupPlan.build(expert_indices, E)
    h = torch.zeros(T, k, r, dtype=torch.float32, device=x.device)  # slots with no expert stay 0
    _grouped_shrink(x, lora_a, _strides(lora_a, 0, 1, 2), plan, h, k)
    if k == 1:  # one writer per row: the grouped expand updates cuBLAS's y in place
        y = F.linear(x, weight, bias)
        _grouped_expand(y, h, expert_weights, plan, lora_b, _strides(lora_b, 0, 1, 2), scaling)
    else:
        z = _rank_space(h, expert_indices, expert_weights, E, scaling, x.dtype)
        y = _linear_with_rank_space(x, weight, bias, z, lora_b, route)
    return y, h, plan.state


def backward(grad_out, x, weight, lora_a, lora_b, expert_indices, expert_weights, h, state, scaling,
             compute_grad_x, compute_grad_adapters):
    T, d_in = x.shape
    E, r, _ = lora_a.shape
    k = expert_indices.shape[1]
    route = configs.choose_route(x.device, x.dtype, T, d_in, E, r, k)
    grad_a = grad_b = None
    if route.kind != "grouped":  # dense and decode: z is the state
        z = state
        u, z_u, grad_gates = _shrink_dense(grad_out, lora_b, _strides(lora_b, 0, 2, 1), r,
                                           expert_indices, expert_weights, scaling, h=h)
        if compute_grad_adapters:  # one pass over dy and one over x, on cuBLAS
            grad_b = torch.mm(z.t(), grad_out).view(E, r, -1).transpose(1, 2).to(lora_b.dtype).contiguous()
            grad_a = torch.mm(z_u.t(), x).view(E, r, d_in).to(lora_a.dtype)
        grad_x = _grad_x_with_rank_space(grad_out, weight, z_u, lora_a, route) if compute_grad_x else None
    else:
        plan = GroupPlan(state, T * k, E, configs.GROUP_BLOCK_M)
        u = torch.zeros(T, k, r, dtype=torch.float32, device=x.device)
        grad_gates = torch.zeros(T, k, dtype=torch.float32, device=x.device)
        _grouped_shrink(grad_out, lora_b, _strides(lora_b, 0, 2, 1), plan, u, k, h=h, grad_gates=grad_gates,
                        scaling=scaling)
        if compute_grad_adapters:
            grad_b = torch.empty_like(lora_b)
            grad_a = torch.empty_like(lora_a)
            _grouped_wgrad(grad_out, h, expert_weights, plan, grad_b, _strides(grad_b, 0, 1, 2), k, scaling)
            _grouped_wgrad(x, u, expert_weights, plan, grad_a, _strides(grad_a, 0, 2, 1), k, scaling)
        grad_x = None
        if compute_grad_x:
            if k == 1:
                grad_x = torch.mm(grad_out, weight)
                _grouped_expand(grad_x, u, expert_weights, plan, lora_a, _strides(lora_a, 0, 2, 1), scaling)
            else:
                z_u = _rank_space(u, expert_indices, expert_weights, E, scaling, x.dtype)
                grad_x = _grad_x_with_rank_space(grad_out, weight, z_u, lora_a, route)
    if not compute_grad_adapters:  # frozen experts (e.g. HoE router training): no passes for them
        grad_a, grad_b = lora_a.new_empty(0), lora_b.new_empty(0)
    if grad_x is None:
        grad_x = x.new_empty(0)
    return grad_x, grad_a, grad_b, grad_gates

