// The block pass shared by the CPU kernels that score feature rows against bank rows and sum the
// rows back with weights (softmax_kernels.h: the exact softmax; nce_shared_kernels.h: the shared
// negatives' NCE and Z passes): S = F V^T and A += W V in fp32 FMA register tiles, block by block,
// the scores of SQ feature rows x SR bank rows never leaving L1. Needs AVX2 + FMA: included (no
// guard) inside `#if INSTDISC_VARIANT_LEVEL >= 1` of a kernel header, after rows.h and simd_math.h.
namespace fma_blocks {

constexpr int SQ = 6;   // feature rows per register tile (simd::fma_tile_6x16)
constexpr int SL = 16;  // bank rows per score tile, feature values per weighted-sum tile (two vectors)
constexpr int SR = 96;  // bank rows per block (a multiple of SL): 48 KiB of fp32 at D = 128, kept in L2
static_assert(SQ == 6 && SL == 16, "the tile is simd::fma_tile_6x16");
constexpr int SQB = 48;  // feature rows per pass over a block (a multiple of SQ): their A rows stay in L1/L2

inline int64_t padded(int64_t D) { return (D + SL - 1) / SL * SL; }

// F (B x D) as B x Dp fp32, zero past D (the layout every pass reads).
inline std::vector<float> pad_features(const float* F, int64_t B, int64_t D) {
  const int64_t Dp = padded(D);
  std::vector<float> Fp(static_cast<size_t>(B * Dp), 0.0f);
  for (int64_t b = 0; b < B; ++b) std::copy(F + b * D, F + (b + 1) * D, Fp.data() + b * Dp);
  return Fp;
}

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
    __m256 acc[SQ][2];
    simd::fma_tile_6x16(f, vt + g * D * SL, D, acc);
#pragma GCC unroll 6
    for (int i = 0; i < SQ; ++i) {
      _mm256_storeu_ps(S + i * SR + g * SL, acc[i][0]);
      _mm256_storeu_ps(S + i * SR + g * SL + 8, acc[i][1]);
    }
  }
}

inline void add_to(double* a, __m256 x) {  // a[0..8) += x
  _mm256_storeu_pd(a, _mm256_add_pd(_mm256_loadu_pd(a), _mm256_cvtps_pd(_mm256_castps256_ps128(x))));
  _mm256_storeu_pd(a + 4, _mm256_add_pd(_mm256_loadu_pd(a + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1))));
}

// a[i] += sum_j W[i][j] v_j (j < nr) for SQ rows of float64 sums; each block's sum is formed in fp32
// registers (nr terms), so the rounding does not grow with the bank. Only the first nq are written.
inline void accumulate(double* const* a, int nq, const float* W, const float* vr, int64_t nr, int64_t Dp) {
  for (int64_t dg = 0; dg < Dp; dg += SL) {
    __m256 acc[SQ][2];
    for (int i = 0; i < SQ; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < nr; ++j) {
      const __m256 b0 = _mm256_loadu_ps(vr + j * Dp + dg), b1 = _mm256_loadu_ps(vr + j * Dp + dg + 8);
#pragma GCC unroll 6
      for (int i = 0; i < SQ; ++i) {
        const __m256 w = _mm256_broadcast_ss(W + i * SR + j);
        acc[i][0] = _mm256_fmadd_ps(w, b0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(w, b1, acc[i][1]);
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

// The pass over bank rows [r0, r1) of v (row stride D) for the B feature rows Fp (B x Dp, from
// pad_features): per block and tile of SQ feature rows q0 .. q0 + nq, the scores S (row i at
// S + i * SR, entries j < nr) are handed to epi(q0, nq, j0, nr, S), which may rewrite them in place
// into weights; with A (B x Dp float64) non-null, A[q0 + i] += sum_j S[i][j] v_{j0 + j} then.
template <typename bank_t, typename Epi>
void pass(const float* Fp, int64_t B, int64_t D, const bank_t* v, int64_t r0, int64_t r1, double* A, Epi&& epi) {
  const int64_t Dp = padded(D);
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
          f[i] = Fp + q * Dp;
          a[i] = A ? A + q * Dp : nullptr;
        }
        scores(f, vt.data(), D, groups, S);
        epi(q0, nq, j0, nr, S);
        if (A) accumulate(a, nq, S, vr.data(), nr, Dp);
      }
    }
  }
}

// Bank rows [0, N) split into T contiguous ranges of whole blocks (T <= the thread count), and
// fn(t, r0, r1) run on each in parallel. Returns T.
template <typename Fn>
int64_t split(int64_t N, Fn&& fn) {
  const int64_t blocks = (N + SR - 1) / SR;
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(t, std::min(N, blocks * t / T * SR), std::min(N, blocks * (t + 1) / T * SR));
  });
  return T;
}

}  // namespace fma_blocks
