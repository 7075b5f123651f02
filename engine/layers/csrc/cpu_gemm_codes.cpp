// The prefill-sized product over weights held as block codes (codes.h): out[r, n] =
// x[r, :] . w[n, :] (+ b[n]) for more rows than the decode GEMV (cpu_gemv_codes.cpp) takes.
//
// Past ~16 rows a product is bound by FMAs, not by the bytes of its weight, so each weight is
// rebuilt once per call, not once per tile of rows: a task decodes a block of kWRows weight
// rows into a float32 buffer (L2-sized) and every group of kR input rows runs over it in
// register tiles of kR input rows x kNB weight rows (12 accumulators, 3 weight slices, 1
// input slice: 16 AVX registers, 7 loads per 12 FMAs), summing along K as the GEMV does,
// in chunks of K short enough that a tile's input rows stay in L1 while its weight rows come
// from the L2 buffer. On SmolLM2-135M's shapes, one thread, quiet host: level with oneDNN's
// float32 matmul (0.94-1.01x at 17-512 rows; docs/benchmarks.md, "Round 3: prefill over the
// block codes"). What it brings is no packed float32 copy of the weight, and rows that do not
// depend on their batch: the weights are the loader's float32 values bit for bit, so the
// product differs from oneDNN's only in the order of its sums, and each output's sum runs in
// the same order whatever the number of rows or threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "avx2.h"
#include "codes.h"
#include "codes_avx512.h"
#include "codes_operands.h"

namespace {

using pdserve_cpu::Code;
using pdserve_cpu::code_bytes;
using pdserve_cpu::kCodeBlock;

// Tuned on the 2-core Zen 3 CI host with SmolLM2-135M's shapes at 17-512 rows (24 and 72-96
// weight rows, chunks of 512 and none were slower on some shape).
constexpr int64_t kWRows = 48;        // weight rows a task decodes at once (<= 288 KB)
constexpr int64_t kMaxChunk = 768;    // K past this is summed in chunks
constexpr int kR = 4;           // input rows of a register tile
constexpr int kNB = 3;          // weight rows of a register tile

// Rows n0..n0+rows of the weight as float32 into buf [rows, K].
template <Code C>
void decode_rows(const float* d, const float* m, const uint8_t* codes, int64_t K, int64_t n0,
                 int64_t rows, float* buf) {
  const int64_t blocks = K / kCodeBlock, row_bytes = blocks * code_bytes<C>();
  for (int64_t j = 0; j < rows; ++j) {
    const int64_t n = n0 + j;
    float* dst = buf + j * K;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const __m256 dv = _mm256_set1_ps(d[n * blocks + blk]);
      const __m256 mv = C == Code::q4 ? _mm256_set1_ps(m[n * blocks + blk]) : dv;
      const uint8_t* c = codes + n * row_bytes + blk * code_bytes<C>();
      for (int s = 0; s < 4; ++s)
        _mm256_storeu_ps(dst + blk * kCodeBlock + s * 8, pdserve_cpu::weights8<C>(c, s, dv, mv));
    }
  }
}

// out[r, b] (+)= x[r, k0:k1] . w[b, k0:k1] for R input rows (stride K) x NB weight rows
// (stride K); `add`: onto what a former chunk of K left there.
template <int R, int NB>
inline void tile(const float* x, const float* w, int64_t K, int64_t k0, int64_t k1,
                 float* out, int64_t ldo, const float* bias, bool add) {
  __m256 acc[NB][R];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; k += 8) {
    __m256 wv[NB];
    for (int b = 0; b < NB; ++b) wv[b] = _mm256_loadu_ps(w + b * K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int b = 0; b < NB; ++b) acc[b][r] = _mm256_fmadd_ps(wv[b], xv, acc[b][r]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) {
      const float s = pdserve_cpu::hsum(acc[b][r]);
      float& o = out[r * ldo + b];
      o = add ? o + s : (bias ? s + bias[b] : s);
    }
}

