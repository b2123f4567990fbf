// The elementwise parts of a Llama-family decoder layer, one op each where eager transformers runs
// 5 to 10 (worker/lean.py calls them). Every op works row by row: a row's arithmetic depends only
// on that row, never on how many rows share the call or which thread runs it, so a request's bits
// stay the same alone, batched and in any prefill chunking.
//
// Shapes (float32; a row is one token):
//   rms_norm(out, x, w, eps)             out[t] = w * (x[t] / sqrt(mean(x[t]^2) + eps))
//   add_rms_norm(out, residual, x, w, eps)  residual[t] += x[t], then out[t] = rms_norm(residual[t])
//   rope(q, k, cos, sin)                 in place, q [T, heads, D], k [T, kv_heads, D] (rows strided),
//                                        cos, sin [T, D]: x*cos + rotate_half(x)*sin (transformers' Llama)
//   silu_mul(out, gate_up)               out [T, I] = silu(gate_up[:, :I]) * gate_up[:, I:]
// x, residual, out: [T, n] with unit stride along n (rows may be strided: a view into a wider output).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "simd.h"

namespace {

// Rows per parallel chunk: about 32k floats of work, so a decode's few rows stay on one thread.
inline int64_t grain(int64_t row_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_len)); }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be [rows, n] with unit stride along n");
}

inline void norm_row(float* out, const float* x, const float* w, int64_t n, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(out, "out");
  check_rows(x, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "weight must be [n], contiguous");
  const int64_t T = x.size(0), n = x.size(1);
  const float* xd = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, T, grain(n), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) norm_row(o + t * out.stride(0), xd + t * x.stride(0), w, n, static_cast<float>(eps));
  });
}

void add_rms_norm(at::Tensor out, at::Tensor residual, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(out, "out");
  check_rows(residual, "residual");
  check_rows(x, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "weight must be [n], contiguous");
  const int64_t T = x.size(0), n = x.size(1);
  const float* xd = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* res = residual.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, T, grain(n), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      float* r = res + t * residual.stride(0);
      const float* xr = xd + t * x.stride(0);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) r[i] = r[i] + xr[i];
      norm_row(o + t * out.stride(0), r, w, n, static_cast<float>(eps));
    }
  });
}

inline void rope_vec(float* x, const float* c, const float* s, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * c[i] + (-b) * s[i];
    x[i + half] = b * c[i + half] + a * s[i + half];
  }
}

void rope(at::Tensor q, at::Tensor k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat,
              "rope takes float32");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1, "q, k must be [T, heads, D]");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.size(0) == q.size(0) &&
                  cos.size(1) == q.size(2),
              "cos, sin must be [T, D], contiguous");
  const int64_t T = q.size(0), H = q.size(1), KV = k.size(1), D = q.size(2), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && k.size(2) == D && k.size(0) == T, "q and k must share T and an even head size");
  float* qd = q.data_ptr<float>();
  float* kd = k.data_ptr<float>();
  const float* cd = cos.data_ptr<float>();
  const float* sd = sin.data_ptr<float>();
  at::parallel_for(0, T, grain((H + KV) * D), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const float* c = cd + t * D;
      const float* s = sd + t * D;
      for (int64_t h = 0; h < H; ++h) rope_vec(qd + t * q.stride(0) + h * q.stride(1), c, s, half);
      for (int64_t h = 0; h < KV; ++h) rope_vec(kd + t * k.stride(0) + h * k.stride(1), c, s, half);
    }
  });
}

// silu(g) * u = g * u / (1 + exp(-g)); exp of a non-positive argument only, so no overflow:
// 1 / (1 + e^-g) for g >= 0 and e^g / (1 + e^g) for g < 0, with e = exp(-|g|).
inline void silu_mul_row(float* out, const float* g, const float* u, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 gv = _mm512_loadu_ps(g + i);
    const __m512 e = exp_neg(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(gv)));
    const __mmask16 neg = _mm512_cmp_ps_mask(gv, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 num = _mm512_mask_mov_ps(one, neg, e);
    const __m512 sig = _mm512_div_ps(num, _mm512_add_ps(one, e));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(gv, sig), _mm512_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) {
    const float e = std::exp(-std::fabs(g[i]));
    const float sig = (g[i] < 0.f ? e : 1.f) / (1.f + e);
    out[i] = g[i] * sig * u[i];
  }
}

void silu_mul(at::Tensor out, const at::Tensor& gate_up) {
  check_rows(out, "out");
  check_rows(gate_up, "gate_up");
  const int64_t T = gate_up.size(0), n = out.size(1);
  TORCH_CHECK(gate_up.size(1) == 2 * n && out.size(0) == T, "gate_up must be [T, 2n] for out [T, n]");
  const float* gd = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, T, grain(2 * n), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const float* g = gd + t * gate_up.stride(0);
      silu_mul_row(o + t * out.stride(0), g, g + n, n);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prefixcache, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("add_rms_norm(Tensor(a!) out, Tensor(b!) residual, Tensor x, Tensor weight, float eps) -> ()");
  m.def("rope(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
  m.def("silu_mul(Tensor(a!) out, Tensor gate_up) -> ()");
}

TORCH_LIBRARY_IMPL(prefixcache, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("add_rms_norm", add_rms_norm);
  m.impl("rope", rope);
  m.impl("silu_mul", silu_mul);
}
