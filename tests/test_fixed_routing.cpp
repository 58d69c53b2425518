// SPDX-License-Identifier: Apache-2.0
// Tests of the fixed routing that recovery takes as data (train/fixed_routing.hpp): the shared-expert layout, refit and
// distillation of a shared-expert layout through the recovery front (train/recovery.hpp), and errors.
#include <catch2/catch.hpp>

#include <factorllm/ffn/factorize.hpp>
#include <factorllm/train/recovery.hpp>

#include "reference/fixtures.hpp"
#include "reference/recovery_fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using ffn::ExpertPartition;
using moe::CombineMode;
using Layer = fixture::RecoveryLayer;

TEST_CASE("fixed_routing with shared experts, and recovery of a shared-expert layout", "[train][recovery]") {
  int const d = 8, d_ff = 32, n_all = 4, n_shared = 1, n_tokens = 80;
  fixture::DenseWeights<double> w(ref::random_ffn(d, d_ff, 240));
  auto const x = fixture::to_matrix<double>(ref::randn(static_cast<std::size_t>(n_tokens * d), 241, 1.0), n_tokens, d);
  auto const router = moe::Router<double>::random(d, n_all - n_shared, 242, 0.5);
  moe::Gating g;
  g.mode = CombineMode::softmax_topk_renorm;
  g.top_k = 2;
  auto const plain = train::fixed_routing(router, g, x.cview());
  auto const shared = train::fixed_routing(router, g, x.cview(), n_shared);
  REQUIRE(shared.ids.extent(1) == n_shared + 2);
  for (int t = 0; t < n_tokens; ++t) {
    CHECK(shared.ids(t, 0) == 0);
    CHECK(shared.weights(t, 0) == 1.0);
    for (int j = 0; j < 2; ++j) {
      CHECK(shared.ids(t, 1 + j) == plain.ids(t, j) + 1);
      CHECK(shared.weights(t, 1 + j) == plain.weights(t, j));
    }
  }
  auto experts = ffn::factorize(w.view(), ExpertPartition::random(d_ff, n_all, 243));
  auto const rr = train::recover_refit(experts, shared, x.cview(), w.view(), 1e-3);
  CHECK(rr.final_relative_error < rr.initial_relative_error);
  train::DistillConfig cfg;
  cfg.steps = 50;
  auto const rd = train::recover_distill(experts, shared, x.cview(), w.view(), cfg);
  CHECK(rd.final_relative_error < rd.initial_relative_error);
}

TEST_CASE("fixed_routing rejects bad inputs with the documented exceptions", "[train][recovery][errors]") {
  Layer const L(250);
  auto const router = L.router();
  auto const x = L.x.cview();
  CHECK_THROWS_AS(train::fixed_routing(router, L.gating, x, -1), value_error);
}
