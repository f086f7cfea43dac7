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

// x rounded to the nearest bfloat16 (ties to even), as fp32; NaN stays NaN, a value past the bf16
// range becomes +-inf (the same as torch's x.bfloat16().float()).
inline float round_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return x;
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&x, &u, sizeof u);
  return x;
}

// round_bf16 on 8 values.
inline __m256 round_bf16(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)),
                                     _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
  return _mm256_blendv_ps(_mm256_castsi256_ps(r), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// F (B x D) as B x Dp fp32, zero past D (the layout every pass reads); with bf16, every value
// rounded to bfloat16 (the products of two bf16 values are exact in fp32).
inline std::vector<float> pad_features(const float* F, int64_t B, int64_t D, bool bf16 = false) {
  const int64_t Dp = padded(D);
  std::vector<float> Fp(static_cast<size_t>(B * Dp), 0.0f);
  for (int64_t b = 0; b < B; ++b) {
    float* dst = Fp.data() + b * Dp;
    std::copy(F + b * D, F + (b + 1) * D, dst);
    if (bf16) std::transform(dst, dst + D, dst, [](float x) { return round_bf16(x); });
  }
  return Fp;
}

// Where the pass reads its rows: row j of the selection is v[index[j]] (index null: v[j]), row
// stride D; with bf16, the rows' values rounded to bfloat16 once read.
template <typename bank_t>
struct Rows {
  const bank_t* v;
  const int64_t* index;
  int64_t D;
  bool bf16;
  const bank_t* row(int64_t j) const { return v + (index ? index[j] : j) * D; }
  void prefetch(int64_t j) const {  // row j towards L2
    const char* p = reinterpret_cast<const char*>(row(j));
    for (int64_t o = 0; o < D * static_cast<int64_t>(sizeof(bank_t)); o += 64) _mm_prefetch(p + o, _MM_HINT_T1);
  }
};

// Rows [j0, j0 + nr) of the selection as fp32 twice: row-major vr [SR][Dp] and transposed in
// SL-row groups vt [SR / SL][D][SL] (zero past nr and past D).
template <typename bank_t>
void pack_block(const Rows<bank_t>& rows, int64_t j0, int64_t nr, int64_t Dp, float* vr, float* vt) {
  const int64_t D = rows.D;
  std::fill(vr, vr + SR * Dp, 0.0f);
  std::fill(vt, vt + SR * D, 0.0f);
  constexpr int64_t ahead = 4;  // rows prefetched ahead (the first block; pass() prefetches the rest)
  for (int64_t j = 0; j < nr; ++j) {
    if (rows.index && j + ahead < nr) rows.prefetch(j0 + j + ahead);
    float* r = vr + j * Dp;
    rows::widen(rows.row(j0 + j), r, D);
    if (rows.bf16) {
      for (int64_t d = 0; d < Dp; d += 8) _mm256_storeu_ps(r + d, round_bf16(_mm256_loadu_ps(r + d)));  // 0 past D
    }
    float* t = vt + (j / SL) * D * SL + j % SL;
    for (int64_t d = 0; d < D; ++d) t[d * SL] = r[d];
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

// The pass over rows [r0, r1) of the selection for the B feature rows Fp (B x Dp, from
// pad_features): per block and tile of SQ feature rows q0 .. q0 + nq, the scores S (row i at
// S + i * SR, entries j < nr) are handed to epi(q0, nq, j0, nr, S), which may rewrite them in place
// into weights; with A (B x Dp float64) non-null, A[q0 + i] += sum_j S[i][j] v_{j0 + j} then.
template <typename bank_t, typename Epi>
void pass(const float* Fp, int64_t B, const Rows<bank_t>& rows, int64_t r0, int64_t r1, double* A, Epi&& epi) {
  const int64_t D = rows.D, Dp = padded(D);
  std::vector<float> vr(static_cast<size_t>(SR * Dp)), vt(static_cast<size_t>(SR * D));
  const int64_t tiles = (B + SQ - 1) / SQ;  // register tiles per block (SQB is a multiple of SQ)
  alignas(32) float S[SQ * SR];
  for (int64_t j0 = r0; j0 < r1; j0 += SR) {
    const int64_t nr = std::min<int64_t>(SR, r1 - j0);
    pack_block(rows, j0, nr, Dp, vr.data(), vt.data());
    const int64_t groups = (nr + SL - 1) / SL;
    // the next block's rows (a selection's lie anywhere in the bank) fetched towards L2 a few per
    // tile while this block is scored, so its pack_block finds them there
    const int64_t next = j0 + SR, next_nr = std::min<int64_t>(SR, r1 - next);
    const int64_t per_tile = rows.index && next_nr > 0 ? (next_nr + tiles - 1) / tiles : 0;
    int64_t ahead = 0;
    for (int64_t qb = 0; qb < B; qb += SQB) {
      const int64_t qe = std::min<int64_t>(B, qb + SQB);
      for (int64_t q0 = qb; q0 < qe; q0 += SQ) {
        for (int64_t e = std::min(next_nr, ahead + per_tile); ahead < e; ++ahead) rows.prefetch(next + ahead);
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

// Rows [0, N) split into T contiguous ranges of whole blocks (T <= the thread count), and
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
