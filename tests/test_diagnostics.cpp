// SPDX-License-Identifier: Apache-2.0
// Tests of the conversion diagnostics (train/diagnostics.hpp): the Gram-identity PAR oracle and the teacher-based
// oracle against train::par_loss, load histogram and entropy, label-set agreement, diagnose_layer, and errors.
#include <catch2/catch.hpp>

#include <factorllm/ffn/factorize.hpp>
#include <factorllm/moe/moe_ffn.hpp>
#include <factorllm/moe/shared_moe.hpp>
#include <factorllm/train/diagnostics.hpp>
#include <factorllm/train/par_loss.hpp>

#include <cmath>
#include <cstring>
#include <vector>

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using ffn::ExpertPartition;

namespace {

bool same_ids(Matrix<std::int32_t> const& a, Matrix<std::int32_t> const& b) {
  return a.extents() == b.extents() &&
         std::memcmp(a.data(), b.data(), sizeof(std::int32_t) * static_cast<std::size_t>(a.size())) == 0;
}

/// Brute-force subset labels: every bitmask with popcount k, || sum_{n in mask} e_n - f ||^2 from the reference
/// expert outputs (double, formed directly, no Gram identity); ids in increasing order.
std::vector<std::vector<int>> subset_labels_reference(ref::Ffn const& experts_ffn, std::vector<std::int32_t> const& perm,
                                                      ref::Ffn const& teacher, ref::Vec const& x, int n_tokens, int n,
                                                      int k) {
  int const d = teacher.d_model;
  std::vector<std::vector<int>> out;
  for (int t = 0; t < n_tokens; ++t) {
    double const* xt = x.data() + static_cast<std::size_t>(t * d);
    ref::Vec const f = ref::dense(teacher, xt);
    std::vector<ref::Vec> e;
    for (int a = 0; a < n; ++a) e.push_back(ref::expert(experts_ffn, perm, n, a, xt));
    double best = INFINITY;
    std::vector<int> best_ids;
    for (unsigned mask = 0; mask < (1u << n); ++mask) {
      if (__builtin_popcount(mask) != k) continue;
      double err = 0;
      for (int o = 0; o < d; ++o) {
        double s = -f[static_cast<std::size_t>(o)];
        for (int a = 0; a < n; ++a)
          if (mask >> a & 1u) s += e[static_cast<std::size_t>(a)][static_cast<std::size_t>(o)];
        err += s * s;
      }
      if (err < best) {
        best = err;
        best_ids.clear();
        for (int a = 0; a < n; ++a)
          if (mask >> a & 1u) best_ids.push_back(a);
      }
    }
    out.push_back(best_ids);
  }
  return out;
}

}  // namespace

TEMPLATE_TEST_CASE("The Gram-identity PAR oracle equals par_loss's pseudo-labels and MSEs", "[train][diagnostics]", float,
                   double) {
  using A = activation_t<TestType>;
  int const d = 10, d_ff = 48, n_tokens = 300;  // > one 256-token chunk
  for (int n : {3, 4, 6, 8}) {
    fixture::DenseWeights<TestType> w(ref::random_ffn(d, d_ff, 100 + static_cast<std::uint64_t>(n)));
    auto const experts = ffn::factorize(w.view(), ExpertPartition::random(d_ff, n, 101));
    auto const x = fixture::to_matrix<A>(ref::randn(static_cast<std::size_t>(n_tokens * d), 102, 1.0), n_tokens, d);
    auto const router = moe::Router<A>::random(d, n, 103);
    for (int k = 1; k <= n; ++k) {
      if (n == 2 && k == 1) continue;  // exact tie (test_par_loss.cpp explains)
      INFO("n=" << n << " k=" << k);
      auto const expect = train::par_loss(x.cview(), w.view(), experts, router, k);
      Matrix<double> mse, mse_teacher;
      auto const gram = train::par_oracle_labels_gram(x.cview(), experts, k, &mse);
      auto const teacher = train::par_oracle_labels(x.cview(), w.view(), experts, k, &mse_teacher);
      REQUIRE(same_ids(gram, expect.pseudo_label));
      REQUIRE(same_ids(teacher, expect.pseudo_label));
      // MSE tolerance: the Gram identity cancels terms of size ||f||^2 / s^2; relative to the largest MSE of the
      // token it is exact to ~1e-12 in double (par_loss rounds its MSEs to A, so float compares at 1e-6).
      double const tol = std::is_same_v<A, double> ? 1e-10 : 1e-6;
      double worst = 0;
      for (int t = 0; t < n_tokens; ++t) {
        double scale = 0;
        for (int e = 0; e < n; ++e) scale = std::max(scale, static_cast<double>(expect.mse_to_target(t, e)));
        for (int e = 0; e < n; ++e) {
          worst = std::max(worst, std::fabs(mse(t, e) - static_cast<double>(expect.mse_to_target(t, e))) / scale);
          worst = std::max(worst, std::fabs(mse_teacher(t, e) - static_cast<double>(expect.mse_to_target(t, e))) / scale);
        }
      }
      CHECK(worst < tol);
    }
  }
}

