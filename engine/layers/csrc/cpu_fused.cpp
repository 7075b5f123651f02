// The per-token glue between a CPU decode step's matmuls, one op each instead of 5-8 torch
// ops (engine/layers/cpu_kernels.py says why): RMSNorm (optionally after the residual add),
// RoPE of q and k in place, SiLU(gate) * up. float32 only; rows are split over torch's
// threads. Arithmetic follows the torch reference (engine/layers/norm_rope.py, F.silu) op by
// op in float32; built with -ffp-contract=off so no product is fused into an FMA that the
// reference rounds twice. Sums over a row run in another order than torch's reductions.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "avx2.h"

namespace {

using pdserve_cpu::exp8;

// Rows a thread takes at least. Waking a sleeping OpenMP peer (workers wait passively,
// engine/cpu_threads.py) costs tens of microseconds, more than these ops take on one thread
// for a decode step's rows (e.g. ~10 us for RMSNorm over 24 rows): a region is split only
// when each thread gets ~50 us of work. `work_per_row` is a row's cost in RMSNorm floats
// (~0.7 ns each on one core; the vectorised RoPE and SiLU loops do a float in ~1/3-1/4 of
// that), so a decode step's rows run on the calling thread and long prefills still split.
constexpr int64_t kWorkPerThread = 1 << 16;

int64_t row_grain(int64_t work_per_row) {
  return std::max<int64_t>(8, kWorkPerThread / std::max<int64_t>(1, work_per_row));
}

void check_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, what,
              ": a 2-D float32 tensor with contiguous rows");
}

void norm_row(const float* x, const float* w, float* out, int64_t n, double eps) {
  float sq = 0.f;
  for (int64_t i = 0; i < n; ++i) sq += x[i] * x[i];
  // torch: x * rsqrt(mean(x^2) + eps), the mean and the sum in float32.
  const float inv = 1.f / std::sqrt(sq / static_cast<float>(n) + static_cast<float>(eps));
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_rows(x, "rms_norm x");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.scalar_type() == at::kFloat &&
                  w.is_contiguous(), "rms_norm: weight must match x's columns");
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.size(1), sx = x.stride(0);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), row_grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) norm_row(xp + r * sx, wp, op + r * n, n, eps);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& res,
                                                const at::Tensor& w, double eps) {
  check_rows(x, "add_rms_norm x");
  check_rows(res, "add_rms_norm residual");
  TORCH_CHECK(x.sizes() == res.sizes(), "add_rms_norm: x and residual differ in shape");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.scalar_type() == at::kFloat &&
                  w.is_contiguous(), "add_rms_norm: weight must match x's columns");
  at::Tensor total = at::empty(x.sizes(), x.options());
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.size(1), sx = x.stride(0), sr = res.stride(0);
  const float* xp = x.data_ptr<float>();
  const float* rp = res.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* tp = total.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), row_grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* t = tp + r * n;
      for (int64_t i = 0; i < n; ++i) t[i] = xp[r * sx + i] + rp[r * sr + i];
      norm_row(t, wp, op + r * n, n, eps);
    }
  });
  return {total, out};
}

// HF rotate_half: [x1, x2] -> [x1 * c - x2 * s, x2 * c + x1 * s], per head, in place.
void rotate_heads(float* base, int64_t heads, int64_t stride_h, const float* c, const float* s,
                  int64_t half) {
  for (int64_t h = 0; h < heads; ++h) {
    float* x = base + h * stride_h;
    for (int64_t i = 0; i < half; ++i) {
      const float a = x[i], b = x[i + half];
      x[i] = a * c[i] + b * -s[i];
      x[i + half] = b * c[i + half] + a * s[i + half];
    }
  }
}

