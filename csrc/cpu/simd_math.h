// Vector math of the CPU kernels (nce, nce_shared, knn, softmax kernel headers), compiled once per CPU
// capability: included (without a guard) inside the namespaces of kernel_variants.h.
namespace simd {

#if INSTDISC_VARIANT_LEVEL >= 1
// exp of 8 floats: Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2, a degree-5 polynomial; within
// 2 ulp on the normal range). Arguments below -87.3 (a subnormal result) give 0, above 88 give
// exp(88), a NaN gives NaN.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365478515625f);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);  // false below lo and for NaN
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 x0 = x;
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_blendv_ps(_mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), keep), x0, nan);
}

// The FMA register tile of the kNN prefilter and the exact softmax (knn_kernels.h, softmax_kernels.h):
// acc[i][h] = sum_d p[i][d] * w[d][8 h .. 8 h + 8) for 6 rows p (broadcast one value at a time) and
// a panel w of D x 16 values ([D][16], row stride 16): 12 accumulators, 2 loads + 6 broadcasts per
// 12 FMAs. Inlined, so acc stays in registers.
__attribute__((always_inline)) inline void fma_tile_6x16(const float* const* p, const float* w, int64_t D,
                                                         __m256 (&acc)[6][2]) {
  for (int i = 0; i < 6; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 w0 = _mm256_loadu_ps(w + d * 16), w1 = _mm256_loadu_ps(w + d * 16 + 8);
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
      const __m256 a = _mm256_broadcast_ss(p[i] + d);
      acc[i][0] = _mm256_fmadd_ps(a, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(a, w1, acc[i][1]);
    }
  }
}

inline double hsum(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
#endif

}  // namespace simd
