// CPU kernels of the fused sampled-negative NCE op (SPEC 1.1):
//   nce_forward         loss, dloss/dF and the Z used, in one pass over the gathered rows
//                       (two when Z is estimated from the batch: a dot-only pre-pass first);
//   nce_probs           P = exp(V[idx] . F / T) / Z           (lemniscate NCEAverage drop-in);
//   nce_probs_backward  dF[b] = sum_k gP[b,k] P[b,k] / T V[idx[b,k]];
//   nce_probs_loss      nce_probs plus NCECriterion's loss and dloss/dF on them, in one pass.
// Contracts: instdisc_kernels/ops/nce.py and ops/nce_probs.py; schemas: csrc/instdisc.cpp.
//
// Layout of the work: at::parallel_for over batch rows; a batch row reads its K+1 bank rows
// (column 0 the positive y[b], then the negatives) one after the other, prefetching a few rows
// ahead, and never materialises anything of size B x (K+1) x D. bf16/fp16 rows are widened to
// fp32 on the fly; accumulation is fp32 (fp64 when the features are fp64). Per-row losses go to
// a buffer that is summed serially, so every output is bit-identical for any thread count.
//
// In-kernel negatives: the Philox stream of csrc/philox.h (the same on the CUDA backend).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

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
bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
}

void check_bank_and_features(const at::Tensor& features, const at::Tensor& memory) {
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

void check_index_values(const int64_t* p, int64_t n, int64_t N, const char* name) {
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < N, name, " contains ", p[i], " (flat position ", i,
                      "), out of range [0, ", N, ")");
}

void check_temperature(double T) {
  TORCH_CHECK_VALUE(std::isfinite(T) && T > 0, "temperature must be a positive finite number, got ", T);
}

double z_value(const at::Tensor& z) {
  check_cpu(z, "z");
  TORCH_CHECK_VALUE(z.numel() == 1, "z must hold exactly one value, got shape ", z.sizes());
  TORCH_CHECK_TYPE(z.is_floating_point(), "z must be a floating tensor, got ", z.scalar_type());
  const double v = z.item<double>();
  TORCH_CHECK_VALUE(std::isfinite(v), "z must be finite (<= 0: estimate Z from the batch), got ", v);
  return v;
}

// (1,) float32 holding Z (inf when Z exceeds the float32 range; the kernels work with log Z).
at::Tensor z_tensor(double z, const at::Tensor& like) {
  auto t = at::empty({1}, like.options().dtype(at::kFloat));
  t.data_ptr<float>()[0] = static_cast<float>(z);
  return t;
}

