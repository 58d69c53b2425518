// SPDX-License-Identifier: Apache-2.0
// Scalar oracle for SwiGLU blocks: y = W_down (SiLU(W_gate x) * (W_up x)), double accumulation (docs/math.md §1.1):
// the dense FFN (op swiglu) and every expert on its grouped rows (op expert_swiglu). Every weight format: plain ones
// element by element, block-quantized ones (q8_0, q4_0) weight by weight as their blocks' exact d * q.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../../core/dtype.hpp"
#include "../../core/kernel_args.hpp"
#include "../../core/quant.hpp"
#include "../../core/tensor_view.hpp"
#include "../../core/workspace.hpp"
#include "../../detail/math.hpp"
#include "../ops.hpp"

namespace factorllm {
namespace kernel {

/// Returns weight k of a stored row as double, exactly: the element for a plain format, the block's f16 scale
/// times the integer for a block format (weight k % 32 of block k / 32; exact in float already).
template <class W>
inline double row_weight(W const* row, std::ptrdiff_t k) noexcept {
  if constexpr (is_block_format_v<W>) {
    constexpr std::ptrdiff_t kB = dtype_traits<W>::block_weights;
    return static_cast<double>(block_weight(row[k / kB], static_cast<int>(k % kB)));
  } else {
    return to_double(row[k]);
  }
}

/// Computes one token's SwiGLU block output into `out` (double), using `hidden` (d_hidden doubles) as scratch.
/// Shapes: gate, up [d_hidden, d_model / block]; down [d_model, d_hidden / block]; x [d_model]; out [d_model],
/// where block = dtype_traits<W>::block_weights (1 for the plain formats, 32 for q8_0 and q4_0).
template <class W, class A>
void swiglu_row(MatrixView<W const> gate, MatrixView<W const> up, MatrixView<W const> down, A const* x,
                double* hidden, double* out) {
  std::ptrdiff_t const d_hidden = gate.rows(), d_model = gate.cols() * block_weights_v<W>;
  for (std::ptrdiff_t i = 0; i < d_hidden; ++i) {
    W const* g = gate.row(i);
    W const* u = up.row(i);
    double sg = 0, su = 0;
    for (std::ptrdiff_t k = 0; k < d_model; ++k) {
      double const xk = to_double(x[k]);
      sg += row_weight(g, k) * xk;
      su += row_weight(u, k) * xk;
    }
    hidden[i] = detail::silu(sg) * su;
  }
  for (std::ptrdiff_t o = 0; o < d_model; ++o) {
    W const* dn = down.row(o);
    double s = 0;
    for (std::ptrdiff_t i = 0; i < d_hidden; ++i) s += row_weight(dn, i) * hidden[i];
    out[o] = s;
  }
}

/// Dense SwiGLU over all rows of x (the oracle for dense FFNs and single experts), any weight format (gate, up
/// [d_ff, d_model / block], down [d_model, d_ff / block]). y must not alias x.
template <>
struct Swiglu<CpuScalar> {
  static constexpr bool implemented = true;
  /// One row of hidden activations and one output row, in double.
  template <class W, class A>
  static detail::WorkspaceLayout workspace(std::ptrdiff_t /*n_tokens*/, std::ptrdiff_t d_model, std::ptrdiff_t d_hidden,
                                           int /*max_workers*/) {
    return detail::WorkspaceLayout()
        .add(sizeof(double), static_cast<std::size_t>(d_hidden))
        .add(sizeof(double), static_cast<std::size_t>(d_model));
  }
  template <class W, class A>
  static void run(MatrixView<W const> gate, MatrixView<W const> up, MatrixView<W const> down, MatrixView<A const> x,
                  MatrixView<A> y, WorkspaceSpan ws, Executor const& = Executor::openmp()) {
    std::ptrdiff_t const d_model = gate.cols() * block_weights_v<W>;
    detail::WorkspaceCursor cursor(ws, "swiglu");
    double* hidden = cursor.take<double>(static_cast<std::size_t>(gate.rows()));
    double* out = cursor.take<double>(static_cast<std::size_t>(d_model));
    for (std::ptrdiff_t t = 0; t < x.rows(); ++t) {
      swiglu_row(gate, up, down, x.row(t), hidden, out);
      A* yr = y.row(t);
      for (std::ptrdiff_t o = 0; o < d_model; ++o) yr[o] = static_cast<A>(out[o]);
    }
  }
};

/// Every expert on its own grouped rows: grouped row r (slot s = slots[r], token s / top_k, routed to the
/// expert e with offsets[e] <= r < offsets[e+1]) gets expert_out[r] = E_e(x[s / top_k]), in double. Any weight
/// format, block-quantized ones included (each weight dequantized exactly on the fly).
template <>
struct ExpertSwiglu<CpuScalar> {
  static constexpr bool implemented = true;
  /// The oracle keeps expert outputs in double until the combine.
  template <class W, class A>
  using output_t = double;
  /// One expert's hidden row, in double.
  template <class W, class A>
  static detail::WorkspaceLayout workspace(std::ptrdiff_t /*n_slots*/, std::ptrdiff_t /*d_model*/,
                                           std::ptrdiff_t /*n_experts*/, std::ptrdiff_t d_expert, int /*max_threads*/) {
    return detail::WorkspaceLayout().add(sizeof(double), static_cast<std::size_t>(d_expert));
  }
  template <class W, class A>
  static void run(ExpertWeightsView<W> const& experts, MatrixView<A const> x, std::ptrdiff_t top_k,
                  VectorView<std::int64_t const> offsets, VectorView<std::int32_t const> slots,
                  MatrixView<double> expert_out, WorkspaceSpan ws, Executor const& = Executor::openmp()) {
    detail::WorkspaceCursor cursor(ws, "expert_swiglu (cpu_scalar)");
    double* hidden = cursor.take<double>(static_cast<std::size_t>(experts.d_expert()));
    for (std::ptrdiff_t e = 0; e < experts.n_experts(); ++e)  // only chosen experts run
      for (std::int64_t r = offsets(e); r < offsets(e + 1); ++r)
        swiglu_row(experts.gate_of(e), experts.up_of(e), experts.down_of(e), x.row(slots(r) / top_k), hidden,
                   expert_out.row(r));
  }
};

}  // namespace kernel
}  // namespace factorllm
