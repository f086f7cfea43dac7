// The exact softmax's fused CPU pass (ops/softmax.py, backend "cpu", precision "fp32"):
//   softmax_online_state(F, V) -> (m, l, A), over every row v_j of the bank V and s = f . v_j:
//     m[b] = max_j s[b, j],  l[b] = sum_j exp(s[b, j] - m[b]),  A[b] = sum_j exp(s[b, j] - m[b]) v_j
// with F (B, D) float32 already divided by the temperature and V (N, D) float32, bf16 or fp16; with
// index (K,), over the rows V[index] only (the shared negatives' InfoNCE), and with round_bf16 both
// operands rounded to bfloat16 first (precision "bf16" where the CPU has no native bf16 GEMM).
// One pass over the bank: each 96-row block is widened/packed once, then scored against every
// feature row in 6 x 16 FMA register tiles, its online-softmax step taken on the 6 x 96 scores in
// L1, and its rows accumulated into A in the same register tiles: no B x chunk scores in memory
// and no per-chunk ATen calls. Rows are split into one contiguous range per thread, whose states
// are merged at the end. Needs AVX2 + FMA (the avx2/avx512 capabilities; softmax.py keeps its
// chunked ATen path under "default").
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#define INSTDISC_KERNELS "softmax_kernels.h"  // compiled once per CPU capability
#include "kernel_variants.h"
#include "fma_pass_op.h"

namespace instdisc {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_online_state_cpu(const at::Tensor& features,
                                                                        const at::Tensor& bank,
                                                                        const std::optional<at::Tensor>& index,
                                                                        bool round_bf16) {
  check_fma_pass(features, bank, "softmax_online_state", "bank");
  const FmaSelection sel = fma_selection(index, bank, "softmax_online_state");
  const auto F = features.contiguous();
  const auto V = bank.contiguous();
  const int64_t B = F.size(0), D = F.size(1);
  auto m = at::empty({B}, F.options());
  auto l = at::empty({B}, F.options());
  auto A = at::empty({B, D}, F.options());
  INSTDISC_FMA_PASS(V, "softmax_online_state",
                    cap::softmax_state<scalar_t>(F.data_ptr<float>(), B, D, g, sel.ptr, sel.count, round_bf16,
                                                 m.data_ptr<float>(), l.data_ptr<float>(), A.data_ptr<float>()));
  return {m, l, A};
}

}  // namespace

TORCH_LIBRARY_IMPL(instdisc, CPU, m) { m.impl("softmax_online_state", &softmax_online_state_cpu); }

}  // namespace instdisc
