// SPDX-License-Identifier: Apache-2.0
// RoutingRecord: what a forward pass decided (logits, chosen experts, weights, groups), kept for backward
// passes and diagnostics.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../core/kernel_args.hpp"
#include "../core/tensor.hpp"

namespace factorllm {
namespace moe {

/// The routing of one forward call. Filled by MoeFfn::forward when asked; reallocated only when the
/// shapes change, so a record reused across calls of the same size does not allocate.
template <class A>
struct RoutingRecord {
  Matrix<A> logits;               // [n_tokens, n_experts]
  Matrix<std::int32_t> ids;       // [n_tokens, top_k]: token t's experts, best selection score (logit + bias) first,
                                  // the lower index first on ties, NaN scores last
  Matrix<A> weights;              // [n_tokens, top_k]: weights(t, j) is the combine weight of expert ids(t, j)
  Vector<std::int64_t> offsets;   // [n_experts + 1]: expert e owns slots[offsets[e] .. offsets[e+1])
  Vector<std::int32_t> slots;     // [n_tokens * top_k]: slot s = t * top_k + j, grouped by expert

  /// Number of tokens routed to expert e.
  std::int64_t load(std::ptrdiff_t e) const { return offsets[e + 1] - offsets[e]; }

  /// The kernel-argument view of this record's storage (writable; converts to RoutingView<A const>).
  RoutingView<A> view() noexcept { return RoutingView<A>{logits.view(), ids.view(), weights.view(), offsets.view(), slots.view()}; }
  /// A read-only view.
  RoutingView<A const> cview() const noexcept {
    return RoutingView<A const>{logits.cview(), ids.cview(), weights.cview(), offsets.cview(), slots.cview()};
  }

  /// Copies one forward pass's routing (views into its workspace) into this record.
  void assign(MatrixView<A const> logits_in, MatrixView<std::int32_t const> ids_in, MatrixView<A const> weights_in,
              VectorView<std::int64_t const> offsets_in, VectorView<std::int32_t const> slots_in) {
    resize(logits_in.rows(), logits_in.cols(), ids_in.cols());
    logits.copy_from(logits_in);
    ids.copy_from(ids_in);
    weights.copy_from(weights_in);
    offsets.copy_from(offsets_in);
    slots.copy_from(slots_in);
  }

  /// Makes every member have the given sizes (allocating only on change).
  void resize(std::ptrdiff_t n_tokens, std::ptrdiff_t n_experts, std::ptrdiff_t top_k) {
    if (logits.extents() != std::array<std::ptrdiff_t, 2>{n_tokens, n_experts}) logits = Matrix<A>({n_tokens, n_experts});
    if (ids.extents() != std::array<std::ptrdiff_t, 2>{n_tokens, top_k}) ids = Matrix<std::int32_t>({n_tokens, top_k});
    if (weights.extents() != std::array<std::ptrdiff_t, 2>{n_tokens, top_k}) weights = Matrix<A>({n_tokens, top_k});
    if (offsets.extent(0) != n_experts + 1) offsets = Vector<std::int64_t>({n_experts + 1});
    if (slots.extent(0) != n_tokens * top_k) slots = Vector<std::int32_t>({n_tokens * top_k});
  }
};

}  // namespace moe
}  // namespace factorllm
