// One instruction set's copy of the CPU kernels. Included by kernels.cpp once per set, with
//   MOELORA_NS           namespace of this copy (avx512 / avx2 / base)
//   MOELORA_VB           vector width in bytes (64 / 32 / 16)
//   MOELORA_SHRINK_TB    tokens per shrink register block
//   MOELORA_SHRINK_RB    ranks per shrink register block
//   MOELORA_EXPAND_NV    vectors of columns per expand register block
//   MOELORA_OUTER_RI     ranks per outer register block
//   MOELORA_OUTER_NV     vectors of columns per outer register block
//   MOELORA_DPBF16       defined: AVX-512 BF16 copy (bf16 x bf16 products on vdpbf16ps)
// The register blocks are sized to the register file: AVX-512 has 32 vector registers, AVX2 and
// SSE 16, and each block keeps TB*RB (or RI*NV) accumulators plus its loads live.
//
// Vectors are GCC vector extensions of a fixed byte width, so the same source lowers to zmm,
// ymm or xmm code. No guard on purpose: this file is meant to be included several times.

namespace moelora {
namespace cpu {
namespace MOELORA_NS {

constexpr int VB = MOELORA_VB;
constexpr int SHRINK_TB = MOELORA_SHRINK_TB;
constexpr int SHRINK_RB = MOELORA_SHRINK_RB;
constexpr int EXPAND_NV = MOELORA_EXPAND_NV;
constexpr int OUTER_RI = MOELORA_OUTER_RI;
constexpr int OUTER_NV = MOELORA_OUTER_NV;

typedef float vf __attribute__((vector_size(VB)));
typedef double vd __attribute__((vector_size(VB)));
typedef uint32_t vu32 __attribute__((vector_size(VB)));
typedef uint16_t vu16 __attribute__((vector_size(VB / 2)));  // as many lanes as vf

template <typename Acc> struct Vec;
template <> struct Vec<float> { typedef vf type; static constexpr int L = VB / 4; };
template <> struct Vec<double> { typedef vd type; static constexpr int L = VB / 8; };

// bfloat16 is carried as its bit pattern (uint16_t).
static inline float bf16_to_f32(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN -> 0x7fc0 (as c10)
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

template <typename Acc, typename T> static inline Acc to_acc(T v) { return Acc(v); }
template <> inline float to_acc<float, uint16_t>(uint16_t v) { return bf16_to_f32(v); }
template <typename T, typename Acc> static inline T from_acc(Acc v) { return T(v); }
template <> inline uint16_t from_acc<uint16_t, float>(float v) { return f32_to_bf16(v); }

template <typename VT, typename T> static inline VT loadu(const T* p) {
  VT v;
  __builtin_memcpy(&v, p, sizeof(VT));
  return v;
}

template <typename VT, typename T> static inline void storeu(T* p, VT v) {
  __builtin_memcpy(p, &v, sizeof(VT));
}

// Every lane = s. Written as `{} + s` GCC kept the scalar add of 0 (it is not an identity for
// -0.0) before the broadcast: two uops where one vbroadcastss from memory does (seen in the
// compiled outer and expand loops, which broadcast once per rank).
template <typename V, unsigned long... I>
static inline V splat_lane0(V v, std::integer_sequence<unsigned long, I...>) {
  return __builtin_shufflevector(v, v, (I * 0)...);
}

template <typename Acc> static inline typename Vec<Acc>::type bcast(Acc s) {
  typedef typename Vec<Acc>::type vt;
  vt v = {s};
  return splat_lane0(v, std::make_integer_sequence<unsigned long, Vec<Acc>::L>{});
}

// Load Vec<Acc>::L consecutive elements stored as T, converted to Acc.
template <typename Acc, typename T> struct Lanes;
template <typename Acc> struct Lanes<Acc, Acc> {
  static inline typename Vec<Acc>::type load(const Acc* p) { return loadu<typename Vec<Acc>::type>(p); }
  static inline void store(Acc* p, typename Vec<Acc>::type v) { storeu(p, v); }
};
template <> struct Lanes<float, uint16_t> {
  static inline vf load(const uint16_t* p) {
    // GCC lowers the generic widening of 16 lanes to two half-width zero-extensions, an insert
    // and a store / reload of the vector through the stack (seen in the compiled AVX-512
    // kernels); one vpmovzxwd is what it should be.
#if MOELORA_VB == 64
    vu32 w = (vu32)_mm512_cvtepu16_epi32((__m256i)loadu<vu16>(p)) << 16;
#elif MOELORA_VB == 32
    vu32 w = (vu32)_mm256_cvtepu16_epi32((__m128i)loadu<vu16>(p)) << 16;
#else
    vu32 w = __builtin_convertvector(loadu<vu16>(p), vu32) << 16;
#endif
    return (vf)w;
  }
  static inline void store(uint16_t* p, vf v) {
    vu32 u = (vu32)v;
    vu32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    vu32 is_nan = (vu32)((u & 0x7fffffffu) > 0x7f800000u);
    rounded = (rounded & ~is_nan) | (is_nan & 0x7fc0u);
    storeu(p, __builtin_convertvector(rounded, vu16));
  }
};


// Horizontal sum as a tree of log2(L) rotate-and-adds: lane by lane it took ~3 instructions a
// lane, and expand_direct reduces once per output column (T=1: 5x the instructions of shrink).
template <int H, typename V, unsigned long... I>
static inline V rotate_lanes(V v, std::integer_sequence<unsigned long, I...>) {
  return __builtin_shufflevector(v, v, ((I + H) % sizeof...(I))...);
}

template <int H, int L, typename V> static inline V fold_lanes(V v) {
  if constexpr (H == 0) {
    return v;
  } else {
    return fold_lanes<H / 2, L>(v + rotate_lanes<H>(v, std::make_integer_sequence<unsigned long, L>{}));
  }
}

template <typename Acc> static inline Acc hsum(typename Vec<Acc>::type v) {
  constexpr int L = Vec<Acc>::L;
  return fold_lanes<L / 2, L>(v)[0];
}

// One level of fold_columns: a and b each hold 2*NB blocks of Bn lanes (NB = L / (2 Bn) column
// groups); the result holds a's groups then b's, each folded (low half + high half) to Bn lanes.
template <int Bn, int L, typename V, unsigned long... P>
static inline V fold_pair(V a, V b, std::integer_sequence<unsigned long, P...>) {
  constexpr unsigned long NB = L / (2 * Bn);
  return __builtin_shufflevector(a, b, ((P / Bn >= NB ? L : 0) + (P / Bn % NB) * 2 * Bn + P % Bn)...) +
         __builtin_shufflevector(a, b, ((P / Bn >= NB ? L : 0) + (P / Bn % NB) * 2 * Bn + P % Bn + Bn)...);
}

// v[0..L): partial sums of L columns, one vector each. After the call v[0] lane q = the lane
// sum of the old v[q]: L - 1 pair folds of 2 shuffles and an add, against L tree reductions.
template <int Bn, int L, typename V> static inline void fold_columns(V* v) {
  for (int m = 0; m < Bn; ++m)
    v[m] = fold_pair<Bn, L>(v[2 * m], v[2 * m + 1], std::make_integer_sequence<unsigned long, L>{});
  if constexpr (Bn > 1) fold_columns<Bn / 2, L>(v);
}

// Writes the NT x NR dot products of a shrink block: acc[t][q] (vectors) lane-summed plus
// tail[t][q]. With NT NR = L the L sums fold into one vector (fold_columns: L - 1 folds of 3
// instructions) instead of L tree reductions of 2 log2(L).
template <typename Acc, int NT, int NR>
static inline void shrink_store(typename Vec<Acc>::type (&acc)[NT][NR], const Acc (&tail)[NT][NR],
                                Acc* const* outs, int64_t i0) {
  typedef typename Vec<Acc>::type vt;
  if constexpr (NT * NR == Vec<Acc>::L) {
    vt flat[NT * NR];
    for (int t = 0; t < NT; ++t)
      for (int q = 0; q < NR; ++q) flat[t * NR + q] = acc[t][q];
    fold_columns<NT * NR / 2, NT * NR>(flat);
    Acc sums[NT * NR];
    storeu(sums, flat[0]);
    for (int t = 0; t < NT; ++t)
      for (int q = 0; q < NR; ++q) outs[t][i0 + q] = sums[t * NR + q] + tail[t][q];
  } else {
    for (int t = 0; t < NT; ++t)
      for (int q = 0; q < NR; ++q) outs[t][i0 + q] = hsum<Acc>(acc[t][q]) + tail[t][q];
  }
}

// ------------------------------------------------------------------------------------------
// shrink: out[slot, i] = <M_e[i, :], X_t>, NT slots of one expert by NR ranks in registers.
// Per vector step NT + NR loads feed NT * NR multiply-adds.
// ------------------------------------------------------------------------------------------
#ifdef MOELORA_DPBF16
// Accumulators are vf (plain GCC vectors), not __m512: __m512 is declared may_alias, so GCC
// could not keep arrays of it in registers across the loops' loads and stored every
// accumulator to the stack on every iteration (seen in the compiled outer tile).
static inline vf dot_pairs(vf acc, __m512i a, __m512i b) {
  return (vf)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
}

static inline __mmask32 first_words(int64_t count) {  // mask of the first min(count, 32) words
  return count >= 32 ? ~__mmask32(0) : (__mmask32(1) << count) - 1;
}

// 64-byte load as a plain GCC vector: the masked-load intrinsics are opaque memory references
// to GCC, and with one inside a loop it kept every accumulator array in memory (a stack store
// per accumulator per iteration, seen in the compiled code); so only loop tails use them.
static inline __m512i load64(const void* p) { return (__m512i)loadu<vu32>(p); }

// One step of shrink_block_pairs: 32 elements of NT tokens by NR ranks.
template <int NT, int NR, bool Masked>
static inline void shrink_step_pairs(vf (&acc)[NT][NR], const uint16_t* const* xs,
                                     const uint16_t* const* rows, int64_t c, __mmask32 m) {
  __m512i xv[NT];
  for (int t = 0; t < NT; ++t) xv[t] = Masked ? _mm512_maskz_loadu_epi16(m, xs[t] + c) : load64(xs[t] + c);
  for (int q = 0; q < NR; ++q) {
    const __m512i mv = Masked ? _mm512_maskz_loadu_epi16(m, rows[q] + c) : load64(rows[q] + c);
    for (int t = 0; t < NT; ++t) acc[t][q] = dot_pairs(acc[t][q], xv[t], mv);
  }
}

// bf16 x bf16 shrink: 32 elements (16 pairs) per vdpbf16ps, the tail as one masked step.
template <int NT, int NR>
static inline void shrink_block_pairs(const uint16_t* __restrict Me, const uint16_t* const* xs,
                                      float* const* outs, int64_t i0, int64_t n) {
  vf acc[NT][NR];
  for (int t = 0; t < NT; ++t)
    for (int q = 0; q < NR; ++q) acc[t][q] = vf{};
  const uint16_t* rows[NR];
  for (int q = 0; q < NR; ++q) rows[q] = Me + (i0 + q) * n;
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) shrink_step_pairs<NT, NR, false>(acc, xs, rows, c, 0);
  if (c < n) shrink_step_pairs<NT, NR, true>(acc, xs, rows, c, first_words(n - c));
  const float none[NT][NR] = {};
  shrink_store<float, NT, NR>(acc, none, outs, i0);
}
#endif

template <typename Acc, typename Tm, typename Tx, int NT, int NR>
static inline void shrink_block(const Tm* __restrict Me, const Tx* const* xs, Acc* const* outs,
                                int64_t i0, int64_t n) {
#ifdef MOELORA_DPBF16
  if constexpr (std::is_same_v<Tm, uint16_t> && std::is_same_v<Tx, uint16_t>) {
    shrink_block_pairs<NT, NR>(Me, xs, outs, i0, n);
    return;
  }
#endif
  typedef typename Vec<Acc>::type vt;
  constexpr int L = Vec<Acc>::L;
  vt acc[NT][NR];
  for (int t = 0; t < NT; ++t)
    for (int q = 0; q < NR; ++q) acc[t][q] = vt{};
  const Tm* rows[NR];
  for (int q = 0; q < NR; ++q) rows[q] = Me + (i0 + q) * n;
  int64_t c = 0;
  for (; c + L <= n; c += L) {
    vt xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = Lanes<Acc, Tx>::load(xs[t] + c);
    for (int q = 0; q < NR; ++q) {
      vt mv = Lanes<Acc, Tm>::load(rows[q] + c);
      for (int t = 0; t < NT; ++t) acc[t][q] += xv[t] * mv;
    }
  }
  Acc tail[NT][NR];
  for (int t = 0; t < NT; ++t)
    for (int q = 0; q < NR; ++q) tail[t][q] = 0;
  for (; c < n; ++c) {
    for (int t = 0; t < NT; ++t) {
      Acc xc = to_acc<Acc>(xs[t][c]);
      for (int q = 0; q < NR; ++q) tail[t][q] += to_acc<Acc>(rows[q][c]) * xc;
    }
  }
  shrink_store<Acc, NT, NR>(acc, tail, outs, i0);
}

template <typename Acc, typename Tm, typename Tx, int NT>
static inline void shrink_ranks(const Tm* Me, const Tx* const* xs, Acc* const* outs, int64_t r,
                                int64_t n) {
  int64_t i0 = 0;
  for (; i0 + SHRINK_RB <= r; i0 += SHRINK_RB) shrink_block<Acc, Tm, Tx, NT, SHRINK_RB>(Me, xs, outs, i0, n);
  for (; i0 < r; ++i0) shrink_block<Acc, Tm, Tx, NT, 1>(Me, xs, outs, i0, n);
}

template <typename Acc, typename Tm, typename Tx>
static void shrink_impl(const ShrinkArgs& a, int64_t item_begin, int64_t item_end) {
  const Tm* M = static_cast<const Tm*>(a.M);
  const Tx* X = static_cast<const Tx*>(a.X);
  Acc* out = static_cast<Acc*>(a.out);
  const int64_t r = a.r, n = a.n, k = a.k;
  for (int64_t it = item_begin; it < item_end; ++it) {
    const SlotRange range = a.items[it];
    const Tm* Me = M + range.e * r * n;
    for (int64_t s0 = range.begin; s0 < range.end; s0 += SHRINK_TB) {
      const int64_t nt = range.end - s0 < SHRINK_TB ? range.end - s0 : SHRINK_TB;
      const Tx* xs[SHRINK_TB];
      Acc* outs[SHRINK_TB];
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t slot = a.order[s0 + t];
        xs[t] = X + (slot / k) * n;
        outs[t] = out + slot * r;
      }
      if (nt == SHRINK_TB) {
        shrink_ranks<Acc, Tm, Tx, SHRINK_TB>(Me, xs, outs, r, n);
      } else {
        for (int64_t t = 0; t < nt; ++t) shrink_ranks<Acc, Tm, Tx, 1>(Me, xs + t, outs + t, r, n);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// expand: Y_t[c .. c + NV*L) += sum_j sum_i Z[t,j,i] M_{e(t,j)}[i, c ..]. All k slots of the
// token are summed in registers before the one read-modify-write of Y (one rounding in bf16).
// ------------------------------------------------------------------------------------------
// Y rows are visited a panel at a time, token after token (n elements apart): each visit is a
// new pair of cache lines no hardware prefetcher predicts, and y, just written by the base
// GEMM, has left L2. Measured (perf, bf16 T=1024 d=1024): 75% of expand's cycles waited on
// those loads. A few tokens ahead hides that latency.
constexpr int64_t kExpandPrefetch = 4;

template <typename T> static inline void prefetch_row(const T* p, int64_t count) {
  for (int64_t b = 0; b < count * int64_t(sizeof(T)); b += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + b, 1);
}

// The columns and tokens of expand work item `it` (ExpandArgs / ExpandPairsArgs): column block
// it / num_token_blocks, token block it % num_token_blocks.
struct ExpandItem {
  int64_t c_begin, c_end, t_begin, t_end;
  template <typename Args> ExpandItem(const Args& a, int64_t it) {
    c_begin = it / a.num_token_blocks * a.cols_per_item;
    c_end = c_begin + a.cols_per_item < a.n ? c_begin + a.cols_per_item : a.n;
    t_begin = it % a.num_token_blocks * a.tokens_per_item;
    t_end = t_begin + a.tokens_per_item < a.T ? t_begin + a.tokens_per_item : a.T;
  }
};

// P is the column panel of this block: P[(e * r + i) * kPanel + cc], cc in [0, kPanel).
template <typename Acc, typename Ty, int NV>
static inline void expand_cols(const Acc* __restrict P, const Acc* __restrict Zt,
                               const int64_t* idx_t, int64_t k, int64_t r, Ty* yc, int64_t cc) {
  typedef typename Vec<Acc>::type vt;
  constexpr int L = Vec<Acc>::L;
  vt acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = vt{};
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = idx_t[j];
    if (e < 0) continue;
    const Acc* z = Zt + j * r;
    const Acc* row = P + e * r * kPanel + cc;
    for (int64_t i = 0; i < r; ++i, row += kPanel) {
      const vt zz = bcast<Acc>(z[i]);
      for (int v = 0; v < NV; ++v) acc[v] += zz * loadu<vt>(row + v * L);
    }
  }
  for (int v = 0; v < NV; ++v) {
    Ty* p = yc + cc + v * L;
    Lanes<Acc, Ty>::store(p, Lanes<Acc, Ty>::load(p) + acc[v]);
  }
}

template <typename Acc, typename Ty>
static inline void expand_col_scalar(const Acc* P, const Acc* Zt, const int64_t* idx_t, int64_t k,
                                     int64_t r, Ty* yc, int64_t cc) {
  Acc acc = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = idx_t[j];
    if (e < 0) continue;
    const Acc* z = Zt + j * r;
    const Acc* col = P + e * r * kPanel + cc;
    for (int64_t i = 0; i < r; ++i) acc += z[i] * col[i * kPanel];
  }
  yc[cc] = from_acc<Ty>(to_acc<Acc>(yc[cc]) + acc);
}

template <typename Acc, typename Ty>
static void expand_impl(const ExpandArgs& a, int64_t item_begin, int64_t item_end) {
  constexpr int L = Vec<Acc>::L;
  constexpr int W = EXPAND_NV * L < kPanel ? EXPAND_NV * L : kPanel;
  constexpr int NV = W / L;
  static_assert(kPanel % W == 0, "panel must hold whole register blocks");
  const Acc* M = static_cast<const Acc*>(a.M);
  const Acc* Z = static_cast<const Acc*>(a.Z);
  Ty* Y = static_cast<Ty*>(a.Y);
  const int64_t r = a.r, n = a.n, k = a.k;
  const int64_t panel_size = a.E * r * kPanel;
  for (int64_t it = item_begin; it < item_end; ++it) {
    const ExpandItem item(a, it);
    const int64_t c_begin = item.c_begin, c_end = item.c_end, t_begin = item.t_begin, t_end = item.t_end;
    for (int64_t c0 = c_begin; c0 < c_end; c0 += kPanel) {
      // One panel (E * r * kPanel values, 32 KiB for E=8, r=16, fp32) serves every token.
      const Acc* P = M + (c0 / kPanel) * panel_size;
      const int64_t valid = c_end - c0 < kPanel ? c_end - c0 : kPanel;
      int64_t cc = 0;
      for (; cc + W <= valid; cc += W)
        for (int64_t t = t_begin; t < t_end; ++t) {
          if (t + kExpandPrefetch < t_end) prefetch_row(Y + (t + kExpandPrefetch) * n + c0 + cc, W);
          expand_cols<Acc, Ty, NV>(P, Z + t * k * r, a.idx + t * k, k, r, Y + t * n + c0, cc);
        }
      for (; cc + L <= valid; cc += L)
        for (int64_t t = t_begin; t < t_end; ++t)
          expand_cols<Acc, Ty, 1>(P, Z + t * k * r, a.idx + t * k, k, r, Y + t * n + c0, cc);
      for (; cc < valid; ++cc)
        for (int64_t t = t_begin; t < t_end; ++t)
          expand_col_scalar<Acc, Ty>(P, Z + t * k * r, a.idx + t * k, k, r, Y + t * n + c0, cc);
    }
  }
}

// ------------------------------------------------------------------------------------------
// expand_direct: the expand of a few tokens, reading B as stored ([E, n, r]: row c of B_e holds
// the r values output column c needs), so no layout pass runs: at decode sizes packing the used
// experts' panels cost as much as the whole LoRA part. The k slots' products of one output are
// summed in one vector; L columns' vectors are then reduced together (fold_columns), so one
// read-modify-write of Y serves L outputs.
// ------------------------------------------------------------------------------------------
// Partial sums of the W output columns from c of one token: acc[q] over the vector part of the
// ranks, tail[q] over the rest. Ranks outer, columns inner: the unrolled inner loop is one
// load-multiply-add each.
template <typename Acc, typename Tm, int W>
static inline void direct_columns(const Tm* M, const Acc* Zt, const int64_t* ids, int64_t k,
                                  int64_t r, int64_t n, int64_t c, typename Vec<Acc>::type* acc,
                                  Acc* tail) {
  typedef typename Vec<Acc>::type vt;
  constexpr int L = Vec<Acc>::L;
  const int64_t rv = r / L * L;
  for (int q = 0; q < W; ++q) acc[q] = vt{}, tail[q] = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = ids[j];
    if (e < 0) continue;
    const Tm* rows = M + (e * n + c) * r;
    const Acc* z = Zt + j * r;
    int64_t i = 0;
    for (; i < rv; i += L) {
      const vt zv = loadu<vt>(z + i);
      for (int q = 0; q < W; ++q) acc[q] += Lanes<Acc, Tm>::load(rows + q * r + i) * zv;
    }
    for (; i < r; ++i)
      for (int q = 0; q < W; ++q) tail[q] += to_acc<Acc>(rows[q * r + i]) * z[i];
  }
}

template <typename Acc, typename Tm, typename Ty>
static void expand_direct_impl(const ExpandDirectArgs& a, int64_t item_begin, int64_t item_end) {
  typedef typename Vec<Acc>::type vt;
  constexpr int L = Vec<Acc>::L;
  const Tm* M = static_cast<const Tm*>(a.M);
  const Acc* Z = static_cast<const Acc*>(a.Z);
  Ty* Y = static_cast<Ty*>(a.Y);
  const int64_t r = a.r, n = a.n, k = a.k, cols = a.cols_per_item;
  const int64_t blocks = (n + cols - 1) / cols;
  for (int64_t it = item_begin; it < item_end; ++it) {
    const int64_t t = it / blocks, c_begin = it % blocks * cols;
    const int64_t c_end = c_begin + cols < n ? c_begin + cols : n;
    const int64_t* ids = a.idx + t * k;
    const Acc* Zt = Z + t * k * r;
    Ty* yt = Y + t * n;
    int64_t c = c_begin;
    for (; c + L <= c_end; c += L) {
      vt acc[L];
      Acc tail[L];
      direct_columns<Acc, Tm, L>(M, Zt, ids, k, r, n, c, acc, tail);
      fold_columns<L / 2, L>(acc);
      Lanes<Acc, Ty>::store(yt + c, Lanes<Acc, Ty>::load(yt + c) + acc[0] + loadu<vt>(tail));
    }
    for (; c < c_end; ++c) {
      vt acc;
      Acc tail;
      direct_columns<Acc, Tm, 1>(M, Zt, ids, k, r, n, c, &acc, &tail);
      yt[c] = from_acc<Ty>(to_acc<Acc>(yt[c]) + (hsum<Acc>(acc) + tail));
    }
  }
}

// ------------------------------------------------------------------------------------------
// outer: G_e[i, c] = sum over slots s of expert e of Z[s, i] X_t[c]; an NR x (NV*L) tile of G
// in registers, one pass over the expert's slots per tile. Deterministic: no atomics, slots
// are summed in token order.
// ------------------------------------------------------------------------------------------
constexpr int64_t kOuterPrefetch = 8;  // slots ahead: covers an L3 hit at ~10 cycles a slot

template <typename Acc, typename Tx, int NR, int NV>
static inline void outer_tile(const Acc* __restrict Z, const Tx* __restrict X,
                              const int64_t* slots, const int64_t* tokens, int64_t count, int64_t r,
                              int64_t n, Acc* Ge, int64_t i0, int64_t c) {
  typedef typename Vec<Acc>::type vt;
  constexpr int L = Vec<Acc>::L;
  vt acc[NR][NV];
  for (int q = 0; q < NR; ++q)
    for (int v = 0; v < NV; ++v) acc[q][v] = vt{};
  for (int64_t s = 0; s < count; ++s) {
    const int64_t slot = slots[s];
    const Tx* xr = X + tokens[s] * n + c;
    const Acc* zr = Z + slot * r + i0;
    // The rows are gathered by slot, which no hardware prefetcher predicts; without this the
    // loop waits on each row's cache miss (fine-grained E=64 r=8: dA + dB took 11 ms of a
    // 28 ms backward at T=1024, d=1024).
    if (s + kOuterPrefetch < count) {
      const Tx* ahead = X + tokens[s + kOuterPrefetch] * n + c;
      for (int v = 0; v < NV * L * int(sizeof(Tx)); v += 64) __builtin_prefetch(reinterpret_cast<const char*>(ahead) + v);
    }
    vt xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = Lanes<Acc, Tx>::load(xr + v * L);
    for (int q = 0; q < NR; ++q) {
      const vt zz = bcast<Acc>(zr[q]);
      for (int v = 0; v < NV; ++v) acc[q][v] += zz * xv[v];
    }
  }
  for (int q = 0; q < NR; ++q)
    for (int v = 0; v < NV; ++v) storeu(Ge + (i0 + q) * n + c + v * L, acc[q][v]);
}

template <typename Acc, typename Tx>
static inline void outer_col_scalar(const Acc* Z, const Tx* X, const int64_t* slots,
                                    const int64_t* tokens, int64_t count, int64_t r, int64_t n,
                                    Acc* Ge, int64_t c) {
  for (int64_t i = 0; i < r; ++i) {
    Acc acc = 0;
    for (int64_t s = 0; s < count; ++s) {
      const int64_t slot = slots[s];
      acc += Z[slot * r + i] * to_acc<Acc>(X[tokens[s] * n + c]);
    }
    Ge[i * n + c] = acc;
  }
}

template <typename Acc, typename Tx, int NV>
static inline void outer_ranks(const Acc* Z, const Tx* X, const int64_t* slots,
                               const int64_t* tokens, int64_t count, int64_t r, int64_t n, Acc* Ge,
                               int64_t c) {
  int64_t i0 = 0;
  for (; i0 + OUTER_RI <= r; i0 += OUTER_RI)
    outer_tile<Acc, Tx, OUTER_RI, NV>(Z, X, slots, tokens, count, r, n, Ge, i0, c);
  for (; i0 < r; ++i0) outer_tile<Acc, Tx, 1, NV>(Z, X, slots, tokens, count, r, n, Ge, i0, c);
}

template <typename Acc, typename Tx>
static void outer_impl(const OuterArgs& a, int64_t item_begin, int64_t item_end) {
  constexpr int L = Vec<Acc>::L;
  const Acc* Z = static_cast<const Acc*>(a.Z);
  const Tx* X = static_cast<const Tx*>(a.X);
  Acc* G = static_cast<Acc*>(a.G);
  const int64_t r = a.r, n = a.n;
  for (int64_t it = item_begin; it < item_end; ++it) {
    const int64_t cb = it / a.E, e = it % a.E;
    const int64_t c_begin = cb * a.cols_per_item;
    const int64_t c_end = c_begin + a.cols_per_item < n ? c_begin + a.cols_per_item : n;
    const int64_t* slots = a.order + a.offsets[e];
    const int64_t* tokens = a.tokens + a.offsets[e];
    const int64_t count = a.offsets[e + 1] - a.offsets[e];
    Acc* Ge = G + e * r * n;
    int64_t c = c_begin;
    for (; c + OUTER_NV * L <= c_end; c += OUTER_NV * L)
      outer_ranks<Acc, Tx, OUTER_NV>(Z, X, slots, tokens, count, r, n, Ge, c);
    for (; c + L <= c_end; c += L) outer_ranks<Acc, Tx, 1>(Z, X, slots, tokens, count, r, n, Ge, c);
    for (; c < c_end; ++c) outer_col_scalar<Acc, Tx>(Z, X, slots, tokens, count, r, n, Ge, c);
  }
}

// ------------------------------------------------------------------------------------------
// entry points: pick the template for the storage types
// ------------------------------------------------------------------------------------------
static void shrink_entry(const ShrinkArgs& a, int64_t b, int64_t e) {
  if (a.acc == DType::f64) shrink_impl<double, double, double>(a, b, e);
  else if (a.mt == DType::bf16 && a.xt == DType::bf16) shrink_impl<float, uint16_t, uint16_t>(a, b, e);
  else if (a.mt == DType::bf16) shrink_impl<float, uint16_t, float>(a, b, e);
  else if (a.xt == DType::bf16) shrink_impl<float, float, uint16_t>(a, b, e);
  else shrink_impl<float, float, float>(a, b, e);
}

static void expand_entry(const ExpandArgs& a, int64_t b, int64_t e) {
  if (a.acc == DType::f64) expand_impl<double, double>(a, b, e);
  else if (a.yt == DType::bf16) expand_impl<float, uint16_t>(a, b, e);
  else expand_impl<float, float>(a, b, e);
}

static void expand_direct_entry(const ExpandDirectArgs& a, int64_t b, int64_t e) {
  if (a.acc == DType::f64) expand_direct_impl<double, double, double>(a, b, e);
  else if (a.mt == DType::bf16 && a.yt == DType::bf16) expand_direct_impl<float, uint16_t, uint16_t>(a, b, e);
  else if (a.mt == DType::bf16) expand_direct_impl<float, uint16_t, float>(a, b, e);
  else if (a.yt == DType::bf16) expand_direct_impl<float, float, uint16_t>(a, b, e);
  else expand_direct_impl<float, float, float>(a, b, e);
}

static void outer_entry(const OuterArgs& a, int64_t b, int64_t e) {
  if (a.acc == DType::f64) outer_impl<double, double>(a, b, e);
  else if (a.xt == DType::bf16) outer_impl<float, uint16_t>(a, b, e);
  else outer_impl<float, float>(a, b, e);
}


#ifdef MOELORA_DPBF16
// ------------------------------------------------------------------------------------------
// bf16 x bf16 on the pair layouts (kernels.h: ExpandPairsArgs, OuterPairsArgs)
// ------------------------------------------------------------------------------------------
static inline __m512 widen_bf16(__m256i w) {  // 16 bf16 -> fp32, exact
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16));
}

// fp32 -> bf16 in one vcvtneps2bf16: nearest even as c10 rounds; unlike c10 it flushes fp32
// denormals (below 1.2e-38) to zero and keeps a NaN's payload (quieted), as oneDNN's bf16 GEMMs
// on this instruction do. The integer sequence it replaces was 8 instructions a vector, 32 a
// token's block against its 16 vdpbf16ps.
static inline __m256i round_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

static inline __mmask16 first_lanes(int64_t count) {  // mask of the first min(count, 16) lanes
  return count >= 16 ? __mmask16(0xffff) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}

// Y_t[c0 + cc ..][NV * 16 columns] += the token's k slots; `valid` columns of Y exist from cc.
// The panel is zero-padded, so only Y's accesses are masked. With Split (rp even) the even and
// odd rank pairs go to two accumulator sets, halving each vector's chain of k rp dependent
// vdpbf16ps: 10-13% faster alone (T=1024, d=1024, E=8, r=16, 2 threads, warm caches; 6% cold).
// The fp32 expand measured slower split the same way (0.29 against 0.26 ms): its loop is bound
// by its loads. One loop per instantiation: with a second loop for an odd last pair GCC kept
// the accumulators on the stack. Always inlined: as a call of its own (GCC's choice) it zeroed,
// spilled and reloaded its accumulators through the stack on every call, once per token and
// 64 columns (0.163 -> 0.130 ms inlined, benchmarks.cpu_kernels).
template <int NV, bool Split>
__attribute__((always_inline)) static inline void expand_pairs_cols(
    const uint16_t* __restrict P, const uint32_t* __restrict Zt, const int64_t* idx_t, int64_t k,
    int64_t rp, uint16_t* yc, int64_t cc, int64_t valid) {
  constexpr int step = Split ? 2 : 1;
  vf acc[NV], acc2[NV];
  for (int v = 0; v < NV; ++v) acc[v] = acc2[v] = vf{};
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = idx_t[j];
    if (e < 0) continue;
    const uint32_t* z = Zt + j * rp;
    const uint16_t* row = P + (e * rp * kPanel + cc) * 2;
    for (int64_t p = 0; p < rp; p += step, row += 2 * step * kPanel) {
      const __m512i zz = _mm512_set1_epi32(int(z[p]));
      for (int v = 0; v < NV; ++v) acc[v] = dot_pairs(acc[v], zz, load64(row + v * 32));
      if constexpr (Split) {
        const __m512i zz2 = _mm512_set1_epi32(int(z[p + 1]));
        for (int v = 0; v < NV; ++v) acc2[v] = dot_pairs(acc2[v], zz2, load64(row + 2 * kPanel + v * 32));
      }
    }
  }
  for (int v = 0; v < NV; ++v) acc[v] += acc2[v];
  for (int v = 0; v < NV; ++v) {
    const __mmask16 m = first_lanes(valid - v * 16);
    if (m == 0) break;
    uint16_t* yp = yc + cc + v * 16;
    const __m512 y = widen_bf16(_mm256_maskz_loadu_epi16(m, yp));
    _mm256_mask_storeu_epi16(yp, m, round_bf16(_mm512_add_ps(y, (__m512)acc[v])));
  }
}

