// SPDX-License-Identifier: Apache-2.0
// Scalar weighted combine of expert outputs back to tokens, in slot order (deterministic).
#pragma once

#include <cstddef>

#include "../../core/dtype.hpp"
#include "../../core/tensor_view.hpp"
#include "../tags.hpp"

namespace factorllm {
namespace kernel {

/// y[t, :] = sum_{j = 0..top_k-1} weights[t, j] * expert_out[t * top_k + j, :], summed in j order in double.
/// Shapes: weights [n_tokens, top_k]; expert_out [n_tokens * top_k, d_model]; y [n_tokens, d_model].
template <class A, class E>
void combine(MatrixView<A const> weights, MatrixView<E const> expert_out, MatrixView<A> y, CpuScalar const&) {
  std::ptrdiff_t const k = weights.cols(), d_model = y.cols();
  for (std::ptrdiff_t t = 0; t < y.rows(); ++t) {
    A* yr = y.row(t);
    for (std::ptrdiff_t o = 0; o < d_model; ++o) {
      double s = 0;
      for (std::ptrdiff_t j = 0; j < k; ++j) s += to_double(weights(t, j)) * to_double(expert_out(t * k + j, o));
      yr[o] = static_cast<A>(s);
    }
  }
}

}  // namespace kernel
}  // namespace factorllm
