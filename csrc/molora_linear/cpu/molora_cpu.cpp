// CPU backend of the core op: the base GEMM through at::linear / at::mm (MKL / oneDNN), the
// routed LoRA part through the fused kernels of kernels.cpp, run in parallel with
// at::parallel_for (torch's OpenMP pool, so torch.set_num_threads applies).
//
// Forward:  y = W x + b  (at::linear);  h = shrink(A, x);  y += expand(B^T, s g h)
// Backward: u = shrink(B^T, dy);  dg = s <u, h>;  dB^T = outer(s g h, dy);  dA = outer(s g u, x);
//           dx = dy W (at::mm) + expand(A, s g u)
// Nothing of size [T, E * r] is formed: the work is O(T k r d), not O(T E r d).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <string>
#include <vector>

#include "../molora_linear.h"
#include "kernels.h"

namespace moelora {
namespace {

// ---------------------------------------------------------------------------------------------
// instruction set
// ---------------------------------------------------------------------------------------------
std::atomic<int> g_isa{-1};

const char* isa_name(cpu::Isa isa) {
  switch (isa) {
    case cpu::Isa::avx512bf16: return "avx512bf16";
    case cpu::Isa::avx512: return "avx512";
    case cpu::Isa::avx2: return "avx2";
    default: return "base";
  }
}

cpu::Isa parse_isa(const std::string& name) {
  if (name == "avx512bf16") return cpu::Isa::avx512bf16;
  if (name == "avx512") return cpu::Isa::avx512;
  if (name == "avx2") return cpu::Isa::avx2;
  if (name == "base") return cpu::Isa::base;
  TORCH_CHECK(false, "moelora: unknown CPU instruction set '", name,
              "', expected one of 'avx512bf16', 'avx512', 'avx2', 'base'");
}

cpu::Isa capped(cpu::Isa want) {
  const cpu::Isa best = cpu::detect_isa();
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;
}

cpu::Isa active_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    cpu::Isa isa = cpu::detect_isa();
    if (const char* env = std::getenv("MOELORA_CPU_ISA"); env != nullptr && env[0] != '\0')
      isa = capped(parse_isa(env));
    v = static_cast<int>(isa);
    g_isa.store(v, std::memory_order_relaxed);
  }
  return static_cast<cpu::Isa>(v);
}

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------
// Token-side operands the kernels read as stored: float and bfloat16 under fp32 accumulation,
// double under fp64. Anything else (fp16, or a mixed fp64 case) is converted once: O(T d)
// against the kernels' O(T d k r).
bool kernel_reads(at::ScalarType st, at::ScalarType acc) {
  if (acc == at::kDouble) return st == at::kDouble;
  return st == at::kFloat || st == at::kBFloat16;
}

Tensor token_operand(const Tensor& t, at::ScalarType acc) {
  return kernel_reads(t.scalar_type(), acc) ? t.contiguous() : t.to(acc).contiguous();
}

cpu::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cpu::DType::f32;
    case at::kBFloat16: return cpu::DType::bf16;
    case at::kDouble: return cpu::DType::f64;
    default: TORCH_INTERNAL_ASSERT(false, "moelora: no kernel reads ", t.scalar_type());
  }
}

// Slots t * k + j grouped by expert by a stable counting sort; unrouted (-1) slots dropped.
struct Routing {
  std::vector<int64_t> order;    // [number of routed slots]
  std::vector<int64_t> tokens;   // order[i] / k: the token (row of x, dy) of each slot
  std::vector<int64_t> offsets;  // [E + 1]
};

// The Python layer's message (moelora.ops.checks.check_range), as a ValueError, before any
// kernel runs: the eager path leaves this check to the op (one pass, no temporaries).
void check_expert_range(const Tensor& idx, int64_t E) {
  const int64_t n = idx.numel(), k = idx.dim() == 2 ? idx.size(1) : 1;
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t s = 0; s < n; ++s)
    TORCH_CHECK_VALUE(p[s] >= -1 && p[s] < E, "expert_indices must lie in [-1, ", E, ") (E = ", E,
                      ", -1 = no expert); got expert_indices[", s / k, ", ", s % k, "] = ", p[s]);
}

Routing sort_slots(const Tensor& idx, int64_t E) {
  const int64_t n = idx.numel();
  const int64_t* p = idx.data_ptr<int64_t>();
  Routing rt;
  rt.offsets.assign(E + 1, 0);
  for (int64_t s = 0; s < n; ++s) {
    const int64_t e = p[s];
    TORCH_CHECK(e >= -1 && e < E, "moelora: expert_indices must lie in [-1, ", E, "), got ", e);
    if (e >= 0) ++rt.offsets[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) rt.offsets[e + 1] += rt.offsets[e];
  rt.order.resize(rt.offsets[E]);
  std::vector<int64_t> cursor(rt.offsets.begin(), rt.offsets.end() - 1);
  for (int64_t s = 0; s < n; ++s) {
    const int64_t e = p[s];
    if (e >= 0) rt.order[cursor[e]++] = s;
  }
  const int64_t k = idx.dim() == 2 ? idx.size(1) : 1;
  rt.tokens.resize(rt.order.size());
  for (size_t i = 0; i < rt.order.size(); ++i) rt.tokens[i] = rt.order[i] / k;
  return rt;
}

// ---------------------------------------------------------------------------------------------
// adapter cache
// ---------------------------------------------------------------------------------------------
// The kernels read the adapters in the accumulate dtype and in their own layouts (B as column
// panels in the forward; B^T and A's panels in the backward). Re-laying them out on every call
// cost more than the LoRA work at small T (T=1: all E experts' B panels packed for the 2 used)
// and converted bf16 adapters on every call. Layouts are cached, keyed on the adapter's storage
// (held weakly: a freed adapter's entry can never match a new tensor at the same address), its
// view (offset, sizes, strides, dtype) and its version counter, which in-place writes such as
// `with torch.no_grad(): w.add_()` bump. Only adapters that do not require grad are cached
// (frozen experts, serving): fused optimizer steps (torch's fused Adam/AdamW on CPU, HF
// Trainer's default) update parameters without bumping their version counter, so a cached
// trainable adapter would silently serve the previous step's weights. Writes through `.data`
// bypass version counters too: MOELORA_CPU_ADAPTER_CACHE=0 turns the cache off, and
// `moelora._C.clear_cpu_cache()` empties it. Uncached adapters (trainable, inference tensors)
// are re-laid out per call (only the used experts at small T).
enum class Layout : int { acc = 0, transposed = 1, panels_b = 2, panels_a = 3, pairs_b = 4, pairs_a = 5 };

struct CacheEntry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* storage_id;
  int64_t offset;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype, acc;
  Layout layout;
  int64_t version;
  Tensor value;
};

