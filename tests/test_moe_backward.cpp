// SPDX-License-Identifier: Apache-2.0
// Tests of the MoE training forward and backward (train/moe_backward.hpp): every gradient against central
// finite differences in double (scalar oracle), cpu_simd against the oracle in float, bitwise determinism across
// thread counts, edge shapes, and refusal of records, views and workspaces that do not fit the call.
#include <catch2/catch.hpp>

#include <factorllm/train/moe_backward.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using moe::CombineMode;
using Simd = CpuSimd<>;

namespace {

/// One layer's parameters and inputs as owning tensors of type T (double for the finite-difference tests).
template <class T>
struct Layer {
  std::ptrdiff_t n, m, d;
  Tensor<T, 3> gate, up, down;
  Matrix<T> rw;
  Vector<T> rb;
  Layer(std::ptrdiff_t n_experts, std::ptrdiff_t d_expert, std::ptrdiff_t d_model, std::uint64_t seed, double router_scale)
      : n(n_experts), m(d_expert), d(d_model), gate({n, m, d}), up({n, m, d}), down({n, d, m}), rw({n, d}), rb({n}) {
    auto fill = [](auto& t, std::uint64_t s, double scale) {
      auto const v = ref::randn(static_cast<std::size_t>(t.size()), s, scale);
      for (std::ptrdiff_t i = 0; i < t.size(); ++i) t[i] = static_cast<T>(v[static_cast<std::size_t>(i)]);
    };
    fill(gate, seed, 1.0 / std::sqrt(static_cast<double>(d)));
    fill(up, seed + 1, 1.0 / std::sqrt(static_cast<double>(d)));
    fill(down, seed + 2, 1.0 / std::sqrt(static_cast<double>(m * n)));
    fill(rw, seed + 3, router_scale);
    fill(rb, seed + 4, router_scale);
  }
  train::MoeParamsView<T> params() const { return {gate.cview(), up.cview(), down.cview(), rw.cview(), rb.cview()}; }
};

/// Owning gradient buffers shaped like a layer (plus dL/dx and dL/dz for n_tokens tokens).
template <class A>
struct Grads {
  Matrix<A> x, logits, rw;
  Tensor<A, 3> gate, up, down;
  Vector<A> rb;
  // Filled with NaN, so a gradient element the backward forgets to write fails every comparison.
  Grads(std::ptrdiff_t t, std::ptrdiff_t n, std::ptrdiff_t m, std::ptrdiff_t d)
      : x({t, d}), logits({t, n}), rw({n, d}), gate({n, m, d}), up({n, m, d}), down({n, d, m}), rb({n}) {
    A const nan = std::numeric_limits<A>::quiet_NaN();
    for (auto* v : {&x, &logits, &rw}) std::fill(v->data(), v->data() + v->size(), nan);
    for (auto* v : {&gate, &up, &down}) std::fill(v->data(), v->data() + v->size(), nan);
    std::fill(rb.data(), rb.data() + rb.size(), nan);
  }
  train::MoeGradsView<A> view() {
    return {x.view(), gate.view(), up.view(), down.view(), rw.view(), rb.view(), logits.view()};
  }
};

moe::Gating make_gating(CombineMode mode, std::ptrdiff_t k, bool renorm = false, float scale = 1.f,
                        std::vector<float> bias = {}) {
  moe::Gating g;
  g.mode = mode;
  g.top_k = k;
  g.sigmoid_renormalize = renorm;
  g.output_scale = scale;
  g.selection_bias = std::move(bias);
  return g;
}

/// L = sum(y * R) for a fixed random R, so dL/dy = R.
template <class T>
double loss(Layer<T> const& layer, moe::Gating const& g, Matrix<T> const& x, Matrix<T> const& r,
            moe::RoutingRecord<T>* ids_out = nullptr) {
  auto const p = layer.params();
  Matrix<T> y({x.extent(0), layer.d});
  moe::RoutingRecord<T> rec;
  Workspace ws(train::moe_forward_workspace_bytes(p, g.top_k, x.extent(0)));
  train::moe_forward(p, g, x.cview(), y.view(), rec, ws);
  double l = 0;
  for (std::ptrdiff_t i = 0; i < y.size(); ++i) l += y[i] * r[i];
  if (ids_out != nullptr) *ids_out = rec;
  return l;
}

bool same_ids(moe::RoutingRecord<double> const& a, moe::RoutingRecord<double> const& b) {
  for (std::ptrdiff_t i = 0; i < a.ids.size(); ++i)
    if (a.ids[i] != b.ids[i]) return false;
  return true;
}

struct FdStats {
  double max_err = 0, mean_abs_err = 0;
  int checked = 0, skipped = 0;
};

/// Central finite differences of the loss w.r.t. every element of `param` (perturbed in place), against the
/// analytic gradient `grad`. Elements whose perturbation changes the routing (a TopK boundary) are skipped.
template <class Tns, class G>
void fd_check(Tns& param, G const& grad, Layer<double> const& layer, moe::Gating const& g, Matrix<double> const& x,
              Matrix<double> const& r, moe::RoutingRecord<double> const& base, FdStats& st) {
  constexpr double h = 1e-6;
  for (std::ptrdiff_t i = 0; i < param.size(); ++i) {
    double const keep = param[i];
    moe::RoutingRecord<double> rp, rm;
    param[i] = keep + h;
    double const lp = loss(layer, g, x, r, &rp);
    param[i] = keep - h;
    double const lm = loss(layer, g, x, r, &rm);
    param[i] = keep;
    if (!same_ids(rp, base) || !same_ids(rm, base)) {
      ++st.skipped;
      continue;
    }
    double const fd = (lp - lm) / (2 * h);
    double const err = std::fabs(fd - grad[i]) / std::max(1.0, std::fabs(fd));
    st.max_err = std::max(st.max_err, err);
    st.mean_abs_err += std::fabs(fd - grad[i]);
    ++st.checked;
  }
}

}  // namespace

