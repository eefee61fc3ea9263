"""Triton kernels of the core op (docs/spec.md §1): routed multi-LoRA linear, forward and backward.

The base GEMMs (W x forward, W^T dy backward) stay in cuBLAS (docs/perf.md: keep the big GEMM in
cuBLAS unless a Triton GEMM matches it on the device); the LoRA work is three kernels, each
used twice with different operand strides:

    shrink  out[slot, :]  = M_e @ src[token]              h = A_e x      u = B_e^T dy (+ dg)
    expand  dst[t, :]    += s * sum_j g[t,j] M_e v[t,j]   y += B_e h     dx += A_e^T u
    wgrad   out_e        += s * sum_{slots of e} g src[token] v^T   dB_e          dA_e

`shrink` and `wgrad` walk the slots grouped by expert (a sort of the ids, no host sync), so
every tile multiplies one expert's matrix on the tensor cores. `expand` must write each output
row from exactly one program (deterministic, no atomics). With k = 1 (multi-tenant, plain LoRA)
every row has one slot, so the grouped walk serves; with k > 1 a row's slots belong to several
experts, so the expand is token-major: a tile loops over the experts, skipping those no slot in
the tile uses (cost grows with the distinct experts per tile; see benchmarks/NOTES.md).

For T <= PLAN_FREE_MAX_T (decode) the kernels are token-major throughout and no plan is built:
at decode every launch counts (the plan is two), and one token tile then covers every token,
so each expert's matrix is still read once per output tile. A forward is then cuBLAS and two
launches (the grouped path adds the plan's two).

Rank vectors (h, u) live in fp32 (docs/perf.md: keep the rank intermediate in fp32). Every offset
that multiplies a token index is int64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moelora.ops.molora_linear.configs import (
    BLOCK_N, GROUP_BLOCK_M, PLAN_FREE_MAX_T, PLAN_MAX_CHUNKS, SHRINK_CONFIGS, WGRAD_CONFIGS, config,
    expand_config, plan_config, rank_block, token_block,
)
from moelora.ops.molora_linear.torch_backend import no_state
from moelora.ops.triton_common import dot, dot_in_fp32, launch

state_like = no_state

# --------------------------------------------------------------------------------------------
# routing plan: slots grouped by expert, in blocks of GROUP_BLOCK_M rows that never straddle two
# experts. A stable counting sort in two launches (per-chunk histograms, then each chunk scatters
# its slots behind the earlier chunks'), where torch's sort / scan / search took ~30 small ones.
# All shapes are static (functions of T, k, E): no host sync, CUDA-graph safe. Ids outside
# [0, E) (-1 = no expert) sort after every expert, so a bad id is never used as an address.
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


class GroupPlan:
    def __init__(self, expert_indices: torch.Tensor, num_experts: int, block_m: int = GROUP_BLOCK_M):
        flat = expert_indices.reshape(-1)
        S, E = flat.numel(), num_experts
        e_pad = triton.next_power_of_2(E + 1)  # bucket E: no expert
        tiles = plan_config(e_pad)
        sub = tiles["SUB"]
        num_chunks = max(1, min(PLAN_MAX_CHUNKS, triton.cdiv(S, sub)))
        chunk_len = triton.cdiv(triton.cdiv(max(S, 1), num_chunks), sub) * sub
        num_chunks = max(1, triton.cdiv(S, chunk_len))
        # sum_e ceil(c_e / m) <= floor(S / m) + E: a static bound on the number of blocks.
        max_blocks = S // block_m + E
        new = dict(dtype=torch.int64, device=flat.device)
        hist = torch.empty(num_chunks, e_pad, **new)
        self.sorted_slots = torch.empty(S, **new)  # [S] slot ids (t * k + j) grouped by expert
        self.expert_start = torch.empty(E, **new)  # [E]
        self.expert_count = torch.empty(E, **new)  # [E]
        self.block_expert = torch.empty(max_blocks, **new)  # [max_blocks], -1: idle
        self.block_start = torch.empty(max_blocks, **new)
        self.block_end = torch.empty(max_blocks, **new)
        launch(_plan_histogram_kernel, (num_chunks,), flat, hist, S, E, chunk_len, E_PAD=e_pad, SUB=sub)
        launch(_plan_scatter_kernel, (num_chunks,),
            flat, hist, self.sorted_slots, self.expert_start, self.expert_count,
            self.block_expert, self.block_start, self.block_end,
            S, E, chunk_len, num_chunks, max_blocks,
            BLOCK_M=block_m, E_PAD=e_pad, **tiles,
        )
        self.num_blocks = max_blocks
        self.block_m = block_m


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _shrink_kernel(
    src_ptr, stride_src_t,  # src [T, K]: rows are read by token
    mat_ptr, stride_mat_e, stride_mat_i, stride_mat_c,  # mat[e, i, c]: [E, R, K]
    out_ptr,  # [S, R] fp32, slot-major (zero where not written)
    h_ptr, grad_gate_ptr, scaling,  # with FUSE_GATE_GRAD: dg[slot] = s * <out[slot], h[slot]>
    sorted_slots_ptr, block_expert_ptr, block_start_ptr, block_end_ptr,
    K, R, num_slots_per_token,
    FUSE_GATE_GRAD: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid)
    if expert < 0:  # idle block past the last expert's rows
        return
    start = tl.load(block_start_ptr + pid)
    end = tl.load(block_end_ptr + pid)
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    tokens = slots // num_slots_per_token
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    mat_base = mat_ptr + expert.to(tl.int64) * stride_mat_e
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, K, BLOCK_K):
        offs_c = c0 + tl.arange(0, BLOCK_K)
        c_mask = offs_c < K
        a = tl.load(
            src_ptr + tokens[:, None] * stride_src_t + offs_c[None, :],
            mask=row_mask[:, None] & c_mask[None, :], other=0.0,
        )
        b = tl.load(
            mat_base + offs_c[:, None] * stride_mat_c + offs_r[None, :] * stride_mat_i,
            mask=c_mask[:, None] & r_mask[None, :], other=0.0,
        )
        acc += dot(a, b, DOT_FP32)
    out_offs = slots[:, None] * R + offs_r[None, :]
    out_mask = row_mask[:, None] & r_mask[None, :]
    tl.store(out_ptr + out_offs, acc, mask=out_mask)
    if FUSE_GATE_GRAD:
        h = tl.load(h_ptr + out_offs, mask=out_mask, other=0.0)
        tl.store(grad_gate_ptr + slots, scaling * tl.sum(acc * h, axis=1), mask=row_mask)


@triton.jit
def _token_shrink_kernel(
    src_ptr, stride_src_t,  # src [T, K]
    mat_ptr, stride_mat_e, stride_mat_i, stride_mat_c,  # mat[e, i, c]: [E, R, K]
    out_ptr,  # [T, k, R] fp32, every slot written (uninitialised memory is fine)
    h_ptr, grad_gate_ptr, scaling,  # with FUSE_GATE_GRAD: dg[slot] = s * <out[slot], h[slot]>
    index_ptr,  # [T, k] int64 ids
    T, K, R, num_slots_per_token,
    FUSE_GATE_GRAD: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # program (token tile, expert): M_e src for the tile's rows routed to e, stored into each of
    # their slots that names e. Every slot is written by the one program of its expert; slots
    # naming none (-1, or an id out of range) get zeros from the tile's expert-0 program, which
    # spares the caller a memset.
    expert = tl.program_id(0)  # experts on axis 0: no 65535 limit on E
    pid_t = tl.program_id(1)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_mask = offs_t < T
    if expert == 0:
        for j in range(0, num_slots_per_token):
            slot = offs_t * num_slots_per_token + j
            ids = tl.load(index_ptr + slot, mask=t_mask, other=0)
            none = t_mask & ((ids < 0) | (ids >= tl.num_programs(0)))
            for r0 in range(0, R, 16):  # narrow stores: a [BLOCK_T, BLOCK_R] zero tile would spill
                offs_z = r0 + tl.arange(0, 16)
                tl.store(out_ptr + slot[:, None] * R + offs_z[None, :],
                         tl.zeros((BLOCK_T, 16), dtype=tl.float32), mask=none[:, None] & (offs_z < R)[None, :])
            if FUSE_GATE_GRAD:
                tl.store(grad_gate_ptr + slot, tl.zeros((BLOCK_T,), dtype=tl.float32), mask=none)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    hits = tl.zeros((BLOCK_T,), dtype=tl.int32)
    for j in range(0, num_slots_per_token):
        ids = tl.load(index_ptr + offs_t * num_slots_per_token + j, mask=t_mask, other=-1)
        hits += (ids == expert).to(tl.int32)
    if tl.max(hits, axis=0) == 0:  # no row of this tile uses this expert
        return
    row_mask = hits > 0
    mat_base = mat_ptr + tl.cast(expert, tl.int64) * stride_mat_e
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, K, BLOCK_K):
        offs_c = c0 + tl.arange(0, BLOCK_K)
        c_mask = offs_c < K
        a = tl.load(
            src_ptr + offs_t[:, None] * stride_src_t + offs_c[None, :],
            mask=row_mask[:, None] & c_mask[None, :], other=0.0,
        )
        b = tl.load(
            mat_base + offs_c[:, None] * stride_mat_c + offs_r[None, :] * stride_mat_i,
            mask=c_mask[:, None] & r_mask[None, :], other=0.0,
        )
        acc += dot(a, b, DOT_FP32)
    for j in range(0, num_slots_per_token):
        slot = offs_t * num_slots_per_token + j
        ids = tl.load(index_ptr + slot, mask=t_mask, other=-1)
        sel = t_mask & (ids == expert)
        out_offs = slot[:, None] * R + offs_r[None, :]
        out_mask = sel[:, None] & r_mask[None, :]
        tl.store(out_ptr + out_offs, acc, mask=out_mask)
        if FUSE_GATE_GRAD:
            h = tl.load(h_ptr + out_offs, mask=out_mask, other=0.0)
            tl.store(grad_gate_ptr + slot, scaling * tl.sum(acc * h, axis=1), mask=sel)


@triton.jit
def _expand_kernel(
    dst_ptr, stride_dst_t,  # dst [T, N], updated in place
    vec_ptr,  # [T, k, R] fp32 rank vectors (h or u)
    gate_ptr, index_ptr,  # [T, k] fp32 gates, [T, k] int64 ids
    mat_ptr, stride_mat_e, stride_mat_n, stride_mat_i,  # mat[e, n, i]: [E, N, R]
    T, N, R, num_slots_per_token, num_experts, scaling,
    DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, RANK_CHUNKS: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_mask = offs_t < T
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for expert in range(0, num_experts):
        hits = tl.zeros((BLOCK_T,), dtype=tl.int32)
        for j in range(0, num_slots_per_token):
            ids = tl.load(index_ptr + offs_t * num_slots_per_token + j, mask=t_mask, other=-1)
            hits += (t_mask & (ids == expert)).to(tl.int32)
        if tl.max(hits, axis=0) > 0:  # skip experts no row of this tile uses
            # rank in chunks of BLOCK_R: registers stay bounded whatever r is
            for c in tl.static_range(RANK_CHUNKS):
                offs_r = c * BLOCK_R + tl.arange(0, BLOCK_R)
                r_mask = offs_r < R
                # sum of g * v over the slots of each row routed to this expert (ids may repeat)
                mixed = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
                for j in range(0, num_slots_per_token):
                    slot = offs_t * num_slots_per_token + j
                    ids = tl.load(index_ptr + slot, mask=t_mask, other=-1)
                    sel = t_mask & (ids == expert)
                    gate = tl.load(gate_ptr + slot, mask=sel, other=0.0)
                    vec = tl.load(
                        vec_ptr + slot[:, None] * R + offs_r[None, :],
                        mask=sel[:, None] & r_mask[None, :], other=0.0,
                    )
                    mixed += vec * gate[:, None]
                mat = tl.load(
                    mat_ptr + tl.cast(expert, tl.int64) * stride_mat_e + offs_r[:, None] * stride_mat_i
                    + offs_n[None, :] * stride_mat_n,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0,
                )
                acc += dot(mixed, mat, DOT_FP32)
    dst = dst_ptr + offs_t[:, None] * stride_dst_t + offs_n[None, :]
    dst_mask = t_mask[:, None] & n_mask[None, :]
    base = tl.load(dst, mask=dst_mask, other=0.0)
    tl.store(dst, (base.to(tl.float32) + scaling * acc).to(base.dtype), mask=dst_mask)


@triton.jit
def _grouped_expand_kernel(
    dst_ptr, stride_dst_t,  # dst [T, N], updated in place; one slot per token (k = 1)
    vec_ptr,  # [S, R] fp32 rank vectors, S = T
    gate_ptr,  # [S] fp32
    mat_ptr, stride_mat_e, stride_mat_n, stride_mat_i,  # mat[e, n, i]: [E, N, R]
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
    start = tl.load(block_start_ptr + pid)
    end = tl.load(block_end_ptr + pid)
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    gate = tl.load(gate_ptr + slots, mask=row_mask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in tl.static_range(RANK_CHUNKS):  # rank in chunks: registers stay bounded whatever r is
        offs_r = c * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        vec = tl.load(vec_ptr + slots[:, None] * R + offs_r[None, :],
                      mask=row_mask[:, None] & r_mask[None, :], other=0.0) * gate[:, None]
        mat = tl.load(
            mat_ptr + expert.to(tl.int64) * stride_mat_e + offs_r[:, None] * stride_mat_i
            + offs_n[None, :] * stride_mat_n,
            mask=r_mask[:, None] & n_mask[None, :], other=0.0,
        )
        acc += dot(vec, mat, DOT_FP32)
    dst = dst_ptr + slots[:, None] * stride_dst_t + offs_n[None, :]  # slot == token when k = 1
    dst_mask = row_mask[:, None] & n_mask[None, :]
    base = tl.load(dst, mask=dst_mask, other=0.0)
    tl.store(dst, (base.to(tl.float32) + scaling * acc).to(base.dtype), mask=dst_mask)


@triton.jit
def _wgrad_kernel(
    src_ptr, stride_src_t,  # src [T, N]: dy for dB, x for dA
    vec_ptr,  # [S, R] fp32: h for dB, u for dA
    gate_ptr,  # [S] fp32
    sorted_slots_ptr, expert_start_ptr, expert_count_ptr,
    out_ptr, stride_out_e, stride_out_n, stride_out_i,  # out[e, n, i]
    N, R, num_slots_per_token, scaling,
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
        tokens = slots // num_slots_per_token
        src = tl.load(
            src_ptr + tokens[None, :] * stride_src_t + offs_n[:, None],
            mask=n_mask[:, None] & m_mask[None, :], other=0.0,
        )  # [BLOCK_N, BLOCK_M]: the transposed rows
        gate = tl.load(gate_ptr + slots, mask=m_mask, other=0.0)
        vec = tl.load(
            vec_ptr + slots[:, None] * R + offs_r[None, :],
            mask=m_mask[:, None] & r_mask[None, :], other=0.0,
        ) * gate[:, None]
        acc += dot(src, vec, DOT_FP32)
    out = (out_ptr + expert.to(tl.int64) * stride_out_e + offs_n[:, None] * stride_out_n
           + offs_r[None, :] * stride_out_i)
    tl.store(out, (scaling * acc).to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & r_mask[None, :])


@triton.jit
def _token_wgrad_kernel(
    src_ptr, stride_src_t,  # src [T, N]: dy for dB, x for dA
    vec_ptr,  # [T, k, R] fp32: h for dB, u for dA
    gate_ptr, index_ptr,  # [T, k] fp32 gates, [T, k] int64 ids
    out_ptr, stride_out_e, stride_out_n, stride_out_i,  # out[e, n, i]
    T, N, R, num_slots_per_token, scaling,
    DOT_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # program (expert, column tile) walks every token tile: the slots of e are found by
    # comparing ids rather than from a sorted plan (small T only).
    expert = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_mask = offs_t < T
        mixed = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)  # sum_j g v over slots naming e
        hits = tl.zeros((BLOCK_T,), dtype=tl.int32)
        for j in range(0, num_slots_per_token):
            slot = offs_t * num_slots_per_token + j
            ids = tl.load(index_ptr + slot, mask=t_mask, other=-1)
            sel = t_mask & (ids == expert)
            gate = tl.load(gate_ptr + slot, mask=sel, other=0.0)
            vec = tl.load(vec_ptr + slot[:, None] * R + offs_r[None, :],
                          mask=sel[:, None] & r_mask[None, :], other=0.0)
            mixed += vec * gate[:, None]
            hits += sel.to(tl.int32)
        if tl.max(hits, axis=0) > 0:
            src = tl.load(
                src_ptr + offs_t[None, :] * stride_src_t + offs_n[:, None],
                mask=n_mask[:, None] & (hits > 0)[None, :], other=0.0,
            )  # [BLOCK_N, BLOCK_T]: the transposed rows
            acc += dot(src, mixed, DOT_FP32)
    out = (out_ptr + tl.cast(expert, tl.int64) * stride_out_e + offs_n[:, None] * stride_out_n
           + offs_r[None, :] * stride_out_i)
    tl.store(out, (scaling * acc).to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & r_mask[None, :])


# --------------------------------------------------------------------------------------------
# launchers. `mat` operands are given as (tensor, stride_e, stride_row, stride_col) views.
# --------------------------------------------------------------------------------------------
def _shrink(src, mat, strides, out, indices, plan, *, h=None, grad_gate=None, scaling=1.0):
    """out[slot] = M_e src[token] (+ the gate gradient); ``plan`` None: token-major."""
    T, K = src.shape
    k = indices.shape[1]
    R = out.shape[-1]
    fuse = h is not None
    dot_fp32 = dot_in_fp32(src.dtype, mat.dtype)
    block_k, warps = config(SHRINK_CONFIGS, dot_fp32, rank_block(R))
    common = dict(FUSE_GATE_GRAD=fuse, DOT_FP32=dot_fp32, BLOCK_R=rank_block(R), BLOCK_K=block_k,
                  num_warps=warps)
    gate_args = (h if fuse else out, grad_gate if fuse else out, scaling)
    if plan is None:
        block_t = token_block(T)
        launch(_token_shrink_kernel, (mat.shape[0], triton.cdiv(T, block_t)),
            src, src.stride(0), mat, *strides, out, *gate_args, indices,
            T, K, R, k, BLOCK_T=block_t, **common,
        )
        return
    launch(_shrink_kernel, (plan.num_blocks,),
        src, src.stride(0), mat, *strides, out, *gate_args,
        plan.sorted_slots, plan.block_expert, plan.block_start, plan.block_end,
        K, R, k, BLOCK_M=plan.block_m, **common,
    )


def _expand(dst, vec, gates, indices, mat, strides, scaling, plan):
    """dst[t] += s sum_j g M_e vec[t, j]; grouped only for k = 1 with a plan."""
    T, N = dst.shape
    k = indices.shape[1]
    R = vec.shape[-1]
    E = mat.shape[0]
    block_n = BLOCK_N
    grouped = k == 1 and plan is not None
    chunk, chunks, warps = expand_config(R, grouped)
    common = dict(DOT_FP32=dot_in_fp32(mat.dtype, dst.dtype),  # fp32 dst: no 16-bit rounding of h / u
                  BLOCK_N=block_n, BLOCK_R=chunk, RANK_CHUNKS=chunks, num_warps=warps)
    if grouped:
        launch(_grouped_expand_kernel, (plan.num_blocks, triton.cdiv(N, block_n)),
            dst, dst.stride(0), vec, gates,
            mat, *strides,
            plan.sorted_slots, plan.block_expert, plan.block_start, plan.block_end,
            N, R, scaling, BLOCK_M=plan.block_m, **common,
        )
        return
    block_t = token_block(T)
    launch(_expand_kernel, (triton.cdiv(T, block_t), triton.cdiv(N, block_n)),
        dst, dst.stride(0), vec, gates, indices,
        mat, *strides,
        T, N, R, k, E, scaling, BLOCK_T=block_t, **common,
    )


def _wgrad(src, vec, gates, indices, plan, out, strides, scaling):
    """out_e = s sum over the slots of e of g src[token] vec^T; ``plan`` None: token-major."""
    T, N = src.shape
    k = indices.shape[1]
    R = vec.shape[-1]
    E = out.shape[0]
    block_n = BLOCK_N
    dot_fp32 = dot_in_fp32(src.dtype)
    step, warps = config(WGRAD_CONFIGS, dot_fp32, rank_block(R))
    common = dict(DOT_FP32=dot_fp32, BLOCK_N=block_n, BLOCK_R=rank_block(R), num_warps=warps)
    grid = (E, triton.cdiv(N, block_n))
    if plan is None:
        launch(_token_wgrad_kernel, grid,
            src, src.stride(0), vec, gates, indices, out, *strides,
            T, N, R, k, scaling, BLOCK_T=min(step, token_block(T)), **common,
        )
        return
    launch(_wgrad_kernel, grid,
        src, src.stride(0), vec, gates,
        plan.sorted_slots, plan.expert_start, plan.expert_count,
        out, *strides,
        N, R, k, scaling, BLOCK_M=step, **common,
    )


def _rank_buffer(plan, shape, device):
    """fp32 output of a shrink ([T, k, r], or [T, k] for the gate gradient): the grouped shrink
    leaves slots without an expert unwritten, so it needs zeros; the token-major one writes all."""
    make = torch.empty if plan is None else torch.zeros
    return make(shape, dtype=torch.float32, device=device)


def _routing_plan(expert_indices, num_experts):
    """The grouped kernels' plan, or None where the token-major kernels serve (small T)."""
    if expert_indices.shape[0] <= PLAN_FREE_MAX_T:
        return None
    return GroupPlan(expert_indices, num_experts)


