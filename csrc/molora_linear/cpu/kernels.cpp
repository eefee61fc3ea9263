// Compiles kernels_impl.h once per x86-64 instruction set and picks one at run time.
//
// Wheels must run on any x86-64 machine, so the build uses no -march flag; instead the AVX2
// and AVX-512 copies are compiled under `#pragma GCC target` in namespaces of their own and
// chosen with __builtin_cpu_supports (which also checks that the OS saves the wide registers).
// Measured on a 2-core AVX-512 machine (T=256, d=1024, E=8, r=16, k=2, fp32, best of 30, whole
// op with a 1-wide base GEMM): shrink-only 0.23 / 0.24 / 0.34 ms and expand-only 0.21 / 0.22 /
// 0.39 ms for AVX-512 / AVX2 / SSE2; the wide copies are worth ~1.5-2x on the LoRA part.
#include "kernels.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>  // std::integer_sequence (kernels_impl.h)

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(MOELORA_CPU_BASE_ONLY)
#define MOELORA_MULTI_ISA 1
#endif

#ifdef MOELORA_MULTI_ISA
#include <immintrin.h>  // the AVX-512 BF16 intrinsics, usable under the target pragma below

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() and warn about it once inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// AVX-512 with bf16 dot products: the AVX-512 copy, plus vdpbf16ps kernels for bf16 x bf16.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2")
#define MOELORA_NS avx512bf16
#define MOELORA_VB 64
#define MOELORA_SHRINK_TB 4
#define MOELORA_SHRINK_RB 4
#define MOELORA_EXPAND_NV 4
#define MOELORA_OUTER_RI 8
#define MOELORA_OUTER_NV 2
#define MOELORA_DPBF16 1
#include "kernels_impl.h"
namespace moelora { namespace cpu { namespace avx512bf16 {
const KernelTable kTable = {"avx512bf16", VB, shrink_entry, expand_entry, expand_direct_entry,
                            outer_entry, expand_pairs_entry, outer_pairs_entry};
}}}  // namespace moelora::cpu::avx512bf16
#undef MOELORA_NS
#undef MOELORA_VB
#undef MOELORA_SHRINK_TB
#undef MOELORA_SHRINK_RB
#undef MOELORA_EXPAND_NV
#undef MOELORA_OUTER_RI
#undef MOELORA_OUTER_NV
#undef MOELORA_DPBF16
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
#define MOELORA_NS avx512
#define MOELORA_VB 64
#define MOELORA_SHRINK_TB 4
#define MOELORA_SHRINK_RB 4
#define MOELORA_EXPAND_NV 4
#define MOELORA_OUTER_RI 8
#define MOELORA_OUTER_NV 2
#include "kernels_impl.h"
namespace moelora { namespace cpu { namespace avx512 {
const KernelTable kTable = {"avx512", VB, shrink_entry, expand_entry, expand_direct_entry, outer_entry,
                            nullptr, nullptr};
}}}  // namespace moelora::cpu::avx512
#undef MOELORA_NS
#undef MOELORA_VB
#undef MOELORA_SHRINK_TB
#undef MOELORA_SHRINK_RB
#undef MOELORA_EXPAND_NV
#undef MOELORA_OUTER_RI
#undef MOELORA_OUTER_NV
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#define MOELORA_NS avx2
#define MOELORA_VB 32
#define MOELORA_SHRINK_TB 4
#define MOELORA_SHRINK_RB 2
#define MOELORA_EXPAND_NV 4
#define MOELORA_OUTER_RI 4
#define MOELORA_OUTER_NV 2
#include "kernels_impl.h"
namespace moelora { namespace cpu { namespace avx2 {
const KernelTable kTable = {"avx2", VB, shrink_entry, expand_entry, expand_direct_entry, outer_entry,
                            nullptr, nullptr};
}}}  // namespace moelora::cpu::avx2
#undef MOELORA_NS
#undef MOELORA_VB
#undef MOELORA_SHRINK_TB
#undef MOELORA_SHRINK_RB
#undef MOELORA_EXPAND_NV
#undef MOELORA_OUTER_RI
#undef MOELORA_OUTER_NV
#pragma GCC pop_options
#pragma GCC diagnostic pop
#endif  // MOELORA_MULTI_ISA

// Baseline copy: SSE2 on x86-64, NEON on aarch64, whatever the compiler targets elsewhere.
#define MOELORA_NS base
#define MOELORA_VB 16
#define MOELORA_SHRINK_TB 4
#define MOELORA_SHRINK_RB 2
#define MOELORA_EXPAND_NV 4
#define MOELORA_OUTER_RI 4
#define MOELORA_OUTER_NV 2
#include "kernels_impl.h"
namespace moelora { namespace cpu { namespace base {
const KernelTable kTable = {"base", VB, shrink_entry, expand_entry, expand_direct_entry, outer_entry,
                            nullptr, nullptr};
}}}  // namespace moelora::cpu::base

namespace moelora {
namespace cpu {

bool has_bf16_matmul() {
#ifdef MOELORA_MULTI_ISA
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#else
  return false;
#endif
}

Isa detect_isa() {
#ifdef MOELORA_MULTI_ISA
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return __builtin_cpu_supports("avx512bf16") ? Isa::avx512bf16 : Isa::avx512;
  if (avx2) return Isa::avx2;
#endif
  return Isa::base;
}

const KernelTable& kernel_table(Isa isa) {
#ifdef MOELORA_MULTI_ISA
  if (isa == Isa::avx512bf16) return avx512bf16::kTable;
  if (isa == Isa::avx512) return avx512::kTable;
  if (isa == Isa::avx2) return avx2::kTable;
#else
  (void)isa;
#endif
  return base::kTable;
}

const char* compiled_isas() {
#ifdef MOELORA_MULTI_ISA
  return "avx512bf16,avx512,avx2,base";
#else
  return "base";
#endif
}

}  // namespace cpu
}  // namespace moelora
