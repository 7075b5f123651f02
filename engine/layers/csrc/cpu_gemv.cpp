// fp32 GEMV for decode steps on x86 CPUs with AVX2 + FMA: out[r, n] = x[r, :] . w[n, :] (+ b[n])
// for the few rows of x a decode step has, w in the engine's [out, in] row-major layout. See
// engine/layers/cpu_kernels.py for why it exists and when it runs.
//
// A decode step reads every weight once and does a few FMAs per weight, so it is bound by
// how fast the cores stream the weights from DRAM. Each thread owns a contiguous range of
// output rows and walks it once: a tile of NB weight rows x R input rows is accumulated in
// NB * R AVX registers while each 8-float slice of a weight row is loaded once and used R
// times. Several weight rows at a time (NB) keep several streams in flight when R is small.
// The tile's weight slices stay in registers and each input row's slice is loaded next to
// its FMAs: loading all R input slices first needs 17 registers for an 8 x 1 tile, and the
// accumulator the compiler spilled made a 1.3x slower loop. Products of more than 8 rows
// (dense() sends them to oneDNN) go in groups of 8 that take turns on a block of weight
// rows, so the block comes from DRAM once.
// Summation order: 8 lanes over k strided by 8, then the lanes, then a ragged tail of k.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>

#include "avx2.h"

namespace {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kRowsPerTask = 96;  // output rows a parallel task walks
constexpr int64_t kBlockRows = 12;    // weight rows that groups of 8 input rows take turns on

using pdserve_cpu::hsum;

template <int R, int NB>
void tile_rows(const float* x, const float* w, const float* bias, float* out, int64_t K,
               int64_t ldo, int64_t n, int64_t n_end) {
  for (; n + NB <= n_end; n += NB) {
    __m256 acc[NB][R];
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) acc[b][r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      __m256 wv[NB];
      for (int b = 0; b < NB; ++b) wv[b] = _mm256_loadu_ps(w + (n + b) * K + k);
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_loadu_ps(x + r * K + k);
        for (int b = 0; b < NB; ++b) acc[b][r] = _mm256_fmadd_ps(wv[b], xv, acc[b][r]);
      }
    }
    for (int b = 0; b < NB; ++b) {
      const float* wrow = w + (n + b) * K;
      for (int r = 0; r < R; ++r) {
        float s = hsum(acc[b][r]);
        for (int64_t kk = k; kk < K; ++kk) s += wrow[kk] * x[r * K + kk];
        out[r * ldo + n + b] = bias ? s + bias[n + b] : s;
      }
    }
  }
  if constexpr (NB > 1) {
    if (n < n_end) tile_rows<R, 1>(x, w, bias, out, K, ldo, n, n_end);
  }
}

// Tiles that fit AVX2's 16 registers: NB * R accumulators + R inputs + 1 weight slice.
template <int R>
void group_rows(const float* x, const float* w, const float* bias, float* out, int64_t K,
                int64_t ldo, int64_t n, int64_t n_end) {
  constexpr int NB = R <= 2 ? 4 : (R <= 4 ? 2 : 1);
  tile_rows<R, NB>(x, w, bias, out, K, ldo, n, n_end);
}

// out[r, n0:n1] for `rows` (<= kMaxRows) input rows of an [R, N] output.
void row_group(const float* x, const float* w, const float* bias, float* out, int64_t K,
               int64_t N, int64_t rows, int64_t n0, int64_t n1) {
  switch (rows) {
    case 1: group_rows<1>(x, w, bias, out, K, N, n0, n1); break;
    case 2: group_rows<2>(x, w, bias, out, K, N, n0, n1); break;
    case 3: group_rows<3>(x, w, bias, out, K, N, n0, n1); break;
    case 4: group_rows<4>(x, w, bias, out, K, N, n0, n1); break;
    case 5: group_rows<5>(x, w, bias, out, K, N, n0, n1); break;
    case 6: group_rows<6>(x, w, bias, out, K, N, n0, n1); break;
    case 7: group_rows<7>(x, w, bias, out, K, N, n0, n1); break;
    default: group_rows<8>(x, w, bias, out, K, N, n0, n1); break;
  }
}

at::Tensor cpu_gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "cpu_gemv: x and w must be 2-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "cpu_gemv: float32 only");
  TORCH_CHECK(x.size(1) == w.size(1), "cpu_gemv: x has ", x.size(1), " columns, w ", w.size(1));
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "cpu_gemv: contiguous x and w only");
  const float* bias = nullptr;
  if (b.has_value()) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0) && b->scalar_type() == at::kFloat &&
                    b->is_contiguous(),
                "cpu_gemv: bias must be a contiguous float32 vector of w's rows");
    bias = b->data_ptr<float>();
  }
  const int64_t R = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor out = at::empty({R, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    const int64_t end = std::min(N, t1 * kRowsPerTask);
    for (int64_t n = t0 * kRowsPerTask; n < end; n += kBlockRows) {
      const int64_t n1 = std::min(end, n + kBlockRows);
      for (int64_t r0 = 0; r0 < R; r0 += kMaxRows)
        row_group(xp + r0 * K, wp, bias, op + r0 * N, K, N, std::min(kMaxRows, R - r0), n, n1);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(pdserve, m) { m.def("cpu_gemv(Tensor x, Tensor w, Tensor? b) -> Tensor"); }

TORCH_LIBRARY_IMPL(pdserve, CPU, m) { m.impl("cpu_gemv", &cpu_gemv); }
