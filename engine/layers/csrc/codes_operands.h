// The operands of a product over block codes (codes.h), checked once for the GEMV and the
// GEMM: x [M, K] float32, scales [N, K / 32] float32, offsets the same (q4) or empty (q8),
// codes uint8 [N, K / 2] (q4) or int8 [N, K] (q8), an optional float32 bias [N].
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "codes.h"

namespace pdserve_cpu {

struct CodesOperands {
  int64_t M, K, N;
  bool q4;
  const float* bias;  // nullptr without one
};

// An optional bias of N outputs: its data, or nullptr without one.
inline const float* checked_bias(const char* op, const c10::optional<at::Tensor>& b,
                                 int64_t N) {
  if (!b.has_value()) return nullptr;
  TORCH_CHECK(b->dim() == 1 && b->size(0) == N && b->scalar_type() == at::kFloat &&
                  b->is_contiguous(),
              op, ": bias must be a contiguous float32 vector of N");
  return b->data_ptr<float>();
}

inline CodesOperands check_codes_operands(const char* op, const at::Tensor& x,
                                          const at::Tensor& scales, const at::Tensor& offsets,
                                          const at::Tensor& codes,
                                          const c10::optional<at::Tensor>& b) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), op,
              ": contiguous float32 x [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kCodeBlock == 0, op, ": K ", K, " is not a multiple of ", kCodeBlock);
  TORCH_CHECK(scales.dim() == 2 && scales.size(1) == K / kCodeBlock && scales.is_contiguous() &&
                  scales.scalar_type() == at::kFloat,
              op, ": float32 scales [N, K / 32]");
  const int64_t N = scales.size(0);
  const bool q4 = codes.scalar_type() == at::kByte;
  TORCH_CHECK(codes.dim() == 2 && codes.size(0) == N && codes.is_contiguous() &&
                  (q4 ? codes.size(1) == K / 2
                      : codes.scalar_type() == at::kChar && codes.size(1) == K),
              op, ": codes uint8 [N, K / 2] (q4) or int8 [N, K] (q8)");
  if (q4)
    TORCH_CHECK(offsets.sizes() == scales.sizes() && offsets.is_contiguous() &&
                    offsets.scalar_type() == at::kFloat,
                op, ": q4 codes need float32 offsets shaped like the scales");
  return {M, K, N, q4, checked_bias(op, b, N)};
}

}  // namespace pdserve_cpu
