// CPU epilogues of the shared-negative NCE / InfoNCE score tiles (ops/nce_shared.py, backend
// "cpu"): ATen's GEMM writes a B x n tile of scores, one of these ops then makes one pass over it
// (kernels in nce_shared_kernels.h, compiled per CPU capability).
//   nce_shared_tile_nce_(x)              x <- sigmoid(x); returns sum softplus(x) (float64, 0-dim)
//   nce_shared_tile_lse(x)               log sum exp over every entry (float64, 0-dim)
//   nce_shared_tile_softmax_(x, m, l)    InfoNCE's online softmax step; returns the rescale (B,)
// and the fused passes over all K gathered rows (fma_blocks.h register tiles, avx2 and up):
//   nce_shared_nce_pass(f, g, bias)      sum softplus(f.g + bias) and sum sigmoid(f.g + bias) g
//   nce_shared_lse_pass(f, g)            log sum exp(f.g) over every entry (float64, 0-dim)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#define INSTDISC_KERNELS "nce_shared_kernels.h"  // compiled once per CPU capability
#include "kernel_variants.h"

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

// The fused passes (AVX2 + FMA builds): features (B, D) float32 already divided by T, rows (K, D)
// float32/bf16/fp16 (the gathered negatives), bias (K,) float32.
void check_pass(const at::Tensor& features, const at::Tensor& rows, const char* op) {
  checks::bank(rows, c10::DeviceType::CPU, "rows");
  INSTDISC_CHECK_VALUE(
      features.device().is_cpu() && features.dim() == 2 && features.size(0) > 0 && features.size(1) == rows.size(1), op,
      ": features must be a non-empty CPU (B, D) tensor with the rows' D = ", rows.size(1), ", got shape ",
      features.sizes());
  INSTDISC_CHECK_TYPE(features.scalar_type() == at::kFloat, op, ": features must be float32, got ",
                      features.scalar_type());
  const auto t = rows.scalar_type();
  INSTDISC_CHECK_TYPE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op,
                      ": rows must be float32, bfloat16 or float16, got ", t);
  INSTDISC_CHECK_VALUE(cpu::capability() != cpu::Capability::kDefault, op,
                       " needs the avx2 CPU capability or better, this process runs ",
                       cpu::capability_name(cpu::capability()));
}

// Calls fn(cap_namespace_tag, const scalar_t* rows) for the rows' dtype under the avx2/avx512 build.
#if defined(INSTDISC_CPU_VARIANTS)
#define INSTDISC_FMA_PASS(rows, NAME, ...)                                                  \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), NAME, [&] { \
    if constexpr (!std::is_same_v<scalar_t, double>) {                                      \
      const auto* g = rows.data_ptr<scalar_t>();                                            \
      if (cpu::capability() == cpu::Capability::kAvx2) {                                    \
        namespace cap = cpu_avx2;                                                           \
        __VA_ARGS__;                                                                        \
      } else {                                                                              \
        namespace cap = cpu_avx512;                                                         \
        __VA_ARGS__;                                                                        \
      }                                                                                     \
    }                                                                                       \
  })
#else
#define INSTDISC_FMA_PASS(rows, NAME, ...) \
  INSTDISC_CHECK_VALUE(false, NAME, ": no per-capability CPU kernels in this build")
#endif

std::tuple<at::Tensor, at::Tensor> nce_pass_cpu(const at::Tensor& features, const at::Tensor& rows,
                                                const at::Tensor& bias) {
  check_pass(features, rows, "nce_shared_nce_pass");
  INSTDISC_CHECK_VALUE(
      bias.device().is_cpu() && bias.dim() == 1 && bias.size(0) == rows.size(0) && bias.scalar_type() == at::kFloat,
      "nce_shared_nce_pass: bias must be a float32 CPU (K,) tensor, K = ", rows.size(0));
  const auto F = features.contiguous();
  const auto G = rows.contiguous();
  const auto c = bias.contiguous();
  auto A = at::empty(F.sizes(), F.options());
  double total = 0;
  INSTDISC_FMA_PASS(G, "nce_shared_nce_pass",
                    total = cap::nce_pass<scalar_t>(F.data_ptr<float>(), F.size(0), F.size(1), g, G.size(0),
                                                    c.data_ptr<float>(), A.data_ptr<float>()));
  return {at::scalar_tensor(total, F.options().dtype(at::kDouble)), A};
}

at::Tensor lse_pass_cpu(const at::Tensor& features, const at::Tensor& rows) {
  check_pass(features, rows, "nce_shared_lse_pass");
  const auto F = features.contiguous();
  const auto G = rows.contiguous();
  double out = 0;
  INSTDISC_FMA_PASS(G, "nce_shared_lse_pass",
                    out = cap::lse_pass<scalar_t>(F.data_ptr<float>(), F.size(0), F.size(1), g, G.size(0)));
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
