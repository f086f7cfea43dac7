// CUDA sampled-negative NCE / InfoNCE (docs/method.md): instdisc::nce_forward. Contract: the schema in
// csrc/instdisc.cpp and the docstring of instdisc_kernels/ops/nce.py. The row kernel (one warp per
// batch row and slice of the K+1 columns) is in nce_rows.cuh; the NCEAverage ops in nce_probs.cu.
#include <torch/library.h>

#include "nce_rows.cuh"

namespace instdisc {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> nce_forward_cuda(
    const at::Tensor& features, const at::Tensor& memory, const at::Tensor& indices,
    const std::optional<at::Tensor>& neg_indices, const at::Tensor& z, const at::Tensor& seed, int64_t num_negatives,
    double temperature, double proximal, int64_t loss_type, double z_ema, bool exclude_positive,
    const std::optional<at::Tensor>& noise_probs) {
  checks::nce_forward_args(features, memory, indices, neg_indices, z, seed, num_negatives, noise_probs,
                           c10::DeviceType::CUDA);
  check_cuda_dim(memory);
  const int64_t B = features.size(0), N = memory.size(0), D = memory.size(1);
  const bool has_neg = neg_indices.has_value() && neg_indices->defined();
  checks::nce_scalars(num_negatives, has_neg, temperature, proximal, loss_type, z_ema, exclude_positive, N);
  const bool has_noise = noise_probs.has_value() && noise_probs->defined();

  c10::cuda::CUDAGuard guard(memory.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool dbl = features.scalar_type() == at::kDouble;
  const auto acc = dbl ? at::kDouble : at::kFloat;
  auto feat = features.to(acc).contiguous();
  auto mem = memory.contiguous();
  auto pos = indices.contiguous();
  at::Tensor neg = has_neg ? neg_indices->contiguous() : at::Tensor();
  at::Tensor noise = has_noise ? noise_probs->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor seed_c = seed.contiguous();
  auto z_in = z.reshape({1}).to(at::kFloat).contiguous();
  const int64_t K1 = num_negatives + 1;

  auto grad = at::empty({B, D}, feat.options());
  auto loss = at::empty({}, feat.options());
  auto row_loss = at::empty({B}, feat.options());
  auto zbuf = at::empty({2}, feat.options());
  at::Tensor z_out = loss_type == 0 ? at::empty({1}, z_in.options()) : z_in.clone();

  AT_DISPATCH_FLOATING_TYPES(acc, "nce_forward_cuda", [&] {
    using acc_t = scalar_t;
    RowArgs<acc_t> a = planned_rows<acc_t>(B, K1, N, D, memory.get_device());
    auto part_grad = at::empty({a.B * a.S, D}, feat.options());
    auto part_stat = at::empty({a.B * a.S, 4}, feat.options());
    a.feat = feat.data_ptr<acc_t>();
    a.pos = pos.data_ptr<int64_t>();
    a.neg = has_neg ? neg.data_ptr<int64_t>() : nullptr;
    a.seed = has_neg ? nullptr : seed_c.data_ptr<int64_t>();  // read only when drawing
    a.noise = has_noise ? noise.data_ptr<float>() : nullptr;
    a.z_in = z_in.data_ptr<float>();
    a.zval = zbuf.data_ptr<acc_t>();
    a.part_grad = part_grad.data_ptr<acc_t>();
    a.part_stat = part_stat.data_ptr<acc_t>();
    a.exclude_pos = exclude_positive && !has_neg;
    a.inv_t = acc_t(1) / static_cast<acc_t>(temperature);
    a.scale = acc_t(1) / (static_cast<acc_t>(temperature) * static_cast<acc_t>(B));
    a.z_ema = static_cast<acc_t>(z_ema);
    a.knoise = static_cast<acc_t>(num_negatives);
    INSTDISC_DISPATCH_BANK(mem.scalar_type(), "nce_forward_cuda_bank", [&] {
      using bank_t = scalar_t;
      if (loss_type == 0) {
        launch_rows<kZSum, bank_t, acc_t>(a, mem, stream);  // exits at once on the device when Z is given
        log_z_kernel<acc_t>
            <<<1, 256, 0, stream>>>(a.part_stat, a.B * a.S, a.z_in, a.z_ema,
                                    static_cast<acc_t>(std::log(static_cast<double>(N) / static_cast<double>(B * K1))),
                                    zbuf.data_ptr<acc_t>(), z_out.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        launch_rows<kNce, bank_t, acc_t>(a, mem, stream);
        finalize_rows_kernel<kNce, bank_t, acc_t>
            <<<static_cast<unsigned>(B), 128, 0, stream>>>(a, mem.data_ptr<bank_t>(), grad.data_ptr<acc_t>(),
                                                           row_loss.data_ptr<acc_t>(), static_cast<acc_t>(proximal));
      } else {
        launch_rows<kInfoNce, bank_t, acc_t>(a, mem, stream);
        finalize_rows_kernel<kInfoNce, bank_t, acc_t>
            <<<static_cast<unsigned>(B), 128, 0, stream>>>(a, mem.data_ptr<bank_t>(), grad.data_ptr<acc_t>(),
                                                           row_loss.data_ptr<acc_t>(), static_cast<acc_t>(proximal));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    mean_kernel<acc_t><<<1, 256, 0, stream>>>(row_loss.data_ptr<acc_t>(), B, loss.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad, z_out};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(instdisc, CUDA, m) { m.impl("nce_forward", &cuda::nce_forward_cuda); }

}  // namespace instdisc