TEST_CASE("After recovery only the teacher-based oracle stays equal to par_loss", "[train][diagnostics]") {
  int const d = 8, d_ff = 16, n = 4, n_tokens = 64;
  fixture::DenseWeights<double> w(ref::random_ffn(d, d_ff, 110));
  auto experts = ffn::factorize(w.view(), ExpertPartition::contiguous(d_ff, n));
  // Change expert 1's down weights: the experts no longer sum to the dense FFN.
  for (int o = 0; o < d; ++o)
    for (int i = 0; i < d_ff / n; ++i) experts.mutable_down_tensor()(1, o, i) *= 3.0;
  auto const x = fixture::to_matrix<double>(ref::randn(static_cast<std::size_t>(n_tokens * d), 111, 1.0), n_tokens, d);
  auto const expect = train::par_loss(x.cview(), w.view(), experts, moe::Router<double>::random(d, n, 1), 2);
  REQUIRE(same_ids(train::par_oracle_labels(x.cview(), w.view(), experts, 2), expect.pseudo_label));
  CHECK_FALSE(same_ids(train::par_oracle_labels_gram(x.cview(), experts, 2), expect.pseudo_label));
}

TEMPLATE_TEST_CASE("subset_oracle_labels equals a brute-force search over all K-subsets", "[train][diagnostics]", float,
                   double) {
  using A = activation_t<TestType>;
  int const d = 10, n_tokens = 37;
  for (int n : {2, 4, 6}) {
    for (int k = 1; k <= n; ++k) {
      int const d_ff = 4 * n;
      CAPTURE(n, k);
      fixture::DenseWeights<TestType> w(ref::random_ffn(d, d_ff, 300 + static_cast<std::uint64_t>(n)));
      // Experts of ANOTHER FFN: they do not sum to the teacher, as after recovery (the teacher-based path).
      fixture::DenseWeights<TestType> other(ref::random_ffn(d, d_ff, 320 + static_cast<std::uint64_t>(n)));
      auto const part = ExpertPartition::random(d_ff, n, 340);
      auto const xv = ref::randn(static_cast<std::size_t>(n_tokens * d), 341, 1.0);
      auto const x = fixture::to_matrix<A>(xv, n_tokens, d);
      ref::Vec xr;  // x as the library sees it (rounded to A)
      for (std::ptrdiff_t i = 0; i < x.size(); ++i) xr.push_back(static_cast<double>(x[i]));
      for (bool factorized : {true, false}) {
        CAPTURE(factorized);
        auto const& src = factorized ? w : other;
        auto const experts = ffn::factorize(src.view(), part);
        auto const got = train::subset_oracle_labels(x.cview(), w.view(), experts, k);
        auto const want = subset_labels_reference(src.rounded(), part.permutation(), w.rounded(), xr, n_tokens, n, k);
        REQUIRE(got.extent(0) == n_tokens);
        REQUIRE(got.extent(1) == k);
        int mismatches = 0;
        for (int t = 0; t < n_tokens; ++t)
          for (int j = 0; j < k; ++j) mismatches += got(t, j) != want[static_cast<std::size_t>(t)][static_cast<std::size_t>(j)];
        CHECK(mismatches == 0);
        if (k == n)  // the only subset: every expert, in increasing order
          for (int t = 0; t < n_tokens; ++t)
            for (int j = 0; j < k; ++j) CHECK(got(t, j) == j);
      }
    }
  }
}