at::ScalarType acc_dtype(const at::Tensor& features) {
  return features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// memory with unit column stride (rows may be strided); copies only an unusual layout.
at::Tensor row_major(const at::Tensor& memory) {
  return memory.stride(1) == 1 ? memory : memory.contiguous();
}

// Z = N * mean(exp(t)) over B*(K+1) logits t, from per-row maxima and sums of exp(t - max):
// returns log Z (robust to exp overflow), combining rows serially (deterministic).
double log_z_estimate(const std::vector<double>& row_max, const std::vector<double>& row_sum, int64_t N,
                      int64_t count) {
  double M = -std::numeric_limits<double>::infinity();
  for (double m : row_max) M = std::max(M, m);
  double total = 0;
  for (size_t b = 0; b < row_max.size(); ++b) total += row_sum[b] * std::exp(row_max[b] - M);
  return std::log(static_cast<double>(N)) + M + std::log(total) - std::log(static_cast<double>(count));
}

// Calls run(acc_t(0)) with acc_t = double for a float64 accumulation dtype, else float.
template <typename Run>
void with_acc(at::ScalarType acc, Run&& run) {
  if (acc == at::kDouble) {
    run(double(0));
  } else {
    run(float(0));
  }
}

// The loss from the per-row terms, summed serially (independent of the thread count).
at::Tensor total_loss(const std::vector<double>& row_loss, const at::Tensor& features, at::ScalarType acc) {
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
void report_bad_rows(const NceArgs& a, const bank_t* mem) {
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
void row_indices(const NceArgs& a, int64_t b, int64_t* out) {
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
void score_pass(const NceArgs& a, const bank_t* mem, const acc_t* feat, acc_t* scores,
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
void nce_pass(const NceArgs& a, const bank_t* mem, const acc_t* feat, const acc_t* scores, double log_z,
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

// nce_pass for a full index matrix (a.idx_full), fixed Z and uniform noise, walking the bank in row
// order: the B*(K+1) entries are counting-sorted by bank row and each row, read once, serves every
// entry that names it (random gathers become a forward scan). The rows are split in kRowChunks fixed
// ranges, each with its own gradient and loss partials, combined in chunk order: the result does not
// depend on the thread count.
constexpr int64_t kRowChunks = 32;

template <typename bank_t, typename acc_t>
void nce_pass_row_order(const NceArgs& a, const bank_t* mem, const acc_t* feat, double log_z, acc_t* grad,
                        double* row_loss, acc_t* probs, acc_t* grad_probs) {
  const int64_t B = a.B, D = a.D, N = a.N, K1 = a.K + 1, E = B * K1;
  const int64_t* idx = a.idx_full;
  std::vector<int64_t> start(N + 1, 0), order(E);
  for (int64_t e = 0; e < E; ++e) ++start[idx[e] + 1];
  for (int64_t n = 0; n < N; ++n) start[n + 1] += start[n];
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < E; ++e) order[next[idx[e]]++] = e;
  }
  const int64_t C = std::min(kRowChunks, N);
  std::vector<acc_t> g_part(static_cast<size_t>(C * B * D), acc_t(0));
  std::vector<RowLoss> l_part(static_cast<size_t>(C * B));
  const UniformNce<acc_t> u(a, log_z);
  const acc_t inv_b = static_cast<acc_t>(1.0 / a.B);
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> buf(D);
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* gc = g_part.data() + c * B * D;
      RowLoss* lc = l_part.data() + c * B;
      const int64_t n1 = N * (c + 1) / C;
      for (int64_t n = N * c / C; n < n1; ++n) {
        if (start[n] == start[n + 1]) continue;
        if (n + 4 < N) rows::prefetch_row(mem + (n + 4) * a.row_stride, D * sizeof(bank_t));
        const acc_t* v = as_acc<acc_t>(mem + n * a.row_stride, buf.data(), D);
        for (int64_t j = start[n]; j < start[n + 1]; ++j) {
          const int64_t e = order[j], b = e / K1;
          acc_t P;
          const bool positive = e - b * K1 == 0;
          const acc_t coef = u.entry(positive, dot(v, feat + b * D, D), lc[b], P);
          probs[e] = P;
          grad_probs[e] = criterion_dp(positive, P, u.c) * inv_b;
          axpy(gc + b * D, coef, v, D);
        }
      }
    }
  });
  const acc_t scale = static_cast<acc_t>(1.0 / (a.T * a.B));
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* g = grad + b * D;
      double total = 0;
      std::fill(g, g + D, acc_t(0));
      for (int64_t c = 0; c < C; ++c) {
        const acc_t* gc = g_part.data() + (c * B + b) * D;
        for (int64_t d = 0; d < D; ++d) g[d] += gc[d];
        total += l_part[c * B + b].sum();
      }
      for (int64_t d = 0; d < D; ++d) g[d] *= scale;
      row_loss[b] = -total / a.B;
    }
  });
}

