// CUDA kernels of the fused residual-scale LayerNorm (megabranch issue 4).
//
//   z = r * x + s * dropout(f);   y = (z - mean) * rstd * gamma + beta
//
// Layout: a "group" of threads owns one row at a time and keeps the row in registers.
//   * H <= 512: a group is one warp (4 warps, i.e. 4 rows, per 128-thread block), reductions
//     are warp shuffles;
//   * 512 < H <= 2048: a group is a 128-thread block, 2048 < H <= 16384: a 512-thread block;
//     reductions go through shared memory.
// Each thread handles NCH chunks of C = 16 / sizeof(T) consecutive elements (one 16-byte vector),
// at most 16 elements per thread (32 for H > 8192, where the backward pass spills a little), so
// the backward pass keeps xhat, dy * gamma and its dgamma/dbeta accumulators in registers.
// When every row start and pointer is 16-byte aligned (H % C == 0) the chunks are moved with
// 16-byte loads/stores (VEC); otherwise element by element with bounds checks (odd widths).
// r, s and the dropout seed are read from device memory, so new values need no recompile,
// host sync or CUDA graph re-capture.  Dropout: counter-based Philox4x32-10 keyed by the seed,
// indexed by (row, column / 4) -- see residual_ln_common.h; the backward pass regenerates it.
// Backward recomputes z from x and f, and accumulates dgamma/dbeta in registers across the rows
// a group visits; each block writes one partial row, and a second kernel sums the partial rows
// in a fixed order (deterministic).  All arithmetic on r*x + s*f uses explicit _rn intrinsics so
// the forward and backward passes round it identically (no compiler FMA contraction).
//
// No torch headers here: the binding (residual_ln_cuda_binding.cpp) owns tensors and streams.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <initializer_list>

#include "residual_ln_common.h"
#include "residual_ln_cuda.h"

namespace rln_cuda {
namespace {

constexpr int kWarpRowsPerBlock = 4;  // warp-per-row kernels: rows (warps) per block
constexpr int kMidGroup = 128;        // block-per-row kernels for kWarpMaxHidden < H <= kMidMaxHidden
constexpr int kBigGroup = 512;        // block-per-row kernels for larger H
constexpr int kWarpMaxHidden = 512;
constexpr int kMidMaxHidden = 2048;
constexpr int kMaxHidden = kBigGroup * 32;

// Elements per thread allowed for a group size (register budget of the backward pass).
constexpr int max_elems(int group) { return group == kBigGroup ? 32 : 16; }
// Every H handled by a group size is larger than this.
constexpr int lower_hidden(int group) {
  return group == 32 ? 0 : (group == kMidGroup ? kWarpMaxHidden : kMidMaxHidden);
}

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
struct Chunk {
  static constexpr int C = 16 / sizeof(T);
};

// Whether pick_config() can choose (GROUP, NCH) for T: only those kernels are instantiated.
template <typename T, int GROUP, int NCH>
constexpr bool reachable() {
  constexpr int E = NCH * Chunk<T>::C;
  return E <= max_elems(GROUP) && E * GROUP > lower_hidden(GROUP);
}

// v[i] = p[col + i] (0 beyond H).  VEC: one 16-byte load, caller guarantees alignment and
// col + C <= H.
template <typename T, bool VEC>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, int col, int H,
                                           float (&v)[Chunk<T>::C]) {
  constexpr int C = Chunk<T>::C;
  if constexpr (VEC) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p + col);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < C; ++i) v[i] = Cvt<T>::to(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < C; ++i) v[i] = (col + i < H) ? Cvt<T>::to(p[col + i]) : 0.0f;
  }
}

template <typename T, bool VEC>
__device__ __forceinline__ void store_chunk(T* __restrict__ p, int col, int H,
                                            const float (&v)[Chunk<T>::C]) {
  constexpr int C = Chunk<T>::C;
  if constexpr (VEC) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < C; ++i) e[i] = Cvt<T>::from(v[i]);
    *reinterpret_cast<uint4*>(p + col) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < C; ++i) {
      if (col + i < H) p[col + i] = Cvt<T>::from(v[i]);
    }
  }
}

