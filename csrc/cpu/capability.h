// The CPU capability the CPU kernels run with: chosen once, when the library loads, from what the
// CPU supports (cpuid), capped by the environment variable INSTDISC_CPU_CAPABILITY (read once;
// "default" | "avx2" | "avx512" | "avx512_bf16", like ATen's ATEN_CPU_CAPABILITY). The library is
// compiled for the x86-64 baseline; the hot kernels are compiled once per capability in their own
// translation unit (kernel_variants.h) and picked through INSTDISC_CPU_DISPATCH.
//   default      x86-64 baseline (SSE2), and every non-x86 CPU
//   avx2         AVX2 + FMA + F16C
//   avx512       avx2 + AVX-512 F/BW/VL/DQ
//   avx512_bf16  avx512 + AVX512-BF16 (knn_topk's bf16 prefilter; the other kernels run avx512)
#pragma once

// Per-capability kernel builds need GCC's target pragmas on x86-64 (clang, other CPUs: baseline only).
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(INSTDISC_NO_CPU_VARIANTS)
#define INSTDISC_CPU_VARIANTS 1
#endif

namespace instdisc {
namespace cpu {

enum class Capability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// The capability in use (computed on first call; the library calls it while loading).
Capability capability();
// Its name: "default", "avx2", "avx512" or "avx512_bf16".
const char* capability_name(Capability c);

}  // namespace cpu
}  // namespace instdisc

// Calls EXPR with the namespace alias `cap` naming the kernels compiled for the capability in use:
//   INSTDISC_CPU_DISPATCH(cap::nce_kernel<bank_t, acc_t>(args...));
// (avx512_bf16 uses the avx512 build: only knn_topk has a bf16 path, chosen inside it.)
#if defined(INSTDISC_CPU_VARIANTS)
#define INSTDISC_CPU_DISPATCH(...)                     \
  [&]() -> decltype(auto) {                            \
    switch (::instdisc::cpu::capability()) {           \
      case ::instdisc::cpu::Capability::kAvx512:       \
      case ::instdisc::cpu::Capability::kAvx512Bf16: { \
        namespace cap = ::instdisc::cpu_avx512;        \
        return __VA_ARGS__;                            \
      }                                                \
      case ::instdisc::cpu::Capability::kAvx2: {       \
        namespace cap = ::instdisc::cpu_avx2;          \
        return __VA_ARGS__;                            \
      }                                                \
      default: {                                       \
        namespace cap = ::instdisc::cpu_default;       \
        return __VA_ARGS__;                            \
      }                                                \
    }                                                  \
  }()
#else
#define INSTDISC_CPU_DISPATCH(...)           \
  [&]() -> decltype(auto) {                  \
    namespace cap = ::instdisc::cpu_default; \
    return __VA_ARGS__;                      \
  }()
#endif
