// The linear layers' GEMM on CPU (float32): y[M, N] = x[M, K] @ W[N, K]^T (+ bias), with W packed
// once into panels of 16 output columns, [ceil(N / 16), K, 16] (zero-padded columns).
//
// Every output is one fused multiply-add chain over k = 0 .. K-1, in order, then + bias: no
// split of K, whatever M, the tile shape or the thread. So a row's bits are the same alone, in any
// batch and in a prefill chunk of any length (the rule the engine's batching relies on; oneDNN's
// packed kernel keeps it only from 2 rows on). Tiles of MR rows x NR panels keep MR * NR
// accumulators in registers: each weight vector loaded feeds MR rows, each broadcast input feeds NR
// panels. At a few rows a step is bound by reading the weights (each is read once per call); from
// ~32 rows by the FMAs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "simd.h"

namespace {

constexpr int64_t PANEL = 16;  // output columns per panel: one 512-bit vector of float32

#if defined(__AVX512F__)
struct Gemm {
  const float* x;  // [M, K]
  const float* w;  // [P, K, 16]
  const float* bias;  // [N] or null
  float* y;  // [M, N]
  int64_t M, K, N, P;
};

// Rows [m0, m0 + MR) x panels [p0, p0 + NR).
template <int MR, int NR>
inline void tile(const Gemm& g, int64_t m0, int64_t p0) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  const float* xr = g.x + m0 * g.K;
  const float* wp = g.w + p0 * g.K * PANEL;
  const int64_t ps = g.K * PANEL;
#pragma GCC unroll 2
  for (int64_t k = 0; k < g.K; ++k) {
    __m512 wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_load_ps(wp + j * ps + k * PANEL);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(xr[r * g.K + k]);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_fmadd_ps(a, wv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) {
    const int64_t col = (p0 + j) * PANEL;
    const int64_t width = std::min<int64_t>(PANEL, g.N - col);
    const __mmask16 mask = width >= PANEL ? __mmask16(0xFFFF) : __mmask16((1u << width) - 1u);
    const __m512 b = g.bias ? _mm512_maskz_loadu_ps(mask, g.bias + col) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(g.y + (m0 + r) * g.N + col, mask, _mm512_add_ps(acc[r][j], b));
  }
}

// Panels [p0, p1) for rows [m0, m0 + MR): groups of NR panels, then the rest one narrower tile.
template <int MR, int NR>
void panels(const Gemm& g, int64_t m0, int64_t p0, int64_t p1) {
  int64_t p = p0;
  for (; p + NR <= p1; p += NR) tile<MR, NR>(g, m0, p);
  if constexpr (NR > 1) {
    if (p < p1) panels<MR, NR - 1>(g, m0, p, p1);
  }
}

// Panels per tile for a tile of MR rows: as many accumulators as the 32 registers hold beside the
// weight vectors and a broadcast (and at least 4 chains where few rows share a weight load).
template <int MR>
constexpr int kPanels = MR <= 2 ? 4 : MR <= 4 ? 6 : MR <= 6 ? 4 : 3;

template <int MR>
void rows(const Gemm& g, int64_t m0, int64_t p0, int64_t p1) {
  panels<MR, kPanels<MR>>(g, m0, p0, p1);
}

void rows_at(const Gemm& g, int64_t m0, int64_t p0, int64_t p1) {
  switch (std::min<int64_t>(8, g.M - m0)) {
    case 1: return rows<1>(g, m0, p0, p1);
    case 2: return rows<2>(g, m0, p0, p1);
    case 3: return rows<3>(g, m0, p0, p1);
    case 4: return rows<4>(g, m0, p0, p1);
    case 5: return rows<5>(g, m0, p0, p1);
    case 6: return rows<6>(g, m0, p0, p1);
    case 7: return rows<7>(g, m0, p0, p1);
    default: return rows<8>(g, m0, p0, p1);
  }
}

void run(const Gemm& g) {
  // Each thread takes a run of panels (its weights are read by it alone) and every row.
  at::parallel_for(0, g.P, 1, [&](int64_t p0, int64_t p1) {
    if (g.M <= 8) return rows_at(g, 0, p0, p1);  // one tile of rows: each weight is read once
    // Else one 8-row tile's worth of panels at a time, for every tile of rows: those panels'
    // weights come from memory for the first tile and from cache for the others (measured
    // fastest against groups of 6, 12 and 48 panels at 16, 64 and 256 rows).
    for (int64_t q0 = p0; q0 < p1; q0 += kPanels<8>) {
      const int64_t q1 = std::min<int64_t>(p1, q0 + kPanels<8>);
      for (int64_t m0 = 0; m0 < g.M; m0 += 8) rows_at(g, m0, q0, q1);
    }
  });
}
#endif

bool linear_supported() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

// weight [N, K] float32 (any strides) -> [ceil(N / 16), K, 16], columns past N zero.
at::Tensor pack_linear(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "pack_linear takes a float32 [out, in] weight");
  const int64_t N = weight.size(0), K = weight.size(1), P = (N + PANEL - 1) / PANEL;
  at::Tensor padded = at::zeros({P * PANEL, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  return padded.view({P, PANEL, K}).transpose(1, 2).contiguous();
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                  int64_t out_features) {
  TORCH_CHECK(linear_supported(), "the CPU linear kernel was built without AVX-512; use linear='packed' or 'plain'");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "x must be a contiguous float32 [rows, in]");
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.size(2) == PANEL && packed.size(1) == x.size(1),
              "packed must come from pack_linear for this input width");
  TORCH_CHECK(out_features > (packed.size(0) - 1) * PANEL && out_features <= packed.size(0) * PANEL,
              "out_features does not match the packed weight");
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  if (bias) TORCH_CHECK(bias->is_contiguous() && bias->numel() == out_features && bias->scalar_type() == at::kFloat,
                        "bias must be a contiguous float32 [out]");
#if defined(__AVX512F__)
  if (x.size(0) > 0)
    run({x.data_ptr<float>(), packed.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(),
         x.size(0), x.size(1), out_features, packed.size(0)});
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prefixcache, m) {
  m.def("linear_supported() -> bool");
  m.def("pack_linear(Tensor weight) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(prefixcache, CatchAll, m) {
  m.impl("linear_supported", linear_supported);
}

TORCH_LIBRARY_IMPL(prefixcache, CPU, m) {
  m.impl("pack_linear", pack_linear);
  m.impl("linear", linear);
}
