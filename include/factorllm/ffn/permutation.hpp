// SPDX-License-Identifier: Apache-2.0
// ExpertPartition: one permutation of the d_ff intermediate neurons plus the number of experts (docs/math.md §1.2, 1.3).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "../core/error.hpp"

namespace factorllm {
namespace ffn {

/// How the d_ff intermediate neurons of a SwiGLU FFN are split into n_experts equal experts.
///
/// Expert e owns the neurons permutation()[e * d_expert, (e + 1) * d_expert) (docs/math.md §1.2): the SAME
/// permutation is applied to gate rows, up rows and down columns, which is what keeps the sum of all
/// experts equal to the dense FFN. Immutable once built; every builder validates its input.
class ExpertPartition {
 public:
  /// Identity permutation: expert e owns neurons [e*m, (e+1)*m), as the paper's code does (docs/math.md §1.3, Q2).
  /// \throws value_error if n_experts < 1, d_ff < 1 or d_ff is not divisible by n_experts.
  static ExpertPartition contiguous(std::int64_t d_ff, std::int64_t n_experts) {
    check_sizes(d_ff, n_experts, "ExpertPartition::contiguous");
    std::vector<std::int32_t> perm(static_cast<std::size_t>(d_ff));
    for (std::int64_t i = 0; i < d_ff; ++i) perm[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
    return ExpertPartition(std::move(perm), n_experts);
  }

  /// A uniformly random permutation from a seeded std::mt19937_64 (Fisher-Yates with our own index
  /// draw, so the result is the same on every standard library).
  static ExpertPartition random(std::int64_t d_ff, std::int64_t n_experts, std::uint64_t seed) {
    check_sizes(d_ff, n_experts, "ExpertPartition::random");
    std::vector<std::int32_t> perm(static_cast<std::size_t>(d_ff));
    for (std::int64_t i = 0; i < d_ff; ++i) perm[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
    std::mt19937_64 rng(seed);
    for (std::int64_t i = d_ff - 1; i > 0; --i) {
      // Unbiased draw of j in [0, i] by rejection (std::uniform_int_distribution is implementation-defined).
      std::uint64_t const bound = static_cast<std::uint64_t>(i) + 1;
      std::uint64_t const limit = std::numeric_limits<std::uint64_t>::max() - std::numeric_limits<std::uint64_t>::max() % bound;
      std::uint64_t r;
      do r = rng(); while (r >= limit);
      std::swap(perm[static_cast<std::size_t>(i)], perm[static_cast<std::size_t>(r % bound)]);
    }
    return ExpertPartition(std::move(perm), n_experts);
  }

  /// Uses a caller-given permutation of [0, d_ff).
  /// \throws value_error if `permutation` is not a permutation (out-of-range or repeated index) or its
  ///         length is not divisible by n_experts.
  static ExpertPartition from_permutation(std::vector<std::int32_t> permutation, std::int64_t n_experts) {
    auto const d_ff = static_cast<std::int64_t>(permutation.size());
    check_sizes(d_ff, n_experts, "ExpertPartition::from_permutation");
    std::vector<char> seen(permutation.size(), 0);
    for (std::size_t i = 0; i < permutation.size(); ++i) {
      auto const v = permutation[i];
      if (v < 0 || v >= d_ff)
        throw value_error(detail::concat("ExpertPartition::from_permutation: argument 'permutation' entry ", i, " = ", v,
                                         " is outside [0, ", d_ff, ")"));
      if (seen[static_cast<std::size_t>(v)])
        throw value_error(detail::concat("ExpertPartition::from_permutation: argument 'permutation' repeats neuron ", v,
                                         " (at entry ", i, "): not a permutation"));
      seen[static_cast<std::size_t>(v)] = 1;
    }
    return ExpertPartition(std::move(permutation), n_experts);
  }

  /// Builds the partition from the expert each neuron belongs to. Balanced: every expert must own exactly
  /// d_ff / n_experts neurons. Within an expert, neurons keep their original (ascending) order.
  /// \throws value_error if an entry is outside [0, n_experts) or the assignment is not balanced.
  static ExpertPartition from_assignment(std::vector<std::int32_t> const& expert_of_neuron, std::int64_t n_experts) {
    auto const d_ff = static_cast<std::int64_t>(expert_of_neuron.size());
    check_sizes(d_ff, n_experts, "ExpertPartition::from_assignment");
    std::int64_t const d_expert = d_ff / n_experts;
    std::vector<std::int64_t> count(static_cast<std::size_t>(n_experts), 0);
    for (std::size_t i = 0; i < expert_of_neuron.size(); ++i) {
      auto const e = expert_of_neuron[i];
      if (e < 0 || e >= n_experts)
        throw value_error(detail::concat("ExpertPartition::from_assignment: argument 'expert_of_neuron' entry ", i, " = ",
                                         e, " is outside [0, ", n_experts, ")"));
      ++count[static_cast<std::size_t>(e)];
    }
    for (std::int64_t e = 0; e < n_experts; ++e)
      if (count[static_cast<std::size_t>(e)] != d_expert)
        throw value_error(detail::concat("ExpertPartition::from_assignment: expert ", e, " has ",
                                         count[static_cast<std::size_t>(e)], " neurons; a balanced partition needs ",
                                         d_expert, " (d_ff ", d_ff, " / n_experts ", n_experts, ")"));
    std::vector<std::int64_t> next(static_cast<std::size_t>(n_experts));
    for (std::int64_t e = 0; e < n_experts; ++e) next[static_cast<std::size_t>(e)] = e * d_expert;
    std::vector<std::int32_t> perm(static_cast<std::size_t>(d_ff));
    for (std::int64_t i = 0; i < d_ff; ++i) {
      auto const e = static_cast<std::size_t>(expert_of_neuron[static_cast<std::size_t>(i)]);
      perm[static_cast<std::size_t>(next[e]++)] = static_cast<std::int32_t>(i);
    }
    return ExpertPartition(std::move(perm), n_experts);
  }

  std::int64_t d_ff() const noexcept { return static_cast<std::int64_t>(perm_.size()); }
  std::int64_t n_experts() const noexcept { return n_experts_; }
  std::int64_t d_expert() const noexcept { return d_ff() / n_experts_; }
  /// permutation()[p] = original neuron placed at permuted position p.
  std::vector<std::int32_t> const& permutation() const noexcept { return perm_; }
  /// Returns the inverse permutation: inverse()[neuron] = its permuted position.
  std::vector<std::int32_t> inverse() const {
    std::vector<std::int32_t> inv(perm_.size());
    for (std::size_t p = 0; p < perm_.size(); ++p) inv[static_cast<std::size_t>(perm_[p])] = static_cast<std::int32_t>(p);
    return inv;
  }
  /// Returns the expert owning each original neuron.
  std::vector<std::int32_t> assignment() const {
    std::vector<std::int32_t> a(perm_.size());
    for (std::size_t p = 0; p < perm_.size(); ++p)
      a[static_cast<std::size_t>(perm_[p])] = static_cast<std::int32_t>(static_cast<std::int64_t>(p) / d_expert());
    return a;
  }

 private:
  ExpertPartition(std::vector<std::int32_t> perm, std::int64_t n_experts) : perm_(std::move(perm)), n_experts_(n_experts) {}

  static void check_sizes(std::int64_t d_ff, std::int64_t n_experts, char const* function) {
    if (n_experts < 1) throw value_error(detail::concat(function, ": n_experts must be >= 1, got ", n_experts));
    if (d_ff < 1) throw value_error(detail::concat(function, ": d_ff must be >= 1, got ", d_ff));
    if (d_ff > std::numeric_limits<std::int32_t>::max())
      throw value_error(detail::concat(function, ": d_ff ", d_ff, " exceeds the int32 index range"));
    if (d_ff % n_experts != 0)
      throw value_error(detail::concat(function, ": d_ff (", d_ff, ") is not divisible by n_experts (", n_experts,
                                       "); experts must be equal (docs/math.md §1.2)"));
  }

  std::vector<std::int32_t> perm_;
  std::int64_t n_experts_ = 1;
};

}  // namespace ffn
}  // namespace factorllm