class AdapterCache {
 public:
  static bool cacheable_tensor(const Tensor& t) {
    return enabled() && !t.is_inference() && t.has_storage() && !t.requires_grad();
  }
  // The cached layout of `src`, made by `make()` on a miss.
  template <typename Make>
  Tensor get(const Tensor& src, Layout layout, at::ScalarType acc, Make make) {
    if (!cacheable_tensor(src)) return make();
    const int64_t version = src._version();
    const void* id = src.storage().unsafeGetStorageImpl();
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = entries_.begin(); it != entries_.end(); ++it) {
        if (matches(*it, src, id, layout, acc)) {
          if (it->version == version && !it->storage.expired()) {
            entries_.splice(entries_.begin(), entries_, it);  // most recently used first
            ++hits_;
            return entries_.front().value;
          }
          bytes_ -= nbytes(it->value);
          entries_.erase(it);
          break;
        }
      }
    }
    Tensor value = make();  // outside the lock: other threads' lookups need not wait
    std::lock_guard<std::mutex> lock(mu_);
    ++misses_;
    for (auto it = entries_.begin(); it != entries_.end();) {  // drop freed adapters' entries
      if (it->storage.expired()) {
        bytes_ -= nbytes(it->value);
        it = entries_.erase(it);
      } else {
        ++it;
      }
    }
    entries_.push_front(CacheEntry{src.storage().getWeakStorageImpl(), id, src.storage_offset(),
                                   src.sizes().vec(), src.strides().vec(), src.scalar_type(), acc,
                                   layout, version, value});
    bytes_ += nbytes(value);
    while (bytes_ > max_bytes() && entries_.size() > 1) {
      bytes_ -= nbytes(entries_.back().value);
      entries_.pop_back();
    }
    return value;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    entries_.clear();
    bytes_ = 0;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(entries_.size()), bytes_, hits_, misses_};
  }

 static bool enabled() {
    static const bool on = [] {
      const char* env = std::getenv("MOELORA_CPU_ADAPTER_CACHE");
      return env == nullptr || std::string(env) != "0";
    }();
    return on;
  }

 private:
  // Enough for the adapters of a few hundred layers at d = 1024 (1 MiB each in fp32).
  static int64_t max_bytes() { return int64_t(1) << 30; }
  static int64_t nbytes(const Tensor& t) { return t.numel() * t.element_size(); }
  static bool matches(const CacheEntry& c, const Tensor& src, const void* id, Layout layout,
                      at::ScalarType acc) {
    return c.storage_id == id && c.layout == layout && c.acc == acc &&
           c.dtype == src.scalar_type() && c.offset == src.storage_offset() &&
           src.sizes().equals(c.sizes) && src.strides().equals(c.strides);
  }

  std::mutex mu_;
  std::list<CacheEntry> entries_;
  int64_t bytes_ = 0, hits_ = 0, misses_ = 0;
};

AdapterCache& adapter_cache() {
  static AdapterCache* cache = new AdapterCache();  // never destroyed: no exit-order issues
  return *cache;
}

// Grain of a parallel loop whose items each do `macs_per_item` multiply-adds: at least
// kMinTaskMacs per task, so that small calls (decode) run inline on the calling thread instead
// of waking the pool (a parallel region costs microseconds, as much as the whole LoRA part of
// a T=1 call: 2 x 32 K multiply-adds at d = 1024, r = 16, k = 2).
constexpr int64_t kMinTaskMacs = 1 << 17;
int64_t grain_for(int64_t macs_per_item, int64_t min_task_macs = kMinTaskMacs) {
  return std::max<int64_t>(1, min_task_macs / std::max<int64_t>(1, macs_per_item));
}

// Items that stream adapter rows from memory once (a few tokens: each multiply-add reads a new
// adapter element) are bound by one core's bandwidth, not by its FMA units: 128 K multiply-adds
// read 512 KiB, ~50 us on one core against a parallel region's few microseconds, so their tasks
// are split at 8 K (T=1, d=1024, r=16: one task per expert on the shrink).
constexpr int64_t kMinStreamingTaskMacs = 1 << 13;
int64_t streaming_grain(int64_t macs_per_item, int64_t slots_per_expert) {
  return grain_for(macs_per_item, slots_per_expert <= 2 ? kMinStreamingTaskMacs : kMinTaskMacs);
}

// Layout copies (panels, transposes) are bound by memory too: with grain_for's 128 K elements a
// task, packing [8, 1024, 16] ran as one task while the other thread waited (perf: pack_panels
// on the calling thread only, ~0.2 ms of a T=1024 fp32 training step).
int64_t copy_grain(int64_t elements_per_item) { return grain_for(elements_per_item, kMinStreamingTaskMacs); }

// Runs of at most `chunk` slots of one expert: the shrink's parallel work items. 16 slots is
// four register blocks of tokens, enough to reuse the expert's rows from L1/L2, while T * k = 512
// still gives 32 items to balance over the threads.
constexpr int64_t kShrinkChunk = 16;
// expand_direct items: 256 columns of one token. Outer items: 128 columns of one expert.
constexpr int64_t kExpandCols = 256;
constexpr int64_t kOuterCols = 128;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Expand (panels and pairs) items: kExpandItemCols columns x a block of tokens, in as few token
// blocks as still give each thread kExpandItemsPerThread items. An item streams its panels
// through L1 once per token block, so short blocks re-read them from L2 / L3: measured
// (benchmarks.cpu_kernels, T=1024, d=1024, E=8, r=16, k=2, 2 threads, cold caches) 64-token
// blocks of 256 columns 0.265 ms (fp32) / 0.226 ms (bf16 pairs), all 1024 tokens in blocks of
// 128 columns 0.232 / 0.175 ms.
constexpr int64_t kExpandItemCols = 128;
constexpr int64_t kExpandItemsPerThread = 4;
static_assert(kExpandItemCols % cpu::kPanel == 0, "expand items hold whole panels");

struct ExpandBlocks {
  int64_t cols, tokens, token_blocks, items;
};

ExpandBlocks expand_blocks(int64_t T, int64_t n) {
  const int64_t col_blocks = ceil_div(n, kExpandItemCols);
  const int64_t wanted = kExpandItemsPerThread * std::max<int64_t>(1, at::get_num_threads());
  const int64_t token_blocks = std::min(T, std::max<int64_t>(1, ceil_div(wanted, col_blocks)));
  const int64_t tokens = ceil_div(T, token_blocks);
  return {kExpandItemCols, tokens, ceil_div(T, tokens), col_blocks * ceil_div(T, tokens)};
}

