// The CPU weighted-kNN top-k kernel (see knn.cpp for the method and its bound), compiled once per
// CPU capability (kernel_variants.h, from knn.cpp): no include guard, no #include but rows.h and
// simd_math.h.
#include "rows.h"
#include "simd_math.h"

namespace {

constexpr int MR = 8;       // queries per register tile
constexpr int LANES = 16;   // bank rows per 512-bit vector
constexpr int NB = 2;       // vectors per tile: 32 bank rows
constexpr int QBLOCK = 64;  // queries per parallel task (a multiple of MR)

constexpr int NBIN = 256;  // threshold histogram bins per query

// Per-query state: the candidate list (s~ values and bank indices; int32: N <
// 2^31) and a histogram of the s~ values >= h0 that tracks the threshold t~.
// Bin b holds s~ in [h0 + b w, h0 + (b + 1) w) (the top bin is open above);
// tb is the highest bin such that bins >= tb hold at least k entries
// (`above` of them), so t~ = h0 + tb w is a lower bound on the k-th largest
// s~ seen. Each new entry costs O(1) and t~ is always current (to one bin).
struct QState {
  std::vector<float> s;
  std::vector<int32_t> j;
  size_t n = 0;                                        // entries in use
  size_t limit = 0;                                    // compact (drop entries < lo) when n reaches it
  float lo = -std::numeric_limits<float>::infinity();  // admit rows with s~ >= lo
  uint32_t* cnt = nullptr;                             // NBIN counters
  double h0 = 0, w = 1;                                // histogram origin and bin width
  float h0f = 0, invw = 1;                             // the same in float, for binning
  int tb = 0;
  size_t above = 0;
  size_t since_rebin = 0;
  // room for `more` entries past n
  void reserve_more(size_t more) {
    if (s.size() < n + more) {
      const size_t cap = std::max(2 * s.size(), n + more);
      s.resize(cap);
      j.resize(cap);
    }
  }
};

inline uint16_t to_bf16(float x) { return c10::BFloat16(x).x; }  // round to nearest even
inline float from_bf16(uint16_t b) { return static_cast<float>(c10::BFloat16(b, c10::BFloat16::from_bits())); }

// Elements 2p, 2p + 1 of a row of D values as one word of two bf16 (the high one 0 past D).
template <typename scalar_t>
inline uint32_t bf16_pair(const scalar_t* row, int64_t D, int64_t p) {
  const int64_t d = 2 * p;
  const uint16_t lo = to_bf16(static_cast<float>(row[d]));
  const uint16_t hi = d + 1 < D ? to_bf16(static_cast<float>(row[d + 1])) : 0;
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// Largest float <= x (x in double): a bound that stays conservative once rounded.
inline float float_below(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) > x) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  return f;
}

struct Ctx {
  int64_t k;
  int64_t Dp;  // bf16 pairs per row (D padded to even)
  const std::vector<double>* twoE;
};

// Histogram over [h0, hi] (hi - h0 may be 0: ties).
void set_histogram(QState& st, double h0, double hi) {
  st.h0 = h0;
  const double span = std::max(hi - h0, 1e-30 + 1e-6 * std::fabs(h0));
  st.w = span / (NBIN - 1);
  st.h0f = static_cast<float>(h0);
  st.invw = static_cast<float>(1 / st.w);
  std::fill(st.cnt, st.cnt + NBIN, 0u);
  st.tb = 0;
  st.above = 0;
  st.since_rebin = 0;
}

// t~ from the threshold bin, lowered by a margin that covers the float rounding
// of the binning, so every entry counted in bins >= tb is >= it.
inline double threshold(const QState& st) {
  return st.h0 + (st.tb - 0.01) * st.w - 1e-6 * (std::fabs(st.h0) + NBIN * st.w);
}

// lo = t~ - 2E.
void update_lo(QState& st, const Ctx& cx, int64_t q) {
  const double t = threshold(st);
  st.lo = std::max(st.lo, float_below(t - (*cx.twoE)[q]));
}

