// The CPU NCE kernels on raw pointers: nce_forward (NCE with its Z, InfoNCE, proximal term) and the
// NCEAverage ops (nce_probs, nce_probs_backward, nce_probs_loss). Compiled once per CPU capability
// (kernel_variants.h, from nce_common.h): no include guard, no #include but rows.h and simd_math.h.
//
// Layout of the work: at::parallel_for over batch rows; a batch row reads its K+1 bank rows
// (column 0 the positive y[b], then the negatives) in blocks of 8, prefetching a few rows ahead:
// the NCE pass takes a block's 8 dots at once, then (AVX2, uniform noise) its 8 negatives' terms
// as vectors, then the 8 gradient updates; it never materialises anything of size B x (K+1) x D.
// bf16/fp16 rows are widened to fp32 on the fly; accumulation is fp32 (fp64 when the features are fp64). Per-row losses
// go to a buffer that is summed serially, so every output is bit-identical for any thread count. In-kernel negatives:
// the Philox stream of csrc/philox.h (the same on the CUDA backend).
#include "rows.h"
#include "simd_math.h"

namespace {

using rows::as_acc;
using rows::dot;
using rows::for_each_row;
using rows::for_each_row_block;

// A non-finite score s = V[r] . F[b] (F is finite): bank row r holds NaN/inf, or the dot overflows.
template <typename acc_t>
void flag_score(const NceArgs& a, int64_t b, int64_t row, acc_t s) {
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
    INSTDISC_CHECK_VALUE(finite, "memory row ", r,
                         " contains NaN or inf (nce_loss read it); the bank and Z are left unchanged");
  }
}

#if INSTDISC_VARIANT_LEVEL >= 1
// Philox4x32-10 of csrc/philox.h on 4 counters at once, one per 64-bit lane holding a 32-bit word
// in its low half (_mm256_mul_epu32 reads only those; the high halves carry garbage that never
// reaches a low half).
struct Philox4Lanes {
  __m256i c0, c1, c2, c3;
  Philox4Lanes(__m256i a, __m256i b, __m256i c, __m256i d) : c0(a), c1(b), c2(c), c3(d) {}
  void round(__m256i k0, __m256i k1) {
    const __m256i p0 = _mm256_mul_epu32(c0, _mm256_set1_epi64x(0xD2511F53u));
    const __m256i p1 = _mm256_mul_epu32(c2, _mm256_set1_epi64x(0xCD9E8D57u));
    c0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1), k0);
    c1 = p1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c3), k1);
    c3 = p0;
  }
  // draw words of the 4 blocks: even[i] = (o0 | o1 << 32), odd[i] = (o2 | o3 << 32)
  void words(uint64_t* even, uint64_t* odd) const {
    const __m256i lo = _mm256_set1_epi64x(0xFFFFFFFFll);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(even),
                        _mm256_or_si256(_mm256_and_si256(c0, lo), _mm256_slli_epi64(c1, 32)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(odd),
                        _mm256_or_si256(_mm256_and_si256(c2, lo), _mm256_slli_epi64(c3, 32)));
  }
};

// The 16 draw words 2 blk0 .. 2 blk0 + 15 of batch row b (negatives_block of blocks blk0..blk0+7,
// interleaved: two independent 4-lane streams), in draw order. Equal to the scalar stream (tested
// against docs/negatives.md's transcription under every capability).
inline void negatives_block8(uint64_t seed, uint64_t b, uint64_t blk0, uint64_t* w) {
  const __m256i hi = _mm256_set1_epi64x(static_cast<int64_t>(blk0 >> 32)), blo = _mm256_set1_epi64x(uint32_t(b)),
                bhi = _mm256_set1_epi64x(uint32_t(b >> 32));
  // blk0 is a multiple of 8: blocks blk0 .. blk0 + 7 share its high counter word
  const __m256i base = _mm256_set1_epi64x(uint32_t(blk0));
  Philox4Lanes x(_mm256_add_epi64(base, _mm256_setr_epi64x(0, 1, 2, 3)), hi, blo, bhi);
  Philox4Lanes y(_mm256_add_epi64(base, _mm256_setr_epi64x(4, 5, 6, 7)), hi, blo, bhi);
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const __m256i vk0 = _mm256_set1_epi64x(k0), vk1 = _mm256_set1_epi64x(k1);
    x.round(vk0, vk1);
    y.round(vk0, vk1);
  }
  uint64_t even[8], odd[8];
  x.words(even, odd);
  y.words(even + 4, odd + 4);
  for (int i = 0; i < 8; ++i) {
    w[2 * i] = even[i];
    w[2 * i + 1] = odd[i];
  }
}
#endif

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
  int64_t j = 0;
