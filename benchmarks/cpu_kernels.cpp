// The CPU kernels alone (csrc/molora_linear/cpu/kernels.cpp, which includes no torch header),
// timed on one routing, with cold or warm caches. Built and run by `python -m
// benchmarks.cpu_kernels`; see there for the options.
//
// Why a second benchmark: inside the op, each kernel is a few percent of a call dominated by
// the base GEMM, and perf's sample shares of it swing 10-30% between runs on a shared host.
// Here a kernel's time repeats to a few percent, so a change of one kernel can be judged alone.
// Buffers are 64-byte aligned as ATen's are: with std::vector's 16-byte alignment every 64-byte
// vector load split two cache lines and the kernels measured ~1.5x slower than in the op.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels.h"

using namespace moelora::cpu;

namespace {

template <class T> struct Aligned {
  typedef T value_type;
  Aligned() = default;
  template <class U> Aligned(const Aligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64)); }
  void deallocate(T* p, size_t) { std::free(p); }
  bool operator==(const Aligned&) const { return true; }
};
template <class T> using Buffer = std::vector<T, Aligned<T>>;

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Options {
  int64_t T = 1024, d = 1024, E = 8, r = 16, k = 2;
  int threads = 2, reps = 30;
  bool cold = true;
  Isa isa = detect_isa();
};

// Best of `reps` runs of f, each after a pass over 64 MiB when caches are cold (as in the op,
// where the base GEMM's traffic comes between kernels).
template <class F> double best_of(const Options& o, F f) {
  static std::vector<char> evict(64 << 20);
  double best = 1e30;
  for (int i = 0; i < o.reps; ++i) {
    if (o.cold)
      for (size_t j = 0; j < evict.size(); j += 64) evict[j]++;
    const double t0 = now();
    f();
    best = std::min(best, now() - t0);
  }
  return best;
}

// Items split in contiguous halves, as at::parallel_for's static schedule does.
template <class K> void run_items(const Options& o, int64_t items, K kernel) {
#pragma omp parallel num_threads(o.threads)
  {
    const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t per = (items + nt - 1) / nt;
    const int64_t b = std::min(items, id * per), e = std::min(items, b + per);
    if (b < e) kernel(b, e);
  }
}

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

