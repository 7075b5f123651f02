// The products over block codes (codes.h) with 16-float vectors, for hosts with AVX-512:
// where its units are full width (AMD Zen 5, Intel server cores) a vector instruction does
// twice the work of AVX2's, and both the decode GEMV (bound by rebuilding weights from their
// codes, ~5 instructions a vector) and the prefill GEMM (bound by FMAs) gain from it.
//
// Same algorithms as cpu_gemv_codes.cpp and cpu_gemm_codes.cpp, same weights: each rebuilt as
// (d * q) + m in two roundings (the library is built with -ffp-contract=off), so results differ
// from the AVX2 path's only in the order of their sums; each output is still summed in one
// order whatever the number of rows or threads. A block of 32 codes is two vectors: q4's
// 16 bytes give weights 0..15 in their low nibbles and 16..31 in their high ones.
//
// Only this file is built for AVX-512 (the target pragma below); it includes no torch header
// and instantiates no std template inside the pragma, so the one copy the linker keeps of an
// inline function is never an AVX-512 one that an AVX2 host would then run.
#include "codes_avx512.h"

#include <immintrin.h>

#include <atomic>
#include <cstdint>

namespace pdserve_cpu {

namespace {

bool host_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

std::atomic<bool>& avx512_flag() {
  static std::atomic<bool> on{host_has_avx512()};
  return on;
}

}  // namespace

bool avx512_on() { return avx512_flag().load(std::memory_order_relaxed); }

bool set_avx512(bool on) {
  avx512_flag().store(on && host_has_avx512(), std::memory_order_relaxed);
  return avx512_on();
}

}  // namespace pdserve_cpu

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")

namespace pdserve_cpu {

namespace {

constexpr int64_t kBlock = 32;  // weights a scale (and offset) covers

inline int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }

// Weights 16 * s .. 16 * s + 15 of a block of codes `c` as floats: q, not yet scaled.
template <bool Q4>
inline __m512 codes16(const uint8_t* c, int s) {
  if constexpr (Q4) {
    __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
    if (s) q = _mm512_srli_epi32(q, 4);
    return _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0xF)));
  } else {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + s * 16));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
  }
}

// ---- the decode GEMV: NB weight rows x R input rows a tile ---------------------------------

template <bool Q4, int R, int NB>
void gemv_tiles(const float* x, const float* d, const float* m, const uint8_t* codes,
                const float* bias, float* out, int64_t K, int64_t ldo, int64_t n,
                int64_t n_end) {
  const int64_t blocks = K / kBlock, row_bytes = blocks * (Q4 ? kBlock / 2 : kBlock);
  for (; n + NB <= n_end; n += NB) {
    __m512 acc[NB][R];
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < blocks; ++blk) {
      __m512 dv[NB], mv[NB];
      for (int b = 0; b < NB; ++b) {
        dv[b] = _mm512_set1_ps(d[(n + b) * blocks + blk]);
        if constexpr (Q4) mv[b] = _mm512_set1_ps(m[(n + b) * blocks + blk]);
      }
      for (int s = 0; s < 2; ++s) {
        const int64_t k = blk * kBlock + s * 16;
        __m512 wv[NB];
        for (int b = 0; b < NB; ++b) {
          const uint8_t* c = codes + (n + b) * row_bytes + blk * (Q4 ? kBlock / 2 : kBlock);
          wv[b] = _mm512_mul_ps(dv[b], codes16<Q4>(c, s));
          if constexpr (Q4) wv[b] = _mm512_add_ps(wv[b], mv[b]);
        }
        for (int r = 0; r < R; ++r) {
          const __m512 xv = _mm512_loadu_ps(x + r * K + k);
          for (int b = 0; b < NB; ++b) acc[b][r] = _mm512_fmadd_ps(wv[b], xv, acc[b][r]);
        }
      }
    }
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) {
        const float s = _mm512_reduce_add_ps(acc[b][r]);
        out[r * ldo + n + b] = bias ? s + bias[n + b] : s;
      }
  }
  if constexpr (NB > 1) {
    if (n < n_end) gemv_tiles<Q4, R, 1>(x, d, m, codes, bias, out, K, ldo, n, n_end);
  }
}

// Registers: NB * R accumulators + NB weights, scales and offsets + 1 input: at most 23 of 32.
template <bool Q4>
void gemv_group(int64_t rows, const float* x, const float* d, const float* m,
                const uint8_t* codes, const float* bias, float* out, int64_t K, int64_t ldo,
                int64_t n0, int64_t n1) {
  switch (rows) {
    case 1: gemv_tiles<Q4, 1, 4>(x, d, m, codes, bias, out, K, ldo, n0, n1); break;
    case 2: gemv_tiles<Q4, 2, 4>(x, d, m, codes, bias, out, K, ldo, n0, n1); break;
    case 3: gemv_tiles<Q4, 3, 3>(x, d, m, codes, bias, out, K, ldo, n0, n1); break;
    case 4: gemv_tiles<Q4, 4, 3>(x, d, m, codes, bias, out, K, ldo, n0, n1); break;
    case 5: gemv_tiles<Q4, 5, 2>(x, d, m, codes, bias, out, K, ldo, n0, n1); break;
    case 6: gemv_tiles<Q4, 6, 2>(x, d, m, codes, bias, out, K, ldo, n0, n1); break;
    case 7: gemv_tiles<Q4, 7, 2>(x, d, m, codes, bias, out, K, ldo, n0, n1); break;
    default: gemv_tiles<Q4, 8, 2>(x, d, m, codes, bias, out, K, ldo, n0, n1); break;
  }
}

