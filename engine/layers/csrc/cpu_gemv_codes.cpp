// The decode GEMV of cpu_gemv.cpp over weights held as block codes instead of float32:
// out[r, n] = x[r, :] . w[n, :] (+ b[n]) with every 32 consecutive weights of a row given by
// a float32 scale d and offset m and one small integer code q each, w = d * q + m:
//   - "q4": q in 0..15, two a byte (byte j of a block: weight j low, weight j + 16 high);
//   - "q8": q in -128..127, one a byte, m = 0.
// These are GGUF's Q4_1 and Q8_0 blocks; engine/layers/weight_codes.py finds them in a
// float32 weight and keeps them only where they give back every weight bit for bit. A decode
// step is bound by the bytes it streams: 0.625 (q4) or 1.125 (q8) a weight instead of 4.
//
// Each weight is rebuilt exactly as the loader's float32 copy holds it, as (d * q) + m in
// two roundings (built with -ffp-contract=off), so the products differ from the float32 GEMV
// only in the order of their sums. Tiles as in cpu_gemv.cpp: NB weight rows x R input rows,
// the weight slices of a tile decoded once and used by every input row.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "avx2.h"
#include "codes.h"
#include "codes_avx512.h"
#include "codes_operands.h"

namespace {

constexpr int64_t kGroup = 8;         // input rows a tile takes at most
constexpr int64_t kMaxRows = 32;
constexpr int64_t kLanesMaxRows = 64;  // cpu_gemv_lanes (cpu_kernels.LANES_MAX_ROWS)
constexpr int64_t kRowsPerTask = 96;  // output rows a parallel task walks
constexpr int64_t kBlockRows = 12;    // weight rows the groups of input rows take turns on

using pdserve_cpu::Code;
using pdserve_cpu::code_bytes;
using pdserve_cpu::codes8;
constexpr int64_t kBlock = pdserve_cpu::kCodeBlock;

template <Code C, int R, int NB>
void tile_rows(const float* x, const float* d, const float* m, const uint8_t* codes,
               const float* bias, float* out, int64_t K, int64_t ldo, int64_t n,
               int64_t n_end) {
  const int64_t blocks = K / kBlock, row_bytes = blocks * code_bytes<C>();
  for (; n + NB <= n_end; n += NB) {
    __m256 acc[NB][R];
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) acc[b][r] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < blocks; ++blk) {
      __m256 dv[NB], mv[NB];
      for (int b = 0; b < NB; ++b) {
        dv[b] = _mm256_set1_ps(d[(n + b) * blocks + blk]);
        if constexpr (C == Code::q4) mv[b] = _mm256_set1_ps(m[(n + b) * blocks + blk]);
      }
      for (int s = 0; s < 4; ++s) {
        const int64_t k = blk * kBlock + s * 8;
        __m256 wv[NB];
        for (int b = 0; b < NB; ++b) {
          const uint8_t* c = codes + (n + b) * row_bytes + blk * code_bytes<C>();
          wv[b] = _mm256_mul_ps(dv[b], codes8<C>(c, s));
          if constexpr (C == Code::q4) wv[b] = _mm256_add_ps(wv[b], mv[b]);
        }
        for (int r = 0; r < R; ++r) {
          const __m256 xv = _mm256_loadu_ps(x + r * K + k);
          for (int b = 0; b < NB; ++b) acc[b][r] = _mm256_fmadd_ps(wv[b], xv, acc[b][r]);
        }
      }
    }
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) {
        const float s = pdserve_cpu::hsum(acc[b][r]);
        out[r * ldo + n + b] = bias ? s + bias[n + b] : s;
      }
  }
  if constexpr (NB > 1) {
    if (n < n_end) tile_rows<C, R, 1>(x, d, m, codes, bias, out, K, ldo, n, n_end);
  }
}

