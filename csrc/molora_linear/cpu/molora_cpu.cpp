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
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1,
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
    at::parallel_for(0, E * ab * bb, 16, [&](int64_t begin, int64_t end) {
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
    at::parallel_for(0, nb * E, 4, [&](int64_t begin, int64_t end) {
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
  at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) { kt.expand(a, b, e); });
}

// G_e = sum over slots of e of Z[slot] X_t^T: G [E, r, n] (acc), written in full.
Tensor run_outer(const cpu::KernelTable& kt, const Tensor& Z, const Tensor& X, const Routing& rt,
                 int64_t E, int64_t r, int64_t n, int64_t k, at::ScalarType acc) {
  Tensor G = at::empty({E, r, n}, X.options().dtype(acc));
  if (n == 0) return G;
  cpu::OuterArgs a{dtype_of(G), dtype_of(X), Z.data_ptr(), X.data_ptr(), G.data_ptr(),
                   rt.order.data(), rt.offsets.data(), E, r, n, k, kOuterCols};
  const int64_t items = ceil_div(n, kOuterCols) * E;
  at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) { kt.outer(a, b, e); });
  return G;
}

void check_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
               const Tensor& lora_a, const Tensor& lora_b, const Tensor& idx, const Tensor& gates) {
  for (const Tensor* t : {&x, &weight, &lora_a, &lora_b, &idx, &gates})
    TORCH_CHECK(t->device().is_cpu(), "moelora.cpu ops take CPU tensors, got ", t->device());
  TORCH_CHECK(!bias.has_value() || bias->device().is_cpu(), "moelora.cpu: bias must be on the CPU");
  check_contract(x, weight, bias, lora_a, lora_b, idx, gates);
}

}  // namespace

std::string cpu_isa() { return isa_name(active_isa()); }

std::string set_cpu_isa(const std::string& name) {
  const std::string previous = isa_name(active_isa());
  g_isa.store(static_cast<int>(capped(parse_isa(name))), std::memory_order_relaxed);
  return previous;
}

std::string compiled_cpu_isas() { return cpu::compiled_isas(); }

std::tuple<Tensor, Tensor> cpu_forward(const Tensor& x, const Tensor& weight,
                                       const std::optional<Tensor>& bias, const Tensor& lora_a,
                                       const Tensor& lora_b, const Tensor& expert_indices,
                                       const Tensor& expert_weights, double scaling) {
  check_cpu(x, weight, bias, lora_a, lora_b, expert_indices, expert_weights);
  const int64_t T = x.size(0), E = lora_a.size(0), r = lora_a.size(1);
  const int64_t k = expert_indices.size(1);
  const at::ScalarType acc = expert_weights.scalar_type();
  const Tensor idx = expert_indices.contiguous();
  const Routing rt = sort_slots(idx, E);
  const cpu::KernelTable& kt = cpu::kernel_table(active_isa());

  Tensor y = at::linear(x, weight, bias);  // [T, d_out], x.dtype
  Tensor h = at::zeros({T, k, r}, expert_weights.options());
  if (rt.order.empty()) return {y, h};

  const Tensor xk = token_operand(x, acc);
  const Tensor A = lora_a.to(acc).contiguous();  // [E, r, d_in]
  const Tensor B = lora_b.to(acc).contiguous();  // [E, d_out, r]
  run_shrink(kt, A, xk, rt, k, h);
  const Tensor z = h * (expert_weights.contiguous() * scaling).unsqueeze(-1);  // s g h
  Tensor yk = token_operand(y, acc);
  const int64_t d_out = B.size(1);
  // B_e as [r, d_out]: element (i, c) at B[e][c][i]
  run_expand(kt, pack_panels(B, E, r, d_out, d_out * r, 1, r), z, idx, yk);
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
  const Tensor A = lora_a.to(acc).contiguous();                     // [E, r, d_in]
  const Tensor Bt = transpose_last2(lora_b.to(acc).contiguous());    // [E, r, d_out]
  const Tensor hk = h.to(acc).contiguous();

  Tensor u = at::zeros({T, k, r}, expert_weights.options());  // B_e^T dy_t
  run_shrink(kt, Bt, dyk, rt, k, u);
  const Tensor coef = (expert_weights.contiguous() * scaling).unsqueeze(-1);
  Tensor grad_gates = (u * hk).sum(-1).mul_(scaling);
  const Tensor zh = hk * coef;  // s g h
  const Tensor zu = u * coef;   // s g u

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
      run_expand(kt, pack_panels(A, E, r, d_in, r * d_in, d_in, 1), zu, idx, dxk);
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
