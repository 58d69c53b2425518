// SPDX-License-Identifier: Apache-2.0
// Tests of the closed-form ridge refit (train/refit.hpp): the refit against a normal-equations solve written in the
// test (double), its error reports against the MoE forward, the ridge limits, other weight types, and errors.
#include <catch2/catch.hpp>

#include <factorllm/ffn/factorize.hpp>
#include <factorllm/moe/moe_ffn.hpp>
#include <factorllm/train/fixed_routing.hpp>
#include <factorllm/train/refit.hpp>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <utility>
#include <vector>

#include "reference/fixtures.hpp"
#include "reference/recovery_fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using fixture::router_from;
using fixture::same_bits;
using Layer = fixture::RecoveryLayer;

namespace {

/// Hidden activations of the neurons `perm[e*m .. (e+1)*m)` for token x (reference, double).
ref::Vec ref_hidden(ref::Ffn const& f, std::vector<std::int32_t> const& perm, int m, int e, double const* x) {
  ref::Vec h(static_cast<std::size_t>(m));
  for (int i = 0; i < m; ++i) {
    int const nrn = perm[static_cast<std::size_t>(e * m + i)];
    double g = 0, u = 0;
    for (int k = 0; k < f.d_model; ++k) {
      g += f.gate[static_cast<std::size_t>(nrn * f.d_model + k)] * x[k];
      u += f.up[static_cast<std::size_t>(nrn * f.d_model + k)] * x[k];
    }
    h[static_cast<std::size_t>(i)] = ref::silu(g) * u;
  }
  return h;
}

/// Solves M X = B (M [p, p], B [p, q], row-major) by Gaussian elimination with partial pivoting.
ref::Vec solve(ref::Vec m, ref::Vec b, int p, int q) {
  for (int c = 0; c < p; ++c) {
    int piv = c;
    for (int r = c + 1; r < p; ++r)
      if (std::fabs(m[static_cast<std::size_t>(r * p + c)]) > std::fabs(m[static_cast<std::size_t>(piv * p + c)])) piv = r;
    for (int k = 0; k < p; ++k) std::swap(m[static_cast<std::size_t>(c * p + k)], m[static_cast<std::size_t>(piv * p + k)]);
    for (int k = 0; k < q; ++k) std::swap(b[static_cast<std::size_t>(c * q + k)], b[static_cast<std::size_t>(piv * q + k)]);
    for (int r = c + 1; r < p; ++r) {
      double const f = m[static_cast<std::size_t>(r * p + c)] / m[static_cast<std::size_t>(c * p + c)];
      for (int k = c; k < p; ++k) m[static_cast<std::size_t>(r * p + k)] -= f * m[static_cast<std::size_t>(c * p + k)];
      for (int k = 0; k < q; ++k) b[static_cast<std::size_t>(r * q + k)] -= f * b[static_cast<std::size_t>(c * q + k)];
    }
  }
  for (int c = p - 1; c >= 0; --c)
    for (int k = 0; k < q; ++k) {
      double s = b[static_cast<std::size_t>(c * q + k)];
      for (int j = c + 1; j < p; ++j) s -= m[static_cast<std::size_t>(c * p + j)] * b[static_cast<std::size_t>(j * q + k)];
      b[static_cast<std::size_t>(c * q + k)] = s / m[static_cast<std::size_t>(c * p + c)];
    }
  return b;
}

double rel_moe_error(moe::MoeFfn<double, CpuScalar> const& layer, Matrix<double> const& x, ffn::DenseFfnView<double> const& dense) {
  Matrix<double> ym({x.extent(0), x.extent(1)}), yd({x.extent(0), x.extent(1)});
  layer.forward(x.cview(), ym.view());
  ffn::swiglu_forward(dense, x.cview(), yd.view());
  return ref::rel_l2(ym.data(), yd.data(), static_cast<std::size_t>(ym.size()));
}

}  // namespace