inline void count(QState& st, const Ctx& cx, int64_t q, float v) {
  const float x = (v - st.h0f) * st.invw;
  if (!(x >= 0)) return;  // below the histogram (or NaN)
  const int b = x >= NBIN - 1 ? NBIN - 1 : static_cast<int>(x);
  ++st.cnt[b];
  if (b < st.tb) return;
  ++st.above;
  const size_t k = static_cast<size_t>(cx.k);
  if (st.above - st.cnt[st.tb] < k) return;
  do {
    st.above -= st.cnt[st.tb];
    ++st.tb;
  } while (st.above - st.cnt[st.tb] >= k);
  update_lo(st, cx, q);
}

// Drop entries below lo.
void compact(QState& st) {
  size_t w = 0;
  for (size_t i = 0; i < st.n; ++i) {
    st.s[w] = st.s[i];
    st.j[w] = st.j[i];
    w += st.s[i] >= st.lo;
  }
  st.n = w;
}

// Once t~ is in the upper half of the histogram, the histogram is rebuilt over
// [t~, max s~] from the candidate list (which holds every entry >= lo <= t~).
void rebin(QState& st, const Ctx& cx, int64_t q) {
  compact(st);
  const double t = threshold(st);
  float hi = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < st.n; ++i) hi = std::max(hi, st.s[i]);
  set_histogram(st, t, hi);
  for (size_t i = 0; i < st.n; ++i) count(st, cx, q, st.s[i]);
}

// After entries [from, n) were appended.
inline void admitted(QState& st, const Ctx& cx, int64_t q, size_t from) {
  for (size_t i = from; i < st.n; ++i) count(st, cx, q, st.s[i]);
  st.since_rebin += st.n - from;
  if (st.tb >= NBIN / 2 && st.since_rebin >= NBIN) rebin(st, cx, q);
  if (st.n >= st.limit) {
    compact(st);
    st.limit = 2 * st.n + static_cast<size_t>(cx.k) + 64;
  }
}

// One MR x (NB*LANES) tile, portable: acc[r][l] = sum_p q~[r][p] . v~[l][p] in fp32.
// qp: MR rows of Dp uint32 (bf16 pairs); vp: NB blocks of [Dp][LANES] uint32.
void tile_portable(const uint32_t* qp, const uint32_t* vp, int64_t Dp, float* out /* MR x NB*LANES */) {
  for (int r = 0; r < MR; ++r) {
    for (int b = 0; b < NB; ++b) {
      float acc[LANES] = {0};
      const uint32_t* vb = vp + b * Dp * LANES;
      for (int64_t p = 0; p < Dp; ++p) {
        const uint32_t a = qp[r * Dp + p];
        const float a0 = from_bf16(static_cast<uint16_t>(a)), a1 = from_bf16(static_cast<uint16_t>(a >> 16));
        for (int l = 0; l < LANES; ++l) {
          const uint32_t v = vb[p * LANES + l];
          acc[l] += a1 * from_bf16(static_cast<uint16_t>(v >> 16));
          acc[l] += a0 * from_bf16(static_cast<uint16_t>(v));
        }
      }
      std::memcpy(out + r * NB * LANES + b * LANES, acc, sizeof acc);
    }
  }
}

