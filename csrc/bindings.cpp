// The Python module `moelora._C`. Importing it registers the native ops (each op's schema.cpp,
// kernels per dispatch key); this file adds the module's own functions (CPU instruction set
// controls) and `with_cuda`, which says whether CUDA kernels were compiled in.
#include <torch/extension.h>

#include "molora_linear/molora_linear.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moelora compiled ops (registered under torch.ops.moelora on import)";
  m.def("cpu_isa", &moelora::cpu_isa,
        "Instruction set the CPU kernels use now: 'avx512', 'avx2' or 'base'.");
  m.def("set_cpu_isa", &moelora::set_cpu_isa, pybind11::arg("name"),
        "Use instruction set `name` (capped at what the CPU supports); returns the previous one.");
  m.def("compiled_cpu_isas", &moelora::compiled_cpu_isas,
        "Instruction sets compiled into this build, comma-separated.");
  m.def("clear_cpu_cache", &moelora::clear_cpu_cache,
        "Empty the CPU kernels' cache of adapter layouts (keyed on storage + version counter).");
  m.def("cpu_route", &moelora::cpu_route,
        "The CPU backend's route: 'auto' (measured thresholds), 'dense' or 'routed'.");
  m.def("set_cpu_route", &moelora::set_cpu_route, pybind11::arg("name"),
        "Force the CPU backend's route ('auto', 'dense', 'routed'); returns the previous one.");
  m.def("cpu_cache_stats", &moelora::cpu_cache_stats,
        "The CPU adapter cache's [entries, bytes, hits, misses].");
#ifdef MOELORA_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
