// SPDX-License-Identifier: Apache-2.0
// ExpertPlacement: which rank of an expert-parallel group holds each expert (docs/expert_parallel.md §1).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "../core/error.hpp"

namespace factorllm {
namespace moe {

/// A validated map expert -> rank for n_experts experts over n_ranks ranks: every expert on exactly one rank.
/// Each rank's experts are kept in increasing expert order; local index i of rank r is its i-th expert. A rank may
/// hold no expert (it still routes its own tokens). Immutable; cheap to copy (O(n_experts)).
class ExpertPlacement {
 public:
  /// Contiguous blocks: rank r holds experts [r * n_experts / n_ranks, (r + 1) * n_experts / n_ranks) (blocks
  /// differ by at most one expert when n_ranks does not divide n_experts).
  /// \throws value_error if n_experts < 1 or n_ranks is outside [1, n_experts] (a rank count that does not fit:
  ///         some rank would hold no contiguous block).
  static ExpertPlacement contiguous(std::ptrdiff_t n_experts, std::ptrdiff_t n_ranks) {
    check_counts(n_experts, n_ranks, "ExpertPlacement::contiguous");
    if (n_ranks > n_experts)
      throw value_error(detail::concat("ExpertPlacement::contiguous: n_ranks = ", n_ranks, " does not fit n_experts = ",
                                       n_experts, " (contiguous blocks need 1 <= n_ranks <= n_experts)"));
    std::vector<std::int32_t> map(static_cast<std::size_t>(n_experts));
    for (std::ptrdiff_t r = 0; r < n_ranks; ++r)
      for (std::ptrdiff_t e = r * n_experts / n_ranks; e < (r + 1) * n_experts / n_ranks; ++e)
        map[static_cast<std::size_t>(e)] = static_cast<std::int32_t>(r);
    return ExpertPlacement(std::move(map), n_ranks);
  }

  /// A user map: rank_of_expert[e] is the rank holding expert e.
  /// \throws value_error if the map is empty, n_ranks < 1, or an entry is outside [0, n_ranks) (an expert on no
  ///         rank of the group).
  static ExpertPlacement from_map(std::vector<std::int32_t> rank_of_expert, std::ptrdiff_t n_ranks) {
    check_counts(static_cast<std::ptrdiff_t>(rank_of_expert.size()), n_ranks, "ExpertPlacement::from_map");
    for (std::size_t e = 0; e < rank_of_expert.size(); ++e)
      if (rank_of_expert[e] < 0 || rank_of_expert[e] >= n_ranks)
        throw value_error(detail::concat("ExpertPlacement::from_map: argument 'rank_of_expert' puts expert ", e,
                                         " on rank ", rank_of_expert[e], ", outside [0, n_ranks = ", n_ranks,
                                         "): every expert must be on exactly one rank of the group"));
    return ExpertPlacement(std::move(rank_of_expert), n_ranks);
  }

  /// Per-rank lists: experts_of_rank[r] lists the experts rank r holds (any order; n_ranks = its size).
  /// \throws value_error if n_experts < 1, there are no ranks, an entry is outside [0, n_experts), an expert is listed
  ///         on two ranks (or twice on one), or an expert is on no rank.
  static ExpertPlacement from_rank_lists(std::ptrdiff_t n_experts, std::vector<std::vector<std::int32_t>> const& experts_of_rank) {
    auto const n_ranks = static_cast<std::ptrdiff_t>(experts_of_rank.size());
    check_counts(n_experts, n_ranks, "ExpertPlacement::from_rank_lists");
    std::vector<std::int32_t> map(static_cast<std::size_t>(n_experts), -1);
    for (std::ptrdiff_t r = 0; r < n_ranks; ++r)
      for (std::int32_t e : experts_of_rank[static_cast<std::size_t>(r)]) {
        if (e < 0 || e >= n_experts)
          throw value_error(detail::concat("ExpertPlacement::from_rank_lists: rank ", r, " lists expert ", e,
                                           ", outside [0, n_experts = ", n_experts, ")"));
        std::int32_t& owner = map[static_cast<std::size_t>(e)];
        if (owner >= 0)
          throw value_error(detail::concat("ExpertPlacement::from_rank_lists: expert ", e, " is on rank ", owner,
                                           " and on rank ", r, ": every expert must be on exactly one rank"));
        owner = static_cast<std::int32_t>(r);
      }
    for (std::ptrdiff_t e = 0; e < n_experts; ++e)
      if (map[static_cast<std::size_t>(e)] < 0)
        throw value_error(detail::concat("ExpertPlacement::from_rank_lists: expert ", e,
                                         " is on no rank: every expert must be on exactly one rank"));
    return ExpertPlacement(std::move(map), n_ranks);
  }

