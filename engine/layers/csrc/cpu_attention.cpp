// Decode attention over the paged KV cache on CPU: one query token per sequence, read K and V
// in place from the blocks of the sequence's block-table row (no gather into a padded batch),
// scores, softmax and the weighted sum of V in one pass per (sequence, kv head).
//
// Why: the torch reference (engine/attention/torch_backend.py) gathers every sequence's
// blocks into a padded [B, kvh, max_len, d] copy for K and for V each layer, then calls SDPA;
// at batch 8 the copies and the call's overhead cost more than the arithmetic.
// Numerics: float32 throughout; softmax as max-subtracted exp, normalised after the sum of V
// (SDPA normalises before): ~1e-6 relative apart.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <vector>

#include "avx2.h"

namespace {

inline float dot(const float* a, const float* b, int64_t d) {  // d % 8 == 0
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  if (i < d) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  return pdserve_cpu::hsum(_mm256_add_ps(acc0, acc1));
}

inline void axpy(float a, const float* x, float* y, int64_t d) {  // y += a * x, d % 8 == 0
  const __m256 av = _mm256_set1_ps(a);
  for (int64_t i = 0; i < d; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.stride(2) == 1,
              "paged_decode_attention: float32 q [B, H, D] with contiguous heads");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "paged_decode_attention: contiguous float32 caches [blocks, block_size, kvh, D]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = k_cache.size(0), BS = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && D % 8 == 0, "paged_decode_attention: head_dim ", D,
              " must match the cache and be a multiple of 8");
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "paged_decode_attention: ", H, " query heads over ",
              KVH, " kv heads");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B &&
                  block_tables.scalar_type() == at::kInt && block_tables.is_contiguous(),
              "paged_decode_attention: int32 block tables [B, W]");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == B && seq_lens.scalar_type() == at::kInt &&
                  seq_lens.is_contiguous(), "paged_decode_attention: int32 seq_lens [B]");
  const int64_t W = block_tables.size(1), G = H / KVH;
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {  // every block a sequence reads is a real block
    TORCH_CHECK(lens[b] >= 1 && (lens[b] + BS - 1) / BS <= W, "paged_decode_attention: "
                "sequence ", b, " has length ", lens[b], " for ", W, " table entries");
    for (int64_t j = 0; j < (lens[b] + BS - 1) / BS; ++j)
      TORCH_CHECK(tables[b * W + j] >= 0 && tables[b * W + j] < NB,
                  "paged_decode_attention: block id ", tables[b * W + j], " outside the cache");
  }
  at::Tensor out = at::empty({B, H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t sq0 = q.stride(0), sq1 = q.stride(1);
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, B * KVH, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / KVH, kvh = task % KVH, len = lens[b];
      const int32_t* row = tables + b * W;
      scores.assign(G * len, 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const float* k = kp + ((row[t / BS] * BS + t % BS) * KVH + kvh) * D;
        for (int64_t g = 0; g < G; ++g)
          scores[g * len + t] = dot(qp + b * sq0 + (kvh * G + g) * sq1, k, D) * fscale;
      }
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * len;
        float m = s[0];
        for (int64_t t = 1; t < len; ++t) m = std::max(m, s[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) sum += (s[t] = std::exp(s[t] - m));
        float* o = op + (b * H + kvh * G + g) * D;
        for (int64_t i = 0; i < D; ++i) o[i] = 0.f;
        for (int64_t t = 0; t < len; ++t)
          axpy(s[t], vp + ((row[t / BS] * BS + t % BS) * KVH + kvh) * D, o, D);
        const float inv = 1.f / sum;
        for (int64_t i = 0; i < D; ++i) o[i] *= inv;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seq_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
