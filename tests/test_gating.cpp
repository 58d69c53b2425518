// SPDX-License-Identifier: Apache-2.0
// Tests of TopK, the combine modes (docs/math.md §2.3), grouping by expert and the weighted combine.
#include <catch2/catch.hpp>

#include <factorllm/moe/combine.hpp>
#include <factorllm/moe/grouping.hpp>
#include <factorllm/moe/gating.hpp>
#include <factorllm/moe/topk.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using moe::CombineMode;
using moe::Gating;

namespace {
std::vector<std::int32_t> row_ids(Matrix<std::int32_t> const& m, std::ptrdiff_t t) {
  return std::vector<std::int32_t>(m.view().row(t), m.view().row(t) + m.extent(1));
}
}  // namespace

TEST_CASE("topk: larger first, lower index wins ties, NaN last", "[moe][topk]") {
  float const z[] = {1.f, 3.f, 3.f, -1.f, 3.f, 0.f,  //
                     2.f, 2.f, 2.f, 2.f, 2.f, 2.f,   //
                     std::nanf(""), 0.f, -INFINITY, 5.f, std::nanf(""), 0.f};
  Matrix<std::int32_t> ids({3, 4});
  moe::topk(matrix_view(z, 3, 6), 4, ids.view());
  CHECK(row_ids(ids, 0) == std::vector<std::int32_t>{1, 2, 4, 0});
  CHECK(row_ids(ids, 1) == std::vector<std::int32_t>{0, 1, 2, 3});
  CHECK(row_ids(ids, 2) == std::vector<std::int32_t>{3, 1, 5, 2});  // -inf beats NaN
  Matrix<std::int32_t> all({3, 6});
  moe::topk(matrix_view(z, 3, 6), 6, all.view());
  CHECK(row_ids(all, 2) == std::vector<std::int32_t>{3, 1, 5, 2, 0, 4});
  CHECK_THROWS_AS(moe::topk(matrix_view(z, 3, 6), 0, ids.view()), value_error);
  CHECK_THROWS_AS(moe::topk(matrix_view(z, 3, 6), 7, ids.view()), value_error);
  CHECK_THROWS_AS(moe::topk(matrix_view(z, 3, 6), 3, ids.view()), shape_error);
}

TEST_CASE("every combine mode matches its formula for every K of N", "[moe][gating]") {
  for (int n : {1, 2, 4, 8}) {
    int const n_tokens = 7;
    auto const zv = ref::randn(static_cast<std::size_t>(n_tokens * n), 100 + static_cast<std::uint64_t>(n), 2.0);
    auto const z = fixture::to_matrix<double>(zv, n_tokens, n);
    for (int k = 1; k <= n; ++k) {
      for (std::string mode : {"code_ref", "softmax_topk", "softmax_topk_renorm", "topk_softmax", "sigmoid_topk", "sigmoid_renorm"}) {
        Gating g;
        g.top_k = k;
        g.sigmoid_renormalize = mode == "sigmoid_renorm";
        g.mode = moe::combine_mode_from_string(mode == "sigmoid_renorm" ? "sigmoid_topk" : mode);
        g.output_scale = 1.5f;
        Matrix<std::int32_t> ids({n_tokens, k});
        Matrix<double> w({n_tokens, k});
        moe::select_experts(z.cview(), g, ids.view(), w.view());
        for (int t = 0; t < n_tokens; ++t) {
          ref::Vec zt(zv.begin() + t * n, zv.begin() + (t + 1) * n);
          auto const sel = ref::topk(zt, k);
          auto const rw = ref::combine_weights(mode == "sigmoid_renorm" ? "sigmoid_topk" : mode, zt, sel, g.sigmoid_renormalize);
          INFO("n=" << n << " k=" << k << " mode=" << mode << " t=" << t);
          for (int j = 0; j < k; ++j) {
            REQUIRE(ids(t, j) == sel[static_cast<std::size_t>(j)]);
            REQUIRE(w(t, j) == Approx(1.5 * rw[static_cast<std::size_t>(j)]).epsilon(1e-12));
          }
        }
      }
    }
  }
}

