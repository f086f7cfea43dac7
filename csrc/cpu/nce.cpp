// CPU op nce_forward, the fused sampled-negative NCE / InfoNCE (docs/method.md): loss, dloss/dF and the Z
// used, in one pass over the gathered rows (two when Z is estimated from the batch: a dot-only
// pre-pass first). Kernels: nce_kernels.h (per CPU capability); the NCEAverage ops are in
// nce_probs.cpp. Contract: instdisc_kernels/ops/nce.py; schema: csrc/instdisc.cpp.
#include <torch/library.h>

#include "nce_common.h"

namespace instdisc {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> nce_forward_cpu(
    const at::Tensor& features, const at::Tensor& memory, const at::Tensor& indices,
    const c10::optional<at::Tensor>& neg_indices, const at::Tensor& z, const at::Tensor& seed, int64_t num_negatives,
    double temperature, double proximal, int64_t loss_type, double z_ema, bool exclude_positive,
    const c10::optional<at::Tensor>& noise_probs) {
  checks::nce_forward_args(features, memory, indices, neg_indices, z, seed, num_negatives, noise_probs,
                           c10::DeviceType::CPU);
  const int64_t B = features.size(0), D = features.size(1), N = memory.size(0);
  const bool has_neg = neg_indices.has_value() && neg_indices->defined();
  checks::nce_scalars(num_negatives, has_neg, temperature, proximal, loss_type, z_ema, exclude_positive, N);
  const double z0 = z_value(z);

  auto y = indices.contiguous();
  checks::index_values(y.data_ptr<int64_t>(), B, N, "indices");
  at::Tensor neg, noise;
  const int64_t K = num_negatives;
  if (has_neg) {
    neg = neg_indices->contiguous();
    checks::index_values(neg.data_ptr<int64_t>(), neg.numel(), N, "neg_indices");
  }
  if (noise_probs.has_value() && noise_probs->defined()) noise = noise_probs->to(at::kFloat).contiguous();

  const auto acc = acc_dtype(features);
  auto feat = features.to(acc).contiguous();
  auto mem = row_major(memory);
  auto grad = at::empty({B, D}, features.options().dtype(acc));
  std::vector<double> row_loss(B, 0.0);
  std::vector<int64_t> bad(B, -1);

  NceArgs a{B,
            D,
            N,
            K,
            mem.stride(0),
            y.data_ptr<int64_t>(),
            neg.defined() ? neg.data_ptr<int64_t>() : nullptr,
            static_cast<uint64_t>(seed.item<int64_t>()),
            exclude_positive,
            noise.defined() ? noise.data_ptr<float>() : nullptr,
            temperature,
            proximal,
            loss_type};
  a.bad = bad.data();

  double z_used = z0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mem.scalar_type(), "nce_forward_cpu", [&] {
    using bank_t = scalar_t;
    with_acc(acc, [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      z_used = INSTDISC_CPU_DISPATCH(cap::nce_forward_kernel<bank_t, acc_t>(
          a, mem.data_ptr<bank_t>(), feat.data_ptr<acc_t>(), z0, z_ema, grad.data_ptr<acc_t>(), row_loss.data()));
    });
  });
  return {total_loss(row_loss, features, acc), grad, z_tensor(z_used, features)};
}

}  // namespace

TORCH_LIBRARY_IMPL(instdisc, CPU, m) { m.impl("nce_forward", &nce_forward_cpu); }

}  // namespace instdisc
