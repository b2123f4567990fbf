// Paged attention on CPU: every request of a ragged batch attends to its own context, read in place
// from the KV pool's blocks through its block table. One call per layer for the whole batch.
//
// Shapes (see worker/kernels/__init__.py, which builds and loads this file):
//   pool          [capacity, layers, 2, kv_heads, block_size, head_dim]  (contiguous; 0 = key, 1 = value)
//   q             [heads, T, head_dim]  (any strides): the new tokens of every request, side by side
//   out           [T, heads, head_dim]  (contiguous)
//   block_tables  [B, max_blocks] int32: block i of request b holds its tokens [i*bs, (i+1)*bs)
//   ctx_lens      [B] int32: tokens of context after this step (cached + new)
//   q_starts      [B] int32, q_lens [B] int32: request b's query rows are [q_starts[b], q_starts[b] + q_lens[b])
//                 (the requests of a call need not cover every row: the caller may attend some apart)
// Query row i of a request with q_len rows sits at position ctx - q_len + i and sees keys
// [0, ctx - q_len + i] (causal within the new tokens).
//
// Per (request, kv head, run of query rows) task: blocks are visited in order; for each, every query vector of the
// head group (q_len rows x heads/kv_heads) scores the block's keys, then an online softmax folds the
// block into a running (max, sum, accumulator). The max moves only when a score passes it by more
// than a slack (AVX-512 path: `Tile::kSlack`), so most blocks need no rescale and no horizontal
// max. Accumulation is float32 whatever the pool's dtype.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

template <typename scalar_t>
inline float dot(const float* q, const scalar_t* k, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += q[i] * to_f(k[i]);
  return s;
}

template <typename scalar_t>
inline void axpy(float* acc, float p, const scalar_t* v, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) acc[i] += p * to_f(v[i]);
}


#if defined(__AVX512F__)
// Lane t of the result = the sum of d[t]'s 16 lanes: 16 horizontal sums in 45 shuffles and adds
// (a transpose-and-add tree) instead of 16 separate reductions.
inline __m512 hsum16(const __m512* d) {
  __m512 a[8], b[4];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [d0 part, d1 part, d0 part, d1 part]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(d[2 * i], d[2 * i + 1]), _mm512_unpackhi_ps(d[2 * i], d[2 * i + 1]));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: keys 4i..4i+3, summed over that lane
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
  const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88), _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
  const __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88), _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, 0x88), _mm512_shuffle_f32x4(c0, c1, 0xDD));
}

// Lane t = q . k[t] for the chunk's keys (head_dim = 16 * NV); lanes from n_keys on are 0 and
// their keys are not read.
template <int NV>
inline __m512 scores(const float* q, const float* k, int n_keys) {
  __m512 qr[NV], d[16];
#pragma GCC unroll 16
  for (int j = 0; j < NV; ++j) qr[j] = _mm512_loadu_ps(q + j * 16);
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) {
    if (t < n_keys) {
      const float* kt = k + t * 16 * NV;
      __m512 x = _mm512_mul_ps(qr[0], _mm512_loadu_ps(kt));
#pragma GCC unroll 16
      for (int j = 1; j < NV; ++j) x = _mm512_fmadd_ps(qr[j], _mm512_loadu_ps(kt + j * 16), x);
      d[t] = x;
    } else {
      d[t] = _mm512_setzero_ps();
    }
  }
  return hsum16(d);
}

// One tile of RT query vectors (float32, head_dim = 16 * NV) against a run of up to 16 keys at a time,
// with accumulators in registers. `visible[r]` = keys of the current 16-key chunk vector r sees.
template <int NV, int RT>
struct Tile {
  // A row's running max moves only when a score passes it by more than this (natural log units):
  // in between, exp(score - max) <= e^8, far from float32's range, and a chunk needs one compare
  // instead of a horizontal max. Its sum stays lane-wise until the end (one horizontal add per row).
  static constexpr float kSlack = 8.f;
  __m512 acc[RT][NV];
  __m512 l[RT];  // lane-wise sums of exp(score - m)
  float m[RT];
  const float* q[RT];
  int rows;

