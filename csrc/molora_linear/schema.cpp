// The native ops of the core op, defined once; kernels register per dispatch key:
// cpu/molora_cpu.cpp (CPU, every build) and cuda/molora_cuda.cu (CUDA, CUDA builds only), so
// torch's dispatcher picks the kernel from the tensors' device and no op name carries a
// device. The contract is in molora_linear.h; the fake (meta) implementations are the Python
// op's own (moelora/ops/molora_linear/op.py, attached by moelora/ops/extension.py).
//
// The namespace is shared with the ops Python defines through torch.library.custom_op, hence
// a FRAGMENT.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(moelora, m) {
  m.def(
      "molora_linear_native_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, "
      "Tensor lora_b, Tensor expert_indices, Tensor expert_weights, float scaling) "
      "-> (Tensor, Tensor)");
  m.def(
      "molora_linear_native_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, "
      "Tensor lora_b, Tensor expert_indices, Tensor expert_weights, Tensor h, float scaling, "
      "bool compute_grad_x, bool compute_grad_adapters) -> (Tensor, Tensor, Tensor, Tensor)");
  // y alone, differentiable: the two ops above under a C++ autograd function (autograd.cpp)
  m.def(
      "molora_linear_native(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, "
      "Tensor lora_b, Tensor expert_indices, Tensor expert_weights, float scaling) -> Tensor");
}
