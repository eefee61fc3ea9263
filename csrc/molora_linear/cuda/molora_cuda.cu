// CUDA kernels of the core op (native ops moelora::molora_linear_native_fwd / _bwd; contract in
// ../molora_linear.h).
//
//   forward, T <= decode_max_t (64):  one cooperative launch (decode_kernel): the routed
//       shrink h = A_e x_t and the base GEMV W x_t, a grid-wide barrier, then the epilogue
//       y = W x + b + s sum_j g B_e h (BGMV-style: one pass over W, one write of y).
//   forward, larger T:  y = at::linear (cuBLAS), then grouped (SGMV-style) kernels over slots
//       sorted by expert: shrink_kernel (h), expand_kernel (y += B_e (s g h)).
//   backward:  u = shrink(B^T, dy); dg = s <u, h>; dA = outer(s g u, x); dB = outer(s g h, dy);
//       dx = at::mm(dy, W) + expand(A^T, s g u).
//
// Every size is a runtime value (any d_in, d_out, r >= 1, E, k); index arithmetic is int64.
// Accumulation is fp32 (fp64 when the op's accumulate dtype is float64: then every operand is
// converted to float64 first and one all-double instantiation runs). No host synchronisation:
// routing offsets are computed on the device and grids are sized by upper bounds.
//
// Learned from punica's BGMV/SGMV and vLLM's LoRA kernels (grouping slots by adapter, one
// launch for decode); written from scratch. Tensor cores are not used yet: the LoRA terms are a
// few percent of the base GEMM's FLOPs, which stays in cuBLAS.
#include <ATen/ATen.h>
// c10/cuda only (not ATen/cuda/CUDAContext.h): that header pulls in cuBLAS / cuSPARSE headers,
// which a minimal CUDA toolkit (nvcc + cudart, as on our CI machine) does not have.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <tuple>

#include "../molora_linear.h"

namespace moelora {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T v) {
  return static_cast<Acc>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double to_acc<double, double>(double v) {
  return v;
}

// ---------------------------------------------------------------------------------------------
// grouped shrink: out[slot, i] = sum_c M_e(i, c) X[t, c] for the routed slots, grouped by expert
// M_e(i, c) = M[e * sE + i * si + c * sc]   (A: si = d_in, sc = 1; B^T: si = 1, sc = r)
// Block: a tile of SH_TM slots of one expert x SH_RT ranks; lane -> rank, warp -> slots.
// ---------------------------------------------------------------------------------------------
constexpr int SH_TM = 32;  // slots per tile
constexpr int SH_RT = 32;  // ranks per tile (grid.y covers r)
constexpr int SH_KC = 32;  // reduction chunk

template <typename TX, typename TM, typename Acc>
__global__ void __launch_bounds__(kThreads)
shrink_kernel(const TX* __restrict__ X,                // [T, n]
              const TM* __restrict__ M,                // see above
              int64_t sE, int64_t si, int64_t sc,
              const int64_t* __restrict__ order,        // [T * k] slots grouped by expert
              const int64_t* __restrict__ offsets,      // [E + 1] into order
              const int64_t* __restrict__ tile_offsets, // [E + 1] cumulative SH_TM-tiles
              Acc* __restrict__ out,                    // [T * k, r]
              int64_t E, int64_t r, int64_t n, int64_t k) {
  __shared__ Acc xs[SH_TM][SH_KC + 1];
  __shared__ Acc ms[SH_RT][SH_KC + 1];
  __shared__ int64_t tok[SH_TM];
  __shared__ int64_t slot_of[SH_TM];

  const int64_t tile = blockIdx.x;
  if (tile >= tile_offsets[E]) return;  // the grid is an upper bound; uniform per block
  // Expert of this tile: the last e with tile_offsets[e] <= tile (experts without tiles share
  // their offset with the next one and are skipped by taking the last).
  int64_t lo = 0, hi = E - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (tile_offsets[mid] <= tile) lo = mid; else hi = mid - 1;
  }
  const int64_t e = lo;
  const int64_t first = offsets[e] + (tile - tile_offsets[e]) * SH_TM;
  const int64_t remaining = offsets[e + 1] - first;
  const int cnt = static_cast<int>(remaining < SH_TM ? remaining : SH_TM);

  const int tid = threadIdx.x;
  if (tid < SH_TM) {
    const int64_t s = tid < cnt ? order[first + tid] : -1;
    slot_of[tid] = s;
    tok[tid] = s >= 0 ? s / k : 0;
  }
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * SH_RT;
  const TM* Me = M + e * sE;
  const int lane = tid & 31, warp = tid >> 5;
  constexpr int PER = SH_TM / kWarps;  // slots per thread
  Acc acc[PER];
#pragma unroll
  for (int q = 0; q < PER; ++q) acc[q] = Acc(0);
  __syncthreads();

