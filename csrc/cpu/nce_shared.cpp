// CPU epilogues of the shared-negative NCE / InfoNCE score tiles (ops/nce_shared.py, backend
// "cpu"): ATen's GEMM writes a B x n tile of scores, one of these ops then makes one pass over it
// (kernels in nce_shared_kernels.h, compiled per CPU capability).
//   nce_shared_tile_nce_(x)              x <- sigmoid(x); returns sum softplus(x) (float64, 0-dim)
//   nce_shared_tile_lse(x)               log sum exp over every entry (float64, 0-dim)
//   nce_shared_tile_softmax_(x, m, l)    InfoNCE's online softmax step; returns the rescale (B,)
// and the fused passes over all K gathered rows (fma_blocks.h register tiles, avx2 and up):
//   nce_shared_nce_pass(f, g, bias)      sum softplus(f.g + bias) and sum sigmoid(f.g + bias) g
//   nce_shared_lse_pass(f, g)            log sum exp(f.g) over every entry (float64, 0-dim)
// where g is rows[index] when index is given (the bank and the K shared negatives: no gathered
// copy), and round_bf16 rounds both operands to bfloat16 first (precision "bf16" on CPUs without
// native bf16 GEMMs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

#include <cmath>
#include <limits>
#include <vector>

#define INSTDISC_KERNELS "nce_shared_kernels.h"  // compiled once per CPU capability
#include "kernel_variants.h"
#include "fma_pass_op.h"

namespace instdisc {
namespace {

void check_tile(const at::Tensor& x, const char* name) {
  INSTDISC_CHECK_VALUE(x.device().is_cpu(), name, " must be a CPU tensor");
  INSTDISC_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), name, " must be a contiguous 2-D tensor, got ", x.sizes());
  INSTDISC_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
                      " must be float32 or float64, got ", x.scalar_type());
}

at::Tensor tile_nce_cpu(at::Tensor x) {
  check_tile(x, "scores");
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "nce_shared_tile_nce_", [&] {
    total = INSTDISC_CPU_DISPATCH(cap::tile_nce<scalar_t>(x.data_ptr<scalar_t>(), x.size(0), x.size(1)));
  });
  return at::scalar_tensor(total, x.options().dtype(at::kDouble));
}

at::Tensor tile_lse_cpu(const at::Tensor& x) {
  check_tile(x, "scores");
  double out = -std::numeric_limits<double>::infinity();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "nce_shared_tile_lse", [&] {
    out = INSTDISC_CPU_DISPATCH(
        cap::tile_lse<scalar_t>(const_cast<scalar_t*>(x.data_ptr<scalar_t>()), x.size(0), x.size(1)));
  });
  return at::scalar_tensor(out, x.options().dtype(at::kDouble));
}

at::Tensor tile_softmax_cpu(at::Tensor x, at::Tensor m, at::Tensor l) {
  check_tile(x, "scores");
  const int64_t B = x.size(0);
  for (const auto* t : {&m, &l}) {
    INSTDISC_CHECK_VALUE(t->device().is_cpu() && t->dim() == 1 && t->size(0) == B && t->is_contiguous() &&
                             t->scalar_type() == x.scalar_type(),
                         "row_max and row_sum must be contiguous (B,) tensors of the scores' dtype");
  }
  auto scale = at::empty({B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "nce_shared_tile_softmax_", [&] {
    INSTDISC_CPU_DISPATCH(cap::tile_softmax<scalar_t>(x.data_ptr<scalar_t>(), B, x.size(1), m.data_ptr<scalar_t>(),
                                                      l.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>()));
  });
  return scale;
}

// The fused passes (AVX2 + FMA builds; checks and dispatch in fma_pass_op.h): features (B, D)
// float32 already divided by T, rows (N, D) float32/bf16/fp16 (the gathered negatives, or the bank
// with index (K,) selecting them), bias (K,) float32.
std::tuple<at::Tensor, at::Tensor> nce_pass_cpu(const at::Tensor& features, const at::Tensor& rows,
                                                const at::Tensor& bias, const std::optional<at::Tensor>& index,
                                                bool round_bf16) {
  check_fma_pass(features, rows, "nce_shared_nce_pass", "rows");
  const FmaSelection sel = fma_selection(index, rows, "nce_shared_nce_pass");
  INSTDISC_CHECK_VALUE(
      bias.device().is_cpu() && bias.dim() == 1 && bias.size(0) == sel.count && bias.scalar_type() == at::kFloat,
      "nce_shared_nce_pass: bias must be a float32 CPU (K,) tensor, K = ", sel.count, ", got ", bias.scalar_type(),
      " of shape ", bias.sizes());
  const auto F = features.contiguous();
  const auto G = rows.contiguous();
  const auto c = bias.contiguous();
  auto A = at::empty(F.sizes(), F.options());
  double total = 0;
  INSTDISC_FMA_PASS(G, "nce_shared_nce_pass",
                    total = cap::nce_pass<scalar_t>(F.data_ptr<float>(), F.size(0), F.size(1), g, sel.ptr, sel.count,
                                                    round_bf16, c.data_ptr<float>(), A.data_ptr<float>()));
  return {at::scalar_tensor(total, F.options().dtype(at::kDouble)), A};
}

at::Tensor lse_pass_cpu(const at::Tensor& features, const at::Tensor& rows, const std::optional<at::Tensor>& index,
                        bool round_bf16) {
  check_fma_pass(features, rows, "nce_shared_lse_pass", "rows");
  const FmaSelection sel = fma_selection(index, rows, "nce_shared_lse_pass");
  const auto F = features.contiguous();
  const auto G = rows.contiguous();
  double out = 0;
  INSTDISC_FMA_PASS(
      G, "nce_shared_lse_pass",
      out = cap::lse_pass<scalar_t>(F.data_ptr<float>(), F.size(0), F.size(1), g, sel.ptr, sel.count, round_bf16));
  return at::scalar_tensor(out, F.options().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(instdisc, CPU, m) {
  m.impl("nce_shared_nce_pass", &nce_pass_cpu);
  m.impl("nce_shared_lse_pass", &lse_pass_cpu);
  m.impl("nce_shared_tile_nce_", &tile_nce_cpu);
  m.impl("nce_shared_tile_lse", &tile_lse_cpu);
  m.impl("nce_shared_tile_softmax_", &tile_softmax_cpu);
}

}  // namespace instdisc
