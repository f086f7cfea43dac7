// Bank-row helpers of the CPU kernels (nce_kernels.h, knn_kernels.h): widening bf16/fp16/fp32 rows
// to the accumulation type, dot with independent partial sums, axpy into double accumulators, and
// prefetched walks over a list of scattered rows (a random gather is latency-bound: the next rows
// are requested early). Compiled once per CPU capability: included (without a guard) by the kernel
// headers, inside the namespaces of kernel_variants.h, which includes what it needs
// (<immintrin.h>, c10 types).
namespace rows {

// How many bank rows to prefetch ahead of the one being read: about 8 KiB of rows (16 fp32 rows
// at D = 128: measured best among 1..64 on the 2-core dev machine, a random gather from L3).
inline int64_t rows_ahead(int64_t row_bytes) {
  return std::clamp<int64_t>(8192 / std::max<int64_t>(row_bytes, 1), 4, 64);
}

// One bank value as acc_t.
template <typename acc_t, typename row_t>
inline acc_t wide(row_t x) {
  if constexpr (std::is_floating_point_v<row_t>) {
    return static_cast<acc_t>(x);
  } else {  // bf16, fp16: through float
    return static_cast<acc_t>(static_cast<float>(x));
  }
}

// Widen n bank values to the accumulation type.
template <typename bank_t, typename acc_t>
inline void widen(const bank_t* __restrict src, acc_t* __restrict dst, int64_t n) {
  if constexpr (std::is_same_v<bank_t, c10::BFloat16>) {
    for (int64_t d = 0; d < n; ++d) {
      uint32_t bits = uint32_t(src[d].x) << 16;
      float f;
      std::memcpy(&f, &bits, sizeof(f));
      dst[d] = static_cast<acc_t>(f);
    }
  } else if constexpr (std::is_same_v<bank_t, c10::Half> && std::is_same_v<acc_t, float>) {
    int64_t d = 0;
#if INSTDISC_VARIANT_LEVEL >= 1  // F16C
    for (; d + 8 <= n; d += 8)
      _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d))));
#endif
    for (; d < n; ++d) dst[d] = static_cast<float>(src[d]);
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] = wide<acc_t>(src[d]);
  }
}

// Whether the AVX2 block kernels (dots8, GradRow::add8) read bank_t rows directly, widening in
// registers (float32 accumulation of float32, bf16 or fp16 rows): for_each_row_block then hands
// out the bank rows themselves, not copies widened into scratch.
template <typename acc_t, typename bank_t>
constexpr bool kDirectRows =
    INSTDISC_VARIANT_LEVEL >= 1 && std::is_same_v<acc_t, float> &&
    (std::is_same_v<bank_t, float> || std::is_same_v<bank_t, c10::BFloat16> || std::is_same_v<bank_t, c10::Half>);

#if INSTDISC_VARIANT_LEVEL >= 1
// 8 consecutive row values as float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

// The row as acc_t values: the bank row itself when the types agree, else widened into buf.
template <typename acc_t, typename bank_t>
inline const acc_t* as_acc(const bank_t* row, acc_t* buf, int64_t D) {
  if constexpr (std::is_same_v<acc_t, bank_t>) {
    return row;
  } else {
    widen(row, buf, D);
    return buf;
  }
}

// a . b for a row a (acc_t, or a bank row widened value by value) and acc_t values b.
template <typename acc_t, typename row_t>
inline acc_t dot(const row_t* __restrict a, const acc_t* __restrict b, int64_t D) {
  constexpr int L = 64 / sizeof(acc_t);  // independent partial sums: one or two vectors
  acc_t p[L] = {};
  int64_t d = 0;
  for (; d + L <= D; d += L)
    for (int j = 0; j < L; ++j) p[j] += wide<acc_t>(a[d + j]) * b[d + j];
  for (int w = L / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) p[j] += p[j + w];
  acc_t s = p[0];
  for (; d < D; ++d) s += wide<acc_t>(a[d]) * b[d];
  return s;
}

// y += a x over D values (x widened value by value when it is a bank row of another type).
template <typename acc_t, typename row_t>
inline void axpy(acc_t* __restrict y, acc_t a, const row_t* __restrict x, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] += a * wide<acc_t>(x[d]);
}

// This thread's scratch of n acc_t values (valid until its next call).
template <typename acc_t>
inline acc_t* scratch(int64_t n) {
  thread_local std::vector<acc_t> s;
  if (static_cast<int64_t>(s.size()) < n) s.resize(static_cast<size_t>(n));
  return s.data();
}

