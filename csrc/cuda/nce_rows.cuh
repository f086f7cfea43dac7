// The row kernel of the CUDA NCE ops (csrc/cuda/nce.cu: nce_forward; csrc/cuda/nce_probs.cu: the
// NCEAverage ops nce_probs / nce_probs_backward) and its small reduction kernels.
//
// One warp per (batch row b, slice of the K+1 columns). The warp walks its
// columns 32 at a time: lane l fetches (or draws with Philox) the index of
// column kt+l, the indices are broadcast by shuffles, and U gathered bank rows
// are in flight at once (vector loads: D=128 fp32 is one float4 per lane).
// Each row is read once: its dot with F[b] (warp-shuffle sum), the loss term and
// the gradient contribution coef * V[row] are computed from the same registers.
// Per-warp partials (gradient, loss terms, online-softmax max/sum) go to a
// scratch buffer that small kernels reduce in a fixed order, so every result is
// deterministic. Z (when it must be estimated: z <= 0 or z_ema > 0) needs a
// pre-pass over the scores; whether it runs is decided on the device from z.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "cuda_utils.cuh"

namespace instdisc {
namespace cuda {
namespace {

constexpr int kWarps = 8;         // warps per block of the row kernel
constexpr int kScalarMaxCh = 16;  // scalar path keeps D <= 32 * 16 values per lane
constexpr int64_t kMaxD = 32 * kScalarMaxCh;
constexpr double kEps = 1e-7;  // lemniscate's NCECriterion eps

// What a launch of the row kernel computes: a template parameter, so each kernel instance holds
// only its own branch (chosen once, at launch).
enum Mode : int { kZSum = 0, kNce = 1, kInfoNce = 2, kProbs = 3, kProbsBwd = 4 };

template <typename acc_t>
struct RowArgs {
  const acc_t* feat = nullptr;     // (B, D) features in acc_t
  const int64_t* pos = nullptr;    // (B,) positives (column 0)
  const int64_t* neg = nullptr;    // (B, K) negatives; null: drawn with Philox(seed)
  const int64_t* idx = nullptr;    // (B, K+1) full index matrix (nce_probs ops)
  const int64_t* seed = nullptr;   // (1,) seed, read on the device
  const float* noise = nullptr;    // (N,) noise distribution or null (uniform)
  const acc_t* zval = nullptr;     // (2,) Z and log Z used by kNce
  const float* z_in = nullptr;     // (1,) input z: decides whether kZSum runs
  const acc_t* coef_in = nullptr;  // (B, K+1) grad_probs * probs / T (kProbsBwd)
  acc_t* probs_out = nullptr;      // (B, K+1) exp(s / T) (kProbs)
  acc_t* part_grad = nullptr;      // (B * S, D) per-warp gradient partials
  acc_t* part_stat = nullptr;      // (B * S, 4) per-warp scalar partials
  int64_t B = 0, K1 = 0, N = 0, D = 0, kper = 0, S = 1;
  bool exclude_pos = false;
  acc_t inv_t = 1, scale = 1, z_ema = 0, knoise = 0;
};

template <typename acc_t>
__device__ __forceinline__ int64_t column_index(const RowArgs<acc_t>& a, int64_t b, int64_t k, uint64_t seed) {
  if (a.idx != nullptr) return a.idx[b * a.K1 + k];
  const int64_t y = a.pos[b];
  if (k == 0) return y;
  if (a.neg != nullptr) return a.neg[b * (a.K1 - 1) + (k - 1)];
  if (a.exclude_pos) {  // uniform over [0, N) without y: draw in [0, N-1), shift >= y up
    const int64_t r = philox_index(seed, b, k - 1, a.N - 1);
    return r + (r >= y ? 1 : 0);
  }
  return philox_index(seed, b, k - 1, a.N);
}

template <int MODE, typename bank_t, typename acc_t, int VEC, int MAXCH, int U>
__global__ void __launch_bounds__(kWarps * 32) nce_rows_kernel(const RowArgs<acc_t> a, const bank_t* __restrict__ mem) {
  const int lane = threadIdx.x & 31;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (w >= a.B * a.S) return;  // warp-uniform
  if constexpr (MODE == kZSum) {
    if (!(a.z_in[0] <= 0.f || a.z_ema > acc_t(0))) return;  // Z is given: no estimate
  }
  const int64_t b = w / a.S;
  const int64_t k_begin = (w % a.S) * a.kper;
  const int64_t k_end = k_begin + a.kper < a.K1 ? k_begin + a.kper : a.K1;
  const int64_t D = a.D;
  constexpr bool need_dot = MODE != kProbsBwd;
  constexpr bool need_grad = MODE == kNce || MODE == kInfoNce || MODE == kProbsBwd;
  const uint64_t seed = (a.idx == nullptr && a.neg == nullptr) ? static_cast<uint64_t>(a.seed[0]) : 0;
  const acc_t log_z = MODE == kNce ? a.zval[1] : acc_t(0);
  constexpr acc_t kLim = 80;  // beyond |log P| > kLim the NCE terms take their asymptotic forms

  acc_t f[MAXCH][VEC], g[MAXCH][VEC];
#pragma unroll
  for (int c = 0; c < MAXCH; ++c) {
    const int64_t d0 = static_cast<int64_t>(c * 32 + lane) * VEC;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      g[c][i] = 0;
      f[c][i] = (need_dot && d0 + i < D) ? a.feat[b * D + d0 + i] : acc_t(0);
    }
  }
  // kZSum: running max of s/T and sum of exp(s/T - max) (log-space Z); kProbs: sum of exp(s/T);
  // kNce: sum of loss terms; kInfoNce: the negatives' running max and sum of exp(s/T - max) (the
  // positive kept out of them: see finalize_rows_kernel), and s0/T.
  acc_t st0 = (MODE == kInfoNce || MODE == kZSum) ? -INFINITY : acc_t(0), st1 = 0, st2 = 0;

