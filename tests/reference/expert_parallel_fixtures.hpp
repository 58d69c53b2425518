// SPDX-License-Identifier: Apache-2.0
// Fixtures shared by the expert-parallel tests (tests/test_expert_parallel.cpp: ranks simulated in memory;
// tests/mpi/test_expert_parallel_mpi.cpp: real MPI ranks): one random layer, its tokens split over ranks, the
// single-process reference (MoeFfn forward, train::moe_backward, both on the CpuScalar oracle) and the placements.
#pragma once

#include <factorllm/moe/expert_placement.hpp>
#include <factorllm/moe/expert_shard.hpp>
#include <factorllm/moe/moe_ffn.hpp>
#include <factorllm/train/moe_backward.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fixtures.hpp"
#include "reference.hpp"

namespace ep_fixture {

using namespace factorllm;

/// One layer (weights and activations of type T: float, or double where bitwise checks must see double rounding) with n_experts experts of d_expert neurons, its gating, and n_tokens random tokens
/// with a random dL/dy, all fixed by the seed.
template <class T = float>
struct Problem {
  std::ptrdiff_t d_model, d_expert, n_experts, top_k, n_tokens;
  ffn::ExpertWeights<T> experts;
  moe::Router<T> router;
  moe::Gating gating;
  Matrix<T> x, dy;

  Problem(std::ptrdiff_t d, std::ptrdiff_t m, std::ptrdiff_t n, std::ptrdiff_t k, std::ptrdiff_t t, std::uint64_t seed,
          moe::CombineMode mode = moe::CombineMode::softmax_topk_renorm)
      : d_model(d), d_expert(m), n_experts(n), top_k(k), n_tokens(t),
        experts(ffn::factorize(fixture::DenseWeights<T>(ref::random_ffn(static_cast<int>(d), static_cast<int>(m * n), seed)).view(),
                               ffn::ExpertPartition::contiguous(m * n, n))),
        router(moe::Router<T>::random(d, n, seed + 7, 0.5)), x({t, d}), dy({t, d}) {
    gating.mode = mode;
    gating.top_k = k;
    auto const xv = ref::randn(static_cast<std::size_t>(t * d), seed + 11, 1.0);
    auto const gv = ref::randn(static_cast<std::size_t>(t * d), seed + 13, 1.0);
    for (std::ptrdiff_t i = 0; i < x.size(); ++i) {
      x[i] = static_cast<T>(xv[static_cast<std::size_t>(i)]);
      dy[i] = static_cast<T>(gv[static_cast<std::size_t>(i)]);
    }
  }
};

/// Tokens [first[r], first[r+1]) belong to rank r: rank r gets about (r + 1) / sum shares (unequal batches; with
/// fewer tokens than ranks the first ranks get none).
inline std::vector<std::ptrdiff_t> token_split(std::ptrdiff_t n_tokens, std::ptrdiff_t n_ranks) {
  std::vector<std::ptrdiff_t> first(static_cast<std::size_t>(n_ranks) + 1, 0);
  for (std::ptrdiff_t r = 0; r <= n_ranks; ++r)
    first[static_cast<std::size_t>(r)] = n_tokens * r * (r + 1) / (n_ranks * (n_ranks + 1));
  return first;
}

/// The single-process results on all tokens: y (MoeFfn<T, CpuScalar>), the training forward's routing and the
/// oracle backward's gradients (train::moe_backward<CpuScalar>).
template <class T = float>
struct Reference {
  Matrix<T> y, dx, dlogits, d_router_w;
  Tensor<T, 3> d_gate, d_up, d_down;
  Vector<T> d_router_b;

  explicit Reference(Problem<T> const& p)
      : y({p.n_tokens, p.d_model}), dx({p.n_tokens, p.d_model}), dlogits({p.n_tokens, p.n_experts}),
        d_router_w({p.n_experts, p.d_model}), d_gate({p.n_experts, p.d_expert, p.d_model}),
        d_up({p.n_experts, p.d_expert, p.d_model}), d_down({p.n_experts, p.d_model, p.d_expert}), d_router_b({p.n_experts}) {
    moe::MoeFfn<T, CpuScalar> layer(p.experts, p.router, p.gating);
    layer.forward(p.x.cview(), y.view());
    auto const params = train::params_view(p.experts, p.router);
    moe::RoutingRecord<T> record;
    Matrix<T> y_train({p.n_tokens, p.d_model});
    Workspace wf(train::moe_forward_workspace_bytes(params, p.top_k, p.n_tokens));
    train::moe_forward(params, p.gating, p.x.cview(), y_train.view(), record, wf);
    Workspace wb(train::moe_backward_workspace_bytes(params, p.top_k, p.n_tokens));
    train::moe_backward(params, p.gating, record, p.x.cview(), p.dy.cview(),
                        MoeGradsView<T>{dx.view(), d_gate.view(), d_up.view(), d_down.view(), d_router_w.view(),
                                            d_router_b.view(), dlogits.view()},
                        wb);
  }
};

/// The placements every test runs for n_ranks ranks: contiguous blocks (when they fit), a reversed interleaved
/// user map, and (with 2 or more ranks) a map that leaves the last rank without experts.
inline std::vector<std::pair<std::string, moe::ExpertPlacement>> placements(std::ptrdiff_t n_experts, std::ptrdiff_t n_ranks) {
  std::vector<std::pair<std::string, moe::ExpertPlacement>> out;
  if (n_ranks <= n_experts) out.emplace_back("contiguous", moe::ExpertPlacement::contiguous(n_experts, n_ranks));
  std::vector<std::int32_t> map(static_cast<std::size_t>(n_experts));
  for (std::ptrdiff_t e = 0; e < n_experts; ++e) map[static_cast<std::size_t>(e)] = static_cast<std::int32_t>((n_experts - 1 - e) % n_ranks);
  out.emplace_back("interleaved map", moe::ExpertPlacement::from_map(map, n_ranks));
  if (n_ranks >= 2) {
    for (std::ptrdiff_t e = 0; e < n_experts; ++e)
      map[static_cast<std::size_t>(e)] = static_cast<std::int32_t>((e * 7 + 3) % (n_ranks - 1));
    out.emplace_back("map with an idle rank", moe::ExpertPlacement::from_map(map, n_ranks));
  }
  return out;
}

/// Number of elements where a and b differ as bit patterns (0 = bitwise equal).
template <class T>
std::ptrdiff_t bit_mismatches(T const* a, T const* b, std::ptrdiff_t n) {
  std::ptrdiff_t bad = 0;
  for (std::ptrdiff_t i = 0; i < n; ++i) bad += std::memcmp(a + i, b + i, sizeof(T)) != 0;
  return bad;
}

}  // namespace ep_fixture