// lemniscate NCE with Z fixed (z0 > 0 and no moving average: one pass) or estimated from this batch
// (a dot-only pre-pass first; with z_ema > 0 averaged with z0). Returns the Z used.
template <typename bank_t, typename acc_t>
double nce_with_z(const NceArgs& a, const bank_t* mem, const acc_t* feat, double z0, double z_ema, acc_t* grad,
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

// InfoNCE: softmax cross-entropy over the K+1 logits, with an online max/sum per batch row, so one
// pass suffices: acc = sum_k exp(t_k - m) V_k is rescaled whenever the running max m grows.
template <typename bank_t, typename acc_t>
void infonce_pass(const NceArgs& a, const bank_t* mem, const acc_t* feat, acc_t* grad, double* row_loss) {
  const int64_t K1 = a.K + 1, D = a.D;
  const acc_t invT = static_cast<acc_t>(1.0 / a.T);
  at::parallel_for(0, a.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> idx(K1);
    std::vector<acc_t> buf(D);
    for (int64_t b = begin; b < end; ++b) {
      row_indices(a, b, idx.data());
      const acc_t* f = feat + b * D;
      acc_t* g = grad + b * D;
      acc_t t0 = 0, m = 0;
      double l = 1;
      for_each_row(mem, a.row_stride, idx.data(), K1, D, buf.data(), [&](int64_t k, const acc_t* v) {
        const acc_t sk = dot(v, f, D);
        flag_score(a, b, idx[k], sk);
        const acc_t t = sk * invT;
        if (k == 0) {  // the positive starts the running max and sum
          t0 = m = t;
          std::copy(v, v + D, g);
        } else if (t > m) {
          const acc_t r = std::exp(m - t);
          l = l * r + 1;
          for (int64_t d = 0; d < D; ++d) g[d] = g[d] * r + v[d];
          m = t;
        } else {
          const acc_t e = std::exp(t - m);
          l += e;
          axpy(g, e, v, D);
        }
      });
      // g = (softmax-weighted mean of the rows - V[y]) / (B T)
      const acc_t* v = as_acc<acc_t>(mem + idx[0] * a.row_stride, buf.data(), D);
      const acc_t inv_l = static_cast<acc_t>(1.0 / l);
      const acc_t scale = static_cast<acc_t>(1.0 / (a.T * a.B));
      for (int64_t d = 0; d < D; ++d) g[d] = (g[d] * inv_l - v[d]) * scale;
      row_loss[b] = (static_cast<double>(m) + std::log(l) - static_cast<double>(t0)) / a.B;
    }
  });
}

