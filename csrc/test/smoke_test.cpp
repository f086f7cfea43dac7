// ctest smoke test of the CMake-built op library: dlopen() libinstdisc_ops (its
// static initialisers register the instdisc::* ops), then call the CPU kernels
// through the dispatcher on closed-form inputs and compare with values that
// csrc/test/smoke_values.py computed with the float64 oracle (reference.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

constexpr int64_t B = 3, D = 5, N = 7, K = 4;
constexpr double T = 0.5;
int failures = 0;

void expect_close(const std::string& what, const at::Tensor& got, const std::vector<double>& want, double tol = 2e-5) {
  auto g = got.to(at::kCPU).to(at::kDouble).contiguous().reshape({-1});
  if (g.numel() != static_cast<int64_t>(want.size())) {
    std::fprintf(stderr, "FAIL %s: %lld values, expected %zu\n", what.c_str(), static_cast<long long>(g.numel()),
                 want.size());
    ++failures;
    return;
  }
  const double* p = g.data_ptr<double>();
  for (size_t i = 0; i < want.size(); ++i) {
    if (!(std::fabs(p[i] - want[i]) <= tol * (1 + std::fabs(want[i])))) {
      std::fprintf(stderr, "FAIL %s[%zu]: got %.9g, expected %.9g\n", what.c_str(), i, p[i], want[i]);
      ++failures;
    }
  }
  std::printf("ok   %s (%zu values)\n", what.c_str(), want.size());
}

bool has_op(const char* name) { return c10::Dispatcher::singleton().findSchema({name, ""}).has_value(); }

// nce_forward (NCE with Z estimated from the batch, and InfoNCE) against the oracle's values.
void check_nce_forward(const at::Tensor& F, const at::Tensor& V, const at::Tensor& y, const at::Tensor& neg,
                       const std::string& device) {
  auto tag = [&](const char* what) { return "nce_forward " + std::string(what) + " (" + device + ")"; };
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("instdisc::nce_forward", "");
  for (int64_t loss_type : {0, 1}) {
    // (features, memory, indices, neg_indices, z, seed, K, T, proximal, loss_type, z_ema,
    //  exclude_positive, noise_probs); z = 0: estimate Z from this batch.
    std::vector<c10::IValue> stack{
        F,         V,   y,     neg,          at::zeros({1}, F.options()), at::zeros({1}, y.options()), K, T, 0.0,
        loss_type, 0.0, false, c10::IValue()};
    op.callBoxed(&stack);
    if (loss_type == 0) {
      expect_close(tag("nce loss"), stack[0].toTensor(), {2.58835476});
      expect_close(tag("nce z"), stack[2].toTensor(), {6.88282905});
      expect_close(tag("nce grad"), stack[1].toTensor(),
                   {-0.0605528195, 0.0214174998, 0.0181464874, -0.0573472678, 0.0954002524, -0.240849324, 0.25781605,
                    -0.269622584, 0.276032613, -0.276917861, -0.0441955783, -0.000641288807, 0.0454653192, -0.089379357,
                    0.131504476});
    } else {
      expect_close(tag("infonce loss"), stack[0].toTensor(), {1.70127133});
      expect_close(tag("infonce grad"), stack[1].toTensor(),
                   {-0.0626462906, 0.0242287749, 0.0146736758, -0.0532824284, 0.0908247426, -0.263293157, 0.28009723,
                    -0.291295152, 0.296662794, -0.296092741, -0.0494959907, 0.00418535915, 0.0412090412, -0.0857786382,
                    0.128631385});
    }
  }
}

