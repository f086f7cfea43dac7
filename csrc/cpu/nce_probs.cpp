// CPU kernels of the lemniscate NCEAverage drop-in ops (contract: instdisc_kernels/ops/nce_probs.py;
// schemas: csrc/instdisc.cpp):
//   nce_probs           P = exp(V[idx] . F / T) / Z;
//   nce_probs_backward  dF[b] = sum_k gP[b,k] P[b,k] / T V[idx[b,k]];
//   nce_probs_loss      nce_probs plus NCECriterion's loss and dloss/dF on them, in one pass.
// The NCE pass they share with nce_forward is in nce_common.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "nce_common.h"

namespace instdisc {
namespace {

// nce_pass for a full index matrix (a.idx_full), fixed Z and uniform noise, walking the bank in row
// order: the B*(K+1) entries are counting-sorted by bank row and each row, read once, serves every
// entry that names it (random gathers become a forward scan). The rows are split in kRowChunks fixed
// ranges, each with its own gradient and loss partials, combined in chunk order: the result does not
// depend on the thread count.
constexpr int64_t kRowChunks = 32;

template <typename bank_t, typename acc_t>
void nce_pass_row_order(const NceArgs& a, const bank_t* mem, const acc_t* feat, double log_z, acc_t* grad,
                        double* row_loss, acc_t* probs, acc_t* grad_probs) {
  const int64_t B = a.B, D = a.D, N = a.N, K1 = a.K + 1, E = B * K1;
  const int64_t* idx = a.idx_full;
  std::vector<int64_t> start(N + 1, 0), order(E);
  for (int64_t e = 0; e < E; ++e) ++start[idx[e] + 1];
  for (int64_t n = 0; n < N; ++n) start[n + 1] += start[n];
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < E; ++e) order[next[idx[e]]++] = e;
  }
  const int64_t C = std::min(kRowChunks, N);
  std::vector<acc_t> g_part(static_cast<size_t>(C * B * D), acc_t(0));
  std::vector<RowLoss> l_part(static_cast<size_t>(C * B));
  const UniformNce<acc_t> u(a, log_z);
  const acc_t inv_b = static_cast<acc_t>(1.0 / a.B);
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> buf(D);
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* gc = g_part.data() + c * B * D;
      RowLoss* lc = l_part.data() + c * B;
      const int64_t n1 = N * (c + 1) / C;
      for (int64_t n = N * c / C; n < n1; ++n) {
        if (start[n] == start[n + 1]) continue;
        if (n + 4 < N) rows::prefetch_row(mem + (n + 4) * a.row_stride, D * sizeof(bank_t));
        const acc_t* v = as_acc<acc_t>(mem + n * a.row_stride, buf.data(), D);
        for (int64_t j = start[n]; j < start[n + 1]; ++j) {
          const int64_t e = order[j], b = e / K1;
          acc_t P;
          const bool positive = e - b * K1 == 0;
          const acc_t coef = u.entry(positive, dot(v, feat + b * D, D), lc[b], P);
          probs[e] = P;
          grad_probs[e] = criterion_dp(positive, P, u.c) * inv_b;
          axpy(gc + b * D, coef, v, D);
        }
      }
    }
  });
  const acc_t scale = static_cast<acc_t>(1.0 / (a.T * a.B));
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* g = grad + b * D;
      double total = 0;
      std::fill(g, g + D, acc_t(0));
      for (int64_t c = 0; c < C; ++c) {
        const acc_t* gc = g_part.data() + (c * B + b) * D;
        for (int64_t d = 0; d < D; ++d) g[d] += gc[d];
        total += l_part[c * B + b].sum();
      }
      for (int64_t d = 0; d < D; ++d) g[d] *= scale;
      row_loss[b] = -total / a.B;
    }
  });
}


