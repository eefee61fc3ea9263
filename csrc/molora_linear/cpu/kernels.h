// CPU kernels of the routed multi-LoRA op, free of torch headers.
//
// The three kernels below are the whole LoRA part of the op (docs/spec.md §1), forward and backward:
//
//   shrink  out[s, i]     = sum_c M_e[i, c] X_t[c]            h = A_e x_t,  u = B_e^T dy_t
//   expand  Y_t[c]       += sum_j sum_i Z[t,j,i] M_e[i, c]    y += B_e (s g h),  dx += A_e^T (s g u)
//   outer   G_e[i, c]     = sum_{s of e} Z[s, i] X_t[c]       dB_e^T, dA_e
//
// where s = t * k + j is a routing slot, e = expert_indices[s] and M is an adapter in
// [E, r, n] row-major layout (A as stored; B transposed once per call). Slots are grouped by
// expert (a stable counting sort) so that one expert's rows are reused from cache by a block
// of tokens; expand instead walks tokens in order and keeps every expert's rows of a column
// block in L1, so that each output row is written once (one rounding, no write conflicts).
//
// This header and kernels.cpp include no torch header on purpose: kernels.cpp is compiled once
// per instruction set (base x86-64, AVX2, AVX-512) in one translation unit, and any inline
// function shared with other translation units could be merged by the linker with its AVX-512
// copy and then run on a machine without AVX-512.
#pragma once

#include <cstdint>

