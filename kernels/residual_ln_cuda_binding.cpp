// Torch binding of the CUDA kernels of the fused residual LayerNorm: argument checks, output and
// workspace allocation, device guard and current stream.  The kernels themselves are in
// residual_ln_cuda.cu behind the plain-pointer interface of residual_ln_cuda.h.
//
// Only c10/cuda headers are used for the stream and device guard (not ATen/cuda/CUDAContext.h),
// so this file also compiles against the headers of a CPU-only torch install (compile check).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "residual_ln_common.h"
#include "residual_ln_cuda.h"

namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return rln_cuda::kFloat32;
    case at::kHalf: return rln_cuda::kFloat16;
    case at::kBFloat16: return rln_cuda::kBFloat16;
    default:
      TORCH_CHECK(false, "residual_layernorm (cuda): unsupported dtype ", t,
                  " (float32, float16, bfloat16)");
  }
  return -1;
}

void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), "residual_layernorm (cuda): ", name,
              " must be on ", x.device(), ", got ", t.device());
}

void check_common(const at::Tensor& x, const at::Tensor& f, const at::Tensor& weight,
                  const at::Tensor& r, const at::Tensor& s) {
  TORCH_CHECK(x.is_cuda(), "residual_layernorm (cuda): x must be a CUDA tensor");
  check_same_device(f, x, "f");
  check_same_device(weight, x, "weight");
  check_same_device(r, x, "r");
  check_same_device(s, x, "s");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0,
              "residual_layernorm: x must have a non-empty last dimension");
  TORCH_CHECK(x.sizes() == f.sizes() && x.scalar_type() == f.scalar_type(),
              "residual_layernorm: x and f must have the same shape and dtype");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1) &&
                  weight.scalar_type() == x.scalar_type(),
              "residual_layernorm (cuda): weight must have shape (H,) and x's dtype");
  TORCH_CHECK(r.numel() == 1 && r.scalar_type() == at::kFloat && s.numel() == 1 &&
                  s.scalar_type() == at::kFloat,
              "residual_layernorm (cuda): r and s must be one-element float32 tensors");
  TORCH_CHECK(x.size(-1) <= rln_cuda::max_hidden(dtype_code(x.scalar_type())),
              "residual_layernorm (cuda): H = ", x.size(-1), " exceeds the kernels' limit ",
              rln_cuda::max_hidden(dtype_code(x.scalar_type())));
}

struct DropoutArgs {
  bool active = false;
  const int64_t* seed = nullptr;
  uint64_t threshold = 0;
  float scale = 1.0f;
};

DropoutArgs dropout_args(const c10::optional<at::Tensor>& seed, const at::Tensor& x, double p) {
  DropoutArgs d;
  if (seed.has_value() && seed->defined() && p > 0.0) {
    TORCH_CHECK(p <= 1.0, "residual_layernorm: dropout probability must be in [0, 1], got ", p);
    check_same_device(*seed, x, "seed");
    TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong,
                "residual_layernorm: seed must be a one-element int64 tensor");
    d.active = true;
    d.seed = seed->const_data_ptr<int64_t>();
    d.threshold = rln::dropout_threshold(p);
    d.scale = rln::dropout_keep_scale(p);
  }
  return d;
}

std::vector<int64_t> row_shape(const at::Tensor& x) {
  auto shape = x.sizes().vec();
  shape.pop_back();
  return shape;
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "residual_layernorm (cuda) ", what, " failed: ",
              cudaGetErrorString(err));
}