// out[j] = v[j] . f for j < n <= 8 rows. For float32 under AVX2, the 8 dots run interleaved (8
// independent FMA chains instead of one row's chain at a time: 1.5x on a gather + dot + axpy loop
// in a micro-benchmark, L2-resident rows); the sum order differs from dot()'s, not its accuracy.
// v: acc_t rows, or (kDirectRows) the bank rows themselves, widened in registers.
template <typename acc_t, typename row_t>
inline void dots8(const row_t* const* v, int n, const acc_t* __restrict f, int64_t D, acc_t* out) {
#if INSTDISC_VARIANT_LEVEL >= 1
  if constexpr (std::is_same_v<acc_t, float>) {
    if (n == 8) {
      // the first columns' products start the sums: a zeroed accumulator array became a
      // `rep stos` of 256 bytes per call (a fifth of this function's samples in a cpu-clock
      // profile); fma(a, b, 0) and a * b round alike
      __m256 acc[8];
      int64_t d = 0;
      if (D >= 8) {
        const __m256 fv = _mm256_loadu_ps(f);
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_mul_ps(load8(v[r]), fv);
        d = 8;
      } else {
        const __m256 z = _mm256_setzero_ps();
        acc[0] = acc[1] = acc[2] = acc[3] = acc[4] = acc[5] = acc[6] = acc[7] = z;
      }
      for (; d + 8 <= D; d += 8) {
        const __m256 fv = _mm256_loadu_ps(f + d);
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(load8(v[r] + d), fv, acc[r]);
      }
      const __m256 s01 = _mm256_hadd_ps(acc[0], acc[1]), s23 = _mm256_hadd_ps(acc[2], acc[3]);
      const __m256 s45 = _mm256_hadd_ps(acc[4], acc[5]), s67 = _mm256_hadd_ps(acc[6], acc[7]);
      const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
      _mm256_storeu_ps(
          out, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31)));
      for (; d < D; ++d)
        for (int r = 0; r < 8; ++r) out[r] += wide<float>(v[r][d]) * f[d];
      return;
    }
  }
#endif
  for (int r = 0; r < n; ++r) out[r] = dot(v[r], f, D);
}

// A gradient row, the sum of a * x over K+1 bank rows x: summed in acc_t over blocks of kBlock
// rows, each block added into a double total, so the rounding error stays about kBlock ulps of
// the terms whatever K is (a sequential float32 sum lost up to ~K/2 ulps: 7x PyTorch's own error
// at K = 256). A micro A/B of the gather + dot + axpy loop (2-core AVX2 machine, N = 50,000,
// K = 4096, three interleaved runs): blocked within a few percent of the plain float32 sum (the
// noise of the shared machine), an all-double sum 20-25% slower.
template <typename acc_t>
struct GradRow {
  static constexpr int kBlock = 16;
  acc_t* blk;
  double* total;
  int64_t D;
  int n = 0;
  explicit GradRow(int64_t D_) : D(D_) {
    thread_local std::vector<acc_t> b;
    thread_local std::vector<double> t;
    b.assign(static_cast<size_t>(D), acc_t(0));
    t.assign(static_cast<size_t>(D), 0.0);
    blk = b.data();
    total = t.data();
  }
  template <typename row_t>
  void add(acc_t a, const row_t* __restrict x) {
    axpy(blk, a, x, D);
    if (++n == kBlock) flush();
  }
  // sum_j a[j] x[j] over m <= 8 rows. For 8 float32 rows under AVX2 the eight terms of each
  // 8-column slice are summed in a register and added to the block once: one load and store of
  // the accumulator per 8 rows instead of per row (a gather + dot + axpy micro-benchmark, one
  // core, N = 50,000: 2x; the per-row stores were the bottleneck, not the bank reads).
  // x: acc_t rows or (kDirectRows) bank rows, as for dots8.
  template <typename row_t>
  void add8(const acc_t* a, const row_t* const* x, int m) {
#if INSTDISC_VARIANT_LEVEL >= 1
    if constexpr (std::is_same_v<acc_t, float>) {
      if (m == 8) {
        __m256 c[8];
        for (int j = 0; j < 8; ++j) c[j] = _mm256_set1_ps(a[j]);
        // the row pointers and the block in locals: _mm256_storeu_ps may alias anything, so
        // read through x and this they were reloaded after every store (9 loads per 8 columns)
        const row_t* xr[8];
        for (int j = 0; j < 8; ++j) xr[j] = x[j];
        float* const bk = blk;
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) {
          __m256 s = _mm256_mul_ps(c[0], load8(xr[0] + d));
          for (int j = 1; j < 8; ++j) s = _mm256_fmadd_ps(c[j], load8(xr[j] + d), s);
          _mm256_storeu_ps(bk + d, _mm256_add_ps(_mm256_loadu_ps(bk + d), s));
        }
        for (; d < D; ++d) {
          float s = 0;
          for (int j = 0; j < 8; ++j) s += a[j] * wide<float>(xr[j][d]);
          bk[d] += s;
        }
        n += 8;
        if (n >= kBlock) flush();
        return;
      }
    }
#endif
    for (int j = 0; j < m; ++j) add(a[j], x[j]);
  }
  void flush() {
    for (int64_t d = 0; d < D; ++d) {
      total[d] += static_cast<double>(blk[d]);
      blk[d] = acc_t(0);
    }
    n = 0;
  }
  // total = total * r (the running sum rescaled, InfoNCE's online softmax)
  void rescale(double r) {
    flush();
    for (int64_t d = 0; d < D; ++d) total[d] *= r;
  }
  // the sum, flushed (valid until this thread's next GradRow)
  const double* sum() {
    flush();
    return total;
  }
};

inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

// Prefetches the first rows_ahead of the rows idx[0..n) (bytes each); returns rows_ahead.
template <typename bank_t, typename idx_t>
inline int64_t prefetch_first(const bank_t* mem, int64_t stride, const idx_t* idx, int64_t n, int64_t bytes) {
  const int64_t ahead = rows_ahead(bytes);
  for (int64_t k = 0; k < std::min(ahead, n); ++k) prefetch_row(mem + static_cast<int64_t>(idx[k]) * stride, bytes);
  return ahead;
}

// Visits the bank rows idx[0..n) in order: fn(k, v) with v row k as acc_t (widened into buf when
// the types differ), prefetching rows_ahead rows ahead of the one being read.
template <typename acc_t, typename bank_t, typename idx_t, typename Fn>
inline void for_each_row(const bank_t* mem, int64_t stride, const idx_t* idx, int64_t n, int64_t D, acc_t* buf,
                         Fn&& fn) {
  const int64_t bytes = D * static_cast<int64_t>(sizeof(bank_t)), ahead = prefetch_first(mem, stride, idx, n, bytes);
  for (int64_t k = 0; k < n; ++k) {
    if (k + ahead < n) prefetch_row(mem + static_cast<int64_t>(idx[k + ahead]) * stride, bytes);
    fn(k, as_acc<acc_t>(mem + static_cast<int64_t>(idx[k]) * stride, buf, D));
  }
}

// Visits the bank rows idx[0..n) in blocks of up to 8: fn(k0, m, v) with v[0..m) rows k0..k0+m,
// prefetching rows_ahead rows ahead. v points at the bank rows themselves when kDirectRows (the
// block kernels widen in registers) or the types agree, else at acc_t copies in buf (8 D values).
// fn takes `const auto* const* v` and passes it to dots8 / GradRow::add8.
template <typename acc_t, typename bank_t, typename idx_t, typename Fn>
inline void for_each_row_block(const bank_t* mem, int64_t stride, const idx_t* idx, int64_t n, int64_t D, acc_t* buf,
                               Fn&& fn) {
  constexpr bool direct = kDirectRows<acc_t, bank_t> || std::is_same_v<acc_t, bank_t>;
  using row_t = std::conditional_t<direct, bank_t, acc_t>;
  const int64_t bytes = D * static_cast<int64_t>(sizeof(bank_t)), ahead = prefetch_first(mem, stride, idx, n, bytes);
  const row_t* v[8];
  for (int64_t k0 = 0; k0 < n; k0 += 8) {
    const int m = static_cast<int>(std::min<int64_t>(8, n - k0));
    for (int j = 0; j < m; ++j) {
      const int64_t k = k0 + j;
      if (k + ahead < n) prefetch_row(mem + static_cast<int64_t>(idx[k + ahead]) * stride, bytes);
      const bank_t* row = mem + static_cast<int64_t>(idx[k]) * stride;
      if constexpr (direct) {
        v[j] = row;
      } else {
        v[j] = as_acc<acc_t>(row, buf + j * D, D);
      }
    }
    fn(k0, m, v);
  }
}

}  // namespace rows