// Tolerance (written down): central differences with h = 1e-6 in double have truncation error O(h^2 |L'''|)
// ~ 1e-12 and round-off ~ eps |L| / h ~ 1e-9 for |L| ~ 10; we require |fd - analytic| <= 1e-6 max(1, |fd|) for
// every element, and report the mean absolute error.
TEST_CASE("MoE backward matches central finite differences in double for every mode", "[train][backward][fd]") {
  struct Case {
    CombineMode mode;
    int n, k;
    bool renorm;
    float scale;
    bool bias;
  };
  Case const cases[] = {
      {CombineMode::code_ref, 4, 2, false, 1.f, false},        {CombineMode::softmax_topk, 4, 2, false, 1.f, false},
      {CombineMode::softmax_topk_renorm, 4, 2, false, 1.5f, false}, {CombineMode::topk_softmax, 3, 2, false, 1.f, true},
      {CombineMode::sigmoid_topk, 4, 2, false, 1.f, false},    {CombineMode::sigmoid_topk, 4, 3, true, 0.5f, false},
      {CombineMode::softmax_topk, 4, 1, false, 2.f, false},    {CombineMode::softmax_topk_renorm, 3, 3, false, 1.f, false},
      {CombineMode::softmax_topk_renorm, 1, 1, false, 1.f, false}, {CombineMode::code_ref, 4, 4, false, 1.f, false},
  };
  std::uint64_t seed = 11;
  for (auto const& c : cases) {
    std::ptrdiff_t const d = 5, m = 3, t = 7;
    Layer<double> layer(c.n, m, d, seed += 10, 0.8);
    auto const x = fixture::to_matrix<double>(ref::randn(static_cast<std::size_t>(t * d), seed + 5, 1.0), t, d);
    auto const r = fixture::to_matrix<double>(ref::randn(static_cast<std::size_t>(t * d), seed + 6, 1.0), t, d);
    std::vector<float> bias;
    if (c.bias) bias = {0.3f, -0.2f, 0.1f};
    auto const g = make_gating(c.mode, c.k, c.renorm, c.scale, bias);
    INFO("mode=" << moe::to_string(c.mode) << " N=" << c.n << " K=" << c.k << " renorm=" << c.renorm << " seed=" << seed);

    // Analytic gradients, with and without saved pre-activations (bitwise equal in double).
    auto const p = layer.params();
    Matrix<double> y({t, d});
    moe::RoutingRecord<double> rec;
    train::MoeActivations<double> saved;
    Workspace wf(train::moe_forward_workspace_bytes(p, c.k, t));
    train::moe_forward(p, g, x.cview(), y.view(), rec, wf, &saved);
    Grads<double> gr(t, c.n, m, d), gr2(t, c.n, m, d);
    Workspace wb(train::moe_backward_workspace_bytes(p, c.k, t));
    train::moe_backward(p, g, rec, x.cview(), r.cview(), gr.view(), wb);
    train::moe_backward(p, g, rec, x.cview(), r.cview(), gr2.view(), wb, &saved);
    REQUIRE(std::memcmp(gr.gate.data(), gr2.gate.data(), sizeof(double) * static_cast<std::size_t>(gr.gate.size())) == 0);
    REQUIRE(std::memcmp(gr.x.data(), gr2.x.data(), sizeof(double) * static_cast<std::size_t>(gr.x.size())) == 0);

    FdStats st;
    Matrix<double> xm(x);
    fd_check(xm, gr.x, layer, g, xm, r, rec, st);
    fd_check(layer.gate, gr.gate, layer, g, x, r, rec, st);
    fd_check(layer.up, gr.up, layer, g, x, r, rec, st);
    fd_check(layer.down, gr.down, layer, g, x, r, rec, st);
    fd_check(layer.rw, gr.rw, layer, g, x, r, rec, st);
    fd_check(layer.rb, gr.rb, layer, g, x, r, rec, st);
    INFO("checked " << st.checked << ", skipped " << st.skipped << " (routing changed), max err " << st.max_err
                    << ", mean abs err " << st.mean_abs_err / std::max(1, st.checked));
    CHECK(st.max_err < 1e-6);
    CHECK(st.skipped * 20 < st.checked);  // the data keep logits away from TopK boundaries

    // dL/dz is consistent with the router gradients: db_r = sum_t dz_t, dW_r = dz^T x.
    for (std::ptrdiff_t e = 0; e < c.n; ++e) {
      double sb = 0;
      for (std::ptrdiff_t tt = 0; tt < t; ++tt) sb += gr.logits(tt, e);
      CHECK(gr.rb(e) == Approx(sb).margin(1e-12));
      for (std::ptrdiff_t cc = 0; cc < d; ++cc) {
        double sw = 0;
        for (std::ptrdiff_t tt = 0; tt < t; ++tt) sw += gr.logits(tt, e) * x(tt, cc);
        CHECK(gr.rw(e, cc) == Approx(sw).margin(1e-12));
      }
    }
    if (c.mode == CombineMode::code_ref) {  // no gradient reaches the router in the paper code's mode
      for (std::ptrdiff_t i = 0; i < gr.rw.size(); ++i) REQUIRE(gr.rw[i] == 0.0);
      for (std::ptrdiff_t i = 0; i < gr.rb.size(); ++i) REQUIRE(gr.rb[i] == 0.0);
    }
  }
}

