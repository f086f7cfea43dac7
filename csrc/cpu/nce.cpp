// CPU kernel of the fused sampled-negative NCE / InfoNCE op nce_forward (SPEC 1.1): loss, dloss/dF
// and the Z used, in one pass over the gathered rows (two when Z is estimated from the batch: a
// dot-only pre-pass first). The NCEAverage ops are in nce_probs.cpp; the shared pass in
// nce_common.h. Contract: instdisc_kernels/ops/nce.py; schema: csrc/instdisc.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "nce_common.h"

namespace instdisc {
namespace {

// InfoNCE: softmax cross-entropy over the K+1 logits, with an online max/sum per batch row, so one
// pass suffices: acc = sum_k exp(t_k - m) V_k is rescaled whenever the running max m grows.
template <typename bank_t, typename acc_t>
void infonce_pass(const NceArgs& a, const bank_t* mem, const acc_t* feat, acc_t* grad, double* row_loss) {
  const int64_t K1 = a.K + 1, D = a.D;
  const acc_t invT = static_cast<acc_t>(1.0 / a.T);
  at::parallel_for(0, a.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> idx(K1);
    std::vector<acc_t> buf(D);
    for (int64_t b = begin; b < end; ++b) {
      row_indices(a, b, idx.data());
      const acc_t* f = feat + b * D;
      acc_t* g = grad + b * D;
      acc_t t0 = 0, m = 0;
      double l = 1;
      for_each_row(mem, a.row_stride, idx.data(), K1, D, buf.data(), [&](int64_t k, const acc_t* v) {
        const acc_t sk = dot(v, f, D);
        flag_score(a, b, idx[k], sk);
        const acc_t t = sk * invT;
        if (k == 0) {  // the positive starts the running max and sum
          t0 = m = t;
          std::copy(v, v + D, g);
        } else if (t > m) {
          const acc_t r = std::exp(m - t);
          l = l * r + 1;
          for (int64_t d = 0; d < D; ++d) g[d] = g[d] * r + v[d];
          m = t;
        } else {
          const acc_t e = std::exp(t - m);
          l += e;
          axpy(g, e, v, D);
        }
      });
      // g = (softmax-weighted mean of the rows - V[y]) / (B T)
      const acc_t* v = as_acc<acc_t>(mem + idx[0] * a.row_stride, buf.data(), D);
      const acc_t inv_l = static_cast<acc_t>(1.0 / l);
      const acc_t scale = static_cast<acc_t>(1.0 / (a.T * a.B));
      for (int64_t d = 0; d < D; ++d) g[d] = (g[d] * inv_l - v[d]) * scale;
      row_loss[b] = (static_cast<double>(m) + std::log(l) - static_cast<double>(t0)) / a.B;
    }
  });
}

// proximal lambda/B ||F[b] - V[y[b]]||^2 and its gradient, added per batch row.
template <typename bank_t, typename acc_t>
void proximal_pass(const NceArgs& a, const bank_t* mem, const acc_t* feat, acc_t* grad, double* row_loss) {
  const int64_t D = a.D;
  const acc_t two_l_b = static_cast<acc_t>(2.0 * a.proximal / a.B);
  at::parallel_for(0, a.B, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(D);
    for (int64_t b = begin; b < end; ++b) {
      const acc_t* v = as_acc<acc_t>(mem + a.y[b] * a.row_stride, buf.data(), D);
      const acc_t* f = feat + b * D;
      acc_t* g = grad + b * D;
      double ss = 0;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t diff = f[d] - v[d];
        ss += static_cast<double>(diff) * diff;
        g[d] += two_l_b * diff;
      }
      row_loss[b] += a.proximal * ss / a.B;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nce_forward_cpu(
    const at::Tensor& features, const at::Tensor& memory, const at::Tensor& indices,
    const c10::optional<at::Tensor>& neg_indices, const at::Tensor& z, const at::Tensor& seed,
    int64_t num_negatives, double temperature, double proximal, int64_t loss_type, double z_ema,
    bool exclude_positive, const c10::optional<at::Tensor>& noise_probs) {
  check_bank_and_features(features, memory);
  const int64_t B = features.size(0), D = features.size(1), N = memory.size(0);
  check_cpu(indices, "indices");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "indices must be an int64 tensor, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 1 && indices.size(0) == B, "indices must have shape (B=", B, ",), got ",
                    indices.sizes());
  check_temperature(temperature);
  TORCH_CHECK_VALUE(std::isfinite(proximal) && proximal >= 0, "proximal must be a finite number >= 0, got ", proximal);
  TORCH_CHECK_VALUE(loss_type == 0 || loss_type == 1, "loss_type must be 0 (nce) or 1 (infonce), got ", loss_type);
  TORCH_CHECK_VALUE(z_ema >= 0 && z_ema < 1, "z_ema must be in [0, 1) (0 = off), got ", z_ema);
  const double z0 = z_value(z);
  check_cpu(seed, "seed");
  TORCH_CHECK_VALUE(seed.numel() == 1, "seed must hold exactly one value, got shape ", seed.sizes());
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "seed must be an int64 tensor, got ", seed.scalar_type());

  auto y = indices.contiguous();
  check_index_values(y.data_ptr<int64_t>(), B, N, "indices");
  at::Tensor neg;
  int64_t K = num_negatives;
  if (neg_indices.has_value()) {
    neg = neg_indices->contiguous();
    check_cpu(neg, "neg_indices");
    TORCH_CHECK_TYPE(neg.scalar_type() == at::kLong, "neg_indices must be an int64 tensor, got ", neg.scalar_type());
    TORCH_CHECK_VALUE(neg.dim() == 2 && neg.size(0) == B && neg.size(1) >= 1 && neg.size(1) == K,
                      "neg_indices must have shape (B=", B, ", num_negatives=", K, "), got ", neg.sizes());
    check_index_values(neg.data_ptr<int64_t>(), neg.numel(), N, "neg_indices");
  } else {
    TORCH_CHECK_VALUE(K >= 1, "num_negatives must be >= 1, got ", K);
    TORCH_CHECK_VALUE(!exclude_positive || N >= 2, "exclude_positive needs a memory bank with at least 2 rows");
  }
  at::Tensor noise;
  if (noise_probs.has_value()) {
    TORCH_CHECK_VALUE(neg_indices.has_value(),
                      "noise_probs needs explicit neg_indices (nce_loss draws them from noise_probs)");
    check_cpu(*noise_probs, "noise_probs");
    TORCH_CHECK_TYPE(noise_probs->is_floating_point(), "noise_probs must be a floating tensor, got ",
                     noise_probs->scalar_type());
    TORCH_CHECK_VALUE(noise_probs->dim() == 1 && noise_probs->size(0) == N, "noise_probs must have shape (N=", N,
                      ",), got ", noise_probs->sizes());
    noise = noise_probs->to(at::kFloat).contiguous();
  }

  const auto acc = acc_dtype(features);
  auto feat = features.to(acc).contiguous();
  auto mem = row_major(memory);
  auto grad = at::empty({B, D}, features.options().dtype(acc));
  std::vector<double> row_loss(B, 0.0);
  std::vector<int64_t> bad(B, -1);

  NceArgs a{B, D, N, K, mem.stride(0), y.data_ptr<int64_t>(), neg.defined() ? neg.data_ptr<int64_t>() : nullptr,
            static_cast<uint64_t>(seed.item<int64_t>()), exclude_positive,
            noise.defined() ? noise.data_ptr<float>() : nullptr, temperature, proximal, loss_type};
  a.bad = bad.data();

  double z_used = z0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mem.scalar_type(), "nce_forward_cpu", [&] {
    using bank_t = scalar_t;
    auto run = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      const bank_t* mp = mem.data_ptr<bank_t>();
      const acc_t* fp = feat.data_ptr<acc_t>();
      acc_t* gp = grad.data_ptr<acc_t>();
      if (loss_type == 1) {
        infonce_pass<bank_t, acc_t>(a, mp, fp, gp, row_loss.data());
      } else {
        z_used = nce_with_z<bank_t, acc_t>(a, mp, fp, z0, z_ema, gp, row_loss.data(), nullptr, nullptr);
      }
      report_bad_rows(a, mp);
      if (proximal > 0) proximal_pass<bank_t, acc_t>(a, mp, fp, gp, row_loss.data());
    };
    with_acc(acc, run);
  });
  return {total_loss(row_loss, features, acc), grad, z_tensor(z_used, features)};
}

}  // namespace

TORCH_LIBRARY_IMPL(instdisc, CPU, m) { m.impl("nce_forward", &nce_forward_cpu); }

}  // namespace instdisc
