// The in-kernel negatives' random stream, shared by the CPU (csrc/cpu/nce.cpp)
// and CUDA (csrc/cuda/nce.cu) kernels so that one seed draws the same negatives
// on both backends.
//
// Philox4x32-10 (Salmon et al., SC'11): key = the 64-bit seed; counter = (j / 2
// as 64 bits, b as 64 bits) for the j-th negative (j = 0..K-1) of batch row b.
// Draw j uses the 64-bit word (out[0] | out[1] << 32) when j is even,
// (out[2] | out[3] << 32) when odd, mapped to [0, M) as floor(r * M / 2^64)
// (bias below M / 2^64). M = N, or N - 1 with exclude_positive, in which case
// values >= y[b] are shifted up by one.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define INSTDISC_HD __host__ __device__
#else
#define INSTDISC_HD
#endif

namespace instdisc {

struct U32x4 {
  uint32_t v[4];
};

INSTDISC_HD constexpr U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = uint64_t(0xD2511F53u) * c.v[0];
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c.v[2];
    c = U32x4{{uint32_t(p1 >> 32) ^ c.v[1] ^ k0, uint32_t(p1), uint32_t(p0 >> 32) ^ c.v[3] ^ k1, uint32_t(p0)}};
  }
  return c;
}

INSTDISC_HD constexpr bool philox_kat(U32x4 c, uint32_t k0, uint32_t k1, U32x4 want) {
  const U32x4 o = philox4x32_10(c, k0, k1);
  return o.v[0] == want.v[0] && o.v[1] == want.v[1] && o.v[2] == want.v[2] && o.v[3] == want.v[3];
}
// Known-answer vectors of the Random123 distribution (philox4x32, 10 rounds).
static_assert(philox_kat(U32x4{{0, 0, 0, 0}}, 0, 0, U32x4{{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}}),
              "Philox4x32-10 known-answer test (zeros)");
static_assert(philox_kat(U32x4{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0xa4093822u, 0x299f31d0u,
                         U32x4{{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}}),
              "Philox4x32-10 known-answer test (pi)");

// The Philox block holding draws 2*blk and 2*blk + 1 of batch row b.
INSTDISC_HD inline U32x4 negatives_block(uint64_t seed, uint64_t b, uint64_t blk) {
  return philox4x32_10(U32x4{{uint32_t(blk), uint32_t(blk >> 32), uint32_t(b), uint32_t(b >> 32)}}, uint32_t(seed),
                       uint32_t(seed >> 32));
}

// Draw `half` (0: even j, 1: odd j) of a block as a 64-bit word.
INSTDISC_HD inline uint64_t block_word(const U32x4& o, int half) {
  return half ? (uint64_t(o.v[2]) | (uint64_t(o.v[3]) << 32)) : (uint64_t(o.v[0]) | (uint64_t(o.v[1]) << 32));
}

// floor(r * m / 2^64): a 64-bit random word mapped to [0, m).
INSTDISC_HD inline int64_t map_to_range(uint64_t r, uint64_t m) {
#if defined(__CUDA_ARCH__)
  return static_cast<int64_t>(__umul64hi(r, m));
#else
  return static_cast<int64_t>((static_cast<unsigned __int128>(r) * m) >> 64);
#endif
}

}  // namespace instdisc