// The AVX512-BF16 tile: built in the avx512 variant only (knn.cpp's glue asks for it only under
// the avx512_bf16 capability), or, without per-capability builds, from its target attribute.
#if defined(INSTDISC_X86) && defined(__GNUC__) && (INSTDISC_VARIANT_LEVEL >= 2 || !defined(INSTDISC_CPU_VARIANTS))
#define INSTDISC_HAVE_BF16_PATH 1
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void block_avx512bf16(const uint32_t* qblk, int64_t nq,
                                                                                      const uint32_t* vchunk, int64_t n,
                                                                                      int64_t start, QState* states,
                                                                                      int64_t q0, const Ctx& cx) {
  const int64_t Dp = cx.Dp;
  const int64_t ntiles = (n + NB * LANES - 1) / (NB * LANES);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t t = 0; t < ntiles; ++t) {
    const uint32_t* vb0 = vchunk + (t * NB) * Dp * LANES;
    const uint32_t* vb1 = vb0 + Dp * LANES;
    const int64_t col0 = t * NB * LANES;
    const int64_t left = n - col0;
    const __mmask16 m0 = left >= LANES ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __mmask16 m1 = left >= 2 * LANES ? 0xFFFF
                         : left <= LANES   ? 0
                                           : static_cast<__mmask16>((1u << (left - LANES)) - 1);
    for (int64_t r0 = 0; r0 < nq; r0 += MR) {
      const uint32_t* qa = qblk + r0 * Dp;
      __m512 acc[MR][NB];
      for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      for (int64_t p = 0; p < Dp; ++p) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(vb0 + p * LANES);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(vb1 + p * LANES);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(qa[r * Dp + p]));
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
          acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
        }
      }
      const int rmax = static_cast<int>(std::min<int64_t>(MR, nq - r0));
      const __m512i cols = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(start + col0)));
      for (int r = 0; r < rmax; ++r) {
        QState& st = states[r0 + r];
        const __m512 lo = _mm512_set1_ps(st.lo);
        const __mmask16 k0 = _mm512_mask_cmp_ps_mask(m0, acc[r][0], lo, _CMP_GE_OQ);
        const __mmask16 k1 = _mm512_mask_cmp_ps_mask(m1, acc[r][1], lo, _CMP_GE_OQ);
        if (!(k0 | k1)) continue;
        st.reserve_more(NB * LANES);
        const size_t from = st.n;
        _mm512_mask_compressstoreu_ps(st.s.data() + st.n, k0, acc[r][0]);
        _mm512_mask_compressstoreu_epi32(st.j.data() + st.n, k0, cols);
        st.n += __builtin_popcount(k0);
        _mm512_mask_compressstoreu_ps(st.s.data() + st.n, k1, acc[r][1]);
        _mm512_mask_compressstoreu_epi32(st.j.data() + st.n, k1, _mm512_add_epi32(cols, _mm512_set1_epi32(LANES)));
        st.n += __builtin_popcount(k1);
        admitted(st, cx, q0 + r0 + r, from);
      }
    }
  }
}
#endif

// The fp32 prefilter (AVX2 + FMA: the avx2 and avx512 builds): s~ = fp32(q) . fp32(v) with fp32
// FMA accumulation, one FQ-query x FR-row register tile at a time. The bank is read where it lies
// (fp32), or widened to fp32 one FRB-row sub-block at a time (bf16, fp16, float64); the block's
// queries are packed transposed, FQ per tile ([tile][D][FQ]), so a tile is 2 x FR accumulators,
// and each accumulator vector holds 8 queries' s~ for one row, compared with their 8 bounds lo.
#if INSTDISC_VARIANT_LEVEL >= 1
#define INSTDISC_HAVE_F32_PATH 1
constexpr int FQ = 16;   // queries per fp32 tile (two 8-lane vectors)
constexpr int FR = 6;    // bank rows per fp32 tile (simd::fma_tile_6x16: 2 x 6 accumulators)
constexpr int FRB = 96;  // bank rows per sub-block (48 KiB at D = 128: in L2 across the tiles)
static_assert(FQ == 16 && FR == 6, "the fp32 tile is simd::fma_tile_6x16");
constexpr int FQB = 256;  // queries per parallel task, at most (a bank pass per block: 256 measured ~1.5x 64)