  void start(const float* const* qs, int n) {
    rows = n;
    for (int r = 0; r < RT; ++r) {
      q[r] = qs[r < n ? r : 0];
      m[r] = -std::numeric_limits<float>::infinity();
      l[r] = _mm512_setzero_ps();
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
    }
  }

  // keys k, values v: [n_keys, 16 * NV] rows (n_keys <= 16); visible[r] <= n_keys.
  inline void chunk(const float* k, const float* v, int n_keys, const int* visible) {
    __m512 sr[RT];
#pragma GCC unroll 8
    for (int r = 0; r < RT; ++r) sr[r] = scores<NV>(q[r], k, n_keys);
    __m512 p[RT];
#pragma GCC unroll 8
    for (int r = 0; r < RT; ++r) {
      const __mmask16 live = visible[r] >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << visible[r]) - 1u);
      if (!live) {
        p[r] = _mm512_setzero_ps();
        continue;
      }
      if (_mm512_mask_cmp_ps_mask(live, sr[r], _mm512_set1_ps(m[r] + kSlack), _CMP_GT_OQ)) {
        const __m512 sv = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), live, sr[r]);
        const float m_new = _mm512_reduce_max_ps(sv);  // > m[r] + kSlack
        const float alpha = std::exp(m[r] - m_new);    // 0 on a row's first keys (m = -inf)
        const __m512 a = _mm512_set1_ps(alpha);
        l[r] = _mm512_mul_ps(l[r], a);
#pragma GCC unroll 16
        for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_mul_ps(acc[r][j], a);
        m[r] = m_new;
      }
      p[r] = _mm512_maskz_mov_ps(live, exp_neg(_mm512_sub_ps(sr[r], _mm512_set1_ps(m[r]))));
      l[r] = _mm512_add_ps(l[r], p[r]);
    }
    alignas(64) float pw[RT][16];
#pragma GCC unroll 8
    for (int r = 0; r < RT; ++r) _mm512_store_ps(pw[r], p[r]);
    for (int t = 0; t < n_keys; ++t) {
      __m512 vr[NV];
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) vr[j] = _mm512_loadu_ps(v + t * 16 * NV + j * 16);
#pragma GCC unroll 8
      for (int r = 0; r < RT; ++r) {
        const __m512 pb = _mm512_set1_ps(pw[r][t]);
#pragma GCC unroll 16
        for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_fmadd_ps(pb, vr[j], acc[r][j]);
      }
    }
  }

  void finish(float* const* outs) {
    for (int r = 0; r < rows; ++r) {
      const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(l[r]));
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) _mm512_storeu_ps(outs[r] + j * 16, _mm512_mul_ps(acc[r][j], inv));
    }
  }
};

