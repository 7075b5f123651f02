// The decode GEMV over block codes (codes.h) with the 16 lanes of a vector on 16 output rows,
// for hosts with AVX-512: the weights of a tile of 16 output rows are packed at load so that
// 16 bytes hold one column k of all 16 rows ("lanes" layout, weight_codes.py `to_lanes`).
//
// Why: the row-major kernel (codes_avx512.cpp) rebuilds every 16 weights of a row as
// floats (extend, shift/mask, convert, scale, offset: ~5 vector instructions) before its R
// FMAs, and with 1..16 input rows those instructions, not DRAM, bound a step (~50% of FMA
// peak at 8-16 rows). Here a block's scale and offset are taken out of the inner loop:
//   x . w over a block = d * (x . q) + m * sum(x),
// so each column of codes is extended and converted once (2 instructions; q4: 2.5) and
// meets each input row in one FMA whose x operand is broadcast from memory. The per-block
// sums of x come with the call (`xsum`, q4 only). The weights are the same codes; the sums
// are grouped per block, so results differ from the float32 product only in rounding
// (~1e-6 relative), and each output is summed in one order whatever the number of input
// rows or threads (rows of a tile are independent; a tile covers whole blocks).
//
// Layout (G = ceil(N / 16) tiles of output rows, B = K / 32 blocks; rows past N are zeros):
//   d, m  [G, B, 16] float32: the scale / offset of row 16 g + lane in block b;
//   q8    [G, B, 32, 16] int8: byte (k, lane) is the code of column 32 b + k;
//   q4    [G, B, 16, 16] uint8: byte (j, lane) holds column 32 b + j in its low nibble and
//         32 b + j + 16 in its high one (GGUF's own pairing within a block).
//
// Only this file (and codes_avx512.cpp) is built for AVX-512; plain pointers, no torch
// header, no std template inside the pragma (see codes_avx512.h).
#include <immintrin.h>

#include <cstdint>

#include "codes_avx512.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")

namespace pdserve_cpu {

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 32;

// R input rows against tile g: out[r, 16 g + i] for every i < `valid`. One tile at a time:
// walking 2-8 tiles side by side (more FMA chains for a few rows) measured slower, its
// several streams of codes at once (1 row: 7.7-9.0 ms a pass of SmolLM2's weights against
// 5.2, ad hoc, 2026-12-05).
template <bool Q4, int R>
void lanes_tile(const float* x, const float* xsum, const float* d, const float* m,
                const uint8_t* codes, const float* bias, float* out, int64_t K, int64_t ldo,
                int64_t g, int64_t valid) {
  const int64_t blocks = K / kBlock;
  const int64_t tile_bytes = Q4 ? kBlock / 2 * kLanes : kBlock * kLanes;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* c = codes + (g * blocks + b) * tile_bytes;
    const float* xb = x + b * kBlock;
    // Two partial sums a row: columns j and j + 16 of the block (q4's two nibbles of a
    // byte), so two FMA chains run side by side even for one input row.
    __m512 t[R], u[R];
    for (int r = 0; r < R; ++r) t[r] = u[r] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int j = 0; j < kBlock / 2; ++j) {
      __m512 lo, hi;
      if constexpr (Q4) {
        const __m512i raw = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j * kLanes)));
        lo = _mm512_cvtepi32_ps(_mm512_and_si512(raw, _mm512_set1_epi32(0xF)));
        hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(raw, 4));
      } else {
        lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j * kLanes))));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + (j + kBlock / 2) * kLanes))));
      }
      for (int r = 0; r < R; ++r) t[r] = _mm512_fmadd_ps(lo, _mm512_set1_ps(xb[r * K + j]), t[r]);
      for (int r = 0; r < R; ++r)
        u[r] = _mm512_fmadd_ps(hi, _mm512_set1_ps(xb[r * K + j + kBlock / 2]), u[r]);
    }
    const __m512 dv = _mm512_loadu_ps(d + (g * blocks + b) * kLanes);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(dv, _mm512_add_ps(t[r], u[r]), acc[r]);
    if constexpr (Q4) {
      const __m512 mv = _mm512_loadu_ps(m + (g * blocks + b) * kLanes);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum[r * blocks + b]), acc[r]);
    }
  }
  const __mmask16 keep = valid >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(keep, bias + g * kLanes) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r)
    _mm512_mask_storeu_ps(out + r * ldo + g * kLanes, keep, _mm512_add_ps(acc[r], bv));
}

// Tiles g0 .. g1 for R input rows. Registers: 3 R sums + 2 columns of codes: 26 of 32 at 8.
template <bool Q4, int R>
void lanes_walk(const float* x, const float* xsum, const float* d, const float* m,
                const uint8_t* codes, const float* bias, float* out, int64_t K, int64_t N,
                int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g)
    lanes_tile<Q4, R>(x, xsum, d, m, codes, bias, out, K, N, g, N - g * kLanes);
}

template <bool Q4>
void lanes_rows(int64_t rows, const float* x, const float* xsum, const float* d,
                const float* m, const uint8_t* codes, const float* bias, float* out, int64_t K,
                int64_t N, int64_t g0, int64_t g1) {
  switch (rows) {
    case 1: lanes_walk<Q4, 1>(x, xsum, d, m, codes, bias, out, K, N, g0, g1); break;
    case 2: lanes_walk<Q4, 2>(x, xsum, d, m, codes, bias, out, K, N, g0, g1); break;
    case 3: lanes_walk<Q4, 3>(x, xsum, d, m, codes, bias, out, K, N, g0, g1); break;
    case 4: lanes_walk<Q4, 4>(x, xsum, d, m, codes, bias, out, K, N, g0, g1); break;
    case 5: lanes_walk<Q4, 5>(x, xsum, d, m, codes, bias, out, K, N, g0, g1); break;
    case 6: lanes_walk<Q4, 6>(x, xsum, d, m, codes, bias, out, K, N, g0, g1); break;
    case 7: lanes_walk<Q4, 7>(x, xsum, d, m, codes, bias, out, K, N, g0, g1); break;
    default: lanes_walk<Q4, 8>(x, xsum, d, m, codes, bias, out, K, N, g0, g1); break;
  }
}

}  // namespace

void gemv_lanes_avx512(bool q4, int64_t rows, const float* x, const float* xsum,
                       const float* d, const float* m, const uint8_t* codes,
                       const float* bias, float* out, int64_t K, int64_t N, int64_t g0,
                       int64_t g1) {
  // Past 8 input rows, balanced groups take turns on a few tiles at a time: their codes come
  // from DRAM once and from cache for the next group.
  constexpr int64_t kTurn = 8;  // tiles a turn: 64 KB of q8 codes at K = 512
  const int64_t groups = (rows + 7) / 8, blocks = K / kBlock;
  for (int64_t t0 = g0; t0 < g1; t0 += kTurn) {
    const int64_t t1 = t0 + kTurn < g1 ? t0 + kTurn : g1;
    for (int64_t i = 0, r0 = 0; i < groups; ++i) {
      const int64_t r1 = rows * (i + 1) / groups;
      const float* xr = x + r0 * K;
      const float* sr = xsum ? xsum + r0 * blocks : nullptr;
      if (q4)
        lanes_rows<true>(r1 - r0, xr, sr, d, m, codes, bias, out + r0 * N, K, N, t0, t1);
      else
        lanes_rows<false>(r1 - r0, xr, sr, d, m, codes, bias, out + r0 * N, K, N, t0, t1);
      r0 = r1;
    }
  }
}

}  // namespace pdserve_cpu

#pragma GCC pop_options
