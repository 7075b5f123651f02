// Causal prefill attention with 16-float vectors, blocked like flash attention: for one kv
// head and a tile of query positions, the G query heads of the head are stacked into one
// matrix of rows (position-major), and the keys are taken 64 at a time: scores by an FMA
// micro-kernel over the transposed keys, an online softmax per row (running max and sum, the
// partial output rescaled when the max grows), then the probabilities times the values.
// Blocks wholly above the diagonal are never visited, and K/V are read once per tile for all
// G heads of the group.
//
// Why: torch's CPU SDPA flash kernel runs ~50 GFLOPS on 64-wide heads on the 2-core AVX-512
// host (docs/benchmarks.md, "Prefill attention on CPU"), a third of what its FMA units give;
// the scores and output here are register-blocked 4 rows x 64 floats.
//
// Numerics: float32; q scaled before the dot products; exp is avx2.h's Cephes expf with
// 16-float vectors (within ~2 ulp); normalised once at the end (SDPA's flash kernel does
// the same). Masked keys get probability exactly 0.
//
// Built for AVX-512 by the target pragma below, like codes_avx512.cpp: no torch header, no
// std template instantiated inside the pragma.
#include "attention_avx512.h"

#include <immintrin.h>

#include <math.h>

#include <cstdint>

namespace pdserve_cpu {

namespace {

constexpr int64_t kRows = 4;  // query rows a micro-kernel holds in registers

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

}  // namespace

int64_t prefill_tile_scratch(int64_t positions, int64_t G, int64_t D) {
  const int64_t rows = round_up(positions * G, kRows);
  return rows * (2 * D + kPrefillKeyBlock + 3);
}

}  // namespace pdserve_cpu

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")

