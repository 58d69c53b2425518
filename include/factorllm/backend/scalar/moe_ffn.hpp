// SPDX-License-Identifier: Apache-2.0
// Scalar oracle of the whole MoE layer: logits, select, group, run each expert on its tokens, combine.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "../../core/workspace.hpp"
#include "../../ffn/factorize.hpp"
#include "../../moe/gating.hpp"
#include "../../moe/router.hpp"
#include "../../moe/routing.hpp"
#include "../tags.hpp"
#include "combine.hpp"
#include "dispatch.hpp"
#include "router.hpp"
#include "swiglu.hpp"
#include "topk.hpp"

namespace factorllm {
namespace kernel {

/// Scratch of the scalar MoE forward for up to max_tokens tokens: logits, ids, weights, groups, one
/// double output row per slot, and one expert's hidden/output row in double.
template <class A>
detail::WorkspaceLayout moe_workspace(std::ptrdiff_t max_tokens, std::ptrdiff_t d_model, std::ptrdiff_t n_experts,
                                      std::ptrdiff_t d_expert, std::ptrdiff_t top_k, CpuScalar const&) {
  auto const t = static_cast<std::size_t>(max_tokens), n = static_cast<std::size_t>(n_experts),
             k = static_cast<std::size_t>(top_k), d = static_cast<std::size_t>(d_model),
             m = static_cast<std::size_t>(d_expert);
  return detail::WorkspaceLayout()
      .add(sizeof(A), t * n)                // logits
      .add(sizeof(std::int32_t), t * k)     // ids
      .add(sizeof(A), t * k)                // weights
      .add(sizeof(std::int64_t), n + 1)     // offsets
      .add(sizeof(std::int32_t), t * k)     // slots
      .add(sizeof(double), t * k * d)       // expert output per slot
      .add(sizeof(double), m)               // hidden row
      .add(sizeof(double), d);              // output row
}

/// MoE forward, scalar oracle. Inputs are validated by moe::MoeFfn.
template <class W, class A>
void moe_forward(ffn::ExpertWeights<W> const& experts, moe::Router<A> const& router, moe::Gating const& gating,
                 MatrixView<A const> x, MatrixView<A> y, Workspace& ws, moe::RoutingRecord<A>* record,
                 CpuScalar const& b) {
  std::ptrdiff_t const n_tokens = x.rows(), n = experts.n_experts(), k = gating.top_k, d = experts.d_model();
  detail::WorkspaceCursor cursor(ws, "MoeFfn::forward");
  MatrixView<A> logits = matrix_view(cursor.take<A>(static_cast<std::size_t>(n_tokens * n)), n_tokens, n);
  MatrixView<std::int32_t> ids = matrix_view(cursor.take<std::int32_t>(static_cast<std::size_t>(n_tokens * k)), n_tokens, k);
  MatrixView<A> weights = matrix_view(cursor.take<A>(static_cast<std::size_t>(n_tokens * k)), n_tokens, k);
  VectorView<std::int64_t> offsets = vector_view(cursor.take<std::int64_t>(static_cast<std::size_t>(n + 1)), n + 1);
  VectorView<std::int32_t> slots = vector_view(cursor.take<std::int32_t>(static_cast<std::size_t>(n_tokens * k)), n_tokens * k);
  MatrixView<double> slot_out = matrix_view(cursor.take<double>(static_cast<std::size_t>(n_tokens * k * d)), n_tokens * k, d);
  double* hidden = cursor.take<double>(static_cast<std::size_t>(experts.d_expert()));
  double* out = cursor.take<double>(static_cast<std::size_t>(d));

  router_logits(x, router.weight(), router.bias(), logits, b);                          // step 1 (spec 2.2)
  select_experts(MatrixView<A const>(logits), gating, ids, weights, b);                 // step 2 (spec 2.3)
  group_by_expert(MatrixView<std::int32_t const>(ids), n, offsets, slots, b);           // step 3
  for (std::ptrdiff_t e = 0; e < n; ++e) {                                              // step 4: only chosen experts run
    for (std::int64_t r = offsets(e); r < offsets(e + 1); ++r) {
      std::ptrdiff_t const s = slots(r), t = s / k;
      swiglu_row(experts.gate(e), experts.up(e), experts.down(e), x.row(t), hidden, out);
      std::copy(out, out + d, slot_out.row(s));
    }
  }
  combine(MatrixView<A const>(weights), MatrixView<double const>(slot_out), y, b);      // step 5
  if (record != nullptr) {
    record->assign(logits, ids, weights, offsets, slots);
  }
}

}  // namespace kernel
}  // namespace factorllm
