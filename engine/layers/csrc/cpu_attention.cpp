// Decode attention over the paged KV cache on CPU: one query token per sequence, read K and V
// in place from the blocks of the sequence's block-table row (no gather into a padded batch),
// scores, softmax and the weighted sum of V in one pass per (sequence, kv head).
//
// Why: the torch reference (engine/attention/torch_backend.py) gathers every sequence's
// blocks into a padded [B, kvh, max_len, d] copy for K and for V each layer, then calls SDPA;
// at batch 8 the copies and the call's overhead cost more than the arithmetic.
// Numerics: float32 throughout; q scaled before the dot products, softmax as max-subtracted
// exp (a vectorised expf within ~2 ulp), normalised after the sum of V (SDPA normalises
// before): ~1e-6 relative apart.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "attention_avx512.h"
#include "avx2.h"
#include "codes_avx512.h"

namespace {

constexpr int64_t kChunk = 64;  // head dims a pass keeps in 8 registers

// Calls f(std::integral_constant<int, NV>) for nv in 1..8: NV vectors of a head-dim chunk.
template <class F>
void with_nv(int64_t nv, F&& f) {
  switch (nv) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// s[t] (+)= scale * q . k_t over one chunk of NV * 8 head dims, k_t = k + off[t]. Eight
// tokens at a time: eight independent FMA chains (one chain per token would wait on the
// FMA latency), then one transpose-add turns the eight accumulators into eight scores.
template <int NV>
void chunk_scores(const float* q, float scale, const float* k, const int64_t* off, int64_t len,
                  float* s, bool first) {
  __m256 qv[NV];
  const __m256 sc = _mm256_set1_ps(scale);
  for (int i = 0; i < NV; ++i) qv[i] = _mm256_mul_ps(_mm256_loadu_ps(q + 8 * i), sc);
  int64_t t = 0;
  for (; t + 8 <= len; t += 8) {
    __m256 a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm256_mul_ps(_mm256_loadu_ps(k + off[t + j]), qv[0]);
    for (int i = 1; i < NV; ++i)
      for (int j = 0; j < 8; ++j)
        a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(k + off[t + j] + 8 * i), qv[i], a[j]);
    const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    __m256 v = _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20),
                             _mm256_permute2f128_ps(s0, s1, 0x31));
    if (!first) v = _mm256_add_ps(v, _mm256_loadu_ps(s + t));
    _mm256_storeu_ps(s + t, v);
  }
  for (; t < len; ++t) {
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(k + off[t]), qv[0]);
    for (int i = 1; i < NV; ++i) acc = _mm256_fmadd_ps(_mm256_loadu_ps(k + off[t] + 8 * i), qv[i], acc);
    s[t] = (first ? 0.f : s[t]) + pdserve_cpu::hsum(acc);
  }
}

// o = inv * sum_t p[t] * v_t over one chunk of NV * 8 head dims, the sum in registers.
template <int NV>
void chunk_values(const float* p, const float* v, const int64_t* off, int64_t len, float inv,
                  float* o) {
  __m256 acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    const __m256 pv = _mm256_set1_ps(p[t]);
    for (int i = 0; i < NV; ++i)
      acc[i] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + off[t] + 8 * i), acc[i]);
  }
  const __m256 iv = _mm256_set1_ps(inv);
  for (int i = 0; i < NV; ++i) _mm256_storeu_ps(o + 8 * i, _mm256_mul_ps(acc[i], iv));
}

// s[t] = exp(s[t] - max(s)) in place; returns their sum (8 partial sums, then the lanes).
inline float softmax_numerators(float* s, int64_t n) {
  float m = s[0];
  for (int64_t t = 1; t < n; ++t) m = std::max(m, s[t]);
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = pdserve_cpu::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv));
    _mm256_storeu_ps(s + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = pdserve_cpu::hsum(acc);
  for (; t < n; ++t) sum += (s[t] = std::exp(s[t] - m));
  return sum;
}

// What both attention ops take: float32 q [rows, H, D] with contiguous heads, contiguous
// float32 caches [blocks, block_size, kvh, D] of q's head_dim, H a multiple of kvh.
void check_q_and_caches(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                        const at::Tensor& v_cache) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.stride(2) == 1, op,
              ": float32 q [rows, H, D] with contiguous heads");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              op, ": contiguous float32 caches [blocks, block_size, kvh, D]");
  TORCH_CHECK(k_cache.size(3) == q.size(2), op, ": head_dim ", q.size(2),
              " must match the cache's ", k_cache.size(3));
  const int64_t H = q.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(KVH > 0 && H % KVH == 0, op, ": ", H, " query heads over ", KVH, " kv heads");
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale) {
  check_q_and_caches("paged_decode_attention", q, k_cache, v_cache);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = k_cache.size(0), BS = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(D % 8 == 0, "paged_decode_attention: head_dim ", D, " must be a multiple of 8");
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
    std::vector<int64_t> off;  // token -> offset of its K (and V) row in the caches
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / KVH, kvh = task % KVH, len = lens[b];
      const int32_t* row = tables + b * W;
      scores.resize(G * len);
      off.resize(len);
      for (int64_t t = 0; t < len; ++t) off[t] = ((row[t / BS] * BS + t % BS) * KVH + kvh) * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qp + b * sq0 + (kvh * G + g) * sq1;
        float* s = scores.data() + g * len;
        for (int64_t d0 = 0; d0 < D; d0 += kChunk)
          with_nv(std::min<int64_t>(8, (D - d0) / 8), [&](auto nv) {
            chunk_scores<decltype(nv)::value>(qg + d0, fscale, kp + d0, off.data(), len, s,
                                              d0 == 0);
          });
        const float inv = 1.f / softmax_numerators(s, len);
        float* o = op + (b * H + kvh * G + g) * D;
        for (int64_t d0 = 0; d0 < D; d0 += kChunk)
          with_nv(std::min<int64_t>(8, (D - d0) / 8), [&](auto nv) {
            chunk_values<decltype(nv)::value>(s, vp + d0, off.data(), len, inv, o + d0);
          });
      }
    }
  });
  return out;
}

