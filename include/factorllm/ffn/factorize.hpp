// SPDX-License-Identifier: Apache-2.0
// Factorization of a dense SwiGLU FFN into n_experts equal experts by one shared permutation (docs/math.md §1.2).
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

#include "../core/error.hpp"
#include "../core/kernel_args.hpp"
#include "../core/tensor.hpp"
#include "../core/tensor_view.hpp"
#include "permutation.hpp"
#include "swiglu.hpp"

namespace factorllm {
namespace ffn {

/// Owning, expert-major weights of n_experts SwiGLU experts, stacked as llama.cpp's ffn_*_exps tensors:
///   gate [n_experts, d_expert, d_model], up [n_experts, d_expert, d_model], down [n_experts, d_model, d_expert].
/// Keeps the partition that produced it, so `unfactorize` can restore the dense layout.
template <class T>
class ExpertWeights {
 public:
  ExpertWeights() = default;

  /// Takes ownership of stacked expert tensors (e.g. loaded from a file or trained).
  /// \throws shape_error unless gate, up are [N, m, d] and down is [N, d, m] with N = partition.n_experts()
  ///         and m = partition.d_expert().
  ExpertWeights(Tensor<T, 3> gate, Tensor<T, 3> up, Tensor<T, 3> down, ExpertPartition partition)
      : gate_(std::move(gate)), up_(std::move(up)), down_(std::move(down)), partition_(std::move(partition)) {
    std::ptrdiff_t const n = partition_.n_experts(), m = partition_.d_expert(), d = gate_.extent(2);
    if (d < 1) throw shape_error("ExpertWeights: argument 'gate' must have d_model >= 1 columns");
    detail::require_shape(gate_.cview(), {n, m, d}, "ExpertWeights", "gate");
    detail::require_shape(up_.cview(), {n, m, d}, "ExpertWeights", "up");
    detail::require_shape(down_.cview(), {n, d, m}, "ExpertWeights", "down");
  }

  std::ptrdiff_t n_experts() const noexcept { return partition_.n_experts(); }
  std::ptrdiff_t d_expert() const noexcept { return partition_.d_expert(); }
  std::ptrdiff_t d_model() const noexcept { return gate_.extent(2); }
  std::ptrdiff_t d_ff() const noexcept { return partition_.d_ff(); }
  ExpertPartition const& partition() const noexcept { return partition_; }

  /// Expert e's gate rows [d_expert, d_model].
  MatrixView<T const> gate(std::ptrdiff_t e) const { return gate_.cview()[check(e)]; }
  /// Expert e's up rows [d_expert, d_model].
  MatrixView<T const> up(std::ptrdiff_t e) const { return up_.cview()[check(e)]; }
  /// Expert e's down columns, copied contiguous: [d_model, d_expert].
  MatrixView<T const> down(std::ptrdiff_t e) const { return down_.cview()[check(e)]; }

  /// Views of one expert as a SwiGLU block (d_ff = d_expert).
  DenseFfnView<T> expert(std::ptrdiff_t e) const { return DenseFfnView<T>{gate(e), up(e), down(e)}; }

  /// The kernel-argument view of all experts.
  ExpertWeightsView<T> view() const noexcept { return ExpertWeightsView<T>{gate_.cview(), up_.cview(), down_.cview()}; }

  /// The stacked tensors, read-only.
  Tensor<T, 3> const& gate_tensor() const noexcept { return gate_; }
  Tensor<T, 3> const& up_tensor() const noexcept { return up_; }
  Tensor<T, 3> const& down_tensor() const noexcept { return down_; }
  /// The stacked tensors, writable: for training and recovery only. Not thread safe while others read.
  Tensor<T, 3>& mutable_gate_tensor() noexcept { return gate_; }
  Tensor<T, 3>& mutable_up_tensor() noexcept { return up_; }
  Tensor<T, 3>& mutable_down_tensor() noexcept { return down_; }

 private:
  std::ptrdiff_t check(std::ptrdiff_t e) const {
    // A default-constructed ExpertWeights has a 1-expert partition but no tensors: it has no expert to view.
    if (gate_.empty()) throw value_error("ExpertWeights: default-constructed, holds no experts");
    if (e < 0 || e >= n_experts())
      throw value_error(detail::concat("ExpertWeights: expert index ", e, " outside [0, ", n_experts(), ")"));
    return e;
  }

