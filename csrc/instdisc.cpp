// Operator schemas of the instdisc library: defined once here, implemented per
// backend in csrc/cpu/ (TORCH_LIBRARY_IMPL CPU) and csrc/cuda/ (CUDA).
// Fake (meta) kernels and autograd formulas are registered from Python
// (instdisc_kernels/ops/*.py), as in pytorch/extension-cpp.
#ifndef INSTDISC_NO_PYTHON  // defined by the CMake build (libinstdisc_ops needs no Python)
#include <Python.h>
#endif
#include <torch/library.h>

#include <string>

#include "cpu/capability.h"

#ifndef INSTDISC_NO_PYTHON
extern "C" {
// `import instdisc_kernels._C` loads this shared library, which runs the
// static TORCH_LIBRARY initialisers below. No Python functions are exported.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "instdisc C++/CUDA operators (torch.ops.instdisc)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(instdisc, m) {
  // Memory-bank momentum update (docs/method.md), in place:
  //   V[y[b]] <- normalize(m * V_old[y[b]] + (1 - m) * F[b]); last occurrence wins.
  m.def("bank_update_(Tensor(a!) memory, Tensor indices, Tensor features, float momentum) -> ()");

  // Fused sampled-negative NCE / InfoNCE forward (docs/method.md). Reads each bank row
  // once and returns the loss, dloss/dfeatures (saved for backward) and the Z used.
  //   neg_indices: (B, K) int64 or None (then drawn in-kernel from Philox(seed)).
  //   z: (1,) float32; <= 0 means "estimate from this batch".
  //   loss_type: 0 = lemniscate NCE, 1 = InfoNCE (softmax CE over the K+1 logits).
  //   z_ema: 0 = off, else Z <- z_ema * Z + (1 - z_ema) * estimate.
  //   noise_probs: (N,) float32 noise distribution for Pn (None: uniform 1/N).
  m.def(
      "nce_forward(Tensor features, Tensor memory, Tensor indices, Tensor? neg_indices, "
      "Tensor z, Tensor seed, int num_negatives, float temperature, float proximal, "
      "int loss_type, float z_ema, bool exclude_positive, Tensor? noise_probs) "
      "-> (Tensor loss, Tensor grad_features, Tensor z_out)");

  // lemniscate NCEAverage drop-in: P = exp(V[idx] . F / T) / Z (B x (K+1)) and
  // its backward dF[b] = sum_k gP[b,k] * P[b,k] / T * V[idx[b,k]].
  m.def(
      "nce_probs(Tensor features, Tensor memory, Tensor idx, Tensor z, float temperature) "
      "-> (Tensor probs, Tensor z_out)");
  m.def(
      "nce_probs_backward(Tensor grad_probs, Tensor probs, Tensor memory, Tensor idx, "
      "float temperature) -> Tensor");
  // nce_probs plus lemniscate's NCECriterion on them (Pn = 1/N, K = idx.size(1) - 1) in the same
  // pass: its loss, dloss/dF and dloss/dP (CPU only; the drop-in uses it when NCECriterion follows).
  m.def(
      "nce_probs_loss(Tensor features, Tensor memory, Tensor idx, Tensor z, float temperature) "
      "-> (Tensor probs, Tensor loss, Tensor grad_features, Tensor grad_probs, Tensor z_out)");

  // Epilogues of the shared-negative score tiles (ops/nce_shared.py, backend "cpu"; CPU only), one
  // pass over a (B, n) float32/float64 tile of logits x that a GEMM has just written:
  //   nce_shared_tile_nce_: x <- sigmoid(x); returns sum softplus(x) (float64, 0-dim).
  //   nce_shared_tile_lse: log sum exp over every entry (float64, 0-dim).
  //   nce_shared_tile_softmax_: per row M' = max(row_max, max x), x <- exp(x - M'),
  //     row_sum <- row_sum exp(row_max - M') + sum x, row_max <- M'; returns exp(row_max - M') (B,).
  m.def("nce_shared_tile_nce_(Tensor(a!) scores) -> Tensor");
  m.def("nce_shared_tile_lse(Tensor scores) -> Tensor");
  m.def("nce_shared_tile_softmax_(Tensor(a!) scores, Tensor(b!) row_max, Tensor(c!) row_sum) -> Tensor");
  // The same without the B x n tile (CPU only, avx2 capability or better): one pass over all K
  // rows G (rows itself, or rows[index] for a (K,) int64 index: the bank and the shared negatives,
  // no gathered copy), scores in register tiles; features float32 already divided by T; with
  // round_bf16 both operands are rounded to bfloat16 first (their products are exact in fp32).
  //   nce_shared_nce_pass: x = features . G^T + bias; returns (sum softplus(x) float64 0-dim,
  //     sigmoid(x) @ G (B, D) float32).
  //   nce_shared_lse_pass: log sum exp(features . G^T) over every entry (float64 0-dim).
  m.def(
      "nce_shared_nce_pass(Tensor features, Tensor rows, Tensor bias, Tensor? index=None, bool round_bf16=False) "
      "-> (Tensor softplus_sum, Tensor weighted)");
  m.def("nce_shared_lse_pass(Tensor features, Tensor rows, Tensor? index=None, bool round_bf16=False) -> Tensor");

  // The exact softmax's fused CPU pass (ops/softmax.py, backend "cpu", fp32 products or bf16 ones; CPU only,
  // avx2 capability or better): with s = f . v_j over every bank row v_j (features already divided
  // by the temperature), row_max[b] = max_j s, row_sum[b] = sum_j exp(s - row_max[b]) and
  // weighted[b] = sum_j exp(s - row_max[b]) v_j; features float32, bank float32/bf16/fp16. With a
  // (K,) int64 index, over the rows bank[index] only; with round_bf16, both operands rounded to
  // bfloat16 first (precision "bf16" on CPUs without native bf16 GEMMs).
  m.def(
      "softmax_online_state(Tensor features, Tensor bank, Tensor? index=None, bool round_bf16=False) "
      "-> (Tensor row_max, Tensor row_sum, Tensor weighted)");

  // Weighted-kNN top-k (docs/method.md): the k most similar bank rows per query,
  // sorted by (similarity desc, index asc); similarities (Q, k) computed in
  // float64, returned in float64 if an input is float64, else float32.
  // CPU: a prefilter with a rigorous error bound (AVX512-BF16 products under avx512_bf16, fp32 FMA
  // tiles under avx2/avx512, a portable bf16 loop otherwise), exact float64 rescore.
  m.def("knn_topk(Tensor queries, Tensor bank, int k, int chunk_size) -> (Tensor values, Tensor indices)");

  // The CPU capability the CPU kernels run with (csrc/cpu/capability.h): "default", "avx2",
  // "avx512" or "avx512_bf16"; chosen at load from the CPU, capped by INSTDISC_CPU_CAPABILITY.
  m.def("cpu_capability() -> str",
        [] { return std::string(instdisc::cpu::capability_name(instdisc::cpu::capability())); });
}
