// SPDX-License-Identifier: Apache-2.0
// Internal: the argument checks of layer-local recovery (refit and distillation): the experts, the fixed routing
// and the calibration set against each other, and a router and gating against the experts.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../../core/dtype.hpp"
#include "../../core/error.hpp"
#include "../../core/tensor_view.hpp"
#include "../../ffn/factorize.hpp"
#include "../../ffn/swiglu.hpp"
#include "../../moe/gating.hpp"
#include "../../moe/router.hpp"
#include "../fixed_routing.hpp"
#include "validation.hpp"

namespace factorllm {
namespace detail {

/// Checks a recovery call's experts, fixed routing and calibration set x against the dense FFN; `fn` starts the
/// message.
/// \throws value_error for default-constructed experts, no tokens, or a routing id outside [0, n_experts) or repeated
///         in a row; shape_error for mismatched shapes.
template <class T>
void validate_recovery(ffn::ExpertWeights<T> const& experts, train::FixedRouting<activation_t<T>> const& routing,
                       MatrixView<activation_t<T> const> x, ffn::DenseFfnView<T> const& dense, char const* fn) {
  validate_dense_experts(dense, experts, fn);
  if (experts.gate_tensor().empty()) throw value_error(concat(fn, ": argument 'experts' holds no experts (default-constructed)"));
  if (x.rows() < 1) throw value_error(concat(fn, ": argument 'x_calib' has no tokens; recovery needs a calibration set"));
  require_shape(x, {x.rows(), dense.d_model()}, fn, "x_calib");
  std::ptrdiff_t const slots = routing.ids.extent(1), n = experts.n_experts();
  if (slots < 1) throw shape_error(concat(fn, ": argument 'routing.ids' has no slots per token"));
  require_shape(routing.ids.cview(), {x.rows(), slots}, fn, "routing.ids");
  require_shape(routing.weights.cview(), {x.rows(), slots}, fn, "routing.weights");
  for (std::ptrdiff_t t = 0; t < x.rows(); ++t)
    for (std::ptrdiff_t j = 0; j < slots; ++j) {
      std::int32_t const e = routing.ids(t, j);
      if (e < 0 || e >= n)
        throw value_error(concat(fn, ": argument 'routing.ids' entry (", t, ", ", j, ") = ", e, " is outside [0, n_experts = ", n, ")"));
      for (std::ptrdiff_t q = 0; q < j; ++q)
        if (routing.ids(t, q) == e) throw value_error(concat(fn, ": argument 'routing.ids' repeats expert ", e, " in row ", t));
    }
}

/// Checks that router + gating fit the routed experts of a layer with n_shared always-on experts; `fn` starts the
/// message.
/// \throws value_error for n_shared outside [0, n_experts) or an invalid gating; shape_error for a router of another
///         shape.
template <class T>
void validate_router(ffn::ExpertWeights<T> const& experts, moe::Router<activation_t<T>> const& router, moe::Gating const& gating,
                     std::ptrdiff_t n_shared, char const* fn) {
  if (n_shared < 0 || n_shared >= experts.n_experts())
    throw value_error(concat(fn, ": n_shared = ", n_shared, " must be in [0, n_experts = ", experts.n_experts(), ")"));
  if (router.n_experts() != experts.n_experts() - n_shared || router.d_model() != experts.d_model())
    throw shape_error(concat(fn, ": argument 'router' has shape ",
                             shape_string({router.n_experts(), router.d_model()}), ", expected ",
                             shape_string({experts.n_experts() - n_shared, experts.d_model()}),
                             " [routed experts, d_model]"));
  gating.validate(router.n_experts(), fn);
}

}  // namespace detail
}  // namespace factorllm
