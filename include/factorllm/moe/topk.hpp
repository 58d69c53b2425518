// SPDX-License-Identifier: Apache-2.0
// TopK expert selection and combine weights (docs/math.md §2.3): the public front of op select_experts.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../backend/ops.hpp"
#include "../backend/scalar/topk.hpp"
#include "../core/tensor_view.hpp"
#include "gating.hpp"

namespace factorllm {
namespace moe {

/// Chooses gating.top_k experts per token from router logits and computes their combine weights
/// (conventions: the table in moe/gating.hpp).
/// \param logits  [n_tokens, n_experts]
/// \param ids     [n_tokens, top_k] out: chosen experts, best first (ties: lower index first)
/// \param weights [n_tokens, top_k] out: weight of each chosen expert
/// \throws value_error / shape_error on an invalid gating or shapes.
template <class Backend = CpuScalar, class A>
void select_experts(MatrixView<A const> logits, Gating const& gating, MatrixView<std::int32_t> ids,
                    MatrixView<A> weights, Backend const& = {}) {
  static_assert(is_backend_v<Backend>, "select_experts: unknown backend tag");
  gating.validate(logits.cols(), "select_experts");
  detail::require_shape(ids, {logits.rows(), gating.top_k}, "select_experts", "ids");
  detail::require_shape(weights, {logits.rows(), gating.top_k}, "select_experts", "weights");
  kernel::SelectExperts<Backend>::run(logits, gating.params(), ids, weights);
}

/// Writes the indices of the top_k largest values of each row of `scores` into ids [n_tokens, top_k]
/// (larger first; lower index wins ties; NaN ranks last).
/// \throws value_error unless 1 <= top_k <= scores.cols(); shape_error for a mis-shaped ids.
template <class A>
void topk(MatrixView<A const> scores, std::ptrdiff_t top_k, MatrixView<std::int32_t> ids) {
  if (top_k < 1 || top_k > scores.cols())
    throw value_error(detail::concat("topk: top_k = ", top_k, " must be in [1, ", scores.cols(), "]"));
  detail::require_shape(ids, {scores.rows(), top_k}, "topk", "ids");
  for (std::ptrdiff_t t = 0; t < scores.rows(); ++t) {
    A const* s = scores.row(t);
    kernel::topk_indices([&](std::ptrdiff_t i) { return static_cast<double>(s[i]); }, scores.cols(), top_k, ids.row(t));
  }
}

}  // namespace moe
}  // namespace factorllm
