// SPDX-License-Identifier: Apache-2.0
// Scalar oracle for router logits z = W_r x + b_r (docs/math.md §2.2), double accumulation.
#pragma once

#include <cstddef>

#include "../../core/dtype.hpp"
#include "../../core/kernel_args.hpp"
#include "../../core/tensor_view.hpp"
#include "../ops.hpp"

namespace factorllm {
namespace kernel {

/// logits[t, e] = sum_c w[e, c] x[t, c] + bias[e]. Shapes: x [n_tokens, d_model], router weight [n_experts,
/// d_model], bias [n_experts], logits [n_tokens, n_experts].
template <>
struct RouterLogits<CpuScalar> {
  static constexpr bool implemented = true;
  template <class R, class A>
  static void run(MatrixView<A const> x, RouterView<R> router, MatrixView<A> logits, Executor const& = Executor::openmp()) {
    std::ptrdiff_t const n_experts = router.n_experts(), d_model = router.d_model();
    for (std::ptrdiff_t t = 0; t < x.rows(); ++t) {
      A const* xr = x.row(t);
      for (std::ptrdiff_t e = 0; e < n_experts; ++e) {
        R const* wr = router.weight.row(e);
        double s = to_double(router.bias(e));
        for (std::ptrdiff_t k = 0; k < d_model; ++k) s += to_double(wr[k]) * to_double(xr[k]);
        logits(t, e) = static_cast<A>(s);
      }
    }
  }
};

}  // namespace kernel
}  // namespace factorllm