TEST_CASE("recover_refit equals a direct normal-equations solve and lowers the error", "[train][recovery][refit]") {
  for (double ridge : {1e-3, 0.3}) {
    Layer const L(200);
    auto experts = ffn::factorize(L.w.view(), L.part);
    auto const before = experts.down_tensor();
    auto const rep = train::recover_refit(experts, L.router(), L.gating, L.x.cview(), L.w.view(), ridge);

    // Independent reference: routing from the spec's formulas, features z_t, normal equations in plain loops.
    int const p = L.d_ff, d = L.d;
    auto const& perm = L.part.permutation();
    ref::Vec z(static_cast<std::size_t>(L.n_tokens * p), 0.0), fm(static_cast<std::size_t>(L.n_tokens * d));
    for (int t = 0; t < L.n_tokens; ++t) {
      double const* xt = L.xv.data() + t * d;
      auto const lg = ref::logits(L.rw, L.rb, xt, L.n, d);
      auto const sel = ref::topk(lg, L.k);
      auto const cw = ref::combine_weights("softmax_topk_renorm", lg, sel);
      for (std::size_t j = 0; j < sel.size(); ++j) {
        auto const h = ref_hidden(L.f, perm, L.m, sel[j], xt);
        for (int i = 0; i < L.m; ++i) z[static_cast<std::size_t>(t * p + sel[j] * L.m + i)] = cw[j] * h[static_cast<std::size_t>(i)];
      }
      auto const fx = ref::dense(L.f, xt);
      std::copy(fx.begin(), fx.end(), fm.begin() + t * d);
    }
    ref::Vec d0(static_cast<std::size_t>(p * d));  // [p, d]: row e*m+i = down column of neuron perm[e*m+i]
    for (int r = 0; r < p; ++r)
      for (int o = 0; o < d; ++o) d0[static_cast<std::size_t>(r * d + o)] = L.f.down[static_cast<std::size_t>(o * L.d_ff + perm[static_cast<std::size_t>(r)])];
    ref::Vec a(static_cast<std::size_t>(p * p), 0.0), rhs(static_cast<std::size_t>(p * d), 0.0);
    for (int t = 0; t < L.n_tokens; ++t)
      for (int r = 0; r < p; ++r) {
        double const zr = z[static_cast<std::size_t>(t * p + r)];
        for (int c = 0; c < p; ++c) a[static_cast<std::size_t>(r * p + c)] += zr * z[static_cast<std::size_t>(t * p + c)];
        for (int o = 0; o < d; ++o) rhs[static_cast<std::size_t>(r * d + o)] += zr * fm[static_cast<std::size_t>(t * d + o)];
      }
    double trace = 0;
    for (int r = 0; r < p; ++r) trace += a[static_cast<std::size_t>(r * p + r)];
    double const lambda = ridge * trace / p;
    for (int r = 0; r < p; ++r)
      for (int o = 0; o < d; ++o)
        for (int c = 0; c < p; ++c) rhs[static_cast<std::size_t>(r * d + o)] -= a[static_cast<std::size_t>(r * p + c)] * d0[static_cast<std::size_t>(c * d + o)];
    for (int r = 0; r < p; ++r) a[static_cast<std::size_t>(r * p + r)] += lambda;
    auto const delta = solve(a, rhs, p, d);
    INFO("ridge " << ridge);
    CHECK(rep.lambda == Approx(lambda).epsilon(1e-12));
    CHECK(rep.n_tokens == L.n_tokens);
    double worst = 0, scale = 0;
    for (int e = 0; e < L.n; ++e)
      for (int o = 0; o < d; ++o)
        for (int i = 0; i < L.m; ++i) {
          double const want = d0[static_cast<std::size_t>((e * L.m + i) * d + o)] + delta[static_cast<std::size_t>((e * L.m + i) * d + o)];
          worst = std::max(worst, std::fabs(experts.down(e)(o, i) - want));
          scale = std::max(scale, std::fabs(want));
        }
    CHECK(worst < 1e-9 * scale);
    // Gate and up are untouched; the reports are the MoE layer's errors before and after.
    CHECK(same_bits(experts.gate_tensor(), ffn::factorize(L.w.view(), L.part).gate_tensor()));
    CHECK_FALSE(same_bits(experts.down_tensor(), before));
    CHECK(rep.final_relative_error < rep.initial_relative_error);
    CHECK(rep.initial_relative_error ==
          Approx(rel_moe_error(moe::MoeFfn<double, CpuScalar>(ffn::factorize(L.w.view(), L.part), L.router(), L.gating), L.x, L.w.view()))
              .epsilon(1e-9));
    CHECK(rep.final_relative_error ==
          Approx(rel_moe_error(moe::MoeFfn<double, CpuScalar>(experts, L.router(), L.gating), L.x, L.w.view())).epsilon(1e-9));
  }
}

