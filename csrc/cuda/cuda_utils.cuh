// Small device helpers shared by the CUDA kernels (csrc/cuda/*.cu).
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../philox.h"

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

// The j-th in-kernel negative (before the exclude-positive shift) of batch row b,
// uniform in [0, n): the stream of csrc/philox.h, the same as the CPU kernel's.
// (Written out rather than at::Philox4_32, whose output buffer is indexed at run
// time and so lands in local memory.)
__device__ __forceinline__ int64_t philox_index(uint64_t seed, int64_t b, int64_t j, int64_t n) {
  const U32x4 o = negatives_block(seed, static_cast<uint64_t>(b), static_cast<uint64_t>(j) >> 1);
  return map_to_range(block_word(o, static_cast<int>(j & 1)), static_cast<uint64_t>(n));
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