#if INSTDISC_VARIANT_LEVEL >= 1
  for (; j + 16 <= a.K; j += 16) {  // 8 blocks (16 draws) at a time
    uint64_t w[16];
    negatives_block8(a.seed, ub, static_cast<uint64_t>(j) >> 1, w);
    for (int i = 0; i < 16; ++i) {
      const int64_t v = map_to_range(w[i], range);
      out[1 + j + i] = v + (v >= skip);
    }
  }
#endif
  for (; j < a.K; j += 2) {
    const U32x4 o = negatives_block(a.seed, ub, static_cast<uint64_t>(j) >> 1);
    int64_t v = map_to_range(block_word(o, 0), range);
    out[1 + j] = v + (v >= skip);
    if (j + 1 < a.K) {
      v = map_to_range(block_word(o, 1), range);
      out[2 + j] = v + (v >= skip);
    }
  }
}

// fn(b, idx, buf) for every batch row b, in parallel: idx = its K+1 bank indices, buf = D values of
// scratch (for a widened row).
template <typename acc_t, typename Fn>
void for_batch_rows(const NceArgs& a, Fn&& fn) {
  at::parallel_for(0, a.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> idx(a.K + 1);
    std::vector<acc_t> buf(a.D);
    for (int64_t b = begin; b < end; ++b) {
      row_indices(a, b, idx.data());
      fn(b, idx.data(), buf.data());
    }
  });
}

