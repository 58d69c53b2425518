// SPDX-License-Identifier: Apache-2.0
// Scalar oracle for a SwiGLU block: y = W_down (SiLU(W_gate x) * (W_up x)), double accumulation (spec 1.1).
#pragma once

#include <cstddef>

#include "../../core/dtype.hpp"
#include "../../core/tensor_view.hpp"
#include "../../core/workspace.hpp"
#include "../../detail/math.hpp"
#include "../tags.hpp"

namespace factorllm {
namespace kernel {

/// Scratch layout of the scalar SwiGLU: one row of hidden activations and one output row, in double.
inline detail::WorkspaceLayout swiglu_workspace(std::ptrdiff_t /*n_tokens*/, std::ptrdiff_t d_model,
                                                std::ptrdiff_t d_hidden, CpuScalar const&) {
  return detail::WorkspaceLayout()
      .add(sizeof(double), static_cast<std::size_t>(d_hidden))
      .add(sizeof(double), static_cast<std::size_t>(d_model));
}

/// Computes one token's SwiGLU block output into `out` (double), using `hidden` (d_hidden doubles) as scratch.
/// Shapes: gate, up [d_hidden, d_model]; down [d_model, d_hidden]; x [d_model]; out [d_model].
template <class W, class A>
void swiglu_row(MatrixView<W const> gate, MatrixView<W const> up, MatrixView<W const> down, A const* x,
                double* hidden, double* out) {
  std::ptrdiff_t const d_hidden = gate.rows(), d_model = gate.cols();
  for (std::ptrdiff_t i = 0; i < d_hidden; ++i) {
    W const* g = gate.row(i);
    W const* u = up.row(i);
    double sg = 0, su = 0;
    for (std::ptrdiff_t k = 0; k < d_model; ++k) {
      double const xk = to_double(x[k]);
      sg += to_double(g[k]) * xk;
      su += to_double(u[k]) * xk;
    }
    hidden[i] = detail::silu(sg) * su;
  }
  for (std::ptrdiff_t o = 0; o < d_model; ++o) {
    W const* dn = down.row(o);
    double s = 0;
    for (std::ptrdiff_t i = 0; i < d_hidden; ++i) s += to_double(dn[i]) * hidden[i];
    out[o] = s;
  }
}

/// Scalar SwiGLU over all rows of x (the oracle for dense FFNs and single experts). y must not alias x.
template <class W, class A>
void swiglu(MatrixView<W const> gate, MatrixView<W const> up, MatrixView<W const> down, MatrixView<A const> x,
            MatrixView<A> y, Workspace& ws, CpuScalar const&) {
  std::ptrdiff_t const d_model = gate.cols();
  detail::WorkspaceCursor cursor(ws, "swiglu");
  double* hidden = cursor.take<double>(static_cast<std::size_t>(gate.rows()));
  double* out = cursor.take<double>(static_cast<std::size_t>(d_model));
  for (std::ptrdiff_t t = 0; t < x.rows(); ++t) {
    swiglu_row(gate, up, down, x.row(t), hidden, out);
    A* yr = y.row(t);
    for (std::ptrdiff_t o = 0; o < d_model; ++o) yr[o] = static_cast<A>(out[o]);
  }
}

}  // namespace kernel
}  // namespace factorllm