void rope_(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k,
           const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "rope_: q [T, H, D] and k [T, Hkv, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  q.stride(2) == 1 && k.stride(2) == 1, "rope_: float32 q and k, rows contiguous");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.size(1) == q.size(2) &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "rope_: float32 cos and sin tables [max_pos, D]");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == q.size(0) &&
                  positions.scalar_type() == at::kLong && positions.is_contiguous(),
              "rope_: int64 positions, one per token");
  const int64_t d = q.size(2), half = d / 2, max_pos = cos.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < q.size(0); ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "rope_: position ", pos[t], " outside the table");
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t row_floats = (q.size(1) + k.size(1)) * d;
  at::parallel_for(0, q.size(0), row_grain(row_floats / 4), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = cp + pos[t] * d;
      const float* s = sp + pos[t] * d;
      rotate_heads(qp + t * q.stride(0), q.size(1), q.stride(1), c, s, half);
      rotate_heads(kp + t * k.stride(0), k.size(1), k.stride(1), c, s, half);
    }
  });
}

at::Tensor silu_mul(const at::Tensor& x) {
  check_rows(x, "silu_mul x");
  TORCH_CHECK(x.size(1) % 2 == 0, "silu_mul: x must be [gate | up]");
  const int64_t n = x.size(1) / 2, sx = x.stride(0);
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), row_grain(n / 2), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = xp + r * sx;
      float* o = op + r * n;
      int64_t i = 0;
      const __m256 one = _mm256_set1_ps(1.f);
      for (; i + 8 <= n; i += 8) {  // silu(g) = g / (1 + exp(-g)), then * up
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(g + n + i)));
      }
      for (; i < n; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * g[n + i];
    }
  });
  return out;
}

// The sampler's uniforms (engine/sampler.py `race_uniforms`): u[r, v] in (0, 1) from a
// hash of row r's 64-bit key and the token id v alone, so a row's draws depend on nothing
// else (not the batch, not a generator's state). For a fixed key the map v -> hash is a
// bijection of 32-bit words (an odd multiply, an add, murmur3's finaliser twice around an
// xor), so no two tokens of a row share a draw. u = (2 (h >> 9) + 1) / 2^24: 23 random bits,
// exact in float32, never 0 or 1. engine/sampler.py computes the same bits with torch ops
// where this library is absent.
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

inline __m256i fmix8(__m256i h) {
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0xC2B2AE35u)));
  return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

constexpr uint32_t kTokenMul = 0x9E3779B9u;
constexpr float kUnit = 1.f / 16777216.f;  // 2^-24

at::Tensor race_uniforms(const at::Tensor& keys, int64_t vocab) {
  TORCH_CHECK(keys.dim() == 1 && keys.scalar_type() == at::kLong && keys.is_contiguous(),
              "race_uniforms: keys must be a contiguous int64 vector");
  TORCH_CHECK(vocab >= 1 && vocab < (int64_t(1) << 32), "race_uniforms: vocab ", vocab);
  const int64_t n = keys.size(0);
  at::Tensor out = at::empty({n, vocab}, keys.options().dtype(at::kFloat));
  const int64_t* kp = keys.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, row_grain(vocab / 4), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint64_t key = static_cast<uint64_t>(kp[r]);
      const uint32_t lo = static_cast<uint32_t>(key), hi = static_cast<uint32_t>(key >> 32);
      float* o = op + r * vocab;
      int64_t v = 0;
      const __m256i step = _mm256_set1_epi32(static_cast<int>(8 * kTokenMul));
      __m256i h0 = _mm256_add_epi32(
          _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                             _mm256_set1_epi32(static_cast<int>(kTokenMul))),
          _mm256_set1_epi32(static_cast<int>(lo)));
      for (; v + 8 <= vocab; v += 8, h0 = _mm256_add_epi32(h0, step)) {
        __m256i h = fmix8(_mm256_xor_si256(fmix8(h0), _mm256_set1_epi32(static_cast<int>(hi))));
        const __m256i odd = _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(h, 9), 1),
                                            _mm256_set1_epi32(1));
        _mm256_storeu_ps(o + v, _mm256_mul_ps(_mm256_cvtepi32_ps(odd), _mm256_set1_ps(kUnit)));
      }
      for (; v < vocab; ++v) {
        const uint32_t h = fmix32(fmix32(static_cast<uint32_t>(v) * kTokenMul + lo) ^ hi);
        o[v] = static_cast<float>(((h >> 9) << 1) | 1u) * kUnit;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("rope_(Tensor positions, Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("race_uniforms(Tensor keys, int vocab) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope_", &rope_);
  m.impl("silu_mul", &silu_mul);
  m.impl("race_uniforms", &race_uniforms);
}