  for (int64_t c0 = 0; c0 < n; c0 += SH_KC) {
    for (int l = tid; l < SH_TM * SH_KC; l += kThreads) {
      const int row = l / SH_KC, col = l % SH_KC;
      const int64_t c = c0 + col;
      xs[row][col] = (row < cnt && c < n) ? to_acc<Acc>(X[tok[row] * n + c]) : Acc(0);
    }
    for (int l = tid; l < SH_RT * SH_KC; l += kThreads) {
      // Walk memory order for coalescing: columns fastest for A, ranks fastest for B^T.
      int q, col;
      if (sc == 1) { q = l / SH_KC; col = l % SH_KC; } else { col = l / SH_RT; q = l % SH_RT; }
      const int64_t i = i0 + q, c = c0 + col;
      ms[q][col] = (i < r && c < n) ? to_acc<Acc>(Me[i * si + c * sc]) : Acc(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < SH_KC; ++kk) {
      const Acc mv = ms[lane][kk];
#pragma unroll
      for (int q = 0; q < PER; ++q) acc[q] += xs[warp + kWarps * q][kk] * mv;
    }
    __syncthreads();
  }
  const int64_t i = i0 + lane;
  if (i < r) {
#pragma unroll
    for (int q = 0; q < PER; ++q) {
      const int row = warp + kWarps * q;
      if (row < cnt) out[slot_of[row] * r + i] = acc[q];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// expand: Y[t, c] += sum_j sum_i Z[t, j, i] M_e(c, i), every slot of a token summed before the
// one read-modify-write of Y (deterministic, no atomics, one rounding in 16-bit types).
// M_e(c, i) = M[e * sE + c * sc + i * si]   (B: sc = r, si = 1; A^T: sc = 1, si = d_in)
// Block: EX_TOKENS tokens x ct columns. STAGED: the block first copies every expert's rows of its
// column tile into shared memory (E * r * ct values; 1/16 of the block's multiply-adds at
// E=8, k=2), so tokens routed to different experts do not each re-read B from L2.
// ---------------------------------------------------------------------------------------------
constexpr int EX_TOKENS = 64;
constexpr size_t kSmemBudget = 48 * 1024;  // default dynamic shared memory limit

template <typename TY, typename TM, typename Acc, bool STAGED>
__global__ void __launch_bounds__(kThreads)
expand_kernel(TY* __restrict__ Y,                 // [T, n], updated in place
              const TM* __restrict__ M, int64_t sE, int64_t sc, int64_t si,
              const Acc* __restrict__ Z,          // [T, k, r], scaled (s g h)
              const int64_t* __restrict__ idx,    // [T, k]
              int64_t T, int64_t E, int64_t r, int64_t n, int64_t k, int ct) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* ms = reinterpret_cast<Acc*>(smem_raw);  // [E * r][ct + 1] when STAGED
  const int ctp = ct + 1;                       // padded: conflict-free in both walk orders
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * EX_TOKENS;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * ct;
  const int tid = threadIdx.x;

  if constexpr (STAGED) {
    const int64_t total = E * r * ct;
    for (int64_t l = tid; l < total; l += kThreads) {
      int64_t e, i, col;
      if (sc == 1) {  // columns contiguous in memory (A^T)
        col = l % ct; i = (l / ct) % r; e = l / (static_cast<int64_t>(ct) * r);
      } else {        // ranks contiguous (B)
        i = l % r; col = (l / r) % ct; e = l / (static_cast<int64_t>(ct) * r);
      }
      const int64_t c = c0 + col;
      ms[(e * r + i) * ctp + col] = c < n ? to_acc<Acc>(M[e * sE + c * sc + i * si]) : Acc(0);
    }
    __syncthreads();
  }

  const int col = tid % ct;  // ct divides kThreads and is >= 32: a warp shares its token
  const int token_lanes = kThreads / ct;
  const int64_t c = c0 + col;
  const int64_t t_end = t0 + EX_TOKENS < T ? t0 + EX_TOKENS : T;
  if (c >= n) return;  // no barrier below
  for (int64_t t = t0 + tid / ct; t < t_end; t += token_lanes) {
    Acc acc = Acc(0);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = idx[t * k + j];
      if (e < 0 || e >= E) continue;
      const Acc* z = Z + (t * k + j) * r;
      if constexpr (STAGED) {
        const Acc* mcol = ms + e * r * ctp + col;
        for (int64_t i = 0; i < r; ++i) acc += z[i] * mcol[i * ctp];
      } else {
        const TM* mp = M + e * sE + c * sc;
        for (int64_t i = 0; i < r; ++i) acc += z[i] * to_acc<Acc>(mp[i * si]);
      }
    }
    TY* yp = Y + t * n + c;
    *yp = static_cast<TY>(to_acc<Acc>(*yp) + acc);
  }
}

// ---------------------------------------------------------------------------------------------
// outer: G_e(i, c) = sum over slots of e of Z[slot, i] X[t, c], written as
// out[e * oE + i * oi + c * oc] (dA: oi = d_in, oc = 1; dB: oi = 1, oc = r). Every output
// element is written, zeros for experts without slots. Deterministic (slots in sorted order).
// Block: OU_RT ranks x OU_CT columns of one expert; threads: column = tid % 64, rank group.
// ---------------------------------------------------------------------------------------------
constexpr int OU_CT = 64;
constexpr int OU_RT = 32;
constexpr int OU_SC = 32;  // slots staged per step

template <typename TX, typename TO, typename Acc>
__global__ void __launch_bounds__(kThreads)
outer_kernel(const Acc* __restrict__ Z,            // [T * k, r], scaled
             const TX* __restrict__ X,             // [T, n]
             const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
             TO* __restrict__ out, int64_t oE, int64_t oi, int64_t oc,
             int64_t E, int64_t r, int64_t n, int64_t k) {
  __shared__ Acc zs[OU_SC][OU_RT + 1];
  __shared__ Acc xs[OU_SC][OU_CT];
  const int64_t e = blockIdx.x % E;
  const int64_t c0 = (blockIdx.x / E) * static_cast<int64_t>(OU_CT);
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * OU_RT;
  const int tid = threadIdx.x;
  constexpr int GROUPS = kThreads / OU_CT;  // 4
  constexpr int PER = OU_RT / GROUPS;       // 8 ranks per thread
  const int col = tid % OU_CT, grp = tid / OU_CT;
  Acc acc[PER];
#pragma unroll
  for (int q = 0; q < PER; ++q) acc[q] = Acc(0);

  const int64_t begin = offsets[e], end = offsets[e + 1];
  for (int64_t s0 = begin; s0 < end; s0 += OU_SC) {
    const int cnt = static_cast<int>(end - s0 < OU_SC ? end - s0 : OU_SC);
    for (int l = tid; l < OU_SC * OU_RT; l += kThreads) {
      const int s = l / OU_RT, q = l % OU_RT;
      const int64_t i = i0 + q;
      zs[s][q] = (s < cnt && i < r) ? Z[order[s0 + s] * r + i] : Acc(0);
    }
    for (int l = tid; l < OU_SC * OU_CT; l += kThreads) {
      const int s = l / OU_CT, cc = l % OU_CT;
      const int64_t c = c0 + cc;
      xs[s][cc] = (s < cnt && c < n) ? to_acc<Acc>(X[(order[s0 + s] / k) * n + c]) : Acc(0);
    }
    __syncthreads();
    for (int s = 0; s < cnt; ++s) {
      const Acc xv = xs[s][col];
#pragma unroll
      for (int q = 0; q < PER; ++q) acc[q] += zs[s][grp + GROUPS * q] * xv;
    }
    __syncthreads();
  }
  const int64_t c = c0 + col;
  if (c >= n) return;
#pragma unroll
  for (int q = 0; q < PER; ++q) {
    const int64_t i = i0 + grp + GROUPS * q;
    if (i < r) out[e * oE + i * oi + c * oc] = static_cast<TO>(acc[q]);
  }
}

// ---------------------------------------------------------------------------------------------
// decode: the whole forward for small T in one cooperative launch.
//   phase 1: (a) h[t, j, i] = <A_e[i], x_t>, one warp each; (b) ybase = W x, tiles of DC_ROWS
//            rows x DC_TT tokens, x staged in shared memory, W streamed once per token tile.
//   grid-wide barrier
//   phase 2: y[t, o] = ybase + b[o] + s sum_j g[t, j] <B_e[o, :], h[t, j, :]>
// Without cooperative launch support the phases run as two ordinary launches (phases = 1, 2).
// ---------------------------------------------------------------------------------------------
constexpr int DC_ROWS_PER_WARP = 2;
constexpr int DC_ROWS = DC_ROWS_PER_WARP * kWarps;  // 16 rows of W per tile
constexpr int DC_TT = 8;                            // tokens per tile
constexpr int DC_KC = 256;                          // d_in chunk staged in shared memory

template <typename TX, typename TM, typename Acc>
__global__ void __launch_bounds__(kThreads)
decode_kernel(const TX* __restrict__ x,          // [T, d_in]
              const TX* __restrict__ W,          // [d_out, d_in]
              const TX* __restrict__ bias,       // [d_out] or nullptr
              const TM* __restrict__ A,          // [E, r, d_in]
              const TM* __restrict__ B,          // [E, d_out, r]
              const int64_t* __restrict__ idx,   // [T, k]
              const Acc* __restrict__ g,         // [T, k]
              Acc s,
              TX* __restrict__ y,                // [T, d_out]
              Acc* __restrict__ h,               // [T, k, r], every slot written
              Acc* __restrict__ ybase,           // [T, d_out] workspace
              int64_t T, int64_t d_in, int64_t d_out, int64_t E, int64_t r, int64_t k,
              int phases) {
  __shared__ Acc xs[DC_TT][DC_KC];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  if (phases & 1) {
    // (a) shrink, one warp per (slot, rank): T * k * r dot products of length d_in, spread
    // over every warp of the grid (one warp per slot would leave a T = 1 decode step with
    // k warps doing all of it while the rest of the GPU waits at the barrier).
    const int64_t grid_warps = static_cast<int64_t>(gridDim.x) * kWarps;
    for (int64_t it = static_cast<int64_t>(blockIdx.x) * kWarps + warp; it < T * k * r;
         it += grid_warps) {
      const int64_t slot = it / r, i = it % r;
      const int64_t e = idx[slot];
      if (e < 0 || e >= E) {
        if (lane == 0) h[it] = Acc(0);
        continue;
      }
      const TX* xt = x + (slot / k) * d_in;
      const TM* arow = A + (e * r + i) * d_in;
      Acc p = Acc(0);
      for (int64_t c = lane; c < d_in; c += 32) p += to_acc<Acc>(arow[c]) * to_acc<Acc>(xt[c]);
      p = warp_sum(p);
      if (lane == 0) h[it] = p;  // h[slot, i]
    }
    // (b) base GEMV
    const int64_t row_tiles = ceil_div(d_out, DC_ROWS), tok_tiles = ceil_div(T, DC_TT);
    for (int64_t tile = blockIdx.x; tile < row_tiles * tok_tiles; tile += gridDim.x) {
      const int64_t o0 = (tile % row_tiles) * DC_ROWS;
      const int64_t t0 = (tile / row_tiles) * DC_TT;
      const int nt = static_cast<int>(T - t0 < DC_TT ? T - t0 : DC_TT);
      Acc acc[DC_ROWS_PER_WARP][DC_TT];
#pragma unroll
      for (int rr = 0; rr < DC_ROWS_PER_WARP; ++rr)
#pragma unroll
        for (int tt = 0; tt < DC_TT; ++tt) acc[rr][tt] = Acc(0);
      for (int64_t c0 = 0; c0 < d_in; c0 += DC_KC) {
        __syncthreads();  // the previous chunk is consumed
        for (int l = tid; l < DC_TT * DC_KC; l += kThreads) {
          const int tt = l / DC_KC, cc = l % DC_KC;
          const int64_t c = c0 + cc;
          xs[tt][cc] = (tt < nt && c < d_in) ? to_acc<Acc>(x[(t0 + tt) * d_in + c]) : Acc(0);
        }
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < DC_ROWS_PER_WARP; ++rr) {
          const int64_t o = o0 + warp * DC_ROWS_PER_WARP + rr;
          if (o >= d_out) continue;  // warp-uniform
          const TX* wrow = W + o * d_in;
          for (int cc = lane; cc < DC_KC; cc += 32) {
            const int64_t c = c0 + cc;
            const Acc wv = c < d_in ? to_acc<Acc>(wrow[c]) : Acc(0);
#pragma unroll
            for (int tt = 0; tt < DC_TT; ++tt) acc[rr][tt] += wv * xs[tt][cc];
          }
        }
      }
#pragma unroll
      for (int rr = 0; rr < DC_ROWS_PER_WARP; ++rr) {
        const int64_t o = o0 + warp * DC_ROWS_PER_WARP + rr;
#pragma unroll
        for (int tt = 0; tt < DC_TT; ++tt) {
          const Acc v = warp_sum(acc[rr][tt]);
          if (lane == 0 && o < d_out && tt < nt) ybase[(t0 + tt) * d_out + o] = v;
        }
      }
    }
  }

  if (phases == 3) cg::this_grid().sync();  // only under a cooperative launch

  if (phases & 2) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
    for (int64_t el = static_cast<int64_t>(blockIdx.x) * kThreads + tid; el < T * d_out;
         el += stride) {
      const int64_t t = el / d_out, o = el % d_out;
      Acc lora = Acc(0);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = idx[t * k + j];
        if (e < 0 || e >= E) continue;
        const Acc* hr = h + (t * k + j) * r;
        const TM* brow = B + (e * d_out + o) * r;
        Acc p = Acc(0);
        for (int64_t i = 0; i < r; ++i) p += to_acc<Acc>(brow[i]) * hr[i];
        lora += g[t * k + j] * p;
      }
      const Acc b = bias != nullptr ? to_acc<Acc>(bias[o]) : Acc(0);
      y[el] = static_cast<TX>(ybase[el] + b + s * lora);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------
template <typename F>
void dispatch_low(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "moelora.cuda: unsupported dtype ", st, " for ", what);
  }
}

