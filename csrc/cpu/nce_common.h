// Shared host side of the CPU NCE ops (csrc/cpu/nce.cpp: nce_forward; csrc/cpu/nce_probs.cpp: the
// NCEAverage ops): argument/Z helpers and NceArgs, and the kernels of nce_kernels.h compiled once
// per CPU capability (instdisc::cpu_default / cpu_avx2 / cpu_avx512, see capability.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../checks.h"
#include "../philox.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace instdisc {
namespace {

constexpr double kEps = 1e-7;  // lemniscate's NCECriterion eps
// Beyond |log P| > 80 the NCE terms take their asymptotic forms (dropping terms below e^-60
// relative, also in fp64), so exp(log P) never overflows fp32.
constexpr double kLogPLimit = 80;

// z as a finite double (<= 0: estimate Z from the batch); z's device and dtype are checked before.
inline double z_value(const at::Tensor& z) {
  const double v = z.item<double>();
  INSTDISC_CHECK_VALUE(std::isfinite(v), "z must be finite (<= 0: estimate Z from the batch), got ", v);
  return v;
}

// (1,) float32 holding Z (inf when Z exceeds the float32 range; the kernels work with log Z).
inline at::Tensor z_tensor(double z, const at::Tensor& like) {
  auto t = at::empty({1}, like.options().dtype(at::kFloat));
  t.data_ptr<float>()[0] = static_cast<float>(z);
  return t;
}

inline at::ScalarType acc_dtype(const at::Tensor& features) {
  return features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// memory with unit column stride (rows may be strided); copies only an unusual layout.
inline at::Tensor row_major(const at::Tensor& memory) { return memory.stride(1) == 1 ? memory : memory.contiguous(); }

// Z = N * mean(exp(t)) over B*(K+1) logits t, from per-row maxima and sums of exp(t - max):
// returns log Z (robust to exp overflow), combining rows serially (deterministic).
inline double log_z_estimate(const std::vector<double>& row_max, const std::vector<double>& row_sum, int64_t N,
                             int64_t count) {
  double M = -std::numeric_limits<double>::infinity();
  for (double m : row_max) M = std::max(M, m);
  double total = 0;
  for (size_t b = 0; b < row_max.size(); ++b) total += row_sum[b] * std::exp(row_max[b] - M);
  return std::log(static_cast<double>(N)) + M + std::log(total) - std::log(static_cast<double>(count));
}

// Calls run(acc_t(0)) with acc_t = double for a float64 accumulation dtype, else float.
template <typename Run>
inline void with_acc(at::ScalarType acc, Run&& run) {
  if (acc == at::kDouble) {
    run(double(0));
  } else {
    run(float(0));
  }
}

// The loss from the per-row terms, summed serially (independent of the thread count).
inline at::Tensor total_loss(const std::vector<double>& row_loss, const at::Tensor& features, at::ScalarType acc) {
  double total = 0;
  for (double l : row_loss) total += l;
  return at::scalar_tensor(total, features.options().dtype(acc));
}

struct NceArgs {
  int64_t B, D, N, K, row_stride;
  const int64_t* y;    // (B)
  const int64_t* neg;  // (B, K) or nullptr: draw in-kernel
  uint64_t seed;
  bool exclude_positive;
  const float* noise;  // (N) or nullptr: Pn = 1/N
  double T, proximal;
  int64_t loss_type;
  const int64_t* idx_full = nullptr;  // (B, K+1) full index matrix (nce_probs_loss), else nullptr
  int64_t* bad = nullptr;  // (B) or nullptr: per batch row, the first bank row whose score is not finite, or -1
};

}  // namespace
}  // namespace instdisc

#define INSTDISC_KERNELS "nce_kernels.h"
#include "kernel_variants.h"