TEST_CASE("the default gating is the Mixtral convention: K weights summing to 1 (issue 13, item 11)", "[moe][gating]") {
  Gating const g;
  CHECK(g.mode == CombineMode::softmax_topk_renorm);
  CHECK(g.top_k == 1);
  CHECK(g.output_scale == 1.0f);
  CHECK(g.selection_bias.empty());
  // Behaviour, not only the field: 2 of 4 give positive weights that sum to 1 (code_ref would give 2 and 2).
  Gating two;
  two.top_k = 2;
  double const z[4] = {0.3, -1.0, 2.0, 0.5};
  Matrix<std::int32_t> ids({1, 2});
  Matrix<double> w({1, 2});
  moe::select_experts(matrix_view(z, 1, 4), two, ids.view(), w.view());
  CHECK(ids(0, 0) == 2);
  CHECK(ids(0, 1) == 3);
  CHECK(w(0, 0) > 0.0);
  CHECK(w(0, 1) > 0.0);
  CHECK(w(0, 0) + w(0, 1) == Approx(1.0).epsilon(1e-15));
}

TEST_CASE("code_ref scale is floor(N/K): K=3 of 4 gives 1 (docs/math.md §2.3, Q6)", "[moe][gating]") {
  CHECK(Gating::code_ref_scale(4, 1) == 4.0);
  CHECK(Gating::code_ref_scale(4, 2) == 2.0);
  CHECK(Gating::code_ref_scale(4, 3) == 1.0);
  CHECK(Gating::code_ref_scale(4, 4) == 1.0);
}

TEST_CASE("selection bias changes which experts are chosen, not their weights", "[moe][gating]") {
  float const z[] = {2.f, 1.f, 0.f, -1.f};
  Gating g;
  g.mode = CombineMode::softmax_topk;
  g.top_k = 2;
  Matrix<std::int32_t> ids({1, 2});
  Matrix<float> w({1, 2});
  moe::select_experts(matrix_view(z, 1, 4), g, ids.view(), w.view());
  CHECK(row_ids(ids, 0) == std::vector<std::int32_t>{0, 1});
  float const p3 = w(0, 0);  // p of expert 0
  g.selection_bias = {0.f, 0.f, 0.f, 10.f};
  moe::select_experts(matrix_view(z, 1, 4), g, ids.view(), w.view());
  CHECK(row_ids(ids, 0) == std::vector<std::int32_t>{3, 0});
  double const denom = std::exp(2.0) + std::exp(1.0) + 1.0 + std::exp(-1.0);
  CHECK(w(0, 0) == Approx(std::exp(-1.0) / denom).epsilon(1e-6));  // weight from the logit, not logit + bias
  CHECK(w(0, 1) == Approx(p3).epsilon(1e-6));
}

TEST_CASE("NaN logits poison only their own token", "[moe][gating][nan]") {
  float const z[] = {1.f, std::nanf(""), 0.f, 2.f, 1.f, 0.f};
  for (auto mode : {CombineMode::code_ref, CombineMode::softmax_topk, CombineMode::softmax_topk_renorm,
                    CombineMode::topk_softmax, CombineMode::sigmoid_topk}) {
    Gating g;
    g.mode = mode;
    g.top_k = 2;
    Matrix<std::int32_t> ids({2, 2});
    Matrix<float> w({2, 2});
    moe::select_experts(matrix_view(z, 2, 3), g, ids.view(), w.view());
    INFO(moe::to_string(mode));
    CHECK(std::isnan(w(0, 0)));
    CHECK(std::isnan(w(0, 1)));
    CHECK(std::isfinite(w(1, 0)));
    CHECK(std::isfinite(w(1, 1)));
    CHECK(row_ids(ids, 0) == std::vector<std::int32_t>{0, 2});  // NaN ranks last, ids stay valid
  }
}

TEST_CASE("huge logits do not overflow the softmaxes", "[moe][gating]") {
  float const z[] = {1e30f, -1e30f, 1e30f, 3e38f};
  Gating g;
  g.mode = CombineMode::softmax_topk_renorm;
  g.top_k = 2;
  Matrix<std::int32_t> ids({1, 2});
  Matrix<float> w({1, 2});
  moe::select_experts(matrix_view(z, 1, 4), g, ids.view(), w.view());
  CHECK(ids(0, 0) == 3);
  CHECK(w(0, 0) == 1.0f);
  CHECK(w(0, 1) == 0.0f);
}