// The float32 task of `attend_one`, vectorized: query vectors in tiles of RT, keys in chunks of 16.
template <int NV, int RT>
void attend_one_avx512(int64_t b, int64_t g, const float* qv, int64_t ql, int64_t group, int64_t ctx,
                       const float* base, int64_t s_blk, int64_t s_layer, int64_t s_kv, int64_t s_head,
                       int64_t layer, int64_t bs, const int32_t* table, float* const* outs) {
  constexpr int64_t D = 16 * NV;
  const int64_t R = ql * group;
  for (int64_t x0 = 0; x0 < R; x0 += RT) {
    const int n = static_cast<int>(std::min<int64_t>(RT, R - x0));
    const float* qs[RT];
    for (int r = 0; r < n; ++r) qs[r] = qv + (x0 + r) * D;
    Tile<NV, RT> tile;
    tile.start(qs, n);
    // the last row of the tile sees the most keys: ctx - ql + its row + 1
    const int64_t last_row = (x0 + n - 1) / group;
    const int64_t keys = ctx - ql + last_row + 1;
    for (int64_t first = 0, n_keys = 0; first < keys; first += n_keys) {
      const int64_t bi = first / bs, off = first % bs;
      n_keys = std::min<int64_t>({16, bs - off, keys - first});
      const float* kb = base + table[bi] * s_blk + layer * s_layer + g * s_head + off * D;
      int visible[RT];
      for (int r = 0; r < RT; ++r) {
        const int64_t row = (x0 + (r < n ? r : 0)) / group;
        visible[r] = static_cast<int>(std::clamp<int64_t>(ctx - ql + row + 1 - first, 0, n_keys));
      }
      // The first tile fetches the next chunk's keys and values while it scores this one; later
      // tiles of the task find them in cache (prefetching again only costs load slots).
      const int64_t next = first + n_keys;
      if (x0 == 0 && next < keys) {
        const float* kn = base + table[next / bs] * s_blk + layer * s_layer + g * s_head + (next % bs) * D;
        const int64_t lines = std::min<int64_t>({16, bs - next % bs, keys - next}) * D / 16;  // 64-byte lines
        for (int64_t i = 0; i < lines; ++i) {
          _mm_prefetch(reinterpret_cast<const char*>(kn + i * 16), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(kn + s_kv + i * 16), _MM_HINT_T0);
        }
      }
      tile.chunk(kb, kb + s_kv, static_cast<int>(n_keys), visible);
    }
    tile.finish(outs + x0);
  }
}

using Avx512Task = void (*)(int64_t, int64_t, const float*, int64_t, int64_t, int64_t, const float*, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t, const int32_t*, float* const*);

// Tiles as tall as the task's query vectors, up to what the registers hold (RT x NV accumulators):
// a decode of a 3-head group runs 3-row tiles, not 4-row ones with a wasted row. The tile height
// never changes a row's arithmetic.
inline Avx512Task pick_avx512(int64_t D, int64_t R) {
  if (D == 128) return R >= 2 ? attend_one_avx512<8, 2> : attend_one_avx512<8, 1>;
  switch (std::min<int64_t>(R, 4)) {
    case 1: return attend_one_avx512<4, 1>;
    case 2: return attend_one_avx512<4, 2>;
    case 3: return attend_one_avx512<4, 3>;
    default: return attend_one_avx512<4, 4>;
  }
}
#endif

// One (request, kv head, run of query rows) of the call. A run of rows [lo, hi) of a request with
// q_len rows and ctx keys is itself a request: hi - lo rows whose context ends at ctx - q_len + hi,
// so splitting a long prefill into runs changes no row's keys, order or arithmetic.
struct Task {
  int64_t b, g, q0, ql, ctx;
};

// Query rows per task: a long prefill is split so that both threads of a lone prefill have work.
constexpr int64_t ROWS_PER_TASK = 32;

template <typename scalar_t, typename qscalar_t>
void attend_one(const Task& t, const at::Tensor& q, const at::Tensor& pool, int64_t layer,
                const int32_t* tables, int64_t max_blocks, float scale, qscalar_t* out) {
  const int64_t heads = q.size(0), D = q.size(2);
  const int64_t kv_heads = pool.size(3), bs = pool.size(4);
  const int64_t group = heads / kv_heads;
  const int64_t q0 = t.q0, ql = t.ql, ctx = t.ctx;
  const int64_t R = ql * group;  // query vectors of this task: row-major (row, head in group)
  if (R == 0) return;
  const int64_t sq_h = q.stride(0), sq_t = q.stride(1), sq_d = q.stride(2);
  const qscalar_t* qd = q.data_ptr<qscalar_t>();
  thread_local std::vector<float> qv;  // per thread, grown once: no allocation per task
  qv.resize(R * D);
  for (int64_t r = 0; r < ql; ++r)
    for (int64_t j = 0; j < group; ++j) {
      const qscalar_t* src = qd + (t.g * group + j) * sq_h + (q0 + r) * sq_t;
      float* dst = qv.data() + (r * group + j) * D;
      for (int64_t i = 0; i < D; ++i) dst[i] = to_f(src[i * sq_d]) * scale;
    }
  const scalar_t* base = pool.data_ptr<scalar_t>();
  const int64_t s_blk = pool.stride(0), s_layer = pool.stride(1), s_kv = pool.stride(2), s_head = pool.stride(3);
  const int32_t* table = tables + t.b * max_blocks;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<qscalar_t, float>) {
    if (D == 64 || D == 128) {
      thread_local std::vector<float*> outs;
      outs.resize(R);
      for (int64_t r = 0; r < ql; ++r)
        for (int64_t j = 0; j < group; ++j) outs[r * group + j] = out + ((q0 + r) * heads + t.g * group + j) * D;
      const auto run = pick_avx512(D, R);
      run(t.b, t.g, qv.data(), ql, group, ctx, base, s_blk, s_layer, s_kv, s_head, layer, bs, table, outs.data());
      return;
    }
  }
