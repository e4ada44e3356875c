// Row kernels of the CPU residual LayerNorm, included twice by residual_ln_cpu.cpp: once for the
// baseline instruction set and once (x86-64) inside an AVX2+FMA target region, picked at run
// time.  No include guard on purpose; the includer opens the namespace and defines `Dropout`.
// Every inner loop is a unit-stride `omp simd` loop over L1-resident row buffers.

// m[j] = keep(seed, row, j) ? scale : 0 for j < H.  The Philox rounds run on kBlock groups of
// four columns at once (structure-of-arrays), which the compiler vectorises; the words are the
// same as rln::dropout_words(seed, row, group).
// Element conversions written as plain bit operations so the compiler vectorises them (the
// c10 conversion operators are not always inlined into vector code).  bfloat16 stores round to
// nearest even and keep NaNs quiet, like c10::BFloat16(float).
inline float load_elem(float v) { return v; }
inline double load_elem(double v) { return v; }
inline float load_elem(c10::Half v) { return static_cast<float>(v); }
inline float load_elem(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &u, sizeof(out));
  return out;
}

template <typename T>
inline T store_elem(float v) {
  return static_cast<T>(v);
}
template <typename T>
inline T store_elem(double v) {
  return static_cast<T>(v);
}
template <>
inline c10::BFloat16 store_elem<c10::BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t bits = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded;
  return c10::BFloat16(static_cast<uint16_t>(bits), c10::BFloat16::from_bits());
}

template <typename A>
void fill_keep_row(const Dropout& d, int64_t row, int64_t H, A* __restrict__ m) {
  constexpr int kBlock = 16;
  const int64_t groups = (H + 3) / 4;
  const A scale = static_cast<A>(d.scale);
  const uint64_t thr = d.threshold;
  const uint32_t row_lo = static_cast<uint32_t>(static_cast<uint64_t>(row));
  const uint32_t row_hi = static_cast<uint32_t>(static_cast<uint64_t>(row) >> 32);
  for (int64_t g0 = 0; g0 < groups; g0 += kBlock) {
    uint32_t c0[kBlock], c1[kBlock], c2[kBlock], c3[kBlock];
#pragma omp simd
    for (int i = 0; i < kBlock; ++i) {
      c0[i] = static_cast<uint32_t>(g0 + i);
      c1[i] = row_lo;
      c2[i] = row_hi;
      c3[i] = rln::kSalt;
    }
    uint32_t k0 = static_cast<uint32_t>(d.seed), k1 = static_cast<uint32_t>(d.seed >> 32);
    for (int round = 0; round < 10; ++round) {
#pragma omp simd
      for (int i = 0; i < kBlock; ++i) {
        const uint64_t p0 = static_cast<uint64_t>(rln::kPhiloxM0) * c0[i];
        const uint64_t p1 = static_cast<uint64_t>(rln::kPhiloxM1) * c2[i];
        const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[i] ^ k0;
        const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[i] ^ k1;
        c1[i] = static_cast<uint32_t>(p1);
        c3[i] = static_cast<uint32_t>(p0);
        c0[i] = n0;
        c2[i] = n2;
      }
      k0 += rln::kPhiloxW0;
      k1 += rln::kPhiloxW1;
    }
    const int64_t base = 4 * g0;
    const int64_t n = std::min<int64_t>(4 * kBlock, H - base);
    A* __restrict__ out = m + base;
    if (n == 4 * kBlock) {
#pragma omp simd
      for (int i = 0; i < kBlock; ++i) {
        out[4 * i + 0] = static_cast<uint64_t>(c0[i]) >= thr ? scale : A(0);
        out[4 * i + 1] = static_cast<uint64_t>(c1[i]) >= thr ? scale : A(0);
        out[4 * i + 2] = static_cast<uint64_t>(c2[i]) >= thr ? scale : A(0);
        out[4 * i + 3] = static_cast<uint64_t>(c3[i]) >= thr ? scale : A(0);
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const int i = static_cast<int>(j >> 2);
        const uint32_t w = (j & 3) == 0 ? c0[i] : (j & 3) == 1 ? c1[i] : (j & 3) == 2 ? c2[i] : c3[i];
        out[j] = static_cast<uint64_t>(w) >= thr ? scale : A(0);
      }
    }
  }
}

// z[j] = r * x[j] + s * keep[j] * f[j]; returns sum_j z[j].
template <typename T, typename A>
A residual_row(const T* __restrict__ xr, const T* __restrict__ fr, A r, A s, const Dropout& d,
               int64_t row, int64_t H, A* __restrict__ z, A* __restrict__ m) {
  A sum = 0;
  if (d.active) {
    fill_keep_row<A>(d, row, H, m);
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < H; ++j) {
      const A v = r * load_elem(xr[j]) + s * (m[j] * load_elem(fr[j]));
      z[j] = v;
      sum += v;
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < H; ++j) {
      const A v = r * load_elem(xr[j]) + s * load_elem(fr[j]);
      z[j] = v;
      sum += v;
    }
  }
  return sum;
}

