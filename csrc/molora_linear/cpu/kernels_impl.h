// One instruction set's copy of the CPU kernels. Included by kernels.cpp once per set, with
//   MOELORA_NS           namespace of this copy (avx512 / avx2 / base)
//   MOELORA_VB           vector width in bytes (64 / 32 / 16)
//   MOELORA_SHRINK_TB    tokens per shrink register block
//   MOELORA_SHRINK_RB    ranks per shrink register block
//   MOELORA_EXPAND_NV    vectors of columns per expand register block
//   MOELORA_OUTER_RI     ranks per outer register block
//   MOELORA_OUTER_NV     vectors of columns per outer register block
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

template <typename Acc> static inline typename Vec<Acc>::type bcast(Acc s) {
  typename Vec<Acc>::type v = {};
  return v + s;
}

// Load Vec<Acc>::L consecutive elements stored as T, converted to Acc.
template <typename Acc, typename T> struct Lanes;
template <typename Acc> struct Lanes<Acc, Acc> {
  static inline typename Vec<Acc>::type load(const Acc* p) { return loadu<typename Vec<Acc>::type>(p); }
  static inline void store(Acc* p, typename Vec<Acc>::type v) { storeu(p, v); }
};
template <> struct Lanes<float, uint16_t> {
  static inline vf load(const uint16_t* p) {
    vu32 w = __builtin_convertvector(loadu<vu16>(p), vu32) << 16;
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

// ------------------------------------------------------------------------------------------
// shrink: out[slot, i] = <M_e[i, :], X_t>, NT slots of one expert by NR ranks in registers.
// Per vector step NT + NR loads feed NT * NR multiply-adds.
// ------------------------------------------------------------------------------------------
template <typename Acc, typename Tm, typename Tx, int NT, int NR>
static inline void shrink_block(const Tm* __restrict Me, const Tx* const* xs, Acc* const* outs,
                                int64_t i0, int64_t n) {
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
  for (int t = 0; t < NT; ++t)
    for (int q = 0; q < NR; ++q) outs[t][i0 + q] = hsum<Acc>(acc[t][q]) + tail[t][q];
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
    const int64_t cb = it / a.num_token_blocks, tb = it % a.num_token_blocks;
    const int64_t c_begin = cb * a.cols_per_item;
    const int64_t c_end = c_begin + a.cols_per_item < n ? c_begin + a.cols_per_item : n;
    const int64_t t_begin = tb * a.tokens_per_item;
    const int64_t t_end = t_begin + a.tokens_per_item < a.T ? t_begin + a.tokens_per_item : a.T;
    for (int64_t c0 = c_begin; c0 < c_end; c0 += kPanel) {
      // One panel (E * r * kPanel values, 32 KiB for E=8, r=16, fp32) serves every token.
      const Acc* P = M + (c0 / kPanel) * panel_size;
      const int64_t valid = c_end - c0 < kPanel ? c_end - c0 : kPanel;
      int64_t cc = 0;
      for (; cc + W <= valid; cc += W)
        for (int64_t t = t_begin; t < t_end; ++t)
          expand_cols<Acc, Ty, NV>(P, Z + t * k * r, a.idx + t * k, k, r, Y + t * n + c0, cc);
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
                              const int64_t* slots, int64_t count, int64_t r, int64_t n,
                              int64_t k, Acc* Ge, int64_t i0, int64_t c) {
  typedef typename Vec<Acc>::type vt;
  constexpr int L = Vec<Acc>::L;
  vt acc[NR][NV];
  for (int q = 0; q < NR; ++q)
    for (int v = 0; v < NV; ++v) acc[q][v] = vt{};
  for (int64_t s = 0; s < count; ++s) {
    const int64_t slot = slots[s];
    const Tx* xr = X + (slot / k) * n + c;
    const Acc* zr = Z + slot * r + i0;
    // The rows are gathered by slot, which no hardware prefetcher predicts; without this the
    // loop waits on each row's cache miss (fine-grained E=64 r=8: dA + dB took 11 ms of a
    // 28 ms backward at T=1024, d=1024).
    if (s + kOuterPrefetch < count) {
      const Tx* ahead = X + (slots[s + kOuterPrefetch] / k) * n + c;
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
                                    int64_t count, int64_t r, int64_t n, int64_t k, Acc* Ge,
                                    int64_t c) {
  for (int64_t i = 0; i < r; ++i) {
    Acc acc = 0;
    for (int64_t s = 0; s < count; ++s) {
      const int64_t slot = slots[s];
      acc += Z[slot * r + i] * to_acc<Acc>(X[(slot / k) * n + c]);
    }
    Ge[i * n + c] = acc;
  }
}

template <typename Acc, typename Tx, int NV>
static inline void outer_ranks(const Acc* Z, const Tx* X, const int64_t* slots, int64_t count,
                               int64_t r, int64_t n, int64_t k, Acc* Ge, int64_t c) {
  int64_t i0 = 0;
  for (; i0 + OUTER_RI <= r; i0 += OUTER_RI)
    outer_tile<Acc, Tx, OUTER_RI, NV>(Z, X, slots, count, r, n, k, Ge, i0, c);
  for (; i0 < r; ++i0) outer_tile<Acc, Tx, 1, NV>(Z, X, slots, count, r, n, k, Ge, i0, c);
}

template <typename Acc, typename Tx>
static void outer_impl(const OuterArgs& a, int64_t item_begin, int64_t item_end) {
  constexpr int L = Vec<Acc>::L;
  const Acc* Z = static_cast<const Acc*>(a.Z);
  const Tx* X = static_cast<const Tx*>(a.X);
  Acc* G = static_cast<Acc*>(a.G);
  const int64_t r = a.r, n = a.n, k = a.k;
  for (int64_t it = item_begin; it < item_end; ++it) {
    const int64_t cb = it / a.E, e = it % a.E;
    const int64_t c_begin = cb * a.cols_per_item;
    const int64_t c_end = c_begin + a.cols_per_item < n ? c_begin + a.cols_per_item : n;
    const int64_t* slots = a.order + a.offsets[e];
    const int64_t count = a.offsets[e + 1] - a.offsets[e];
    Acc* Ge = G + e * r * n;
    int64_t c = c_begin;
    for (; c + OUTER_NV * L <= c_end; c += OUTER_NV * L)
      outer_ranks<Acc, Tx, OUTER_NV>(Z, X, slots, count, r, n, k, Ge, c);
    for (; c + L <= c_end; c += L) outer_ranks<Acc, Tx, 1>(Z, X, slots, count, r, n, k, Ge, c);
    for (; c < c_end; ++c) outer_col_scalar<Acc, Tx>(Z, X, slots, count, r, n, k, Ge, c);
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

}  // namespace MOELORA_NS
}  // namespace cpu
}  // namespace moelora
