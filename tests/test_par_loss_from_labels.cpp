// SPDX-License-Identifier: Apache-2.0
// Tests of the PAR loss given known pseudo-labels (train/par_loss_from_labels.hpp): equal to train::par_loss given the
// oracle's labels, and errors.
#include <catch2/catch.hpp>

#include <factorllm/ffn/factorize.hpp>
#include <factorllm/moe/router.hpp>
#include <factorllm/train/oracle_labels.hpp>
#include <factorllm/train/par_loss.hpp>
#include <factorllm/train/par_loss_from_labels.hpp>

#include <vector>

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using ffn::ExpertPartition;
using fixture::same_bits;

TEST_CASE("par_loss_from_labels equals par_loss given the oracle's labels", "[train][router]") {
  int const d = 10, d_ff = 24, n_tokens = 17;
  for (int n : {3, 4, 8}) {
    fixture::DenseWeights<double> w(ref::random_ffn(d, d_ff, 60 + static_cast<std::uint64_t>(n)));
    auto const experts = ffn::factorize(w.view(), ExpertPartition::random(d_ff, n, 61));
    auto const x = fixture::to_matrix<double>(ref::randn(static_cast<std::size_t>(n_tokens * d), 62, 1.0), n_tokens, d);
    auto const router = moe::Router<double>(fixture::to_matrix<double>(ref::randn(static_cast<std::size_t>(n * d), 63, 0.5), n, d),
                                            [&] {
                                              Vector<double> b({n});
                                              for (int e = 0; e < n; ++e) b[e] = 0.1 * e;
                                              return b;
                                            }());
    for (int k = 1; k <= n; ++k) {
      INFO("n=" << n << " k=" << k);
      auto const expect = train::par_loss(x.cview(), w.view(), experts, router, k);
      auto const labels = train::par_oracle_labels(x.cview(), w.view(), experts, k);
      REQUIRE(same_bits(labels, expect.pseudo_label));
      train::ParLossResult<double> got;
      Workspace ws(train::par_loss_from_labels_workspace_bytes(d, n, k));
      train::par_loss_from_labels(x.cview(), labels.cview(), router, k, train::ParLossConfig{}, got, ws);
      CHECK(got.par_loss == Approx(expect.par_loss).epsilon(1e-12));
      CHECK(got.balance_loss == Approx(expect.balance_loss).epsilon(1e-12));
      CHECK(got.total_loss == Approx(expect.total_loss).epsilon(1e-12));
      CHECK(got.label_accuracy == expect.label_accuracy);
      REQUIRE(same_bits(got.router_topk, expect.router_topk));
      // Absolute floor 1e-6 (gradients here are ~1e-2): for K = N the balance gradient is rounding noise (~1e-17).
      CHECK(ref::max_rel(got.grad_weight.data(), expect.grad_weight.data(), static_cast<std::size_t>(n * d), 1e-6) < 1e-10);
      CHECK(ref::max_rel(got.grad_bias.data(), expect.grad_bias.data(), static_cast<std::size_t>(n), 1e-6) < 1e-10);
      CHECK(ref::max_rel(got.grad_weight_par.data(), expect.grad_weight_par.data(), static_cast<std::size_t>(n * d), 1e-6) < 1e-10);
      CHECK(ref::max_rel(got.grad_weight_balance.data(), expect.grad_weight_balance.data(), static_cast<std::size_t>(n * d), 1e-6) <
            1e-10);
    }
  }
}

TEST_CASE("par_loss_from_labels rejects bad inputs with the documented exceptions", "[train][router][errors]") {
  int const d = 6, n = 4;
  auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(8 * d), 96, 1.0), 8, d);
  auto r = moe::Router<float>::random(d, n, 1);
  // par_loss_from_labels: labels outside [0, N), wrong shape, too small a workspace.
  Matrix<std::int32_t> labels({8, 2});
  labels(3, 1) = 4;
  train::ParLossResult<float> out;
  Workspace ws(train::par_loss_from_labels_workspace_bytes(d, n, 2));
  CHECK_THROWS_AS(train::par_loss_from_labels(x.cview(), labels.cview(), r, 2, train::ParLossConfig{}, out, ws), value_error);
  labels(3, 1) = 1;
  CHECK_THROWS_AS(train::par_loss_from_labels(x.cview(), labels.cview().slice_rows(0, 7), r, 2, train::ParLossConfig{}, out, ws),
                  shape_error);
  Workspace small(16);
  CHECK_THROWS_AS(train::par_loss_from_labels(x.cview(), labels.cview(), r, 2, train::ParLossConfig{}, out, small), backend_error);
}
