// SPDX-License-Identifier: Apache-2.0
// Internal: the argument checks the train fronts share (oracle labels, router training, recovery, diagnostics):
// experts against the dense FFN, and FFN inputs and top_k against the experts.
#pragma once

#include <cmath>
#include <cstddef>

#include "../../core/error.hpp"
#include "../../core/tensor_view.hpp"
#include "../../ffn/factorize.hpp"
#include "../../ffn/swiglu.hpp"

namespace factorllm {
namespace detail {

/// Throws value_error naming the first row (and column) of `x` that holds a NaN or infinity: one bad calibration
/// value would otherwise turn every loss and the trained parameters into NaN without an error.
template <class A>
void require_finite_rows(MatrixView<A const> x, char const* fn, char const* arg) {
  for (std::ptrdiff_t t = 0; t < x.rows(); ++t) {
    A const* row = x.row(t);
    for (std::ptrdiff_t c = 0; c < x.cols(); ++c)
      if (!std::isfinite(static_cast<double>(row[c])))
        throw value_error(concat(fn, ": argument '", arg, "' row ", t, " (column ", c, ") is not finite; calibration "
                                 "data must be finite"));
  }
}

/// Checks that x [n_tokens >= 1, d_model] and top_k in [1, n_experts] fit non-empty experts; `fn` starts the
/// message.
/// \throws value_error for default-constructed experts, no tokens, a bad top_k or a non-finite x; shape_error for a
///         bad x.
template <class T, class A>
void validate_experts_x(MatrixView<A const> x, ffn::ExpertWeights<T> const& experts, std::ptrdiff_t top_k, char const* fn) {
  if (experts.gate_tensor().empty()) throw value_error(concat(fn, ": argument 'experts' holds no experts (default-constructed)"));
  if (x.rows() < 1) throw value_error(concat(fn, ": argument 'x' has no tokens"));
  require_shape(x, {x.rows(), experts.d_model()}, fn, "x");
  if (top_k < 1 || top_k > experts.n_experts())
    throw value_error(concat(fn, ": top_k = ", top_k, " must be in [1, n_experts = ", experts.n_experts(), "]"));
  require_finite_rows(x, fn, "x");
}

/// Checks the dense FFN and that the experts have its d_model and d_ff; `fn` starts the message.
/// \throws shape_error for an inconsistent dense FFN or experts of another shape.
template <class T>
void validate_dense_experts(ffn::DenseFfnView<T> const& dense, ffn::ExpertWeights<T> const& experts, char const* fn) {
  dense.validate(fn);
  if (experts.d_model() != dense.d_model() || experts.d_ff() != dense.d_ff())
    throw shape_error(concat(fn, ": argument 'experts' has d_model ", experts.d_model(), ", d_ff ", experts.d_ff(),
                             "; the dense FFN has d_model ", dense.d_model(), ", d_ff ", dense.d_ff()));
}

}  // namespace detail
}  // namespace factorllm