template <typename T, typename A>
void forward_rows(const T* __restrict__ x, const T* __restrict__ f, const A* __restrict__ gam,
                  const A* __restrict__ bet, A r, A s, const Dropout& d, T* __restrict__ y,
                  A* __restrict__ mean, A* __restrict__ rstd, int64_t H, A eps, int64_t begin,
                  int64_t end) {
  std::vector<A> zbuf(H), mbuf(d.active ? H : 0);
  A* __restrict__ z = zbuf.data();
  A* __restrict__ m = mbuf.data();
  const A inv_h = A(1) / static_cast<A>(H);
  for (int64_t row = begin; row < end; ++row) {
    const T* __restrict__ xr = x + row * H;
    const T* __restrict__ fr = f + row * H;
    T* __restrict__ yr = y + row * H;
    const A mu = residual_row<T, A>(xr, fr, r, s, d, row, H, z, m) * inv_h;
    A sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < H; ++j) {
      const A c = z[j] - mu;
      sq += c * c;
    }
    const A rs = A(1) / std::sqrt(sq * inv_h + eps);
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      yr[j] = store_elem<T>((z[j] - mu) * rs * gam[j] + bet[j]);
    }
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// dz = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * gamma;  dx = r dz;  df = s keep dz.
template <typename T, typename A>
void backward_rows(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ f,
                   const A* __restrict__ gam, A r, A s, const Dropout& d,
                   const A* __restrict__ mean, const A* __restrict__ rstd, T* __restrict__ dx,
                   T* __restrict__ df, int64_t H, int64_t begin, int64_t end,
                   A* __restrict__ dgam, A* __restrict__ dbet) {
  std::vector<A> zbuf(H), mbuf(d.active ? H : 0);
  A* __restrict__ z = zbuf.data();
  A* __restrict__ m = mbuf.data();
  const A inv_h = A(1) / static_cast<A>(H);
  for (int64_t row = begin; row < end; ++row) {
    const T* __restrict__ xr = x + row * H;
    const T* __restrict__ fr = f + row * H;
    const T* __restrict__ dyr = dy + row * H;
    T* __restrict__ dxr = dx + row * H;
    T* __restrict__ dfr = df + row * H;
    const A mu = mean[row];
    const A rs = rstd[row];
    // xhat = (r x + s keep f - mean) * rstd (same rounding order as the forward), kept in z;
    // the row sums of g = dy * gamma and g * xhat, and the dgamma/dbeta partials, in one pass.
    A sg = 0, sgx = 0;
    if (d.active) {
      fill_keep_row<A>(d, row, H, m);
#pragma omp simd reduction(+ : sg, sgx)
      for (int64_t j = 0; j < H; ++j) {
        const A xh = (r * load_elem(xr[j]) + s * (m[j] * load_elem(fr[j])) - mu) * rs;
        const A dyv = load_elem(dyr[j]);
        const A g = dyv * gam[j];
        z[j] = xh;
        sg += g;
        sgx += g * xh;
        dgam[j] += dyv * xh;
        dbet[j] += dyv;
      }
    } else {
#pragma omp simd reduction(+ : sg, sgx)
      for (int64_t j = 0; j < H; ++j) {
        const A xh = (r * load_elem(xr[j]) + s * load_elem(fr[j]) - mu) * rs;
        const A dyv = load_elem(dyr[j]);
        const A g = dyv * gam[j];
        z[j] = xh;
        sg += g;
        sgx += g * xh;
        dgam[j] += dyv * xh;
        dbet[j] += dyv;
      }
    }
    const A c1 = sg * inv_h;
    const A c2 = sgx * inv_h;
    const A rr = r * rs;
    if (d.active) {
      const A ss = s * rs;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        const A t = load_elem(dyr[j]) * gam[j] - c1 - z[j] * c2;
        dxr[j] = store_elem<T>(rr * t);
        dfr[j] = store_elem<T>(ss * m[j] * t);
      }
    } else {
      const A ss = s * rs;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        const A t = load_elem(dyr[j]) * gam[j] - c1 - z[j] * c2;
        dxr[j] = store_elem<T>(rr * t);
        dfr[j] = store_elem<T>(ss * t);
      }
    }
  }
}

// Fixed-order sum of `n` partial rows of length `len` into the first one.
template <typename A>
void sum_partials(A* __restrict__ part, int64_t n, int64_t len) {
  for (int64_t c = 1; c < n; ++c) {
    const A* __restrict__ src = part + c * len;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) part[j] += src[j];
  }
}
