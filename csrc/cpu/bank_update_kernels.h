// The CPU bank-update kernel on raw pointers, compiled once per CPU capability (kernel_variants.h,
// from bank_update.cpp): no include guard, no #include.
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
void update_rows(bank_t* mem, const int64_t* idx, const acc_t* feat, const std::vector<int64_t>& rows, int64_t D,
                 acc_t m) {
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

}  // namespace
