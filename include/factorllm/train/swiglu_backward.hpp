// SPDX-License-Identifier: Apache-2.0
// The SwiGLU backward of distillation: the experts' loss under a fixed routing, mean_t ||MoE(x_t) - target_t||^2, and
// its gradient w.r.t. every expert's gate, up and down weights (the gradient type ExpertGrads; the kernel is internal).
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include <Eigen/Core>

#include "../core/tensor.hpp"
#include "../core/tensor_view.hpp"
#include "../detail/math.hpp"

namespace factorllm {
namespace train {

/// Gradients of the distillation loss, shaped like the experts' stacked tensors (float for float and bf16
/// weights, double for double weights).
template <class A>
struct ExpertGrads {
  Tensor<A, 3> gate;  // [n_experts, d_expert, d_model]
  Tensor<A, 3> up;    // [n_experts, d_expert, d_model]
  Tensor<A, 3> down;  // [n_experts, d_model, d_expert]

  /// Makes every tensor have the experts' shapes (allocating only on change).
  void resize(std::ptrdiff_t n_experts, std::ptrdiff_t d_expert, std::ptrdiff_t d_model) {
    std::array<std::ptrdiff_t, 3> const gu{n_experts, d_expert, d_model}, dn{n_experts, d_model, d_expert};
    if (gate.extents() != gu) gate = Tensor<A, 3>(gu);
    if (up.extents() != gu) up = Tensor<A, 3>(gu);
    if (down.extents() != dn) down = Tensor<A, 3>(dn);
  }
};

}  // namespace train

namespace detail {

/// Scratch of one distillation evaluation over up to max_rows tokens (allocated once, reused every step).
template <class A>
struct DistillScratch {
  using Mat = Eigen::Matrix<A, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Mat xs, g, u, h, o;  // [max_rows * top_k, d_model or d_expert], slots grouped by expert
  Mat y;               // [max_rows, d_model] MoE output, then dL/dy
  std::vector<std::ptrdiff_t> offsets, next, slot_token;
  std::vector<A> slot_weight;
  DistillScratch(std::ptrdiff_t max_rows, std::ptrdiff_t top_k, std::ptrdiff_t n, std::ptrdiff_t m, std::ptrdiff_t d)
      : xs(max_rows * top_k, d), g(max_rows * top_k, m), u(max_rows * top_k, m), h(max_rows * top_k, m),
        o(max_rows * top_k, d), y(max_rows, d), offsets(static_cast<std::size_t>(n + 1)), next(static_cast<std::size_t>(n)),
        slot_token(static_cast<std::size_t>(max_rows * top_k)), slot_weight(static_cast<std::size_t>(max_rows * top_k)) {}
};

/// Loss mean_t ||sum_j w_tj E_{e_tj}(x_t) - target_t||^2 over the rows of x and, when grads is not null, its
/// gradient w.r.t. every expert's gate, up and down weights (overwritten; zero for an expert no row selects).
/// Backward of E(x) = W_d h, h = SiLU(g) * u, g = W_g x, u = W_u x, with dL/dy = 2 (y - target) / n_rows:
///   dW_d += (w dL/dy) h^T;  dh = W_d^T (w dL/dy);  dW_g += (dh * u * SiLU'(g)) x^T;  dW_u += (dh * SiLU(g)) x^T.
/// Parameters are dense stacked tensors in the activation type A. The loss is accumulated in double.
template <class A>
double distill_batch(TensorView<A const, 3> gate, TensorView<A const, 3> up, TensorView<A const, 3> down,
                     MatrixView<A const> x, MatrixView<A const> target, MatrixView<std::int32_t const> ids,
                     MatrixView<A const> weights, train::ExpertGrads<A>* grads, DistillScratch<A>& s) {
  using Mat = typename DistillScratch<A>::Mat;
  using CMap = Eigen::Map<Mat const>;
  using MMap = Eigen::Map<Mat>;
  std::ptrdiff_t const rows = x.rows(), k = ids.cols(), n = gate.extent(0), m = gate.extent(1), d = gate.extent(2);
  // Group the slots (t, j) by expert with a stable counting sort (deterministic order).
  std::fill(s.offsets.begin(), s.offsets.end(), 0);
  for (std::ptrdiff_t t = 0; t < rows; ++t)
    for (std::ptrdiff_t j = 0; j < k; ++j) ++s.offsets[static_cast<std::size_t>(ids(t, j) + 1)];
  for (std::ptrdiff_t e = 0; e < n; ++e) s.offsets[static_cast<std::size_t>(e + 1)] += s.offsets[static_cast<std::size_t>(e)];
  std::copy(s.offsets.begin(), s.offsets.end() - 1, s.next.begin());
  for (std::ptrdiff_t t = 0; t < rows; ++t)
    for (std::ptrdiff_t j = 0; j < k; ++j) {
      auto const slot = static_cast<std::size_t>(s.next[static_cast<std::size_t>(ids(t, j))]++);
      s.slot_token[slot] = t;
      s.slot_weight[slot] = weights(t, j);
      std::copy(x.row(t), x.row(t) + d, s.xs.row(static_cast<Eigen::Index>(slot)).data());
    }
  // Forward, expert by expert on its own rows.
  s.y.topRows(rows).setZero();
  for (std::ptrdiff_t e = 0; e < n; ++e) {
    std::ptrdiff_t const o0 = s.offsets[static_cast<std::size_t>(e)], c = s.offsets[static_cast<std::size_t>(e + 1)] - o0;
    if (c == 0) continue;
    CMap const wg(gate.data() + e * m * d, m, d), wu(up.data() + e * m * d, m, d), wd(down.data() + e * d * m, d, m);
    s.g.middleRows(o0, c).noalias() = s.xs.middleRows(o0, c) * wg.transpose();
    s.u.middleRows(o0, c).noalias() = s.xs.middleRows(o0, c) * wu.transpose();
    for (std::ptrdiff_t r = o0; r < o0 + c; ++r)
      for (std::ptrdiff_t i = 0; i < m; ++i)
        s.h(r, i) = static_cast<A>(detail::silu(static_cast<double>(s.g(r, i)))) * s.u(r, i);
    s.o.middleRows(o0, c).noalias() = s.h.middleRows(o0, c) * wd.transpose();
  }
  for (std::ptrdiff_t slot = 0; slot < rows * k; ++slot)  // combine in grouped order: fixed, deterministic
    s.y.row(s.slot_token[static_cast<std::size_t>(slot)]) += s.slot_weight[static_cast<std::size_t>(slot)] * s.o.row(slot);
  double loss = 0;
  for (std::ptrdiff_t t = 0; t < rows; ++t)
    for (std::ptrdiff_t c = 0; c < d; ++c) {
      double const r = static_cast<double>(s.y(t, c)) - static_cast<double>(target(t, c));
      loss += r * r;
      s.y(t, c) = static_cast<A>(2.0 * r / static_cast<double>(rows));  // y now holds dL/dy
    }
  loss /= static_cast<double>(rows);
  if (grads == nullptr) return loss;

  // Backward, expert by expert (o becomes w * dL/dy per slot, h becomes dL/dh, g and u their gradients).
  for (std::ptrdiff_t e = 0; e < n; ++e) {
    std::ptrdiff_t const o0 = s.offsets[static_cast<std::size_t>(e)], c = s.offsets[static_cast<std::size_t>(e + 1)] - o0;
    MMap dwg(grads->gate.data() + e * m * d, m, d), dwu(grads->up.data() + e * m * d, m, d),
        dwd(grads->down.data() + e * d * m, d, m);
    if (c == 0) {
      dwg.setZero();
      dwu.setZero();
      dwd.setZero();
      continue;
    }
    CMap const wd(down.data() + e * d * m, d, m);
    for (std::ptrdiff_t r = o0; r < o0 + c; ++r)
      s.o.row(r) = s.slot_weight[static_cast<std::size_t>(r)] * s.y.row(s.slot_token[static_cast<std::size_t>(r)]);
    dwd.noalias() = s.o.middleRows(o0, c).transpose() * s.h.middleRows(o0, c);
    s.h.middleRows(o0, c).noalias() = s.o.middleRows(o0, c) * wd;
    for (std::ptrdiff_t r = o0; r < o0 + c; ++r)
      for (std::ptrdiff_t i = 0; i < m; ++i) {
        double const g = static_cast<double>(s.g(r, i)), dh = static_cast<double>(s.h(r, i));
        s.g(r, i) = static_cast<A>(dh * static_cast<double>(s.u(r, i)) * silu_grad(g));
        s.u(r, i) = static_cast<A>(dh * detail::silu(g));
      }
    dwg.noalias() = s.g.middleRows(o0, c).transpose() * s.xs.middleRows(o0, c);
    dwu.noalias() = s.u.middleRows(o0, c).transpose() * s.xs.middleRows(o0, c);
  }
  return loss;
}

}  // namespace detail
}  // namespace factorllm
