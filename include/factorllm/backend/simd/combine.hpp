// SPDX-License-Identifier: Apache-2.0
// CpuSimd weighted combine of expert outputs back to tokens: float, j order per token, threads over tokens.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../../core/tensor_view.hpp"
#include "../ops.hpp"
#include "../scalar/combine.hpp"
#include "cpu_simd.hpp"

namespace factorllm {
namespace kernel {

/// y[t] = sum_j weights[t, j] * expert_out[row(t * top_k + j)] in float, j = 0 first (the same order for any
/// thread count: a token is one thread's). Other types run the oracle.
template <class Arch>
struct Combine<CpuSimd<Arch>> {
  static constexpr bool implemented = true;
  template <class A, class E>
  static void run(MatrixView<A const> weights, MatrixView<E const> expert_out, VectorView<std::int32_t const> rows,
                  MatrixView<A> y) {
    if constexpr (std::is_same_v<A, float> && std::is_same_v<E, float>) {
      std::ptrdiff_t const n_tokens = y.rows(), k = weights.cols(), d = y.cols();
      bool const grouped = rows.extent(0) != 0;
      auto row_of = [&](std::ptrdiff_t s) { return grouped ? static_cast<std::ptrdiff_t>(rows(s)) : s; };
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (n_tokens * d >= 65536)
#endif
      for (std::ptrdiff_t t = 0; t < n_tokens; ++t) {
        float* yr = y.row(t);
        float const w0 = weights(t, 0);
        float const* o0 = expert_out.row(row_of(t * k));
        for (std::ptrdiff_t c = 0; c < d; ++c) yr[c] = w0 * o0[c];
        for (std::ptrdiff_t j = 1; j < k; ++j) {
          float const wj = weights(t, j);
          float const* oj = expert_out.row(row_of(t * k + j));
          for (std::ptrdiff_t c = 0; c < d; ++c) yr[c] += wj * oj[c];
        }
      }
    } else {
      Combine<CpuScalar>::run(weights, expert_out, rows, y);
    }
  }
};

}  // namespace kernel
}  // namespace factorllm