  Tensor<T, 3> gate_, up_, down_;
  ExpertPartition partition_ = ExpertPartition::contiguous(1, 1);
};

/// Splits a dense SwiGLU FFN into partition.n_experts() experts (docs/math.md §1.2): expert e gets gate and up rows
/// and down columns permutation[e*m .. (e+1)*m). One permutation for all three matrices, so that
/// sum_e E_e(x) = F(x) exactly up to float summation order. Copies; the dense weights are not modified.
/// \throws shape_error if the dense shapes are inconsistent or d_ff differs from partition.d_ff().
template <class T>
ExpertWeights<T> factorize(DenseFfnView<T> const& dense, ExpertPartition const& partition) {
  dense.validate("factorize");
  if (dense.d_ff() != partition.d_ff())
    throw shape_error(detail::concat("factorize: the dense FFN has d_ff = ", dense.d_ff(), " but argument 'partition' is for d_ff = ",
                                     partition.d_ff()));
  std::ptrdiff_t const n = partition.n_experts(), m = partition.d_expert(), d = dense.d_model();
  Tensor<T, 3> gate({n, m, d}), up({n, m, d}), down({n, d, m});
  auto const& perm = partition.permutation();
  for (std::ptrdiff_t e = 0; e < n; ++e) {
    for (std::ptrdiff_t i = 0; i < m; ++i) {
      std::ptrdiff_t const neuron = perm[static_cast<std::size_t>(e * m + i)];
      T const* g = dense.gate.row(neuron);
      T const* u = dense.up.row(neuron);
      for (std::ptrdiff_t k = 0; k < d; ++k) {
        gate(e, i, k) = g[k];
        up(e, i, k) = u[k];
      }
      for (std::ptrdiff_t o = 0; o < d; ++o) down(e, o, i) = dense.down(o, neuron);
    }
  }
  return ExpertWeights<T>(std::move(gate), std::move(up), std::move(down), partition);
}

/// Owning dense SwiGLU weights (the result of `unfactorize`).
template <class T>
struct DenseFfn {
  Matrix<T> gate;  // [d_ff, d_model]
  Matrix<T> up;    // [d_ff, d_model]
  Matrix<T> down;  // [d_model, d_ff]
  DenseFfnView<T> view() const { return DenseFfnView<T>{gate.cview(), up.cview(), down.cview()}; }
};

/// Restores the dense layout from factorized experts by the inverse permutation. Exact: for weights that
/// came from `factorize`, the result equals the original bit for bit.
/// \throws value_error for a default-constructed ExpertWeights (it holds no experts).
template <class T>
DenseFfn<T> unfactorize(ExpertWeights<T> const& experts) {
  std::ptrdiff_t const n = experts.n_experts(), m = experts.d_expert(), d = experts.d_model();
  DenseFfn<T> dense{Matrix<T>({n * m, d}), Matrix<T>({n * m, d}), Matrix<T>({d, n * m})};
  auto const& perm = experts.partition().permutation();
  for (std::ptrdiff_t e = 0; e < n; ++e) {
    auto const g = experts.gate(e), u = experts.up(e), dn = experts.down(e);
    for (std::ptrdiff_t i = 0; i < m; ++i) {
      std::ptrdiff_t const neuron = perm[static_cast<std::size_t>(e * m + i)];
      for (std::ptrdiff_t k = 0; k < d; ++k) {
        dense.gate(neuron, k) = g(i, k);
        dense.up(neuron, k) = u(i, k);
      }
      for (std::ptrdiff_t o = 0; o < d; ++o) dense.down(o, neuron) = dn(o, i);
    }
  }
  return dense;
}

/// Returns the experts in weight format To (e.g. f32 experts as bf16 or f16), with the same partition; narrowing
/// rounds each weight to nearest even.
template <class To, class From>
ExpertWeights<To> convert_format(ExpertWeights<From> const& experts) {
  return ExpertWeights<To>(convert<To>(experts.gate_tensor().cview()), convert<To>(experts.up_tensor().cview()),
                           convert<To>(experts.down_tensor().cview()), experts.partition());
}

}  // namespace ffn
}  // namespace factorllm