TEST_CASE("training forward equals MoeFfn::forward (scalar, double: same routing, outputs to 1e-13)", "[train][backward]") {
  std::ptrdiff_t const d = 9, m = 5, n = 4, t = 11;
  Layer<double> layer(n, m, d, 3, 1.0);
  auto const x = fixture::to_matrix<double>(ref::randn(static_cast<std::size_t>(t * d), 4, 1.0), t, d);
  for (auto mode : {CombineMode::code_ref, CombineMode::softmax_topk_renorm, CombineMode::sigmoid_topk}) {
    auto const g = make_gating(mode, 2);
    ffn::ExpertWeights<double> ex(layer.gate, layer.up, layer.down, ffn::ExpertPartition::contiguous(n * m, n));
    moe::MoeFfn<double, CpuScalar> ref_layer(std::move(ex), moe::Router<double>(layer.rw, layer.rb), g);
    Matrix<double> y1({t, d}), y2({t, d});
    moe::RoutingRecord<double> r1, r2;
    Workspace w1(ref_layer.workspace_bytes(t));
    ref_layer.forward(x.cview(), y1.view(), w1, &r1);
    Workspace w2(train::moe_forward_workspace_bytes(layer.params(), 2, t));
    train::moe_forward(layer.params(), g, x.cview(), y2.view(), r2, w2);
    // Same sums in the same order, but the compiler may contract a * b + c into an FMA differently in the two
    // loops (-march with FMA), so equality holds to rounding, not bit for bit.
    REQUIRE(ref::rel_l2(y2.data(), y1.data(), static_cast<std::size_t>(y1.size())) < 1e-13);
    REQUIRE(same_ids(r1, r2));
    for (std::ptrdiff_t i = 0; i < r1.slots.size(); ++i) REQUIRE(r1.slots[i] == r2.slots[i]);
    // The convenience overload takes the layer and its recorded routing.
    auto const r = fixture::to_matrix<double>(ref::randn(static_cast<std::size_t>(t * d), 5, 1.0), t, d);
    Grads<double> ga(t, n, m, d), gb(t, n, m, d);
    Workspace wb(train::moe_backward_workspace_bytes(layer.params(), 2, t));
    train::moe_backward(ref_layer, r1, x.cview(), r.cview(), ga.view(), wb);
    train::moe_backward(layer.params(), g, r2, x.cview(), r.cview(), gb.view(), wb);
    REQUIRE(ref::rel_l2(ga.gate.data(), gb.gate.data(), static_cast<std::size_t>(ga.gate.size())) < 1e-13);
    REQUIRE(ref::rel_l2(ga.x.data(), gb.x.data(), static_cast<std::size_t>(ga.x.size())) < 1e-13);
    if (mode != CombineMode::code_ref)
      REQUIRE(ref::rel_l2(ga.rw.data(), gb.rw.data(), static_cast<std::size_t>(ga.rw.size())) < 1e-12);
  }
}