// out[slot, :] = M_e X_t for every routed slot. M [E, r, n] (acc), X [T, n], out [T*k, r] (acc).
void run_shrink(const cpu::KernelTable& kt, const Tensor& M, const Tensor& X, const Routing& rt,
                int64_t k, Tensor& out) {
  const int64_t E = M.size(0), r = M.size(1), n = M.size(2);
  std::vector<cpu::SlotRange> items;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t b = rt.offsets[e]; b < rt.offsets[e + 1]; b += kShrinkChunk)
      items.push_back({e, b, std::min(b + kShrinkChunk, rt.offsets[e + 1])});
  if (items.empty()) return;
  cpu::ShrinkArgs a{dtype_of(out), dtype_of(M), dtype_of(X), M.data_ptr(), X.data_ptr(), out.data_ptr(),
                    rt.order.data(), items.data(), r, n, k};
  const int64_t per_item = ceil_div(static_cast<int64_t>(rt.order.size()), static_cast<int64_t>(items.size()));
  at::parallel_for(0, static_cast<int64_t>(items.size()), streaming_grain(per_item * r * n, per_item),
                   [&](int64_t b, int64_t e) { kt.shrink(a, b, e); });
}

// Layout changes of the adapters, done here rather than with ATen's permute + contiguous /
// constant_pad_nd: for [8, 1024, 16] fp32 those took ~0.5 ms and ~1 ms per call on 2 cores
// (profiled), more than the LoRA kernels themselves; these blocked loops take tens of us.

// src [E, a, b] (contiguous, acc dtype) -> [E, b, a]
Tensor transpose_last2(const Tensor& src) {
  const int64_t E = src.size(0), a = src.size(1), b = src.size(2);
  Tensor dst = at::empty({E, b, a}, src.options());
  constexpr int64_t kBlock = 32;
  const int64_t ab = ceil_div(a, kBlock), bb = ceil_div(b, kBlock);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, src.scalar_type(), "moelora_transpose", [&] {
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* out = dst.data_ptr<scalar_t>();
    at::parallel_for(0, E * ab * bb, copy_grain(kBlock * kBlock), [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t e = it / (ab * bb), i0 = (it / bb) % ab * kBlock, j0 = it % bb * kBlock;
        const scalar_t* s_e = in + e * a * b;
        scalar_t* d_e = out + e * a * b;
        const int64_t i1 = std::min(i0 + kBlock, a), j1 = std::min(j0 + kBlock, b);
        // The inner loop walks the long side's rows in memory order and so steps the other
        // side by its short row: stepping by the long row instead (B [E, 1024, 16] -> B^T,
        // writes 4 KiB apart) put every access of the inner loop in one L1 set.
        if (a >= b) {
          for (int64_t j = j0; j < j1; ++j)
            for (int64_t i = i0; i < i1; ++i) d_e[j * a + i] = s_e[i * b + j];
        } else {
          for (int64_t i = i0; i < i1; ++i)
            for (int64_t j = j0; j < j1; ++j) d_e[j * a + i] = s_e[i * b + j];
        }
      }
    });
  });
  return dst;
}

// Adapter viewed as M_e(i, c) = src[e * sE + i * si + c * sc] (acc dtype), i < r, c < n ->
// column panels [ceil(n / kPanel), E, r, kPanel], zero-padded (see kernels.h).
Tensor pack_panels(const Tensor& src, int64_t E, int64_t r, int64_t n, int64_t sE, int64_t si,
                   int64_t sc) {
  const int64_t nb = ceil_div(n, cpu::kPanel);
  Tensor dst = at::empty({nb, E, r, cpu::kPanel}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "moelora_pack_panels", [&] {
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* out = dst.data_ptr<scalar_t>();
    at::parallel_for(0, nb * E, copy_grain(r * cpu::kPanel), [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t cb = it / E, e = it % E, c0 = cb * cpu::kPanel;
        const int64_t valid = std::min<int64_t>(cpu::kPanel, n - c0);
        scalar_t* d = out + it * r * cpu::kPanel;
        const scalar_t* s_e = in + e * sE + c0 * sc;
        if (sc == 1) {  // rows of the panel are runs of the source (GCC left the select scalar)
          for (int64_t i = 0; i < r; ++i) {
            std::memcpy(d + i * cpu::kPanel, s_e + i * si, valid * sizeof(scalar_t));
            std::fill(d + i * cpu::kPanel + valid, d + (i + 1) * cpu::kPanel, scalar_t(0));
          }
        } else {  // B: a panel row per rank, gathered down the source's columns
          for (int64_t i = 0; i < r; ++i) {
            scalar_t* di = d + i * cpu::kPanel;
            const scalar_t* si_e = s_e + i * si;
            for (int64_t cc = 0; cc < valid; ++cc) di[cc] = si_e[cc * sc];
            for (int64_t cc = valid; cc < cpu::kPanel; ++cc) di[cc] = scalar_t(0);
          }
        }
      }
    });
  });
  return dst;
}

// bf16 adapter viewed as in pack_panels -> rank-pair panels [ceil(n / kPanel), E, ceil(r / 2),
// kPanel, 2] (kernels.h, ExpandPairsArgs), zero-padded in the columns and the odd rank.
Tensor pack_pairs(const Tensor& src, int64_t E, int64_t r, int64_t n, int64_t sE, int64_t si,
                  int64_t sc) {
  TORCH_INTERNAL_ASSERT(src.scalar_type() == at::kBFloat16 && src.is_contiguous());
  const int64_t nb = ceil_div(n, cpu::kPanel), rp = ceil_div(r, 2);
  Tensor dst = at::zeros({nb, E, rp, cpu::kPanel, 2}, src.options());
  const uint16_t* in = reinterpret_cast<const uint16_t*>(src.data_ptr<at::BFloat16>());
  uint16_t* out = reinterpret_cast<uint16_t*>(dst.data_ptr<at::BFloat16>());
  at::parallel_for(0, nb * E, copy_grain(r * cpu::kPanel), [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t cb = it / E, e = it % E, c0 = cb * cpu::kPanel;
      const int64_t valid = std::min<int64_t>(cpu::kPanel, n - c0);
      uint16_t* d = out + it * rp * cpu::kPanel * 2;
      const uint16_t* s_e = in + e * sE + c0 * sc;
      // rank by rank: with ranks innermost, A's 16 source rows 2 KiB apart shared L1 sets, and
      // B's panel writes went to 8 lines at once (as pack_panels)
      for (int64_t i = 0; i < r; ++i)
        for (int64_t cc = 0; cc < valid; ++cc) d[((i / 2) * cpu::kPanel + cc) * 2 + i % 2] = s_e[i * si + cc * sc];
    }
  });
  return dst;
}