// queries [0, nq) of a block (float64, row stride D) as fp32, [tile][D][FQ], zero past nq.
void pack_queries_f32(const double* q, int64_t nq, int64_t D, float* out) {
  const int64_t tiles = (nq + FQ - 1) / FQ;
  std::fill(out, out + tiles * D * FQ, 0.0f);
  for (int64_t r = 0; r < nq; ++r) {
    float* o = out + (r / FQ) * D * FQ + r % FQ;
    for (int64_t d = 0; d < D; ++d) o[d * FQ] = static_cast<float>(q[r * D + d]);
  }
}

template <typename scalar_t>
void block_f32(const float* qpk, int64_t nq, const scalar_t* v, int64_t n, int64_t D, int64_t start, QState* states,
               int64_t q0, const Ctx& cx, std::vector<float>& scratch) {
  const int64_t tiles = (nq + FQ - 1) / FQ;
  float los[FQB];  // each query's lo, kept equal to states[].lo (+inf past nq)
  for (int64_t r = 0; r < FQB; ++r) los[r] = r < nq ? states[r].lo : std::numeric_limits<float>::infinity();
  for (int64_t sb = 0; sb < n; sb += FRB) {
    const int64_t nr = std::min<int64_t>(FRB, n - sb);
    const float* rows = nullptr;
    if constexpr (std::is_same_v<scalar_t, float>) {
      rows = v + sb * D;
    } else {
      scratch.resize(static_cast<size_t>(FRB * D));
      rows::widen(v + sb * D, scratch.data(), nr * D);
      rows = scratch.data();
    }
    for (int64_t t = 0; t < tiles; ++t) {
      const float* qa = qpk + t * D * FQ;
      // entries are appended during the sub-block and counted (threshold, lo) after it
      const int64_t tq = std::min<int64_t>(FQ, nq - t * FQ);
      size_t from[FQ];
      for (int64_t l = 0; l < tq; ++l) {
        states[t * FQ + l].reserve_more(static_cast<size_t>(nr));
        from[l] = states[t * FQ + l].n;
      }
      for (int64_t j0 = 0; j0 < nr; j0 += FR) {
        const int jn = static_cast<int>(std::min<int64_t>(FR, nr - j0));
        const float* r[FR];
        for (int j = 0; j < FR; ++j) r[j] = rows + std::min<int64_t>(j0 + j, nr - 1) * D;
        __m256 acc[FR][2];  // acc[j][h]: row j's s~ for queries 8 h .. 8 h + 8 of the tile
        simd::fma_tile_6x16(r, qa, D, acc);
        // out of registers with constant indices only (a runtime index would keep acc in memory)
        alignas(32) float sv[FR][FQ];
#pragma GCC unroll 6
        for (int j = 0; j < FR; ++j) {
          _mm256_store_ps(sv[j], acc[j][0]);
          _mm256_store_ps(sv[j] + 8, acc[j][1]);
        }
        const __m256 lo0 = _mm256_loadu_ps(los + t * FQ), lo1 = _mm256_loadu_ps(los + t * FQ + 8);
        for (int j = 0; j < jn; ++j) {
          unsigned m =
              static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_load_ps(sv[j]), lo0, _CMP_GE_OQ))) |
              static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_load_ps(sv[j] + 8), lo1, _CMP_GE_OQ))) << 8;
          const int32_t col = static_cast<int32_t>(start + sb + j0 + j);
          while (m) {  // (lanes past nq compare with +inf: never set)
            const int l = __builtin_ctz(m);
            QState& st = states[t * FQ + l];
            st.s[st.n] = sv[j][l];
            st.j[st.n] = col;
            ++st.n;
            m &= m - 1;
          }
        }
      }
      for (int64_t l = 0; l < tq; ++l) {
        QState& st = states[t * FQ + l];
        if (st.n == from[l]) continue;
        admitted(st, cx, q0 + t * FQ + l, from[l]);
        los[t * FQ + l] = st.lo;
      }
    }
  }
}
#endif