static void expand_pairs_impl(const ExpandPairsArgs& a, int64_t item_begin, int64_t item_end) {
  constexpr int NV = 4;
  static_assert(kPanel % (NV * 16) == 0, "panel must hold whole register blocks");
  const int64_t rp = a.rp, n = a.n, k = a.k;
  const int64_t panel_size = a.E * rp * kPanel * 2;
  for (int64_t it = item_begin; it < item_end; ++it) {
    const ExpandItem item(a, it);
    const int64_t c_begin = item.c_begin, c_end = item.c_end, t_begin = item.t_begin, t_end = item.t_end;
    for (int64_t c0 = c_begin; c0 < c_end; c0 += kPanel) {
      const uint16_t* P = a.M + (c0 / kPanel) * panel_size;
      const int64_t valid = c_end - c0 < kPanel ? c_end - c0 : kPanel;
      for (int64_t cc = 0; cc < valid; cc += NV * 16)
        for (int64_t t = t_begin; t < t_end; ++t) {
          if (t + kExpandPrefetch < t_end) prefetch_row(a.Y + (t + kExpandPrefetch) * n + c0 + cc, valid - cc < NV * 16 ? valid - cc : NV * 16);
          uint16_t* yt = a.Y + t * n + c0;
          if (rp % 2 == 0) expand_pairs_cols<NV, true>(P, a.Z + t * k * rp, a.idx + t * k, k, rp, yt, cc, valid - cc);
          else expand_pairs_cols<NV, false>(P, a.Z + t * k * rp, a.idx + t * k, k, rp, yt, cc, valid - cc);
        }
    }
  }
}