Isa parse_isa(const std::string& s) {
  if (s == "avx512bf16") return Isa::avx512bf16;
  if (s == "avx512") return Isa::avx512;
  if (s == "avx2") return Isa::avx2;
  if (s == "base") return Isa::base;
  std::fprintf(stderr, "unknown isa %s\n", s.c_str());
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i], value = argv[i + 1];
    if (key == "--T") o.T = std::atol(value.c_str());
    else if (key == "--d") o.d = std::atol(value.c_str());
    else if (key == "--E") o.E = std::atol(value.c_str());
    else if (key == "--r") o.r = std::atol(value.c_str());
    else if (key == "--k") o.k = std::atol(value.c_str());
    else if (key == "--threads") o.threads = std::atoi(value.c_str());
    else if (key == "--reps") o.reps = std::atoi(value.c_str());
    else if (key == "--cold") o.cold = value != "0";
    else if (key == "--isa") o.isa = parse_isa(value);
    else { std::fprintf(stderr, "unknown option %s\n", key.c_str()); return 2; }
  }
  if (o.k > o.E) { std::fprintf(stderr, "--k must be at most --E\n"); return 2; }
  const int64_t T = o.T, n = o.d, E = o.E, r = o.r, k = o.k;
  const KernelTable& kt = kernel_table(o.isa);

  // Routing: k distinct experts a token, slots grouped by expert (a stable counting sort).
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  std::vector<int64_t> idx(T * k);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int64_t> experts(E);
    for (int64_t e = 0; e < E; ++e) experts[e] = e;
    std::shuffle(experts.begin(), experts.end(), gen);
    for (int64_t j = 0; j < k; ++j) idx[t * k + j] = experts[j];
  }
  std::vector<int64_t> offsets(E + 1, 0), order(T * k), tokens(T * k);
  for (int64_t e : idx) ++offsets[e + 1];
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  {
    std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
    for (int64_t s = 0; s < T * k; ++s) order[cursor[idx[s]]++] = s;
  }
  for (int64_t i = 0; i < T * k; ++i) tokens[i] = order[i] / k;
  std::vector<SlotRange> shrink_items;  // 16 slots an item, as the op's kShrinkChunk
  for (int64_t e = 0; e < E; ++e)
    for (int64_t b = offsets[e]; b < offsets[e + 1]; b += 16)
      shrink_items.push_back({e, b, std::min(b + 16, offsets[e + 1])});

  const int64_t nb = (n + kPanel - 1) / kPanel, rp = (r + 1) / 2;
  Buffer<float> X(T * n), M(E * r * n), Y(T * n), Z(T * k * r), out(T * k * r), G(E * r * n);
  Buffer<float> panels(nb * E * r * kPanel, 0.f);
  for (auto* b : {&X, &M, &Y, &Z})
    for (auto& v : *b) v = normal(gen);
  for (int64_t cb = 0; cb < nb; ++cb)
    for (int64_t e = 0; e < E; ++e)
      for (int64_t i = 0; i < r; ++i)
        for (int64_t cc = 0; cc < kPanel && cb * kPanel + cc < n; ++cc)
          panels[((cb * E + e) * r + i) * kPanel + cc] = M[(e * r + i) * n + cb * kPanel + cc];
  Buffer<uint16_t> Xb(T * n), Mb(E * r * n), Yb(T * n), pairs(nb * E * rp * kPanel * 2, 0);
  for (size_t i = 0; i < X.size(); ++i) Xb[i] = to_bf16(X[i]), Yb[i] = to_bf16(Y[i]);
  for (size_t i = 0; i < M.size(); ++i) Mb[i] = to_bf16(M[i]);
  for (int64_t cb = 0; cb < nb; ++cb)
    for (int64_t e = 0; e < E; ++e)
      for (int64_t i = 0; i < r; ++i)
        for (int64_t cc = 0; cc < kPanel && cb * kPanel + cc < n; ++cc)
          pairs[(((cb * E + e) * rp + i / 2) * kPanel + cc) * 2 + i % 2] = Mb[(e * r + i) * n + cb * kPanel + cc];
  Buffer<uint32_t> Zr(T * k * rp, 0);  // z as rank pairs (expand_pairs)
  for (int64_t s = 0; s < T * k; ++s)
    for (int64_t i = 0; i < r; ++i) Zr[s * rp + i / 2] |= uint32_t(to_bf16(Z[s * r + i])) << (16 * (i % 2));
  std::vector<int64_t> pair_offsets(E + 1, 0);  // z as slot pairs by expert (outer_pairs)
  for (int64_t e = 0; e < E; ++e) pair_offsets[e + 1] = pair_offsets[e] + (offsets[e + 1] - offsets[e] + 1) / 2;
  Buffer<uint32_t> Zs(pair_offsets[E] * r, 0);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t q = offsets[e]; q < offsets[e + 1]; ++q)
      for (int64_t i = 0; i < r; ++i)
        Zs[(pair_offsets[e] + (q - offsets[e]) / 2) * r + i] |= uint32_t(to_bf16(Z[order[q] * r + i])) << (16 * ((q - offsets[e]) % 2));

  // Item shapes as molora_cpu.cpp's (expand_blocks, kOuterCols).
  const int64_t expand_cols = 128, outer_cols = 128;
  const int64_t col_blocks = (n + expand_cols - 1) / expand_cols;
  const int64_t wanted_blocks = std::min<int64_t>(T, std::max<int64_t>(1, (4 * o.threads + col_blocks - 1) / col_blocks));
  const int64_t expand_tokens = (T + wanted_blocks - 1) / wanted_blocks;
  const int64_t token_blocks = (T + expand_tokens - 1) / expand_tokens;
  const int64_t expand_items = col_blocks * token_blocks;
  const int64_t outer_items = (n + outer_cols - 1) / outer_cols * E;
  const double macs = double(T) * k * r * n;
  std::printf("kernels %s, T=%ld d=%ld E=%ld r=%ld k=%ld, %d thread(s), %s caches, best of %d\n", kt.name,
              long(T), long(n), long(E), long(r), long(k), o.threads, o.cold ? "cold" : "warm", o.reps);
  auto report = [&](const char* name, double seconds) {
    std::printf("%-14s %9.3f ms %8.1f G multiply-adds/s\n", name, seconds * 1e3, macs / seconds / 1e9);
  };

  const ShrinkArgs shrink{DType::f32, DType::f32, DType::f32, M.data(), X.data(), out.data(), order.data(),
                          shrink_items.data(), r, n, k};
  report("shrink", best_of(o, [&] { run_items(o, shrink_items.size(), [&](int64_t b, int64_t e) { kt.shrink(shrink, b, e); }); }));
  const ExpandArgs expand{DType::f32, DType::f32, panels.data(), Z.data(), idx.data(), Y.data(), T, E, r, n, k,
                          expand_tokens, expand_cols, token_blocks};
  report("expand", best_of(o, [&] { run_items(o, expand_items, [&](int64_t b, int64_t e) { kt.expand(expand, b, e); }); }));
  const OuterArgs outer{DType::f32, DType::f32, Z.data(), X.data(), G.data(), order.data(), tokens.data(),
                        offsets.data(), E, r, n, k, outer_cols};
  report("outer", best_of(o, [&] { run_items(o, outer_items, [&](int64_t b, int64_t e) { kt.outer(outer, b, e); }); }));
  const ShrinkArgs shrink_bf16{DType::f32, DType::bf16, DType::bf16, Mb.data(), Xb.data(), out.data(),
                               order.data(), shrink_items.data(), r, n, k};
  report("shrink bf16", best_of(o, [&] { run_items(o, shrink_items.size(), [&](int64_t b, int64_t e) { kt.shrink(shrink_bf16, b, e); }); }));
  if (kt.expand_pairs != nullptr) {
    const ExpandPairsArgs a{pairs.data(), Zr.data(), idx.data(), Yb.data(), T, E, rp, n, k,
                            expand_tokens, expand_cols, token_blocks};
    report("expand_pairs", best_of(o, [&] { run_items(o, expand_items, [&](int64_t b, int64_t e) { kt.expand_pairs(a, b, e); }); }));
  }
  if (kt.outer_pairs != nullptr) {
    const OuterPairsArgs a{Zs.data(), Xb.data(), G.data(), tokens.data(), offsets.data(), pair_offsets.data(),
                           E, r, n, k, outer_cols};
    report("outer_pairs", best_of(o, [&] { run_items(o, outer_items, [&](int64_t b, int64_t e) { kt.outer_pairs(a, b, e); }); }));
  }
  return 0;
}
