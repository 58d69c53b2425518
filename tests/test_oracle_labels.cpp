// SPDX-License-Identifier: Apache-2.0
// Tests of the oracle pseudo-labels (train/oracle_labels.hpp): the Gram-identity PAR oracle and the teacher-based
// oracle against train::par_loss, the subset labels against a brute-force search, and errors.
#include <catch2/catch.hpp>

#include <factorllm/ffn/factorize.hpp>
#include <factorllm/moe/router.hpp>
#include <factorllm/train/oracle_labels.hpp>
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

TEST_CASE("subset_oracle_labels rejects bad inputs with the documented exceptions", "[train][diagnostics][errors]") {
  int const d = 8, d_ff = 24, n = 4, n_tokens = 50;
  fixture::DenseWeights<double> w(ref::random_ffn(d, d_ff, 350));
  auto const experts = ffn::factorize(w.view(), ExpertPartition::random(d_ff, n, 351));
  auto const x = fixture::to_matrix<double>(ref::randn(static_cast<std::size_t>(n_tokens * d), 352, 1.0), n_tokens, d);
  // Errors: too many experts for the exhaustive search, bad top_k, no tokens.
  int const big = static_cast<int>(train::kMaxSubsetExperts) + 1;
  fixture::DenseWeights<double> wb(ref::random_ffn(d, big, 354));
  auto const many = ffn::factorize(wb.view(), ExpertPartition::contiguous(big, big));
  CHECK_THROWS_AS(train::subset_oracle_labels(x.cview(), wb.view(), many, 2), value_error);
  CHECK_THROWS_AS(train::subset_oracle_labels(x.cview(), w.view(), experts, 0), value_error);
  CHECK_THROWS_AS(train::subset_oracle_labels(x.cview(), w.view(), experts, n + 1), value_error);
  CHECK_THROWS_AS(train::subset_oracle_labels(x.cview().slice_rows(0, 0), w.view(), experts, 2), value_error);
}

TEST_CASE("par_oracle_labels and par_oracle_labels_gram reject bad inputs with the documented exceptions",
          "[train][diagnostics][errors]") {
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
}