uint32_t bf16_bits(float v) { return c10::BFloat16(v).x; }  // nearest even, as ATen rounds

void round_to_bf16(Tensor& z) {  // fp32 values rounded to bf16, in place
  float* p = z.data_ptr<float>();
  for (int64_t i = 0; i < z.numel(); ++i) p[i] = static_cast<float>(c10::BFloat16(p[i]));
}

// z [T, k, r] (fp32) as bf16 rank pairs [T * k, ceil(r / 2)] (ExpandPairsArgs::Z), 0 past r.
Tensor rank_pairs(const Tensor& z) {
  const int64_t slots = z.size(0) * z.size(1), r = z.size(2), rp = ceil_div(r, 2);
  Tensor out = at::empty({slots, rp}, z.options().dtype(at::kInt));
  const float* zp = z.data_ptr<float>();
  uint32_t* op = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  // in parallel: the calling thread alone converting T k r values left the other one waiting
  // (perf: ~1-3% of a bf16 T=1024 training step between rank_pairs and slot_pairs)
  at::parallel_for(0, slots, copy_grain(r), [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s)
      for (int64_t p = 0; p < rp; ++p) {
        const float lo = 2 * p < r ? zp[s * r + 2 * p] : 0.f;
        const float hi = 2 * p + 1 < r ? zp[s * r + 2 * p + 1] : 0.f;
        op[s * rp + p] = bf16_bits(lo) | bf16_bits(hi) << 16;
      }
  });
  return out;
}

// z [T, k, r] (fp32) as bf16 slot pairs by expert (OuterPairsArgs::Z); pair_offsets filled.
Tensor slot_pairs(const Tensor& z, const Routing& rt, int64_t E, std::vector<int64_t>& pair_offsets) {
  const int64_t r = z.size(2);
  pair_offsets.assign(E + 1, 0);
  for (int64_t e = 0; e < E; ++e)
    pair_offsets[e + 1] = pair_offsets[e] + ceil_div(rt.offsets[e + 1] - rt.offsets[e], 2);
  Tensor out = at::empty({pair_offsets[E], r}, z.options().dtype(at::kInt));
  const float* zp = z.data_ptr<float>();
  uint32_t* op = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const int64_t per_expert = ceil_div(std::max<int64_t>(pair_offsets[E], 1), E) * 2 * r;
  at::parallel_for(0, E, copy_grain(per_expert), [&](int64_t e_begin, int64_t e_end) {
    for (int64_t e = e_begin; e < e_end; ++e)
      for (int64_t q = 0; q < pair_offsets[e + 1] - pair_offsets[e]; ++q) {
        const int64_t b = rt.offsets[e] + 2 * q;
        const float* z0 = zp + rt.order[b] * r;
        const float* z1 = b + 1 < rt.offsets[e + 1] ? zp + rt.order[b + 1] * r : nullptr;
        uint32_t* o = op + (pair_offsets[e] + q) * r;
        for (int64_t i = 0; i < r; ++i) o[i] = bf16_bits(z0[i]) | (z1 ? bf16_bits(z1[i]) << 16 : 0u);
      }
  });
  return out;
}

// Y_t += sum_j M_{e(t,j)}^T Z[t, j]. panels from pack_panels (E experts, rank r, n columns),
// Z [T, k, r] (acc), Y [T, n] in place.
void run_expand(const cpu::KernelTable& kt, const Tensor& panels, const Tensor& Z,
                const Tensor& idx, Tensor& Y) {
  const int64_t E = panels.size(1), r = panels.size(2), n = Y.size(1);
  const int64_t T = idx.size(0), k = idx.size(1);
  if (T == 0 || n == 0) return;
  const ExpandBlocks blocks = expand_blocks(T, n);
  cpu::ExpandArgs a{dtype_of(panels), dtype_of(Y), panels.data_ptr(), Z.data_ptr(),
                    idx.data_ptr<int64_t>(), Y.data_ptr(), T, E, r, n, k,
                    blocks.tokens, blocks.cols, blocks.token_blocks};
  const int64_t macs = blocks.tokens * k * r * std::min(n, blocks.cols);
  at::parallel_for(0, blocks.items, grain_for(macs), [&](int64_t b, int64_t e) { kt.expand(a, b, e); });
}

// Y_t += sum_j B_{e(t,j)} Z[t, j] reading B [E, n, r] as stored (a few tokens: see kernels.h).
void run_expand_direct(const cpu::KernelTable& kt, const Tensor& B, const Tensor& Z,
                       const Tensor& idx, Tensor& Y) {
  const int64_t r = B.size(2), n = Y.size(1), T = idx.size(0), k = idx.size(1);
  if (T == 0 || n == 0) return;
  const int64_t cols = kExpandCols;
  cpu::ExpandDirectArgs a{dtype_of(Z), dtype_of(B), dtype_of(Y), B.data_ptr(), Z.data_ptr(),
                          idx.data_ptr<int64_t>(), Y.data_ptr(), r, n, k, cols};
  const int64_t items = T * ceil_div(n, cols);
  // each item streams its k slots' rows of B (at most kDirectMaxSlotsPerExpert slots share one)
  at::parallel_for(0, items, grain_for(k * r * std::min(n, cols), kMinStreamingTaskMacs),
                   [&](int64_t b, int64_t e) { kt.expand_direct(a, b, e); });
}

// G_e = sum over slots of e of Z[slot] X_t^T: G [E, r, n] (acc), written in full.
Tensor run_outer(const cpu::KernelTable& kt, const Tensor& Z, const Tensor& X, const Routing& rt,
                 int64_t E, int64_t r, int64_t n, int64_t k, at::ScalarType acc) {
  Tensor G = at::empty({E, r, n}, X.options().dtype(acc));
  if (n == 0) return G;
  cpu::OuterArgs a{dtype_of(G), dtype_of(X), Z.data_ptr(), X.data_ptr(), G.data_ptr(),
                   rt.order.data(), rt.tokens.data(), rt.offsets.data(), E, r, n, k, kOuterCols};
  const int64_t items = ceil_div(n, kOuterCols) * E;
  const int64_t macs = ceil_div(static_cast<int64_t>(rt.order.size()), E) * r * std::min(n, kOuterCols);
  at::parallel_for(0, items, grain_for(macs), [&](int64_t b, int64_t e) { kt.outer(a, b, e); });
  return G;
}

