// The exact softmax's CPU kernel (softmax.cpp): the online log-sum-exp state of S = F V^T over
// every bank row, with both products in fp32 FMA register tiles and the scores never leaving a
// 6 x 96 block in L1. Compiled once per CPU capability (kernel_variants.h); the tiles need AVX2 +
// FMA (INSTDISC_VARIANT_LEVEL >= 1), the baseline build has no kernel (softmax.cpp falls back).
// No include guard, no #include but rows.h and simd_math.h.
#include "rows.h"
#include "simd_math.h"

namespace {

#if INSTDISC_VARIANT_LEVEL >= 1
#define INSTDISC_HAVE_SOFTMAX_STATE 1
constexpr int SQ = 6;   // features (rows of F) per register tile (simd::fma_tile_6x16)
constexpr int SL = 16;  // bank rows per score tile, feature values per gradient tile: two 8-lane vectors
constexpr int SR = 96;  // bank rows per block (a multiple of SL): 48 KiB of fp32 at D = 128, kept in L2
static_assert(SQ == 6 && SL == 16, "the tile is simd::fma_tile_6x16");
constexpr int SQB = 48;  // features per pass over a block (a multiple of SQ): their A rows stay in L1/L2

// One thread's running state over its share of the bank: per feature row b the max m[b] of its
// scores so far, l[b] = sum exp(s - m[b]) and A[b] = sum exp(s - m[b]) v (Dp values, zero past D).
// l and A are float64: each block's sums are formed in fp32 registers (96 terms) and added here,
// so the rounding does not grow with N.
struct SoftmaxState {
  std::vector<float> m;
  std::vector<double> l, A;
  void init(int64_t B, int64_t Dp) {
    m.assign(static_cast<size_t>(B), -std::numeric_limits<float>::infinity());
    l.assign(static_cast<size_t>(B), 0.0);
    A.assign(static_cast<size_t>(B * Dp), 0.0);
  }
};

// Bank rows [0, nr) of a block as fp32 twice: row-major vr [SR][Dp] and transposed in SL-row
// groups vt [SR / SL][D][SL] (zero past nr and past D).
template <typename bank_t>
void pack_block(const bank_t* v, int64_t nr, int64_t D, int64_t Dp, float* vr, float* vt) {
  std::fill(vr, vr + SR * Dp, 0.0f);
  std::fill(vt, vt + SR * D, 0.0f);
  for (int64_t j = 0; j < nr; ++j) {
    rows::widen(v + j * D, vr + j * Dp, D);
    float* t = vt + (j / SL) * D * SL + j % SL;
    for (int64_t d = 0; d < D; ++d) t[d * SL] = vr[j * Dp + d];
  }
}

// S[i][j] = f_i . v_j for SQ feature rows f and the block's rows (SR scores per row; past nr: 0).
inline void scores(const float* const* f, const float* vt, int64_t D, int64_t groups, float* S) {
  for (int64_t g = 0; g < groups; ++g) {
    const float* vg = vt + g * D * SL;
    __m256 acc[SQ][2];
    simd::fma_tile_6x16(f, vg, D, acc);
#pragma GCC unroll 6
    for (int i = 0; i < SQ; ++i) {
      _mm256_storeu_ps(S + i * SR + g * SL, acc[i][0]);
      _mm256_storeu_ps(S + i * SR + g * SL + 8, acc[i][1]);
    }
  }
}

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

inline void add_to(double* a, __m256 x) {  // a[0..8) += x
  _mm256_storeu_pd(a, _mm256_add_pd(_mm256_loadu_pd(a), _mm256_cvtps_pd(_mm256_castps256_ps128(x))));
  _mm256_storeu_pd(a + 4, _mm256_add_pd(_mm256_loadu_pd(a + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1))));
}