// Dot-only pre-pass (Z estimated from the batch): scores[b, k] = V[idx[b,k]] . F[b], and per row the
// max of t = s / T and sum exp(t - max).
template <typename bank_t, typename acc_t>
void score_pass(const NceArgs& a, const bank_t* mem, const acc_t* feat, acc_t* scores, std::vector<double>& row_max,
                std::vector<double>& row_sum) {
  const int64_t K1 = a.K + 1, D = a.D;
  const acc_t invT = static_cast<acc_t>(1.0 / a.T);
  for_batch_rows<acc_t>(a, [&](int64_t b, const int64_t* idx, acc_t*) {
    const acc_t* f = feat + b * D;
    acc_t* s = scores + b * K1;
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    acc_t* buf8 = rows::scratch<acc_t>(8 * D);
    for_each_row_block(mem, a.row_stride, idx, K1, D, buf8, [&](int64_t k0, int n, const auto* const* v) {
      rows::dots8(v, n, f, D, s + k0);
      for (int j = 0; j < n; ++j) {
        flag_score(a, b, idx[k0 + j], s[k0 + j]);
        m = std::max(m, s[k0 + j] * invT);
      }
    });
    double sum = 0;
    for (int64_t k = 0; k < K1; ++k) sum += std::exp(s[k] * invT - m);
    row_max[b] = m;
    row_sum[b] = sum;
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
acc_t nce_entry(bool positive, acc_t lp, acc_t kp, acc_t c, acc_t lim, RowLoss& row, acc_t& P, Factor&& factor) {
  P = std::exp(lp);
  if (positive) {  // log(P / (P + c)); coef = -c / (P + c)
    if (lp > lim) return 0;
    if (lp < -lim) {
      row.lsum += lp - std::log(c);
      return -1;
    }
    const acc_t r = c / P;
    row.lsum += -std::log1p(r);
    return -r / (1 + r);
  }
  if (lp > lim) {  // negative: log(K Pn / (P + c)); coef = P / (P + c)
    row.lsum += -(lp - std::log(kp));
    return 1;
  }
  row.mul(factor(static_cast<double>(P) + kEps));
  return P / (P + c);
}

// Eight running products of loss factors (float32 AVX2 path of the NCE pass), folded into a
// RowLoss (as mantissa and exponent) once one exceeds 2^500 (each factor is below 2^160: P <= e^80,
// N/K <= 2^40) and at the end of the batch row.
struct ProductLanes {
#if INSTDISC_VARIANT_LEVEL >= 1
  __m256d p0, p1;
  bool used = false;
  // (an explicit constructor: an implicit one would be compiled outside the target region)
  ProductLanes() : p0(_mm256_set1_pd(1.0)), p1(_mm256_set1_pd(1.0)) {}
  void mul(__m256d f0, __m256d f1, RowLoss& row) {
    p0 = _mm256_mul_pd(p0, f0);
    p1 = _mm256_mul_pd(p1, f1);
    used = true;
    const __m256d big = _mm256_set1_pd(0x1p500);
    if (_mm256_movemask_pd(_mm256_or_pd(_mm256_cmp_pd(p0, big, _CMP_GT_OQ), _mm256_cmp_pd(p1, big, _CMP_GT_OQ))))
      fold(row);
  }
  void fold(RowLoss& row) {
    if (!used) return;
    double l[8];
    _mm256_storeu_pd(l, p0);
    _mm256_storeu_pd(l + 4, p1);
    for (double f : l) {  // f = m 2^e with m in [0.5, 1): the row's product never overflows
      int e;
      row.mul(std::frexp(f, &e));
      row.prod_exp += e;
    }
    p0 = p1 = _mm256_set1_pd(1.0);
    used = false;
  }
#else
  void fold(RowLoss&) {}
#endif
};

// Constants of lemniscate NCE with uniform noise Pn = 1/N.
template <typename acc_t>
struct UniformNce {
  acc_t invT, lz, kp, c, lim;
  double inv_kp;
  UniformNce(const NceArgs& a, double log_z)
      : invT(static_cast<acc_t>(1.0 / a.T)),
        lz(static_cast<acc_t>(log_z)),
        kp(static_cast<acc_t>(double(a.K) / double(a.N))),
        c(static_cast<acc_t>(double(a.K) / double(a.N) + kEps)),
        lim(static_cast<acc_t>(kLogPLimit)),
        inv_kp(double(a.N) / double(a.K)) {}
  acc_t entry(bool positive, acc_t s, RowLoss& row, acc_t& P) const {
    const double ik = inv_kp;
    return nce_entry(positive, s * invT - lz, kp, c, lim, row, P, [ik](double pe) { return 1.0 + pe * ik; });
  }
  // Eight negatives at once (float32, AVX2), what entry() does for each: coef[j], the loss factors
  // 1 + (P + eps) / (K Pn) multiplied into lanes, and P / dloss/dP into probs / grad_probs when
  // given. Returns false, having done nothing, unless every |log P| <= lim (no NaN): the caller
  // then takes entry() per score.
  bool negatives8(const acc_t* s, acc_t* coef, ProductLanes& lanes, RowLoss& row, acc_t* probs, acc_t* grad_probs,
                  acc_t inv_b) const {
#if INSTDISC_VARIANT_LEVEL >= 1
    if constexpr (std::is_same_v<acc_t, float>) {
      const __m256 lp = _mm256_fmsub_ps(_mm256_loadu_ps(s), _mm256_set1_ps(invT), _mm256_set1_ps(lz));
      const __m256 in = _mm256_and_ps(_mm256_cmp_ps(lp, _mm256_set1_ps(lim), _CMP_LE_OQ),
                                      _mm256_cmp_ps(lp, _mm256_set1_ps(-lim), _CMP_GE_OQ));
      if (_mm256_movemask_ps(in) != 0xff) return false;
      const __m256 P = simd::exp8(lp);
      const __m256 inv_den = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(P, _mm256_set1_ps(c)));
      _mm256_storeu_ps(coef, _mm256_mul_ps(P, inv_den));
      if (probs != nullptr) _mm256_storeu_ps(probs, P);
      if (grad_probs != nullptr) _mm256_storeu_ps(grad_probs, _mm256_mul_ps(inv_den, _mm256_set1_ps(inv_b)));
      const __m256d e = _mm256_set1_pd(kEps), ik = _mm256_set1_pd(inv_kp), one = _mm256_set1_pd(1.0);
      const __m256d f0 = _mm256_fmadd_pd(_mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(P)), e), ik, one);
      const __m256d f1 = _mm256_fmadd_pd(_mm256_add_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(P, 1)), e), ik, one);
      lanes.mul(f0, f1, row);
      return true;
    }