// run_expand on the pair layouts: pairs from pack_pairs, z [T, k, r] fp32, Y [T, n] bf16.
void run_expand_pairs(const cpu::KernelTable& kt, const Tensor& pairs, const Tensor& z,
                      const Tensor& idx, Tensor& Y) {
  const int64_t E = pairs.size(1), rp = pairs.size(2), n = Y.size(1);
  const int64_t T = idx.size(0), k = idx.size(1);
  if (T == 0 || n == 0) return;
  const Tensor zp = rank_pairs(z);
  const ExpandBlocks blocks = expand_blocks(T, n);
  cpu::ExpandPairsArgs a{reinterpret_cast<const uint16_t*>(pairs.data_ptr<at::BFloat16>()),
                         reinterpret_cast<const uint32_t*>(zp.data_ptr<int32_t>()),
                         idx.data_ptr<int64_t>(), reinterpret_cast<uint16_t*>(Y.data_ptr<at::BFloat16>()),
                         T, E, rp, n, k, blocks.tokens, blocks.cols, blocks.token_blocks};
  const int64_t macs = blocks.tokens * k * 2 * rp * std::min(n, blocks.cols);
  at::parallel_for(0, blocks.items, grain_for(macs), [&](int64_t b, int64_t e) { kt.expand_pairs(a, b, e); });
}

// run_outer on the pair layouts: z [T, k, r] fp32, X [T, n] bf16; G [E, r, n] fp32.
Tensor run_outer_pairs(const cpu::KernelTable& kt, const Tensor& z, const Tensor& X,
                       const Routing& rt, int64_t E, int64_t r, int64_t n, int64_t k) {
  Tensor G = at::empty({E, r, n}, X.options().dtype(at::kFloat));
  if (n == 0) return G;
  std::vector<int64_t> pair_offsets;
  const Tensor zp = slot_pairs(z, rt, E, pair_offsets);
  cpu::OuterPairsArgs a{reinterpret_cast<const uint32_t*>(zp.data_ptr<int32_t>()),
                        reinterpret_cast<const uint16_t*>(X.data_ptr<at::BFloat16>()),
                        G.data_ptr<float>(), rt.tokens.data(), rt.offsets.data(), pair_offsets.data(),
                        E, r, n, k, kOuterCols};
  const int64_t items = ceil_div(n, kOuterCols) * E;
  const int64_t macs = ceil_div(static_cast<int64_t>(rt.order.size()), E) * r * std::min(n, kOuterCols);
  at::parallel_for(0, items, grain_for(macs), [&](int64_t b, int64_t e) { kt.outer_pairs(a, b, e); });
  return G;
}

void check_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
               const Tensor& lora_a, const Tensor& lora_b, const Tensor& idx, const Tensor& gates) {
  for (const Tensor* t : {&x, &weight, &lora_a, &lora_b, &idx, &gates})
    TORCH_CHECK(t->device().is_cpu(), "moelora.cpu ops take CPU tensors, got ", t->device());
  TORCH_CHECK(!bias.has_value() || bias->device().is_cpu(), "moelora.cpu: bias must be on the CPU");
  check_contract(x, weight, bias, lora_a, lora_b, idx, gates);
}

// ---------------------------------------------------------------------------------------------
// the adapters in the kernels' layouts (cached, see AdapterCache)
// ---------------------------------------------------------------------------------------------
// An adapter the kernels read as stored (acc dtype, or bf16 under fp32 accumulation, row-major)
// is used in place: A [E, r, d_in] by the forward shrink, B [E, d_out, r] by expand_direct.
// Anything else (fp16) is converted, cached where it may be.
Tensor adapter_as_read(const Tensor& adapter, at::ScalarType acc) {
  if (kernel_reads(adapter.scalar_type(), acc) && adapter.is_contiguous()) return adapter;
  return adapter_cache().get(adapter, Layout::acc, acc, [&] { return adapter.to(acc).contiguous(); });
}

// B_e as [r, d_out] column panels (element (i, c) at B[e][c][i]): the forward expand's operand.
Tensor b_panels(const Tensor& lora_b, at::ScalarType acc) {
  return adapter_cache().get(lora_b, Layout::panels_b, acc, [&] {
    const Tensor B = lora_b.to(acc).contiguous();
    const int64_t E = B.size(0), d_out = B.size(1), r = B.size(2);
    return pack_panels(B, E, r, d_out, d_out * r, 1, r);
  });
}

// B^T [E, r, d_out]: the backward shrink's operand (u = B_e^T dy), in B's dtype where the
// kernels read it (bf16: half the bytes, and the bf16 dot-product shrink).
Tensor b_transposed(const Tensor& lora_b, at::ScalarType acc) {
  return adapter_cache().get(lora_b, Layout::transposed, acc, [&] {
    const at::ScalarType st = kernel_reads(lora_b.scalar_type(), acc) ? lora_b.scalar_type() : acc;
    return transpose_last2(lora_b.to(st).contiguous());
  });
}

// A_e as [r, d_in] column panels: the backward expand's operand (dx += A_e^T s g u).
Tensor a_panels(const Tensor& lora_a, at::ScalarType acc) {
  return adapter_cache().get(lora_a, Layout::panels_a, acc, [&] {
    const Tensor A = lora_a.to(acc).contiguous();
    const int64_t E = A.size(0), r = A.size(1), d_in = A.size(2);
    return pack_panels(A, E, r, d_in, r * d_in, d_in, 1);
  });
}

// B_e and A_e as rank-pair panels (pack_pairs): expand's operands on the bf16 dot-product path.
Tensor b_pairs(const Tensor& lora_b) {
  return adapter_cache().get(lora_b, Layout::pairs_b, at::kFloat, [&] {
    const Tensor B = lora_b.contiguous();
    const int64_t E = B.size(0), d_out = B.size(1), r = B.size(2);
    return pack_pairs(B, E, r, d_out, d_out * r, 1, r);
  });
}

Tensor a_pairs(const Tensor& lora_a) {
  return adapter_cache().get(lora_a, Layout::pairs_a, at::kFloat, [&] {
    const Tensor A = lora_a.contiguous();
    const int64_t E = A.size(0), r = A.size(1), d_in = A.size(2);
    return pack_pairs(A, E, r, d_in, r * d_in, d_in, 1);
  });
}

