// Host interface of the CUDA kernels of the fused residual LayerNorm (residual_ln_cuda.cu).
//
// Plain pointers and a raw stream only: the .cu file needs no torch headers, and the torch-facing
// binding (residual_ln_cuda_binding.cpp) allocates tensors, checks arguments and picks the stream.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace rln_cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct FwdParams {
  const void* x;
  const void* f;
  const void* gamma;
  const void* beta;
  const float* r;        // device scalar
  const float* s;        // device scalar
  const int64_t* seed;   // device scalar, read only when dropout
  void* y;
  float* mean;
  float* rstd;
  int64_t rows;
  int H;
  float eps;
  uint64_t drop_threshold;
  float keep_scale;
  bool dropout;
};

struct BwdParams {
  const void* dy;
  const void* x;
  const void* f;
  const void* gamma;
  const float* r;
  const float* s;
  const int64_t* seed;
  const float* mean;
  const float* rstd;
  void* dx;
  void* df;
  void* dgamma;
  void* dbeta;
  float* partial;  // workspace, 2 * num_partials * H floats (dgamma rows, then dbeta rows)
  int64_t rows;
  int H;
  uint64_t drop_threshold;
  float keep_scale;
  bool dropout;
};

// Largest H the kernels take for `dtype` (larger widths use the eager PyTorch path).
int max_hidden(int dtype);

// Number of partial (dgamma, dbeta) rows the backward pass writes: size its workspace with it.
int64_t backward_partials(int dtype, int64_t rows, int H, int device);

cudaError_t forward(int dtype, const FwdParams& p, cudaStream_t stream);
cudaError_t backward(int dtype, const BwdParams& p, int64_t num_partials, cudaStream_t stream);

// out[row * H + col] = keep multiplier (0 or keep_scale) the kernels apply for (seed, row, col).
cudaError_t dropout_mask(const int64_t* seed, float* out, int64_t rows, int H,
                         uint64_t drop_threshold, float keep_scale, cudaStream_t stream);

}  // namespace rln_cuda