namespace {

/// Runs forward + backward on backend B in float; returns all outputs concatenated (y, dx, dgate, dup, ddown,
/// dW_r, db_r, dz) for comparison.
template <class B>
std::vector<float> run_float(Layer<float> const& layer, moe::Gating const& g, MatrixView<float const> x,
                             MatrixView<float const> dy, bool use_saved) {
  std::ptrdiff_t const t = x.rows();
  auto const p = layer.params();
  Matrix<float> y({t, layer.d});
  moe::RoutingRecord<float> rec;
  train::MoeActivations<float> saved;
  Workspace wf(train::moe_forward_workspace_bytes(p, g.top_k, t, B{}));
  train::moe_forward(p, g, x, y.view(), rec, wf, use_saved ? &saved : nullptr, B{});
  Grads<float> gr(t, layer.n, layer.m, layer.d);
  Workspace wb(train::moe_backward_workspace_bytes(p, g.top_k, t, B{}));
  train::moe_backward(p, g, rec, x, dy, gr.view(), wb, use_saved ? &saved : nullptr, B{});
  std::vector<float> all;
  auto append = [&](auto const& tns) { all.insert(all.end(), tns.data(), tns.data() + tns.size()); };
  append(y);
  append(gr.x);
  append(gr.gate);
  append(gr.up);
  append(gr.down);
  append(gr.rw);
  append(gr.rb);
  append(gr.logits);
  return all;
}

/// Relative L2 error of each gradient block of the simd run against the scalar run.
double worst_block_rel_l2(std::vector<float> const& a, std::vector<float> const& b, std::ptrdiff_t t,
                          Layer<float> const& l) {
  std::ptrdiff_t const sizes[] = {t * l.d, t * l.d, l.n * l.m * l.d, l.n * l.m * l.d, l.n * l.d * l.m, l.n * l.d, l.n, t * l.n};
  double worst = 0;
  std::size_t at = 0;
  for (auto s : sizes) {
    auto const n = static_cast<std::size_t>(s);
    double num = 0, den = 0;
    for (std::size_t i = at; i < at + n; ++i) {
      num += std::pow(static_cast<double>(a[i]) - b[i], 2);
      den += static_cast<double>(b[i]) * b[i];
    }
    // Blocks that are exactly zero in the oracle (code_ref router, no tokens) must be zero here too.
    worst = std::max(worst, den == 0 ? std::sqrt(num) : std::sqrt(num / den));
    at += n;
  }
  return worst;
}

}  // namespace

// Tolerance (written down): cpu_simd accumulates in float in a fixed order (GEMM depths d_model, d_expert or the
// expert's token count); the oracle in double. The relative L2 error of every output block (y, dx, each weight
// gradient, dW_r, db_r, dz) is bounded by a few ulps times sqrt(depth): we require < 5e-5 for the shapes below (measured worst: 1e-5)
// (depths up to 300). Routing is identical (well-separated logits).
TEST_CASE("cpu_simd training forward and backward match the scalar oracle in float", "[train][backward][simd]") {
  REQUIRE(Simd::available());
  struct Shape {
    int d, m, n, k, t;
  };
  // d and m around SIMD widths and the task-block edge (detail::kTrainBlock = 256), T = 0 and 1, K = N, N = 1, an
  // expert with no token (N = 8, T = 3, K = 1), experts with several neuron blocks and d with several column blocks.
  Shape const shapes[] = {{64, 43, 4, 2, 37},  {17, 6, 4, 1, 5},    {33, 40, 8, 1, 3},   {33, 5, 8, 8, 9},
                          {31, 15, 1, 1, 13},  {48, 24, 4, 4, 1},   {130, 255, 2, 1, 40}, {300, 256, 4, 2, 64},
                          {16, 16, 4, 2, 0},   {257, 257, 3, 2, 17}, {40, 520, 2, 1, 21}};
  std::uint64_t seed = 100;
  for (auto const& s : shapes) {
    for (auto mode : {CombineMode::code_ref, CombineMode::softmax_topk, CombineMode::softmax_topk_renorm,
                      CombineMode::sigmoid_topk}) {
      Layer<float> layer(s.n, s.m, s.d, seed += 7, 1.0);
      auto const g = make_gating(mode, s.k, mode == CombineMode::sigmoid_topk);
      auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(s.t * s.d), seed + 1, 1.0), s.t, s.d);
      auto const dy = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(s.t * s.d), seed + 2, 1.0), s.t, s.d);
      auto const ref_out = run_float<CpuScalar>(layer, g, x.cview(), dy.cview(), false);
      for (bool use_saved : {false, true}) {
        auto const out = run_float<Simd>(layer, g, x.cview(), dy.cview(), use_saved);
        INFO("d=" << s.d << " m=" << s.m << " N=" << s.n << " K=" << s.k << " T=" << s.t << " mode=" << moe::to_string(mode)
                  << " saved=" << use_saved);
        CHECK(worst_block_rel_l2(out, ref_out, s.t, layer) < 5e-5);
      }
    }
  }
}