// Whether the bf16 dot-product kernels take this call: all of `ts` bf16 under fp32
// accumulation, on an AVX-512 BF16 table. Products of bf16 are exact in fp32 and vdpbf16ps
// adds them in fp32; what changes is that z (s g h, s g u) is rounded to bf16 before expand /
// outer, as the torch path's bf16 matmuls round h and u.
bool bf16_pairs(const cpu::KernelTable& kt, at::ScalarType acc, std::initializer_list<const Tensor*> ts) {
  if (kt.expand_pairs == nullptr || acc != at::kFloat) return false;
  for (const Tensor* t : ts)
    if (t->scalar_type() != at::kBFloat16) return false;
  return true;
}

bool cacheable(const Tensor& t) { return AdapterCache::cacheable_tensor(t); }

// z = s g h for every slot, and h = 0 for unrouted ones (the shrink leaves them unwritten).
void scale_slots(Tensor& h, const Tensor& gates, const Tensor& idx, double scaling, Tensor& z) {
  const int64_t n = idx.numel(), r = h.size(2);
  const int64_t* ip = idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "moelora_scale_slots", [&] {
    scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* gp = gates.data_ptr<scalar_t>();
    for (int64_t s = 0; s < n; ++s) {
      const scalar_t c = gp[s] * static_cast<scalar_t>(scaling);
      for (int64_t i = 0; i < r; ++i) {
        if (ip[s] < 0) hp[s * r + i] = 0;
        zp[s * r + i] = c * hp[s * r + i];
      }
    }
  });
}


// ---------------------------------------------------------------------------------------------
// route: routed kernels, or the dense rank-space GEMMs through ATen
// ---------------------------------------------------------------------------------------------
// Dense route: h_all = x A_all^T ([T, E r], one GEMM), the gated slots scattered into a
// [T, E r] matrix Z, then y += Z B_all^T (one GEMM into y). E / k times the routed FLOPs, but on
// MKL / oneDNN: with bf16 on AMX those GEMMs run ~3.6x faster than fp32 FMA kernels can, and at
// small T they skip the kernels' per-call layout of trainable adapters. Same precision rules as
// the torch backend (matmuls in the operands' shared dtype, fp32 accumulation inside them).
// In fp32 the routed kernels won every interleaved measurement (T = 4 to 1024, forward and
// training, by 10-25%, on a 2-core AMD EPYC), so auto routes fp32 through them; bf16 goes
// dense on bf16 hardware, except where the AVX-512 BF16 kernels beat it (dense_by_cost).
constexpr int64_t kDenseMinTokensBf16 = 4;
constexpr int64_t kDenseMaxExpertsPerSlot = 4;
constexpr int64_t kDirectMaxSlotsPerExpert = 8;

enum class Route : int { automatic = 0, dense = 1, routed = 2 };
std::atomic<int> g_route{-1};  // -1: not read yet from MOELORA_CPU_ROUTE

Route parse_route(const std::string& name) {
  if (name == "auto") return Route::automatic;
  if (name == "dense") return Route::dense;
  if (name == "routed") return Route::routed;
  TORCH_CHECK_VALUE(false, "moelora: unknown CPU route '", name,
                    "', expected 'auto', 'dense' or 'routed' (MOELORA_CPU_ROUTE / set_cpu_route)");
}

Route active_route() {
  int v = g_route.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* env = std::getenv("MOELORA_CPU_ROUTE");
    v = static_cast<int>(env != nullptr && env[0] != '\0' ? parse_route(env) : Route::automatic);
    g_route.store(v, std::memory_order_relaxed);
  }
  return static_cast<Route>(v);
}

const char* route_name(Route r) {
  switch (r) {
    case Route::dense: return "dense";
    case Route::routed: return "routed";
    default: return "auto";
  }
}

// Measured choice (benchmarks/NOTES.md, "CPU routes"): thresholds above.
// A forward whose expand reads B as stored (expand_direct) beat the dense GEMMs in bf16 too.
// With the bf16 dot-product kernels (`pairs`) the routed forward won at every T and the routed
// backward from kDenseMaxTokensPairs tokens; below, the dense GEMMs tie or win the backward.
// Where every slot's expert set is all of them (E <= k: plain LoRA) the dense GEMMs do no extra
// work, and oneDNN's run nearer the bf16 peak than the pair kernels (E = 1, T = 1024, bf16,
// interleaved: forward 1.085x against 1.11x, fwd+bwd 1.15-1.17x against 1.17x).
constexpr int64_t kDenseMaxTokensPairs = 128;

bool dense_by_cost(bool bf16_matmul, bool pairs, bool direct, bool backward, int64_t T, int64_t E,
                   int64_t k) {
  if (!bf16_matmul || direct || T < kDenseMinTokensBf16 || E > kDenseMaxExpertsPerSlot * k) return false;
  if (pairs) return E <= k || (backward && T < kDenseMaxTokensPairs);
  return true;
}

// `direct`: the routed forward would take expand_direct.
bool dense_route(const cpu::KernelTable& kt, const Tensor& x, const Tensor& lora_a, int64_t T,
                 int64_t E, int64_t k, at::ScalarType acc, bool direct, bool backward) {
  const at::ScalarType st = x.scalar_type();
  if (acc != at::kFloat || lora_a.scalar_type() != st || (st != at::kFloat && st != at::kBFloat16))
    return false;
  const Route route = active_route();
  if (route != Route::automatic) return route == Route::dense;
  return dense_by_cost(st == at::kBFloat16 && cpu::has_bf16_matmul(), kt.expand_pairs != nullptr,
                       direct, backward, T, E, k);
}

// B_all [d_out, E r]: column e r + i is B_e[:, i] (one copy of the adapter per call).
Tensor b_flat(const Tensor& lora_b) {
  const int64_t E = lora_b.size(0), d_out = lora_b.size(1), r = lora_b.size(2);
  return lora_b.permute({1, 0, 2}).reshape({d_out, E * r});
}

