// CPU memory-bank momentum update (SPEC 1.1), deterministic with repeated indices; every written
// row is a finite unit row (a row whose update has no direction keeps its old value).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <unordered_map>
#include <vector>

namespace instdisc {
namespace {

// 1 / ||v|| given ss = sum v^2, scale-safe: ss is used as it is when it lies in the normal range
// (|v| from ~1e-19 to ~1e19 in fp32: the plain loop, no extra pass), else v is first divided by
// max |v| in place (no overflow for |v| ~ 1e20, no underflow). Returns 0 when v has no direction
// (v = 0) or is not finite: the caller then keeps the old row.
template <typename acc_t>
acc_t inv_norm(acc_t* v, int64_t D, acc_t ss) {
  constexpr acc_t kTiny = std::numeric_limits<acc_t>::min() / std::numeric_limits<acc_t>::epsilon();
  if (ss >= kTiny && ss <= std::numeric_limits<acc_t>::max()) return acc_t(1) / std::sqrt(ss);  // not NaN
  acc_t amax = 0;
  for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::abs(v[d]));
  if (!(amax > 0) || !std::isfinite(amax)) return 0;
  acc_t pre = acc_t(1) / amax;
  if (!std::isfinite(pre)) pre = std::numeric_limits<acc_t>::max();  // amax subnormal
  ss = 0;
  for (int64_t d = 0; d < D; ++d) {
    v[d] *= pre;
    ss += v[d] * v[d];
  }
  if (!(ss > 0) || !std::isfinite(ss)) return 0;
  return acc_t(1) / std::sqrt(ss);
}

template <typename bank_t, typename acc_t>
void update_rows(bank_t* mem, const int64_t* idx, const acc_t* feat, const std::vector<int64_t>& rows,
                 int64_t D, acc_t m) {
  at::parallel_for(0, static_cast<int64_t>(rows.size()), 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> v(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = rows[r];
      bank_t* dst = mem + idx[b] * D;  // int64 offsets: N * D may exceed 2^31
      const acc_t* f = feat + b * D;
      acc_t ss = 0;
      for (int64_t d = 0; d < D; ++d) {
        v[d] = m * static_cast<acc_t>(dst[d]) + (acc_t(1) - m) * f[d];
        ss += v[d] * v[d];
      }
      const acc_t inv = inv_norm(v.data(), D, ss);
      if (inv == 0) continue;  // v = 0: no direction, the row keeps its old value
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<bank_t>(v[d] * inv);
    }
  });
}

void bank_update_cpu(at::Tensor memory, const at::Tensor& indices, const at::Tensor& features,
                     double momentum) {
  TORCH_CHECK(memory.dim() == 2 && memory.is_contiguous(), "memory must be a contiguous (N, D) tensor");
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong, "indices must be a 1-D int64 tensor");
  TORCH_CHECK(features.dim() == 2 && features.size(0) == indices.size(0) && features.size(1) == memory.size(1),
              "features must be (B, D) matching indices and memory");
  const int64_t N = memory.size(0), D = memory.size(1), B = indices.size(0);
  auto idx = indices.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(ip[b] >= 0 && ip[b] < N, "indices[", b, "] = ", ip[b], " is out of range [0, ", N, ")");

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
    update_rows<scalar_t, acc_t>(memory.data_ptr<scalar_t>(), ip, feat.data_ptr<acc_t>(), rows, D,
                                 static_cast<acc_t>(momentum));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(instdisc, CPU, m) { m.impl("bank_update_", &bank_update_cpu); }

}  // namespace instdisc
