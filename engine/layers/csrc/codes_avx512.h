// AVX-512 twins of the products over block codes (codes.h), in codes_avx512.cpp: the only
// file of the library built for AVX-512, called by cpu_gemv_codes.cpp and cpu_gemm_codes.cpp
// when the host has it (`avx512_on`). Plain pointers here: that file includes no torch header
// and instantiates no std template inside its AVX-512 region, so nothing built for AVX-512
// can stand in for a function an AVX2-only host runs (the linker keeps one copy of each
// inline function).
#pragma once

#include <cstdint>

namespace pdserve_cpu {

// Whether the products over codes take the AVX-512 path: the host has AVX-512 F and BW,
// and `set_avx512` has not turned it off (for A/B runs and tests).
bool avx512_on();
// Turn the AVX-512 path on (where the host has it) or off; returns whether it now runs.
bool set_avx512(bool on);

// cpu_gemv_codes.cpp's `group`: output rows n0..n1 for `rows` (1..8) input rows x [rows, K].
void gemv_codes_group_avx512(bool q4, int64_t rows, const float* x, const float* d,
                             const float* m, const uint8_t* codes, const float* bias,
                             float* out, int64_t K, int64_t ldo, int64_t n0, int64_t n1);

// cpu_gemm_codes.cpp's `decode_rows`: weight rows n0..n0+rows as float32 into buf [rows, K].
void gemm_decode_rows_avx512(bool q4, const float* d, const float* m, const uint8_t* codes,
                             int64_t K, int64_t n0, int64_t rows, float* buf);

// cpu_gemm_codes.cpp's `block_product`: all M input rows against w [rows, K], K summed in
// chunks of at most `max_chunk`; out points at the block's first column.
void gemm_block_product_avx512(const float* x, int64_t M, const float* w, int64_t K,
                               int64_t rows, float* out, int64_t ldo, const float* bias,
                               int64_t max_chunk);

// codes_lanes_avx512.cpp: out [rows, N] = x [rows, K] times the weight packed in the
// "lanes" layout (scales d, offsets m, codes; see that file), output tiles g0..g1 of 16
// rows; `xsum` [rows, K / 32] the per-block sums of x (q4; nullptr for q8).
void gemv_lanes_avx512(bool q4, int64_t rows, const float* x, const float* xsum,
                       const float* d, const float* m, const uint8_t* codes,
                       const float* bias, float* out, int64_t K, int64_t N, int64_t g0,
                       int64_t g1);

}  // namespace pdserve_cpu
