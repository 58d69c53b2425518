// SPDX-License-Identifier: Apache-2.0
// Tests of distillation (train/distillation.hpp): the distillation gradient against central finite differences
// (double, rel < 1e-4), distillation reducing the loss, touching only used experts, determinism, and errors.
#include <catch2/catch.hpp>

#include <factorllm/ffn/factorize.hpp>
#include <factorllm/moe/moe_ffn.hpp>
#include <factorllm/train/distillation.hpp>
#include <factorllm/train/fixed_routing.hpp>
#include <factorllm/train/refit.hpp>

#include <cmath>
#include <initializer_list>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "reference/fixtures.hpp"
#include "reference/recovery_fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using ffn::ExpertPartition;
using moe::CombineMode;
using fixture::router_from;
using fixture::same_bits;
using Layer = fixture::RecoveryLayer;

TEST_CASE("distill_loss_and_grad matches the loss definition and central finite differences", "[train][recovery][distill]") {
  // Tolerance (written down): central differences with h = 1e-6 in double have truncation error O(h^2 f''') and
  // rounding O(eps / h) ~ 1e-10 relative; we require ||g_fd - g|| / ||g|| < 1e-4 and every entry within 1e-4 of the
  // largest gradient entry.
  int const d = 5, d_ff = 8, n = 4, n_tokens = 7;
  fixture::DenseWeights<double> w(ref::random_ffn(d, d_ff, 220));
  auto const part = ExpertPartition::random(d_ff, n, 221);
  auto const xv = ref::randn(static_cast<std::size_t>(n_tokens * d), 222, 1.0);
  auto const x = fixture::to_matrix<double>(xv, n_tokens, d);
  struct Case {
    std::string name;
    CombineMode mode;
    int k;
    int shared;
  };
  for (auto const& c : {Case{"code_ref", CombineMode::code_ref, 2, 0}, Case{"softmax_topk_renorm", CombineMode::softmax_topk_renorm, 2, 0},
                        Case{"sigmoid_topk", CombineMode::sigmoid_topk, 1, 0}, Case{"softmax_topk", CombineMode::softmax_topk, 3, 0},
                        Case{"shared + softmax_topk_renorm", CombineMode::softmax_topk_renorm, 2, 1}}) {
    INFO(c.name);
    int const n_routed = n - c.shared;
    moe::Gating g;
    g.mode = c.mode;
    g.top_k = c.k;
    g.output_scale = 1.5f;
    auto const router = router_from<double>(ref::randn(static_cast<std::size_t>(n_routed * d), 223, 0.8),
                                            ref::randn(static_cast<std::size_t>(n_routed), 224, 0.3), n_routed, d);
    auto const routing = train::fixed_routing(router, g, x.cview(), c.shared);
    auto experts = ffn::factorize(w.view(), part);
    // Move away from the factorized point so that the gradient is not special.
    for (std::ptrdiff_t i = 0; i < experts.down_tensor().size(); ++i) experts.mutable_down_tensor()[i] *= 0.8;
    train::ExpertGrads<double> grads;
    double const loss = train::distill_loss_and_grad(experts, routing, x.cview(), w.view(), grads);
    // Loss against its definition, from the library's MoE forward for the plain layer.
    if (c.shared == 0) {
      auto const again = train::distill_loss_and_grad(experts, router, g, x.cview(), w.view(), grads);
      CHECK(again == loss);
      Matrix<double> ym({n_tokens, d}), yd({n_tokens, d});
      moe::MoeFfn<double, CpuScalar>(experts, router, g).forward(x.cview(), ym.view());
      ffn::swiglu_forward(w.view(), x.cview(), yd.view());
      double want = 0;
      for (std::ptrdiff_t i = 0; i < ym.size(); ++i) want += (ym[i] - yd[i]) * (ym[i] - yd[i]);
      CHECK(loss == Approx(want / n_tokens).epsilon(1e-12));
    }
    double const h = 1e-6;
    double num = 0, den = 0, worst = 0, gmax = 0;
    auto check_tensor = [&](Tensor<double, 3>& param, Tensor<double, 3> const& grad) {
      for (std::ptrdiff_t i = 0; i < param.size(); ++i) {
        double const keep = param[i];
        train::ExpertGrads<double> unused;
        param[i] = keep + h;
        double const lp = train::distill_loss_and_grad(experts, routing, x.cview(), w.view(), unused);
        param[i] = keep - h;
        double const lm = train::distill_loss_and_grad(experts, routing, x.cview(), w.view(), unused);
        param[i] = keep;
        double const fd = (lp - lm) / (2 * h);
        num += (fd - grad[i]) * (fd - grad[i]);
        den += grad[i] * grad[i];
        worst = std::max(worst, std::fabs(fd - grad[i]));
        gmax = std::max(gmax, std::fabs(grad[i]));
      }
    };
    check_tensor(experts.mutable_gate_tensor(), grads.gate);
    check_tensor(experts.mutable_up_tensor(), grads.up);
    check_tensor(experts.mutable_down_tensor(), grads.down);
    CHECK(std::sqrt(num / den) < 1e-4);
    CHECK(worst < 1e-4 * gmax);
    CHECK(gmax > 1e-3);  // the check is not vacuous
  }
}