#endif
    (void)s, (void)coef, (void)lanes, (void)row, (void)probs, (void)grad_probs, (void)inv_b;
    return false;
  }
};

// NCECriterion's dloss/dP of one entry, times B: positive -c / (P (P + c)), negative 1 / (P + c).
template <typename acc_t>
acc_t criterion_dp(bool positive, acc_t P, acc_t c) {
  return positive ? -(c / (P * (P + c))) : acc_t(1) / (P + c);
}

// lemniscate NCE: per batch row, the loss terms and g = dloss/dF[b]. scores: the pre-pass's dot
// products, or nullptr to compute them here (fixed Z: a single pass). probs, grad_probs: nullptr, or
// (B, K+1) receiving P and dloss/dP (nce_probs_loss; uniform noise).
template <typename bank_t, typename acc_t>
void nce_pass(const NceArgs& a, const bank_t* mem, const acc_t* feat, const acc_t* scores, double log_z, acc_t* grad,
              double* row_loss, acc_t* probs = nullptr, acc_t* grad_probs = nullptr) {
  const int64_t K1 = a.K + 1, D = a.D;
  const UniformNce<acc_t> u(a, log_z);
  const acc_t eps = static_cast<acc_t>(kEps), inv_b = static_cast<acc_t>(1.0 / a.B);
  for_batch_rows<acc_t>(a, [&](int64_t b, const int64_t* idx, acc_t*) {
    const acc_t* f = feat + b * D;
    acc_t* g = grad + b * D;
    acc_t* buf8 = rows::scratch<acc_t>(8 * D);
    rows::GradRow<acc_t> gr(D);
    RowLoss row;
    ProductLanes lanes;
    for_each_row_block(mem, a.row_stride, idx, K1, D, buf8, [&](int64_t k0, int n, const auto* const* v) {
      acc_t s[8], coef[8];
      if (scores != nullptr) {
        for (int j = 0; j < n; ++j) s[j] = scores[b * K1 + k0 + j];
      } else {
        rows::dots8(v, n, f, D, s);
      }
      const int64_t e0 = b * K1 + k0;
      if (!(k0 > 0 && n == 8 && a.noise == nullptr &&
            u.negatives8(s, coef, lanes, row, probs ? probs + e0 : nullptr, grad_probs ? grad_probs + e0 : nullptr,
                         inv_b))) {
        for (int j = 0; j < n; ++j) {  // the positive, noise_probs, |log P| > 80 or NaN, a short block
          const int64_t k = k0 + j;
          flag_score(a, b, idx[k], s[j]);
          acc_t P;
          if (a.noise != nullptr) {
            const acc_t kp = static_cast<acc_t>(a.K) * static_cast<acc_t>(a.noise[idx[k]]);
            coef[j] = nce_entry(k == 0, s[j] * u.invT - u.lz, kp, kp + eps, u.lim, row, P,
                                [kp](double pe) { return 1.0 + pe / static_cast<double>(kp); });
          } else {
            coef[j] = u.entry(k == 0, s[j], row, P);
          }
          if (probs != nullptr) probs[b * K1 + k] = P;
          if (grad_probs != nullptr) grad_probs[b * K1 + k] = criterion_dp(k == 0, P, u.c) * inv_b;
        }
      }
      gr.add8(coef, v, n);
    });
    lanes.fold(row);
    const double scale = 1.0 / (a.T * a.B);
    const double* w = gr.sum();
    for (int64_t d = 0; d < D; ++d) g[d] = static_cast<acc_t>(w[d] * scale);
    row_loss[b] = -row.sum() / a.B;
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
          rows::axpy(gc + b * D, coef, v, D);
        }
      }
    }
  });
  const double scale = 1.0 / (a.T * a.B);
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* g = grad + b * D;
      double total = 0;
      std::vector<double> w(D, 0.0);  // the chunks' partials (about K / C terms each) summed in double
      for (int64_t c = 0; c < C; ++c) {
        const acc_t* gc = g_part.data() + (c * B + b) * D;
        for (int64_t d = 0; d < D; ++d) w[d] += static_cast<double>(gc[d]);
        total += l_part[c * B + b].sum();
      }
      for (int64_t d = 0; d < D; ++d) g[d] = static_cast<acc_t>(w[d] * scale);
      row_loss[b] = -total / a.B;
    }
  });
}