// A rows a[i] += sum_j p[i][j] v_j for SQ rows (only the first nq are written back).
inline void accumulate(double* const* a, int nq, const float* S, const float* vr, int64_t nr, int64_t Dp) {
  for (int64_t dg = 0; dg < Dp; dg += SL) {
    __m256 acc[SQ][2];
    for (int i = 0; i < SQ; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < nr; ++j) {
      const __m256 b0 = _mm256_loadu_ps(vr + j * Dp + dg), b1 = _mm256_loadu_ps(vr + j * Dp + dg + 8);
#pragma GCC unroll 6
      for (int i = 0; i < SQ; ++i) {
        const __m256 p = _mm256_broadcast_ss(S + i * SR + j);
        acc[i][0] = _mm256_fmadd_ps(p, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(p, b1, acc[i][1]);
      }
    }
#pragma GCC unroll 6
    for (int i = 0; i < SQ; ++i) {
      if (i < nq) {
        add_to(a[i] + dg, acc[i][0]);
        add_to(a[i] + dg + 8, acc[i][1]);
      }
    }
  }
}

// The state over bank rows [r0, r1) into st (initialised): F (B x Dp fp32, zero past D, already
// divided by the temperature), v the bank (row stride D).
template <typename bank_t>
void softmax_state_range(const float* F, int64_t B, int64_t D, int64_t Dp, const bank_t* v, int64_t r0, int64_t r1,
                         SoftmaxState& st) {
  std::vector<float> vr(static_cast<size_t>(SR * Dp)), vt(static_cast<size_t>(SR * D));
  alignas(32) float S[SQ * SR];
  for (int64_t j0 = r0; j0 < r1; j0 += SR) {
    const int64_t nr = std::min<int64_t>(SR, r1 - j0);
    pack_block(v + j0 * D, nr, D, Dp, vr.data(), vt.data());
    const int64_t groups = (nr + SL - 1) / SL;
    for (int64_t qb = 0; qb < B; qb += SQB) {
      const int64_t qe = std::min<int64_t>(B, qb + SQB);
      for (int64_t q0 = qb; q0 < qe; q0 += SQ) {
        const int nq = static_cast<int>(std::min<int64_t>(SQ, qe - q0));
        const float* f[SQ];
        double* a[SQ];
        for (int i = 0; i < SQ; ++i) {
          const int64_t q = q0 + std::min(i, nq - 1);  // past nq: computed, never stored
          f[i] = F + q * Dp;
          a[i] = st.A.data() + q * Dp;
        }
        scores(f, vt.data(), D, groups, S);
        for (int i = 0; i < nq; ++i) online_step(S + i * SR, nr, st.m[q0 + i], st.l[q0 + i], a[i], Dp);
        accumulate(a, nq, S, vr.data(), nr, Dp);
      }
    }
  }
}

// (m, l, A) over the whole bank: its rows split into one contiguous range per thread, the ranges'
// states merged (m = max, l and A summed with exp(m_t - m)). Outputs: m, l (B), A (B x D).
template <typename bank_t>
void softmax_state(const float* F, int64_t B, int64_t D, const bank_t* v, int64_t N, float* m, float* l, float* A) {
  const int64_t Dp = (D + SL - 1) / SL * SL;
  std::vector<float> Fp(static_cast<size_t>(B * Dp), 0.0f);
  for (int64_t b = 0; b < B; ++b) std::copy(F + b * D, F + (b + 1) * D, Fp.data() + b * Dp);
  const int64_t blocks = (N + SR - 1) / SR;
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  std::vector<SoftmaxState> states(static_cast<size_t>(T));
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      states[t].init(B, Dp);
      const int64_t r0 = std::min(N, blocks * t / T * SR), r1 = std::min(N, blocks * (t + 1) / T * SR);
      softmax_state_range(Fp.data(), B, D, Dp, v, r0, r1, states[t]);
    }
  });
  std::vector<double> ad(static_cast<size_t>(D));
  for (int64_t b = 0; b < B; ++b) {
    float mx = -std::numeric_limits<float>::infinity();
    for (const auto& st : states) mx = std::max(mx, st.m[b]);
    double lb = 0;
    std::fill(ad.begin(), ad.end(), 0.0);
    for (const auto& st : states) {
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