// f(TX{}, TM{}, Acc{}): token-side type, adapter type, accumulate type. The float64 path runs
// with every operand converted to double by the caller.
template <typename F>
void dispatch_types(at::ScalarType xt, at::ScalarType mt, at::ScalarType acc, F&& f) {
  if (acc == at::kDouble) {
    TORCH_CHECK(xt == at::kDouble && mt == at::kDouble, "moelora.cuda: internal dtype error");
    f(double{}, double{}, double{});
    return;
  }
  dispatch_low(xt, "x", [&](auto tx) { dispatch_low(mt, "lora", [&](auto tm) { f(tx, tm, float{}); }); });
}

int decode_max_t() {
  static const int value = [] {
    const char* env = std::getenv("MOELORA_CUDA_DECODE_MAX_T");
    return env != nullptr && env[0] != '\0' ? std::atoi(env) : 64;
  }();
  return value;
}

struct Routing {
  Tensor order;         // [T * k] slot ids grouped by expert (unrouted last)
  Tensor offsets;       // [E + 1]
  Tensor tile_offsets;  // [E + 1] cumulative shrink tiles
};

// Counting sort of slots by expert on the device: a stable sort of the keys (unrouted -> E),
// counts by scatter_add (bincount would synchronise to size its output).
Routing make_routing(const Tensor& idx, int64_t E) {
  const Tensor flat = idx.reshape({-1});
  const Tensor keys = at::where((flat >= 0) & (flat < E), flat, E);
  Routing rt;
  rt.order = std::get<1>(at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const Tensor counts = at::zeros({E + 1}, flat.options()).scatter_add_(0, keys, at::ones_like(keys));
  const Tensor per_expert = counts.slice(0, 0, E);
  rt.offsets = at::zeros({E + 1}, flat.options());
  rt.offsets.slice(0, 1).copy_(at::cumsum(per_expert, 0));
  rt.tile_offsets = at::zeros({E + 1}, flat.options());
  rt.tile_offsets.slice(0, 1).copy_(at::cumsum(at::floor_divide(per_expert + (SH_TM - 1), SH_TM), 0));
  return rt;
}

// out[slot, i] = M_e(i, :) . X[t, :] for routed slots. X [T, n] contiguous, out [T, k, r].
void launch_shrink(const Tensor& X, const Tensor& M, int64_t sE, int64_t si, int64_t sc,
                   const Routing& rt, Tensor& out, int64_t E, int64_t r, int64_t n, int64_t k) {
  const int64_t T = X.size(0);
  const int64_t max_tiles = ceil_div(T * k, SH_TM) + E;  // sum_e ceil(c_e / TM) <= N / TM + E
  TORCH_CHECK(max_tiles < (int64_t{1} << 31), "moelora.cuda: too many slots");
  const dim3 grid(static_cast<unsigned>(max_tiles), static_cast<unsigned>(ceil_div(r, SH_RT)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(X.scalar_type(), M.scalar_type(), out.scalar_type(), [&](auto tx, auto tm, auto ac) {
    using TX = decltype(tx); using TM = decltype(tm); using Acc = decltype(ac);
    shrink_kernel<TX, TM, Acc><<<grid, kThreads, 0, stream>>>(
        X.data_ptr<TX>(), M.data_ptr<TM>(), sE, si, sc, rt.order.data_ptr<int64_t>(),
        rt.offsets.data_ptr<int64_t>(), rt.tile_offsets.data_ptr<int64_t>(), out.data_ptr<Acc>(),
        E, r, n, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Y[t, :] += sum_j M_e(:, i) Z[t, j, i]. Y [T, n] contiguous (in place), Z [T, k, r].
void launch_expand(Tensor& Y, const Tensor& M, int64_t sE, int64_t sc, int64_t si,
                   const Tensor& Z, const Tensor& idx, int64_t E, int64_t r, int64_t k) {
  const int64_t T = Y.size(0), n = Y.size(1);
  if (T == 0 || n == 0) return;
  const size_t acc_size = Z.element_size();
  // Widest column tile whose staged expert rows fit in shared memory; else read M directly.
  int ct = 0;
  for (int cand : {128, 64, 32}) {
    if (static_cast<size_t>(E) * r * (cand + 1) * acc_size <= kSmemBudget) { ct = cand; break; }
  }
  const bool staged = ct != 0;
  if (!staged) ct = 64;
  const int64_t col_tiles = ceil_div(n, ct);
  TORCH_CHECK(col_tiles <= 65535, "moelora.cuda: d = ", n, " is too large for the expand grid");
  const dim3 grid(static_cast<unsigned>(ceil_div(T, EX_TOKENS)), static_cast<unsigned>(col_tiles));
  const size_t smem = staged ? static_cast<size_t>(E) * r * (ct + 1) * acc_size : 0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(Y.scalar_type(), M.scalar_type(), Z.scalar_type(), [&](auto ty, auto tm, auto ac) {
    using TY = decltype(ty); using TM = decltype(tm); using Acc = decltype(ac);
    if (staged) {
      expand_kernel<TY, TM, Acc, true><<<grid, kThreads, smem, stream>>>(
          Y.data_ptr<TY>(), M.data_ptr<TM>(), sE, sc, si, Z.data_ptr<Acc>(),
          idx.data_ptr<int64_t>(), T, E, r, n, k, ct);
    } else {
      expand_kernel<TY, TM, Acc, false><<<grid, kThreads, 0, stream>>>(
          Y.data_ptr<TY>(), M.data_ptr<TM>(), sE, sc, si, Z.data_ptr<Acc>(),
          idx.data_ptr<int64_t>(), T, E, r, n, k, ct);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// out(e, i, c) = sum over slots of e of Z[slot, i] X[t, c], at out[e*oE + i*oi + c*oc].
void launch_outer(const Tensor& Z, const Tensor& X, const Routing& rt, Tensor& out, int64_t oE,
                  int64_t oi, int64_t oc, int64_t E, int64_t r, int64_t n, int64_t k) {
  if (n == 0 || E == 0) return;
  const int64_t blocks = E * ceil_div(n, OU_CT);
  TORCH_CHECK(blocks < (int64_t{1} << 31), "moelora.cuda: outer grid too large");
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(ceil_div(r, OU_RT)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(X.scalar_type(), out.scalar_type(), Z.scalar_type(), [&](auto tx, auto to, auto ac) {
    using TX = decltype(tx); using TO = decltype(to); using Acc = decltype(ac);
    outer_kernel<TX, TO, Acc><<<grid, kThreads, 0, stream>>>(
        Z.data_ptr<Acc>(), X.data_ptr<TX>(), rt.order.data_ptr<int64_t>(),
        rt.offsets.data_ptr<int64_t>(), out.data_ptr<TO>(), oE, oi, oc, E, r, n, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_decode(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                   const Tensor& A, const Tensor& B, const Tensor& idx, const Tensor& g,
                   double scaling, Tensor& y, Tensor& h) {
  const int64_t T = x.size(0), d_in = x.size(1), d_out = weight.size(0);
  const int64_t E = A.size(0), r = A.size(1), k = idx.size(1);
  Tensor ybase = at::empty({T, d_out}, g.options());
  const int device = x.get_device();
  int coop = 0, sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t work = std::max<int64_t>(
      {ceil_div(d_out, DC_ROWS) * ceil_div(T, DC_TT), ceil_div(T * k * r, kWarps),
       ceil_div(T * d_out, kThreads), 1});
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(x.scalar_type(), A.scalar_type(), g.scalar_type(), [&](auto tx, auto tm, auto ac) {
    using TX = decltype(tx); using TM = decltype(tm); using Acc = decltype(ac);
    auto kernel = decode_kernel<TX, TM, Acc>;
    const TX* xp = x.data_ptr<TX>();
    const TX* wp = weight.data_ptr<TX>();
    const TX* bp = bias.has_value() ? bias->data_ptr<TX>() : nullptr;
    const TM* ap = A.data_ptr<TM>();
    const TM* bbp = B.data_ptr<TM>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const Acc* gp = g.data_ptr<Acc>();
    Acc s = static_cast<Acc>(scaling);
    TX* yp = y.data_ptr<TX>();
    Acc* hp = h.data_ptr<Acc>();
    Acc* ybp = ybase.data_ptr<Acc>();
    int64_t T_ = T, din_ = d_in, dout_ = d_out, E_ = E, r_ = r, k_ = k;
    // Resident blocks per SM, per instantiation and device (queried once: it costs ~us).
    // Atomic: several host threads may launch at once; they all store the same value.
    static std::atomic<int> per_sm_cache[64] = {};
    int per_sm = device < 64 ? per_sm_cache[device].load(std::memory_order_relaxed) : 0;
    if (per_sm == 0) {
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
      if (device < 64) per_sm_cache[device].store(per_sm, std::memory_order_relaxed);
    }
    if (coop && per_sm > 0) {
      // Every block must be resident for the grid barrier: at most per_sm * sms blocks.
      int phases = 3;
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>(work, int64_t{per_sm} * sms)));
      void* args[] = {&xp, &wp, &bp, &ap, &bbp, &ip, &gp, &s, &yp, &hp, &ybp,
                      &T_, &din_, &dout_, &E_, &r_, &k_, &phases};
      C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), grid,
                                                 dim3(kThreads), args, 0, stream));
    } else {
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>(work, int64_t{1} << 20)));
      kernel<<<grid, kThreads, 0, stream>>>(xp, wp, bp, ap, bbp, ip, gp, s, yp, hp, ybp, T, d_in,
                                            d_out, E, r, k, 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      kernel<<<grid, kThreads, 0, stream>>>(xp, wp, bp, ap, bbp, ip, gp, s, yp, hp, ybp, T, d_in,
                                            d_out, E, r, k, 2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void check_inputs(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                  const Tensor& lora_a, const Tensor& lora_b, const Tensor& idx,
                  const Tensor& gates) {
  for (const Tensor* t : {&x, &weight, &lora_a, &lora_b, &idx, &gates}) {
    TORCH_CHECK(t->is_cuda(), "moelora.cuda ops take CUDA tensors, got ", t->device());
    TORCH_CHECK(t->device() == x.device(), "moelora.cuda: all tensors must be on ", x.device());
  }
  // a host bias would be dereferenced on the device by the decode kernel
  TORCH_CHECK(!bias.has_value() || bias->device() == x.device(), "moelora.cuda: bias must be on ",
              x.device());
  check_contract(x, weight, bias, lora_a, lora_b, idx, gates);
}

Tensor as_double(const Tensor& t) { return t.to(at::kDouble).contiguous(); }

bool all_double(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t->scalar_type() != at::kDouble) return false;
  return true;
}

}  // namespace

std::tuple<Tensor, Tensor> cuda_forward(const Tensor& x_in, const Tensor& weight_in,
                                        const std::optional<Tensor>& bias_in,
                                        const Tensor& lora_a_in, const Tensor& lora_b_in,
                                        const Tensor& expert_indices,
                                        const Tensor& expert_weights, double scaling) {
  check_inputs(x_in, weight_in, bias_in, lora_a_in, lora_b_in, expert_indices, expert_weights);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::ScalarType acc = expert_weights.scalar_type();
  if (acc == at::kDouble && !all_double({&x_in, &lora_a_in})) {
    // fp64 accumulation with a lower-precision operand: run all-double, convert back.
    auto [y, h] = cuda_forward(
        as_double(x_in), as_double(weight_in),
        bias_in.has_value() ? std::optional<Tensor>(as_double(*bias_in)) : std::nullopt,
        as_double(lora_a_in), as_double(lora_b_in), expert_indices, expert_weights, scaling);
    return {y.to(x_in.scalar_type()), h};
  }
  const Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const std::optional<Tensor> bias =
      bias_in.has_value() ? std::optional<Tensor>(bias_in->contiguous()) : std::nullopt;
  const Tensor A = lora_a_in.contiguous(), B = lora_b_in.contiguous();
  const Tensor idx = expert_indices.contiguous(), g = expert_weights.contiguous();
  const int64_t T = x.size(0), d_in = x.size(1), d_out = weight.size(0);
  const int64_t E = A.size(0), r = A.size(1), k = idx.size(1);

  if (T == 0) return {at::linear(x, weight, bias), at::zeros({T, k, r}, g.options())};
  if (T <= decode_max_t()) {
    Tensor y = at::empty({T, d_out}, x.options());
    Tensor h = at::empty({T, k, r}, g.options());  // every slot written by the kernel
    launch_decode(x, weight, bias, A, B, idx, g, scaling, y, h);
    return {y, h};
  }
  Tensor y = at::linear(x, weight, bias);
  Tensor h = at::zeros({T, k, r}, g.options());
  const Routing rt = make_routing(idx, E);
  launch_shrink(x, A, /*sE=*/r * d_in, /*si=*/d_in, /*sc=*/1, rt, h, E, r, d_in, k);
  const Tensor z = h * (g * scaling).unsqueeze(-1);
  launch_expand(y, B, /*sE=*/d_out * r, /*sc=*/r, /*si=*/1, z, idx, E, r, k);
  return {y, h};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cuda_backward(
    const Tensor& grad_out_in, const Tensor& x_in, const Tensor& weight_in,
    const Tensor& lora_a_in, const Tensor& lora_b_in, const Tensor& expert_indices,
    const Tensor& expert_weights, const Tensor& h_in, double scaling, bool compute_grad_x,
    bool compute_grad_adapters) {
  check_inputs(x_in, weight_in, std::nullopt, lora_a_in, lora_b_in, expert_indices, expert_weights);
  // grad_out goes straight to launch_shrink (no ATen op to catch a host tensor when !compute_grad_x)
  TORCH_CHECK(grad_out_in.device() == x_in.device() && h_in.device() == x_in.device(),
              "moelora.cuda: grad_out and h must be on ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::ScalarType acc = expert_weights.scalar_type();
  if (acc == at::kDouble && !all_double({&x_in, &lora_a_in, &grad_out_in})) {
    auto [gx, ga, gb, gg] = cuda_backward(
        as_double(grad_out_in), as_double(x_in), as_double(weight_in), as_double(lora_a_in),
        as_double(lora_b_in), expert_indices, expert_weights, h_in, scaling, compute_grad_x,
        compute_grad_adapters);
    return {compute_grad_x ? gx.to(x_in.scalar_type()) : at::empty({0}, x_in.options()),
            ga.to(lora_a_in.scalar_type()).contiguous(), gb.to(lora_b_in.scalar_type()).contiguous(), gg};
  }
  const Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const Tensor dy = grad_out_in.to(x.scalar_type()).contiguous();
  const Tensor A = lora_a_in.contiguous(), B = lora_b_in.contiguous();
  const Tensor idx = expert_indices.contiguous(), g = expert_weights.contiguous();
  const Tensor h = h_in.to(acc).contiguous();
  const int64_t T = x.size(0), d_in = x.size(1), d_out = weight.size(0);
  const int64_t E = A.size(0), r = A.size(1), k = idx.size(1);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == T && dy.size(1) == d_out, "moelora: grad_out must be [T, d_out]");
  TORCH_CHECK(h.dim() == 3 && h.size(0) == T && h.size(1) == k && h.size(2) == r, "moelora: h must be [T, k, r]");

  Tensor grad_x = compute_grad_x ? at::mm(dy, weight) : at::empty({0}, x.options());
  const auto adapter_grad = [&](const Tensor& t) {
    return compute_grad_adapters ? at::zeros_like(t) : at::empty({0}, t.options());
  };
  if (T == 0) return {grad_x, adapter_grad(A), adapter_grad(B), at::zeros_like(g)};

  const Routing rt = make_routing(idx, E);
  Tensor u = at::zeros({T, k, r}, g.options());  // B_e^T dy_t
  launch_shrink(dy, B, /*sE=*/d_out * r, /*si=*/1, /*sc=*/r, rt, u, E, r, d_out, k);
  Tensor grad_g = (u * h).sum(-1).mul_(scaling);
  const Tensor coef = (g * scaling).unsqueeze(-1);
  const Tensor zh = h * coef;
  const Tensor zu = u * coef;
  Tensor grad_a = at::empty({0}, A.options()), grad_b = at::empty({0}, B.options());
  if (compute_grad_adapters) {
    grad_a = at::empty(A.sizes(), A.options());
    grad_b = at::empty(B.sizes(), B.options());
    launch_outer(zu, x, rt, grad_a, /*oE=*/r * d_in, /*oi=*/d_in, /*oc=*/1, E, r, d_in, k);
    launch_outer(zh, dy, rt, grad_b, /*oE=*/d_out * r, /*oi=*/1, /*oc=*/r, E, r, d_out, k);
  }
  if (compute_grad_x) launch_expand(grad_x, A, /*sE=*/r * d_in, /*sc=*/1, /*si=*/d_in, zu, idx, E, r, k);
  return {grad_x, grad_a, grad_b, grad_g};
}

TORCH_LIBRARY_IMPL(moelora, CUDA, m) {
  m.impl("molora_linear_native_fwd", &cuda_forward);
  m.impl("molora_linear_native_bwd", &cuda_backward);
}

}  // namespace moelora
