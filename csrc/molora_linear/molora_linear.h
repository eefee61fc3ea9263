// The core op's native kernels (schema in schema.cpp, CPU kernels in cpu/, CUDA in cuda/).
//
// Contract (same for the CPU and CUDA kernels; inputs validated and contiguous by moelora.ops):
//   forward(x [T, d_in], weight [d_out, d_in], bias [d_out]?, lora_a [E, r, d_in],
//           lora_b [E, d_out, r], expert_indices [T, k] int64 in [-1, E),
//           expert_weights [T, k] accumulate dtype, scaling)
//     -> y [T, d_out] (x.dtype), h [T, k, r] (expert_weights.dtype; A_e x_t, 0 where e = -1)
//   backward(grad_out [T, d_out], x, weight, lora_a, lora_b, expert_indices, expert_weights,
//            h [T, k, r], scaling, compute_grad_x, compute_grad_adapters)
//     -> grad_x [T, d_in] (x.dtype; shape [0] when !compute_grad_x), grad_lora_a (like lora_a),
//        grad_lora_b (like lora_b) (both shape [0] when !compute_grad_adapters: frozen experts,
//        e.g. HoE router training, skip the two weight-gradient passes over x and dy),
//        grad_expert_weights (like expert_weights)
// The accumulate dtype is float32, or float64 when x or the adapters are float64.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace moelora {

using at::Tensor;

// Shapes and dtypes of the contract above, shared by both backends (each checks devices itself).
// The Python layer validates first with friendlier messages; this guards direct op calls.
inline void check_contract(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                           const Tensor& lora_a, const Tensor& lora_b, const Tensor& idx,
                           const Tensor& gates) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && lora_a.dim() == 3 && lora_b.dim() == 3 &&
                  idx.dim() == 2 && gates.dim() == 2,
              "moelora: expected x [T, d_in], weight [d_out, d_in], lora_a [E, r, d_in], "
              "lora_b [E, d_out, r], expert_indices / expert_weights [T, k]");
  const int64_t T = x.size(0), d_in = x.size(1), d_out = weight.size(0);
  const int64_t E = lora_a.size(0), r = lora_a.size(1);
  TORCH_CHECK(weight.size(1) == d_in && lora_a.size(2) == d_in, "moelora: d_in mismatch");
  TORCH_CHECK(lora_b.size(0) == E && lora_b.size(1) == d_out && lora_b.size(2) == r,
              "moelora: lora_b must be [E, d_out, r]");
  TORCH_CHECK(E >= 1 && r >= 1, "moelora: need E >= 1 and r >= 1");
  TORCH_CHECK(idx.size(0) == T && gates.sizes() == idx.sizes(),
              "moelora: expert_indices and expert_weights must both be [T, k]");
  TORCH_CHECK(idx.scalar_type() == at::kLong, "moelora: expert_indices must be int64");
  TORCH_CHECK(gates.scalar_type() == at::kFloat || gates.scalar_type() == at::kDouble,
              "moelora: expert_weights must be float32 or float64 (the accumulate dtype)");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "moelora: weight must have x's dtype");
  TORCH_CHECK(lora_a.scalar_type() == lora_b.scalar_type(), "moelora: lora_a / lora_b dtypes differ");
  if (bias.has_value()) {  // CUDA's decode kernel reads bias[0, d_out) as x's type
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d_out, "moelora: bias must be [d_out]");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "moelora: bias must have x's dtype");
  }
}

std::tuple<Tensor, Tensor> cpu_forward(const Tensor& x, const Tensor& weight,
                                       const std::optional<Tensor>& bias, const Tensor& lora_a,
                                       const Tensor& lora_b, const Tensor& expert_indices,
                                       const Tensor& expert_weights, double scaling);

std::tuple<Tensor, Tensor, Tensor, Tensor> cpu_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& lora_a,
    const Tensor& lora_b, const Tensor& expert_indices, const Tensor& expert_weights,
    const Tensor& h, double scaling, bool compute_grad_x, bool compute_grad_adapters);

#ifdef MOELORA_WITH_CUDA
// Same contract on CUDA tensors (csrc/cuda/molora_cuda.cu).
std::tuple<Tensor, Tensor> cuda_forward(const Tensor& x, const Tensor& weight,
                                        const std::optional<Tensor>& bias, const Tensor& lora_a,
                                        const Tensor& lora_b, const Tensor& expert_indices,
                                        const Tensor& expert_weights, double scaling);

std::tuple<Tensor, Tensor, Tensor, Tensor> cuda_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& lora_a,
    const Tensor& lora_b, const Tensor& expert_indices, const Tensor& expert_weights,
    const Tensor& h, double scaling, bool compute_grad_x, bool compute_grad_adapters);
#endif

// Instruction set the CPU kernels use now ("avx512", "avx2" or "base"). The default is the best
// this machine supports, lowered by the environment variable MOELORA_CPU_ISA.
std::string cpu_isa();
// Use `name` (capped at what the machine supports); returns the previous name. For tests.
std::string set_cpu_isa(const std::string& name);
// Instruction sets compiled into this build, comma-separated.
std::string compiled_cpu_isas();
// The CPU kernels' cache of adapter layouts (molora_cpu.cpp, AdapterCache): empty it; and its
// [entries, bytes, hits, misses] since the process started.
void clear_cpu_cache();
// The CPU backend's route: "auto" (measured thresholds), "dense" or "routed" (tests, tuning).
std::string cpu_route();
std::string set_cpu_route(const std::string& name);
std::vector<int64_t> cpu_cache_stats();

}  // namespace moelora