// ---- the prefill GEMM: weights rebuilt into a float32 block, then register tiles -----------

template <bool Q4>
void decode_rows(const float* d, const float* m, const uint8_t* codes, int64_t K, int64_t n0,
                 int64_t rows, float* buf) {
  const int64_t blocks = K / kBlock, block_bytes = Q4 ? kBlock / 2 : kBlock;
  for (int64_t j = 0; j < rows; ++j) {
    const int64_t n = n0 + j;
    float* dst = buf + j * K;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const __m512 dv = _mm512_set1_ps(d[n * blocks + blk]);
      const uint8_t* c = codes + (n * blocks + blk) * block_bytes;
      for (int s = 0; s < 2; ++s) {
        __m512 w = _mm512_mul_ps(dv, codes16<Q4>(c, s));
        if constexpr (Q4) w = _mm512_add_ps(w, _mm512_set1_ps(m[n * blocks + blk]));
        _mm512_storeu_ps(dst + blk * kBlock + s * 16, w);
      }
    }
  }
}

constexpr int kR = 4;   // input rows of a register tile
constexpr int kNB = 6;  // weight rows: 24 accumulators + 6 weights + 1 input of 32 registers

template <int R, int NB>
inline void gemm_tile(const float* x, const float* w, int64_t K, int64_t k0, int64_t k1,
                      float* out, int64_t ldo, const float* bias, bool add) {
  __m512 acc[NB][R];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; k += 16) {
    __m512 wv[NB];
    for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_ps(w + b * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * K + k);
      for (int b = 0; b < NB; ++b) acc[b][r] = _mm512_fmadd_ps(wv[b], xv, acc[b][r]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) {
      const float s = _mm512_reduce_add_ps(acc[b][r]);
      float& o = out[r * ldo + b];
      o = add ? o + s : (bias ? s + bias[b] : s);
    }
}

template <int R>
void gemm_tiles_of_rows(const float* x, const float* w, int64_t K, int64_t k0, int64_t k1,
                        int64_t rows, float* out, int64_t ldo, const float* bias, bool add) {
  int64_t b = 0;
  for (; b + kNB <= rows; b += kNB)
    gemm_tile<R, kNB>(x, w + b * K, K, k0, k1, out + b, ldo, bias ? bias + b : nullptr, add);
  for (; b < rows; ++b)
    gemm_tile<R, 1>(x, w + b * K, K, k0, k1, out + b, ldo, bias ? bias + b : nullptr, add);
}

}  // namespace

void gemv_codes_group_avx512(bool q4, int64_t rows, const float* x, const float* d,
                             const float* m, const uint8_t* codes, const float* bias,
                             float* out, int64_t K, int64_t ldo, int64_t n0, int64_t n1) {
  if (q4)
    gemv_group<true>(rows, x, d, m, codes, bias, out, K, ldo, n0, n1);
  else
    gemv_group<false>(rows, x, d, m, codes, bias, out, K, ldo, n0, n1);
}

void gemm_decode_rows_avx512(bool q4, const float* d, const float* m, const uint8_t* codes,
                             int64_t K, int64_t n0, int64_t rows, float* buf) {
  if (q4)
    decode_rows<true>(d, m, codes, K, n0, rows, buf);
  else
    decode_rows<false>(d, m, codes, K, n0, rows, buf);
}

void gemm_block_product_avx512(const float* x, int64_t M, const float* w, int64_t K,
                               int64_t rows, float* out, int64_t ldo, const float* bias,
                               int64_t max_chunk) {
  const int64_t chunks = (K + max_chunk - 1) / max_chunk;
  const int64_t step = (K / 16 + chunks - 1) / chunks * 16;  // K is a multiple of 32
  for (int64_t k0 = 0; k0 < K; k0 += step) {
    const int64_t k1 = smaller(K, k0 + step);
    const bool add = k0 > 0;
    int64_t r = 0;
    for (; r + kR <= M; r += kR)
      gemm_tiles_of_rows<kR>(x + r * K, w, K, k0, k1, rows, out + r * ldo, ldo, bias, add);
    const float* xr = x + r * K;
    float* o = out + r * ldo;
    switch (M - r) {
      case 3: gemm_tiles_of_rows<3>(xr, w, K, k0, k1, rows, o, ldo, bias, add); break;
      case 2: gemm_tiles_of_rows<2>(xr, w, K, k0, k1, rows, o, ldo, bias, add); break;
      case 1: gemm_tiles_of_rows<1>(xr, w, K, k0, k1, rows, o, ldo, bias, add); break;
      default: break;
    }
  }
}

}  // namespace pdserve_cpu

#pragma GCC pop_options