TEST_CASE("gating validation", "[moe][gating][errors]") {
  float const z[] = {1.f, 2.f, 3.f, 4.f};
  Matrix<std::int32_t> ids({1, 2});
  Matrix<float> w({1, 2});
  Gating g;
  g.top_k = 0;
  CHECK_THROWS_AS(moe::select_experts(matrix_view(z, 1, 4), g, ids.view(), w.view()), value_error);
  g.top_k = 5;
  CHECK_THROWS_AS(moe::select_experts(matrix_view(z, 1, 4), g, ids.view(), w.view()), value_error);
  g.top_k = 2;
  g.selection_bias = {1.f, 2.f};
  CHECK_THROWS_AS(moe::select_experts(matrix_view(z, 1, 4), g, ids.view(), w.view()), shape_error);
  g.selection_bias = {1.f, 2.f, NAN, 0.f};
  CHECK_THROWS_AS(moe::select_experts(matrix_view(z, 1, 4), g, ids.view(), w.view()), value_error);
  g.selection_bias.clear();
  g.output_scale = INFINITY;
  CHECK_THROWS_AS(moe::select_experts(matrix_view(z, 1, 4), g, ids.view(), w.view()), value_error);
  g.output_scale = 1.f;
  Matrix<std::int32_t> bad({1, 3});
  CHECK_THROWS_AS(moe::select_experts(matrix_view(z, 1, 4), g, bad.view(), w.view()), shape_error);
  CHECK_THROWS_AS(moe::combine_mode_from_string("softmax"), value_error);
}

TEST_CASE("group_by_expert is a stable counting sort", "[moe][dispatch]") {
  // 5 tokens, K = 2, 4 experts; expert 2 gets no token, expert 0 gets one slot of every token but one.
  std::int32_t const ids_data[] = {0, 1, 3, 0, 0, 3, 1, 3, 0, 1};
  auto const ids = matrix_view(ids_data, 5, 2);
  Vector<std::int64_t> offsets({5});
  Vector<std::int32_t> slots({10});
  moe::group_by_expert(ids, 4, offsets.view(), slots.view());
  std::vector<std::int64_t> off(offsets.data(), offsets.data() + 5);
  std::vector<std::int32_t> sl(slots.data(), slots.data() + 10);
  CHECK(off == std::vector<std::int64_t>{0, 4, 7, 7, 10});
  CHECK(sl == std::vector<std::int32_t>{0, 3, 4, 8, 1, 6, 9, 2, 5, 7});
  Matrix<std::int32_t> none({0, 2});
  Vector<std::int32_t> empty_slots({0});
  moe::group_by_expert(MatrixView<std::int32_t const>(none.cview()), 4, offsets.view(), empty_slots.view());
  CHECK(offsets[4] == 0);
  std::int32_t const bad_ids[] = {0, 4};
  CHECK_THROWS_AS(moe::group_by_expert(matrix_view(bad_ids, 1, 2), 4, offsets.view(), slots.view().slice_rows(0, 2)), value_error);
  CHECK_THROWS_AS(moe::group_by_expert(ids, 4, offsets.view().slice_rows(0, 4), slots.view()), shape_error);
}

TEST_CASE("combine sums weighted slots in order", "[moe][combine]") {
  float const w[] = {0.5f, 2.f, 1.f, -1.f};
  float const out[] = {1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f};
  Matrix<float> y({2, 2});
  moe::combine(matrix_view(w, 2, 2), matrix_view(out, 4, 2), y.view());
  CHECK(y(0, 0) == 0.5f * 1 + 2 * 3);
  CHECK(y(0, 1) == 0.5f * 2 + 2 * 4);
  CHECK(y(1, 0) == 5.f - 7.f);
  CHECK(y(1, 1) == 6.f - 8.f);
  CHECK_THROWS_AS(moe::combine(matrix_view(w, 2, 2), matrix_view(out, 3, 2), y.view()), shape_error);
}