// Output rows n0..n1 for `rows` (<= kGroup) input rows. Registers: NB * R accumulators +
// NB weight slices (+ NB scales and offsets) + 1 input slice.
template <Code C>
void group(int64_t rows, const float* x, const float* d, const float* m, const uint8_t* codes,
           const float* bias, float* out, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  switch (rows) {
    case 1: tile_rows<C, 1, 3>(x, d, m, codes, bias, out, K, N, n0, n1); break;
    case 2: tile_rows<C, 2, 3>(x, d, m, codes, bias, out, K, N, n0, n1); break;
    case 3: tile_rows<C, 3, 2>(x, d, m, codes, bias, out, K, N, n0, n1); break;
    case 4: tile_rows<C, 4, 2>(x, d, m, codes, bias, out, K, N, n0, n1); break;
    case 5: tile_rows<C, 5, 1>(x, d, m, codes, bias, out, K, N, n0, n1); break;
    case 6: tile_rows<C, 6, 1>(x, d, m, codes, bias, out, K, N, n0, n1); break;
    case 7: tile_rows<C, 7, 1>(x, d, m, codes, bias, out, K, N, n0, n1); break;
    default: tile_rows<C, 8, 1>(x, d, m, codes, bias, out, K, N, n0, n1); break;
  }
}

// Past kGroup input rows, groups of kGroup take turns on a block of kBlockRows weight rows:
// the block's codes come from DRAM once, each group decodes them again from cache.
template <Code C>
void run(int64_t R, const float* x, const float* d, const float* m, const uint8_t* codes,
         const float* bias, float* out, int64_t N, int64_t K) {
  const int64_t tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
  const bool wide = pdserve_cpu::avx512_on();
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    const int64_t end = std::min(N, t1 * kRowsPerTask);
    for (int64_t n = t0 * kRowsPerTask; n < end; n += kBlockRows)
      for (int64_t r0 = 0; r0 < R; r0 += kGroup) {
        const int64_t rows = std::min(kGroup, R - r0), n1 = std::min(end, n + kBlockRows);
        if (wide)
          pdserve_cpu::gemv_codes_group_avx512(C == Code::q4, rows, x + r0 * K, d, m, codes,
                                               bias, out + r0 * N, K, N, n, n1);
        else
          group<C>(rows, x + r0 * K, d, m, codes, bias, out + r0 * N, K, N, n, n1);
      }
  });
}

// x [R, K] float32 (R <= 32), scales [N, K / 32] float32, offsets the same (q4) or empty
// (q8), codes uint8 [N, K / 2] (q4) or int8 [N, K] (q8).
at::Tensor cpu_gemv_codes(const at::Tensor& x, const at::Tensor& scales,
                          const at::Tensor& offsets, const at::Tensor& codes,
                          const c10::optional<at::Tensor>& b) {
  const auto ops =
      pdserve_cpu::check_codes_operands("cpu_gemv_codes", x, scales, offsets, codes, b);
  const int64_t R = ops.M, K = ops.K, N = ops.N;
  const bool q4 = ops.q4;
  const float* bias = ops.bias;
  TORCH_CHECK(R >= 1 && R <= kMaxRows, "cpu_gemv_codes: 1..", kMaxRows, " rows, got ", R);
  at::Tensor out = at::empty({R, N}, x.options());
  const uint8_t* cp = static_cast<const uint8_t*>(codes.data_ptr());
  if (q4)
    run<Code::q4>(R, x.data_ptr<float>(), scales.data_ptr<float>(),
                       offsets.data_ptr<float>(), cp, bias, out.data_ptr<float>(), N, K);
  else
    run<Code::q8>(R, x.data_ptr<float>(), scales.data_ptr<float>(), nullptr, cp, bias,
                       out.data_ptr<float>(), N, K);
  return out;
}

