// The exact softmax's CPU kernel (softmax.cpp): the online log-sum-exp state of S = F V^T over
// every bank row, with both products in fp32 FMA register tiles and the scores never leaving a
// 6 x 96 block in L1. Compiled once per CPU capability (kernel_variants.h); the tiles need AVX2 +
// FMA (INSTDISC_VARIANT_LEVEL >= 1), the baseline build has no kernel (softmax.cpp falls back).
// No include guard, no #include but rows.h, simd_math.h and fma_blocks.h (the block pass).
#include "rows.h"
#include "simd_math.h"

namespace {

#if INSTDISC_VARIANT_LEVEL >= 1
#include "fma_blocks.h"

// One thread's running state over its share of the bank: per feature row b the max m[b] of its
// scores so far, l[b] = sum exp(s - m[b]) and A[b] = sum exp(s - m[b]) v (Dp values, zero past D),
// l and A in float64 (fma_blocks::accumulate).
struct SoftmaxState {
  std::vector<float> m;
  std::vector<double> l, A;
};

// One feature row's online step over the block's nr scores s: m' = max(m, max s); l and the A row
// rescaled by exp(m - m') when the max rose; s <- exp(s - m'); l += sum s.
inline void online_step(float* s, int64_t nr, float& m, double& l, double* a, int64_t Dp) {
  float mx = s[0];
  int64_t j = 0;
  if (nr >= 8) {
    __m256 v = _mm256_loadu_ps(s);
    for (j = 8; j + 8 <= nr; j += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(s + j));
    mx = simd::hmax(v);
  }
  for (; j < nr; ++j) mx = std::max(mx, s[j]);
  if (mx > m) {
    const double sc = std::exp(static_cast<double>(m) - mx);  // 0 on the first block (m = -inf)
    l *= sc;
    for (int64_t d = 0; d < Dp; ++d) a[d] *= sc;
    m = mx;
  }
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  for (j = 0; j + 8 <= nr; j += 8) {
    const __m256 e = simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    _mm256_storeu_ps(s + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, sum);
  double total = 0;
  for (int k = 0; k < 8; ++k) total += t[k];
  for (; j < nr; ++j) {
    s[j] = std::exp(s[j] - m);
    total += s[j];
  }
  l += total;
}

// (m, l, A) over N rows v_j = v[index[j]] (index null: the whole bank, v[j]): one contiguous range
// of rows per thread (fma_blocks::split), the ranges' states merged (m = max, l and A summed with
// exp(m_t - m)); bf16: both operands rounded to bfloat16 first. Outputs: m, l (B), A (B x D).
template <typename bank_t>
void softmax_state(const float* F, int64_t B, int64_t D, const bank_t* v, const int64_t* index, int64_t N, bool bf16,
                   float* m, float* l, float* A) {
  const int64_t Dp = fma_blocks::padded(D);
  const auto Fp = fma_blocks::pad_features(F, B, D, bf16);
  const fma_blocks::Rows<bank_t> rows{v, index, D, bf16};
  std::vector<SoftmaxState> states(static_cast<size_t>(at::get_num_threads()));
  const int64_t T = fma_blocks::split(N, [&](int64_t t, int64_t r0, int64_t r1) {
    SoftmaxState& st = states[t];
    st.m.assign(static_cast<size_t>(B), -std::numeric_limits<float>::infinity());
    st.l.assign(static_cast<size_t>(B), 0.0);
    st.A.assign(static_cast<size_t>(B * Dp), 0.0);
    fma_blocks::pass(Fp.data(), B, rows, r0, r1, st.A.data(), [&](int64_t q0, int nq, int64_t, int64_t nr, float* S) {
      for (int i = 0; i < nq; ++i)
        online_step(S + i * fma_blocks::SR, nr, st.m[q0 + i], st.l[q0 + i], st.A.data() + (q0 + i) * Dp, Dp);
    });
  });
  std::vector<double> ad(static_cast<size_t>(D));
  for (int64_t b = 0; b < B; ++b) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < T; ++t) mx = std::max(mx, states[t].m[b]);
    double lb = 0;
    std::fill(ad.begin(), ad.end(), 0.0);
    for (int64_t t = 0; t < T; ++t) {
      const SoftmaxState& st = states[t];
      if (st.l[b] == 0) continue;  // an empty range
      const double w = std::exp(static_cast<double>(st.m[b]) - mx);
      lb += st.l[b] * w;
      for (int64_t d = 0; d < D; ++d) ad[d] += w * st.A[b * Dp + d];
    }
    for (int64_t d = 0; d < D; ++d) A[b * D + d] = static_cast<float>(ad[d]);
    m[b] = mx;
    l[b] = static_cast<float>(lb);
  }
}
#endif

}  // namespace
