// Small device helpers shared by the CUDA kernels (csrc/cuda/*.cu).
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace instdisc {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Sum over the 32 lanes of a warp. The xor butterfly leaves the bitwise same
// value in every lane (each step adds the same two operands, commuted).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T w = __shfl_xor_sync(kFullMask, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// VEC consecutive elements of T loaded as one aligned vector (VEC * sizeof(T)
// bytes: 16 for 4 fp32, 8 for 4 bf16/fp16) and widened to the accumulation type.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC, typename acc_t>
__device__ __forceinline__ void load_pack(const T* __restrict__ p, acc_t (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = static_cast<acc_t>(p[0]);
  } else {
    const Pack<T, VEC> x = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = static_cast<acc_t>(x.v[i]);
  }
}

// Philox4x32-10 (Salmon et al., SC'11), written out rather than at::Philox4_32,
// whose output buffer is indexed at run time and so lands in local memory.
struct U32x4 {
  uint32_t v[4];
};

__host__ __device__ constexpr U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
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

__host__ __device__ constexpr bool philox_kat(U32x4 c, uint32_t k0, uint32_t k1, U32x4 want) {
  const U32x4 o = philox4x32_10(c, k0, k1);
  return o.v[0] == want.v[0] && o.v[1] == want.v[1] && o.v[2] == want.v[2] && o.v[3] == want.v[3];
}
// Known-answer vectors of the Random123 distribution (philox4x32, 10 rounds).
static_assert(philox_kat(U32x4{{0, 0, 0, 0}}, 0, 0, U32x4{{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}}),
              "Philox4x32-10 known-answer test (zeros)");
static_assert(philox_kat(U32x4{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0xa4093822u, 0x299f31d0u,
                         U32x4{{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}}),
              "Philox4x32-10 known-answer test (pi)");

// The j-th in-kernel negative (before the exclude-positive shift) of batch row b,
// uniform in [0, n): the same stream as the CPU kernel (csrc/cpu/nce.cpp), so both
// backends draw identical negatives from one seed. Key = seed, counter = (j / 2, b)
// as two 64-bit words; draw j takes the 64-bit word (out[0], out[1]) when j is
// even, (out[2], out[3]) when odd, mapped to [0, n) as floor(r * n / 2^64).
__device__ __forceinline__ int64_t philox_index(uint64_t seed, int64_t b, int64_t j, int64_t n) {
  const uint64_t blk = static_cast<uint64_t>(j) >> 1, ub = static_cast<uint64_t>(b);
  const U32x4 o = philox4x32_10(U32x4{{uint32_t(blk), uint32_t(blk >> 32), uint32_t(ub), uint32_t(ub >> 32)}},
                                uint32_t(seed), uint32_t(seed >> 32));
  const uint64_t r = (j & 1) ? (uint64_t(o.v[2]) | (uint64_t(o.v[3]) << 32)) : (uint64_t(o.v[0]) | (uint64_t(o.v[1]) << 32));
  return static_cast<int64_t>(__umul64hi(r, static_cast<uint64_t>(n)));
}

// Number of SMs of the current device (cached per device).
inline int sm_count(int device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) return 108;
  if (cache[device] == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || v <= 0) {
      (void)cudaGetLastError();
      v = 108;
    }
    cache[device] = v;
  }
  return cache[device];
}

}  // namespace cuda
}  // namespace instdisc
