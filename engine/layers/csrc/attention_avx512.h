// Prefill attention with 16-float vectors (attention_avx512.cpp), called by cpu_attention.cpp
// where the host has AVX-512 (`avx512_on`, codes_avx512.h). Plain pointers, as in
// codes_avx512.h: the AVX-512 file includes no torch header.
#pragma once

#include <cstdint>

namespace pdserve_cpu {

// Keys are attended in blocks of this many; the K and V copies a call makes are padded
// (with zeros) to a multiple of it.
constexpr int64_t kPrefillKeyBlock = 64;

// One kv head's share of a prefill chunk: query positions q0..q1 of the chunk (positions
// ctx + q0 .. ctx + q1 - 1 of the sequence) for the G query heads of the head, each over the
// keys at or before its own position.
struct PrefillTile {
  const float* q;      // the chunk's query [L, H, D] (strides below), head h's group at h * G
  int64_t q_tok, q_head;
  const float* kt;     // this kv head's keys transposed, [D][ldk], zero past the last key
  const float* v;      // this kv head's values [ldk][D], zero past the last key
  int64_t ldk;         // at least ctx + L rounded up to kPrefillKeyBlock
  float* out;          // [L, H, D] (strides below)
  int64_t o_tok, o_head;
  int64_t head0;       // the first query head of the group (h * G)
  int64_t G, D;        // D: a multiple of 16, at most 256
  int64_t ctx;         // tokens before the chunk
  float scale;
  float* scratch;      // prefill_tile_scratch(q1 - q0, G, D) floats
};

// Floats of scratch a tile of `positions` query positions needs.
int64_t prefill_tile_scratch(int64_t positions, int64_t G, int64_t D);

void prefill_attention_tile_avx512(const PrefillTile& t, int64_t q0, int64_t q1);

}  // namespace pdserve_cpu
