// SPDX-License-Identifier: Apache-2.0
// The fixed routing layer-local recovery takes as data: which experts every calibration token uses and with what
// combine weight, computed once from the fixed router and gating (also for layers with always-on shared experts).
//
// The combine weights do not depend on the expert parameters, so with the routing fixed they are constants of the
// recovery objectives (train/refit.hpp, train/distillation.hpp). Shared experts (moe::SharedExpertMoe) are slots
// with weight 1 that every token uses.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../core/tensor_view.hpp"
#include "../moe/gating.hpp"
#include "../moe/router.hpp"
#include "../moe/topk.hpp"

namespace factorllm {
namespace detail {

/// The routing of every row of x by router + gating (logits, TopK with the selection bias, combine weights),
/// exactly as moe::MoeFfn's scalar oracle computes it.
template <class A>
void route_all(moe::Router<A> const& router, moe::Gating const& gating, MatrixView<A const> x, Matrix<std::int32_t>& ids,
               Matrix<A>& weights) {
  Matrix<A> logits({x.rows(), router.n_experts()});
  ids = Matrix<std::int32_t>({x.rows(), gating.top_k});
  weights = Matrix<A>({x.rows(), gating.top_k});
  moe::router_logits(router, x, logits.view());
  moe::select_experts(logits.cview(), gating, ids.view(), weights.view());
}

}  // namespace detail

namespace train {

/// A fixed routing of n_tokens tokens: which experts each token uses and with what weight its output is combined,
/// MoE(x_t) = sum_j weights(t, j) E_{ids(t, j)}(x_t). Recovery takes the routing as data so that it also covers
/// layers with always-on shared experts (fixed_routing with n_shared > 0).
template <class A>
struct FixedRouting {
  Matrix<std::int32_t> ids;  // [n_tokens, slots] expert ids, distinct within a row
  Matrix<A> weights;         // [n_tokens, slots] combine weights
};

/// Computes the routing router + gating give every row of x (logits, TopK with the selection bias, the mode's
/// combine weights and output scale: exactly what moe::MoeFfn does). With n_shared > 0 the routing is that of a
/// shared-expert layer (moe::SharedExpertMoe) over n_shared + n_routed experts: every token also uses experts
/// 0 .. n_shared-1 with weight 1 (slots 0 .. n_shared-1), and the router's expert e becomes expert n_shared + e.
/// \param x  [n_tokens, d_model]; \returns ids and weights of shape [n_tokens, n_shared + top_k]
/// \throws value_error for an invalid gating or n_shared < 0; shape_error if x does not match the router.
template <class A>
FixedRouting<A> fixed_routing(moe::Router<A> const& router, moe::Gating const& gating, MatrixView<A const> x,
                              std::ptrdiff_t n_shared = 0) {
  char const* fn = "fixed_routing";
  gating.validate(router.n_experts(), fn);
  if (n_shared < 0) throw value_error(detail::concat(fn, ": n_shared must be >= 0, got ", n_shared));
  detail::require_shape(x, {x.rows(), router.d_model()}, fn, "x");
  Matrix<std::int32_t> ids;
  Matrix<A> weights;
  detail::route_all(router, gating, x, ids, weights);
  if (n_shared == 0) return FixedRouting<A>{std::move(ids), std::move(weights)};
  std::ptrdiff_t const k = gating.top_k;
  FixedRouting<A> r{Matrix<std::int32_t>({x.rows(), n_shared + k}), Matrix<A>({x.rows(), n_shared + k})};
  for (std::ptrdiff_t t = 0; t < x.rows(); ++t) {
    for (std::ptrdiff_t s = 0; s < n_shared; ++s) {
      r.ids(t, s) = static_cast<std::int32_t>(s);
      r.weights(t, s) = A(1);
    }
    for (std::ptrdiff_t j = 0; j < k; ++j) {
      r.ids(t, n_shared + j) = static_cast<std::int32_t>(n_shared + ids(t, j));
      r.weights(t, n_shared + j) = weights(t, j);
    }
  }
  return r;
}

}  // namespace train
}  // namespace factorllm
