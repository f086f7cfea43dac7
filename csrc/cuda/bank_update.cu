// CUDA memory-bank momentum update (docs/method.md), in place and deterministic:
//   V[y[b]] <- normalize(m * V_old[y[b]] + (1 - m) * F[b])
// in fp32 (fp64 for a float64 bank), rounded once to the bank dtype. With a
// repeated index only the last occurrence in batch order writes its row, so
// no two warps touch the same row and the result is what a sequential loop gives.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"
#include "cuda_utils.cuh"

namespace instdisc {
namespace cuda {
namespace {

constexpr int kWarps = 8;            // warps per block, one batch row per warp
constexpr int64_t kScanMaxB = 4096;  // up to this batch size duplicates are found by a scan

template <typename bank_t, typename acc_t>
__global__ void __launch_bounds__(kWarps * 32)
    bank_update_kernel(bank_t* __restrict__ mem, const int64_t* __restrict__ idx, const acc_t* __restrict__ feat,
                       const bool* __restrict__ superseded, int64_t B, int64_t N, int64_t D, acc_t m) {
  const int lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (b >= B) return;  // warp-uniform
  const int64_t row = idx[b];
  CUDA_KERNEL_ASSERT(row >= 0 && row < N);
  // Skip b when a later batch row has the same index (that one wins).
  bool later = false;
  if (superseded != nullptr) {
    later = superseded[b];
  } else {
    for (int64_t j = b + 1 + lane; j < B; j += 32) later |= (idx[j] == row);
    later = __any_sync(kFullMask, later);
  }
  if (later) return;
  bank_t* dst = mem + row * D;  // int64 offsets
  const acc_t* f = feat + b * D;
  const acc_t one_m = acc_t(1) - m;
  // Scale-safe norm: the plain sum of squares when it lies in the normal range; else v is divided by
  // max |v| first (no overflow for |v| ~ 1e20, no underflow). v = 0 (no direction) or a non-finite v:
  // the row keeps its old value.
  acc_t ss = 0;
  for (int64_t d = lane; d < D; d += 32) {
    const acc_t v = m * static_cast<acc_t>(dst[d]) + one_m * f[d];
    ss += v * v;
  }
  ss = warp_sum(ss);
  constexpr acc_t kTiny = std::numeric_limits<acc_t>::min() / std::numeric_limits<acc_t>::epsilon();
  acc_t pre = 1;
  if (!(ss >= kTiny && ss <= std::numeric_limits<acc_t>::max())) {  // warp-uniform; also NaN
    acc_t amax = 0;
    for (int64_t d = lane; d < D; d += 32) amax = fmax(amax, fabs(m * static_cast<acc_t>(dst[d]) + one_m * f[d]));
    amax = warp_max(amax);
    if (!(amax > acc_t(0)) || !isfinite(amax)) return;
    pre = acc_t(1) / amax;
    if (!isfinite(pre)) pre = std::numeric_limits<acc_t>::max();  // amax subnormal
    ss = 0;
    for (int64_t d = lane; d < D; d += 32) {
      const acc_t v = (m * static_cast<acc_t>(dst[d]) + one_m * f[d]) * pre;
      ss += v * v;
    }
    ss = warp_sum(ss);
    if (!(ss > acc_t(0)) || !isfinite(ss)) return;  // a NaN that max() dropped
  }
  const acc_t inv = acc_t(1) / sqrt(ss);
  for (int64_t d = lane; d < D; d += 32) {  // each lane rewrites only the elements it read
    acc_t v = m * static_cast<acc_t>(dst[d]) + one_m * f[d];
    if (pre != acc_t(1)) v *= pre;
    dst[d] = static_cast<bank_t>(v * inv);
  }
}

// superseded[b]: a later batch row has the same index (sort-based, for large B).
at::Tensor superseded_rows(const at::Tensor& idx) {
  const int64_t B = idx.size(0);
  auto sorted = at::sort(idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& vals = std::get<0>(sorted);
  const at::Tensor& perm = std::get<1>(sorted);
  // In a stable sort the last occurrence of a value is the last of its run.
  auto sup_sorted = at::empty({B}, idx.options().dtype(at::kBool));
  sup_sorted.narrow(0, 0, B - 1).copy_(vals.narrow(0, 0, B - 1).eq(vals.narrow(0, 1, B - 1)));
  sup_sorted.narrow(0, B - 1, 1).fill_(false);
  auto sup = at::empty({B}, idx.options().dtype(at::kBool));
  sup.index_put_({perm}, sup_sorted);
  return sup;
}

void bank_update_cuda(at::Tensor memory, const at::Tensor& indices, const at::Tensor& features, double momentum) {
  checks::bank_update_args(memory, indices, features, momentum, c10::DeviceType::CUDA);
  const int64_t N = memory.size(0), D = memory.size(1), B = indices.size(0);
  if (B == 0 || D == 0) return;
  c10::cuda::CUDAGuard guard(memory.device());
  const bool dbl = memory.scalar_type() == at::kDouble;
  auto feat = features.to(dbl ? at::kDouble : at::kFloat).contiguous();
  // features that are a view of the bank are read in full before any row is written
  if (at::get_overlap_status(feat, memory) != at::MemOverlapStatus::No) feat = feat.clone();
  auto idx = indices.contiguous();
  at::Tensor sup;
  if (B > kScanMaxB) sup = superseded_rows(idx);
  const bool* sup_ptr = sup.defined() ? sup.data_ptr<bool>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>((B + kWarps - 1) / kWarps));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, memory.scalar_type(), "bank_update_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    bank_update_kernel<scalar_t, acc_t>
        <<<grid, kWarps * 32, 0, stream>>>(memory.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), feat.data_ptr<acc_t>(),
                                           sup_ptr, B, N, D, static_cast<acc_t>(momentum));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(instdisc, CUDA, m) { m.impl("bank_update_", &cuda::bank_update_cuda); }

}  // namespace instdisc