// --------------------------------------------------------------------------- //
// nce_probs / nce_probs_backward                                               //
// --------------------------------------------------------------------------- //
void check_idx_matrix(const at::Tensor& idx, int64_t B, int64_t N) {
  check_cpu(idx, "idx");
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "idx must be an int64 tensor, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.dim() == 2 && idx.size(0) == B && idx.size(1) >= 1, "idx must have shape (B=", B,
                    ", K+1), got ", idx.sizes());
  check_index_values(idx.data_ptr<int64_t>(), idx.numel(), N, "idx");
}

std::tuple<at::Tensor, at::Tensor> nce_probs_cpu(const at::Tensor& features, const at::Tensor& memory,
                                                 const at::Tensor& idx_in, const at::Tensor& z, double temperature) {
  check_bank_and_features(features, memory);
  const int64_t B = features.size(0), D = features.size(1), N = memory.size(0);
  check_temperature(temperature);
  const double z0 = z_value(z);
  auto idx = idx_in.contiguous();
  check_idx_matrix(idx, B, N);
  const int64_t K1 = idx.size(1);

  const auto acc = acc_dtype(features);
  auto feat = features.to(acc).contiguous();
  auto mem = row_major(memory);
  auto probs = at::empty({B, K1}, features.options().dtype(acc));
  std::vector<double> row_max(B), row_sum(B);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t rs = mem.stride(0);
  double z_used = z0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mem.scalar_type(), "nce_probs_cpu", [&] {
    using bank_t = scalar_t;
    auto run = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      const bank_t* mp = mem.data_ptr<bank_t>();
      const acc_t* fp = feat.data_ptr<acc_t>();
      acc_t* pp = probs.data_ptr<acc_t>();
      const acc_t invT = static_cast<acc_t>(1.0 / temperature);
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {  // logits t = s / T
        std::vector<acc_t> buf(D);
        for (int64_t b = begin; b < end; ++b) {
          acc_t* t = pp + b * K1;
          acc_t m = -std::numeric_limits<acc_t>::infinity();
          for_each_row(mp, rs, ip + b * K1, K1, D, buf.data(), [&](int64_t k, const acc_t* v) {
            t[k] = dot(v, fp + b * D, D) * invT;
            m = std::max(m, t[k]);
          });
          double sum = 0;
          for (int64_t k = 0; k < K1; ++k) sum += std::exp(t[k] - m);
          row_max[b] = m;
          row_sum[b] = sum;
        }
      });
      double log_z;
      if (z0 > 0) {
        log_z = std::log(z0);
      } else {
        log_z = log_z_estimate(row_max, row_sum, N, B * K1);
        z_used = std::exp(log_z);
      }
      const acc_t lz = static_cast<acc_t>(log_z);
      at::parallel_for(0, B * K1, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) pp[i] = std::exp(pp[i] - lz);
      });
    };
    if (acc == at::kDouble) {
      run(double(0));
    } else {
      run(float(0));
    }
  });
  auto z_out = z_tensor(z_used, features);
  return {probs, z_out};
}