void block_portable(const uint32_t* qblk, int64_t nq, const uint32_t* vchunk, int64_t n, int64_t start, QState* states,
                    int64_t q0, const Ctx& cx) {
  const int64_t Dp = cx.Dp;
  const int64_t ntiles = (n + NB * LANES - 1) / (NB * LANES);
  std::vector<float> out(MR * NB * LANES);
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t col0 = t * NB * LANES;
    const int64_t cols = std::min<int64_t>(NB * LANES, n - col0);
    for (int64_t r0 = 0; r0 < nq; r0 += MR) {
      tile_portable(qblk + r0 * Dp, vchunk + t * NB * Dp * LANES, Dp, out.data());
      const int64_t rmax = std::min<int64_t>(MR, nq - r0);
      for (int64_t r = 0; r < rmax; ++r) {
        QState& st = states[r0 + r];
        st.reserve_more(NB * LANES);
        const size_t from = st.n;
        for (int64_t l = 0; l < cols; ++l) {
          const float s = out[r * NB * LANES + l];
          if (s >= st.lo) {
            st.s[st.n] = s;
            st.j[st.n] = static_cast<int32_t>(start + col0 + l);
            ++st.n;
          }
        }
        admitted(st, cx, q0 + r0 + r, from);
      }
    }
  }
}

// rows [r0, r0 + rows) of x (any float dtype, row stride D) rounded to bf16 pairs.
template <typename scalar_t>
void pack_rows_q(const scalar_t* x, int64_t rows, int64_t D, int64_t Dp, uint32_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t p = 0; p < Dp; ++p) out[r * Dp + p] = bf16_pair(x + r * D, D, p);
  }
}

// bank rows [0, n) of one chunk into blocks of LANES rows: [block][p][lane] (zero padded).
template <typename scalar_t>
void pack_chunk(const scalar_t* v, int64_t n, int64_t D, int64_t Dp, uint32_t* out, int64_t nblocks) {
  at::parallel_for(0, nblocks, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      uint32_t* o = out + b * Dp * LANES;
      for (int64_t l = 0; l < LANES; ++l) {
        const int64_t row = b * LANES + l;
        for (int64_t p = 0; p < Dp; ++p) o[p * LANES + l] = row < n ? bf16_pair(v + row * D, D, p) : 0u;
      }
    }
  });
}

// Per row: |x|, |x~|, |x - x~| in float64, x~ the prefilter's rounding of x (bf16, or fp32 when f32).
template <typename scalar_t>
void row_norms(const scalar_t* x, int64_t rows, int64_t D, bool f32, double* nx, double* nt, double* nd) {
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double a = 0, b = 0, c = 0;
      for (int64_t d = 0; d < D; ++d) {
        const double v = static_cast<double>(x[r * D + d]);
        const float f = static_cast<float>(x[r * D + d]);
        const double t = static_cast<double>(f32 ? f : from_bf16(to_bf16(f)));
        a += v * v;
        b += t * t;
        c += (v - t) * (v - t);
      }
      nx[r] = std::sqrt(a);
      nt[r] = std::sqrt(b);
      nd[r] = std::sqrt(c);
    }
  });
}

// Which prefilter knn_topk_impl runs (knn.cpp picks it from the CPU capability).
enum class Prefilter : int { kBf16Portable = 0, kF32 = 1, kBf16Avx512 = 2 };