TEST_CASE("cpu_simd backward accepts strided x and dy rows", "[train][backward][simd]") {
  std::ptrdiff_t const d = 40, m = 24, n = 4, t = 19, ld = 57;
  Layer<float> layer(n, m, d, 5, 1.0);
  auto const g = make_gating(CombineMode::softmax_topk_renorm, 2);
  auto const xs = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(t * ld), 6, 1.0), t, ld);
  auto const dys = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(t * ld), 7, 1.0), t, ld);
  auto const x = matrix_view(xs.data() + 3, t, d, ld);
  auto const dy = matrix_view(dys.data() + 5, t, d, ld);
  Matrix<float> xd({t, d}), dyd({t, d});
  xd.copy_from(x);
  dyd.copy_from(dy);
  auto const a = run_float<Simd>(layer, g, x, dy, true);
  auto const b = run_float<Simd>(layer, g, xd.cview(), dyd.cview(), true);
  REQUIRE(a == b);
}

TEST_CASE("cpu_simd training forward and backward are bitwise identical for 1 and 2 threads", "[train][backward][determinism]") {
  struct Shape {
    int d, m, n, k, t;
  };
  // Includes single-task shapes (N = 1, d_expert and d_model <= 256), where Eigen would otherwise thread the GEMM
  // itself, and shapes with several blocks per expert.
  Shape const shapes[] = {{256, 256, 4, 2, 100}, {64, 43, 4, 1, 300}, {96, 100, 1, 1, 200}, {200, 64, 8, 3, 7},
                          {300, 600, 2, 1, 90}};
  for (auto const& s : shapes) {
    Layer<float> layer(s.n, s.m, s.d, 9, 1.0);
    auto const g = make_gating(CombineMode::softmax_topk_renorm, s.k);
    auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(s.t * s.d), 2, 1.0), s.t, s.d);
    auto const dy = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(s.t * s.d), 3, 1.0), s.t, s.d);
    for (bool use_saved : {false, true}) {
#if defined(_OPENMP)
      int const keep = omp_get_max_threads();
      omp_set_num_threads(1);
      auto const one = run_float<Simd>(layer, g, x.cview(), dy.cview(), use_saved);
      omp_set_num_threads(2);
      auto const two = run_float<Simd>(layer, g, x.cview(), dy.cview(), use_saved);
      auto const again = run_float<Simd>(layer, g, x.cview(), dy.cview(), use_saved);
      omp_set_num_threads(keep);
#else
      WARN("built without OpenMP: only repeatability is checked");
      auto const one = run_float<Simd>(layer, g, x.cview(), dy.cview(), use_saved);
      auto const two = run_float<Simd>(layer, g, x.cview(), dy.cview(), use_saved);
      auto const again = two;
#endif
      INFO("d=" << s.d << " m=" << s.m << " N=" << s.n << " T=" << s.t << " saved=" << use_saved);
      REQUIRE(std::memcmp(one.data(), two.data(), sizeof(float) * one.size()) == 0);
      REQUIRE(std::memcmp(two.data(), again.data(), sizeof(float) * one.size()) == 0);
    }
  }
}