// Causal attention of one prefill chunk, q [L, H, D], over the first seq_len tokens cached in
// the blocks `block_ids` (the chunk is the last L of them): attention_avx512.cpp's tiles.
// K (transposed) and V of each kv head are first copied out of the blocks into contiguous,
// zero-padded buffers, so a tile streams them with unit stride; the tiles (kv head x query
// positions) are dealt round-robin to the threads, since later positions see more keys.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& block_ids,
                             int64_t seq_len, double scale) {
  TORCH_CHECK(pdserve_cpu::avx512_on(), "prefill_attention: needs a host with AVX-512");
  check_q_and_caches("prefill_attention", q, k_cache, v_cache);
  const int64_t L = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = k_cache.size(0), BS = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(D % 16 == 0 && D <= 256, "prefill_attention: head_dim ", D,
              " must be a multiple of 16 and at most 256");
  TORCH_CHECK(L >= 1 && seq_len >= L, "prefill_attention: ", L, " new tokens of ", seq_len);
  TORCH_CHECK(block_ids.dim() == 1 && block_ids.scalar_type() == at::kInt &&
                  block_ids.is_contiguous() && block_ids.size(0) * BS >= seq_len,
              "prefill_attention: int32 block ids covering ", seq_len, " tokens");
  const int32_t* ids = block_ids.data_ptr<int32_t>();
  const int64_t used = (seq_len + BS - 1) / BS;
  for (int64_t j = 0; j < used; ++j)
    TORCH_CHECK(ids[j] >= 0 && ids[j] < NB, "prefill_attention: block id ", ids[j],
                " outside the cache");
  // Rows of kt a whole number of key blocks long, plus 16 floats: a row length that is a
  // multiple of 4 KB would put a score micro-kernel's 64 loads (one a dim) in one L1 set.
  const int64_t KB = pdserve_cpu::kPrefillKeyBlock;
  const int64_t G = H / KVH, ldk = (seq_len + KB - 1) / KB * KB + 16;
  // Reused across calls (every layer of a step asks for the same size); a very long
  // context gets a buffer of its own rather than pinning it to the thread.
  constexpr int64_t kKeep = int64_t{1} << 22;  // floats
  thread_local std::vector<float> kept;
  std::vector<float> own;
  const int64_t need = 2 * KVH * D * ldk;
  std::vector<float>& buf = need <= kKeep ? kept : own;
  if (static_cast<int64_t>(buf.size()) < need) buf.resize(need);
  float* kt_all = buf.data();
  float* v_all = kt_all + KVH * D * ldk;
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  at::parallel_for(0, KVH, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      float* kt = kt_all + h * D * ldk;
      float* vh = v_all + h * ldk * D;
      int64_t off[16];
      for (int64_t t0 = 0; t0 < seq_len; t0 += 16) {  // 16 keys: one cache line of kt a dim
        const int64_t n = std::min<int64_t>(16, seq_len - t0);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t t = t0 + j;
          off[j] = ((ids[t / BS] * BS + t % BS) * KVH + h) * D;
          std::copy(vp + off[j], vp + off[j] + D, vh + t * D);
        }
        for (int64_t d = 0; d < D; ++d)
          for (int64_t j = 0; j < n; ++j) kt[d * ldk + t0 + j] = kp[off[j] + d];
      }
      std::fill(vh + seq_len * D, vh + ldk * D, 0.f);
      for (int64_t d = 0; d < D; ++d) std::fill(kt + d * ldk + seq_len, kt + (d + 1) * ldk, 0.f);
    }
  });
  at::Tensor out = at::empty({L, H, D}, q.options());
  // ~64 rows a tile: the G heads of each position stacked.
  const int64_t positions = std::max<int64_t>(1, 64 / G);
  const int64_t tiles = (L + positions - 1) / positions, tasks = tiles * KVH;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), tasks);
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    thread_local std::vector<float> scratch;
    scratch.resize(pdserve_cpu::prefill_tile_scratch(positions, G, D));
    pdserve_cpu::PrefillTile tile{q.data_ptr<float>(), q.stride(0), q.stride(1), nullptr,
                                  nullptr, ldk, out.data_ptr<float>(), H * D, D, 0, G, D,
                                  seq_len - L, static_cast<float>(scale), scratch.data()};
    for (int64_t w = w0; w < w1; ++w)
      for (int64_t task = w; task < tasks; task += workers) {
        const int64_t h = task % KVH, q0 = task / KVH * positions;
        tile.kt = kt_all + h * D * ldk;
        tile.v = v_all + h * ldk * D;
        tile.head0 = h * G;
        pdserve_cpu::prefill_attention_tile_avx512(tile, q0, std::min(L, q0 + positions));
      }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seq_lens, float scale) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_ids, "
        "int seq_len, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("prefill_attention", &prefill_attention);
}