// Per slot: picks the slot's r columns of `all` [T, E r] into `slots` [T, k, r] (acc, 0 where
// unrouted) and adds c * slots into the expert's columns of `dense` [T, E r] (acc, zeroed), with
// c = s g (duplicate ids add up, as in the reference).
void gather_scatter_slots(const Tensor& all, const Tensor& gates, const Tensor& idx, double scaling,
                          Tensor& slots, Tensor& dense) {
  const int64_t T = idx.size(0), k = idx.size(1), r = slots.size(2), Er = all.size(1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const float* gp = gates.data_ptr<float>();
  float* sp = slots.data_ptr<float>();
  float* dp = dense.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, all.scalar_type(), "moelora_dense_slots", [&] {
    const scalar_t* ap = all.data_ptr<scalar_t>();
    at::parallel_for(0, T, grain_for(k * r * 4), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t)
        for (int64_t j = 0; j < k; ++j) {
          const int64_t s = t * k + j, ex = ip[s];
          float* out = sp + s * r;
          if (ex < 0) {
            for (int64_t i = 0; i < r; ++i) out[i] = 0;
            continue;
          }
          const float c = gp[s] * static_cast<float>(scaling);
          const scalar_t* in = ap + t * Er + ex * r;
          float* d = dp + t * Er + ex * r;
          for (int64_t i = 0; i < r; ++i) {
            out[i] = static_cast<float>(in[i]);
            d[i] += c * out[i];
          }
        }
    });
  });
}

std::tuple<Tensor, Tensor> dense_forward(const Tensor& x, const Tensor& weight,
                                         const std::optional<Tensor>& bias, const Tensor& lora_a,
                                         const Tensor& lora_b, const Tensor& idx,
                                         const Tensor& gates, double scaling) {
  const int64_t T = x.size(0), E = lora_a.size(0), r = lora_a.size(1), k = idx.size(1);
  const Tensor A_all = lora_a.reshape({E * r, lora_a.size(2)});
  Tensor y = at::linear(x, weight, bias);
  const Tensor h_all = at::mm(x, A_all.t());  // [T, E r], x.dtype
  Tensor h = at::empty({T, k, r}, gates.options());
  Tensor z = at::zeros({T, E * r}, gates.options());
  gather_scatter_slots(h_all, gates, idx, scaling, h, z);
  y.addmm_(z.to(x.scalar_type()), b_flat(lora_b).t());
  return {y, h};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dense_backward(
    const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& lora_a,
    const Tensor& lora_b, const Tensor& idx, const Tensor& gates, const Tensor& h, double scaling,
    bool compute_grad_x, bool compute_grad_adapters) {
  const int64_t T = x.size(0), d_in = x.size(1), d_out = weight.size(0);
  const int64_t E = lora_a.size(0), r = lora_a.size(1), k = idx.size(1);
  const at::ScalarType st = x.scalar_type();
  const Tensor u_all = at::mm(dy, b_flat(lora_b));  // [T, E r]: B_e^T dy_t for every expert
  Tensor u = at::empty({T, k, r}, gates.options());
  Tensor zu = at::zeros({T, E * r}, gates.options());  // s g u by expert column
  gather_scatter_slots(u_all, gates, idx, scaling, u, zu);
  const Tensor hk = h.contiguous();
  const Tensor grad_gates = (u * hk).sum(-1).mul_(scaling);
  const Tensor zu_st = zu.to(st);

  Tensor grad_a = at::empty({0}, lora_a.options()), grad_b = at::empty({0}, lora_b.options());
  if (compute_grad_adapters) {
    // s g h by expert column, from the saved slots (no second pass over x)
    Tensor zh = at::zeros({T, E * r}, gates.options());
    {
      const int64_t* ip = idx.data_ptr<int64_t>();
      const float* gp = gates.data_ptr<float>();
      const float* hp = hk.data_ptr<float>();
      float* zp = zh.data_ptr<float>();
      at::parallel_for(0, T, grain_for(k * r * 4), [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t)
          for (int64_t j = 0; j < k; ++j) {
            const int64_t s = t * k + j, ex = ip[s];
            if (ex < 0) continue;
            const float c = gp[s] * static_cast<float>(scaling);
            for (int64_t i = 0; i < r; ++i) zp[t * E * r + ex * r + i] += c * hp[s * r + i];
          }
      });
    }
    grad_b = at::mm(zh.to(st).t(), dy).view({E, r, d_out}).transpose(1, 2).contiguous();
    grad_a = at::mm(zu_st.t(), x).view({E, r, d_in});
  }
  Tensor grad_x = at::empty({0}, x.options());
  if (compute_grad_x) {
    grad_x = at::mm(dy, weight);
    grad_x.addmm_(zu_st, lora_a.reshape({E * r, d_in}));
  }
  return {grad_x, grad_a.to(lora_a.scalar_type()), grad_b.to(lora_b.scalar_type()), grad_gates};
}
}  // namespace

std::string cpu_route() { return route_name(active_route()); }

std::string set_cpu_route(const std::string& name) {
  const std::string previous = cpu_route();
  g_route.store(static_cast<int>(parse_route(name)));
  return previous;
}

std::string cpu_isa() { return isa_name(active_isa()); }

std::string set_cpu_isa(const std::string& name) {
  const std::string previous = isa_name(active_isa());
  g_isa.store(static_cast<int>(capped(parse_isa(name))), std::memory_order_relaxed);
  return previous;
}

std::string compiled_cpu_isas() { return cpu::compiled_isas(); }

void clear_cpu_cache() { adapter_cache().clear(); }

std::vector<int64_t> cpu_cache_stats() { return adapter_cache().stats(); }