TEST_CASE("moe_backward refuses records, views and workspaces that do not fit the call", "[train][backward][errors]") {
  std::ptrdiff_t const d = 8, m = 4, n = 4, t = 6;
  Layer<float> layer(n, m, d, 1, 1.0);
  auto const p = layer.params();
  auto const g = make_gating(CombineMode::softmax_topk_renorm, 2);
  auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(t * d), 2, 1.0), t, d);
  Matrix<float> y({t, d});
  moe::RoutingRecord<float> rec;
  Workspace wf(train::moe_forward_workspace_bytes(p, 2, t, Simd{}));
  train::moe_forward(p, g, x.cview(), y.view(), rec, wf, nullptr, Simd{});
  Grads<float> gr(t, n, m, d);
  Workspace wb(train::moe_backward_workspace_bytes(p, 2, t, Simd{}));
  REQUIRE_NOTHROW(train::moe_backward(p, g, rec, x.cview(), y.cview(), gr.view(), wb, nullptr, Simd{}));

  SECTION("a record from a forward over another number of tokens") {
    auto const x5 = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(5 * d), 2, 1.0), 5, d);
    Matrix<float> y5({5, d});
    moe::RoutingRecord<float> rec5;
    train::moe_forward(p, g, x5.cview(), y5.view(), rec5, wf, nullptr, Simd{});
    CHECK_THROWS_AS(train::moe_backward(p, g, rec5, x.cview(), y.cview(), gr.view(), wb, nullptr, Simd{}), shape_error);
    CHECK_THROWS_WITH(train::moe_backward(p, g, rec5, x.cview(), y.cview(), gr.view(), wb, nullptr, Simd{}),
                      Catch::Contains("record.logits") && Catch::Contains("[5, 4]") && Catch::Contains("[6, 4]"));
  }
  SECTION("a record for another top_k") {
    CHECK_THROWS_AS(train::moe_backward(p, make_gating(CombineMode::softmax_topk_renorm, 1), rec, x.cview(), y.cview(),
                                        gr.view(), wb, nullptr, Simd{}),
                    shape_error);
  }
  SECTION("a corrupt record") {
    auto bad = rec;
    bad.ids(0, 0) = 7;
    CHECK_THROWS_AS(train::moe_backward(p, g, bad, x.cview(), y.cview(), gr.view(), wb, nullptr, Simd{}), value_error);
    bad = rec;
    std::swap(bad.slots[0], bad.slots[1]);
    CHECK_THROWS_AS(train::moe_backward(p, g, bad, x.cview(), y.cview(), gr.view(), wb, nullptr, Simd{}), value_error);
    bad = rec;
    bad.offsets[1] += 1;
    CHECK_THROWS_AS(train::moe_backward(p, g, bad, x.cview(), y.cview(), gr.view(), wb, nullptr, Simd{}), value_error);
  }
  SECTION("mis-shaped gradients, dy and saved activations") {
    Grads<float> wrong(t, n, m + 1, d);
    CHECK_THROWS_WITH(train::moe_backward(p, g, rec, x.cview(), y.cview(), wrong.view(), wb, nullptr, Simd{}),
                      Catch::Contains("grads.gate"));
    Matrix<float> dy_bad({t, d + 1});
    CHECK_THROWS_AS(train::moe_backward(p, g, rec, x.cview(), dy_bad.cview(), gr.view(), wb, nullptr, Simd{}), shape_error);
    train::MoeActivations<float> saved;
    saved.resize(t * 2 - 1, m);
    CHECK_THROWS_AS(train::moe_backward(p, g, rec, x.cview(), y.cview(), gr.view(), wb, &saved, Simd{}), shape_error);
  }
  SECTION("a padded weight view") {
    Tensor<float, 3> padded({n, m, d + 3});
    train::MoeParamsView<float> q = p;
    q.gate = TensorView<float const, 3>(padded.data(), {n, m, d}, {m * (d + 3), d + 3, 1});
    CHECK_THROWS_WITH(train::moe_backward(q, g, rec, x.cview(), y.cview(), gr.view(), wb, nullptr, Simd{}),
                      Catch::Contains("'gate'") && Catch::Contains("dense"));
  }
  SECTION("a workspace sized for fewer tokens") {
    Workspace small(train::moe_backward_workspace_bytes(p, 2, t - 2, Simd{}));
    CHECK_THROWS_AS(train::moe_backward(p, g, rec, x.cview(), y.cview(), gr.view(), small, nullptr, Simd{}), backend_error);
    Workspace small_f(train::moe_forward_workspace_bytes(p, 2, t - 2, Simd{}));
    CHECK_THROWS_AS(train::moe_forward(p, g, x.cview(), y.view(), rec, small_f, nullptr, Simd{}), backend_error);
  }
}

TEST_CASE("backward with no tokens writes zero gradients", "[train][backward]") {
  Layer<float> layer(4, 8, 16, 2, 1.0);
  auto const g = make_gating(CombineMode::softmax_topk, 2);
  Matrix<float> x({0, 16});
  for (auto out : {run_float<CpuScalar>(layer, g, x.cview(), x.cview(), false), run_float<Simd>(layer, g, x.cview(), x.cview(), true)})
    for (float v : out) REQUIRE(v == 0.f);
}

namespace {

/// L(z) = sum_j c_j w_j(z) for the combine weights the forward computes (op select_experts, the routing step of
/// every backend's training forward) from one token's logits z; ids of the routing are returned through `ids`.
double weights_loss(std::vector<double> const& z, moe::Gating const& g, std::vector<double> const& c,
                    std::vector<std::int32_t>& ids) {
  std::ptrdiff_t const n = static_cast<std::ptrdiff_t>(z.size()), k = g.top_k;
  Matrix<double> w({1, k});
  Matrix<std::int32_t> id({1, k});
  kernel::SelectExperts<CpuScalar>::run(matrix_view<double const>(z.data(), 1, n), g.params(), id.view(), w.view());
  ids.assign(id.data(), id.data() + k);
  double l = 0;
  for (std::ptrdiff_t j = 0; j < k; ++j) l += c[static_cast<std::size_t>(j)] * w(0, j);
  return l;
}

}  // namespace