// Keep multipliers of columns [col, col + C) of `row`; col is a multiple of 4.
template <int C>
__device__ __forceinline__ void keep_chunk(uint64_t seed, int64_t row, int col, uint64_t thr,
                                           float scale, float (&m)[C]) {
#pragma unroll
  for (int q = 0; q < C / 4; ++q) {
    const rln::U32x4 w = rln::dropout_words(seed, static_cast<uint64_t>(row),
                                            static_cast<uint32_t>((col >> 2) + q));
#pragma unroll
    for (int k = 0; k < 4; ++k) m[4 * q + k] = (static_cast<uint64_t>(w.v[k]) >= thr) ? scale : 0.0f;
  }
}

// r * x + s * f' with fixed rounding (f' = f * keep already applied).
__device__ __forceinline__ float residual(float r, float x, float s, float f) {
  return __fmaf_rn(r, x, __fmul_rn(s, f));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the group owning a row; every thread of the group gets the result.
template <int GROUP>
__device__ __forceinline__ float group_sum(float v, float* sh) {
  v = warp_sum(v);
  if constexpr (GROUP == 32) {
    return v;
  } else {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float t = (lane < GROUP / 32) ? sh[lane] : 0.0f;
    t = warp_sum(t);
    __syncthreads();  // sh is reused by the next reduction
    return t;
  }
}

template <int GROUP>
__device__ __forceinline__ void group_sum2(float& a, float& b, float* sh) {
  a = warp_sum(a);
  b = warp_sum(b);
  if constexpr (GROUP != 32) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
      sh[warp] = a;
      sh[32 + warp] = b;
    }
    __syncthreads();
    a = warp_sum((lane < GROUP / 32) ? sh[lane] : 0.0f);
    b = warp_sum((lane < GROUP / 32) ? sh[32 + lane] : 0.0f);
    __syncthreads();
  }
}

template <int GROUP>
struct Layout {
  static constexpr int kRowsPerBlock = GROUP == 32 ? kWarpRowsPerBlock : 1;
  static constexpr int kThreads = GROUP == 32 ? 32 * kWarpRowsPerBlock : GROUP;
  static __device__ __forceinline__ int tid() { return GROUP == 32 ? (threadIdx.x & 31) : threadIdx.x; }
  static __device__ __forceinline__ int sub() { return GROUP == 32 ? (threadIdx.x >> 5) : 0; }
};

template <typename T, int GROUP, int NCH, bool VEC>
__global__ void __launch_bounds__(Layout<GROUP>::kThreads)
    rln_fwd_kernel(const FwdParams p) {
  using L = Layout<GROUP>;
  constexpr int C = Chunk<T>::C;
  __shared__ float sh[64];
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ f = static_cast<const T*>(p.f);
  const T* __restrict__ gamma = static_cast<const T*>(p.gamma);
  const T* __restrict__ beta = static_cast<const T*>(p.beta);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int H = p.H;
  const int tid = L::tid();
  const float r = *p.r;
  const float s = *p.s;
  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0;
  const float inv_h = 1.0f / static_cast<float>(H);

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * L::kRowsPerBlock + L::sub(); row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * L::kRowsPerBlock) {
    const int64_t off = row * H;
    float z[NCH][C];
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int col = (c * GROUP + tid) * C;
      if (col < H) {
        float xv[C], fv[C];
        load_chunk<T, VEC>(x + off, col, H, xv);
        load_chunk<T, VEC>(f + off, col, H, fv);
        if (p.dropout) {
          float m[C];
          keep_chunk<C>(seed, row, col, p.drop_threshold, p.keep_scale, m);
#pragma unroll
          for (int i = 0; i < C; ++i) fv[i] = __fmul_rn(fv[i], m[i]);
        }
#pragma unroll
        for (int i = 0; i < C; ++i) {
          z[c][i] = residual(r, xv[i], s, fv[i]);  // 0 for columns >= H (x = f = 0 there)
          sum += z[c][i];
        }
      } else {
#pragma unroll
        for (int i = 0; i < C; ++i) z[c][i] = 0.0f;
      }
    }
    const float mean = group_sum<GROUP>(sum, sh) * inv_h;
    float sq = 0.0f;
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int col = (c * GROUP + tid) * C;
#pragma unroll
      for (int i = 0; i < C; ++i) {
        if (col + i < H) {
          const float d = z[c][i] - mean;
          sq += d * d;
        }
      }
    }
    const float rstd = rsqrtf(group_sum<GROUP>(sq, sh) * inv_h + p.eps);
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int col = (c * GROUP + tid) * C;
      if (col < H) {
        float gv[C], bv[C], out[C];
        load_chunk<T, VEC>(gamma, col, H, gv);
        load_chunk<T, VEC>(beta, col, H, bv);
#pragma unroll
        for (int i = 0; i < C; ++i) out[i] = (z[c][i] - mean) * rstd * gv[i] + bv[i];
        store_chunk<T, VEC>(y + off, col, H, out);
      }
    }
    if (tid == 0) {
      p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
  }
}

