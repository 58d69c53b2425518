// SPDX-License-Identifier: Apache-2.0
// Token-to-expert grouping (docs/design.md §2, step 3): counts, offsets and the slot list of each expert.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>

#include "../backend/ops.hpp"
#include "../backend/scalar/grouping.hpp"
#include "../core/error.hpp"
#include "../core/tensor_view.hpp"

namespace factorllm {
namespace moe {

/// Groups the slots s = t * top_k + j of ids by expert with a stable counting sort: expert e processes
/// slots[offsets[e] .. offsets[e+1]) in increasing order, so results never depend on scheduling.
/// \param ids      [n_tokens, top_k], every entry in [0, n_experts)
/// \param offsets  [n_experts + 1] out
/// \param slots    [n_tokens * top_k] out
/// \throws value_error for n_experts outside [1, 2^31 - 1] or an id outside [0, n_experts); shape_error for
///         mis-shaped outputs.
template <class Backend = CpuScalar>
void group_by_expert(MatrixView<std::int32_t const> ids, std::ptrdiff_t n_experts, VectorView<std::int64_t> offsets,
                     VectorView<std::int32_t> slots, Backend const& = {}) {
  static_assert(is_backend_v<Backend>, "group_by_expert: unknown backend tag");
  // Expert ids are int32: a larger n_experts is meaningless (and n_experts + 1 below must not overflow).
  if (n_experts < 1 || n_experts > std::numeric_limits<std::int32_t>::max())
    throw value_error(detail::concat("group_by_expert: n_experts must be in [1, 2^31 - 1], got ", n_experts));
  detail::require_shape(offsets, {n_experts + 1}, "group_by_expert", "offsets");
  detail::require_shape(slots, {ids.rows() * ids.cols()}, "group_by_expert", "slots");
  for (std::ptrdiff_t t = 0; t < ids.rows(); ++t)
    for (std::ptrdiff_t j = 0; j < ids.cols(); ++j)
      if (ids(t, j) < 0 || ids(t, j) >= n_experts)
        throw value_error(detail::concat("group_by_expert: argument 'ids' entry (", t, ", ", j, ") = ", ids(t, j),
                                         " is outside [0, ", n_experts, ")"));
  kernel::GroupByExpert<Backend>::run(ids, n_experts, offsets, slots, VectorView<std::int32_t>());
}

}  // namespace moe
}  // namespace factorllm
