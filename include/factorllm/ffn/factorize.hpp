// SPDX-License-Identifier: Apache-2.0
// Factorization of a dense SwiGLU FFN into n_experts equal experts by one shared permutation (docs/math.md §1.2).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/kernel_args.hpp"
#include "../core/quant.hpp"
#include "../core/tensor.hpp"
#include "../core/tensor_view.hpp"
#include "permutation.hpp"
#include "swiglu.hpp"

namespace factorllm {
namespace ffn {

/// Owning, expert-major weights of n_experts SwiGLU experts, stacked as llama.cpp's ffn_*_exps tensors:
///   gate [n_experts, d_expert, d_model], up [n_experts, d_expert, d_model], down [n_experts, d_model, d_expert].
/// In a block-quantized format T (q8_0, q4_0: core/quant.hpp) the last extent counts 32-weight blocks, ggml's row
/// layout: gate, up [n_experts, d_expert, d_model / 32], down [n_experts, d_model, d_expert / 32], so d_model and
/// d_expert are multiples of 32 (convert_format makes them from float, bf16 or f16 experts).
/// Keeps the partition that produced it, so `unfactorize` can restore the dense layout.
template <class T>
class ExpertWeights {
 public:
  /// Weights per stored element: 1, or 32 for a block format.
  static constexpr std::ptrdiff_t kBlock = block_weights_v<T>;

  ExpertWeights() = default;

  /// Takes ownership of stacked expert tensors (e.g. loaded from a file or trained).
  /// \throws shape_error unless gate, up are [N, m, d / block] and down is [N, d, m / block] with
  ///         N = partition.n_experts(), m = partition.d_expert() and d_model d >= 1 (block = kBlock; for a block
  ///         format m must be a multiple of 32).
  ExpertWeights(Tensor<T, 3> gate, Tensor<T, 3> up, Tensor<T, 3> down, ExpertPartition partition)
      : gate_(std::move(gate)), up_(std::move(up)), down_(std::move(down)), partition_(std::move(partition)) {
    std::ptrdiff_t const n = partition_.n_experts(), m = partition_.d_expert(), cols = gate_.extent(2);
    if (cols < 1) throw shape_error("ExpertWeights: argument 'gate' must have d_model >= 1 columns");
    if (m % kBlock != 0)
      throw shape_error(detail::concat("ExpertWeights: argument 'partition' has d_expert = ", m,
                                       ", expected a multiple of ", kBlock, ": argument 'down' stores rows of d_expert ",
                                       "weights in ", dtype_traits<T>::name(), " blocks"));
    detail::require_shape(gate_.cview(), {n, m, cols}, "ExpertWeights", "gate");
    detail::require_shape(up_.cview(), {n, m, cols}, "ExpertWeights", "up");
    detail::require_shape(down_.cview(), {n, cols * kBlock, m / kBlock}, "ExpertWeights", "down");
  }

  std::ptrdiff_t n_experts() const noexcept { return partition_.n_experts(); }
  std::ptrdiff_t d_expert() const noexcept { return partition_.d_expert(); }
  std::ptrdiff_t d_model() const noexcept { return gate_.extent(2) * kBlock; }
  std::ptrdiff_t d_ff() const noexcept { return partition_.d_ff(); }
  ExpertPartition const& partition() const noexcept { return partition_; }