// An NR x 32 tile of G_e: per pair of slots, their two X rows interleaved by word (unpacklo /
// unpackhi within 128-bit lanes) feed 2 NR vdpbf16ps, each 16 columns x 2 slots. The unpacks
// leave the columns of lo / hi in the order {0-3, 8-11, 16-19, 24-27} / {4-7, 12-15, ...}: one
// permute per output vector at the end puts them back.
// One pair of slots into an outer_pairs_tile: their rows x0, x1 (32 columns each).
template <int NR>
static inline void outer_pair(vf (&acc)[2 * NR], const uint32_t* zr, __m512i x0, __m512i x1) {
  const __m512i xl = _mm512_unpacklo_epi16(x0, x1), xh = _mm512_unpackhi_epi16(x0, x1);
  for (int q = 0; q < NR; ++q) {
    const __m512i zz = _mm512_set1_epi32(int(zr[q]));
    acc[2 * q] = dot_pairs(acc[2 * q], zz, xl);
    acc[2 * q + 1] = dot_pairs(acc[2 * q + 1], zz, xh);
  }
}

// Full: all 32 columns from c exist (plain loads). GCC keeps the accumulators in registers
// only with a single loop over the slots and no masked-load intrinsic in it: otherwise it
// stored all 2 NR of them to the stack on every pair (seen in the compiled code).
template <int NR, bool Full>
static inline void outer_pairs_tile(const uint32_t* __restrict Zp, const uint16_t* __restrict X,
                                    const int64_t* tokens, int64_t count, int64_t r, int64_t n,
                                    float* Ge, int64_t i0, int64_t c) {
  vf acc[2 * NR];  // acc[2q]: rank i0 + q on the unpacklo columns, acc[2q + 1]: on unpackhi's
  for (int q = 0; q < 2 * NR; ++q) acc[q] = vf{};
  const __mmask32 cm = first_words(n - c);
  for (int64_t s = 0; s < count; s += 2) {
    if (s + kOuterPrefetch + 1 < count) {
      __builtin_prefetch(X + tokens[s + kOuterPrefetch] * n + c);
      __builtin_prefetch(X + tokens[s + kOuterPrefetch + 1] * n + c);
    }
    // past an odd count the last slot pairs with a row of zeros (its z half is 0 too)
    const bool second = s + 1 < count;
    const uint16_t* r0 = X + tokens[s] * n + c;
    const uint16_t* r1 = X + tokens[second ? s + 1 : s] * n + c;
    const __m512i x0 = Full ? load64(r0) : _mm512_maskz_loadu_epi16(cm, r0);
    __m512i x1 = Full ? load64(r1) : _mm512_maskz_loadu_epi16(cm, r1);
    if (!second) x1 = _mm512_setzero_si512();
    outer_pair<NR>(acc, Zp + (s / 2) * r + i0, x0, x1);
  }
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  const __mmask16 m0 = first_lanes(n - c), m1 = first_lanes(n - c - 16);
  for (int q = 0; q < NR; ++q) {
    float* g = Ge + (i0 + q) * n + c;
    const __m512 lo = (__m512)acc[2 * q], hi = (__m512)acc[2 * q + 1];
    _mm512_mask_storeu_ps(g, m0, _mm512_permutex2var_ps(lo, first, hi));
    if (m1) _mm512_mask_storeu_ps(g + 16, m1, _mm512_permutex2var_ps(lo, second, hi));
  }
}

