// SPDX-License-Identifier: Apache-2.0
// CpuSimd weighted combine of expert outputs back to tokens: float, j order per token, threads over tokens.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

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
  /// Tokens per task of a large combine.
  static constexpr std::ptrdiff_t kTokenBlock = 32;
  template <class A, class E>
  static void run(MatrixView<A const> weights, MatrixView<E const> expert_out, VectorView<std::int32_t const> rows,
                  MatrixView<A> y, Executor const& exec = Executor::openmp()) {
    if constexpr (std::is_same_v<A, float> && std::is_same_v<E, float>) {
      std::ptrdiff_t const n_tokens = y.rows(), k = weights.cols(), d = y.cols();
      bool const grouped = rows.extent(0) != 0;
      auto row_of = [&](std::ptrdiff_t s) { return grouped ? static_cast<std::ptrdiff_t>(rows(s)) : s; };
      auto combine_tokens = [&](std::ptrdiff_t t0, std::ptrdiff_t t1) {
        for (std::ptrdiff_t t = t0; t < t1; ++t) {
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
      };
      // Small calls (decode) stay on the calling thread: waking workers costs more than the pass.
      if (n_tokens * d < 65536) {
        combine_tokens(0, n_tokens);
      } else {
        std::ptrdiff_t const n_blocks = (n_tokens + kTokenBlock - 1) / kTokenBlock;
        exec.run(n_blocks, [&](std::ptrdiff_t b, int) {
          combine_tokens(b * kTokenBlock, std::min(n_tokens, (b + 1) * kTokenBlock));
        });
      }
    } else {
      Combine<CpuScalar>::run(weights, expert_out, rows, y, exec);
    }
  }
};

}  // namespace kernel
}  // namespace factorllm
