// Epilogues of the shared-negative score tiles (ops/nce_shared.py, backend "cpu"), on raw
// pointers, compiled once per CPU capability (kernel_variants.h, from nce_shared.cpp): no include
// guard, no #include but simd_math.h, rows.h and fma_blocks.h. Each tile epilogue walks one row of
// a B x n tile that ATen's GEMM has just written (still in cache) once, in place of the five to
// seven ATen passes of the eager path; nce_pass and lse_pass (below) score the rows themselves.
//
// Every exp here has an argument <= 0 (exp(-|x|), exp(x - max)), so no result overflows. The AVX2
// exp is simd::exp8 (simd_math.h: within 2 ulp; below -87.3 it gives 0). A NaN score stays NaN
// through every epilogue (the step then rejects the loss).
namespace {

#include "simd_math.h"

#if INSTDISC_VARIANT_LEVEL >= 1
using simd::exp8;
using simd::hmax;
using simd::hsum;
#endif

// One entry of the NCE epilogue: x <- sigmoid(x); adds max(x, 0) to pos and multiplies prod by
// 1 + exp(-|x|) (softplus(x) = max(x, 0) + log(1 + exp(-|x|))).
template <typename acc_t>
inline void nce_entry(acc_t& x, double& pos, double& prod) {
  const double v = static_cast<double>(x);
  const double e = std::exp(-std::abs(v));
  const double inv = 1.0 / (1.0 + e);
  x = static_cast<acc_t>(v >= 0 ? inv : e * inv);
  pos += v != v ? v : std::max(v, 0.0);  // a NaN score reaches the sum
  prod *= 1.0 + e;
}

// Running sums of lemniscate NCE row epilogues: sum softplus(x) = sum max(x, 0) + log prod (1 + e),
// e = exp(-|x|). The AVX2 path forms both per lane in fp32 over up to 16 vectors (16 factors in
// (1, 2], so <= 2^16; relative error <= 16 * 2^-24, the size of the fp32 scores' own error), then
// folds them into double sums and products whose log is taken once per 60 folds (scalar: per 512
// entries), not once per row. One NceSums may run over many rows (nce_pass: a thread's whole range).
struct NceSums {
  double pos = 0, logs = 0, prod = 1;
  int scalar = 0;
#if INSTDISC_VARIANT_LEVEL >= 1
  __m256d p0, p1, s0, s1;
  int folds = 0;
  NceSums() : p0(_mm256_set1_pd(1.0)), p1(p0), s0(_mm256_setzero_pd()), s1(s0) {}
  void flush_vectors() {
    double l[8];
    _mm256_storeu_pd(l, p0);
    _mm256_storeu_pd(l + 4, p1);
    for (double f : l) logs += std::log(f);
    p0 = p1 = _mm256_set1_pd(1.0);
    folds = 0;
  }
  // Adds 8 lanes of fp32 partial sums of max(x, 0) and multiplies in 8 partial products.
  void fold(__m256 pos8, __m256 prod8) {
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(pos8)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(pos8, 1)));
    p0 = _mm256_mul_pd(p0, _mm256_cvtps_pd(_mm256_castps256_ps128(prod8)));
    p1 = _mm256_mul_pd(p1, _mm256_cvtps_pd(_mm256_extractf128_ps(prod8, 1)));
    if (++folds == 60) flush_vectors();  // 60 folds of <= 2^16 each: < 2^960, inside the double range
  }
#endif
  double total() {
#if INSTDISC_VARIANT_LEVEL >= 1
    flush_vectors();
    pos += hsum(_mm256_add_pd(s0, s1));
    s0 = s1 = _mm256_setzero_pd();
#endif
    logs += std::log(prod);
    prod = 1;
    scalar = 0;
    return pos + logs;
  }
};

// Row epilogue of lemniscate NCE: x[0..n) <- sigmoid(x + bias) (kBias; else sigmoid(x)), softplus of
// the same added into s. The AVX2 sigmoid is 1 / (1 + e) by a reciprocal estimate and one Newton
// step (within ~2 ulp), e / (1 + e) for x < 0.
template <typename acc_t, bool kBias = false>
void nce_row(acc_t* x, int64_t n, NceSums& s, const acc_t* bias = nullptr) {
  int64_t i = 0;
#if INSTDISC_VARIANT_LEVEL >= 1
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
    const __m256 zero = _mm256_setzero_ps();
    __m256 pos = zero, prod = one;
    int k = 0;
    for (; i + 8 <= n; i += 8) {
      __m256 v = _mm256_loadu_ps(x + i);
      if constexpr (kBias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + i));
      const __m256 e = exp8(_mm256_or_ps(v, sign));  // exp(-|x|)
      const __m256 a = _mm256_add_ps(one, e);
      __m256 inv = _mm256_rcp_ps(a);
      inv = _mm256_mul_ps(inv, _mm256_fnmadd_ps(a, inv, two));  // r (2 - a r)
      const __m256 nonneg = _mm256_cmp_ps(v, zero, _CMP_GE_OQ);
      _mm256_storeu_ps(x + i, _mm256_blendv_ps(_mm256_mul_ps(e, inv), inv, nonneg));
      pos = _mm256_add_ps(pos, _mm256_blendv_ps(zero, v, _mm256_or_ps(nonneg, _mm256_cmp_ps(v, v, _CMP_UNORD_Q))));
      prod = _mm256_mul_ps(prod, a);  // a NaN score reaches both sums
      if (++k == 16) {
        s.fold(pos, prod);
        pos = zero;
        prod = one;
        k = 0;
      }
    }
    if (k > 0) s.fold(pos, prod);
  }
