// Shared pieces of the fused residual-scale LayerNorm kernels (CPU and CUDA).
//
//   y = LayerNorm(r * x + s * dropout(f)) * gamma + beta      (normalised over the last dim H)
//
// The dropout mask is a pure function of (seed, row, col): element (row, col) is kept when the
// 32-bit word number (col % 4) of Philox4x32-10(counter = {col / 4, row_lo, row_hi, kSalt},
// key = {seed_lo, seed_hi}) is >= threshold, threshold = p * 2^32.  Forward and backward
// regenerate the same mask from the seed, and the CPU and CUDA kernels produce identical masks.
// megabranch/ops/residual_ln_reference.py holds a pure-PyTorch copy of this function for tests.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define RLN_HD __host__ __device__ __forceinline__
#else
#define RLN_HD inline
#endif

// Bumped whenever the binary interface of the extension modules changes; the Python loader
// refuses a prebuilt module whose abi_version() differs and JIT-builds instead.
#define RLN_ABI_VERSION 1

// Hash of the kernel sources the module was compiled from (kernels/build.py passes it); lets the
// loader notice a prebuilt module that is older than the sources next to it (editable installs).
#ifndef RLN_SOURCE_HASH
#define RLN_SOURCE_HASH 0
#endif

namespace rln {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr uint32_t kSalt = 0x524C4E31u;  // "RLN1": separates this stream from other users of a seed

struct U32x4 {
  uint32_t v[4];
};

RLN_HD void mul_hi_lo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
RLN_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                           uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mul_hi_lo(kPhiloxM0, c0, hi0, lo0);
    mul_hi_lo(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  U32x4 out;
  out.v[0] = c0;
  out.v[1] = c1;
  out.v[2] = c2;
  out.v[3] = c3;
  return out;
}

// Random words for columns [4 * group, 4 * group + 4) of `row`.
RLN_HD U32x4 dropout_words(uint64_t seed, uint64_t row, uint32_t group) {
  return philox4x32_10(group, static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32), kSalt,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Keep threshold for drop probability p in [0, 1]: keep iff word >= threshold.  p = 1 gives
// 2^32 (nothing kept); p = 0 gives 0 (everything kept).
inline uint64_t dropout_threshold(double p) {
  if (p <= 0.0) return 0;
  if (p >= 1.0) return uint64_t(1) << 32;
  const double t = p * 4294967296.0;
  return static_cast<uint64_t>(t);
}

// Multiplier applied to kept elements: 1 / (1 - p), or 0 when p >= 1 (F.dropout gives zeros).
inline float dropout_keep_scale(double p) {
  if (p >= 1.0) return 0.0f;
  return static_cast<float>(1.0 / (1.0 - p));
}

}  // namespace rln