at::Tensor nce_probs_backward_cpu(const at::Tensor& grad_probs, const at::Tensor& probs_in, const at::Tensor& memory,
                                  const at::Tensor& idx_in, double temperature) {
  check_cpu(probs_in, "probs");
  check_cpu(grad_probs, "grad_probs");
  check_cpu(memory, "memory");
  TORCH_CHECK_TYPE(probs_in.scalar_type() == at::kFloat || probs_in.scalar_type() == at::kDouble,
                   "probs must be float32 or float64 (the output of nce_probs), got ", probs_in.scalar_type());
  TORCH_CHECK_VALUE(probs_in.dim() == 2 && probs_in.size(0) > 0 && probs_in.size(1) >= 1,
                    "probs must be a non-empty (B, K+1) tensor, got shape ", probs_in.sizes());
  TORCH_CHECK_TYPE(grad_probs.is_floating_point(), "grad_probs must be a floating tensor, got ",
                   grad_probs.scalar_type());
  TORCH_CHECK_VALUE(grad_probs.sizes() == probs_in.sizes(), "grad_probs must have the shape of probs ",
                    probs_in.sizes(), ", got ", grad_probs.sizes());
  TORCH_CHECK_VALUE(memory.dim() == 2 && memory.size(0) > 0, "memory must be a non-empty 2-D (N, D) tensor, got shape ",
                    memory.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(memory.scalar_type()),
                   "memory must be float32/float64/bfloat16/float16, got ", memory.scalar_type());
  check_temperature(temperature);
  const int64_t B = probs_in.size(0), K1 = probs_in.size(1), D = memory.size(1), N = memory.size(0);
  auto idx = idx_in.contiguous();
  check_idx_matrix(idx, B, N);
  TORCH_CHECK_VALUE(idx.size(1) == K1, "idx must have the shape of probs ", probs_in.sizes(), ", got ", idx.sizes());

  const auto acc = probs_in.scalar_type();
  auto probs = probs_in.contiguous();
  auto gp = grad_probs.to(acc).contiguous();  // also materialises a stride-0 (expanded) gradient
  auto mem = row_major(memory);
  auto grad = at::empty({B, D}, probs.options());
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t rs = mem.stride(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mem.scalar_type(), "nce_probs_backward_cpu", [&] {
    using bank_t = scalar_t;
    auto run = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      const bank_t* mp = mem.data_ptr<bank_t>();
      const acc_t* pp = probs.data_ptr<acc_t>();
      const acc_t* gpp = gp.data_ptr<acc_t>();
      acc_t* out = grad.data_ptr<acc_t>();
      const acc_t invT = static_cast<acc_t>(1.0 / temperature);
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buf(D);
        for (int64_t b = begin; b < end; ++b) {
          acc_t* g = out + b * D;
          std::fill(g, g + D, acc_t(0));
          for_each_row(mp, rs, ip + b * K1, K1, D, buf.data(), [&](int64_t k, const acc_t* v) {
            axpy(g, gpp[b * K1 + k] * pp[b * K1 + k] * invT, v, D);
          });
        }
      });
    };
    if (acc == at::kDouble) {
      run(double(0));
    } else {
      run(float(0));
    }
  });
  return grad;
}

// nce_probs and, in the same pass over the gathered rows, lemniscate's NCECriterion on them (Pn = 1/N,
// K = idx.size(1) - 1): its loss, dloss/dF (as nce_forward computes them) and dloss/dP. The drop-in NCEAverage
// uses it when NCECriterion follows, so that its backward needs no second pass over the bank.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> nce_probs_loss_cpu(
    const at::Tensor& features, const at::Tensor& memory, const at::Tensor& idx_in, const at::Tensor& z,
    double temperature) {
  check_bank_and_features(features, memory);
  const int64_t B = features.size(0), D = features.size(1), N = memory.size(0);
  check_temperature(temperature);
  const double z0 = z_value(z);
  auto idx = idx_in.contiguous();
  check_idx_matrix(idx, B, N);
  TORCH_CHECK_VALUE(idx.size(1) >= 2, "idx must have at least 2 columns (the positive and K >= 1 negatives), got ",
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
    auto run = [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      const bank_t* mp = mem.data_ptr<bank_t>();
      const acc_t* fp = feat.data_ptr<acc_t>();
      acc_t* gp = grad.data_ptr<acc_t>();
      acc_t* pp = probs.data_ptr<acc_t>();
      acc_t* gpp = grad_probs.data_ptr<acc_t>();
      if (z0 > 0 && 4 * B * (K + 1) >= N) {  // dense enough for the row-order walk to pay off
        nce_pass_row_order<bank_t, acc_t>(a, mp, fp, std::log(z0), gp, row_loss.data(), pp, gpp);
      } else {
        z_used = nce_with_z<bank_t, acc_t>(a, mp, fp, z0, 0.0, gp, row_loss.data(), pp, gpp);
      }
    };
    with_acc(acc, run);
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
