// SPDX-License-Identifier: Apache-2.0
// Scalar grouping of (token, slot) pairs by expert: a stable counting sort, so the order is deterministic.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../../core/tensor_view.hpp"
#include "../ops.hpp"

namespace factorllm {
namespace kernel {

/// Groups the slots s = t * top_k + j of ids [n_tokens, top_k] by expert: expert e's slots are
/// slots[offsets[e] .. offsets[e+1]) in increasing s (stable). offsets has n_experts + 1 entries. When `rows`
/// is not empty it receives the inverse map: rows[slots[r]] = r (the grouped row of each slot).
template <>
struct GroupByExpert<CpuScalar> {
  static constexpr bool implemented = true;
  static void run(MatrixView<std::int32_t const> ids, std::ptrdiff_t n_experts, VectorView<std::int64_t> offsets,
                  VectorView<std::int32_t> slots, VectorView<std::int32_t> rows) {
    std::ptrdiff_t const k = ids.cols();
    for (std::ptrdiff_t e = 0; e <= n_experts; ++e) offsets(e) = 0;
    for (std::ptrdiff_t t = 0; t < ids.rows(); ++t)
      for (std::ptrdiff_t j = 0; j < k; ++j) ++offsets(ids(t, j) + 1);
    for (std::ptrdiff_t e = 0; e < n_experts; ++e) offsets(e + 1) += offsets(e);
    // Second pass fills in slot order; `offsets(e)` is used as the write cursor and restored afterwards.
    for (std::ptrdiff_t t = 0; t < ids.rows(); ++t)
      for (std::ptrdiff_t j = 0; j < k; ++j) slots(offsets(ids(t, j))++) = static_cast<std::int32_t>(t * k + j);
    for (std::ptrdiff_t e = n_experts; e > 0; --e) offsets(e) = offsets(e - 1);
    offsets(0) = 0;
    if (rows.extent(0) != 0)
      for (std::ptrdiff_t r = 0; r < ids.rows() * k; ++r) rows(slots(r)) = static_cast<std::int32_t>(r);
  }
};

}  // namespace kernel
}  // namespace factorllm