// queries: float64 (a small copy); bank: its own dtype, read in place.
template <typename scalar_t>
void knn_topk_impl(const at::Tensor& queries, const at::Tensor& bank, int64_t k, int64_t chunk, Prefilter pre,
                   at::Tensor& values, at::Tensor& indices) {
  const int64_t Q = queries.size(0), N = bank.size(0), D = bank.size(1);
  const int64_t Dp = (D + 1) / 2;
  const double* qx = queries.data_ptr<double>();
  const scalar_t* vx = bank.data_ptr<scalar_t>();
#ifndef INSTDISC_HAVE_F32_PATH
  if (pre == Prefilter::kF32) pre = Prefilter::kBf16Portable;
#endif
#ifndef INSTDISC_HAVE_BF16_PATH
  if (pre == Prefilter::kBf16Avx512) pre = Prefilter::kBf16Portable;
#endif
  const bool f32 = pre == Prefilter::kF32;

  // norms and the per-query bound 2E
  std::vector<double> qn(Q), qt(Q), qd(Q), vn(N), vt(N), vd(N);
  row_norms(qx, Q, D, f32, qn.data(), qt.data(), qd.data());
  row_norms(vx, N, D, f32, vn.data(), vt.data(), vd.data());
  for (int64_t r = 0; r < N; ++r)
    INSTDISC_CHECK_VALUE(std::isfinite(vn[r]) && std::isfinite(vt[r]), "knn: bank row ", r,
                         " is not finite (NaN or inf)");
  const double Mv = *std::max_element(vn.begin(), vn.end());
  const double Mt = *std::max_element(vt.begin(), vt.end());
  const double Rv = *std::max_element(vd.begin(), vd.end());
  const double u32 = std::ldexp(1.0, -24), u64 = std::ldexp(1.0, -53);
  const double n32 = static_cast<double>(f32 ? D : 2 * Dp), n64 = static_cast<double>(D + 1);
  const double g32 = n32 * u32 / (1 - n32 * u32), g64 = n64 * u64 / (1 - n64 * u64);
  std::vector<double> twoE(Q);
  for (int64_t q = 0; q < Q; ++q) {
    const double scale = qt[q] * Mt;
    INSTDISC_CHECK_VALUE(std::isfinite(qn[q]) && std::isfinite(qt[q]), "knn: query ", q, " is not finite (NaN or inf)");
    INSTDISC_CHECK_VALUE(scale < 1e30 && qn[q] * Mv < 1e30,
                         "knn: row norms too large for the prefilter (|query| * |bank row| >= 1e30)");
    const double flush = std::ldexp(1.0, -126) * (std::sqrt(n32) * (qt[q] + Mt) + 2 * n32);
    const double e = qt[q] * Rv + qd[q] * Mv + g32 * scale + g64 * qn[q] * Mv + flush;
    twoE[q] = 2 * e * (1 + 1e-9);
  }
  const Ctx cx{k, Dp, &twoE};

  const int64_t Qpad = (Q + MR - 1) / MR * MR;
  const int64_t tile_rows = NB * LANES;
  const int64_t chunk_rows = std::max<int64_t>(tile_rows, (chunk + tile_rows - 1) / tile_rows * tile_rows);
  // the bf16 prefilters: queries as bf16 pairs, each bank chunk packed into 32-row blocks;
  // the fp32 one: queries transposed in 16-query tiles, the bank read in place
  std::vector<uint32_t> qpack, vpack;
  std::vector<float> qf32;
  if (f32) {
#ifdef INSTDISC_HAVE_F32_PATH
    qf32.resize(static_cast<size_t>((Q + FQ - 1) / FQ * FQ * D));
    pack_queries_f32(qx, Q, D, qf32.data());
#endif
  } else {
    qpack.assign(static_cast<size_t>(Qpad * Dp), 0u);
    pack_rows_q(qx, Q, D, Dp, qpack.data());
    vpack.resize(static_cast<size_t>(std::min(chunk_rows, (N + tile_rows - 1) / tile_rows * tile_rows) * Dp));
  }
  int64_t packed = -1;  // start row of the chunk in vpack
  // Queries go in groups whose states (histogram + list, a few KB each) live
  // together. With a one-chunk bank, packed once, groups cost nothing: 2048
  // queries per group bound the state memory. Otherwise all queries form one
  // group, so that each chunk is packed once.
  // queries per parallel task: QBLOCK, or for the fp32 prefilter (which reads the bank once per task)
  // up to FQB, a multiple of its tile, with at least one task per thread
  const int64_t threads = at::get_num_threads();
#ifdef INSTDISC_HAVE_F32_PATH
  const int64_t qblock = f32 ? std::clamp<int64_t>(((Q + threads - 1) / threads + FQ - 1) / FQ * FQ, FQ, FQB) : QBLOCK;
#else
  const int64_t qblock = QBLOCK;
#endif
  const int64_t group = N <= chunk_rows ? std::max<int64_t>(2048, 4 * qblock * threads) : Q;
  // similarities out in float64 when an input is float64, else float32
  double* ov64 = values.scalar_type() == at::kDouble ? values.data_ptr<double>() : nullptr;
  float* ov32 = ov64 ? nullptr : values.data_ptr<float>();
  auto* oi = indices.data_ptr<int64_t>();
  for (int64_t g0 = 0; g0 < Q; g0 += group) {
    const int64_t G = std::min(group, Q - g0);
    std::vector<QState> states(G);
    std::vector<uint32_t> counts(static_cast<size_t>(G) * NBIN);
    for (int64_t i = 0; i < G; ++i) {
      QState& st = states[i];
      st.cnt = counts.data() + i * NBIN;
      st.limit = 2 * static_cast<size_t>(k) + 64;
      const double R = qt[g0 + i] * Mt * (1 + g32) + 1e-30;  // |s~| <= R
      set_histogram(st, -R, R);
    }
    const int64_t nblk = (G + qblock - 1) / qblock;
    for (int64_t start = 0; start < N; start += chunk_rows) {
      const int64_t n = std::min(chunk_rows, N - start);
      if (!f32 && packed != start) {
        pack_chunk(vx + start * D, n, D, Dp, vpack.data(), (n + tile_rows - 1) / tile_rows * NB);
        packed = start;
      }
      at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
        std::vector<float> scratch;
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t q0 = g0 + b * qblock, nq = std::min<int64_t>(qblock, g0 + G - q0);
          QState* st = states.data() + (q0 - g0);
          switch (pre) {
#ifdef INSTDISC_HAVE_F32_PATH
            case Prefilter::kF32:
              block_f32(qf32.data() + q0 * D, nq, vx + start * D, n, D, start, st, q0, cx, scratch);
              break;
#endif
#ifdef INSTDISC_HAVE_BF16_PATH
            case Prefilter::kBf16Avx512:
              block_avx512bf16(qpack.data() + q0 * Dp, nq, vpack.data(), n, start, st, q0, cx);
              break;
#endif
            default:
              block_portable(qpack.data() + q0 * Dp, nq, vpack.data(), n, start, st, q0, cx);
          }
        }
      });
    }

    // rescore in float64, k best by (similarity desc, index asc)
    at::parallel_for(0, G, 16, [&](int64_t i0, int64_t i1) {
      std::vector<std::pair<double, int64_t>> r;
      std::vector<double> buf(D);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t q = g0 + i;
        QState& st = states[i];
        compact(st);
        // the bound keeps every row of the top k, and at least k rows
        TORCH_INTERNAL_ASSERT(st.n >= static_cast<size_t>(k), "knn: query ", q, " kept ", st.n, " < k rows");
        r.resize(st.n);
        rows::for_each_row(vx, D, st.j.data(), static_cast<int64_t>(st.n), D, buf.data(),
                           [&](int64_t c, const double* v) { r[c] = {rows::dot(qx + q * D, v, D), st.j[c]}; });
        std::vector<float>().swap(st.s);
        std::vector<int32_t>().swap(st.j);
        std::partial_sort(r.begin(), r.begin() + k, r.end(), [](const auto& a, const auto& b) {
          return a.first > b.first || (a.first == b.first && a.second < b.second);
        });
        for (int64_t c = 0; c < k; ++c) {
          if (ov64)
            ov64[q * k + c] = r[c].first;
          else
            ov32[q * k + c] = static_cast<float>(r[c].first);
          oi[q * k + c] = r[c].second;
        }
      }
    });
  }
}

}  // namespace

#undef INSTDISC_HAVE_BF16_PATH
#undef INSTDISC_HAVE_F32_PATH