  /// Expert e's gate rows [d_expert, d_model / block].
  MatrixView<T const> gate(std::ptrdiff_t e) const { return gate_.cview()[check(e)]; }
  /// Expert e's up rows [d_expert, d_model / block].
  MatrixView<T const> up(std::ptrdiff_t e) const { return up_.cview()[check(e)]; }
  /// Expert e's down columns, copied contiguous: [d_model, d_expert / block].
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
  static_assert(!is_block_format_v<T>, "factorize: the dense weights must be a plain format (a column of W_down is "
                                       "not a block): factorize float weights, then ffn::convert_format<q8_0>");
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
  static_assert(!is_block_format_v<T>, "unfactorize: block-quantized experts have no dense layout of their own (a "
                                       "column of W_down is not a block): convert_format<float> first");
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

/// Returns the experts in weight format To, with the same partition: f32 experts as bf16 or f16 (narrowing rounds
/// each weight to nearest even), float, bf16 or f16 experts as q8_0 or q4_0 (each row quantized with ggml's
/// reference rounding: core/quant.hpp), block-quantized experts back as float (exact dequantization).
/// \throws shape_error naming 'experts' when To is a block format and d_model or d_expert is not a multiple of 32;
///         value_error when a weight to quantize is not finite or a block's scale overflows f16.
template <class To, class From>
ExpertWeights<To> convert_format(ExpertWeights<From> const& experts) {
  if constexpr (block_weights_v<To> > 1 && block_weights_v<To> != block_weights_v<From>) {
    constexpr std::ptrdiff_t kB = block_weights_v<To>;
    if (experts.d_model() % kB != 0 || experts.d_expert() % kB != 0)
      throw shape_error(detail::concat("convert_format: argument 'experts' has d_model = ", experts.d_model(),
                                       " and d_expert = ", experts.d_expert(), ", expected multiples of ", kB, " (the ",
                                       dtype_traits<To>::name(), " block: gate and up rows hold d_model weights, down "
                                       "rows d_expert)"));
  }
  return ExpertWeights<To>(convert<To>(experts.gate_tensor().cview()), convert<To>(experts.up_tensor().cview()),
                           convert<To>(experts.down_tensor().cview()), experts.partition());
}

}  // namespace ffn

namespace detail {

/// Returns d_ff (named size_name in messages) rounded up to a multiple of `multiple`: the size pad_hidden and
/// pad_experts give.
/// \throws value_error naming 'multiple' if it is < 1, or if the padded size would exceed 2^31 - 1 neurons
///         (ExpertPartition numbers neurons with int32).
inline std::ptrdiff_t padded_size(std::ptrdiff_t d_ff, std::ptrdiff_t multiple, char const* function,
                                  char const* size_name) {
  if (multiple < 1)
    throw value_error(concat(function, ": argument 'multiple' = ", multiple, " must be >= 1"));
  constexpr std::int64_t kMaxNeurons = std::numeric_limits<std::int32_t>::max();
  // d_ff and multiple below 2^31: the rounded size is below 2^32, no overflow in 64 bits.
  std::int64_t const padded = multiple > kMaxNeurons || d_ff > kMaxNeurons
                                  ? kMaxNeurons + 1
                                  : (std::int64_t{d_ff} + multiple - 1) / multiple * multiple;
  if (padded > kMaxNeurons)
    throw value_error(concat(function, ": argument 'multiple' = ", multiple, " rounds ", size_name, " = ", d_ff,
                             " up beyond 2^31 - 1 neurons (partitions number neurons with int32)"));
  return static_cast<std::ptrdiff_t>(padded);
}

}  // namespace detail

namespace ffn {

/// Zero-neuron padding: returns the dense FFN with d_ff rounded up to a multiple of `multiple` by appending zero
/// neurons (gate row 0, up row 0, down column 0) after the last one; neurons 0..d_ff-1 keep their index and weights.
/// A zero neuron contributes exactly nothing (SiLU(0 . x) * (0 . x) = 0, and its down column is 0), so the padded
/// FFN computes the same function (docs/formats.md, "Padding to whole blocks"). Use: make d_ff a multiple of what a
/// format or a partition needs (32 for q8_0 / q4_0 rows of W_down, or a multiple of the expert count). A block of
/// zeros quantizes to scale 0 and dequantizes to exact zeros. To give each of N experts whole blocks, prefer
/// pad_experts after factorizing: it puts the same number of zero neurons in every expert, whereas a co-activation
/// clustering of a padded FFN groups the (identical) zero neurons into one dead expert. A d_ff that already is a
/// multiple is copied unchanged. Copies; the view is not modified (any row stride is read).
/// \throws shape_error if the dense shapes are inconsistent (DenseFfnView::validate); value_error naming 'multiple'
///         if it is < 1 or the padded d_ff would exceed 2^31 - 1.
template <class T>
DenseFfn<T> pad_hidden(DenseFfnView<T> const& dense, std::ptrdiff_t multiple) {
  static_assert(!is_block_format_v<T>, "pad_hidden: pad the plain-format weights (float, bf16, f16, double), then "
                                       "quantize: a column of W_down is not a block");
  dense.validate("pad_hidden");
  std::ptrdiff_t const d = dense.d_model(), d_ff = dense.d_ff();
  std::ptrdiff_t const padded = detail::padded_size(d_ff, multiple, "pad_hidden", "d_ff");
  DenseFfn<T> out{Matrix<T>({padded, d}), Matrix<T>({padded, d}), Matrix<T>({d, padded})};  // zero-initialized
  for (std::ptrdiff_t i = 0; i < d_ff; ++i)
    for (std::ptrdiff_t k = 0; k < d; ++k) {
      out.gate(i, k) = dense.gate(i, k);
      out.up(i, k) = dense.up(i, k);
    }
  for (std::ptrdiff_t o = 0; o < d; ++o)
    for (std::ptrdiff_t i = 0; i < d_ff; ++i) out.down(o, i) = dense.down(o, i);
  return out;
}

/// Zero-neuron padding of factorized experts: returns experts whose d_expert is rounded up to a multiple of
/// `multiple` by appending zero neurons (gate and up rows 0, down columns 0) at the end of EVERY expert, so each
/// expert, and therefore any MoE built on them with the same router and gating, computes the same function. With
/// m = d_expert, m' the padded size and N experts, the result's partition covers d_ff' = N m' neurons: expert e's
/// slots i < m hold the same neurons as before, its slots m..m'-1 the new neurons d_ff + e (m' - m) + (i - m). So
/// unfactorize(pad_experts(x, k)) == pad_hidden(unfactorize(x), N k) bit for bit (the padding of the dense FFN
/// spread evenly over the experts). Use: d_expert = 172 / 4 = 43 holds no whole 32-weight block; padded to 64 the
/// experts convert to q8_0 / q4_0 (convert_format) and export as llama.cpp's ffn_*_exps.
/// \throws value_error for a default-constructed ExpertWeights (it holds no experts), naming 'multiple' if it is
///         < 1 or the padded d_ff' would exceed 2^31 - 1.
template <class T>
ExpertWeights<T> pad_experts(ExpertWeights<T> const& experts, std::ptrdiff_t multiple) {
  static_assert(!is_block_format_v<T>, "pad_experts: pad the plain-format experts, then convert_format to q8_0 / "
                                       "q4_0 (a row of W_down holds d_expert weights, not whole blocks)");
  if (experts.gate_tensor().empty()) throw value_error("pad_experts: argument 'experts' is default-constructed, holds no experts");
  std::ptrdiff_t const n = experts.n_experts(), m = experts.d_expert(), d = experts.d_model(), d_ff = experts.d_ff();
  std::ptrdiff_t const mp = detail::padded_size(m, multiple, "pad_experts", "d_expert");
  if (mp > std::numeric_limits<std::int32_t>::max() / n)
    throw value_error(detail::concat("pad_experts: argument 'multiple' = ", multiple, " pads ", n, " experts to ", mp,
                                     " neurons each, beyond 2^31 - 1 neurons in all (partitions number neurons with int32)"));
  Tensor<T, 3> gate({n, mp, d}), up({n, mp, d}), down({n, d, mp});  // zero-initialized
  auto const& g = experts.gate_tensor();
  auto const& u = experts.up_tensor();
  auto const& dn = experts.down_tensor();
  for (std::ptrdiff_t e = 0; e < n; ++e) {
    for (std::ptrdiff_t i = 0; i < m; ++i)
      for (std::ptrdiff_t k = 0; k < d; ++k) {
        gate(e, i, k) = g(e, i, k);
        up(e, i, k) = u(e, i, k);
      }
    for (std::ptrdiff_t o = 0; o < d; ++o)
      for (std::ptrdiff_t i = 0; i < m; ++i) down(e, o, i) = dn(e, o, i);
  }
  auto const& perm = experts.partition().permutation();
  std::vector<std::int32_t> padded_perm(static_cast<std::size_t>(n * mp));
  for (std::ptrdiff_t e = 0; e < n; ++e)
    for (std::ptrdiff_t i = 0; i < mp; ++i)
      padded_perm[static_cast<std::size_t>(e * mp + i)] =
          i < m ? perm[static_cast<std::size_t>(e * m + i)] : static_cast<std::int32_t>(d_ff + e * (mp - m) + (i - m));
  return ExpertWeights<T>(std::move(gate), std::move(up), std::move(down),
                          ExpertPartition::from_permutation(std::move(padded_perm), n));
}

}  // namespace ffn
}  // namespace factorllm
