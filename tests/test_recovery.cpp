// SPDX-License-Identifier: Apache-2.0
// Tests of layer-local recovery (train/recovery.hpp): the ridge refit against a normal-equations solve written in the
// test (double), its error reports against the MoE forward, the distillation gradient against central finite
// differences (double, rel < 1e-4), distillation reducing the loss, shared-expert routing, determinism and errors.
#include <catch2/catch.hpp>

#include <factorllm/ffn/factorize.hpp>
#include <factorllm/moe/moe_ffn.hpp>
#include <factorllm/train/recovery.hpp>

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using ffn::ExpertPartition;
using moe::CombineMode;

namespace {

template <class A>
moe::Router<A> router_from(ref::Vec const& w, ref::Vec const& b, int n, int d) {
  Vector<A> bv({n});
  for (int i = 0; i < n; ++i) bv[i] = static_cast<A>(b[static_cast<std::size_t>(i)]);
  return moe::Router<A>(fixture::to_matrix<A>(w, n, d), std::move(bv));
}

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

/// A small random layer in double with a softmax_topk_renorm K = 2 of 4 router.
struct Layer {
  int d = 6, d_ff = 12, n = 4, m = 3, k = 2, n_tokens = 60;
  ref::Ffn f;
  fixture::DenseWeights<double> w;
  ExpertPartition part;
  ref::Vec xv, rw, rb;
  Matrix<double> x;
  moe::Gating gating;
  explicit Layer(std::uint64_t seed, CombineMode mode = CombineMode::softmax_topk_renorm)
      : f(ref::random_ffn(d, d_ff, seed)), w(f), part(ExpertPartition::random(d_ff, n, seed + 1)),
        xv(ref::randn(static_cast<std::size_t>(n_tokens * d), seed + 2, 1.0)),
        rw(ref::randn(static_cast<std::size_t>(n * d), seed + 3, 0.7)), rb(ref::randn(static_cast<std::size_t>(n), seed + 4, 0.3)),
        x(fixture::to_matrix<double>(xv, n_tokens, d)) {
    gating.mode = mode;
    gating.top_k = k;
  }
  moe::Router<double> router() const { return router_from<double>(rw, rb, n, d); }
};

double rel_moe_error(moe::MoeFfn<double> const& layer, Matrix<double> const& x, ffn::DenseFfnView<double> const& dense) {
  Matrix<double> ym({x.extent(0), x.extent(1)}), yd({x.extent(0), x.extent(1)});
  layer.forward(x.cview(), ym.view());
  ffn::swiglu_forward(dense, x.cview(), yd.view());
  return ref::rel_l2(ym.data(), yd.data(), static_cast<std::size_t>(ym.size()));
}

template <class T>
bool same_bits(Tensor<T, 3> const& a, Tensor<T, 3> const& b) {
  return a.extents() == b.extents() && std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0;
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
          Approx(rel_moe_error(moe::MoeFfn<double>(ffn::factorize(L.w.view(), L.part), L.router(), L.gating), L.x, L.w.view()))
              .epsilon(1e-9));
    CHECK(rep.final_relative_error ==
          Approx(rel_moe_error(moe::MoeFfn<double>(experts, L.router(), L.gating), L.x, L.w.view())).epsilon(1e-9));
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
      moe::MoeFfn<double>(experts, router, g).forward(x.cview(), ym.view());
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
    moe::MoeFfn<float>(e1, router, g).forward(x.cview(), ym.view());
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

TEST_CASE("recovery rejects bad inputs with the documented exceptions", "[train][recovery][errors]") {
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
  CHECK_THROWS_AS(train::fixed_routing(router, L.gating, x, -1), value_error);
  // Nothing was modified by the failed calls.
  CHECK(same_bits(experts.down_tensor(), ffn::factorize(L.w.view(), L.part).down_tensor()));
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
