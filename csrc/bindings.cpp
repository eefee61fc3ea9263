// Schemas of the compiled ops and the Python module `moelora._C`.
//
// Importing moelora._C registers torch.ops.moelora.{cpu,cuda}_{forward,backward}; the Python
// side (moelora/extension.py) adds their fake implementations. The namespace is shared with the
// ops that Python defines through torch.library.custom_op, hence a FRAGMENT. The cuda_* schemas
// exist only in CUDA builds, so that `hasattr(torch.ops.moelora, "cuda_forward")` tells whether
// the CUDA backend was compiled.
#include <torch/extension.h>
#include <torch/library.h>

#include "molora.h"

#define MOELORA_FORWARD_ARGS                                                             \
  "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "              \
  "Tensor expert_indices, Tensor expert_weights, float scaling) -> (Tensor, Tensor)"
#define MOELORA_BACKWARD_ARGS                                                            \
  "(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "           \
  "Tensor expert_indices, Tensor expert_weights, Tensor h, float scaling, "             \
  "bool compute_grad_x, bool compute_grad_adapters) -> (Tensor, Tensor, Tensor, Tensor)"

TORCH_LIBRARY_FRAGMENT(moelora, m) {
  m.def("cpu_forward" MOELORA_FORWARD_ARGS);
  m.def("cpu_backward" MOELORA_BACKWARD_ARGS);
#ifdef MOELORA_WITH_CUDA
  m.def("cuda_forward" MOELORA_FORWARD_ARGS);
  m.def("cuda_backward" MOELORA_BACKWARD_ARGS);
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moelora compiled ops (registered under torch.ops.moelora on import)";
  m.def("cpu_isa", &moelora::cpu_isa,
        "Instruction set the CPU kernels use now: 'avx512', 'avx2' or 'base'.");
  m.def("set_cpu_isa", &moelora::set_cpu_isa, pybind11::arg("name"),
        "Use instruction set `name` (capped at what the CPU supports); returns the previous one.");
  m.def("compiled_cpu_isas", &moelora::compiled_cpu_isas,
        "Instruction sets compiled into this build, comma-separated.");
#ifdef MOELORA_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