#endif
  for (; i < n; ++i) {
    if constexpr (kBias) x[i] += bias[i];
    nce_entry(x[i], s.pos, s.prod);
    if (++s.scalar == 512) {
      s.logs += std::log(s.prod);
      s.prod = 1;
      s.scalar = 0;
    }
  }
}

// Max of a row (NaN if the row holds a NaN).
template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  bool nan = false;
  int64_t i = 0;
#if INSTDISC_VARIANT_LEVEL >= 1
  if constexpr (std::is_same_v<acc_t, float>) {
    if (n >= 8) {
      __m256 v = _mm256_set1_ps(m), u = _mm256_setzero_ps();
      for (; i + 8 <= n; i += 8) {
        const __m256 xi = _mm256_loadu_ps(x + i);
        v = _mm256_max_ps(v, xi);
        u = _mm256_or_ps(u, _mm256_cmp_ps(xi, xi, _CMP_UNORD_Q));
      }
      m = hmax(v);
      nan = _mm256_movemask_ps(u) != 0;
    }
  }
#endif
  for (; i < n; ++i) {
    m = std::max(m, x[i]);
    nan = nan || x[i] != x[i];
  }
  return nan ? std::numeric_limits<acc_t>::quiet_NaN() : m;
}

// sum exp(x - shift) over a row (shift >= every x), in double; with write, x <- exp(x - shift).
template <typename acc_t, bool write>
double row_exp_sum(acc_t* x, int64_t n, acc_t shift) {
  double s = 0;
  int64_t i = 0;
#if INSTDISC_VARIANT_LEVEL >= 1
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m256 sh = _mm256_set1_ps(shift);
    __m256d s0 = _mm256_setzero_pd(), s1 = s0;
    for (; i + 8 <= n; i += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
      if constexpr (write) _mm256_storeu_ps(x + i, e);
      s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
      s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    s = hsum(_mm256_add_pd(s0, s1));
  }
#endif
  for (; i < n; ++i) {
    const acc_t e = std::exp(x[i] - shift);
    if constexpr (write) x[i] = e;
    s += static_cast<double>(e);
  }
  return s;
}

// log sum exp from n partial (max, sum exp(x - max)) pairs: NaN if a max is, +-inf if the largest
// max is (a sum is used only where it is > 0).
inline double merge_lse(const double* mx, const double* sm, int64_t n) {
  double M = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    if (mx[i] != mx[i]) return mx[i];
    M = std::max(M, mx[i]);
  }
  if (!std::isfinite(M)) return M;
  double total = 0;
  for (int64_t i = 0; i < n; ++i)
    if (sm[i] > 0) total += sm[i] * std::exp(mx[i] - M);
  return M + std::log(total);
}

// The three tile epilogues (B rows of n entries, row-major, contiguous).
template <typename acc_t>
double tile_nce(acc_t* x, int64_t B, int64_t n) {
  std::vector<double> rows(B);
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      NceSums s;
      nce_row(x + b * n, n, s);
      rows[b] = s.total();
    }
  });
  double total = 0;
  for (double r : rows) total += r;  // in row order: independent of the thread count
  return total;
}

// log sum exp over the whole tile, in double (-inf for an empty or all -inf tile).
template <typename acc_t>
double tile_lse(acc_t* x, int64_t B, int64_t n) {
  std::vector<double> mx(B), sm(B);
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t m = row_max(x + b * n, n);
      mx[b] = static_cast<double>(m);
      sm[b] = std::isfinite(m) ? row_exp_sum<acc_t, false>(x + b * n, n, m) : 0.0;
    }
  });
  return merge_lse(mx.data(), sm.data(), B);
}