// InfoNCE: softmax cross-entropy over the K+1 logits t (t_0 the positive's) in one pass, with an
// online max/sum over the negatives only: m = max_k t_k, ln = sum_k exp(t_k - m) and
// g = sum_k exp(t_k - m) V_k, rescaled when m grows (once per block of 8 rows). With
// M = max(m, t_0), e0 = exp(t_0 - M), Ln = ln exp(m - M) and L = e0 + Ln, the gradient is
// (g exp(m - M) - Ln V_0) / (L B T): the positive's coefficient p0 - 1 = -Ln / L comes from the
// negatives' sum, never as 1 minus something close to 1, so it keeps its digits when p0 ~ 1 (the
// Triton and CUDA kernels do the same). The loss log(L / e0) is log1p(Ln / e0) likewise
// ((M - t_0) + log L when e0 is tiny).
template <typename bank_t, typename acc_t>
void infonce_pass(const NceArgs& a, const bank_t* mem, const acc_t* feat, acc_t* grad, double* row_loss) {
  const int64_t K1 = a.K + 1, D = a.D;
  const acc_t invT = static_cast<acc_t>(1.0 / a.T);
  for_batch_rows<acc_t>(a, [&](int64_t b, const int64_t* idx, acc_t* buf) {
    const acc_t* f = feat + b * D;
    acc_t* g = grad + b * D;
    rows::GradRow<acc_t> gr(D);
    acc_t t0 = 0, m = -std::numeric_limits<acc_t>::infinity();
    double ln = 0;
    acc_t* buf8 = rows::scratch<acc_t>(8 * D);
    for_each_row_block(mem, a.row_stride, idx, K1, D, buf8, [&](int64_t k0, int n, const auto* const* v) {
      acc_t t[8], e[8];
      rows::dots8(v, n, f, D, t);
      const int first = k0 == 0 ? 1 : 0;  // the positive (k = 0): only its logit
      acc_t bm = m;
      for (int j = 0; j < n; ++j) {
        flag_score(a, b, idx[k0 + j], t[j]);
        t[j] *= invT;
        if (j >= first && t[j] > bm) bm = t[j];
      }
      if (first) t0 = t[0];
      if (bm > m) {  // a new running max: rescale the sums once per block
        const acc_t r = std::exp(m - bm);
        ln *= r;
        gr.rescale(static_cast<double>(r));
        m = bm;
      }
      double bsum = 0;
      for (int j = 0; j < n; ++j) {
        e[j] = j < first ? acc_t(0) : std::exp(t[j] - m);
        bsum += e[j];
      }
      ln += bsum;
      gr.add8(e, v, n);
    });
    const double M = std::max(static_cast<double>(m), static_cast<double>(t0));
    const double sn = std::exp(static_cast<double>(m) - M), e0 = std::exp(static_cast<double>(t0) - M);
    const double Ln = ln * sn, L = e0 + Ln;
    const acc_t* v0 = as_acc<acc_t>(mem + idx[0] * a.row_stride, buf, D);
    const double scale = 1.0 / (L * a.T * a.B);
    const double* w = gr.sum();
    for (int64_t d = 0; d < D; ++d) g[d] = static_cast<acc_t>((w[d] * sn - Ln * static_cast<double>(v0[d])) * scale);
    const double gap = M - static_cast<double>(t0);
    row_loss[b] = (gap < 30 ? std::log1p(Ln / e0) : gap + std::log(L)) / a.B;
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

// --------------------------------------------------------------------------- //
// Entry points (one per op, called through INSTDISC_CPU_DISPATCH)              //
// --------------------------------------------------------------------------- //
// nce_forward: loss terms per row into row_loss, dloss/dF into grad; returns the Z used.
template <typename bank_t, typename acc_t>
double nce_forward_kernel(const NceArgs& a, const bank_t* mem, const acc_t* feat, double z0, double z_ema, acc_t* grad,
                          double* row_loss) {
  double z_used = z0;
  if (a.loss_type == 1) {
    infonce_pass<bank_t, acc_t>(a, mem, feat, grad, row_loss);
  } else {
    z_used = nce_with_z<bank_t, acc_t>(a, mem, feat, z0, z_ema, grad, row_loss, nullptr, nullptr);
  }
  report_bad_rows(a, mem);
  if (a.proximal > 0) proximal_pass<bank_t, acc_t>(a, mem, feat, grad, row_loss);
  return z_used;
}

// nce_probs: probs (B, K1) = exp(V[idx] . F / T) / Z, Z = z0 or (z0 <= 0) estimated from this batch.
// Returns the Z used.
template <typename bank_t, typename acc_t>
double nce_probs_kernel(const bank_t* mem, int64_t rs, const int64_t* ip, int64_t B, int64_t K1, int64_t D, int64_t N,
                        const acc_t* feat, double T, double z0, acc_t* probs) {
  std::vector<double> row_max(B), row_sum(B);
  const acc_t invT = static_cast<acc_t>(1.0 / T);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {  // logits t = s / T
    std::vector<acc_t> buf(D);
    for (int64_t b = begin; b < end; ++b) {
      acc_t* t = probs + b * K1;
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      for_each_row(mem, rs, ip + b * K1, K1, D, buf.data(), [&](int64_t k, const acc_t* v) {
        t[k] = dot(v, feat + b * D, D) * invT;
        m = std::max(m, t[k]);
      });
      double sum = 0;
      for (int64_t k = 0; k < K1; ++k) sum += std::exp(t[k] - m);
      row_max[b] = m;
      row_sum[b] = sum;
    }
  });
  const double log_z = z0 > 0 ? std::log(z0) : log_z_estimate(row_max, row_sum, N, B * K1);
  const acc_t lz = static_cast<acc_t>(log_z);
  at::parallel_for(0, B * K1, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) probs[i] = std::exp(probs[i] - lz);
  });
  return z0 > 0 ? z0 : std::exp(log_z);
}