template <bool Full>
static inline void outer_pairs_ranks(const uint32_t* Zp, const uint16_t* X, const int64_t* tokens,
                                     int64_t count, int64_t r, int64_t n, float* Ge, int64_t c) {
  int64_t i0 = 0;
  for (; i0 + OUTER_RI <= r; i0 += OUTER_RI)
    outer_pairs_tile<OUTER_RI, Full>(Zp, X, tokens, count, r, n, Ge, i0, c);
  for (; i0 < r; ++i0) outer_pairs_tile<1, Full>(Zp, X, tokens, count, r, n, Ge, i0, c);
}

static void outer_pairs_impl(const OuterPairsArgs& a, int64_t item_begin, int64_t item_end) {
  const int64_t r = a.r, n = a.n;
  for (int64_t it = item_begin; it < item_end; ++it) {
    const int64_t cb = it / a.E, e = it % a.E;
    const int64_t c_begin = cb * a.cols_per_item;
    const int64_t c_end = c_begin + a.cols_per_item < n ? c_begin + a.cols_per_item : n;
    const int64_t* tokens = a.tokens + a.offsets[e];
    const int64_t count = a.offsets[e + 1] - a.offsets[e];
    const uint32_t* Zp = a.Z + a.pair_offsets[e] * r;
    float* Ge = a.G + e * r * n;
    for (int64_t c = c_begin; c < c_end; c += 32) {
      // items hold whole 32-column tiles (cols_per_item % 32 == 0) but the last: n - c masks it
      if (c + 32 <= n) outer_pairs_ranks<true>(Zp, a.X, tokens, count, r, n, Ge, c);
      else outer_pairs_ranks<false>(Zp, a.X, tokens, count, r, n, Ge, c);
    }
  }
}

static void expand_pairs_entry(const ExpandPairsArgs& a, int64_t b, int64_t e) { expand_pairs_impl(a, b, e); }
static void outer_pairs_entry(const OuterPairsArgs& a, int64_t b, int64_t e) { outer_pairs_impl(a, b, e); }
#endif  // MOELORA_DPBF16

}  // namespace MOELORA_NS
}  // namespace cpu
}  // namespace moelora