// bank_update_ with a repeated index: row 2 takes batch row 2 (last occurrence wins).
void check_bank_update(const at::Tensor& F, const at::Tensor& V, const at::Tensor& y, const std::string& device) {
  auto bank = V.clone();
  auto upd = c10::Dispatcher::singleton().findSchemaOrThrow("instdisc::bank_update_", "");
  std::vector<c10::IValue> stack{bank, y, F, 0.5};
  upd.callBoxed(&stack);
  auto rows = at::tensor(std::vector<int64_t>{0, 2}, at::kLong).to(bank.device());
  expect_close("bank_update_ rows 0, 2 (" + device + ")", bank.index({rows}),
               {0.141042605, 0.00180731062, 0.942454815, -0.230822593, 0.196477965, -0.446811199, -0.425444514,
                0.264840662, 0.703183711, 0.233984739});
  auto row1 = V[1].to(at::kCPU).to(at::kDouble).contiguous();
  expect_close("bank_update_ untouched row 1 (" + device + ")", bank[1],
               std::vector<double>(row1.data_ptr<double>(), row1.data_ptr<double>() + D), 0.0);
}

// knn_topk (bf16 prefilter + float64 rescore; the prefilter of the CPU capability in use,
// INSTDISC_CPU_CAPABILITY caps it): the float64 top k.
void check_knn_topk(const at::Tensor& F, const at::Tensor& V) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("instdisc::knn_topk", "");
  std::vector<c10::IValue> stack{F, V, K, int64_t(64)};
  op.callBoxed(&stack);
  expect_close("knn_topk indices", stack[1].toTensor(), {5, 2, 1, 4, 1, 4, 5, 2, 4, 1, 0, 5}, 0.0);
  expect_close("knn_topk similarities", stack[0].toTensor(),
               {0.0728342134, 0.0668482532, 0.000326025533, -0.0202702593, 0.191764524, 0.15687154, 0.0686033437,
                0.00889350721, 0.109267315, 0.108466671, -0.028473361, -0.0339138656},
               1e-7);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s path/to/libinstdisc_ops.so\n", argv[0]);
    return 2;
  }
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "FAIL dlopen: %s\n", dlerror());
    return 1;
  }
  // Inputs as csrc/test/smoke_values.py builds them.
  auto F = at::empty({B, D}, at::kFloat), V = at::empty({N, D}, at::kFloat);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t d = 0; d < D; ++d) F[b][d] = static_cast<float>(0.5 * std::sin(1.0 + b * D + d));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < D; ++d) V[n][d] = static_cast<float>(0.5 * std::cos(1.0 + 2 * n + 3 * d));
  auto y = at::tensor(std::vector<int64_t>{2, 0, 2}, at::kLong);
  auto neg = at::empty({B, K}, at::kLong);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k) neg[b][k] = (3 * b + 2 * k + 1) % N;

  if (has_op("instdisc::nce_forward")) {
    check_nce_forward(F, V, y, neg, "cpu");
#ifdef INSTDISC_SMOKE_CUDA
    // A CUDA build registers CUDA kernels; with a GPU they must give the same values.
    for (const char* name :
         {"instdisc::nce_forward", "instdisc::nce_probs", "instdisc::nce_probs_backward", "instdisc::bank_update_"}) {
      if (!c10::Dispatcher::singleton().findSchemaOrThrow(name, "").hasKernelForDispatchKey(c10::DispatchKey::CUDA)) {
        std::fprintf(stderr, "FAIL %s has no CUDA kernel\n", name);
        ++failures;
      }
    }
    if (at::globalContext().hasCUDA()) {
      check_nce_forward(F.cuda(), V.cuda(), y.cuda(), neg.cuda(), "cuda");
    } else {
      std::printf("skip nce_forward on cuda (no CUDA device)\n");
    }
#endif
  } else {
    std::fprintf(stderr, "FAIL instdisc::nce_forward is not registered\n");
    ++failures;
  }

  check_bank_update(F, V, y, "cpu");
#ifdef INSTDISC_SMOKE_CUDA
  if (at::globalContext().hasCUDA()) check_bank_update(F.cuda(), V.cuda(), y.cuda(), "cuda");
#endif

  if (has_op("instdisc::knn_topk")) {
    check_knn_topk(F, V);
  } else {
    std::fprintf(stderr, "FAIL instdisc::knn_topk is not registered\n");
    ++failures;
  }

  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all smoke checks passed\n");
  return 0;
}