def _a_as_shrink(lora_a):  # A[e, i, c]: h = A_e x
    return lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)


def _b_as_shrink(lora_b):  # B[e, n, i] read as [e, i, n]: u = B_e^T dy
    return lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)


def _b_as_expand(lora_b):  # B[e, n, i]: y += B_e h
    return lora_b.stride(0), lora_b.stride(1), lora_b.stride(2)


def _a_as_expand(lora_a):  # A[e, i, c] read as [e, c, i]: dx += A_e^T u
    return lora_a.stride(0), lora_a.stride(2), lora_a.stride(1)


def forward(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights, scaling):
    """The backend contract: see torch_backend.py."""
    T = x.shape[0]
    E, r, _ = lora_a.shape
    k = expert_indices.shape[1]
    y = F.linear(x, weight, bias)
    plan = _routing_plan(expert_indices, E)
    h = _rank_buffer(plan, (T, k, r), x.device)
    _shrink(x, lora_a, _a_as_shrink(lora_a), h, expert_indices, plan)
    _expand(y, h, expert_weights, expert_indices, lora_b, _b_as_expand(lora_b), scaling, plan)
    return y, h, no_state(x, lora_a, expert_indices)


def backward(grad_out, x, weight, lora_a, lora_b, expert_indices, expert_weights, h, state, scaling,
              compute_grad_x, compute_grad_adapters):
    T = x.shape[0]
    E, r, _ = lora_a.shape
    k = expert_indices.shape[1]
    plan = _routing_plan(expert_indices, E)
    u = _rank_buffer(plan, (T, k, r), x.device)
    grad_gates = _rank_buffer(plan, (T, k), x.device)
    _shrink(grad_out, lora_b, _b_as_shrink(lora_b), u, expert_indices, plan, h=h,
            grad_gate=grad_gates, scaling=scaling)
    if compute_grad_adapters:
        grad_b = torch.empty_like(lora_b)
        grad_a = torch.empty_like(lora_a)
        _wgrad(grad_out, h, expert_weights, expert_indices, plan, grad_b, _b_as_expand(grad_b), scaling)
        _wgrad(x, u, expert_weights, expert_indices, plan, grad_a, _a_as_expand(grad_a), scaling)
    else:  # frozen experts (e.g. HoE router training): no pass over x and dy for them
        grad_a, grad_b = lora_a.new_empty(0), lora_b.new_empty(0)
    if compute_grad_x:
        grad_x = torch.mm(grad_out, weight)
        _expand(grad_x, u, expert_weights, expert_indices, lora_a, _a_as_expand(lora_a), scaling,
                plan)
    else:
        grad_x = x.new_empty(0)
    return grad_x, grad_a, grad_b, grad_gates