TEST_CASE("recover_distill lowers the loss, touches only used experts, is deterministic", "[train][recovery][distill]") {
  int const d = 16, d_ff = 64, n = 4, n_tokens = 256;
  fixture::DenseWeights<float> w(ref::random_ffn(d, d_ff, 230));
  auto const part = ExpertPartition::random(d_ff, n, 231);
  auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(n_tokens * d), 232, 1.0), n_tokens, d);
  auto const router = moe::Router<float>::random(d, n, 233, 0.5);
  moe::Gating g;
  g.mode = moe::CombineMode::code_ref;
  g.top_k = 1;
  train::DistillConfig cfg;
  cfg.steps = 150;
  cfg.batch_tokens = 100;
  cfg.lr = 3e-3;
  cfg.seed = 3;

  auto e1 = ffn::factorize(w.view(), part);
  auto const rep = train::recover_distill(e1, router, g, x.cview(), w.view(), cfg);
  INFO("loss " << rep.initial_loss << " -> " << rep.final_loss << "; rel " << rep.initial_relative_error << " -> "
               << rep.final_relative_error);
  CHECK(rep.steps == 150);
  CHECK(rep.final_loss < 0.6 * rep.initial_loss);
  CHECK(rep.final_relative_error < rep.initial_relative_error);
  // The report is the MoE layer's error with the written-back weights.
  {
    Matrix<float> ym({n_tokens, d}), yd({n_tokens, d});
    moe::MoeFfn<float, CpuScalar>(e1, router, g).forward(x.cview(), ym.view());
    ffn::swiglu_forward(w.view(), x.cview(), yd.view());
    CHECK(ref::rel_l2(ym.data(), yd.data(), static_cast<std::size_t>(ym.size())) == Approx(rep.final_relative_error).epsilon(1e-4));
  }
  // Same seed: same bits, for any OpenMP thread count.
  auto e2 = ffn::factorize(w.view(), part);
#if defined(_OPENMP)
  int const saved = omp_get_max_threads();
  omp_set_num_threads(saved == 1 ? 2 : 1);
#endif
  train::recover_distill(e2, router, g, x.cview(), w.view(), cfg);
#if defined(_OPENMP)
  omp_set_num_threads(saved);
#endif
  CHECK(same_bits(e1.gate_tensor(), e2.gate_tensor()));
  CHECK(same_bits(e1.down_tensor(), e2.down_tensor()));
  // A router that only ever picks expert 2: the other experts get no gradient and keep their exact weights.
  Matrix<float> rw({n, d});
  Vector<float> rb({n});
  rb[2] = 1.0f;
  auto e3 = ffn::factorize(w.view(), part);
  auto const r3 = train::recover_distill(e3, moe::Router<float>(rw, rb), g, x.cview(), w.view(), cfg);
  auto const orig = ffn::factorize(w.view(), part);
  for (int e : {0, 1, 3}) {
    for (int i = 0; i < d_ff / n; ++i)
      for (int k = 0; k < d; ++k) REQUIRE(e3.gate(e)(i, k) == orig.gate(e)(i, k));
  }
  CHECK(r3.final_loss < r3.initial_loss);
  // Refit first, then distill: distillation continues from the refit's lower error.
  auto e4 = ffn::factorize(w.view(), part);
  auto const rr = train::recover_refit(e4, router, g, x.cview(), w.view(), 1e-3);
  auto const rd = train::recover_distill(e4, router, g, x.cview(), w.view(), cfg);
  CHECK(rd.initial_relative_error == Approx(rr.final_relative_error).epsilon(1e-4));
  CHECK(rd.final_relative_error < rd.initial_relative_error);
}

TEST_CASE("recover_distill rejects bad inputs with the documented exceptions", "[train][recovery][distill][errors]") {
  Layer const L(250);
  auto experts = ffn::factorize(L.w.view(), L.part);
  auto const router = L.router();
  auto const x = L.x.cview();
  moe::Gating too_many = L.gating;
  too_many.top_k = L.n + 1;
  train::DistillConfig cfg;
  using Mutate = void (*)(train::DistillConfig&);
  for (Mutate bad : std::initializer_list<Mutate>{
           [](train::DistillConfig& c) { c.steps = -1; }, [](train::DistillConfig& c) { c.batch_tokens = 0; },
           [](train::DistillConfig& c) { c.lr = -1e-3; }, [](train::DistillConfig& c) { c.beta1 = 1.0; },
           [](train::DistillConfig& c) { c.eps = 0; }}) {
    train::DistillConfig c = cfg;
    bad(c);
    CHECK_THROWS_AS(train::recover_distill(experts, router, L.gating, x, L.w.view(), c), value_error);
  }
  train::ExpertGrads<double> grads;
  CHECK_THROWS_AS(train::distill_loss_and_grad(experts, router, L.gating, x.slice_rows(0, 0), L.w.view(), grads), value_error);
  CHECK_THROWS_AS(train::recover_distill(experts, router, too_many, x, L.w.view(), cfg), value_error);
}
