// Argument checks of every C++/CUDA op (csrc/cpu/*.cpp, csrc/cuda/*.cu): one vocabulary, so the
// same bad input raises the same Python exception with the same message on every backend, as
// instdisc_kernels/_validate.py does: TypeError for a wrong dtype (TORCH_CHECK_TYPE), ValueError
// for everything else (TORCH_CHECK_VALUE: shapes, devices, ranges, non-finite values).
//
// The Python layer validates first; these keep a direct torch.ops.instdisc call from crashing or
// reading out of bounds. Checks that read tensor values (index range, NaN/inf) run only where the
// data is on the host (the CPU kernels); the CUDA kernels check shapes, dtypes and devices.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

// A wrong dtype: TypeError in Python.
#define INSTDISC_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, __VA_ARGS__)
// Any other bad argument: ValueError in Python.
#define INSTDISC_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

namespace instdisc {
namespace checks {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// t lives where the memory bank does (the device the kernel runs on).
inline void same_device(const at::Tensor& t, const char* name, const at::Tensor& memory) {
  INSTDISC_CHECK_VALUE(t.device() == memory.device(), name, " must be on the memory bank's device ", memory.device(),
                       ", got ", t.device());
}

// The (N, D) memory bank of a kernel for device type `kernel` (CPU or CUDA).
inline void bank(const at::Tensor& memory, c10::DeviceType kernel, const char* name = "memory") {
  INSTDISC_CHECK_VALUE(memory.device().type() == kernel, name, " must be a ", c10::DeviceTypeName(kernel),
                       " tensor for this kernel, got device ", memory.device());
  INSTDISC_CHECK_VALUE(memory.dim() == 2 && memory.size(0) > 0 && memory.size(1) > 0, name,
                       " must be a non-empty 2-D (N, D) tensor, got shape ", memory.sizes());
  INSTDISC_CHECK_TYPE(is_float_dtype(memory.scalar_type()), name, " must be float32/float64/bfloat16/float16, got ",
                      memory.scalar_type());
}

// (B, D) float features with the bank's D.
inline void features(const at::Tensor& features, const at::Tensor& memory, const char* name = "features") {
  same_device(features, name, memory);
  INSTDISC_CHECK_VALUE(features.dim() == 2 && features.size(0) > 0 && features.size(1) == memory.size(1), name,
                       " must be a non-empty (B, D) tensor with D = memory.size(1) = ", memory.size(1), ", got shape ",
                       features.sizes());
  INSTDISC_CHECK_TYPE(is_float_dtype(features.scalar_type()), name, " must be float32/float64/bfloat16/float16, got ",
                      features.scalar_type());
}

inline void int64_dtype(const at::Tensor& t, const char* name) {
  INSTDISC_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be an int64 tensor, got ", t.scalar_type());
}

// A (B,) int64 index vector.
inline void index_vector(const at::Tensor& t, const char* name, int64_t B, const at::Tensor& memory) {
  same_device(t, name, memory);
  int64_dtype(t, name);
  INSTDISC_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, name, " must have shape (B=", B, ",), got ", t.sizes());
}

// A (B, cols) int64 index matrix (cols < 0: any number >= 1 of columns, named `what`).
inline void index_matrix(const at::Tensor& t, const char* name, int64_t B, int64_t cols, const char* what,
                         const at::Tensor& memory) {
  same_device(t, name, memory);
  int64_dtype(t, name);
  INSTDISC_CHECK_VALUE(t.dim() == 2 && t.size(0) == B && t.size(1) >= 1 && (cols < 0 || t.size(1) == cols), name,
                       " must have shape (B=", B, ", ", what, "), got ", t.sizes());
}

// Index values in [0, N) (host data only).
inline void index_values(const int64_t* p, int64_t n, int64_t N, const char* name) {
  for (int64_t i = 0; i < n; ++i)
    INSTDISC_CHECK_VALUE(p[i] >= 0 && p[i] < N, name, " contains ", p[i], " (flat position ", i, "), out of range [0, ",
                         N, ")");
}

// A one-element tensor (z, seed) on the bank's device.
inline void one_element(const at::Tensor& t, const char* name, const at::Tensor& memory) {
  same_device(t, name, memory);
  INSTDISC_CHECK_VALUE(t.numel() == 1, name, " must hold exactly one value, got shape ", t.sizes());
}

inline void z_tensor(const at::Tensor& z, const at::Tensor& memory) {
  one_element(z, "z", memory);
  INSTDISC_CHECK_TYPE(z.is_floating_point(), "z must be a floating tensor, got ", z.scalar_type());
}

inline void seed_tensor(const at::Tensor& seed, const at::Tensor& memory) {
  one_element(seed, "seed", memory);
  int64_dtype(seed, "seed");
}

inline void temperature(double T) {
  INSTDISC_CHECK_VALUE(std::isfinite(T) && T > 0, "temperature must be a positive finite number, got ", T);
}

inline void momentum(double m) { INSTDISC_CHECK_VALUE(m >= 0 && m < 1, "momentum must be in [0, 1), got ", m); }

// The scalar arguments of nce_forward.
inline void nce_scalars(int64_t num_negatives, bool has_neg, double temperature_, double proximal, int64_t loss_type,
                        double z_ema, bool exclude_positive, int64_t N) {
  temperature(temperature_);
  INSTDISC_CHECK_VALUE(std::isfinite(proximal) && proximal >= 0, "proximal must be a finite number >= 0, got ",
                       proximal);
  INSTDISC_CHECK_VALUE(loss_type == 0 || loss_type == 1, "loss_type must be 0 (nce) or 1 (infonce), got ", loss_type);
  INSTDISC_CHECK_VALUE(z_ema >= 0 && z_ema < 1, "z_ema must be in [0, 1) (0 = off), got ", z_ema);
  INSTDISC_CHECK_VALUE(num_negatives >= 1, "num_negatives must be >= 1, got ", num_negatives);
  INSTDISC_CHECK_VALUE(has_neg || !exclude_positive || N >= 2,
                       "exclude_positive needs a memory bank with at least 2 rows");
}

// Every tensor argument of nce_forward but the values (shared by the CPU and CUDA kernels).
inline void nce_forward_args(const at::Tensor& features_, const at::Tensor& memory, const at::Tensor& indices,
                             const c10::optional<at::Tensor>& neg_indices, const at::Tensor& z, const at::Tensor& seed,
                             int64_t num_negatives, const c10::optional<at::Tensor>& noise_probs,
                             c10::DeviceType kernel) {
  bank(memory, kernel);
  features(features_, memory);
  const int64_t B = features_.size(0), N = memory.size(0);
  index_vector(indices, "indices", B, memory);
  z_tensor(z, memory);
  seed_tensor(seed, memory);  // read only when the negatives are drawn in-kernel
  const bool has_neg = neg_indices.has_value() && neg_indices->defined();
  if (has_neg) index_matrix(*neg_indices, "neg_indices", B, num_negatives, "num_negatives", memory);
  if (noise_probs.has_value() && noise_probs->defined()) {
    INSTDISC_CHECK_VALUE(has_neg, "noise_probs needs explicit neg_indices (nce_loss draws them from noise_probs)");
    same_device(*noise_probs, "noise_probs", memory);
    INSTDISC_CHECK_TYPE(noise_probs->is_floating_point(), "noise_probs must be a floating tensor, got ",
                        noise_probs->scalar_type());
    INSTDISC_CHECK_VALUE(noise_probs->dim() == 1 && noise_probs->size(0) == N, "noise_probs must have shape (N=", N,
                         ",), got ", noise_probs->sizes());
  }
}

// nce_probs / nce_probs_loss: features, memory, the (B, K+1) idx and z.
inline void nce_probs_args(const at::Tensor& features_, const at::Tensor& memory, const at::Tensor& idx,
                           const at::Tensor& z, double temperature_, c10::DeviceType kernel) {
  bank(memory, kernel);
  features(features_, memory);
  index_matrix(idx, "idx", features_.size(0), -1, "K+1", memory);
  z_tensor(z, memory);
  temperature(temperature_);
}

// nce_probs_backward: grad_probs and probs (B, K+1) with idx's shape.
inline void nce_probs_backward_args(const at::Tensor& grad_probs, const at::Tensor& probs, const at::Tensor& memory,
                                    const at::Tensor& idx, double temperature_, c10::DeviceType kernel) {
  bank(memory, kernel);
  same_device(probs, "probs", memory);
  same_device(grad_probs, "grad_probs", memory);
  INSTDISC_CHECK_TYPE(probs.scalar_type() == at::kFloat || probs.scalar_type() == at::kDouble,
                      "probs must be float32 or float64 (the output of nce_probs), got ", probs.scalar_type());
  INSTDISC_CHECK_VALUE(probs.dim() == 2 && probs.size(0) > 0 && probs.size(1) >= 1,
                       "probs must be a non-empty (B, K+1) tensor, got shape ", probs.sizes());
  INSTDISC_CHECK_TYPE(grad_probs.is_floating_point(), "grad_probs must be a floating tensor, got ",
                      grad_probs.scalar_type());
  INSTDISC_CHECK_VALUE(grad_probs.sizes() == probs.sizes(), "grad_probs must have the shape of probs ", probs.sizes(),
                       ", got ", grad_probs.sizes());
  index_matrix(idx, "idx", probs.size(0), probs.size(1), "K+1 = probs.size(1)", memory);
  temperature(temperature_);
}

// knn_topk: (Q, D) queries (Q may be 0), the (N, D) bank, 1 <= k <= N, chunk_size >= 1.
inline void knn_topk_args(const at::Tensor& queries, const at::Tensor& bank_, int64_t k, int64_t chunk_size,
                          c10::DeviceType kernel) {
  bank(bank_, kernel, "bank");
  INSTDISC_CHECK_VALUE(queries.device() == bank_.device(), "queries must be on the bank's device ", bank_.device(),
                       ", got ", queries.device());
  INSTDISC_CHECK_VALUE(queries.dim() == 2 && queries.size(1) == bank_.size(1),
                       "queries must be a (Q, D) tensor with D = bank.size(1) = ", bank_.size(1), ", got shape ",
                       queries.sizes());
  INSTDISC_CHECK_TYPE(is_float_dtype(queries.scalar_type()), "queries must be float32/float64/bfloat16/float16, got ",
                      queries.scalar_type());
  INSTDISC_CHECK_VALUE(k >= 1 && k <= bank_.size(0), "k must be in [1, N=", bank_.size(0), "], got ", k);
  INSTDISC_CHECK_VALUE(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
}

// bank_update_: memory (contiguous), (B,) indices, (B, D) features (B = 0: nothing to do), momentum.
inline void bank_update_args(const at::Tensor& memory, const at::Tensor& indices, const at::Tensor& features_,
                             double momentum_, c10::DeviceType kernel) {
  bank(memory, kernel);
  INSTDISC_CHECK_VALUE(memory.is_contiguous(), "memory must be contiguous (it is updated in place)");
  same_device(indices, "indices", memory);
  int64_dtype(indices, "indices");
  INSTDISC_CHECK_VALUE(indices.dim() == 1, "indices must be a 1-D tensor, got shape ", indices.sizes());
  same_device(features_, "features", memory);
  INSTDISC_CHECK_VALUE(
      features_.dim() == 2 && features_.size(0) == indices.size(0) && features_.size(1) == memory.size(1),
      "features must have shape (B=", indices.size(0), ", D=", memory.size(1), "), got ", features_.sizes());
  INSTDISC_CHECK_TYPE(is_float_dtype(features_.scalar_type()),
                      "features must be float32/float64/bfloat16/float16, got ", features_.scalar_type());
  momentum(momentum_);
}

}  // namespace checks
}  // namespace instdisc