// Issue 5: the renormalized sigmoid gating's forward stays finite when every selected sigmoid underflows (logits
// ~ -800: it switches to a softmax over the log-sigmoids), so its backward must too, and must be the derivative of
// that same function. Checked on the combine-weight VJP directly (central differences of select_experts' weights),
// then through the whole layer on both backends. The renormalized softmax modes are checked alongside (their VJP
// is a softmax over S shifted by its maximum: no 0/0 however far below the other logits the selected ones are).
// Tolerance: h = 1e-5 on logits of magnitude <= 1e3 (ulp 1e-13): round-off eps |L| / h ~ 1e-11, truncation
// h^2 |L'''| ~ 1e-10; we require |fd - analytic| <= 1e-7 max(1, |fd|).
TEST_CASE("combine-weight gradients stay finite and match finite differences for extreme logits", "[train][backward][fd]") {
  struct Case {
    CombineMode mode;
    bool renorm;
    std::vector<double> z;
    int k;
    std::vector<float> bias;
  };
  std::vector<Case> const cases = {
      // every selected sigmoid underflows to 0 (the forward's log-sigmoid fallback)
      {CombineMode::sigmoid_topk, true, {-800.0, -801.5, -799.25, -805.0}, 2, {}},
      {CombineMode::sigmoid_topk, true, {-800.0, -801.5, -799.25, -805.0}, 4, {}},
      {CombineMode::sigmoid_topk, true, {-1000.0, -760.0, -1e5, -745.5}, 3, {}},
      // mixed huge / tiny logits, selected by the bias: one selected sigmoid is 1, another underflows
      {CombineMode::sigmoid_topk, true, {800.0, -800.0, 3.0, -2.0}, 2, {0.f, 1e4f, -1e4f, 0.f}},
      {CombineMode::sigmoid_topk, true, {30.0, -800.0, -0.5, 700.0}, 4, {}},
      {CombineMode::sigmoid_topk, true, {-720.0, -700.0, 2.0, 1.0}, 2, {1e4f, 1e4f, 0.f, 0.f}},
      // near the forward's switch (sum of sigmoids ~ DBL_MIN): both sides
      {CombineMode::sigmoid_topk, true, {-706.0, -707.0, -1000.0}, 2, {}},
      {CombineMode::sigmoid_topk, true, {-709.5, -710.0, -1000.0}, 2, {}},
      {CombineMode::sigmoid_topk, false, {-800.0, 800.0, -3.0, 2.0}, 3, {}},
      // renormalized softmaxes with the selected logits far below an unselected one (selection bias)
      {CombineMode::softmax_topk_renorm, false, {800.0, -800.0, -801.0, 5.0}, 2, {-1e4f, 0.f, 0.f, -1e4f}},
      {CombineMode::topk_softmax, false, {800.0, -800.0, -801.0, 5.0}, 2, {-1e4f, 0.f, 0.f, -1e4f}},
      {CombineMode::softmax_topk_renorm, false, {-800.0, -801.5, -799.25, -805.0}, 3, {}},
      {CombineMode::softmax_topk, false, {800.0, -800.0, -801.0, 5.0}, 3, {}},
  };
  std::vector<double> const c = {0.7, -1.3, 0.4, 2.1};
  for (auto const& cs : cases) {
    auto g = make_gating(cs.mode, cs.k, cs.renorm, 1.25f, cs.bias);
    std::ptrdiff_t const n = static_cast<std::ptrdiff_t>(cs.z.size());
    std::vector<std::int32_t> ids, ids_p, ids_m;
    double const l0 = weights_loss(cs.z, g, c, ids);
    REQUIRE(std::isfinite(l0));
    std::vector<double> dz(static_cast<std::size_t>(n));
    kernel::combine_weights_vjp(cs.z.data(), n, ids.data(), cs.k, c.data(), g.params(), dz.data());
    for (std::ptrdiff_t i = 0; i < n; ++i) {
      INFO("mode=" << moe::to_string(cs.mode) << " renorm=" << cs.renorm << " K=" << cs.k << " z0=" << cs.z[0]
                   << " i=" << i);
      REQUIRE(std::isfinite(dz[static_cast<std::size_t>(i)]));
      constexpr double h = 1e-5;
      auto zp = cs.z, zm = cs.z;
      zp[static_cast<std::size_t>(i)] += h;
      zm[static_cast<std::size_t>(i)] -= h;
      double const fd = (weights_loss(zp, g, c, ids_p) - weights_loss(zm, g, c, ids_m)) / (2 * h);
      REQUIRE(ids_p == ids);  // the cases keep every logit away from a TopK boundary
      REQUIRE(ids_m == ids);
      CHECK(std::fabs(fd - dz[static_cast<std::size_t>(i)]) <= 1e-7 * std::max(1.0, std::fabs(fd)));
    }
  }
}

