// Compiles the kernel header named by INSTDISC_KERNELS once per CPU capability, in namespaces
// instdisc::cpu_default, cpu_avx2 and cpu_avx512 (see capability.h), within one translation unit:
//
//   #define INSTDISC_KERNELS "nce_kernels.h"
//   #include "kernel_variants.h"
//
// The kernel header holds only code (no #include, no include guard): its templates, lambdas and
// functions are defined inside each `#pragma GCC target` region, so they are compiled for that
// ISA (auto-vectorised for it, its intrinsics usable), while
// everything defined outside (ATen, the standard library) stays baseline code. Included once per
// translation unit. Without GCC-compatible target pragmas on x86-64, only cpu_default is built.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "capability.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#if !defined(INSTDISC_KERNELS)
#error "define INSTDISC_KERNELS (the kernel header) before including kernel_variants.h"
#endif

// In the kernel headers, INSTDISC_VARIANT_LEVEL is 0 (baseline), 1 (avx2) or 2 (avx512): GCC
// does not set __AVX2__ & co. under `#pragma GCC target` in C++.
#define INSTDISC_VARIANT_LEVEL 0
namespace instdisc {
namespace cpu_default {
#include INSTDISC_KERNELS
}  // namespace cpu_default
}  // namespace instdisc
#undef INSTDISC_VARIANT_LEVEL

#if defined(INSTDISC_CPU_VARIANTS)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define INSTDISC_VARIANT_LEVEL 1
namespace instdisc {
namespace cpu_avx2 {
#include INSTDISC_KERNELS
}  // namespace cpu_avx2
}  // namespace instdisc
#undef INSTDISC_VARIANT_LEVEL
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")
#define INSTDISC_VARIANT_LEVEL 2
namespace instdisc {
namespace cpu_avx512 {
#include INSTDISC_KERNELS
}  // namespace cpu_avx512
}  // namespace instdisc
#undef INSTDISC_VARIANT_LEVEL
#pragma GCC pop_options
#endif

#undef INSTDISC_KERNELS
