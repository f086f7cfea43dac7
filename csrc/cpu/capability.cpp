// Choice of the CPU capability (capability.h): once, at load time, from cpuid and the
// INSTDISC_CPU_CAPABILITY cap.
#include "capability.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace instdisc {
namespace cpu {
namespace {

Capability detect() {
#if defined(INSTDISC_CPU_VARIANTS)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  if (!avx2) return Capability::kDefault;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (!avx512) return Capability::kAvx2;
  return __builtin_cpu_supports("avx512bf16") ? Capability::kAvx512Bf16 : Capability::kAvx512;
#else
  return Capability::kDefault;
#endif
}

Capability choose() {
  Capability c = detect();
  const char* env = std::getenv("INSTDISC_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return c;
  for (int i = 0; i <= static_cast<int>(Capability::kAvx512Bf16); ++i) {
    const Capability cap = static_cast<Capability>(i);
    if (std::strcmp(env, capability_name(cap)) == 0) return cap < c ? cap : c;  // a cap, never a raise
  }
  std::fprintf(stderr,
               "instdisc_kernels: ignoring INSTDISC_CPU_CAPABILITY=%s (expected default, avx2, avx512 or "
               "avx512_bf16); using %s\n",
               env, capability_name(c));
  return c;
}

// Chosen while the library loads (static initialisation), so every kernel sees the same value.
const Capability kChosenAtLoad = capability();

}  // namespace

Capability capability() {
  static const Capability c = choose();
  return c;
}

const char* capability_name(Capability c) {
  switch (c) {
    case Capability::kAvx2:
      return "avx2";
    case Capability::kAvx512:
      return "avx512";
    case Capability::kAvx512Bf16:
      return "avx512_bf16";
    default:
      return "default";
  }
}

}  // namespace cpu
}  // namespace instdisc
