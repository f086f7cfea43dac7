// CPU memory-bank momentum update (docs/method.md), deterministic with repeated indices; every written
// row is a finite unit row (a row whose update has no direction keeps its old value).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <unordered_map>
#include <vector>

#define INSTDISC_KERNELS "bank_update_kernels.h"  // compiled once per CPU capability
#include "kernel_variants.h"

namespace instdisc {
namespace {

void bank_update_cpu(at::Tensor memory, const at::Tensor& indices, const at::Tensor& features, double momentum) {
  checks::bank_update_args(memory, indices, features, momentum, c10::DeviceType::CPU);
  const int64_t N = memory.size(0), D = memory.size(1), B = indices.size(0);
  if (B == 0) return;
  auto idx = indices.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  checks::index_values(ip, B, N, "indices");

  // Last occurrence in batch order wins: keep, per distinct index, its last row.
  std::unordered_map<int64_t, int64_t> last;
  last.reserve(B * 2);
  for (int64_t b = 0; b < B; ++b) last[ip[b]] = b;
  std::vector<int64_t> rows;
  rows.reserve(last.size());
  for (int64_t b = 0; b < B; ++b)
    if (last[ip[b]] == b) rows.push_back(b);

  const bool dbl = memory.scalar_type() == at::kDouble;
  auto feat = features.to(dbl ? at::kDouble : at::kFloat).contiguous();
  // features that are a view of the bank are read in full before any row is written
  if (at::get_overlap_status(feat, memory) != at::MemOverlapStatus::No) feat = feat.clone();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, memory.scalar_type(), "bank_update_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    INSTDISC_CPU_DISPATCH(cap::update_rows<scalar_t, acc_t>(memory.data_ptr<scalar_t>(), ip, feat.data_ptr<acc_t>(),
                                                            rows, D, static_cast<acc_t>(momentum)));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(instdisc, CPU, m) { m.impl("bank_update_", &bank_update_cpu); }

}  // namespace instdisc
