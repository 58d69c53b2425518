// SPDX-License-Identifier: Apache-2.0
// Tests of the conversion diagnostics (train/diagnostics.hpp): diagnose_layer against par_loss and the subset labels,
// load histogram and entropy, label-set agreement, and errors.
#include <catch2/catch.hpp>

#include <factorllm/ffn/factorize.hpp>
#include <factorllm/moe/moe_ffn.hpp>
#include <factorllm/moe/shared_moe.hpp>
#include <factorllm/train/diagnostics.hpp>
#include <factorllm/train/oracle_labels.hpp>
#include <factorllm/train/par_loss.hpp>

#include <cmath>
#include <vector>

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using ffn::ExpertPartition;

TEST_CASE("subset labels: factorized experts with K = N give the dense FFN, diagnose_layer measures the router "
          "against them",
          "[train][diagnostics]") {
  int const d = 8, d_ff = 24, n = 4, n_tokens = 50;
  fixture::DenseWeights<double> w(ref::random_ffn(d, d_ff, 350));
  auto const experts = ffn::factorize(w.view(), ExpertPartition::random(d_ff, n, 351));
  auto const x = fixture::to_matrix<double>(ref::randn(static_cast<std::size_t>(n_tokens * d), 352, 1.0), n_tokens, d);
  auto const router = moe::Router<double>::random(d, n, 353, 0.5);
  moe::Gating g;
  g.mode = moe::CombineMode::code_ref;
  g.top_k = 2;
  g.output_scale = 0.5;  // plain sum of the K selected experts (code_ref weight floor(4/2) = 2)
  moe::MoeFfn<double, CpuScalar> const layer(experts, router, g);
  auto const diag = train::diagnose_layer(layer, x.cview(), w.view(), {}, train::LabelKind::subset);
  // The router's TopK of the raw logits against the subset labels, by hand.
  auto const labels = train::subset_oracle_labels(x.cview(), w.view(), experts, 2);
  Matrix<std::int32_t> topk({n_tokens, 2});
  for (int t = 0; t < n_tokens; ++t) {
    ref::Vec z(n);
    for (int e = 0; e < n; ++e) {
      z[static_cast<std::size_t>(e)] = router.bias()(e);
      for (int c = 0; c < d; ++c) z[static_cast<std::size_t>(e)] += router.weight()(e, c) * x(t, c);
    }
    auto const sel = ref::topk(z, 2);
    topk(t, 0) = sel[0];
    topk(t, 1) = sel[1];
  }
  CHECK(diag.label_accuracy == train::label_set_agreement(topk.cview(), labels.cview()));
  auto const par_diag = train::diagnose_layer(layer, x.cview(), w.view());  // default: the paper's labels
  auto const par = train::par_loss(x.cview(), w.view(), experts, router, 2);
  CHECK(par_diag.label_accuracy == par.label_accuracy);
  CHECK(par_diag.relative_error == diag.relative_error);
}

TEST_CASE("label_set_agreement compares sets, not orders", "[train][diagnostics]") {
  Matrix<std::int32_t> a({4, 2}), b({4, 2});
  std::int32_t const av[] = {0, 1, 2, 3, 1, 2, 0, 3};
  std::int32_t const bv[] = {1, 0, 2, 3, 1, 3, 3, 0};
  std::copy(av, av + 8, a.data());
  std::copy(bv, bv + 8, b.data());
  CHECK(train::label_set_agreement(a.cview(), b.cview()) == Approx(0.75));
  CHECK(train::label_set_agreement(a.cview(), a.cview()) == 1.0);
  CHECK(train::label_set_agreement(a.cview().slice_rows(0, 0), b.cview().slice_rows(0, 0)) == 1.0);
  CHECK_THROWS_AS(train::label_set_agreement(a.cview(), b.cview().slice_rows(0, 3)), shape_error);
}

TEST_CASE("load_histogram and load_entropy", "[train][diagnostics]") {
  CHECK(train::load_entropy({5, 5, 5, 5}) == Approx(std::log(4.0)));
  CHECK(train::load_entropy({7, 0, 0, 0}) == 0.0);
  CHECK(train::load_entropy({0, 0}) == 0.0);
  CHECK(train::load_entropy({}) == 0.0);
  CHECK(train::load_entropy({1, 3}) == Approx(-(0.25 * std::log(0.25) + 0.75 * std::log(0.75))));
  // A router that sends every token to expert 2 (zero weights, bias favouring it), top_k = 1.
  int const d = 6, d_ff = 12, n = 4, n_tokens = 9;
  fixture::DenseWeights<float> w(ref::random_ffn(d, d_ff, 120));
  Matrix<float> rw({n, d});
  Vector<float> rb({n});
  rb[2] = 1.0f;
  moe::Gating g;
  g.mode = moe::CombineMode::code_ref;
  moe::MoeFfn<float, CpuScalar> layer(ffn::factorize(w.view(), ExpertPartition::contiguous(d_ff, n)), moe::Router<float>(rw, rb), g);
  auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(n_tokens * d), 121, 1.0), n_tokens, d);
  Matrix<float> y({n_tokens, d});
  moe::RoutingRecord<float> rec;
  Workspace ws(layer.workspace_bytes(n_tokens));
  layer.forward(x.cview(), y.view(), ws, &rec);
  CHECK(train::load_histogram(rec) == std::vector<std::int64_t>{0, 0, n_tokens, 0});
}

