// Shared pieces of the CPU NCE kernels (csrc/cpu/nce.cpp: nce_forward; csrc/cpu/nce_probs.cpp: the
// NCEAverage ops): argument checks, Z helpers, and the lemniscate NCE pass over the gathered rows.
//
// Layout of the work: at::parallel_for over batch rows; a batch row reads its K+1 bank rows
// (column 0 the positive y[b], then the negatives) one after the other, prefetching a few rows
// ahead, and never materialises anything of size B x (K+1) x D. bf16/fp16 rows are widened to
// fp32 on the fly; accumulation is fp32 (fp64 when the features are fp64). Per-row losses go to
// a buffer that is summed serially, so every output is bit-identical for any thread count.
//
// In-kernel negatives: the Philox stream of csrc/philox.h (the same on the CUDA backend).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../philox.h"
#include "rows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace instdisc {
namespace {

using rows::as_acc;
using rows::axpy;
using rows::dot;
using rows::for_each_row;

constexpr double kEps = 1e-7;   // lemniscate's NCECriterion eps
// Beyond |log P| > 80 the NCE terms take their asymptotic forms (dropping terms below e^-60
// relative, also in fp64), so exp(log P) never overflows fp32.
constexpr double kLogPLimit = 80;

// --------------------------------------------------------------------------- //
// Argument checks (the Python layer validates first; these keep a direct call  //
// from crashing or reading out of bounds)                                      //
// --------------------------------------------------------------------------- //
inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
}

inline void check_bank_and_features(const at::Tensor& features, const at::Tensor& memory) {
  check_cpu(features, "features");
  check_cpu(memory, "memory");
  TORCH_CHECK_VALUE(memory.dim() == 2 && memory.size(0) > 0,
                    "memory must be a non-empty 2-D (N, D) tensor, got shape ", memory.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(memory.scalar_type()),
                   "memory must be float32/float64/bfloat16/float16, got ", memory.scalar_type());
  TORCH_CHECK_VALUE(features.dim() == 2 && features.size(0) > 0 && features.size(1) == memory.size(1),
                    "features must be a non-empty (B, D) tensor with D = memory.size(1) = ", memory.size(1),
                    ", got shape ", features.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(features.scalar_type()),
                   "features must be float32/float64/bfloat16/float16, got ", features.scalar_type());
}

inline void check_index_values(const int64_t* p, int64_t n, int64_t N, const char* name) {
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < N, name, " contains ", p[i], " (flat position ", i,
                      "), out of range [0, ", N, ")");
}

inline void check_temperature(double T) {
  TORCH_CHECK_VALUE(std::isfinite(T) && T > 0, "temperature must be a positive finite number, got ", T);
}

inline double z_value(const at::Tensor& z) {
  check_cpu(z, "z");
  TORCH_CHECK_VALUE(z.numel() == 1, "z must hold exactly one value, got shape ", z.sizes());
  TORCH_CHECK_TYPE(z.is_floating_point(), "z must be a floating tensor, got ", z.scalar_type());
  const double v = z.item<double>();
  TORCH_CHECK_VALUE(std::isfinite(v), "z must be finite (<= 0: estimate Z from the batch), got ", v);
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
inline at::Tensor row_major(const at::Tensor& memory) {
  return memory.stride(1) == 1 ? memory : memory.contiguous();
}

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

// --------------------------------------------------------------------------- //
// nce_forward                                                                  //
// --------------------------------------------------------------------------- //
struct NceArgs {
  int64_t B, D, N, K, row_stride;
  const int64_t* y;         // (B)
  const int64_t* neg;       // (B, K) or nullptr: draw in-kernel
  uint64_t seed;
  bool exclude_positive;
  const float* noise;       // (N) or nullptr: Pn = 1/N
  double T, proximal;
  int64_t loss_type;
  const int64_t* idx_full = nullptr;  // (B, K+1) full index matrix (nce_probs_loss), else nullptr
  int64_t* bad = nullptr;             // (B) or nullptr: per batch row, the first bank row whose score is not finite, or -1
};

// A non-finite score s = V[r] . F[b] (F is finite): bank row r holds NaN/inf, or the dot overflows.
template <typename acc_t>
inline void flag_score(const NceArgs& a, int64_t b, int64_t row, acc_t s) {
  if (a.bad != nullptr && !std::isfinite(s) && a.bad[b] < 0) a.bad[b] = row;
}

// Raised after a pass (outside the parallel region), before any output or state is written; free
// unless a score was not finite.
template <typename bank_t>
inline void report_bad_rows(const NceArgs& a, const bank_t* mem) {
  if (a.bad == nullptr) return;
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t r = a.bad[b];
    if (r < 0) continue;
    bool finite = true;
    for (int64_t d = 0; d < a.D; ++d) finite = finite && std::isfinite(static_cast<double>(mem[r * a.row_stride + d]));
    // a finite row: the features are not finite (validate=False) or the dot overflows; the loss is
    // then not finite either, which nce_loss reports (validate=True)
    TORCH_CHECK_VALUE(finite, "memory row ", r, " contains NaN or inf (nce_loss read it); the bank and Z are left unchanged");
  }
}

