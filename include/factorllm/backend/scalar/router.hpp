// SPDX-License-Identifier: Apache-2.0
// Scalar oracle for router logits z = W_r x + b_r (spec 2.2), double accumulation.
#pragma once

#include <cstddef>

#include "../../core/dtype.hpp"
#include "../../core/tensor_view.hpp"
#include "../tags.hpp"

namespace factorllm {
namespace kernel {

/// logits[t, e] = sum_k w[e, k] x[t, k] + bias[e]. Shapes: x [n_tokens, d_model], w [n_experts, d_model],
/// bias [n_experts], logits [n_tokens, n_experts].
template <class R, class A>
void router_logits(MatrixView<A const> x, MatrixView<R const> w, VectorView<R const> bias, MatrixView<A> logits,
                   CpuScalar const&) {
  std::ptrdiff_t const n_experts = w.rows(), d_model = w.cols();
  for (std::ptrdiff_t t = 0; t < x.rows(); ++t) {
    A const* xr = x.row(t);
    for (std::ptrdiff_t e = 0; e < n_experts; ++e) {
      R const* wr = w.row(e);
      double s = to_double(bias(e));
      for (std::ptrdiff_t k = 0; k < d_model; ++k) s += to_double(wr[k]) * to_double(xr[k]);
      logits(t, e) = static_cast<A>(s);
    }
  }
}

}  // namespace kernel
}  // namespace factorllm