namespace pdserve_cpu {

namespace {

constexpr int64_t KB = kPrefillKeyBlock;

inline float max16(__m512 v) { return _mm512_reduce_max_ps(v); }
inline float sum16(__m512 v) { return _mm512_reduce_add_ps(v); }

// The lanes of a 16-key vector a row sees when `left` keys of it (or more) are visible.
inline __mmask16 first_lanes(int64_t left) {
  return left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
}

// exp(x) for 16 floats: avx2.h's exp8 (Cephes' expf) with 16-float vectors.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  __m512 n = _mm512_roundscale_ps(
      _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

// s[r][0..64) = q[r] . kt[:, k0..k0+64) for rows r..r+4: 16 accumulators, per head dim 4
// key vectors and 4 broadcasts.
inline void scores_4x64(const float* q, int64_t D, const float* kt, int64_t ldk, float* s) {
  __m512 a[kRows][4];
  for (int i = 0; i < kRows; ++i)
    for (int c = 0; c < 4; ++c) a[i][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const float* k = kt + d * ldk;
    const __m512 k0 = _mm512_loadu_ps(k), k1 = _mm512_loadu_ps(k + 16),
                 k2 = _mm512_loadu_ps(k + 32), k3 = _mm512_loadu_ps(k + 48);
    for (int i = 0; i < kRows; ++i) {
      const __m512 qb = _mm512_set1_ps(q[i * D + d]);
      a[i][0] = _mm512_fmadd_ps(qb, k0, a[i][0]);
      a[i][1] = _mm512_fmadd_ps(qb, k1, a[i][1]);
      a[i][2] = _mm512_fmadd_ps(qb, k2, a[i][2]);
      a[i][3] = _mm512_fmadd_ps(qb, k3, a[i][3]);
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + i * KB + 16 * c, a[i][c]);
}

// o[r][c0..c0+16*NV) = alpha[r] * o[r] + sum_j p[r][j] * v[j] for rows r..r+4, j < n.
template <int NV>
inline void values_4(const float* p, const float* v, int64_t D, int64_t n, const float* alpha,
                     float* o) {
  __m512 a[kRows][NV];
  for (int i = 0; i < kRows; ++i) {
    const __m512 al = _mm512_set1_ps(alpha[i]);
    for (int c = 0; c < NV; ++c)
      a[i][c] = _mm512_mul_ps(_mm512_loadu_ps(o + i * D + 16 * c), al);
  }
  for (int64_t j = 0; j < n; ++j) {
    __m512 vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_ps(v + j * D + 16 * c);
    for (int i = 0; i < kRows; ++i) {
      const __m512 pb = _mm512_set1_ps(p[i * KB + j]);
      for (int c = 0; c < NV; ++c) a[i][c] = _mm512_fmadd_ps(pb, vv[c], a[i][c]);
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + i * D + 16 * c, a[i][c]);
}

inline void values_4_chunk(int nv, const float* p, const float* v, int64_t D, int64_t n,
                           const float* alpha, float* o) {
  switch (nv) {
    case 1: values_4<1>(p, v, D, n, alpha, o); break;
    case 2: values_4<2>(p, v, D, n, alpha, o); break;
    case 3: values_4<3>(p, v, D, n, alpha, o); break;
    default: values_4<4>(p, v, D, n, alpha, o); break;
  }
}

}  // namespace

void prefill_attention_tile_avx512(const PrefillTile& t, int64_t q0, int64_t q1) {
  const int64_t G = t.G, D = t.D, nq = q1 - q0;
  const int64_t R = nq * G, Rp = (R + kRows - 1) / kRows * kRows;
  float* qs = t.scratch;          // [Rp][D], row r = position r / G, head r % G; scaled
  float* s = qs + Rp * D;         // [Rp][KB] scores, then probabilities
  float* o = s + Rp * KB;         // [Rp][D] the unnormalised output
  float* m = o + Rp * D;          // [Rp] running max
  float* l = m + Rp;              // [Rp] running sum
  float* alpha = l + Rp;          // [Rp] this block's rescale of the output
  const __m512 sc = _mm512_set1_ps(t.scale);
  for (int64_t r = 0; r < Rp; ++r) {
    float* dst = qs + r * D;
    if (r < R) {
      const float* src = t.q + (q0 + r / G) * t.q_tok + (t.head0 + r % G) * t.q_head;
      for (int64_t d = 0; d < D; d += 16)
        _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_loadu_ps(src + d), sc));
    } else {
      for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, _mm512_setzero_ps());
    }
    for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + r * D + d, _mm512_setzero_ps());
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  const float neg_inf = -INFINITY;
  const int64_t first_pos = t.ctx + q0, end = t.ctx + q1;  // keys [0, end) are seen
  for (int64_t k0 = 0; k0 < end; k0 += KB) {
    for (int64_t r = 0; r < Rp; r += kRows)
      scores_4x64(qs + r * D, D, t.kt + k0, t.ldk, s + r * KB);
    // The keys a row sees in this block: up to its position (padding rows: the last one's).
    int64_t block_n = 0;  // keys of the block any row sees
    for (int64_t r = 0; r < Rp; ++r) {
      const int64_t pos = first_pos + (r < R ? r / G : nq - 1);
      const int64_t n = pos - k0 + 1 < KB ? pos - k0 + 1 : KB;
      float* sr = s + r * KB;
      if (n <= 0) {  // the whole block is after this row's position
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(sr + 16 * c, _mm512_setzero_ps());
        alpha[r] = 1.f;
        continue;
      }
      block_n = n > block_n ? n : block_n;
      __m512 v[4];
      __m512 mx = _mm512_set1_ps(neg_inf);
      for (int c = 0; c < 4; ++c) {
        v[c] = _mm512_mask_loadu_ps(_mm512_set1_ps(neg_inf), first_lanes(n - 16 * c),
                                    sr + 16 * c);
        mx = _mm512_max_ps(mx, v[c]);
      }
      const float m_new = fmaxf(m[r], max16(mx));
      alpha[r] = m[r] == neg_inf ? 0.f : expf(m[r] - m_new);
      m[r] = m_new;
      const __m512 mv = _mm512_set1_ps(m_new);
      __m512 sum = _mm512_setzero_ps();
      for (int c = 0; c < 4; ++c) {
        const __m512 e =
            _mm512_maskz_mov_ps(first_lanes(n - 16 * c), exp16(_mm512_sub_ps(v[c], mv)));
        _mm512_storeu_ps(sr + 16 * c, e);
        sum = _mm512_add_ps(sum, e);
      }
      l[r] = l[r] * alpha[r] + sum16(sum);
    }
    const float* vb = t.v + k0 * D;
    for (int64_t r = 0; r < Rp; r += kRows)
      for (int64_t c0 = 0; c0 < D; c0 += 64) {
        const int64_t nv = (D - c0) / 16 < 4 ? (D - c0) / 16 : 4;
        values_4_chunk(static_cast<int>(nv), s + r * KB, vb + c0, D, block_n, alpha + r,
                       o + r * D + c0);
      }
  }
  for (int64_t r = 0; r < R; ++r) {
    float* dst = t.out + (q0 + r / G) * t.o_tok + (t.head0 + r % G) * t.o_head;
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    for (int64_t d = 0; d < D; d += 16)
      _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_loadu_ps(o + r * D + d), inv));
  }
}

}  // namespace pdserve_cpu

#pragma GCC pop_options