TEST_CASE("MoE backward with renormalized sigmoid gating at logits ~ -800: finite, matches finite differences, "
          "cpu_simd agrees", "[train][backward][fd][simd]") {
  std::ptrdiff_t const n = 4, m = 3, d = 5, t = 6;
  // Router bias ~ -800 and small router weights: every logit is about -800, so every sigmoid underflows. The last
  // expert's bias is +800 in the mixed case: its sigmoid is 1 while the other selected one underflows.
  for (bool mixed : {false, true}) {
    Layer<double> layer(n, m, d, 21, 0.05);
    double const base[] = {-800.0, -801.0, -799.5, mixed ? 800.0 : -802.0};
    for (std::ptrdiff_t e = 0; e < n; ++e) layer.rb(e) += base[e];
    auto const x = fixture::to_matrix<double>(ref::randn(static_cast<std::size_t>(t * d), 22, 1.0), t, d);
    auto const r = fixture::to_matrix<double>(ref::randn(static_cast<std::size_t>(t * d), 23, 1.0), t, d);
    auto const g = make_gating(CombineMode::sigmoid_topk, 2, true, 1.f);
    INFO("mixed=" << mixed);

    auto const p = layer.params();
    Matrix<double> y({t, d});
    moe::RoutingRecord<double> rec;
    Workspace wf(train::moe_forward_workspace_bytes(p, 2, t));
    train::moe_forward(p, g, x.cview(), y.view(), rec, wf);
    for (std::ptrdiff_t i = 0; i < rec.weights.size(); ++i) REQUIRE(std::isfinite(rec.weights[i]));
    Grads<double> gr(t, n, m, d);
    Workspace wb(train::moe_backward_workspace_bytes(p, 2, t));
    train::moe_backward(p, g, rec, x.cview(), r.cview(), gr.view(), wb);
    for (auto const* v : {&gr.x, &gr.rw, &gr.logits})
      for (std::ptrdiff_t i = 0; i < v->size(); ++i) REQUIRE(std::isfinite((*v)[i]));
    for (std::ptrdiff_t i = 0; i < gr.rb.size(); ++i) REQUIRE(std::isfinite(gr.rb[i]));
    double router_grad_norm = 0;
    for (std::ptrdiff_t i = 0; i < gr.rb.size(); ++i) router_grad_norm += std::fabs(gr.rb[i]);
    // All ~ -800: the renormalized weights are a softmax of logits ~ 1 apart, so the router really gets a gradient
    // (not a vacuous zero). Mixed: sigmoid(800) = 1 saturates and the other weight is e^-1600, so it is 0, as the
    // finite differences below also say.
    if (!mixed) CHECK(router_grad_norm > 1e-3);

    FdStats st;
    Matrix<double> xm(x);
    fd_check(xm, gr.x, layer, g, xm, r, rec, st);
    fd_check(layer.rw, gr.rw, layer, g, x, r, rec, st);
    fd_check(layer.rb, gr.rb, layer, g, x, r, rec, st);
    fd_check(layer.gate, gr.gate, layer, g, x, r, rec, st);
    INFO("checked " << st.checked << ", skipped " << st.skipped << ", max err " << st.max_err);
    // h = 1e-6 on a bias of 800 (ulp 1.1e-13): round-off ~ 1e-7 relative; the usual 1e-6 bound holds.
    CHECK(st.max_err < 1e-6);
    CHECK(st.skipped * 20 < st.checked);

    // cpu_simd (float) on the same layer: finite, and equal to the scalar oracle in float within the usual bound.
    Layer<float> lf(n, m, d, 21, 0.05);
    for (std::ptrdiff_t e = 0; e < n; ++e) lf.rb(e) += static_cast<float>(base[e]);
    auto const xf = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(t * d), 22, 1.0), t, d);
    auto const dyf = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(t * d), 23, 1.0), t, d);
    auto const ref_out = run_float<CpuScalar>(lf, g, xf.cview(), dyf.cview(), false);
    for (bool use_saved : {false, true}) {
      auto const out = run_float<Simd>(lf, g, xf.cview(), dyf.cview(), use_saved);
      for (float v : out) REQUIRE(std::isfinite(v));
      CHECK(worst_block_rel_l2(out, ref_out, t, lf) < 5e-5);
    }
  }
}
