// The compiled ops of moelora (schemas in bindings.cpp, CPU kernels in cpu/, CUDA in cuda/).
//
// Contract (same for cpu_* and cuda_*; inputs validated and contiguous by moelora.ops):
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

#include <optional>
#include <string>
#include <tuple>

namespace moelora {

using at::Tensor;

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

}  // namespace moelora