template <typename T, int GROUP, int NCH, bool VEC>
__global__ void __launch_bounds__(Layout<GROUP>::kThreads)
    rln_bwd_kernel(const BwdParams p) {
  using L = Layout<GROUP>;
  constexpr int C = Chunk<T>::C;
  __shared__ float sh[64];
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ f = static_cast<const T*>(p.f);
  const T* __restrict__ gamma = static_cast<const T*>(p.gamma);
  T* __restrict__ dx = static_cast<T*>(p.dx);
  T* __restrict__ df = static_cast<T*>(p.df);
  const int H = p.H;
  const int tid = L::tid();
  const float r = *p.r;
  const float s = *p.s;
  const uint64_t seed = p.dropout ? static_cast<uint64_t>(*p.seed) : 0;
  const float inv_h = 1.0f / static_cast<float>(H);

  float acc_g[NCH][C], acc_b[NCH][C];
#pragma unroll
  for (int c = 0; c < NCH; ++c) {
#pragma unroll
    for (int i = 0; i < C; ++i) acc_g[c][i] = acc_b[c][i] = 0.0f;
  }

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * L::kRowsPerBlock + L::sub(); row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * L::kRowsPerBlock) {
    const int64_t off = row * H;
    const float mean = p.mean[row];
    const float rstd = p.rstd[row];
    float xh[NCH][C], g[NCH][C], keep[NCH][C];
    float sg = 0.0f, sgx = 0.0f;
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int col = (c * GROUP + tid) * C;
      if (col < H) {
        float xv[C], fv[C], dv[C], gv[C];
        load_chunk<T, VEC>(x + off, col, H, xv);
        load_chunk<T, VEC>(f + off, col, H, fv);
        load_chunk<T, VEC>(dy + off, col, H, dv);
        load_chunk<T, VEC>(gamma, col, H, gv);
        if (p.dropout) {
          keep_chunk<C>(seed, row, col, p.drop_threshold, p.keep_scale, keep[c]);
#pragma unroll
          for (int i = 0; i < C; ++i) fv[i] = __fmul_rn(fv[i], keep[c][i]);
        }
#pragma unroll
        for (int i = 0; i < C; ++i) {
          // dy = 0 beyond H, so those columns add nothing below.
          const float h = (col + i < H) ? (residual(r, xv[i], s, fv[i]) - mean) * rstd : 0.0f;
          const float gg = dv[i] * gv[i];
          xh[c][i] = h;
          g[c][i] = gg;
          sg += gg;
          sgx += gg * h;
          acc_g[c][i] += dv[i] * h;
          acc_b[c][i] += dv[i];
        }
      } else {
#pragma unroll
        for (int i = 0; i < C; ++i) xh[c][i] = g[c][i] = 0.0f;
      }
    }
    group_sum2<GROUP>(sg, sgx, sh);
    const float c1 = sg * inv_h;
    const float c2 = sgx * inv_h;
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int col = (c * GROUP + tid) * C;
      if (col < H) {
        float dxv[C], dfv[C];
#pragma unroll
        for (int i = 0; i < C; ++i) {
          const float dz = rstd * (g[c][i] - c1 - xh[c][i] * c2);
          dxv[i] = r * dz;
          dfv[i] = s * (p.dropout ? keep[c][i] * dz : dz);
        }
        store_chunk<T, VEC>(dx + off, col, H, dxv);
        store_chunk<T, VEC>(df + off, col, H, dfv);
      }
    }
  }

  // This block's partial dgamma / dbeta row.
  float* __restrict__ part_g = p.partial + static_cast<int64_t>(blockIdx.x) * H;
  float* __restrict__ part_b = p.partial + (static_cast<int64_t>(gridDim.x) + blockIdx.x) * H;
  if constexpr (GROUP == 32) {
    // The block's warps own the same columns: add them up in warp order through shared memory.
    __shared__ float red[2][kWarpMaxHidden];
    const int warp = L::sub();
    for (int w = 0; w < kWarpRowsPerBlock; ++w) {
      if (warp == w) {
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
          const int col = (c * GROUP + tid) * C;
#pragma unroll
          for (int i = 0; i < C; ++i) {
            if (col + i < H) {
              red[0][col + i] = (w == 0) ? acc_g[c][i] : red[0][col + i] + acc_g[c][i];
              red[1][col + i] = (w == 0) ? acc_b[c][i] : red[1][col + i] + acc_b[c][i];
            }
          }
        }
      }
      __syncthreads();
    }
    for (int j = threadIdx.x; j < H; j += blockDim.x) {
      part_g[j] = red[0][j];
      part_b[j] = red[1][j];
    }
  } else {
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int col = (c * GROUP + tid) * C;
#pragma unroll
      for (int i = 0; i < C; ++i) {
        if (col + i < H) {
          part_g[col + i] = acc_g[c][i];
          part_b[col + i] = acc_b[c][i];
        }
      }
    }
  }
}