// nce_probs_backward: grad[b] = sum_k gP[b,k] P[b,k] / T V[idx[b,k]].
template <typename bank_t, typename acc_t>
void nce_probs_backward_kernel(const bank_t* mem, int64_t rs, const int64_t* ip, int64_t B, int64_t K1, int64_t D,
                               const acc_t* probs, const acc_t* grad_probs, double T, acc_t* grad) {
  const acc_t invT = static_cast<acc_t>(1.0 / T);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      acc_t* g = grad + b * D;
      rows::GradRow<acc_t> gr(D);
      acc_t* buf8 = rows::scratch<acc_t>(8 * D);
      for_each_row_block(mem, rs, ip + b * K1, K1, D, buf8, [&](int64_t k0, int n, const auto* const* v) {
        acc_t c[8];
        for (int j = 0; j < n; ++j) c[j] = grad_probs[b * K1 + k0 + j] * probs[b * K1 + k0 + j] * invT;
        gr.add8(c, v, n);
      });
      const double* w = gr.sum();
      for (int64_t d = 0; d < D; ++d) g[d] = static_cast<acc_t>(w[d]);
    }
  });
}

// nce_probs_loss: P, NCECriterion's loss terms, dloss/dF and dloss/dP; returns the Z used.
template <typename bank_t, typename acc_t>
double nce_probs_loss_kernel(const NceArgs& a, const bank_t* mem, const acc_t* feat, double z0, acc_t* grad,
                             double* row_loss, acc_t* probs, acc_t* grad_probs) {
  if (z0 > 0 && 4 * a.B * (a.K + 1) >= a.N) {  // dense enough for the row-order walk to pay off
    nce_pass_row_order<bank_t, acc_t>(a, mem, feat, std::log(z0), grad, row_loss, probs, grad_probs);
    return z0;
  }
  return nce_with_z<bank_t, acc_t>(a, mem, feat, z0, 0.0, grad, row_loss, probs, grad_probs);
}

}  // namespace