  for (int64_t kt = k_begin; kt < k_end; kt += 32) {
    const int cnt = static_cast<int>(k_end - kt < 32 ? k_end - kt : 32);
    int64_t my_row = 0;
    acc_t my_aux = 0;
    if (lane < cnt) {
      const int64_t k = kt + lane;
      my_row = column_index(a, b, k, seed);
      CUDA_KERNEL_ASSERT(my_row >= 0 && my_row < a.N);
      if constexpr (MODE == kNce)
        my_aux = a.noise != nullptr ? a.knoise * static_cast<acc_t>(a.noise[my_row]) : a.knoise / a.N;
      if constexpr (MODE == kProbsBwd) my_aux = a.coef_in[b * a.K1 + k];
    }
    for (int j = 0; j < cnt; j += U) {
      int64_t r[U];
      acc_t aux[U], v[U][MAXCH][VEC], sc[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        r[u] = __shfl_sync(kFullMask, my_row, (j + u) & 31);
        aux[u] = __shfl_sync(kFullMask, my_aux, (j + u) & 31);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {          // issue all U row loads before using any
        const bank_t* src = mem + r[u] * D;  // int64 offsets
#pragma unroll
        for (int c = 0; c < MAXCH; ++c) {
          const int64_t d0 = static_cast<int64_t>(c * 32 + lane) * VEC;
          if (j + u < cnt && d0 < D) {
            load_pack<bank_t, VEC, acc_t>(src + d0, v[u][c]);
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) v[u][c][i] = 0;
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        acc_t p = 0;
        if constexpr (need_dot) {
#pragma unroll
          for (int c = 0; c < MAXCH; ++c)
#pragma unroll
            for (int i = 0; i < VEC; ++i) p += f[c][i] * v[u][c][i];
          p = warp_sum(p);
        }
        sc[u] = p;
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (j + u >= cnt) break;  // warp-uniform
        const int64_t k = kt + j + u;
        acc_t coef = 0;
        if constexpr (MODE == kZSum) {
          const acc_t x = sc[u] * a.inv_t;
          if (x > st0) {
            st1 = st1 * exp(st0 - x) + acc_t(1);
            st0 = x;
          } else {
            st1 += exp(x - st0);
          }
        } else if constexpr (MODE == kProbs) {
          const acc_t e = exp(sc[u] * a.inv_t);
          st0 += e;
          if (lane == 0) a.probs_out[b * a.K1 + k] = e;
        } else if constexpr (MODE == kNce) {
          const acc_t lp = sc[u] * a.inv_t - log_z;  // log P
          const acc_t P = exp(lp < kLim ? lp : kLim);
          const acc_t cn = aux[u];  // K * Pn
          const acc_t c = cn + acc_t(kEps);
          if (k == 0) {  // -log(P / (P + c))
            if (lp > kLim) {
              coef = 0;
            } else if (lp < -kLim) {
              st0 += log(c) - lp;
              coef = -a.scale;
            } else {
              st0 += log1p(c / P);
              coef = -c / (P + c) * a.scale;
            }
          } else if (lp > kLim) {  // -log(K Pn / (P + c))
            st0 += lp - log(cn);
            coef = a.scale;
          } else {
            st0 += log((P + c) / cn);
            coef = P / (P + c) * a.scale;
          }
        } else if constexpr (MODE == kInfoNce) {
          const acc_t x = sc[u] * a.inv_t;
          if (k == 0) {  // the positive: only its logit (coef 0)
            st2 = x;
          } else {
            if (x > st0) {  // online softmax of the negatives: rescale what was summed under the old max
              const acc_t rs = exp(st0 - x);
              st1 *= rs;
#pragma unroll
              for (int c = 0; c < MAXCH; ++c)
#pragma unroll
                for (int i = 0; i < VEC; ++i) g[c][i] *= rs;
              st0 = x;
            }
            coef = exp(x - st0);
            st1 += coef;
          }
        } else {  // kProbsBwd
          coef = aux[u];
        }
        if constexpr (need_grad) {
#pragma unroll
          for (int c = 0; c < MAXCH; ++c)
#pragma unroll
            for (int i = 0; i < VEC; ++i) g[c][i] += coef * v[u][c][i];
        }
      }
    }
  }
  if constexpr (need_grad) {
#pragma unroll
    for (int c = 0; c < MAXCH; ++c) {
      const int64_t d0 = static_cast<int64_t>(c * 32 + lane) * VEC;
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        if (d0 + i < D) a.part_grad[w * D + d0 + i] = g[c][i];
    }
  }
  if (lane == 0) {
    a.part_stat[w * 4 + 0] = st0;
    a.part_stat[w * 4 + 1] = st1;
    a.part_stat[w * 4 + 2] = st2;
  }
}

template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* red) {  // fixed-order: deterministic
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  acc_t t = 0;
  for (int i = 0; i < nw; ++i) t += red[i];
  return t;
}

// One block per batch row: merge the S partials in order; gradient, proximal
// term and the row's loss.
// InfoNCE: with M the max of all K+1 logits t, e0 = exp(t0 - M), Ln = sum over the negatives of
// exp(t_k - M) and L = e0 + Ln, the gradient is ((sum_k exp(t_k - M) V_k) - Ln V0) / (L B T): the
// positive's coefficient p0 - 1 = -Ln / L comes from the negatives' sum, never as 1 - (something
// close to 1), so it keeps its digits when p0 ~ 1. The loss is log1p(Ln / e0) likewise.
template <int MODE, typename bank_t, typename acc_t>
__global__ void finalize_rows_kernel(const RowArgs<acc_t> a, const bank_t* __restrict__ mem, acc_t* grad,
                                     acc_t* row_loss, acc_t proximal) {
  __shared__ acc_t red[32];
  const int64_t b = blockIdx.x, S = a.S, D = a.D;
  const acc_t* ps = a.part_stat + b * S * 4;
  const acc_t* pg = a.part_grad + b * S * D;
  constexpr bool loss_mode = MODE == kNce || MODE == kInfoNce;
  const bank_t* v0 = loss_mode ? mem + a.pos[b] * D : nullptr;
  acc_t M = 0, Ln = 0, L = 1, t0 = 0;
  if constexpr (MODE == kInfoNce) {
    t0 = ps[2];  // the positive (column 0) is in slice 0
    M = t0;
    for (int64_t s = 0; s < S; ++s) M = ps[s * 4] > M ? ps[s * 4] : M;
    for (int64_t s = 0; s < S; ++s)
      if (ps[s * 4 + 1] > acc_t(0)) Ln += ps[s * 4 + 1] * exp(ps[s * 4] - M);
    L = exp(t0 - M) + Ln;
  }
  acc_t sq = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t gd = 0;
    if constexpr (MODE == kInfoNce) {
      for (int64_t s = 0; s < S; ++s)
        if (ps[s * 4 + 1] > acc_t(0)) gd += exp(ps[s * 4] - M) * pg[s * D + d];
      gd = (gd - Ln * static_cast<acc_t>(v0[d])) / L * a.scale;
    } else {
      for (int64_t s = 0; s < S; ++s) gd += pg[s * D + d];
    }
    if (loss_mode && proximal > 0) {
      const acc_t diff = a.feat[b * D + d] - static_cast<acc_t>(v0[d]);
      gd += acc_t(2) * proximal * diff / static_cast<acc_t>(a.B);
      sq += diff * diff;
    }
    grad[b * D + d] = gd;
  }
  if (row_loss == nullptr) return;  // block-uniform
  sq = block_sum(sq, red);
  if (threadIdx.x == 0) {
    acc_t rl;
    if constexpr (MODE == kInfoNce) {
      // logsumexp - t0 = log(L / e0): log1p(Ln / e0) while e0 is not tiny, else (M - t0) + log(L)
      rl = M - t0 < acc_t(30) ? log1p(Ln * exp(M - t0)) : (M - t0) + log(L);
    } else {
      rl = 0;
      for (int64_t s = 0; s < S; ++s) rl += ps[s * 4];
    }
    row_loss[b] = rl + proximal * sq;
  }
}

template <typename acc_t>
__global__ void mean_kernel(const acc_t* row_loss, int64_t B, acc_t* out) {
  __shared__ acc_t red[32];
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) s += row_loss[i];
  s = block_sum(s, red);
  if (threadIdx.x == 0) out[0] = s / static_cast<acc_t>(B);
}

// Z: z[0] when given; else (or with z_ema) N * mean(exp(s/T)) from the kZSum partials.
template <typename acc_t>
__global__ void z_kernel(const acc_t* part_stat, int64_t W, const float* z_in, acc_t z_ema, acc_t n_over_count,
                         acc_t* zval, float* z_out) {
  __shared__ acc_t red[32];
  const acc_t z = static_cast<acc_t>(z_in[0]);
  acc_t Z = z;
  if (z <= acc_t(0) || z_ema > acc_t(0)) {  // block-uniform
    acc_t s = 0;
    for (int64_t i = threadIdx.x; i < W; i += blockDim.x) s += part_stat[i * 4];
    s = block_sum(s, red);
    const acc_t est = s * n_over_count;
    Z = z <= acc_t(0) ? est : z_ema * z + (acc_t(1) - z_ema) * est;
  }
  if (threadIdx.x == 0) {
    zval[0] = Z;
    z_out[0] = static_cast<float>(Z);
  }
}

// log Z for nce_forward: log z[0] when given; else (or with z_ema) log(N * mean(exp(s/T))) from
// the kZSum (max, sum) partials, the EMA combined in log space. zval = (Z, log Z); z_out = Z in
// float32 (inf or 0 when float32 cannot hold it: the Python layer rejects that before any write).
template <typename acc_t>
__global__ void log_z_kernel(const acc_t* part_stat, int64_t W, const float* z_in, acc_t z_ema, acc_t log_scale,
                             acc_t* zval, float* z_out) {
  __shared__ acc_t red[32];
  const acc_t z = static_cast<acc_t>(z_in[0]);
  acc_t lz = z > acc_t(0) ? log(z) : acc_t(0);
  if (z <= acc_t(0) || z_ema > acc_t(0)) {  // block-uniform
    acc_t M = -INFINITY;
    for (int64_t i = 0; i < W; ++i) M = part_stat[i * 4] > M ? part_stat[i * 4] : M;
    acc_t s = 0;
    for (int64_t i = threadIdx.x; i < W; i += blockDim.x)
      if (part_stat[i * 4 + 1] > acc_t(0)) s += part_stat[i * 4 + 1] * exp(part_stat[i * 4] - M);
    s = block_sum(s, red);
    const acc_t log_est = log(s) + M + log_scale;
    if (z <= acc_t(0)) {
      lz = log_est;
    } else {
      const acc_t x = log(z_ema) + lz, y = log1p(-z_ema) + log_est;
      lz = (x > y ? x : y) + log1p(exp(-fabs(x - y)));
    }
  }
  if (threadIdx.x == 0) {
    zval[0] = exp(lz);
    zval[1] = lz;
    z_out[0] = static_cast<float>(exp(lz));
  }
}

template <typename acc_t>
__global__ void divide_kernel(acc_t* x, int64_t n, const acc_t* zval) {
  const acc_t z = zval[0];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = x[i] / z;
}

// ----------------------------------------------------------------------------
// Host side
// ----------------------------------------------------------------------------
// Slices of the K+1 columns per batch row: enough warps to fill the GPU when B
// is small, but at least 64 columns per warp.
template <typename acc_t>
void plan_slices(RowArgs<acc_t>& a, int device) {
  const int64_t target = static_cast<int64_t>(sm_count(device)) * 32;
  int64_t S = (target + a.B - 1) / a.B;
  const int64_t max_s = (a.K1 + 63) / 64;
  S = S < max_s ? S : max_s;
  S = S < 1 ? 1 : S;
  a.kper = (a.K1 + S - 1) / S;
  a.S = (a.K1 + a.kper - 1) / a.kper;
}

// A RowArgs for a (B, K1) column block over an (N, D) bank, its slices planned for `device`.
template <typename acc_t>
RowArgs<acc_t> planned_rows(int64_t B, int64_t K1, int64_t N, int64_t D, int device) {
  RowArgs<acc_t> a;
  a.B = B;
  a.K1 = K1;
  a.N = N;
  a.D = D;
  plan_slices(a, device);
  return a;
}

template <int MODE, typename bank_t, typename acc_t>
void launch_rows(const RowArgs<acc_t>& a, const at::Tensor& memory, cudaStream_t stream) {
  // 4 values per lane: one 16-byte load for fp32 (D = 128: a row is one float4
  // per lane), 8 bytes for bf16/fp16, so all 32 lanes share a row; 2 for fp64.
  constexpr int V = sizeof(bank_t) == 8 ? 2 : 4;
  const bank_t* mem = memory.data_ptr<bank_t>();
  const int64_t warps = a.B * a.S;
  const dim3 grid(static_cast<unsigned>((warps + kWarps - 1) / kWarps));
  const bool vec = a.D % V == 0 && a.D <= 32 * V && reinterpret_cast<uintptr_t>(mem) % (V * sizeof(bank_t)) == 0;
  if (vec) {
    nce_rows_kernel<MODE, bank_t, acc_t, V, 1, 4><<<grid, kWarps * 32, 0, stream>>>(a, mem);
  } else {
    nce_rows_kernel<MODE, bank_t, acc_t, 1, kScalarMaxCh, 1><<<grid, kWarps * 32, 0, stream>>>(a, mem);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define INSTDISC_DISPATCH_BANK(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// The row kernel keeps D <= kMaxD values per row in registers.
void check_cuda_dim(const at::Tensor& memory) {
  INSTDISC_CHECK_VALUE(memory.size(1) <= kMaxD, "feature dim D = ", memory.size(1),
                       " is not supported by the CUDA kernel (1 <= D <= ", kMaxD,
                       "); use backend='triton' or 'reference'");
}

}  // namespace
}  // namespace cuda
}  // namespace instdisc
