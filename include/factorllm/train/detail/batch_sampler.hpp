// SPDX-License-Identifier: Apache-2.0
// Internal: the seeded minibatch order of the layer-local trainers (router training and expert distillation).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

namespace factorllm {
namespace detail {

/// Draws minibatches of a fixed size from [0, n_tokens): epochs of a seeded Fisher-Yates shuffle (the library's
/// own unbiased index draw, identical on every platform), continued across epoch boundaries so every batch has
/// the same size (no reallocation in the step loop).
class BatchSampler {
 public:
  /// Starts the first epoch: a shuffle of [0, n_tokens) seeded by seed.
  BatchSampler(std::ptrdiff_t n_tokens, std::uint64_t seed) : order_(static_cast<std::size_t>(n_tokens)), rng_(seed) {
    std::iota(order_.begin(), order_.end(), std::ptrdiff_t{0});
    shuffle();
  }
  /// Returns the next token index (a new shuffle starts when an epoch is used up).
  std::ptrdiff_t next() {
    if (pos_ == order_.size()) {
      shuffle();
      pos_ = 0;
    }
    return order_[pos_++];
  }

 private:
  void shuffle() {
    for (std::size_t i = order_.size(); i > 1; --i) {
      std::uint64_t const bound = i;
      std::uint64_t const limit = std::numeric_limits<std::uint64_t>::max() - std::numeric_limits<std::uint64_t>::max() % bound;
      std::uint64_t r;
      do r = rng_(); while (r >= limit);
      std::swap(order_[i - 1], order_[static_cast<std::size_t>(r % bound)]);
    }
  }
  std::vector<std::ptrdiff_t> order_;
  std::mt19937_64 rng_;
  std::size_t pos_ = 0;
};

}  // namespace detail
}  // namespace factorllm