template <int R>
void tiles_of_rows(const float* x, const float* w, int64_t K, int64_t k0, int64_t k1,
                   int64_t rows, float* out, int64_t ldo, const float* bias, bool add) {
  int64_t b = 0;
  for (; b + kNB <= rows; b += kNB)
    tile<R, kNB>(x, w + b * K, K, k0, k1, out + b, ldo, bias ? bias + b : nullptr, add);
  for (; b < rows; ++b)
    tile<R, 1>(x, w + b * K, K, k0, k1, out + b, ldo, bias ? bias + b : nullptr, add);
}

// All M input rows against `rows` weight rows w [rows, K]; out points at column n0. K is
// summed in chunks of at most kMaxChunk so that a tile's input and weight rows stay in L1.
void block_product(const float* x, int64_t M, const float* w, int64_t K, int64_t rows,
                   float* out, int64_t ldo, const float* bias) {
  const int64_t chunks = (K + kMaxChunk - 1) / kMaxChunk;
  const int64_t step = (K / 8 + chunks - 1) / chunks * 8;
  for (int64_t k0 = 0; k0 < K; k0 += step) {
    const int64_t k1 = std::min(K, k0 + step);
    const bool add = k0 > 0;
    int64_t r = 0;
    for (; r + kR <= M; r += kR)
      tiles_of_rows<kR>(x + r * K, w, K, k0, k1, rows, out + r * ldo, ldo, bias, add);
    switch (M - r) {
      case 3: tiles_of_rows<3>(x + r * K, w, K, k0, k1, rows, out + r * ldo, ldo, bias, add); break;
      case 2: tiles_of_rows<2>(x + r * K, w, K, k0, k1, rows, out + r * ldo, ldo, bias, add); break;
      case 1: tiles_of_rows<1>(x + r * K, w, K, k0, k1, rows, out + r * ldo, ldo, bias, add); break;
      default: break;
    }
  }
}

template <Code C>
void run(int64_t M, const float* x, const float* d, const float* m, const uint8_t* codes,
         const float* bias, float* out, int64_t N, int64_t K) {
  const int64_t tasks = (N + kWRows - 1) / kWRows;
  const bool wide = pdserve_cpu::avx512_on();
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(kWRows * K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kWRows, rows = std::min(kWRows, N - n0);
      const float* b = bias ? bias + n0 : nullptr;
      if (wide) {
        pdserve_cpu::gemm_decode_rows_avx512(C == Code::q4, d, m, codes, K, n0, rows,
                                             buf.data());
        pdserve_cpu::gemm_block_product_avx512(x, M, buf.data(), K, rows, out + n0, N, b,
                                               kMaxChunk);
      } else {
        decode_rows<C>(d, m, codes, K, n0, rows, buf.data());
        block_product(x, M, buf.data(), K, rows, out + n0, N, b);
      }
    }
  });
}

// x [M, K] float32, scales [N, K / 32] float32, offsets the same (q4) or empty (q8), codes
// uint8 [N, K / 2] (q4) or int8 [N, K] (q8).
at::Tensor cpu_gemm_codes(const at::Tensor& x, const at::Tensor& scales,
                          const at::Tensor& offsets, const at::Tensor& codes,
                          const c10::optional<at::Tensor>& b) {
  const auto ops =
      pdserve_cpu::check_codes_operands("cpu_gemm_codes", x, scales, offsets, codes, b);
  const int64_t M = ops.M, K = ops.K, N = ops.N;
  const bool q4 = ops.q4;
  const float* bias = ops.bias;
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const uint8_t* cp = static_cast<const uint8_t*>(codes.data_ptr());
  if (q4)
    run<Code::q4>(M, x.data_ptr<float>(), scales.data_ptr<float>(), offsets.data_ptr<float>(),
                  cp, bias, out.data_ptr<float>(), N, K);
  else
    run<Code::q8>(M, x.data_ptr<float>(), scales.data_ptr<float>(), nullptr, cp, bias,
                  out.data_ptr<float>(), N, K);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("cpu_gemm_codes(Tensor x, Tensor scales, Tensor offsets, Tensor codes, Tensor? b) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) { m.impl("cpu_gemm_codes", &cpu_gemm_codes); }
