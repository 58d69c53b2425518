// SPDX-License-Identifier: Apache-2.0
// Tests of the PAR loss and the balance term (docs/math.md §3.2): values and labels against an independent double
// reference, gradients against central finite differences, the target-q table, clipping, errors.
#include <catch2/catch.hpp>

#include <factorllm/ffn/factorize.hpp>
#include <factorllm/train/par_loss.hpp>

#include <cmath>
#include <vector>

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using ffn::ExpertPartition;

namespace {
struct Problem {
  int d = 10, d_ff = 24, n = 4, n_tokens = 13;
  ref::Ffn f;
  fixture::DenseWeights<double> w;
  ExpertPartition part;
  ffn::ExpertWeights<double> experts;
  ref::Vec xv, rw, rb;
  Matrix<double> x;
  Problem(int n_experts, std::uint64_t seed, double router_scale = 0.5)
      : n(n_experts),
        f(ref::random_ffn(d, d_ff, seed)),
        w(f),
        part(ExpertPartition::random(d_ff, n, seed + 1)),
        experts(ffn::factorize(w.view(), part)),
        xv(ref::randn(static_cast<std::size_t>(n_tokens * d), seed + 2, 1.0)),
        rw(ref::randn(static_cast<std::size_t>(n * d), seed + 3, router_scale)),
        rb(ref::randn(static_cast<std::size_t>(n), seed + 4, router_scale)),
        x(fixture::to_matrix<double>(xv, n_tokens, d)) {}
  moe::Router<double> router(ref::Vec const& w_r, ref::Vec const& b_r) const {
    return moe::Router<double>(fixture::to_matrix<double>(w_r, n, d), [&] {
      Vector<double> b({n});
      for (int i = 0; i < n; ++i) b[i] = b_r[static_cast<std::size_t>(i)];
      return b;
    }());
  }
  train::ParLossResult<double> eval(ref::Vec const& w_r, ref::Vec const& b_r, int k) const {
    return train::par_loss(x.cview(), w.view(), experts, router(w_r, b_r), k);
  }
};
}  // namespace

TEST_CASE("PAR target q matches docs/math.md §3.2 table (N = 4)", "[train][par]") {
  CHECK(train::par_target_q(4, 1).selected == Approx(0.47537).margin(5e-6));
  CHECK(train::par_target_q(4, 1).unselected == Approx(0.17488).margin(5e-6));
  CHECK(train::par_target_q(4, 2).selected == Approx(0.36553).margin(5e-6));
  CHECK(train::par_target_q(4, 2).unselected == Approx(0.13447).margin(5e-6));
  CHECK(train::par_target_q(4, 3).selected == Approx(0.29692).margin(5e-6));
  CHECK(train::par_target_q(4, 3).unselected == Approx(0.10923).margin(5e-6));
  for (int k = 1; k <= 4; ++k) {  // q sums to one
    auto const q = train::par_target_q(4, k);
    CHECK(k * q.selected + (4 - k) * q.unselected == Approx(1.0).epsilon(1e-14));
  }
}

TEST_CASE("PAR and balance losses match the double reference", "[train][par]") {
  // N = 2, K = 1 is excluded: there e_0 + e_1 = f makes both MSEs to f/2 equal in exact arithmetic, so the
  // label is decided by rounding (a true tie); every other (N, K) has distinct MSEs.
  for (int n : {3, 4, 8}) {
    for (int k = 1; k <= n; ++k) {
      Problem p(n, 10 + static_cast<std::uint64_t>(n));
      auto const r = p.eval(p.rw, p.rb, k);
      auto const e = ref::par(p.f, p.part.permutation(), n, k, p.rw, p.rb, p.xv, p.n_tokens);
      INFO("n=" << n << " k=" << k);
      CHECK(r.par_loss == Approx(e.par).epsilon(1e-12));
      CHECK(r.balance_loss == Approx(e.balance).epsilon(1e-12));
      CHECK(r.total_loss == Approx(0.05 * e.par + 0.01 * e.balance).epsilon(1e-12));
      CHECK(r.label_accuracy == Approx(e.accuracy));
      for (int t = 0; t < p.n_tokens; ++t)
        for (int j = 0; j < k; ++j) {
          REQUIRE(r.pseudo_label(t, j) == e.labels[static_cast<std::size_t>(t)][static_cast<std::size_t>(j)]);
          REQUIRE(r.router_topk(t, j) == e.router_sel[static_cast<std::size_t>(t)][static_cast<std::size_t>(j)]);
        }
      // Analytic gradients of the spec (no clip saturates at these logits).
      for (int i = 0; i < n * p.d; ++i) {
        REQUIRE(r.grad_weight_par[i] == Approx(e.grad_w_par[static_cast<std::size_t>(i)]).margin(1e-13));
        REQUIRE(r.grad_weight_balance[i] == Approx(e.grad_w_bal[static_cast<std::size_t>(i)]).margin(1e-13));
        REQUIRE(r.grad_weight[i] == Approx(0.05 * e.grad_w_par[static_cast<std::size_t>(i)] + 0.01 * e.grad_w_bal[static_cast<std::size_t>(i)]).margin(1e-13));
      }
      for (int i = 0; i < n; ++i) {
        REQUIRE(r.grad_bias_par[i] == Approx(e.grad_b_par[static_cast<std::size_t>(i)]).margin(1e-13));
        REQUIRE(r.grad_bias_balance[i] == Approx(e.grad_b_bal[static_cast<std::size_t>(i)]).margin(1e-13));
      }
    }
  }
}