TEST_CASE("subset labels: factorized experts with K = N give the dense FFN; diagnose_layer measures the router "
          "against them; errors",
          "[train][diagnostics]") {
  int const d = 8, d_ff = 24, n = 4, n_tokens = 50;
  fixture::DenseWeights<double> w(ref::random_ffn(d, d_ff, 350));
  auto const experts = ffn::factorize(w.view(), ExpertPartition::random(d_ff, n, 351));
  auto const x = fixture::to_matrix<double>(ref::randn(static_cast<std::size_t>(n_tokens * d), 352, 1.0), n_tokens, d);
  auto const router = moe::Router<double>::random(d, n, 353, 0.5);
  moe::Gating g;
  g.top_k = 2;
  g.output_scale = 0.5;  // plain sum of the K selected experts (code_ref weight floor(4/2) = 2)
  moe::MoeFfn<double> const layer(experts, router, g);
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
  // Errors: too many experts for the exhaustive search, bad top_k, no tokens.
  int const big = static_cast<int>(train::kMaxSubsetExperts) + 1;
  fixture::DenseWeights<double> wb(ref::random_ffn(d, big, 354));
  auto const many = ffn::factorize(wb.view(), ExpertPartition::contiguous(big, big));
  CHECK_THROWS_AS(train::subset_oracle_labels(x.cview(), wb.view(), many, 2), value_error);
  CHECK_THROWS_AS(train::subset_oracle_labels(x.cview(), w.view(), experts, 0), value_error);
  CHECK_THROWS_AS(train::subset_oracle_labels(x.cview(), w.view(), experts, n + 1), value_error);
  CHECK_THROWS_AS(train::subset_oracle_labels(x.cview().slice_rows(0, 0), w.view(), experts, 2), value_error);
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
  moe::MoeFfn<float> layer(ffn::factorize(w.view(), ExpertPartition::contiguous(d_ff, n)), moe::Router<float>(rw, rb), g);
  auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(n_tokens * d), 121, 1.0), n_tokens, d);
  Matrix<float> y({n_tokens, d});
  moe::RoutingRecord<float> rec;
  Workspace ws(layer.workspace_bytes(n_tokens));
  layer.forward(x.cview(), y.view(), ws, &rec);
  CHECK(train::load_histogram(rec) == std::vector<std::int64_t>{0, 0, n_tokens, 0});
}

TEMPLATE_TEST_CASE("diagnose_layer: K = N is exact and fully balanced; K < N matches par_loss", "[train][diagnostics]", float,
                   double) {
  using A = activation_t<TestType>;
  int const d = 12, d_ff = 48, n = 4, n_tokens = 40;
  fixture::DenseWeights<TestType> w(ref::random_ffn(d, d_ff, 130));
  auto const experts = ffn::factorize(w.view(), ExpertPartition::random(d_ff, n, 131));
  auto const x = fixture::to_matrix<A>(ref::randn(static_cast<std::size_t>(n_tokens * d), 132, 1.0), n_tokens, d);
  auto const router = moe::Router<A>::random(d, n, 133, 0.5);
  moe::Gating g;
  g.top_k = n;
  auto const all = train::diagnose_layer(moe::MoeFfn<TestType>(experts, router, g), x.cview(), w.view());
  CHECK(all.n_tokens == n_tokens);
  CHECK(all.relative_error < (std::is_same_v<A, double> ? 1e-12 : 1e-6));
  CHECK(all.label_accuracy == 1.0);
  CHECK(all.load == std::vector<std::int64_t>(n, n_tokens));
  CHECK(all.load_entropy_normalized == Approx(1.0));
  g.top_k = 2;
  g.mode = moe::CombineMode::softmax_topk_renorm;
  auto const two = train::diagnose_layer(moe::MoeFfn<TestType>(experts, router, g), x.cview(), w.view());
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
  g.top_k = 4;  // K = N routed with code_ref: the layer is the dense FFN
  auto const all = train::diagnose_layer(moe::make_shared_moe(w.view(), part, 1, router, g), x.cview(), w.view());
  CHECK(all.relative_error < 1e-12);
  CHECK(all.label_accuracy == 1.0);
  CHECK(all.load == std::vector<std::int64_t>(4, n_tokens));
  g.top_k = 2;
  auto const layer = moe::make_shared_moe(w.view(), part, 1, router, g);
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
  CHECK_THROWS_AS(train::par_oracle_labels_gram(x.cview().slice_rows(0, 0), experts, 2), value_error);
  CHECK_THROWS_AS(train::par_oracle_labels_gram(x.cview(), experts, 0), value_error);
  CHECK_THROWS_AS(train::par_oracle_labels_gram(x.cview(), experts, 5), value_error);
  Matrix<float> x_bad({5, d - 1});
  CHECK_THROWS_AS(train::par_oracle_labels_gram(x_bad.cview(), experts, 2), shape_error);
  CHECK_THROWS_AS(train::par_oracle_labels(x_bad.cview(), w.view(), experts, 2), shape_error);
  fixture::DenseWeights<float> w_other(ref::random_ffn(d, 8, 142));
  CHECK_THROWS_AS(train::par_oracle_labels(x.cview(), w_other.view(), experts, 2), shape_error);
  moe::Gating g;
  moe::MoeFfn<float> layer(experts, moe::Router<float>::random(d, n, 1), g);
  CHECK_THROWS_AS(train::diagnose_layer(layer, x.cview().slice_rows(0, 0), w.view()), value_error);
  CHECK_THROWS_AS(train::diagnose_layer(layer, x.cview(), w_other.view()), shape_error);
}
