// GGUF block codes, shared by the kernels that read weights as codes (cpu_gemv_codes.cpp,
// cpu_gemm_codes.cpp): every 32 consecutive weights of a row are w = d * q + m, with
//   - "q4": q in 0..15, two a byte (byte j of a block: weight j low, weight j + 16 high);
//   - "q8": q in -128..127, one a byte, m = 0.
// engine/layers/weight_codes.py finds them in a float32 weight and keeps them only where they
// give back every weight bit for bit. Built with -ffp-contract=off, (d * q) + m rounds twice,
// exactly as the loader computed the float32 copy.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace pdserve_cpu {

constexpr int64_t kCodeBlock = 32;  // weights a scale (and offset) covers

enum class Code { q4, q8 };

template <Code C>
constexpr int64_t code_bytes() { return C == Code::q4 ? kCodeBlock / 2 : kCodeBlock; }

// Weights 8 * s .. 8 * s + 7 of a block of codes `c` as floats: q, not yet scaled.
template <Code C>
inline __m256 codes8(const uint8_t* c, int s) {
  if constexpr (C == Code::q4) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + (s & 1) * 8));
    __m256i q = _mm256_cvtepu8_epi32(bytes);
    if (s >= 2) q = _mm256_srli_epi32(q, 4);
    return _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(0xF)));
  } else {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + s * 8));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  }
}

// Weights 8 * s .. 8 * s + 7 of a block as the loader's float32 values.
template <Code C>
inline __m256 weights8(const uint8_t* c, int s, __m256 d, __m256 m) {
  const __m256 w = _mm256_mul_ps(d, codes8<C>(c, s));
  if constexpr (C == Code::q4) return _mm256_add_ps(w, m);
  return w;
}

}  // namespace pdserve_cpu