// The K+1 bank indices of batch row b: y[b], then the negatives.
inline void row_indices(const NceArgs& a, int64_t b, int64_t* out) {
  if (a.idx_full != nullptr) {
    std::memcpy(out, a.idx_full + b * (a.K + 1), sizeof(int64_t) * (a.K + 1));
    return;
  }
  out[0] = a.y[b];
  if (a.neg != nullptr) {
    std::memcpy(out + 1, a.neg + b * a.K, sizeof(int64_t) * a.K);
    return;
  }
  const uint64_t ub = static_cast<uint64_t>(b);
  const uint64_t range = static_cast<uint64_t>(a.exclude_positive ? a.N - 1 : a.N);
  const int64_t skip = a.exclude_positive ? a.y[b] : std::numeric_limits<int64_t>::max();
  for (int64_t j = 0; j < a.K; j += 2) {
    const U32x4 o = negatives_block(a.seed, ub, static_cast<uint64_t>(j) >> 1);
    int64_t v = map_to_range(block_word(o, 0), range);
    out[1 + j] = v + (v >= skip);
    if (j + 1 < a.K) {
      v = map_to_range(block_word(o, 1), range);
      out[2 + j] = v + (v >= skip);
    }
  }
}

// Dot-only pre-pass (Z estimated from the batch): scores[b, k] = V[idx[b,k]] . F[b], and per row the
// max of t = s / T and sum exp(t - max).
template <typename bank_t, typename acc_t>
inline void score_pass(const NceArgs& a, const bank_t* mem, const acc_t* feat, acc_t* scores,
                std::vector<double>& row_max, std::vector<double>& row_sum) {
  const int64_t K1 = a.K + 1, D = a.D;
  const acc_t invT = static_cast<acc_t>(1.0 / a.T);
  at::parallel_for(0, a.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> idx(K1);
    std::vector<acc_t> buf(D);
    for (int64_t b = begin; b < end; ++b) {
      row_indices(a, b, idx.data());
      const acc_t* f = feat + b * D;
      acc_t* s = scores + b * K1;
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      for_each_row(mem, a.row_stride, idx.data(), K1, D, buf.data(), [&](int64_t k, const acc_t* v) {
        s[k] = dot(v, f, D);
        flag_score(a, b, idx[k], s[k]);
        m = std::max(m, s[k] * invT);
      });
      double sum = 0;
      for (int64_t k = 0; k < K1; ++k) sum += std::exp(s[k] * invT - m);
      row_max[b] = m;
      row_sum[b] = sum;
    }
  });
}

// The loss of one batch row's entries: the log terms summed; the negatives' terms
// log(K Pn / (P + c)) = -log1p((P + eps) / (K Pn)) accumulated as a product of the (1 + x) in double
// (one log per batch row instead of one per term), renormalised when it grows large.
struct RowLoss {
  double lsum = 0, prod = 1;
  int64_t prod_exp = 0;
  void mul(double f) {
    prod *= f;
    if (prod > 0x1p700 && prod <= std::numeric_limits<double>::max()) {
      int e;
      prod = std::frexp(prod, &e);
      prod_exp += e;
    }
  }
  double sum() const { return lsum - (std::log(prod) + prod_exp * 0.6931471805599453); }
};

// One entry of lemniscate NCE from lp = log P: adds its loss term to row, sets P and returns
// coef = dloss/dP * P (times T*B). kp = K Pn, c = K Pn + eps; factor(P + eps) = 1 + (P + eps) / (K Pn).
template <typename acc_t, typename Factor>
inline acc_t nce_entry(bool positive, acc_t lp, acc_t kp, acc_t c, acc_t lim, RowLoss& row, acc_t& P,
                       Factor&& factor) {
  P = std::exp(lp);
  if (positive) {                    // log(P / (P + c)); coef = -c / (P + c)
    if (lp > lim) return 0;
    if (lp < -lim) {
      row.lsum += lp - std::log(c);
      return -1;
    }
    const acc_t r = c / P;
    row.lsum += -std::log1p(r);
    return -r / (1 + r);
  }
  if (lp > lim) {                    // negative: log(K Pn / (P + c)); coef = P / (P + c)
    row.lsum += -(lp - std::log(kp));
    return 1;
  }
  row.mul(factor(static_cast<double>(P) + kEps));
  return P / (P + c);
}