// InfoNCE's online softmax, one tile: per row, M' = max(m, max x), scale = exp(m - M'),
// x <- exp(x - M'), l <- l scale + sum x, m <- M'; scale[b] rescales the running gradient sum.
template <typename acc_t>
void tile_softmax(acc_t* x, int64_t B, int64_t n, acc_t* m, acc_t* l, acc_t* scale) {
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t rm = row_max(x + b * n, n);
      const acc_t mn = rm != rm ? rm : std::max(m[b], rm);           // NaN stays
      const acc_t sc = m[b] == mn ? acc_t(1) : std::exp(m[b] - mn);  // 0 while m = -inf
      double s = 0;
      if (!std::isinf(mn))
        s = row_exp_sum<acc_t, true>(x + b * n, n, mn);
      else if (mn < 0)
        std::fill(x + b * n, x + (b + 1) * n, acc_t(0));  // a row of -inf: weights 0
      l[b] = static_cast<acc_t>(static_cast<double>(l[b]) * static_cast<double>(sc) + s);
      m[b] = mn;
      scale[b] = sc;
    }
  });
}

#if INSTDISC_VARIANT_LEVEL >= 1
// The fused passes over K rows g_j = g[index[j]] (index null: g[j]; fma_blocks.h: scores, epilogue
// and weighted sum in register tiles, never a B x chunk tile in memory), with F (B x D fp32)
// already divided by T; bf16: both operands rounded to bfloat16 (fma_blocks::round_bf16) first.
// One contiguous range of rows per thread; the per-thread results are merged in thread order.
#include "rows.h"
#include "fma_blocks.h"

// NCE: x[b][j] = f_b . g_j + bias[j]; returns sum softplus(x) (float64); A (B x D) = sum_j sigmoid(x) g_j.
template <typename row_t>
double nce_pass(const float* F, int64_t B, int64_t D, const row_t* g, const int64_t* index, int64_t K, bool bf16,
                const float* bias, float* A) {
  const int64_t Dp = fma_blocks::padded(D);
  const auto Fp = fma_blocks::pad_features(F, B, D, bf16);
  const fma_blocks::Rows<row_t> rows{g, index, D, bf16};
  const int64_t threads = at::get_num_threads();
  std::vector<std::vector<double>> At(static_cast<size_t>(threads));
  std::vector<double> sums(static_cast<size_t>(threads), 0.0);
  const int64_t T = fma_blocks::split(K, [&](int64_t t, int64_t r0, int64_t r1) {
    At[t].assign(static_cast<size_t>(B * Dp), 0.0);
    NceSums sum;  // the whole range's terms: one log per 256 vectors, not per row and block
    fma_blocks::pass(Fp.data(), B, rows, r0, r1, At[t].data(), [&](int64_t, int nq, int64_t j0, int64_t nr, float* S) {
      for (int i = 0; i < nq; ++i) {
        float* x = S + i * fma_blocks::SR;
        nce_row<float, true>(x, nr, sum, bias + j0);  // x <- sigmoid(x + bias)
      }
    });
    sums[t] = sum.total();
  });
  double total = 0;
  for (int64_t t = 0; t < T; ++t) total += sums[t];
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t d = 0; d < D; ++d) {
      double a = 0;
      for (int64_t t = 0; t < T; ++t) a += At[t][b * Dp + d];
      A[b * D + d] = static_cast<float>(a);
    }
  }
  return total;
}

// The Z estimate's pass: log sum exp of f_b . g_j over every b and j (float64; NaN if a score is).
template <typename row_t>
double lse_pass(const float* F, int64_t B, int64_t D, const row_t* g, const int64_t* index, int64_t K, bool bf16) {
  const auto Fp = fma_blocks::pad_features(F, B, D, bf16);
  const fma_blocks::Rows<row_t> rows{g, index, D, bf16};
  const int64_t threads = at::get_num_threads();
  std::vector<double> Ms(static_cast<size_t>(threads)), sums(static_cast<size_t>(threads));
  const int64_t T = fma_blocks::split(K, [&](int64_t t, int64_t r0, int64_t r1) {
    float M = -std::numeric_limits<float>::infinity();
    double sum = 0;
    bool nan = false;
    fma_blocks::pass(Fp.data(), B, rows, r0, r1, nullptr, [&](int64_t, int nq, int64_t, int64_t nr, float* S) {
      for (int i = 0; i < nq; ++i) {
        float* x = S + i * fma_blocks::SR;
        const float mx = row_max(x, nr);
        nan = nan || mx != mx;
        if (nan || mx == -std::numeric_limits<float>::infinity() || M == std::numeric_limits<float>::infinity())
          continue;
        if (mx == std::numeric_limits<float>::infinity()) {  // an overflowed score: the sum is +inf
          M = mx;
          sum = 1;
          continue;
        }
        if (mx > M) {
          sum *= std::exp(static_cast<double>(M) - mx);  // 0 on the first row (M = -inf)
          M = mx;
        }
        sum += row_exp_sum<float, false>(x, nr, M);
      }
    });
    Ms[t] = nan ? std::numeric_limits<double>::quiet_NaN() : static_cast<double>(M);
    sums[t] = sum;
  });
  return merge_lse(Ms.data(), sums.data(), T);
}
#endif

}  // namespace