// dgamma[j] = sum_k partial[k][j], dbeta likewise; 32 columns x 8 part-lanes per block, summed
// in a fixed order.
template <typename T>
__global__ void __launch_bounds__(256)
    rln_colsum_kernel(const float* __restrict__ partial, int64_t nparts, int H,
                      T* __restrict__ dgamma, T* __restrict__ dbeta) {
  __shared__ float sg[8][33], sb[8][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int col = blockIdx.x * 32 + tx;
  float a = 0.0f, b = 0.0f;
  if (col < H) {
    for (int64_t k = ty; k < nparts; k += 8) {
      a += partial[k * H + col];
      b += partial[(nparts + k) * H + col];
    }
  }
  sg[ty][tx] = a;
  sb[ty][tx] = b;
  __syncthreads();
  if (ty == 0 && col < H) {
    float ta = 0.0f, tb = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      ta += sg[k][tx];
      tb += sb[k][tx];
    }
    dgamma[col] = Cvt<T>::from(ta);
    dbeta[col] = Cvt<T>::from(tb);
  }
}

__global__ void rln_mask_kernel(const int64_t* __restrict__ seed_ptr, float* __restrict__ out,
                                int64_t rows, int H, uint64_t thr, float scale) {
  const int64_t groups = (H + 3) / 4;
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * groups;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / groups;
    const int g = static_cast<int>(i % groups);
    const rln::U32x4 w = rln::dropout_words(seed, static_cast<uint64_t>(row), static_cast<uint32_t>(g));
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int col = 4 * g + k;
      if (col < H) out[row * H + col] = (static_cast<uint64_t>(w.v[k]) >= thr) ? scale : 0.0f;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Host side: configuration choice and launches.
// ------------------------------------------------------------------------------------------

struct Config {
  int group;  // 32 (warp per row), kMidGroup or kBigGroup (block per row); 0: unsupported
  int nch;    // chunks per thread: 1, 2, 4 or 8
};

template <typename T>
Config pick_config(int H) {
  constexpr int C = Chunk<T>::C;
  if (H <= 0 || H > kMaxHidden) return {0, 0};
  const int chunks = (H + C - 1) / C;
  const int group = H <= kWarpMaxHidden ? 32 : (H <= kMidMaxHidden ? kMidGroup : kBigGroup);
  const int need = (chunks + group - 1) / group;
  int nch = 1;
  while (nch < need) nch *= 2;
  if (nch * C > max_elems(group)) return {0, 0};
  return {group, nch};
}

int sm_count(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
    n = 1;
  }
  return n;
}

template <typename T>
bool vector_ok(int H, std::initializer_list<const void*> ptrs) {
  if (H % Chunk<T>::C != 0) return false;
  for (const void* ptr : ptrs) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  }
  return true;
}