TEST_CASE("PAR gradients agree with central finite differences (double)", "[train][par][grad]") {
  // Relative error ||g - g_fd|| / ||g_fd|| < 1e-4 per term; h = 1e-6 (central, O(h^2) truncation).
  for (double router_scale : {0.5, 6.0}) {  // 6.0: some p fall below the clip 1e-7 (saturated entries)
    for (int k : {1, 2, 3}) {
      Problem p(4, 50 + static_cast<std::uint64_t>(k), router_scale);
      auto const r = p.eval(p.rw, p.rb, k);
      double const h = 1e-6;
      std::vector<double> fd_par, fd_bal, an_par, an_bal;
      auto probe = [&](ref::Vec& param, std::size_t i, double an_p, double an_b) {
        double const saved = param[i];
        param[i] = saved + h;
        auto const up = p.eval(p.rw, p.rb, k);
        param[i] = saved - h;
        auto const dn = p.eval(p.rw, p.rb, k);
        param[i] = saved;
        fd_par.push_back((up.par_loss - dn.par_loss) / (2 * h));
        fd_bal.push_back((up.balance_loss - dn.balance_loss) / (2 * h));
        an_par.push_back(an_p);
        an_bal.push_back(an_b);
      };
      for (std::size_t i = 0; i < p.rw.size(); ++i) probe(p.rw, i, r.grad_weight_par[static_cast<std::ptrdiff_t>(i)], r.grad_weight_balance[static_cast<std::ptrdiff_t>(i)]);
      for (std::size_t i = 0; i < p.rb.size(); ++i) probe(p.rb, i, r.grad_bias_par[static_cast<std::ptrdiff_t>(i)], r.grad_bias_balance[static_cast<std::ptrdiff_t>(i)]);
      INFO("router_scale=" << router_scale << " k=" << k);
      CHECK(ref::rel_l2(an_par, fd_par, fd_par.size()) < 1e-4);
      // At router_scale 6 the balance gradients are ~1e-8, below the finite differences' rounding noise
      // (eps * L / h ~ 3e-11 relative to them), so the balance term is checked in the unsaturated regime only.
      if (router_scale < 1.0) CHECK(ref::rel_l2(an_bal, fd_bal, fd_bal.size()) < 1e-4);
    }
  }
}

TEST_CASE("PAR stays finite when the router saturates the clip", "[train][par]") {
  Problem p(4, 70, 200.0);  // logits of order 1e3: p is exactly 0 or 1 in double
  auto const r = p.eval(p.rw, p.rb, 2);
  CHECK(std::isfinite(r.par_loss));
  CHECK(std::isfinite(r.balance_loss));
  for (std::ptrdiff_t i = 0; i < r.grad_weight.size(); ++i) REQUIRE(std::isfinite(r.grad_weight[i]));
}

TEST_CASE("label accuracy is 1 when K = N and reflects set equality", "[train][par]") {
  Problem p(4, 80);
  CHECK(p.eval(p.rw, p.rb, 4).label_accuracy == 1.0);
  auto const r = p.eval(p.rw, p.rb, 2);
  int same = 0;
  for (int t = 0; t < p.n_tokens; ++t) {
    bool eq = true;
    for (int j = 0; j < 2; ++j) eq &= (r.pseudo_label(t, j) == r.router_topk(t, 0) || r.pseudo_label(t, j) == r.router_topk(t, 1));
    same += eq ? 1 : 0;
  }
  CHECK(r.label_accuracy == Approx(static_cast<double>(same) / p.n_tokens));
}

TEST_CASE("par_loss takes a writable x view as it takes a read-only one", "[train][par]") {
  Problem p(4, 91);
  auto const router = p.router(p.rw, p.rb);
  Matrix<double> x = p.x;
  auto const a = train::par_loss(x.cview(), p.w.view(), p.experts, router, 2);
  auto const b = train::par_loss(x.view(), p.w.view(), p.experts, router, 2);  // MatrixView<double>, not <double const>
  CHECK(a.total_loss == b.total_loss);
  CHECK(a.grad_weight(0, 0) == b.grad_weight(0, 0));
}

TEST_CASE("par_loss validates its arguments", "[train][par][errors]") {
  Problem p(4, 90);
  auto const router = p.router(p.rw, p.rb);
  Matrix<double> empty({0, p.d}), wrong({3, p.d + 1});
  CHECK_THROWS_AS(train::par_loss(empty.cview(), p.w.view(), p.experts, router, 2), value_error);
  CHECK_THROWS_AS(train::par_loss(wrong.cview(), p.w.view(), p.experts, router, 2), shape_error);
  CHECK_THROWS_AS(train::par_loss(p.x.cview(), p.w.view(), p.experts, router, 0), value_error);
  CHECK_THROWS_AS(train::par_loss(p.x.cview(), p.w.view(), p.experts, router, 5), value_error);
  CHECK_THROWS_AS(train::par_loss(p.x.cview(), p.w.view(), p.experts, moe::Router<double>::random(p.d, 3, 1), 2), shape_error);
  train::ParLossConfig bad;
  bad.clip = 0.0;
  CHECK_THROWS_AS(train::par_loss(p.x.cview(), p.w.view(), p.experts, router, 2, bad), value_error);
  fixture::DenseWeights<double> other(ref::random_ffn(p.d, 16, 1));
  CHECK_THROWS_AS(train::par_loss(p.x.cview(), other.view(), p.experts, router, 2), shape_error);
  train::ParLossResult<double> out;
  Workspace tiny(16);
  CHECK_THROWS_AS(train::par_loss(p.x.cview(), p.w.view(), p.experts, router, 2, train::ParLossConfig{}, out, tiny), backend_error);
}