// The same product over the weight packed in the "lanes" layout (codes_lanes_avx512.cpp,
// AVX-512 hosts): x [R, K] float32 (R <= 64); scales and offsets [G, K / 32, 16] float32
// (offsets empty for q8); codes [G, K / 32, 32, 16] int8 (q8) or [G, K / 32, 16, 16] uint8
// (q4); N <= 16 G output rows.
at::Tensor cpu_gemv_lanes(const at::Tensor& x, const at::Tensor& scales,
                          const at::Tensor& offsets, const at::Tensor& codes,
                          const c10::optional<at::Tensor>& b, int64_t N) {
  TORCH_CHECK(pdserve_cpu::avx512_on(), "cpu_gemv_lanes: needs the AVX-512 path");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "cpu_gemv_lanes: contiguous float32 x [R, K]");
  const int64_t R = x.size(0), K = x.size(1), blocks = K / kBlock;
  TORCH_CHECK(R >= 1 && R <= kLanesMaxRows, "cpu_gemv_lanes: 1..", kLanesMaxRows,
              " rows, got ", R);
  TORCH_CHECK(K % kBlock == 0 && K > 0, "cpu_gemv_lanes: K ", K, " is no multiple of 32");
  const bool q4 = codes.scalar_type() == at::kByte;
  const int64_t G = scales.dim() == 3 ? scales.size(0) : -1;
  TORCH_CHECK(scales.dim() == 3 && scales.size(1) == blocks && scales.size(2) == 16 &&
                  scales.scalar_type() == at::kFloat && scales.is_contiguous(),
              "cpu_gemv_lanes: float32 scales [G, K / 32, 16]");
  TORCH_CHECK(N >= 1 && N <= 16 * G && N > 16 * (G - 1), "cpu_gemv_lanes: N ", N,
              " does not fill the ", G, " tiles of 16 rows");
  TORCH_CHECK(codes.dim() == 4 && codes.size(0) == G && codes.size(1) == blocks &&
                  codes.size(3) == 16 && codes.is_contiguous() &&
                  (q4 ? codes.size(2) == 16
                      : codes.scalar_type() == at::kChar && codes.size(2) == 32),
              "cpu_gemv_lanes: codes [G, K / 32, 16 (q4) or 32 (q8), 16]");
  if (q4)
    TORCH_CHECK(offsets.sizes() == scales.sizes() && offsets.is_contiguous() &&
                    offsets.scalar_type() == at::kFloat,
                "cpu_gemv_lanes: q4 codes need float32 offsets shaped like the scales");
  const float* bias = pdserve_cpu::checked_bias("cpu_gemv_lanes", b, N);
  const float* xp = x.data_ptr<float>();
  at::Tensor xsum;  // q4: each block's sum of x, in one order (the offsets multiply it)
  if (q4) {
    xsum = at::empty({R, blocks}, x.options());
    float* s = xsum.data_ptr<float>();
    for (int64_t i = 0; i < R * blocks; ++i) {
      float acc = 0.f;
      for (int64_t k = 0; k < kBlock; ++k) acc += xp[i * kBlock + k];
      s[i] = acc;
    }
  }
  at::Tensor out = at::empty({R, N}, x.options());
  const float* sp = q4 ? xsum.data_ptr<float>() : nullptr;
  const float* mp = q4 ? offsets.data_ptr<float>() : nullptr;
  const uint8_t* cp = static_cast<const uint8_t*>(codes.data_ptr());
  constexpr int64_t kTilesPerTask = 8;  // a whole turn of codes_lanes_avx512.cpp
  at::parallel_for(0, (G + kTilesPerTask - 1) / kTilesPerTask, 1, [&](int64_t t0, int64_t t1) {
    pdserve_cpu::gemv_lanes_avx512(q4, R, xp, sp, scales.data_ptr<float>(), mp, cp, bias,
                                   out.data_ptr<float>(), K, N, t0 * kTilesPerTask,
                                   std::min(G, t1 * kTilesPerTask));
  });
  return out;
}

// The products over codes on AVX-512 (codes_avx512.cpp): mode 1 on where the host has it,
// 0 off, -1 leaves it; returns whether it runs.
bool cpu_codes_avx512(int64_t mode) {
  return mode < 0 ? pdserve_cpu::avx512_on() : pdserve_cpu::set_avx512(mode > 0);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("cpu_gemv_codes(Tensor x, Tensor scales, Tensor offsets, Tensor codes, Tensor? b) "
        "-> Tensor");
  m.def("cpu_gemv_lanes(Tensor x, Tensor scales, Tensor offsets, Tensor codes, Tensor? b, "
        "int N) -> Tensor");
  m.def("cpu_codes_avx512(int mode) -> bool", &cpu_codes_avx512);
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) {
  m.impl("cpu_gemv_codes", &cpu_gemv_codes);
  m.impl("cpu_gemv_lanes", &cpu_gemv_lanes);
}