// proximal lambda/B ||F[b] - V[y[b]]||^2 and its gradient, added per batch row.
template <typename bank_t, typename acc_t>
void proximal_pass(const NceArgs& a, const bank_t* mem, const acc_t* feat, acc_t* grad, double* row_loss) {
  const int64_t D = a.D;
  const acc_t two_l_b = static_cast<acc_t>(2.0 * a.proximal / a.B);
  at::parallel_for(0, a.B, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(D);
    for (int64_t b = begin; b < end; ++b) {
      const acc_t* v = as_acc<acc_t>(mem + a.y[b] * a.row_stride, buf.data(), D);
      const acc_t* f = feat + b * D;
      acc_t* g = grad + b * D;
      double ss = 0;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t diff = f[d] - v[d];
        ss += static_cast<double>(diff) * diff;
        g[d] += two_l_b * diff;
      }
      row_loss[b] += a.proximal * ss / a.B;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nce_forward_cpu(
    const at::Tensor& features, const at::Tensor& memory, const at::Tensor& indices,
    const c10::optional<at::Tensor>& neg_indices, const at::Tensor& z, const at::Tensor& seed,
    int64_t num_negatives, double temperature, double proximal, int64_t loss_type, double z_ema,
    bool exclude_positive, const c10::optional<at::Tensor>& noise_probs) {
  check_bank_and_features(features, memory);
  const int64_t B = features.size(0), D = features.size(1), N = memory.size(0);
  check_cpu(indices, "indices");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "indices must be an int64 tensor, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 1 && indices.size(0) == B, "indices must have shape (B=", B, ",), got ",
                    indices.sizes());
  check_temperature(temperature);
  TORCH_CHECK_VALUE(std::isfinite(proximal) && proximal >= 0, "proximal must be a finite number >= 0, got ", proximal);
  TORCH_CHECK_VALUE(loss_type == 0 || loss_type == 1, "loss_type must be 0 (nce) or 1 (infonce), got ", loss_type);
  TORCH_CHECK_VALUE(z_ema >= 0 && z_ema < 1, "z_ema must be in [0, 1) (0 = off), got ", z_ema);
  const double z0 = z_value(z);
  check_cpu(seed, "seed");
  TORCH_CHECK_VALUE(seed.numel() == 1, "seed must hold exactly one value, got shape ", seed.sizes());
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "seed must be an int64 tensor, got ", seed.scalar_type());

  auto y = indices.contiguous();
  check_index_values(y.data_ptr<int64_t>(), B, N, "indices");
  at::Tensor neg;
  int64_t K = num_negatives;
  if (neg_indices.has_value()) {
    neg = neg_indices->contiguous();
    check_cpu(neg, "neg_indices");
    TORCH_CHECK_TYPE(neg.scalar_type() == at::kLong, "neg_indices must be an int64 tensor, got ", neg.scalar_type());
    TORCH_CHECK_VALUE(neg.dim() == 2 && neg.size(0) == B && neg.size(1) >= 1 && neg.size(1) == K,
                      "neg_indices must have shape (B=", B, ", num_negatives=", K, "), got ", neg.sizes());
    check_index_values(neg.data_ptr<int64_t>(), neg.numel(), N, "neg_indices");
  } else {
    TORCH_CHECK_VALUE(K >= 1, "num_negatives must be >= 1, got ", K);
    TORCH_CHECK_VALUE(!exclude_positive || N >= 2, "exclude_positive needs a memory bank with at least 2 rows");
  }
  at::Tensor noise;
  if (noise_probs.has_value()) {
    TORCH_CHECK_VALUE(neg_indices.has_value(),
                      "noise_probs needs explicit neg_indices (nce_loss draws them from noise_probs)");
    check_cpu(*noise_probs, "noise_probs");
    TORCH_CHECK_TYPE(noise_probs->is_floating_point(), "noise_probs must be a floating tensor, got ",
                     noise_probs->scalar_type());
    TORCH_CHECK_VALUE(noise_probs->dim() == 1 && noise_probs->size(0) == N, "noise_probs must have shape (N=", N,
                      ",), got ", noise_probs->sizes());
    noise = noise_probs->to(at::kFloat).contiguous();
  }

  const auto acc = acc_dtype(features);
  auto feat = features.to(acc).contiguous();
  auto mem = row_major(memory);
  auto grad = at::empty({B, D}, features.options().dtype(acc));
  std::vector<double> row_loss(B, 0.0);
  std::vector<int64_t> bad(B, -1);

  NceArgs a{B, D, N, K, mem.stride(0), y.data_ptr<int64_t>(), neg.defined() ? neg.data_ptr<int64_t>() : nullptr,
            static_cast<uint64_t>(seed.item<int64_t>()), exclude_positive,
            noise.defined() ? noise.data_ptr<float>() : nullptr, temperature, proximal, loss_type};
  a.bad = bad.data();

  double z_used = z0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mem.scalar_type(), "nce_forward_cpu", [&] {
    using bank_t = scalar_t;
    auto run = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      const bank_t* mp = mem.data_ptr<bank_t>();
      const acc_t* fp = feat.data_ptr<acc_t>();
      acc_t* gp = grad.data_ptr<acc_t>();
      if (loss_type == 1) {
        infonce_pass<bank_t, acc_t>(a, mp, fp, gp, row_loss.data());
      } else {
        z_used = nce_with_z<bank_t, acc_t>(a, mp, fp, z0, z_ema, gp, row_loss.data(), nullptr, nullptr);
      }
      report_bad_rows(a, mp);
      if (proximal > 0) proximal_pass<bank_t, acc_t>(a, mp, fp, gp, row_loss.data());
    };
    with_acc(acc, run);
  });
  return {total_loss(row_loss, features, acc), grad, z_tensor(z_used, features)};
}

// --------------------------------------------------------------------------- //
// nce_probs / nce_probs_backward                                               //
// --------------------------------------------------------------------------- //
void check_idx_matrix(const at::Tensor& idx, int64_t B, int64_t N) {
  check_cpu(idx, "idx");
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "idx must be an int64 tensor, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.dim() == 2 && idx.size(0) == B && idx.size(1) >= 1, "idx must have shape (B=", B,
                    ", K+1), got ", idx.sizes());
  check_index_values(idx.data_ptr<int64_t>(), idx.numel(), N, "idx");
}

