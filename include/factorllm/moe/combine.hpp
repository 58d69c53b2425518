// SPDX-License-Identifier: Apache-2.0
// Weighted combine of per-slot expert outputs back into token rows (docs/design.md §2, step 5).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../backend/ops.hpp"
#include "../backend/scalar/combine.hpp"
#include "../backend/simd/combine.hpp"
#include "../core/tensor_view.hpp"

namespace factorllm {
namespace moe {

/// y[t] = sum_j weights[t, j] * expert_out[t * top_k + j], in j order (deterministic).
/// \param weights    [n_tokens, top_k]
/// \param expert_out [n_tokens * top_k, d_model]
/// \param y          [n_tokens, d_model] out
template <class Backend = CpuScalar, class A>
void combine(MatrixView<A const> weights, MatrixView<A const> expert_out, MatrixView<A> y, Backend const& = {}) {
  static_assert(is_backend_v<Backend>, "combine: unknown backend tag");
  detail::require_shape(expert_out, {weights.rows() * weights.cols(), y.cols()}, "combine", "expert_out");
  detail::require_shape(y, {weights.rows(), y.cols()}, "combine", "y");
  kernel::Combine<Backend>::run(weights, expert_out, VectorView<std::int32_t const>(), y);
}

}  // namespace moe
}  // namespace factorllm