namespace moelora {
namespace cpu {

// avx512bf16: the AVX-512 copy whose bf16 x bf16 kernels multiply on vdpbf16ps (AVX-512 BF16).
enum class Isa : int { base = 0, avx2 = 1, avx512 = 2, avx512bf16 = 3 };

// Expand reads its adapter in column panels of kPanel values: [ceil(n / kPanel), E, r, kPanel],
// zero-padded. In the plain [E, r, n] layout the E * r rows of one column block lie a
// power-of-two stride apart when n is (n = 1024: 4 KiB), all fall into the same L1 sets and
// evict each other. Measured (T=256, d_out=1024, E=8, r=16, k=2, fp32, 2 threads, AVX-512):
// the forward's expand went from 0.61 ms to 0.21 ms with panels (pack_panels in molora_cpu.cpp).
constexpr int64_t kPanel = 64;

// Storage type of the token-side operand (X of shrink/outer, Y of expand). The adapter side
// (M, Z, outputs of shrink/outer) is always the accumulate type: float, or double.
enum class DType : int { f32 = 0, bf16 = 1, f64 = 2 };

// A run of slots order[begin, end) that all route to expert e.
struct SlotRange {
  int64_t e, begin, end;
};

struct ShrinkArgs {
  DType acc;            // f32 or f64: type of out
  DType mt;             // storage of M: acc, or bf16 with acc f32 (read as stored)
  DType xt;             // storage of X (f32 or bf16 with acc f32; f64 with acc f64)
  const void* M;        // [E, r, n]
  const void* X;        // [T, n]
  void* out;            // [T * k, r]; rows of unrouted slots are left untouched
  const int64_t* order; // slot ids grouped by expert
  const SlotRange* items;
  int64_t r, n, k;
};

struct ExpandArgs {
  DType acc;
  DType yt;             // storage of Y
  const void* M;        // panels [ceil(n / kPanel), E, r, kPanel]
  const void* Z;        // [T * k, r], already scaled (s * g * h)
  const int64_t* idx;   // [T, k], -1 = no expert
  void* Y;              // [T, n], updated in place
  int64_t T, E, r, n, k;
  int64_t tokens_per_item, cols_per_item;  // item = (column block, token block); cols % kPanel == 0
  int64_t num_token_blocks;
};

// Expand of a few tokens reading B as stored: Y_t[c] += sum_j <M_{e(t,j)}[c, :], Z[t, j, :]>.
struct ExpandDirectArgs {
  DType acc;
  DType mt;             // storage of M: acc, or bf16 with acc f32
  DType yt;             // storage of Y
  const void* M;        // [E, n, r] (lora_b as stored)
  const void* Z;        // [T * k, r], scaled
  const int64_t* idx;   // [T, k], -1 = no expert
  void* Y;              // [T, n], updated in place
  int64_t r, n, k;
  int64_t cols_per_item;  // item = (token, block of columns), columns fastest
};

struct OuterArgs {
  DType acc;
  DType xt;
  const void* Z;          // [T * k, r], scaled
  const void* X;          // [T, n]
  void* G;                // [E, r, n], fully written (zeros for experts without slots)
  const int64_t* order;
  const int64_t* tokens;  // order[i] / k: X's row of each slot (no division per slot and tile)
  const int64_t* offsets; // [E + 1]
  int64_t E, r, n, k;
  int64_t cols_per_item;  // item = (column block, expert), expert fastest
};

// bf16 pair layouts of the AVX-512 BF16 kernels. vdpbf16ps multiplies pairs of bf16 (the two
// halves of a 32-bit lane) and adds both products to an fp32 lane, so the reduction index must
// sit in adjacent pairs: the rank for expand (the panel's two ranks of a column side by side,
// the slot's z as pairs of ranks), the slot for outer (two slots' rows interleaved in
// registers, their z values paired once per call).
//
// expand_pairs: Y_t[c] += sum_j sum_p <Mp_{e(t,j)}[p, c], Zp[t, j, p]> over rank pairs p.
struct ExpandPairsArgs {
  const uint16_t* M;    // panels [ceil(n / kPanel), E, rp, kPanel, 2], bf16, zero-padded
  const uint32_t* Z;    // [T * k, rp]: (z[2p], z[2p + 1]) as bf16 in the low / high half
  const int64_t* idx;   // [T, k], -1 = no expert
  uint16_t* Y;          // [T, n] bf16, updated in place
  int64_t T, E, rp, n, k;   // rp = ceil(r / 2)
  int64_t tokens_per_item, cols_per_item;  // as ExpandArgs
  int64_t num_token_blocks;
};

// outer_pairs: G_e[i, c] = sum over slots s of e of z[s, i] X_t(s)[c], slots taken in pairs.
struct OuterPairsArgs {
  const uint32_t* Z;         // [pairs, r]: pair q of expert e (row pair_offsets[e] + q) holds
                             // z of slots order[offsets[e] + 2q] (low) and + 2q + 1 (high, 0
                             // past an odd count)
  const uint16_t* X;         // [T, n] bf16
  float* G;                  // [E, r, n], fully written
  const int64_t* tokens;     // order[i] / k, as OuterArgs
  const int64_t* offsets;       // [E + 1]
  const int64_t* pair_offsets;  // [E + 1]
  int64_t E, r, n, k;
  int64_t cols_per_item;
};

struct KernelTable {
  const char* name;
  int vector_bytes;
  void (*shrink)(const ShrinkArgs&, int64_t item_begin, int64_t item_end);
  void (*expand)(const ExpandArgs&, int64_t item_begin, int64_t item_end);
  void (*expand_direct)(const ExpandDirectArgs&, int64_t item_begin, int64_t item_end);
  void (*outer)(const OuterArgs&, int64_t item_begin, int64_t item_end);
  // Only in the avx512bf16 table (nullptr elsewhere): bf16 x bf16 on the pair layouts above.
  void (*expand_pairs)(const ExpandPairsArgs&, int64_t item_begin, int64_t item_end);
  void (*outer_pairs)(const OuterPairsArgs&, int64_t item_begin, int64_t item_end);
};

// Best instruction set this CPU (and build) supports.
Isa detect_isa();
// Whether the CPU multiplies bf16 natively (AVX-512 BF16 or AMX): oneDNN's bf16 GEMMs then beat
// any fp32-widening kernel.
bool has_bf16_matmul();
// Kernels for `isa`; falls back to a lower set when `isa` was not compiled in.
const KernelTable& kernel_table(Isa isa);
// Instruction sets compiled into this build, best first, as names ("avx512bf16", ..., "base").
const char* compiled_isas();

}  // namespace cpu
}  // namespace moelora