// Constants of lemniscate NCE with uniform noise Pn = 1/N.
template <typename acc_t>
struct UniformNce {
  acc_t invT, lz, kp, c, lim;
  double inv_kp;
  UniformNce(const NceArgs& a, double log_z)
      : invT(static_cast<acc_t>(1.0 / a.T)), lz(static_cast<acc_t>(log_z)),
        kp(static_cast<acc_t>(double(a.K) / double(a.N))), c(static_cast<acc_t>(double(a.K) / double(a.N) + kEps)),
        lim(static_cast<acc_t>(kLogPLimit)), inv_kp(double(a.N) / double(a.K)) {}
  acc_t entry(bool positive, acc_t s, RowLoss& row, acc_t& P) const {
    const double ik = inv_kp;
    return nce_entry(positive, s * invT - lz, kp, c, lim, row, P, [ik](double pe) { return 1.0 + pe * ik; });
  }
};

// NCECriterion's dloss/dP of one entry, times B: positive -c / (P (P + c)), negative 1 / (P + c).
template <typename acc_t>
inline acc_t criterion_dp(bool positive, acc_t P, acc_t c) {
  return positive ? -(c / (P * (P + c))) : acc_t(1) / (P + c);
}

// lemniscate NCE: per batch row, the loss terms and g = dloss/dF[b]. scores: the pre-pass's dot
// products, or nullptr to compute them here (fixed Z: a single pass). probs, grad_probs: nullptr, or
// (B, K+1) receiving P and dloss/dP (nce_probs_loss; uniform noise).
template <typename bank_t, typename acc_t>
inline void nce_pass(const NceArgs& a, const bank_t* mem, const acc_t* feat, const acc_t* scores, double log_z,
              acc_t* grad, double* row_loss, acc_t* probs = nullptr, acc_t* grad_probs = nullptr) {
  const int64_t K1 = a.K + 1, D = a.D;
  const UniformNce<acc_t> u(a, log_z);
  const acc_t eps = static_cast<acc_t>(kEps), inv_b = static_cast<acc_t>(1.0 / a.B);
  at::parallel_for(0, a.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> idx(K1);
    std::vector<acc_t> buf(D);
    for (int64_t b = begin; b < end; ++b) {
      row_indices(a, b, idx.data());
      const acc_t* f = feat + b * D;
      acc_t* g = grad + b * D;
      std::fill(g, g + D, acc_t(0));
      RowLoss row;
      for_each_row(mem, a.row_stride, idx.data(), K1, D, buf.data(), [&](int64_t k, const acc_t* v) {
        const acc_t s = scores != nullptr ? scores[b * K1 + k] : dot(v, f, D);
        flag_score(a, b, idx[k], s);
        acc_t P, coef;
        if (a.noise != nullptr) {
          const acc_t kp = static_cast<acc_t>(a.K) * static_cast<acc_t>(a.noise[idx[k]]);
          coef = nce_entry(k == 0, s * u.invT - u.lz, kp, kp + eps, u.lim, row, P,
                           [kp](double pe) { return 1.0 + pe / static_cast<double>(kp); });
        } else {
          coef = u.entry(k == 0, s, row, P);
        }
        if (probs != nullptr) probs[b * K1 + k] = P;
        if (grad_probs != nullptr) grad_probs[b * K1 + k] = criterion_dp(k == 0, P, u.c) * inv_b;
        axpy(g, coef, v, D);
      });
      const acc_t scale = static_cast<acc_t>(1.0 / (a.T * a.B));
      for (int64_t d = 0; d < D; ++d) g[d] *= scale;
      row_loss[b] = -row.sum() / a.B;
    }
  });
}


// lemniscate NCE with Z fixed (z0 > 0 and no moving average: one pass) or estimated from this batch
// (a dot-only pre-pass first; with z_ema > 0 averaged with z0). Returns the Z used.
template <typename bank_t, typename acc_t>
inline double nce_with_z(const NceArgs& a, const bank_t* mem, const acc_t* feat, double z0, double z_ema, acc_t* grad,
                  double* row_loss, acc_t* probs, acc_t* grad_probs) {
  if (z0 > 0 && z_ema == 0) {
    nce_pass<bank_t, acc_t>(a, mem, feat, nullptr, std::log(z0), grad, row_loss, probs, grad_probs);
    return z0;
  }
  std::vector<acc_t> scores(static_cast<size_t>(a.B) * (a.K + 1));
  std::vector<double> row_max(a.B), row_sum(a.B);
  score_pass<bank_t, acc_t>(a, mem, feat, scores.data(), row_max, row_sum);
  report_bad_rows(a, mem);
  double log_z = log_z_estimate(row_max, row_sum, a.N, a.B * (a.K + 1));
  if (z0 > 0) {  // moving average of the stored Z and this batch's estimate, in log space
    const double x = std::log(z_ema * z0), y = std::log1p(-z_ema) + log_z;
    log_z = std::max(x, y) + std::log1p(std::exp(-std::abs(x - y)));
  }
  const double z_used = std::exp(log_z);  // z_out: inf (or 0) when float32 cannot hold it; nce_loss rejects that
  nce_pass<bank_t, acc_t>(a, mem, feat, scores.data(), log_z, grad, row_loss, probs, grad_probs);
  return z_used;
}


}  // namespace
}  // namespace instdisc