#endif
  std::vector<float> s(bs), acc(R * D, 0.f), m(R, -std::numeric_limits<float>::infinity()), l(R, 0.f);
  const int64_t n_blocks = (ctx + bs - 1) / bs;
  for (int64_t bi = 0; bi < n_blocks; ++bi) {
    const scalar_t* kb = base + table[bi] * s_blk + layer * s_layer + t.g * s_head;
    const scalar_t* vb = kb + s_kv;
    const int64_t first = bi * bs;
    for (int64_t r = 0; r < ql; ++r) {
      const int64_t visible = std::min<int64_t>(bs, ctx - ql + r + 1 - first);  // keys of this block it sees
      if (visible <= 0) continue;
      for (int64_t j = 0; j < group; ++j) {
        const int64_t x = r * group + j;
        const float* qx = qv.data() + x * D;
        float mb = -std::numeric_limits<float>::infinity();
        for (int64_t k = 0; k < visible; ++k) {
          s[k] = dot(qx, kb + k * D, D);
          mb = std::max(mb, s[k]);
        }
        float* ax = acc.data() + x * D;
        const float m_new = std::max(m[x], mb);
        const float alpha = std::exp(m[x] - m_new);  // 0 on the first block (m = -inf)
        if (alpha != 1.f) {
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) ax[i] *= alpha;
          l[x] *= alpha;
        }
        for (int64_t k = 0; k < visible; ++k) {
          const float p = std::exp(s[k] - m_new);
          l[x] += p;
          axpy(ax, p, vb + k * D, D);
        }
        m[x] = m_new;
      }
    }
  }
  for (int64_t r = 0; r < ql; ++r)
    for (int64_t j = 0; j < group; ++j) {
      const int64_t x = r * group + j;
      qscalar_t* dst = out + ((q0 + r) * heads + t.g * group + j) * D;
      const float inv = 1.f / l[x];
      for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<qscalar_t>(acc[x * D + i] * inv);
    }
}