std::tuple<at::Tensor, at::Tensor> nce_probs_cpu(const at::Tensor& features, const at::Tensor& memory,
                                                 const at::Tensor& idx_in, const at::Tensor& z, double temperature) {
  check_bank_and_features(features, memory);
  const int64_t B = features.size(0), D = features.size(1), N = memory.size(0);
  check_temperature(temperature);
  const double z0 = z_value(z);
  auto idx = idx_in.contiguous();
  check_idx_matrix(idx, B, N);
  const int64_t K1 = idx.size(1);

  const auto acc = acc_dtype(features);
  auto feat = features.to(acc).contiguous();
  auto mem = row_major(memory);
  auto probs = at::empty({B, K1}, features.options().dtype(acc));
  std::vector<double> row_max(B), row_sum(B);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t rs = mem.stride(0);
  double z_used = z0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mem.scalar_type(), "nce_probs_cpu", [&] {
    using bank_t = scalar_t;
    auto run = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      const bank_t* mp = mem.data_ptr<bank_t>();
      const acc_t* fp = feat.data_ptr<acc_t>();
      acc_t* pp = probs.data_ptr<acc_t>();
      const acc_t invT = static_cast<acc_t>(1.0 / temperature);
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {  // logits t = s / T
        std::vector<acc_t> buf(D);
        for (int64_t b = begin; b < end; ++b) {
          acc_t* t = pp + b * K1;
          acc_t m = -std::numeric_limits<acc_t>::infinity();
          for_each_row(mp, rs, ip + b * K1, K1, D, buf.data(), [&](int64_t k, const acc_t* v) {
            t[k] = dot(v, fp + b * D, D) * invT;
            m = std::max(m, t[k]);
          });
          double sum = 0;
          for (int64_t k = 0; k < K1; ++k) sum += std::exp(t[k] - m);
          row_max[b] = m;
          row_sum[b] = sum;
        }
      });
      double log_z;
      if (z0 > 0) {
        log_z = std::log(z0);
      } else {
        log_z = log_z_estimate(row_max, row_sum, N, B * K1);
        z_used = std::exp(log_z);
      }
      const acc_t lz = static_cast<acc_t>(log_z);
      at::parallel_for(0, B * K1, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) pp[i] = std::exp(pp[i] - lz);
      });
    };
    if (acc == at::kDouble) {
      run(double(0));
    } else {
      run(float(0));
    }
  });
  auto z_out = z_tensor(z_used, features);
  return {probs, z_out};
}

at::Tensor nce_probs_backward_cpu(const at::Tensor& grad_probs, const at::Tensor& probs_in, const at::Tensor& memory,
                                  const at::Tensor& idx_in, double temperature) {
  check_cpu(probs_in, "probs");
  check_cpu(grad_probs, "grad_probs");
  check_cpu(memory, "memory");
  TORCH_CHECK_TYPE(probs_in.scalar_type() == at::kFloat || probs_in.scalar_type() == at::kDouble,
                   "probs must be float32 or float64 (the output of nce_probs), got ", probs_in.scalar_type());
  TORCH_CHECK_VALUE(probs_in.dim() == 2 && probs_in.size(0) > 0 && probs_in.size(1) >= 1,
                    "probs must be a non-empty (B, K+1) tensor, got shape ", probs_in.sizes());
  TORCH_CHECK_TYPE(grad_probs.is_floating_point(), "grad_probs must be a floating tensor, got ",
                   grad_probs.scalar_type());
  TORCH_CHECK_VALUE(grad_probs.sizes() == probs_in.sizes(), "grad_probs must have the shape of probs ",
                    probs_in.sizes(), ", got ", grad_probs.sizes());
  TORCH_CHECK_VALUE(memory.dim() == 2 && memory.size(0) > 0, "memory must be a non-empty 2-D (N, D) tensor, got shape ",
                    memory.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(memory.scalar_type()),
                   "memory must be float32/float64/bfloat16/float16, got ", memory.scalar_type());
  check_temperature(temperature);
  const int64_t B = probs_in.size(0), K1 = probs_in.size(1), D = memory.size(1), N = memory.size(0);
  auto idx = idx_in.contiguous();
  check_idx_matrix(idx, B, N);
  TORCH_CHECK_VALUE(idx.size(1) == K1, "idx must have the shape of probs ", probs_in.sizes(), ", got ", idx.sizes());

  const auto acc = probs_in.scalar_type();
  auto probs = probs_in.contiguous();
  auto gp = grad_probs.to(acc).contiguous();  // also materialises a stride-0 (expanded) gradient
  auto mem = row_major(memory);
  auto grad = at::empty({B, D}, probs.options());
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t rs = mem.stride(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mem.scalar_type(), "nce_probs_backward_cpu", [&] {
    using bank_t = scalar_t;
    auto run = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      const bank_t* mp = mem.data_ptr<bank_t>();
      const acc_t* pp = probs.data_ptr<acc_t>();
      const acc_t* gpp = gp.data_ptr<acc_t>();
      acc_t* out = grad.data_ptr<acc_t>();
      const acc_t invT = static_cast<acc_t>(1.0 / temperature);
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buf(D);
        for (int64_t b = begin; b < end; ++b) {
          acc_t* g = out + b * D;
          std::fill(g, g + D, acc_t(0));
          for_each_row(mp, rs, ip + b * K1, K1, D, buf.data(), [&](int64_t k, const acc_t* v) {
            axpy(g, gpp[b * K1 + k] * pp[b * K1 + k] * invT, v, D);
          });
        }
      });
    };
    if (acc == at::kDouble) {
      run(double(0));
    } else {
      run(float(0));
    }
  });
  return grad;
}

