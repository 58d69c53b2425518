// SPDX-License-Identifier: Apache-2.0
// CpuSimd router logits z = x W_r^T + b_r through one Eigen GEMM (float), so routing stays a small
// fraction of the MoE forward at every n_tokens.
#pragma once

#include <algorithm>
#include <cstddef>

#include <Eigen/Core>

#include "../../core/kernel_args.hpp"
#include "../../core/tensor_view.hpp"
#include "../ops.hpp"
#include "../scalar/router.hpp"
#include "cpu_simd.hpp"
#include "swiglu.hpp"

namespace factorllm {
namespace kernel {

/// CpuSimd router logits for float activations and float router weights. Token rows are cut into fixed blocks
/// of 64 (one Eigen GEMM each, Eigen held serial: its own threading would change the blocking, and so the
/// summation order, with the thread count); a few tokens (decode) take the streaming multi-dot instead.
template <class Arch>
struct RouterLogits<CpuSimd<Arch>> {
  static constexpr bool implemented = true;
  /// Other activation/router types (double) run the oracle.
  template <class R, class A>
  static void run(MatrixView<A const> x, RouterView<R> router, MatrixView<A> logits, Executor const& exec = Executor::openmp()) {
    RouterLogits<CpuScalar>::run(x, router, logits, exec);
  }
  static void run(MatrixView<float const> x, RouterView<float> router, MatrixView<float> logits, Executor const& exec = Executor::openmp());
};

template <class Arch>
void RouterLogits<CpuSimd<Arch>>::run(MatrixView<float const> x, RouterView<float> router, MatrixView<float> logits,
                                      Executor const& exec) {
  MatrixView<float const> const w = router.weight;
  VectorView<float const> const bias = router.bias;
  using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  std::ptrdiff_t const n_tokens = x.rows(), n_experts = w.rows(), d = x.cols();
  if (n_tokens <= detail::kMultiDotRows && x.row_stride() == d) {
    float dots[detail::kMultiDotRows];
    for (std::ptrdiff_t e = 0; e < n_experts; ++e) {
      if (n_tokens > 0) detail::multi_dot<Arch>(w.row(e), x.data(), d, n_tokens, d, dots);
      for (std::ptrdiff_t t = 0; t < n_tokens; ++t) logits(t, e) = dots[t] + bias(e);
    }
    return;
  }
  constexpr std::ptrdiff_t kRouterBlock = 64;
  Eigen::Map<RowMajor const, 0, Eigen::OuterStride<>> wm(w.data(), n_experts, d, Eigen::OuterStride<>(w.row_stride()));
  Eigen::Map<Eigen::RowVectorXf const> b(bias.data(), bias.extent(0));
  exec.run((n_tokens + kRouterBlock - 1) / kRouterBlock, [&](std::ptrdiff_t blk, int) {
    std::ptrdiff_t const t0 = blk * kRouterBlock, rows = std::min(kRouterBlock, n_tokens - t0);
    Eigen::Map<RowMajor const, 0, Eigen::OuterStride<>> xm(x.row(t0), rows, d, Eigen::OuterStride<>(x.row_stride()));
    Eigen::Map<RowMajor, 0, Eigen::OuterStride<>> zm(logits.row(t0), rows, n_experts,
                                                       Eigen::OuterStride<>(logits.row_stride()));
    zm.noalias() = xm * wm.transpose();
    zm.rowwise() += b;
  });
}

}  // namespace kernel
}  // namespace factorllm
