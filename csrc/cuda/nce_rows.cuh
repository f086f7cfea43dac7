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

#include "cuda_utils.cuh"

namespace instdisc {
namespace cuda {
namespace {

constexpr int kWarps = 8;          // warps per block of the row kernel
constexpr int kScalarMaxCh = 16;   // scalar path keeps D <= 32 * 16 values per lane
constexpr int64_t kMaxD = 32 * kScalarMaxCh;
constexpr double kEps = 1e-7;      // lemniscate's NCECriterion eps

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
  int mode = kNce;
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

template <typename bank_t, typename acc_t, int VEC, int MAXCH, int U>
__global__ void __launch_bounds__(kWarps * 32) nce_rows_kernel(const RowArgs<acc_t> a, const bank_t* __restrict__ mem) {
  const int lane = threadIdx.x & 31;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (w >= a.B * a.S) return;  // warp-uniform
  if (a.mode == kZSum && !(a.z_in[0] <= 0.f || a.z_ema > acc_t(0))) return;  // Z is given: no estimate
  const int64_t b = w / a.S;
  const int64_t k_begin = (w % a.S) * a.kper;
  const int64_t k_end = k_begin + a.kper < a.K1 ? k_begin + a.kper : a.K1;
  const int64_t D = a.D;
  const int mode = a.mode;
  const bool need_dot = mode != kProbsBwd;
  const bool need_grad = mode == kNce || mode == kInfoNce || mode == kProbsBwd;
  const uint64_t seed = (a.idx == nullptr && a.neg == nullptr) ? static_cast<uint64_t>(a.seed[0]) : 0;
  const acc_t log_z = mode == kNce ? a.zval[1] : acc_t(0);
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
  // kNce: sum of loss terms; kInfoNce: running max, sum, s0/T.
  acc_t st0 = (mode == kInfoNce || mode == kZSum) ? -INFINITY : acc_t(0), st1 = 0, st2 = 0;

  for (int64_t kt = k_begin; kt < k_end; kt += 32) {
    const int cnt = static_cast<int>(k_end - kt < 32 ? k_end - kt : 32);
    int64_t my_row = 0;
    acc_t my_aux = 0;
    if (lane < cnt) {
      const int64_t k = kt + lane;
      my_row = column_index(a, b, k, seed);
      CUDA_KERNEL_ASSERT(my_row >= 0 && my_row < a.N);
      if (mode == kNce) my_aux = a.noise != nullptr ? a.knoise * static_cast<acc_t>(a.noise[my_row]) : a.knoise / a.N;
      if (mode == kProbsBwd) my_aux = a.coef_in[b * a.K1 + k];
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
      for (int u = 0; u < U; ++u) {  // issue all U row loads before using any
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
        if (need_dot) {
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
        if (mode == kZSum) {
          const acc_t x = sc[u] * a.inv_t;
          if (x > st0) {
            st1 = st1 * exp(st0 - x) + acc_t(1);
            st0 = x;
          } else {
            st1 += exp(x - st0);
          }
        } else if (mode == kProbs) {
          const acc_t e = exp(sc[u] * a.inv_t);
          st0 += e;
          if (lane == 0) a.probs_out[b * a.K1 + k] = e;
        } else if (mode == kNce) {
          const acc_t lp = sc[u] * a.inv_t - log_z;  // log P
          const acc_t P = exp(lp < kLim ? lp : kLim);
          const acc_t cn = aux[u];                 // K * Pn
          const acc_t c = cn + acc_t(kEps);
          if (k == 0) {                            // -log(P / (P + c))
            if (lp > kLim) {
              coef = 0;
            } else if (lp < -kLim) {
              st0 += log(c) - lp;
              coef = -a.scale;
            } else {
              st0 += log1p(c / P);
              coef = -c / (P + c) * a.scale;
            }
          } else if (lp > kLim) {                  // -log(K Pn / (P + c))
            st0 += lp - log(cn);
            coef = a.scale;
          } else {
            st0 += log((P + c) / cn);
            coef = P / (P + c) * a.scale;
          }
        } else if (mode == kInfoNce) {
          const acc_t x = sc[u] * a.inv_t;
          if (k == 0) st2 = x;
          if (x > st0) {  // online softmax: rescale what was summed under the old max
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
        } else {  // kProbsBwd
          coef = aux[u];
        }
        if (need_grad) {
#pragma unroll
          for (int c = 0; c < MAXCH; ++c)
#pragma unroll
            for (int i = 0; i < VEC; ++i) g[c][i] += coef * v[u][c][i];
        }
      }
    }
  }
  if (need_grad) {
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
template <typename bank_t, typename acc_t>
__global__ void finalize_rows_kernel(const RowArgs<acc_t> a, const bank_t* __restrict__ mem, acc_t* grad,
                                     acc_t* row_loss, acc_t proximal) {
  __shared__ acc_t red[32];
  const int64_t b = blockIdx.x, S = a.S, D = a.D;
  const acc_t* ps = a.part_stat + b * S * 4;
  const acc_t* pg = a.part_grad + b * S * D;
  const bool loss_mode = a.mode == kNce || a.mode == kInfoNce;
  const bank_t* v0 = loss_mode ? mem + a.pos[b] * D : nullptr;
  acc_t M = 0, L = 1;
  if (a.mode == kInfoNce) {
    M = -INFINITY;
    for (int64_t s = 0; s < S; ++s) M = ps[s * 4] > M ? ps[s * 4] : M;
    L = 0;
    for (int64_t s = 0; s < S; ++s) L += ps[s * 4 + 1] * exp(ps[s * 4] - M);
  }
  acc_t sq = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t gd = 0;
    if (a.mode == kInfoNce) {
      for (int64_t s = 0; s < S; ++s) gd += exp(ps[s * 4] - M) * pg[s * D + d];
      gd = (gd / L - static_cast<acc_t>(v0[d])) * a.scale;
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
    if (a.mode == kInfoNce) {
      rl = M + log(L) - ps[2];  // logsumexp - s0/T (column 0 is in slice 0)
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

template <typename bank_t, typename acc_t>
void launch_rows(const RowArgs<acc_t>& a, const at::Tensor& memory, cudaStream_t stream) {
  // 4 values per lane: one 16-byte load for fp32 (D = 128: a row is one float4
  // per lane), 8 bytes for bf16/fp16, so all 32 lanes share a row; 2 for fp64.
  constexpr int V = sizeof(bank_t) == 8 ? 2 : 4;
  const bank_t* mem = memory.data_ptr<bank_t>();
  const int64_t warps = a.B * a.S;
  const dim3 grid(static_cast<unsigned>((warps + kWarps - 1) / kWarps));
  const bool vec = a.D % V == 0 && a.D <= 32 * V && reinterpret_cast<uintptr_t>(mem) % (V * sizeof(bank_t)) == 0;
  if (vec) {
    nce_rows_kernel<bank_t, acc_t, V, 1, 4><<<grid, kWarps * 32, 0, stream>>>(a, mem);
  } else {
    nce_rows_kernel<bank_t, acc_t, 1, kScalarMaxCh, 1><<<grid, kWarps * 32, 0, stream>>>(a, mem);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define INSTDISC_DISPATCH_BANK(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

void check_common(const char* op, const at::Tensor& memory, const at::Tensor& idx_like) {
  TORCH_CHECK(memory.is_cuda(), op, " (cuda): memory must be a CUDA tensor");
  TORCH_CHECK(memory.dim() == 2 && memory.size(0) > 0, op, ": memory must be a non-empty (N, D) tensor");
  const auto mt = memory.scalar_type();
  TORCH_CHECK(mt == at::kFloat || mt == at::kDouble || mt == at::kHalf || mt == at::kBFloat16, op,
              ": memory must be float32/float64/float16/bfloat16, got ", mt);
  TORCH_CHECK(memory.size(1) >= 1 && memory.size(1) <= kMaxD, op, " (cuda): feature dim D = ", memory.size(1),
              " is not supported (1 <= D <= ", kMaxD, "); use backend='triton' or 'reference'");
  TORCH_CHECK(idx_like.device() == memory.device(), op, ": all tensors must be on the same device (",
              idx_like.device(), " vs ", memory.device(), ")");
}


}  // namespace
}  // namespace cuda
}  // namespace instdisc