TEMPLATE_TEST_CASE("diagnose_layer: K = N is exact and fully balanced, K < N matches par_loss", "[train][diagnostics]", float,
                   double) {
  using A = activation_t<TestType>;
  int const d = 12, d_ff = 48, n = 4, n_tokens = 40;
  fixture::DenseWeights<TestType> w(ref::random_ffn(d, d_ff, 130));
  auto const experts = ffn::factorize(w.view(), ExpertPartition::random(d_ff, n, 131));
  auto const x = fixture::to_matrix<A>(ref::randn(static_cast<std::size_t>(n_tokens * d), 132, 1.0), n_tokens, d);
  auto const router = moe::Router<A>::random(d, n, 133, 0.5);
  moe::Gating g;
  g.mode = moe::CombineMode::code_ref;  // K = N with code_ref is the dense FFN
  g.top_k = n;
  auto const all = train::diagnose_layer(moe::MoeFfn<TestType, CpuScalar>(experts, router, g), x.cview(), w.view());
  CHECK(all.n_tokens == n_tokens);
  CHECK(all.relative_error < (std::is_same_v<A, double> ? 1e-12 : 1e-6));
  CHECK(all.label_accuracy == 1.0);
  CHECK(all.load == std::vector<std::int64_t>(n, n_tokens));
  CHECK(all.load_entropy_normalized == Approx(1.0));
  g.top_k = 2;
  g.mode = moe::CombineMode::softmax_topk_renorm;
  auto const two = train::diagnose_layer(moe::MoeFfn<TestType, CpuScalar>(experts, router, g), x.cview(), w.view());
  auto const par = train::par_loss(x.cview(), w.view(), experts, router, 2);
  CHECK(two.label_accuracy == par.label_accuracy);
  CHECK(two.par_loss == Approx(par.par_loss));
  CHECK(two.relative_error > 0.05);
  std::int64_t total = 0;
  for (auto v : two.load) total += v;
  CHECK(total == 2 * n_tokens);
  CHECK(two.load_entropy_normalized > 0.0);
  CHECK(two.load_entropy_normalized <= 1.0);
}

TEST_CASE("diagnose_layer of a shared-expert layer", "[train][diagnostics]") {
  int const d = 10, d_ff = 40, n_tokens = 30;
  fixture::DenseWeights<double> w(ref::random_ffn(d, d_ff, 135));
  auto const part = ExpertPartition::random(d_ff, 5, 136);
  auto const x = fixture::to_matrix<double>(ref::randn(static_cast<std::size_t>(n_tokens * d), 137, 1.0), n_tokens, d);
  auto const router = moe::Router<double>::random(d, 4, 138, 0.5);
  moe::Gating g;
  g.mode = moe::CombineMode::code_ref;
  g.top_k = 4;  // K = N routed with code_ref: the layer is the dense FFN
  auto const all = train::diagnose_layer(moe::make_shared_moe<CpuScalar>(w.view(), part, 1, router, g), x.cview(), w.view());
  CHECK(all.relative_error < 1e-12);
  CHECK(all.label_accuracy == 1.0);
  CHECK(all.load == std::vector<std::int64_t>(4, n_tokens));
  g.top_k = 2;
  auto const layer = moe::make_shared_moe<CpuScalar>(w.view(), part, 1, router, g);
  auto const two = train::diagnose_layer(layer, x.cview(), w.view());
  // Router labels against the routed experts' own sum.
  auto const routed = layer.routed().experts();
  auto const par = train::par_loss(x.cview(), ffn::unfactorize(routed).view(), routed, router, 2);
  CHECK(two.label_accuracy == par.label_accuracy);
  CHECK(two.relative_error > 0.01);
  fixture::DenseWeights<double> other(ref::random_ffn(d, 20, 139));
  CHECK_THROWS_AS(train::diagnose_layer(layer, x.cview(), other.view()), shape_error);
}

TEST_CASE("diagnostics reject bad inputs with the documented exceptions", "[train][diagnostics][errors]") {
  int const d = 6, d_ff = 12, n = 4;
  fixture::DenseWeights<float> w(ref::random_ffn(d, d_ff, 140));
  auto const experts = ffn::factorize(w.view(), ExpertPartition::contiguous(d_ff, n));
  auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(5 * d), 141, 1.0), 5, d);
  fixture::DenseWeights<float> w_other(ref::random_ffn(d, 8, 142));
  moe::Gating g;
  g.mode = moe::CombineMode::code_ref;
  moe::MoeFfn<float, CpuScalar> layer(experts, moe::Router<float>::random(d, n, 1), g);
  CHECK_THROWS_AS(train::diagnose_layer(layer, x.cview().slice_rows(0, 0), w.view()), value_error);
  CHECK_THROWS_AS(train::diagnose_layer(layer, x.cview(), w_other.view()), shape_error);
}
