// CPU kernels of the fused residual-scale LayerNorm (megabranch issue 4).
//
//   z = r * x + s * dropout(f)          (r, s: 0-dim float32 tensors, read at call time)
//   y = (z - mean(z)) * rstd * gamma + beta,   rstd = 1 / sqrt(var(z) + eps)
//
// Rows are split over torch's intra-op thread pool (at::parallel_for, which is OpenMP in the
// stock CPU build, so the thread count follows torch.set_num_threads).  Inside a row every loop
// is a unit-stride `omp simd` loop over a per-thread float (double for float64 inputs) row
// buffer, so the compiler vectorises it without -ffast-math.  Backward recomputes z from x, f
// and the dropout seed instead of saving it, then reduces dgamma/dbeta into one partial row per
// chunk of rows, summed afterwards in a fixed order (bitwise reproducible for a given thread count).
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "residual_ln_common.h"

namespace {

struct Dropout {
  bool active = false;
  uint64_t seed = 0;
  uint64_t threshold = 0;
  float scale = 1.0f;
};

// The row kernels, compiled for the baseline ISA and, on x86-64 with GCC/Clang, again with
// AVX2+FMA enabled; `use_avx2()` picks at run time, so the module stays portable (no -march).
namespace rln_base {
#include "residual_ln_cpu_rows.h"
}  // namespace rln_base

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RLN_AVX2_CLONE 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace rln_avx2 {
#include "residual_ln_cpu_rows.h"
}  // namespace rln_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

bool use_avx2() {
#if defined(RLN_AVX2_CLONE)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

template <typename T, typename A, typename... Args>
void run_forward_rows(Args&&... args) {
#if defined(RLN_AVX2_CLONE)
  if (use_avx2()) return rln_avx2::forward_rows<T, A>(std::forward<Args>(args)...);
#endif
  rln_base::forward_rows<T, A>(std::forward<Args>(args)...);
}

template <typename T, typename A, typename... Args>
void run_backward_rows(Args&&... args) {
#if defined(RLN_AVX2_CLONE)
  if (use_avx2()) return rln_avx2::backward_rows<T, A>(std::forward<Args>(args)...);
#endif
  rln_base::backward_rows<T, A>(std::forward<Args>(args)...);
}

template <typename A>
void run_sum_partials(A* part, int64_t n, int64_t len) {
  rln_base::sum_partials<A>(part, n, len);
}

template <typename A>
void run_fill_keep_row(const Dropout& d, int64_t row, int64_t H, A* m) {
  rln_base::fill_keep_row<A>(d, row, H, m);
}

void check_inputs(const at::Tensor& x, const at::Tensor& f) {
  TORCH_CHECK(x.device().is_cpu() && f.device().is_cpu(),
              "residual_layernorm (cpu): x and f must be CPU tensors");
  TORCH_CHECK(x.dim() >= 1, "residual_layernorm: x must have at least one dimension");
  TORCH_CHECK(x.sizes() == f.sizes(), "residual_layernorm: x and f must have the same shape, got ",
              x.sizes(), " and ", f.sizes());
  TORCH_CHECK(x.scalar_type() == f.scalar_type(),
              "residual_layernorm: x and f must have the same dtype");
  TORCH_CHECK(x.size(-1) > 0, "residual_layernorm: the normalised dimension must be non-empty");
}

void check_param(const at::Tensor& p, int64_t H, const char* name) {
  TORCH_CHECK(p.device().is_cpu(), "residual_layernorm (cpu): ", name, " must be a CPU tensor");
  TORCH_CHECK(p.dim() == 1 && p.size(0) == H, "residual_layernorm: ", name, " must have shape (",
              H, "), got ", p.sizes());
}

double read_scalar(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1, "residual_layernorm: ", name, " must have exactly one element");
  TORCH_CHECK(t.device().is_cpu(), "residual_layernorm (cpu): ", name, " must be a CPU tensor");
  return t.item<double>();
}

Dropout make_dropout(const c10::optional<at::Tensor>& seed, double p) {
  Dropout d;
  if (seed.has_value() && seed->defined() && p > 0.0) {
    TORCH_CHECK(p <= 1.0, "residual_layernorm: dropout probability must be in [0, 1], got ", p);
    TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong,
                "residual_layernorm: seed must be a one-element int64 tensor");
    d.active = true;
    d.seed = static_cast<uint64_t>(seed->item<int64_t>());
    d.threshold = rln::dropout_threshold(p);
    d.scale = rln::dropout_keep_scale(p);
  }
  return d;
}

std::vector<int64_t> row_shape(const at::Tensor& x) {
  auto s = x.sizes().vec();
  s.pop_back();
  return s;
}

int64_t grain_for(int64_t H) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(H, 1)); }

std::vector<at::Tensor> rln_forward(const at::Tensor& x_in, const at::Tensor& f_in,
                                    const at::Tensor& weight, const at::Tensor& bias,
                                    const at::Tensor& r_t, const at::Tensor& s_t,
                                    const c10::optional<at::Tensor>& seed, double eps, double p) {
  check_inputs(x_in, f_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor f = f_in.contiguous();
  const int64_t H = x.size(-1);
  const int64_t rows = x.numel() / H;
  check_param(weight, H, "weight");
  check_param(bias, H, "bias");
  const double r = read_scalar(r_t, "r");
  const double s = read_scalar(s_t, "s");
  const Dropout d = make_dropout(seed, p);

  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty(row_shape(x), x.options().dtype(acc_type));
  at::Tensor rstd = at::empty(row_shape(x), x.options().dtype(acc_type));
  if (rows == 0) return {y, mean, rstd};
  const at::Tensor gam = weight.to(acc_type).contiguous();
  const at::Tensor bet = bias.to(acc_type).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "residual_layernorm_cpu_forward", [&] {
        using A = at::opmath_type<scalar_t>;
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        const scalar_t* fp = f.const_data_ptr<scalar_t>();
        scalar_t* yp = y.mutable_data_ptr<scalar_t>();
        const A* gp = gam.const_data_ptr<A>();
        const A* bp = bet.const_data_ptr<A>();
        A* mp = mean.mutable_data_ptr<A>();
        A* rp = rstd.mutable_data_ptr<A>();
        at::parallel_for(0, rows, grain_for(H), [&](int64_t begin, int64_t end) {
          run_forward_rows<scalar_t, A>(xp, fp, gp, bp, static_cast<A>(r), static_cast<A>(s), d, yp,
                                    mp, rp, H, static_cast<A>(eps), begin, end);
        });
      });
  return {y, mean, rstd};
}

