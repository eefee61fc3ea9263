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
#include <cstdlib>
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
    case cpu::Isa::avx512: return "avx512";
    case cpu::Isa::avx2: return "avx2";
    default: return "base";
  }
}

cpu::Isa parse_isa(const std::string& name) {
  if (name == "avx512") return cpu::Isa::avx512;
  if (name == "avx2") return cpu::Isa::avx2;
  if (name == "base") return cpu::Isa::base;
  TORCH_CHECK(false, "moelora: unknown CPU instruction set '", name,
              "', expected one of 'avx512', 'avx2', 'base'");
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
  std::vector<int64_t> offsets;  // [E + 1]
};

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
enum class Layout : int { acc = 0, transposed = 1, panels_b = 2, panels_a = 3 };

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
int64_t grain_for(int64_t macs_per_item) {
  return std::max<int64_t>(1, kMinTaskMacs / std::max<int64_t>(1, macs_per_item));
}

// Runs of at most `chunk` slots of one expert: the shrink's parallel work items. 16 slots is
// four register blocks of tokens, enough to reuse the expert's rows from L1/L2, while T * k = 512
// still gives 32 items to balance over the threads.
constexpr int64_t kShrinkChunk = 16;
// Expand items: 256 columns (4 panels) x 64 tokens. Outer items: 128 columns of one expert.
constexpr int64_t kExpandCols = 256;
constexpr int64_t kExpandTokens = 64;
constexpr int64_t kOuterCols = 128;
static_assert(kExpandCols % cpu::kPanel == 0, "expand items hold whole panels");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// out[slot, :] = M_e X_t for every routed slot. M [E, r, n] (acc), X [T, n], out [T*k, r] (acc).
void run_shrink(const cpu::KernelTable& kt, const Tensor& M, const Tensor& X, const Routing& rt,
                int64_t k, Tensor& out) {
  const int64_t E = M.size(0), r = M.size(1), n = M.size(2);
  std::vector<cpu::SlotRange> items;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t b = rt.offsets[e]; b < rt.offsets[e + 1]; b += kShrinkChunk)
      items.push_back({e, b, std::min(b + kShrinkChunk, rt.offsets[e + 1])});
  if (items.empty()) return;
  cpu::ShrinkArgs a{dtype_of(M), dtype_of(X), M.data_ptr(), X.data_ptr(), out.data_ptr(),
                    rt.order.data(), items.data(), r, n, k};
  const int64_t per_item = ceil_div(static_cast<int64_t>(rt.order.size()), static_cast<int64_t>(items.size()));
  at::parallel_for(0, static_cast<int64_t>(items.size()), grain_for(per_item * r * n),
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
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "moelora_transpose", [&] {
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* out = dst.data_ptr<scalar_t>();
    at::parallel_for(0, E * ab * bb, grain_for(kBlock * kBlock), [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t e = it / (ab * bb), i0 = (it / bb) % ab * kBlock, j0 = it % bb * kBlock;
        const scalar_t* s_e = in + e * a * b;
        scalar_t* d_e = out + e * a * b;
        for (int64_t i = i0; i < std::min(i0 + kBlock, a); ++i)
          for (int64_t j = j0; j < std::min(j0 + kBlock, b); ++j) d_e[j * a + i] = s_e[i * b + j];
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
    at::parallel_for(0, nb * E, grain_for(r * cpu::kPanel), [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t cb = it / E, e = it % E, c0 = cb * cpu::kPanel;
        const int64_t valid = std::min<int64_t>(cpu::kPanel, n - c0);
        scalar_t* d = out + it * r * cpu::kPanel;
        const scalar_t* s_e = in + e * sE + c0 * sc;
        if (sc == 1) {
          for (int64_t i = 0; i < r; ++i)
            for (int64_t cc = 0; cc < cpu::kPanel; ++cc)
              d[i * cpu::kPanel + cc] = cc < valid ? s_e[i * si + cc] : scalar_t(0);
        } else {  // walk the source in memory order (ranks fastest)
          for (int64_t i = 0; i < r; ++i)
            for (int64_t cc = valid; cc < cpu::kPanel; ++cc) d[i * cpu::kPanel + cc] = scalar_t(0);
          for (int64_t cc = 0; cc < valid; ++cc)
            for (int64_t i = 0; i < r; ++i) d[i * cpu::kPanel + cc] = s_e[cc * sc + i * si];
        }
      }
    });
  });
  return dst;
}