void paged_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& pool, int64_t layer,
                     const at::Tensor& block_tables, const at::Tensor& ctx_lens, const at::Tensor& q_starts,
                     const at::Tensor& q_lens, double scale) {
  TORCH_CHECK(pool.is_contiguous() && out.is_contiguous(), "pool and out must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && ctx_lens.scalar_type() == at::kInt &&
                  q_starts.scalar_type() == at::kInt && q_lens.scalar_type() == at::kInt,
              "block tables, context lengths, query starts and query lengths must be int32");
  TORCH_CHECK(block_tables.is_contiguous() && ctx_lens.is_contiguous() && q_starts.is_contiguous() &&
                  q_lens.is_contiguous(),
              "block tables, context lengths, query starts and query lengths must be contiguous");
  TORCH_CHECK(q.size(0) % pool.size(3) == 0, "query heads must be a multiple of kv heads");
  const int64_t B = ctx_lens.size(0), kv_heads = pool.size(3), max_blocks = block_tables.size(1);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = ctx_lens.data_ptr<int32_t>();
  const int32_t* starts = q_starts.data_ptr<int32_t>();
  const int32_t* qlens = q_lens.data_ptr<int32_t>();
  std::vector<Task> tasks;
  tasks.reserve(B * kv_heads);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t lo = 0; lo < qlens[b]; lo += ROWS_PER_TASK) {
      const int64_t hi = std::min<int64_t>(qlens[b], lo + ROWS_PER_TASK);
      for (int64_t g = 0; g < kv_heads; ++g) tasks.push_back({b, g, starts[b] + lo, hi - lo, lens[b] - qlens[b] + hi});
    }
  // Threads take tasks one at a time, the most work first (a long prefill's runs before short
  // decodes), so neither thread is left with a big task at the end. Decodes go by (kv head, first
  // block): requests that share a prefix run back to back, reading its blocks from cache. The order
  // of tasks never changes a row's arithmetic (each task writes only its own rows).
  auto key = [&](const Task& t) {
    return std::make_tuple(t.ql <= 1, -t.ql * t.ctx, t.g, t.ctx > 0 ? tables[t.b * max_blocks] : -1);
  };
  std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& c) { return key(a) < key(c); });
  const int64_t n = static_cast<int64_t>(tasks.size());
  std::atomic<int64_t> next{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pool.scalar_type(), "paged_attention", [&] {
    using pool_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention_q", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
        for (int64_t i; (i = next.fetch_add(1)) < n;)
          attend_one<pool_t, scalar_t>(tasks[i], q, pool, layer, tables, max_blocks, static_cast<float>(scale), o);
      });
    });
  });
}

// Write the new tokens' keys and values into their pool slots: slots[t] = block * block_size + offset.
// k, v: [kv_heads, T, head_dim] (any strides).
void write_kv(const at::Tensor& pool, int64_t layer, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slots) {
  TORCH_CHECK(pool.is_contiguous(), "pool must be contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong, "slots must be int64");
  const int64_t T = slots.size(0), kv_heads = pool.size(3), bs = pool.size(4), D = pool.size(5);
  const int64_t* sl = slots.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pool.scalar_type(), "write_kv", [&] {
    using pool_t = scalar_t;
    pool_t* base = pool.data_ptr<pool_t>();
    const int64_t s_blk = pool.stride(0), s_layer = pool.stride(1), s_kv = pool.stride(2), s_head = pool.stride(3);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "write_kv_src", [&] {
      const scalar_t* kd = k.data_ptr<scalar_t>();
      const scalar_t* vd = v.data_ptr<scalar_t>();
      for (int64_t t = 0; t < T; ++t) {
        const int64_t blk = sl[t] / bs, off = sl[t] % bs;
        for (int64_t h = 0; h < kv_heads; ++h) {
          pool_t* dk = base + blk * s_blk + layer * s_layer + h * s_head + off * D;
          pool_t* dv = dk + s_kv;
          const scalar_t* sk = kd + h * k.stride(0) + t * k.stride(1);
          const scalar_t* sv = vd + h * v.stride(0) + t * v.stride(1);
          if constexpr (std::is_same_v<pool_t, scalar_t>) {
            if (k.stride(2) == 1 && v.stride(2) == 1) {  // the model's layout: one row copy each
              std::memcpy(dk, sk, D * sizeof(pool_t));
              std::memcpy(dv, sv, D * sizeof(pool_t));
              continue;
            }
          }
          for (int64_t i = 0; i < D; ++i) {
            dk[i] = static_cast<pool_t>(sk[i * k.stride(2)]);
            dv[i] = static_cast<pool_t>(sv[i * v.stride(2)]);
          }
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY(prefixcache, m) {
  m.def("paged_attention(Tensor(a!) out, Tensor q, Tensor pool, int layer, Tensor block_tables, Tensor ctx_lens, "
        "Tensor q_starts, Tensor q_lens, float scale) -> ()");
  m.def("write_kv(Tensor(a!) pool, int layer, Tensor k, Tensor v, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(prefixcache, CPU, m) {
  m.impl("paged_attention", paged_attention);
  m.impl("write_kv", write_kv);
}
