// SPDX-License-Identifier: Apache-2.0
// CpuSimd router logits z = x W_r^T + b_r through one Eigen GEMM (float), so routing stays a small
// fraction of the MoE forward at every n_tokens.
#pragma once

#include <cstddef>

#include <Eigen/Core>

#include "../../core/tensor_view.hpp"
#include "cpu_simd.hpp"

namespace factorllm {
namespace kernel {

/// CpuSimd router logits for float activations and float router weights.
template <class Arch>
void router_logits(MatrixView<float const> x, MatrixView<float const> w, VectorView<float const> bias,
                   MatrixView<float> logits, CpuSimd<Arch> const&) {
  using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<RowMajor const, 0, Eigen::OuterStride<>> xm(x.data(), x.rows(), x.cols(), Eigen::OuterStride<>(x.row_stride()));
  Eigen::Map<RowMajor const, 0, Eigen::OuterStride<>> wm(w.data(), w.rows(), w.cols(), Eigen::OuterStride<>(w.row_stride()));
  Eigen::Map<RowMajor, 0, Eigen::OuterStride<>> zm(logits.data(), logits.rows(), logits.cols(),
                                                     Eigen::OuterStride<>(logits.row_stride()));
  Eigen::Map<Eigen::RowVectorXf const> b(bias.data(), bias.extent(0));
  zm.noalias() = xm * wm.transpose();
  zm.rowwise() += b;
}

}  // namespace kernel
}  // namespace factorllm