std::tuple<Tensor, Tensor> cpu_forward(const Tensor& x, const Tensor& weight,
                                       const std::optional<Tensor>& bias, const Tensor& lora_a,
                                       const Tensor& lora_b, const Tensor& expert_indices,
                                       const Tensor& expert_weights, double scaling) {
  check_cpu(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights);
  const int64_t T = x.size(0), E = lora_a.size(0), r = lora_a.size(1);
  const int64_t k = expert_indices.size(1);
  const at::ScalarType acc = expert_weights.scalar_type();
  const Tensor idx = expert_indices.contiguous();
  const cpu::KernelTable& kt = cpu::kernel_table(active_isa());
  check_expert_range(idx, E);
  // Adapters that cannot be cached (trainable, inference tensors) with up to
  // kDirectMaxSlotsPerExpert slots an expert: B is read as stored by expand_direct instead of
  // being laid out in panels per call (T = 4-32 at E = 8, k = 2: 1.1-1.2x base against
  // 1.3-1.6x with the per-call layout, fp32; the panels win from ~16 slots an expert).
  const bool direct =
      !(cacheable(lora_a) && cacheable(lora_b)) && T * k <= kDirectMaxSlotsPerExpert * E;
  if (dense_route(kt, x, lora_a, T, E, k, acc, direct, /*backward=*/false)) {
    return dense_forward(x, weight, bias, lora_a.contiguous(), lora_b.contiguous(), idx,
                         expert_weights.contiguous(), scaling);
  }

  Tensor y = at::linear(x, weight, bias);  // [T, d_out], x.dtype
  Tensor h = at::empty({T, k, r}, expert_weights.options());

  const Tensor A = adapter_as_read(lora_a, acc);
  const Routing rt = sort_slots(idx, E);  // also checks the ids' range
  if (rt.order.empty()) return {y, h.zero_()};

  const Tensor xk = token_operand(x, acc);
  run_shrink(kt, A, xk, rt, k, h);
  Tensor z = at::empty_like(h);
  scale_slots(h, expert_weights.contiguous(), idx, scaling, z);  // s g h
  Tensor yk = token_operand(y, acc);
  const bool pairs = bf16_pairs(kt, acc, {&lora_b, &yk});
  // expand_pairs multiplies z as bf16 (rank_pairs rounds it); expand_direct then uses the same
  // rounded z, so that the output does not depend on which expand a call takes (trainable
  // adapters or not). Only that path rounds here: a serial pass over T k r values.
  if (pairs && direct) round_to_bf16(z);
  if (direct) run_expand_direct(kt, adapter_as_read(lora_b, acc), z, idx, yk);
  else if (pairs) run_expand_pairs(kt, b_pairs(lora_b), z, idx, yk);
  else run_expand(kt, b_panels(lora_b, acc), z, idx, yk);
  if (!yk.is_same(y)) y = yk.to(x.scalar_type());
  return {y, h};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cpu_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& lora_a,
    const Tensor& lora_b, const Tensor& expert_indices, const Tensor& expert_weights,
    const Tensor& h, double scaling, bool compute_grad_x, bool compute_grad_adapters) {
  check_cpu(x, weight, std::nullopt, lora_a, lora_b, expert_indices, expert_weights);
  const int64_t T = x.size(0), d_in = x.size(1), d_out = weight.size(0);
  const int64_t E = lora_a.size(0), r = lora_a.size(1), k = expert_indices.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == T && grad_out.size(1) == d_out,
              "moelora: grad_out must be [T, d_out]");
  TORCH_CHECK(h.dim() == 3 && h.size(0) == T && h.size(1) == k && h.size(2) == r,
              "moelora: h must be [T, k, r]");
  const at::ScalarType acc = expert_weights.scalar_type();
  const Tensor idx = expert_indices.contiguous();
  const cpu::KernelTable& kt = cpu::kernel_table(active_isa());
  if (dense_route(kt, x, lora_a, T, E, k, acc, /*direct=*/false, /*backward=*/true)) {
    check_expert_range(idx, E);
    return dense_backward(grad_out.contiguous(), x.contiguous(), weight.contiguous(),
                          lora_a.contiguous(), lora_b.contiguous(), idx,
                          expert_weights.contiguous(), h, scaling, compute_grad_x,
                          compute_grad_adapters);
  }
  const Routing rt = sort_slots(idx, E);

  const Tensor dy = grad_out.contiguous();
  const Tensor dyk = token_operand(dy, acc);
  const Tensor xk = token_operand(x, acc);
  const Tensor hk = h.to(acc).contiguous();

  Tensor u = at::empty({T, k, r}, expert_weights.options());  // B_e^T dy_t
  if (!rt.order.empty()) run_shrink(kt, b_transposed(lora_b, acc), dyk, rt, k, u);
  // One pass over the slots: u = 0 where unrouted, the gate gradient s <u, h>, s g h, s g u.
  Tensor grad_gates = at::empty({T, k}, expert_weights.options());
  Tensor zh = at::empty_like(u), zu = at::empty_like(u);
  {
    const int64_t n = T * k;
    const int64_t* ip = idx.data_ptr<int64_t>();
    const Tensor g = expert_weights.contiguous();
    AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "moelora_bwd_slots", [&] {
      scalar_t* up = u.data_ptr<scalar_t>();
      const scalar_t* hp = hk.data_ptr<scalar_t>();
      const scalar_t* gp = g.data_ptr<scalar_t>();
      scalar_t* dgp = grad_gates.data_ptr<scalar_t>();
      scalar_t* zhp = zh.data_ptr<scalar_t>();
      scalar_t* zup = zu.data_ptr<scalar_t>();
      const scalar_t s = static_cast<scalar_t>(scaling);
      // in parallel: T k r updates (32 K at T=1024, k=2, r=16) ran on one thread while the other waited
      at::parallel_for(0, n, copy_grain(4 * r), [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const scalar_t c = gp[t] * s;
          scalar_t dot = 0;
          for (int64_t i = 0; i < r; ++i) {
            if (ip[t] < 0) up[t * r + i] = 0;
            dot += up[t * r + i] * hp[t * r + i];
            zhp[t * r + i] = c * hp[t * r + i];
            zup[t * r + i] = c * up[t * r + i];
          }
          dgp[t] = dot * s;
        }
      });
    });
  }

  Tensor grad_a = at::empty({0}, lora_a.options()), grad_b = at::empty({0}, lora_b.options());
  if (compute_grad_adapters) {
    const bool pairs = bf16_pairs(kt, acc, {&dyk, &xk});
    const Tensor dBt = pairs ? run_outer_pairs(kt, zh, dyk, rt, E, r, d_out, k)
                             : run_outer(kt, zh, dyk, rt, E, r, d_out, k, acc);  // [E, r, d_out]
    const Tensor dA = pairs ? run_outer_pairs(kt, zu, xk, rt, E, r, d_in, k)
                            : run_outer(kt, zu, xk, rt, E, r, d_in, k, acc);     // [E, r, d_in]
    grad_b = transpose_last2(dBt).to(lora_b.scalar_type());
    grad_a = dA.to(lora_a.scalar_type()).contiguous();
  }

  Tensor grad_x;
  if (compute_grad_x) {
    grad_x = at::mm(dy.to(weight.scalar_type()), weight);  // [T, d_in], x.dtype
    if (!rt.order.empty()) {
      Tensor dxk = token_operand(grad_x, acc);
      if (bf16_pairs(kt, acc, {&lora_a, &dxk})) run_expand_pairs(kt, a_pairs(lora_a), zu, idx, dxk);
      else run_expand(kt, a_panels(lora_a, acc), zu, idx, dxk);
      if (!dxk.is_same(grad_x)) grad_x = dxk.to(x.scalar_type());
    }
  } else {
    grad_x = at::empty({0}, x.options());
  }
  return {grad_x, grad_a, grad_b, grad_gates};
}

TORCH_LIBRARY_IMPL(moelora, CPU, m) {
  m.impl("molora_linear_native_fwd", &cpu_forward);
  m.impl("molora_linear_native_bwd", &cpu_backward);
}

}  // namespace moelora
