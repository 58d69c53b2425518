// SPDX-License-Identifier: Apache-2.0
// Test fixtures of layer-local recovery (fixed routing, refit, distillation): a router from reference doubles and a
// small random layer with its router and gating.
#pragma once

#include <factorllm/core/tensor.hpp>
#include <factorllm/ffn/permutation.hpp>
#include <factorllm/moe/gating.hpp>
#include <factorllm/moe/router.hpp>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "fixtures.hpp"
#include "reference.hpp"

namespace fixture {

/// A router of n experts over d inputs from reference weights w [n * d] and bias b [n], in type A.
template <class A>
factorllm::moe::Router<A> router_from(ref::Vec const& w, ref::Vec const& b, int n, int d) {
  factorllm::Vector<A> bv({n});
  for (int i = 0; i < n; ++i) bv[i] = static_cast<A>(b[static_cast<std::size_t>(i)]);
  return factorllm::moe::Router<A>(fixture::to_matrix<A>(w, n, d), std::move(bv));
}

/// A small random layer in double with a softmax_topk_renorm K = 2 of 4 router.
struct RecoveryLayer {
  int d = 6, d_ff = 12, n = 4, m = 3, k = 2, n_tokens = 60;
  ref::Ffn f;
  fixture::DenseWeights<double> w;
  factorllm::ffn::ExpertPartition part;
  ref::Vec xv, rw, rb;
  factorllm::Matrix<double> x;
  factorllm::moe::Gating gating;
  explicit RecoveryLayer(std::uint64_t seed,
                         factorllm::moe::CombineMode mode = factorllm::moe::CombineMode::softmax_topk_renorm)
      : f(ref::random_ffn(d, d_ff, seed)), w(f), part(factorllm::ffn::ExpertPartition::random(d_ff, n, seed + 1)),
        xv(ref::randn(static_cast<std::size_t>(n_tokens * d), seed + 2, 1.0)),
        rw(ref::randn(static_cast<std::size_t>(n * d), seed + 3, 0.7)), rb(ref::randn(static_cast<std::size_t>(n), seed + 4, 0.3)),
        x(fixture::to_matrix<double>(xv, n_tokens, d)) {
    gating.mode = mode;
    gating.top_k = k;
  }
  factorllm::moe::Router<double> router() const { return router_from<double>(rw, rb, n, d); }
};

}  // namespace fixture