// Y_t += sum_j M_{e(t,j)}^T Z[t, j]. panels from pack_panels (E experts, rank r, n columns),
// Z [T, k, r] (acc), Y [T, n] in place.
void run_expand(const cpu::KernelTable& kt, const Tensor& panels, const Tensor& Z,
                const Tensor& idx, Tensor& Y) {
  const int64_t E = panels.size(1), r = panels.size(2), n = Y.size(1);
  const int64_t T = idx.size(0), k = idx.size(1);
  if (T == 0 || n == 0) return;
  const int64_t token_blocks = ceil_div(T, kExpandTokens);
  const int64_t items = ceil_div(n, kExpandCols) * token_blocks;
  cpu::ExpandArgs a{dtype_of(panels), dtype_of(Y), panels.data_ptr(), Z.data_ptr(),
                    idx.data_ptr<int64_t>(), Y.data_ptr(), T, E, r, n, k,
                    kExpandTokens, kExpandCols, token_blocks};
  const int64_t macs = std::min(T, kExpandTokens) * k * r * std::min(n, kExpandCols);
  at::parallel_for(0, items, grain_for(macs), [&](int64_t b, int64_t e) { kt.expand(a, b, e); });
}

// G_e = sum over slots of e of Z[slot] X_t^T: G [E, r, n] (acc), written in full.
Tensor run_outer(const cpu::KernelTable& kt, const Tensor& Z, const Tensor& X, const Routing& rt,
                 int64_t E, int64_t r, int64_t n, int64_t k, at::ScalarType acc) {
  Tensor G = at::empty({E, r, n}, X.options().dtype(acc));
  if (n == 0) return G;
  cpu::OuterArgs a{dtype_of(G), dtype_of(X), Z.data_ptr(), X.data_ptr(), G.data_ptr(),
                   rt.order.data(), rt.offsets.data(), E, r, n, k, kOuterCols};
  const int64_t items = ceil_div(n, kOuterCols) * E;
  const int64_t macs = ceil_div(static_cast<int64_t>(rt.order.size()), E) * r * std::min(n, kOuterCols);
  at::parallel_for(0, items, grain_for(macs), [&](int64_t b, int64_t e) { kt.outer(a, b, e); });
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
// A [E, r, d_in] in the accumulate dtype, row-major: the forward shrink's operand.
Tensor adapter_acc(const Tensor& lora_a, at::ScalarType acc) {
  if (lora_a.scalar_type() == acc && lora_a.is_contiguous()) return lora_a;
  return adapter_cache().get(lora_a, Layout::acc, acc, [&] { return lora_a.to(acc).contiguous(); });
}

// B_e as [r, d_out] column panels (element (i, c) at B[e][c][i]): the forward expand's operand.
Tensor b_panels(const Tensor& lora_b, at::ScalarType acc) {
  return adapter_cache().get(lora_b, Layout::panels_b, acc, [&] {
    const Tensor B = lora_b.to(acc).contiguous();
    const int64_t E = B.size(0), d_out = B.size(1), r = B.size(2);
    return pack_panels(B, E, r, d_out, d_out * r, 1, r);
  });
}

// B^T [E, r, d_out]: the backward shrink's operand (u = B_e^T dy).
Tensor b_transposed(const Tensor& lora_b, at::ScalarType acc) {
  return adapter_cache().get(lora_b, Layout::transposed, acc,
                             [&] { return transpose_last2(lora_b.to(acc).contiguous()); });
}

// A_e as [r, d_in] column panels: the backward expand's operand (dx += A_e^T s g u).
Tensor a_panels(const Tensor& lora_a, at::ScalarType acc) {
  return adapter_cache().get(lora_a, Layout::panels_a, acc, [&] {
    const Tensor A = lora_a.to(acc).contiguous();
    const int64_t E = A.size(0), r = A.size(1), d_in = A.size(2);
    return pack_panels(A, E, r, d_in, r * d_in, d_in, 1);
  });
}

// Where the adapters cannot be cached (inference tensors, cache off) and few experts are used
// (decode: T * k slots of E), only the used experts are laid out: `local_idx` maps the call's
// expert ids to rows of the packed subset, `used` lists them.
struct UsedExperts {
  std::vector<int64_t> used;
  Tensor local_idx;  // [T, k] ids into `used`, -1 kept
};

UsedExperts used_experts(const Tensor& idx, int64_t E) {
  UsedExperts u;
  const int64_t n = idx.numel();
  const int64_t* p = idx.data_ptr<int64_t>();
  std::vector<int64_t> slot(E, -1);
  u.local_idx = at::empty(idx.sizes(), idx.options());
  int64_t* q = u.local_idx.data_ptr<int64_t>();
  for (int64_t s = 0; s < n; ++s) {
    const int64_t e = p[s];
    TORCH_CHECK(e >= -1 && e < E, "moelora: expert_indices must lie in [-1, ", E, "), got ", e);
    if (e < 0) { q[s] = -1; continue; }
    if (slot[e] < 0) {
      slot[e] = static_cast<int64_t>(u.used.size());
      u.used.push_back(e);
    }
    q[s] = slot[e];
  }
  return u;
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

}  // namespace

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

  Tensor y = at::linear(x, weight, bias);  // [T, d_out], x.dtype
  Tensor h = at::empty({T, k, r}, expert_weights.options());

  // Adapters: cached layouts, or (uncacheable, few experts used) only the used experts' rows.
  const bool use_subset = !(cacheable(lora_a) && cacheable(lora_b)) && T * k < E;
  const UsedExperts ue = use_subset ? used_experts(idx, E) : UsedExperts{};
  Tensor A, P;
  Tensor kidx = idx;  // the ids the kernels see
  int64_t Ek = E;
  if (use_subset) {
    const Tensor sel = at::tensor(ue.used, idx.options());
    A = lora_a.index_select(0, sel).to(acc).contiguous();
    const Tensor B = lora_b.index_select(0, sel).to(acc).contiguous();
    Ek = B.size(0);
    const int64_t d_out = B.size(1);
    P = pack_panels(B, Ek, r, d_out, d_out * r, 1, r);
    kidx = ue.local_idx;
  } else {
    A = adapter_acc(lora_a, acc);
  }
  const Routing rt = sort_slots(kidx, Ek);  // also checks the ids' range
  if (rt.order.empty()) return {y, h.zero_()};
  if (!use_subset) P = b_panels(lora_b, acc);

  const Tensor xk = token_operand(x, acc);
  run_shrink(kt, A, xk, rt, k, h);
  Tensor z = at::empty_like(h);
  scale_slots(h, expert_weights.contiguous(), kidx, scaling, z);  // s g h
  Tensor yk = token_operand(y, acc);
  run_expand(kt, P, z, kidx, yk);
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
  const Routing rt = sort_slots(idx, E);
  const cpu::KernelTable& kt = cpu::kernel_table(active_isa());

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
      for (int64_t t = 0; t < n; ++t) {
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
  }

  Tensor grad_a = at::empty({0}, lora_a.options()), grad_b = at::empty({0}, lora_b.options());
  if (compute_grad_adapters) {
    const Tensor dBt = run_outer(kt, zh, dyk, rt, E, r, d_out, k, acc);  // [E, r, d_out]
    const Tensor dA = run_outer(kt, zu, xk, rt, E, r, d_in, k, acc);     // [E, r, d_in]
    grad_b = transpose_last2(dBt).to(lora_b.scalar_type());
    grad_a = dA.to(lora_a.scalar_type()).contiguous();
  }

  Tensor grad_x;
  if (compute_grad_x) {
    grad_x = at::mm(dy.to(weight.scalar_type()), weight);  // [T, d_in], x.dtype
    if (!rt.order.empty()) {
      Tensor dxk = token_operand(grad_x, acc);
      run_expand(kt, a_panels(lora_a, acc), zu, idx, dxk);
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