template <typename T, int GROUP, int NCH, bool VEC>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  if constexpr (!reachable<T, GROUP, NCH>()) {
    return cudaErrorInvalidValue;
  } else {
    using L = Layout<GROUP>;
    int device = 0;
    cudaGetDevice(&device);
    const int64_t needed = (p.rows + L::kRowsPerBlock - 1) / L::kRowsPerBlock;
    const int64_t cap = static_cast<int64_t>(sm_count(device)) * 64;
    const int grid = static_cast<int>(needed < cap ? needed : cap);
    rln_fwd_kernel<T, GROUP, NCH, VEC><<<grid, L::kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
}

template <typename T, int GROUP, bool VEC>
cudaError_t fwd_by_nch(int nch, const FwdParams& p, cudaStream_t stream) {
  switch (nch) {
    case 1: return launch_fwd<T, GROUP, 1, VEC>(p, stream);
    case 2: return launch_fwd<T, GROUP, 2, VEC>(p, stream);
    case 4: return launch_fwd<T, GROUP, 4, VEC>(p, stream);
    case 8: return launch_fwd<T, GROUP, 8, VEC>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t forward_t(const FwdParams& p, cudaStream_t stream) {
  const Config cfg = pick_config<T>(p.H);
  if (cfg.group == 0) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  const bool vec = vector_ok<T>(p.H, {p.x, p.f, p.gamma, p.beta, p.y});
  if (cfg.group == 32) {
    return vec ? fwd_by_nch<T, 32, true>(cfg.nch, p, stream)
               : fwd_by_nch<T, 32, false>(cfg.nch, p, stream);
  }
  if (cfg.group == kMidGroup) {
    return vec ? fwd_by_nch<T, kMidGroup, true>(cfg.nch, p, stream)
               : fwd_by_nch<T, kMidGroup, false>(cfg.nch, p, stream);
  }
  return vec ? fwd_by_nch<T, kBigGroup, true>(cfg.nch, p, stream)
             : fwd_by_nch<T, kBigGroup, false>(cfg.nch, p, stream);
}

// Blocks of the backward kernel: enough to fill the device once (occupancy x SMs), at most one
// per group of rows.  Must be the same in backward_partials() and backward().
template <typename T, int GROUP, int NCH, bool VEC>
int64_t bwd_grid_impl(int64_t rows, int device) {
  if constexpr (!reachable<T, GROUP, NCH>()) {
    return 1;
  } else {
    using L = Layout<GROUP>;
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, rln_bwd_kernel<T, GROUP, NCH, VEC>, L::kThreads, 0) != cudaSuccess ||
        per_sm <= 0) {
      per_sm = 1;
    }
    const int64_t fill = static_cast<int64_t>(per_sm) * sm_count(device);
    const int64_t needed = (rows + L::kRowsPerBlock - 1) / L::kRowsPerBlock;
    const int64_t grid = needed < fill ? needed : fill;
    return grid > 0 ? grid : 1;
  }
}

