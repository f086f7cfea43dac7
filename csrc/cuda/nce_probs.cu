// CUDA kernels of the lemniscate NCEAverage drop-in ops instdisc::nce_probs / nce_probs_backward
// (contract: the schemas in csrc/instdisc.cpp and instdisc_kernels/ops/nce_probs.py), on the row
// kernel of nce_rows.cuh.
#include <torch/library.h>

#include "nce_rows.cuh"

namespace instdisc {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> nce_probs_cuda(const at::Tensor& features, const at::Tensor& memory,
                                                  const at::Tensor& idx, const at::Tensor& z, double temperature) {
  checks::nce_probs_args(features, memory, idx, z, temperature, c10::DeviceType::CUDA);
  check_cuda_dim(memory);
  const int64_t B = features.size(0), N = memory.size(0), D = memory.size(1);
  c10::cuda::CUDAGuard guard(memory.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto acc = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto feat = features.to(acc).contiguous();
  auto mem = memory.contiguous();
  auto ix = idx.contiguous();
  auto z_in = z.reshape({1}).to(at::kFloat).contiguous();
  const int64_t K1 = idx.size(1);
  auto probs = at::empty({B, K1}, feat.options());
  auto zbuf = at::empty({1}, feat.options());
  auto z_out = at::empty({1}, z_in.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "nce_probs_cuda", [&] {
    using acc_t = scalar_t;
    RowArgs<acc_t> a = planned_rows<acc_t>(B, K1, N, D, memory.get_device());
    auto part_stat = at::empty({a.B * a.S, 4}, feat.options());
    a.feat = feat.data_ptr<acc_t>();
    a.idx = ix.data_ptr<int64_t>();
    a.probs_out = probs.data_ptr<acc_t>();
    a.part_stat = part_stat.data_ptr<acc_t>();
    a.inv_t = acc_t(1) / static_cast<acc_t>(temperature);
    INSTDISC_DISPATCH_BANK(mem.scalar_type(), "nce_probs_cuda_bank",
                           [&] { launch_rows<kProbs, scalar_t, acc_t>(a, mem, stream); });
    z_kernel<acc_t><<<1, 256, 0, stream>>>(a.part_stat, a.B * a.S, z_in.data_ptr<float>(), acc_t(0),
                                           static_cast<acc_t>(N) / static_cast<acc_t>(B * K1), zbuf.data_ptr<acc_t>(),
                                           z_out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t n = B * K1;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4096));
    divide_kernel<acc_t><<<blocks, 256, 0, stream>>>(probs.data_ptr<acc_t>(), n, zbuf.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {probs, z_out};
}

at::Tensor nce_probs_backward_cuda(const at::Tensor& grad_probs, const at::Tensor& probs, const at::Tensor& memory,
                                   const at::Tensor& idx, double temperature) {
  checks::nce_probs_backward_args(grad_probs, probs, memory, idx, temperature, c10::DeviceType::CUDA);
  check_cuda_dim(memory);
  c10::cuda::CUDAGuard guard(memory.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = idx.size(0), K1 = idx.size(1), N = memory.size(0), D = memory.size(1);
  const auto acc = probs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto mem = memory.contiguous();
  auto ix = idx.contiguous();
  // coef[b,k] = gP * P / T, as the reference computes it.
  auto coef = grad_probs.to(probs.scalar_type()).mul(probs).div(temperature).to(acc).contiguous();
  auto grad = at::empty({B, D}, coef.options());
  if (B == 0) return grad.to(probs.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(acc, "nce_probs_backward_cuda", [&] {
    using acc_t = scalar_t;
    RowArgs<acc_t> a = planned_rows<acc_t>(B, K1, N, D, memory.get_device());
    auto part_grad = at::empty({a.B * a.S, D}, coef.options());
    auto part_stat = at::empty({a.B * a.S, 4}, coef.options());
    a.idx = ix.data_ptr<int64_t>();
    a.coef_in = coef.data_ptr<acc_t>();
    a.part_grad = part_grad.data_ptr<acc_t>();
    a.part_stat = part_stat.data_ptr<acc_t>();
    INSTDISC_DISPATCH_BANK(mem.scalar_type(), "nce_probs_backward_cuda_bank", [&] {
      using bank_t = scalar_t;
      launch_rows<kProbsBwd, bank_t, acc_t>(a, mem, stream);
      finalize_rows_kernel<kProbsBwd, bank_t, acc_t><<<static_cast<unsigned>(B), 128, 0, stream>>>(
          a, mem.data_ptr<bank_t>(), grad.data_ptr<acc_t>(), nullptr, acc_t(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad.to(probs.scalar_type());
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(instdisc, CUDA, m) {
  m.impl("nce_probs", &cuda::nce_probs_cuda);
  m.impl("nce_probs_backward", &cuda::nce_probs_backward_cuda);
}

}  // namespace instdisc