  std::ptrdiff_t n_experts() const noexcept { return static_cast<std::ptrdiff_t>(rank_.size()); }
  std::ptrdiff_t n_ranks() const noexcept { return static_cast<std::ptrdiff_t>(first_.size()) - 1; }
  /// The rank holding expert e. \throws value_error for e outside [0, n_experts).
  std::int32_t rank_of(std::ptrdiff_t e) const { return rank_[check_expert(e)]; }
  /// Expert e's index among its rank's experts. \throws value_error for e outside [0, n_experts).
  std::int32_t local_index(std::ptrdiff_t e) const { return local_[check_expert(e)]; }
  /// Number of experts rank r holds. \throws value_error for r outside [0, n_ranks).
  std::ptrdiff_t n_local(std::ptrdiff_t r) const { return first_[check_rank(r) + 1] - first_[check_rank(r)]; }
  /// The largest n_local over all ranks.
  std::ptrdiff_t max_local() const noexcept { return max_local_; }
  /// The i-th expert of rank r (increasing expert order). \throws value_error for r or i out of range.
  std::int32_t expert_of(std::ptrdiff_t r, std::ptrdiff_t i) const {
    if (i < 0 || i >= n_local(r))
      throw value_error(detail::concat("ExpertPlacement::expert_of: local index ", i, " is outside [0, ", n_local(r),
                                       ") for rank ", r));
    return by_rank_[static_cast<std::size_t>(first_[static_cast<std::size_t>(r)] + i)];
  }
  /// The experts of rank r, in increasing order. \throws value_error for r outside [0, n_ranks).
  std::vector<std::int32_t> experts_of(std::ptrdiff_t r) const {
    auto const b = first_[check_rank(r)], en = first_[check_rank(r) + 1];
    return std::vector<std::int32_t>(by_rank_.begin() + b, by_rank_.begin() + en);
  }

  /// Checks that this placement is for a group of `group_size` ranks and `n_experts` experts (e.g. an MPI
  /// communicator's size and a layer's expert count).
  /// \throws value_error naming `fn` and both counts otherwise.
  void require_fits(std::ptrdiff_t group_size, std::ptrdiff_t n_experts_expected, char const* fn) const {
    if (group_size != n_ranks())
      throw value_error(detail::concat(fn, ": the placement is for ", n_ranks(), " rank(s), the group has ", group_size,
                                       " (a rank count that does not fit)"));
    if (n_experts_expected != n_experts())
      throw value_error(detail::concat(fn, ": the placement places ", n_experts(), " expert(s), the layer has ",
                                       n_experts_expected));
  }

 private:
  ExpertPlacement(std::vector<std::int32_t> map, std::ptrdiff_t n_ranks)
      : rank_(std::move(map)), local_(rank_.size()), first_(static_cast<std::size_t>(n_ranks) + 1, 0) {
    // Counting sort by rank: by_rank_ lists each rank's experts in increasing order.
    for (std::int32_t r : rank_) ++first_[static_cast<std::size_t>(r) + 1];
    for (std::ptrdiff_t r = 0; r < n_ranks; ++r) {
      max_local_ = std::max<std::ptrdiff_t>(max_local_, first_[static_cast<std::size_t>(r) + 1]);
      first_[static_cast<std::size_t>(r) + 1] += first_[static_cast<std::size_t>(r)];
    }
    by_rank_.resize(rank_.size());
    std::vector<std::ptrdiff_t> cursor(first_.begin(), first_.end() - 1);
    for (std::size_t e = 0; e < rank_.size(); ++e) {
      auto const r = static_cast<std::size_t>(rank_[e]);
      local_[e] = static_cast<std::int32_t>(cursor[r] - first_[r]);
      by_rank_[static_cast<std::size_t>(cursor[r]++)] = static_cast<std::int32_t>(e);
    }
  }
  static void check_counts(std::ptrdiff_t n_experts, std::ptrdiff_t n_ranks, char const* fn) {
    if (n_experts < 1 || n_experts > std::numeric_limits<std::int32_t>::max())
      throw value_error(detail::concat(fn, ": n_experts must be in [1, 2^31 - 1], got ", n_experts));
    if (n_ranks < 1 || n_ranks > std::numeric_limits<std::int32_t>::max())
      throw value_error(detail::concat(fn, ": n_ranks must be in [1, 2^31 - 1], got ", n_ranks));
  }
  std::size_t check_expert(std::ptrdiff_t e) const {
    if (e < 0 || e >= n_experts())
      throw value_error(detail::concat("ExpertPlacement: expert ", e, " is outside [0, n_experts = ", n_experts(), ")"));
    return static_cast<std::size_t>(e);
  }
  std::size_t check_rank(std::ptrdiff_t r) const {
    if (r < 0 || r >= n_ranks())
      throw value_error(detail::concat("ExpertPlacement: rank ", r, " is outside [0, n_ranks = ", n_ranks(), ")"));
    return static_cast<std::size_t>(r);
  }

  std::vector<std::int32_t> rank_;     // [n_experts] rank of each expert
  std::vector<std::int32_t> local_;    // [n_experts] index among its rank's experts
  std::vector<std::ptrdiff_t> first_;  // [n_ranks + 1] rank r's experts are by_rank_[first_[r] .. first_[r+1])
  std::vector<std::int32_t> by_rank_;  // [n_experts] experts grouped by rank, increasing within a rank
  std::ptrdiff_t max_local_ = 0;
};

}  // namespace moe
}  // namespace factorllm