// nce_probs and, in the same pass over the gathered rows, lemniscate's NCECriterion on them (Pn = 1/N,
// K = idx.size(1) - 1): its loss, dloss/dF (as nce_forward computes them) and dloss/dP. The drop-in NCEAverage
// uses it when NCECriterion follows, so that its backward needs no second pass over the bank.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> nce_probs_loss_cpu(
    const at::Tensor& features, const at::Tensor& memory, const at::Tensor& idx_in, const at::Tensor& z,
    double temperature) {
  check_bank_and_features(features, memory);
  const int64_t B = features.size(0), D = features.size(1), N = memory.size(0);
  check_temperature(temperature);
  const double z0 = z_value(z);
  auto idx = idx_in.contiguous();
  check_idx_matrix(idx, B, N);
  TORCH_CHECK_VALUE(idx.size(1) >= 2, "idx must have at least 2 columns (the positive and K >= 1 negatives), got ",
                    idx.sizes());
  const int64_t K = idx.size(1) - 1;

  const auto acc = acc_dtype(features);
  auto feat = features.to(acc).contiguous();
  auto mem = row_major(memory);
  auto probs = at::empty({B, K + 1}, features.options().dtype(acc));
  auto grad_probs = at::empty({B, K + 1}, features.options().dtype(acc));
  auto grad = at::empty({B, D}, features.options().dtype(acc));
  std::vector<double> row_loss(B, 0.0);
  NceArgs a{B, D, N, K, mem.stride(0), nullptr, nullptr, 0, false, nullptr, temperature, 0.0, 0};
  a.idx_full = idx.data_ptr<int64_t>();

  double z_used = z0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mem.scalar_type(), "nce_probs_loss_cpu", [&] {
    using bank_t = scalar_t;
    auto run = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      const bank_t* mp = mem.data_ptr<bank_t>();
      const acc_t* fp = feat.data_ptr<acc_t>();
      acc_t* gp = grad.data_ptr<acc_t>();
      acc_t* pp = probs.data_ptr<acc_t>();
      acc_t* gpp = grad_probs.data_ptr<acc_t>();
      if (z0 > 0 && 4 * B * (K + 1) >= N) {  // dense enough for the row-order walk to pay off
        nce_pass_row_order<bank_t, acc_t>(a, mp, fp, std::log(z0), gp, row_loss.data(), pp, gpp);
      } else {
        z_used = nce_with_z<bank_t, acc_t>(a, mp, fp, z0, 0.0, gp, row_loss.data(), pp, gpp);
      }
    };
    with_acc(acc, run);
  });
  return {probs, total_loss(row_loss, features, acc), grad, grad_probs, z_tensor(z_used, features)};
}

}  // namespace

TORCH_LIBRARY_IMPL(instdisc, CPU, m) {
  m.impl("nce_forward", &nce_forward_cpu);
  m.impl("nce_probs", &nce_probs_cpu);
  m.impl("nce_probs_backward", &nce_probs_backward_cpu);
  m.impl("nce_probs_loss", &nce_probs_loss_cpu);
}

}  // namespace instdisc
