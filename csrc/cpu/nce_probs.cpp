// CPU ops of the lemniscate NCEAverage drop-in (contract: instdisc_kernels/ops/nce_probs.py;
// schemas: csrc/instdisc.cpp):
//   nce_probs           P = exp(V[idx] . F / T) / Z;
//   nce_probs_backward  dF[b] = sum_k gP[b,k] P[b,k] / T V[idx[b,k]];
//   nce_probs_loss      nce_probs plus NCECriterion's loss and dloss/dF on them, in one pass.
// Kernels: nce_kernels.h (per CPU capability; the NCE pass is shared with nce_forward).
#include <torch/library.h>

#include "nce_common.h"

namespace instdisc {
namespace {

// The (B, K+1) index matrix, contiguous, its values checked.
at::Tensor idx_matrix(const at::Tensor& idx_in, int64_t N) {
  auto idx = idx_in.contiguous();
  checks::index_values(idx.data_ptr<int64_t>(), idx.numel(), N, "idx");
  return idx;
}

std::tuple<at::Tensor, at::Tensor> nce_probs_cpu(const at::Tensor& features, const at::Tensor& memory,
                                                 const at::Tensor& idx_in, const at::Tensor& z, double temperature) {
  checks::nce_probs_args(features, memory, idx_in, z, temperature, c10::DeviceType::CPU);
  const int64_t B = features.size(0), D = features.size(1), N = memory.size(0);
  const double z0 = z_value(z);
  auto idx = idx_matrix(idx_in, N);
  const int64_t K1 = idx.size(1);

  const auto acc = acc_dtype(features);
  auto feat = features.to(acc).contiguous();
  auto mem = row_major(memory);
  auto probs = at::empty({B, K1}, features.options().dtype(acc));
  double z_used = z0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mem.scalar_type(), "nce_probs_cpu", [&] {
    using bank_t = scalar_t;
    with_acc(acc, [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      z_used = INSTDISC_CPU_DISPATCH(
          cap::nce_probs_kernel<bank_t, acc_t>(mem.data_ptr<bank_t>(), mem.stride(0), idx.data_ptr<int64_t>(), B, K1, D,
                                               N, feat.data_ptr<acc_t>(), temperature, z0, probs.data_ptr<acc_t>()));
    });
  });
  return {probs, z_tensor(z_used, features)};
}

at::Tensor nce_probs_backward_cpu(const at::Tensor& grad_probs, const at::Tensor& probs_in, const at::Tensor& memory,
                                  const at::Tensor& idx_in, double temperature) {
  checks::nce_probs_backward_args(grad_probs, probs_in, memory, idx_in, temperature, c10::DeviceType::CPU);
  const int64_t B = probs_in.size(0), K1 = probs_in.size(1), D = memory.size(1), N = memory.size(0);
  auto idx = idx_matrix(idx_in, N);
  const auto acc = probs_in.scalar_type();
  auto probs = probs_in.contiguous();
  auto gp = grad_probs.to(acc).contiguous();  // also materialises a stride-0 (expanded) gradient
  auto mem = row_major(memory);
  auto grad = at::empty({B, D}, probs.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mem.scalar_type(), "nce_probs_backward_cpu", [&] {
    using bank_t = scalar_t;
    with_acc(acc, [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      INSTDISC_CPU_DISPATCH(cap::nce_probs_backward_kernel<bank_t, acc_t>(
          mem.data_ptr<bank_t>(), mem.stride(0), idx.data_ptr<int64_t>(), B, K1, D, probs.data_ptr<acc_t>(),
          gp.data_ptr<acc_t>(), temperature, grad.data_ptr<acc_t>()));
    });
  });
  return grad;
}

// nce_probs and, in the same pass over the gathered rows, lemniscate's NCECriterion on them (Pn = 1/N,
// K = idx.size(1) - 1): its loss, dloss/dF (as nce_forward computes them) and dloss/dP. The drop-in NCEAverage
// uses it when NCECriterion follows, so that its backward needs no second pass over the bank.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> nce_probs_loss_cpu(const at::Tensor& features,
                                                                                          const at::Tensor& memory,
                                                                                          const at::Tensor& idx_in,
                                                                                          const at::Tensor& z,
                                                                                          double temperature) {
  checks::nce_probs_args(features, memory, idx_in, z, temperature, c10::DeviceType::CPU);
  const int64_t B = features.size(0), D = features.size(1), N = memory.size(0);
  const double z0 = z_value(z);
  auto idx = idx_matrix(idx_in, N);
  INSTDISC_CHECK_VALUE(idx.size(1) >= 2, "idx must have at least 2 columns (the positive and K >= 1 negatives), got ",
                       idx.sizes());
  const int64_t K = idx.size(1) - 1;

  const auto acc = acc_dtype(features);
  auto feat = features.to(acc).contiguous();
  auto mem = row_major(memory);
  auto probs = at::empty({B, K + 1}, features.options().dtype(acc));
  auto grad_probs = at::empty({B, K + 1}, features.options().dtype(acc));
  auto grad = at::empty({B, D}, features.options().dtype(acc));
  std::vector<double> row_loss(B, 0.0);
  NceArgs a{B, D, N, K, mem.stride(0), nullptr, nullptr, 0, false, nullptr, temperature, 0.0, 0};
  a.idx_full = idx.data_ptr<int64_t>();

  double z_used = z0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mem.scalar_type(), "nce_probs_loss_cpu", [&] {
    using bank_t = scalar_t;
    with_acc(acc, [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      z_used = INSTDISC_CPU_DISPATCH(cap::nce_probs_loss_kernel<bank_t, acc_t>(
          a, mem.data_ptr<bank_t>(), feat.data_ptr<acc_t>(), z0, grad.data_ptr<acc_t>(), row_loss.data(),
          probs.data_ptr<acc_t>(), grad_probs.data_ptr<acc_t>()));
    });
  });
  return {probs, total_loss(row_loss, features, acc), grad, grad_probs, z_tensor(z_used, features)};
}

}  // namespace

TORCH_LIBRARY_IMPL(instdisc, CPU, m) {
  m.impl("nce_probs", &nce_probs_cpu);
  m.impl("nce_probs_backward", &nce_probs_backward_cpu);
  m.impl("nce_probs_loss", &nce_probs_loss_cpu);
}

}  // namespace instdisc
