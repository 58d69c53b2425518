// SPDX-License-Identifier: Apache-2.0
// Scalar weighted combine of expert outputs back to tokens, in slot order (deterministic).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../../core/dtype.hpp"
#include "../../core/executor.hpp"
#include "../../core/tensor_view.hpp"
#include "../ops.hpp"

namespace factorllm {
namespace kernel {

/// y[t, :] = sum_{j = 0..top_k-1} weights[t, j] * expert_out[row(t * top_k + j), :], summed in j order in
/// double, where row(s) = rows[s] (the grouped row of slot s), or s itself when `rows` is empty.
/// Shapes: weights [n_tokens, top_k]; expert_out [n_tokens * top_k, d_model]; rows [n_tokens * top_k] or [0];
/// y [n_tokens, d_model].
template <>
struct Combine<CpuScalar> {
  static constexpr bool implemented = true;
  template <class A, class E>
  static void run(MatrixView<A const> weights, MatrixView<E const> expert_out, VectorView<std::int32_t const> rows,
                  MatrixView<A> y, Executor const& = Executor::openmp()) {
    std::ptrdiff_t const k = weights.cols(), d_model = y.cols();
    bool const grouped = rows.extent(0) != 0;
    for (std::ptrdiff_t t = 0; t < y.rows(); ++t) {
      A* yr = y.row(t);
      for (std::ptrdiff_t o = 0; o < d_model; ++o) {
        double s = 0;
        for (std::ptrdiff_t j = 0; j < k; ++j) {
          std::ptrdiff_t const r = grouped ? rows(t * k + j) : t * k + j;
          s += to_double(weights(t, j)) * to_double(expert_out(r, o));
        }
        yr[o] = static_cast<A>(s);
      }
    }
  }
};

}  // namespace kernel
}  // namespace factorllm