std::vector<at::Tensor> rln_backward(const at::Tensor& dy_in, const at::Tensor& x_in,
                                     const at::Tensor& f_in, const at::Tensor& weight,
                                     const at::Tensor& r_t, const at::Tensor& s_t,
                                     const c10::optional<at::Tensor>& seed,
                                     const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                     double p) {
  check_inputs(x_in, f_in);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type(),
              "residual_layernorm backward: grad_output must match x in shape and dtype");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor f = f_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  const int64_t H = x.size(-1);
  const int64_t rows = x.numel() / H;
  check_param(weight, H, "weight");
  const double r = read_scalar(r_t, "r");
  const double s = read_scalar(s_t, "s");
  const Dropout d = make_dropout(seed, p);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor mean = mean_in.to(acc_type).contiguous();
  const at::Tensor rstd = rstd_in.to(acc_type).contiguous();
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows,
              "residual_layernorm backward: mean/rstd must have one entry per row");

  at::Tensor dx = at::empty_like(x);
  at::Tensor df = at::empty_like(x);
  const at::Tensor gam = weight.to(acc_type).contiguous();
  // One partial (dgamma, dbeta) row pair per chunk of rows; chunk c covers
  // rows [c * rows / chunks, (c + 1) * rows / chunks).
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (rows + grain_for(H) - 1) / grain_for(H)));
  at::Tensor partial = at::zeros({chunks, 2, H}, x.options().dtype(acc_type));
  at::Tensor dgamma, dbeta;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "residual_layernorm_cpu_backward", [&] {
        using A = at::opmath_type<scalar_t>;
        const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        const scalar_t* fp = f.const_data_ptr<scalar_t>();
        scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
        scalar_t* dfp = df.mutable_data_ptr<scalar_t>();
        const A* gp = gam.const_data_ptr<A>();
        const A* mp = mean.const_data_ptr<A>();
        const A* rp = rstd.const_data_ptr<A>();
        A* part = partial.mutable_data_ptr<A>();
        at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
          for (int64_t c = cb; c < ce; ++c) {
            const int64_t begin = c * rows / chunks;
            const int64_t end = (c + 1) * rows / chunks;
            A* dg = part + c * 2 * H;
            run_backward_rows<scalar_t, A>(dyp, xp, fp, gp, static_cast<A>(r), static_cast<A>(s), d,
                                       mp, rp, dxp, dfp, H, begin, end, dg, dg + H);
          }
        });
        run_sum_partials<A>(part, chunks, 2 * H);
      });
  dgamma = partial.select(0, 0).select(0, 0).to(weight.scalar_type());
  dbeta = partial.select(0, 0).select(0, 1).to(weight.scalar_type());
  if (dgamma.data_ptr() == partial.data_ptr()) {  // same dtype: detach from the workspace
    dgamma = dgamma.clone();
    dbeta = dbeta.clone();
  }
  return {dx, df, dgamma, dbeta};
}

// The keep multiplier (0 or 1 / (1 - p)) the kernels apply to f, as a float32 (rows, H) tensor.
at::Tensor rln_dropout_mask(const at::Tensor& seed, int64_t rows, int64_t H, double p) {
  const Dropout d = make_dropout(seed, p);
  at::Tensor out = at::ones({rows, H}, at::TensorOptions().dtype(at::kFloat));
  if (!d.active) return out;
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, rows, grain_for(H), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) run_fill_keep_row<float>(d, row, H, o + row * H);
  });
  return out;
}

int64_t abi_version() { return RLN_ABI_VERSION; }

int64_t source_hash() { return static_cast<int64_t>(RLN_SOURCE_HASH); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megabranch fused residual-scale LayerNorm, CPU kernels";
  m.def("forward", &rln_forward, "y, mean, rstd = forward(x, f, weight, bias, r, s, seed, eps, p)",
        py::arg("x"), py::arg("f"), py::arg("weight"), py::arg("bias"), py::arg("r"),
        py::arg("s"), py::arg("seed"), py::arg("eps"), py::arg("p"),
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &rln_backward,
        "dx, df, dgamma, dbeta = backward(dy, x, f, weight, r, s, seed, mean, rstd, p)",
        py::arg("dy"), py::arg("x"), py::arg("f"), py::arg("weight"), py::arg("r"),
        py::arg("s"), py::arg("seed"), py::arg("mean"), py::arg("rstd"), py::arg("p"),
        py::call_guard<py::gil_scoped_release>());
  m.def("dropout_mask", &rln_dropout_mask, "keep multipliers for (seed, rows, H, p)",
        py::arg("seed"), py::arg("rows"), py::arg("H"), py::arg("p"),
        py::call_guard<py::gil_scoped_release>());
  m.def("abi_version", &abi_version);
  m.def("source_hash", &source_hash);
}
