// CPU weighted-kNN top-k (docs/method.md): the k most similar bank rows per query,
// exact in float64, without ever building the Q x N similarity matrix.
//
// Two stages:
//  1. Prefilter. Queries and bank rows are rounded to the prefilter's type (x~),
//     s~ = q~ . v~ is computed with fp32 accumulation in register tiles, and
//     each tile is compared straight from registers with the query's bound
//     lo = t~ - 2E, where t~ is a lower bound on the k-th largest s~ seen so
//     far (kept current to one histogram bin, see QState) and E a rigorous
//     per-query bound on |s~ - s| (below). Entries that pass go to a per-query
//     candidate list, compacted as t~ rises. Three prefilters, by CPU capability:
//       avx512_bf16  bf16 x~, vdpbf16ps, 8-query x 32-row tiles, compress-stores;
//       avx2, avx512 fp32 x~ (exact for fp32/bf16/fp16 inputs), FMA, 16-query x
//                    6-row tiles, the bank read in place (knn_kernels.h block_f32);
//       default      bf16 x~ in a portable loop.
//  2. Rescore. Every surviving candidate is rescored in float64 from the
//     original inputs and the k best are taken by (similarity desc, index asc).
//
// Why nothing is lost: let s be the float64 rescore. If |s - s~| <= E for every
// row, at least k rows have s >= t~ - E (k rows have s~ >= t~), so the k-th
// largest s is >= t~ - E, while a row with s~ < t~ - 2E has s < t~ - E: it can
// neither enter the top k nor tie with its k-th entry. A lower t~ (an older
// one, or one rounded down) only keeps more rows.
//
// The bound, per query (norms in float64 from the data; n = D padded to even
// for bf16 pairs, n = D for fp32):
//   |fp32 sum of q~_d v~_d - q~.v~|  <= gamma32(n) |q~| max|v~|   (one sequential sum per lane)
//   |q~.v~ - q.v|                    <= |q~| max|v - v~| + |q - q~| max|v|
//   |s - q.v|                        <= gamma64(D + 1) |q| max|v|
// plus 2^-126 (sqrt(n) (|q~| + max|v~|) + 2n) for a flush of subnormal inputs
// and results (vdpbf16ps; FTZ/DAZ if the process sets them). For unit rows E is
// about 0.005 with bf16 and 1e-5 with fp32; a list holds about k + the rows
// within 2E (+ one bin) of the k-th similarity.
// Extra memory: G x (256 counters + list of ~2 (k + band) entries, 8 B each) +
// Q x D float64, + one packed chunk (chunk x D bf16) for the bf16 prefilters,
// + Q x D fp32 and 96 x D fp32 per thread for the fp32 one; G = min(Q, 2048)
// when the bank fits in one chunk, else Q.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "../checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define INSTDISC_X86 1
#endif

#define INSTDISC_KERNELS "knn_kernels.h"  // compiled once per CPU capability
#include "kernel_variants.h"

namespace instdisc {
namespace {

std::tuple<at::Tensor, at::Tensor> knn_topk_cpu(const at::Tensor& queries, const at::Tensor& bank, int64_t k,
                                                int64_t chunk_size) {
  checks::knn_topk_args(queries, bank, k, chunk_size, c10::DeviceType::CPU);
  INSTDISC_CHECK_VALUE(bank.size(0) < (int64_t(1) << 31), "knn_topk: the CPU kernel takes N < 2^31 bank rows");
  const auto q = queries.to(at::kDouble).contiguous();
  const auto v = bank.contiguous();
  const int64_t Q = q.size(0);
  const bool f64 = queries.scalar_type() == at::kDouble || bank.scalar_type() == at::kDouble;
  auto values = at::empty({Q, k}, q.options().dtype(f64 ? at::kDouble : at::kFloat));
  auto indices = at::empty({Q, k}, q.options().dtype(at::kLong));
  // the prefilter: AVX512-BF16 where the CPU has it, fp32 FMA tiles under avx2/avx512, else the portable bf16 loop
  const auto c = cpu::capability();
  // (knn_kernels.h's Prefilter: 0 portable bf16, 1 fp32, 2 AVX512-BF16)
  const int pre = c == cpu::Capability::kAvx512Bf16 ? 2 : c == cpu::Capability::kDefault ? 0 : 1;
  if (Q > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "knn_topk_cpu", [&] {
      INSTDISC_CPU_DISPATCH(
          cap::knn_topk_impl<scalar_t>(q, v, k, chunk_size, static_cast<cap::Prefilter>(pre), values, indices));
    });
  }
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(instdisc, CPU, m) { m.impl("knn_topk", &knn_topk_cpu); }

}  // namespace instdisc