std::vector<at::Tensor> rln_forward(const at::Tensor& x_in, const at::Tensor& f_in,
                                    const at::Tensor& weight_in, const at::Tensor& bias_in,
                                    const at::Tensor& r, const at::Tensor& s,
                                    const c10::optional<at::Tensor>& seed, double eps, double p) {
  check_common(x_in, f_in, weight_in, r, s);
  check_same_device(bias_in, x_in, "bias");
  TORCH_CHECK(bias_in.sizes() == weight_in.sizes() && bias_in.scalar_type() == x_in.scalar_type(),
              "residual_layernorm (cuda): bias must have shape (H,) and x's dtype");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor f = f_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor bias = bias_in.contiguous();
  const DropoutArgs d = dropout_args(seed, x, p);
  const int64_t H = x.size(-1);
  const int64_t rows = x.numel() / H;

  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty(row_shape(x), x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty(row_shape(x), x.options().dtype(at::kFloat));
  if (rows == 0) return {y, mean, rstd};

  rln_cuda::FwdParams prm{};
  prm.x = x.const_data_ptr();
  prm.f = f.const_data_ptr();
  prm.gamma = weight.const_data_ptr();
  prm.beta = bias.const_data_ptr();
  prm.r = r.const_data_ptr<float>();
  prm.s = s.const_data_ptr<float>();
  prm.seed = d.seed;
  prm.y = y.mutable_data_ptr();
  prm.mean = mean.mutable_data_ptr<float>();
  prm.rstd = rstd.mutable_data_ptr<float>();
  prm.rows = rows;
  prm.H = static_cast<int>(H);
  prm.eps = static_cast<float>(eps);
  prm.drop_threshold = d.threshold;
  prm.keep_scale = d.scale;
  prm.dropout = d.active;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  check_cuda(rln_cuda::forward(dtype_code(x.scalar_type()), prm, stream), "forward");
  return {y, mean, rstd};
}

std::vector<at::Tensor> rln_backward(const at::Tensor& dy_in, const at::Tensor& x_in,
                                     const at::Tensor& f_in, const at::Tensor& weight_in,
                                     const at::Tensor& r, const at::Tensor& s,
                                     const c10::optional<at::Tensor>& seed,
                                     const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                     double p) {
  check_common(x_in, f_in, weight_in, r, s);
  check_same_device(dy_in, x_in, "grad_output");
  check_same_device(mean_in, x_in, "mean");
  check_same_device(rstd_in, x_in, "rstd");
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type(),
              "residual_layernorm backward: grad_output must match x in shape and dtype");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor f = f_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor mean = mean_in.to(at::kFloat).contiguous();
  const at::Tensor rstd = rstd_in.to(at::kFloat).contiguous();
  const DropoutArgs d = dropout_args(seed, x, p);
  const int64_t H = x.size(-1);
  const int64_t rows = x.numel() / H;
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows,
              "residual_layernorm backward: mean/rstd must have one entry per row");
  const int code = dtype_code(x.scalar_type());

  at::Tensor dx = at::empty_like(x);
  at::Tensor df = at::empty_like(x);
  at::Tensor dgamma = at::empty_like(weight);
  at::Tensor dbeta = at::empty_like(weight);
  const int64_t parts =
      rln_cuda::backward_partials(code, rows, static_cast<int>(H), x.device().index());
  at::Tensor partial = at::empty({2, parts, H}, x.options().dtype(at::kFloat));

  rln_cuda::BwdParams prm{};
  prm.dy = dy.const_data_ptr();
  prm.x = x.const_data_ptr();
  prm.f = f.const_data_ptr();
  prm.gamma = weight.const_data_ptr();
  prm.r = r.const_data_ptr<float>();
  prm.s = s.const_data_ptr<float>();
  prm.seed = d.seed;
  prm.mean = mean.const_data_ptr<float>();
  prm.rstd = rstd.const_data_ptr<float>();
  prm.dx = dx.mutable_data_ptr();
  prm.df = df.mutable_data_ptr();
  prm.dgamma = dgamma.mutable_data_ptr();
  prm.dbeta = dbeta.mutable_data_ptr();
  prm.partial = partial.mutable_data_ptr<float>();
  prm.rows = rows;
  prm.H = static_cast<int>(H);
  prm.drop_threshold = d.threshold;
  prm.keep_scale = d.scale;
  prm.dropout = d.active;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  check_cuda(rln_cuda::backward(code, prm, parts, stream), "backward");
  return {dx, df, dgamma, dbeta};
}

at::Tensor rln_dropout_mask(const at::Tensor& seed, int64_t rows, int64_t H, double p) {
  TORCH_CHECK(seed.is_cuda() && seed.numel() == 1 && seed.scalar_type() == at::kLong,
              "dropout_mask: seed must be a one-element int64 CUDA tensor");
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor out = at::ones({rows, H}, seed.options().dtype(at::kFloat));
  if (p <= 0.0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(seed.device().index()).stream();
  check_cuda(rln_cuda::dropout_mask(seed.const_data_ptr<int64_t>(), out.mutable_data_ptr<float>(),
                                    rows, static_cast<int>(H), rln::dropout_threshold(p),
                                    rln::dropout_keep_scale(p), stream),
             "dropout_mask");
  return out;
}

int64_t abi_version() { return RLN_ABI_VERSION; }

int64_t source_hash() { return static_cast<int64_t>(RLN_SOURCE_HASH); }

int64_t max_hidden(int64_t dtype) { return rln_cuda::max_hidden(static_cast<int>(dtype)); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megabranch fused residual-scale LayerNorm, CUDA kernels";
  m.def("forward", &rln_forward, "y, mean, rstd = forward(x, f, weight, bias, r, s, seed, eps, p)",
        py::arg("x"), py::arg("f"), py::arg("weight"), py::arg("bias"), py::arg("r"),
        py::arg("s"), py::arg("seed"), py::arg("eps"), py::arg("p"));
  m.def("backward", &rln_backward,
        "dx, df, dgamma, dbeta = backward(dy, x, f, weight, r, s, seed, mean, rstd, p)",
        py::arg("dy"), py::arg("x"), py::arg("f"), py::arg("weight"), py::arg("r"),
        py::arg("s"), py::arg("seed"), py::arg("mean"), py::arg("rstd"), py::arg("p"));
  m.def("dropout_mask", &rln_dropout_mask, "keep multipliers for (seed, rows, H, p)",
        py::arg("seed"), py::arg("rows"), py::arg("H"), py::arg("p"));
  m.def("max_hidden", &max_hidden, "largest H the kernels take for a dtype code (0 f32, 1 f16, 2 bf16)");
  m.def("abi_version", &abi_version);
  m.def("source_hash", &source_hash);
}