TEST_CASE("recover_refit: ridge limits, unused experts, K = N, bf16 and float weights", "[train][recovery][refit]") {
  Layer const L(210);
  SECTION("a huge ridge leaves the weights (almost) unchanged") {
    auto experts = ffn::factorize(L.w.view(), L.part);
    auto const rep = train::recover_refit(experts, L.router(), L.gating, L.x.cview(), L.w.view(), 1e12);
    auto const orig = ffn::factorize(L.w.view(), L.part);
    auto const& d0 = orig.down_tensor();
    for (std::ptrdiff_t i = 0; i < d0.size(); ++i) REQUIRE(experts.down_tensor()[i] == Approx(d0[i]).margin(1e-9));
    CHECK(rep.final_relative_error == Approx(rep.initial_relative_error).epsilon(1e-6));
  }
  SECTION("ridge = 0 is least squares; experts no token selects keep their weights") {
    // Router that always picks experts 1 and 3 (zero weights, bias), so experts 0 and 2 have no features.
    ref::Vec const rw(static_cast<std::size_t>(L.n * L.d), 0.0), rb = {0.0, 2.0, 0.0, 1.0};
    auto const router = router_from<double>(rw, rb, L.n, L.d);
    auto experts = ffn::factorize(L.w.view(), L.part);
    auto const rep = train::recover_refit(experts, router, L.gating, L.x.cview(), L.w.view(), 0.0);
    auto const orig = ffn::factorize(L.w.view(), L.part);
    for (int e : {0, 2})
      for (int o = 0; o < L.d; ++o)
        for (int i = 0; i < L.m; ++i) REQUIRE(experts.down(e)(o, i) == orig.down(e)(o, i));
    CHECK(rep.final_relative_error < rep.initial_relative_error);
    CHECK(rep.lambda == 0.0);
  }
  SECTION("K = N with code_ref: the factorization is already exact and stays so") {
    moe::Gating g;
    g.mode = moe::CombineMode::code_ref;
    g.top_k = L.n;
    auto experts = ffn::factorize(L.w.view(), L.part);
    auto const rep = train::recover_refit(experts, L.router(), g, L.x.cview(), L.w.view(), 1e-3);
    CHECK(rep.initial_relative_error < 1e-12);
    CHECK(rep.final_relative_error < 1e-10);
  }
  SECTION("float and bf16 weights") {
    fixture::DenseWeights<float> wf(L.f);
    auto const xf = fixture::to_matrix<float>(L.xv, L.n_tokens, L.d);
    auto ef = ffn::factorize(wf.view(), L.part);
    auto const rf = train::recover_refit(ef, router_from<float>(L.rw, L.rb, L.n, L.d), L.gating, xf.cview(), wf.view(), 1e-3);
    CHECK(rf.final_relative_error < 0.8 * rf.initial_relative_error);
    fixture::DenseWeights<bf16> wb(L.f);
    auto eb = ffn::factorize(wb.view(), L.part);
    auto const rb = train::recover_refit(eb, router_from<float>(L.rw, L.rb, L.n, L.d), L.gating, xf.cview(), wb.view(), 1e-3);
    CHECK(rb.final_relative_error < 0.8 * rb.initial_relative_error);
  }
}

TEST_CASE("recover_refit rejects bad inputs with the documented exceptions", "[train][recovery][refit][errors]") {
  Layer const L(250);
  auto experts = ffn::factorize(L.w.view(), L.part);
  auto const router = L.router();
  auto const x = L.x.cview();
  CHECK_THROWS_AS(train::recover_refit(experts, router, L.gating, x, L.w.view(), -1.0), value_error);
  CHECK_THROWS_AS(train::recover_refit(experts, router, L.gating, x, L.w.view(), std::nan("")), value_error);
  CHECK_THROWS_AS(train::recover_refit(experts, router, L.gating, x.slice_rows(0, 0), L.w.view(), 1e-3), value_error);
  Matrix<double> x_bad({4, L.d + 1});
  CHECK_THROWS_AS(train::recover_refit(experts, router, L.gating, x_bad.cview(), L.w.view(), 1e-3), shape_error);
  moe::Gating too_many = L.gating;
  too_many.top_k = L.n + 1;
  CHECK_THROWS_AS(train::recover_refit(experts, router, too_many, x, L.w.view(), 1e-3), value_error);
  CHECK_THROWS_AS(train::recover_refit(experts, moe::Router<double>::random(L.d, 3, 1), L.gating, x, L.w.view(), 1e-3), shape_error);
  fixture::DenseWeights<double> other(ref::random_ffn(L.d, 8, 251));
  CHECK_THROWS_AS(train::recover_refit(experts, router, L.gating, x, other.view(), 1e-3), shape_error);
  // Routing given as data: ids outside [0, N), repeated, or mis-shaped.
  auto routing = train::fixed_routing(router, L.gating, x);
  routing.ids(5, 1) = 9;
  CHECK_THROWS_AS(train::recover_refit(experts, routing, x, L.w.view(), 1e-3), value_error);
  routing.ids(5, 1) = routing.ids(5, 0);
  CHECK_THROWS_AS(train::recover_refit(experts, routing, x, L.w.view(), 1e-3), value_error);
  CHECK_THROWS_WITH(train::recover_refit(experts, routing, x, L.w.view(), 1e-3), Catch::Contains("repeats"));
  CHECK_THROWS_AS(train::recover_refit(experts, routing, x.slice_rows(0, 10), L.w.view(), 1e-3), shape_error);
  // Nothing was modified by the failed calls.
  CHECK(same_bits(experts.down_tensor(), ffn::factorize(L.w.view(), L.part).down_tensor()));
}
