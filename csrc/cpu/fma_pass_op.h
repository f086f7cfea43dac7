// The host side of the CPU ops whose kernels are fma_blocks.h passes (softmax.cpp:
// softmax_online_state; nce_shared.cpp: nce_shared_nce_pass, nce_shared_lse_pass): one argument
// check, the optional row selection (index) and one call into the avx2 or avx512 build for the
// rows' dtype. Include after
// kernel_variants.h (the macro names its cpu_avx2 / cpu_avx512 namespaces).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstring>
#include <optional>
#include <string>
#include <type_traits>

#include "../checks.h"
#include "capability.h"

namespace instdisc {

// features (B, D) float32, non-empty; rows (N, D) float32, bfloat16 or float16 (checks::bank), both
// on CPU; the avx2 CPU capability or better. Errors name op and the rows' argument name.
inline void check_fma_pass(const at::Tensor& features, const at::Tensor& rows, const char* op, const char* rows_name) {
  checks::bank(rows, c10::DeviceType::CPU, rows_name);
  const std::string owner = std::string(rows_name) + (rows_name[std::strlen(rows_name) - 1] == 's' ? "'" : "'s");
  INSTDISC_CHECK_VALUE(
      features.device().is_cpu() && features.dim() == 2 && features.size(0) > 0 && features.size(1) == rows.size(1), op,
      ": features must be a non-empty CPU (B, D) tensor with the ", owner, " D = ", rows.size(1), ", got shape ",
      features.sizes());
  INSTDISC_CHECK_TYPE(features.scalar_type() == at::kFloat, op, ": features must be float32, got ",
                      features.scalar_type());
  const auto t = rows.scalar_type();
  INSTDISC_CHECK_TYPE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op, ": ", rows_name,
                      " must be float32, bfloat16 or float16, got ", t);
  INSTDISC_CHECK_VALUE(cpu::capability() != cpu::Capability::kDefault, op,
                       " needs the avx2 CPU capability or better, this process runs ",
                       cpu::capability_name(cpu::capability()));
}

// The rows a pass reads: with index (K,) int64 on CPU, rows[index[j]] for j < K (every value checked
// to lie in [0, N), N = rows.size(0)); without it, all N rows in order.
struct FmaSelection {
  at::Tensor index;  // contiguous, or undefined
  const int64_t* ptr = nullptr;
  int64_t count = 0;
};

inline FmaSelection fma_selection(const std::optional<at::Tensor>& index, const at::Tensor& rows, const char* op) {
  FmaSelection s;
  s.count = rows.size(0);
  if (!index.has_value()) return s;
  const at::Tensor& t = *index;
  INSTDISC_CHECK_VALUE(t.device().is_cpu() && t.dim() == 1, op, ": index must be a 1-D CPU tensor, got shape ",
                       t.sizes(), " on ", t.device());
  INSTDISC_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": index must be int64, got ", t.scalar_type());
  s.index = t.contiguous();
  s.ptr = s.index.data_ptr<int64_t>();
  s.count = t.size(0);
  checks::index_values(s.ptr, s.count, rows.size(0), "index");
  return s;
}

}  // namespace instdisc

// Runs the statement(s) with `cap` naming the chosen capability's namespace and `g` the rows'
// data (const scalar_t*), for rows of float32, bfloat16 or float16 (after check_fma_pass).
#if defined(INSTDISC_CPU_VARIANTS)
#define INSTDISC_FMA_PASS(rows, NAME, ...)                                                  \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), NAME, [&] { \
    if constexpr (!std::is_same_v<scalar_t, double>) {                                      \
      const auto* g = rows.data_ptr<scalar_t>();                                            \
      if (cpu::capability() == cpu::Capability::kAvx2) {                                    \
        namespace cap = cpu_avx2;                                                           \
        __VA_ARGS__;                                                                        \
      } else {                                                                              \
        namespace cap = cpu_avx512;                                                         \
        __VA_ARGS__;                                                                        \
      }                                                                                     \
    }                                                                                       \
  })
#else
#define INSTDISC_FMA_PASS(rows, NAME, ...) \
  INSTDISC_CHECK_VALUE(false, NAME, ": no per-capability CPU kernels in this build")
#endif