template <typename T, int GROUP, int NCH, bool VEC>
cudaError_t launch_bwd(const BwdParams& p, int64_t grid, cudaStream_t stream) {
  if constexpr (!reachable<T, GROUP, NCH>()) {
    return cudaErrorInvalidValue;
  } else {
    using L = Layout<GROUP>;
    rln_bwd_kernel<T, GROUP, NCH, VEC><<<static_cast<unsigned>(grid), L::kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
}

// Calls fn.template operator()<GROUP, NCH, VEC>() for the configuration of (T, H, vec).
template <typename T, typename Fn>
auto with_bwd_config(const Config& cfg, bool vec, Fn&& fn) {
#define RLN_CASE(G, N)                                                    \
  if (cfg.group == G && cfg.nch == N) {                                   \
    return vec ? fn.template operator()<G, N, true>()                     \
               : fn.template operator()<G, N, false>();                   \
  }
  RLN_CASE(32, 1)
  RLN_CASE(32, 2)
  RLN_CASE(32, 4)
  RLN_CASE(kMidGroup, 1)
  RLN_CASE(kMidGroup, 2)
  RLN_CASE(kMidGroup, 4)
  RLN_CASE(kBigGroup, 1)
  RLN_CASE(kBigGroup, 2)
  RLN_CASE(kBigGroup, 4)
  RLN_CASE(kBigGroup, 8)
#undef RLN_CASE
  return fn.template operator()<0, 0, false>();
}

template <typename T>
struct GridFn {
  int64_t rows;
  int device;
  template <int G, int N, bool V>
  int64_t operator()() const {
    if constexpr (G == 0) {
      return 1;
    } else {
      return bwd_grid_impl<T, G, N, V>(rows, device);
    }
  }
};

template <typename T>
struct BwdLaunchFn {
  const BwdParams& p;
  int64_t grid;
  cudaStream_t stream;
  template <int G, int N, bool V>
  cudaError_t operator()() const {
    if constexpr (G == 0) {
      return cudaErrorInvalidValue;
    } else {
      return launch_bwd<T, G, N, V>(p, grid, stream);
    }
  }
};

template <typename T>
int64_t backward_partials_t(int64_t rows, int H, int device) {
  const Config cfg = pick_config<T>(H);
  if (cfg.group == 0) return 1;
  // The grid does not depend on vectorisation (same register budget); use the VEC variant.
  return with_bwd_config<T>(cfg, true, GridFn<T>{rows, device});
}

template <typename T>
cudaError_t backward_t(const BwdParams& p, int64_t num_partials, cudaStream_t stream) {
  const Config cfg = pick_config<T>(p.H);
  if (cfg.group == 0) return cudaErrorInvalidValue;
  if (p.rows > 0) {
    const bool vec = vector_ok<T>(p.H, {p.dy, p.x, p.f, p.gamma, p.dx, p.df});
    const cudaError_t err = with_bwd_config<T>(cfg, vec, BwdLaunchFn<T>{p, num_partials, stream});
    if (err != cudaSuccess) return err;
  } else {
    // No rows: the partial rows are all zero.
    const cudaError_t err = cudaMemsetAsync(
        p.partial, 0, sizeof(float) * 2 * static_cast<size_t>(num_partials) * p.H, stream);
    if (err != cudaSuccess) return err;
  }
  const dim3 block(32, 8);
  const dim3 grid(static_cast<unsigned>((p.H + 31) / 32));
  rln_colsum_kernel<T><<<grid, block, 0, stream>>>(p.partial, num_partials, p.H,
                                                   static_cast<T*>(p.dgamma),
                                                   static_cast<T*>(p.dbeta));
  return cudaGetLastError();
}

}  // namespace

int max_hidden(int dtype) {
  switch (dtype) {
    case kFloat32:
    case kFloat16:
    case kBFloat16: return kMaxHidden;
    default: return 0;
  }
}

int64_t backward_partials(int dtype, int64_t rows, int H, int device) {
  switch (dtype) {
    case kFloat32: return backward_partials_t<float>(rows, H, device);
    case kFloat16: return backward_partials_t<__half>(rows, H, device);
    case kBFloat16: return backward_partials_t<__nv_bfloat16>(rows, H, device);
    default: return 1;
  }
}

cudaError_t forward(int dtype, const FwdParams& p, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32: return forward_t<float>(p, stream);
    case kFloat16: return forward_t<__half>(p, stream);
    case kBFloat16: return forward_t<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t backward(int dtype, const BwdParams& p, int64_t num_partials, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32: return backward_t<float>(p, num_partials, stream);
    case kFloat16: return backward_t<__half>(p, num_partials, stream);
    case kBFloat16: return backward_t<__nv_bfloat16>(p, num_partials, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t dropout_mask(const int64_t* seed, float* out, int64_t rows, int H,
                         uint64_t drop_threshold, float keep_scale, cudaStream_t stream) {
  const int64_t work = rows * ((H + 3) / 4);
  if (work == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks64 = (work + threads - 1) / threads;
  const int blocks = static_cast<int>(blocks64 < 65535 ? blocks64 : 65535);
  rln_mask_kernel<<<blocks, threads, 0, stream>>>(seed, out, rows, H, drop_threshold, keep_scale);
  return cudaGetLastError();
}

}  // namespace rln_cuda
