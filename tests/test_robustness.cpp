// SPDX-License-Identifier: Apache-2.0
// Numerical robustness: huge, tiny and subnormal magnitudes, exact ties (lower index wins), NaN/Inf confined to
// their own token on both CPU backends, finite combine weights for every finite logit, PAR loss finite under
// saturation (the clip of docs/math.md §3.2).
#include <catch2/catch.hpp>

#include <factorllm/factorllm.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using moe::CombineMode;
using Simd = CpuSimd<>;

namespace {

constexpr CombineMode kModes[] = {CombineMode::code_ref, CombineMode::softmax_topk, CombineMode::softmax_topk_renorm,
                                  CombineMode::topk_softmax, CombineMode::sigmoid_topk};
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

moe::Gating gating(CombineMode mode, std::ptrdiff_t top_k, bool sigmoid_renormalize = false) {
  moe::Gating g;
  g.mode = mode;
  g.top_k = top_k;
  g.sigmoid_renormalize = sigmoid_renormalize;
  return g;
}

bool renormalizes(moe::Gating const& g) {
  return g.mode == CombineMode::softmax_topk_renorm || g.mode == CombineMode::topk_softmax ||
         (g.mode == CombineMode::sigmoid_topk && g.sigmoid_renormalize);
}

/// Every (mode, sigmoid_renormalize) pair.
std::vector<moe::Gating> every_gating(std::ptrdiff_t top_k) {
  std::vector<moe::Gating> out;
  for (auto mode : kModes) out.push_back(gating(mode, top_k));
  out.push_back(gating(CombineMode::sigmoid_topk, top_k, true));
  return out;
}

/// Runs select_experts on rows of n logits; returns ids and weights.
struct Selection {
  Matrix<std::int32_t> ids;
  Matrix<float> weights;
};
Selection select(std::vector<float> const& logits, std::ptrdiff_t n, moe::Gating const& g) {
  std::ptrdiff_t const rows = static_cast<std::ptrdiff_t>(logits.size()) / n;
  Selection s{Matrix<std::int32_t>({rows, g.top_k}), Matrix<float>({rows, g.top_k})};
  moe::select_experts(matrix_view(logits.data(), rows, n), g, s.ids.view(), s.weights.view());
  return s;
}

std::string describe(moe::Gating const& g) {
  return std::string(moe::to_string(g.mode)) + (g.sigmoid_renormalize ? "+renorm" : "");
}

/// A small layer (d_model 16, d_ff 64, 4 experts) on either backend, with a router of the given scale.
template <class Backend>
moe::MoeFfn<float, Backend> layer(fixture::DenseWeights<float> const& w, moe::Gating const& g, double router_scale = 1.0) {
  return moe::MoeFfn<float, Backend>(ffn::factorize(w.view(), ffn::ExpertPartition::random(64, 4, 3)),
                                     moe::Router<float>::random(16, 4, 4, router_scale), g);
}

bool all_finite(Matrix<float> const& m) {
  for (std::ptrdiff_t i = 0; i < m.size(); ++i)
    if (!std::isfinite(m[i])) return false;
  return true;
}

double rel_l2_rows(Matrix<float> const& a, Matrix<float> const& b, std::ptrdiff_t skip_row) {
  double num = 0, den = 0;
  for (std::ptrdiff_t t = 0; t < a.extent(0); ++t) {
    if (t == skip_row) continue;
    for (std::ptrdiff_t c = 0; c < a.extent(1); ++c) {
      double const diff = static_cast<double>(a(t, c)) - static_cast<double>(b(t, c));
      num += diff * diff;
      den += static_cast<double>(b(t, c)) * static_cast<double>(b(t, c));
    }
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

}  // namespace

// ------------------------------------------------------------------------------------------- magnitudes ----

TEST_CASE("combine weights stay finite for huge logits in every mode", "[robustness][gating]") {
  float const big = std::numeric_limits<float>::max();
  std::vector<float> const logits = {1e30f, -1e30f, 1e30f, 3e38f,   // huge, both signs
                                     big,   -big,   -big,  big,     // the float range's ends
                                     -1e4f, -2e4f,  -3e4f, -5e4f};  // all sigmoids and softmax terms underflow
  for (auto const& g : every_gating(2)) {
    auto const s = select(logits, 4, g);
    INFO(describe(g));
    CHECK(all_finite(s.weights));
    if (renormalizes(g))
      for (std::ptrdiff_t t = 0; t < 3; ++t) CHECK(s.weights(t, 0) + s.weights(t, 1) == Approx(1.0).epsilon(1e-6));
    CHECK(s.ids(0, 0) == 3);
    CHECK(s.ids(1, 0) == 0);
    CHECK(s.ids(1, 1) == 3);
    CHECK(s.ids(2, 0) == 0);
    CHECK(s.ids(2, 1) == 1);
  }
  // Very negative logits: the renormalized sigmoid is the softmax of the selected logits in the limit
  // (sigmoid(z) ~ exp(z)); it used to be 0/0 = NaN once every selected sigmoid underflowed.
  auto const s = select({-1e4f, -1e4f - 1.0f, -3e4f, -5e4f}, 4, gating(CombineMode::sigmoid_topk, 2, true));
  CHECK(s.weights(0, 0) == Approx(1.0 / (1.0 + std::exp(-1.0))).epsilon(1e-6));
  CHECK(s.weights(0, 1) == Approx(std::exp(-1.0) / (1.0 + std::exp(-1.0))).epsilon(1e-6));
}

TEST_CASE("a selection bias that picks experts far below the best logit keeps the weights finite",
          "[robustness][gating]") {
  // The bias selects experts 2 and 3, whose softmax probabilities underflow to 0 next to expert 0: p / sum_S p
  // used to be 0/0. Renormalized weights must equal the softmax over the selected logits.
  std::vector<float> const logits = {0.f, -10.f, -2000.f, -2001.f};
  for (auto const& g0 : every_gating(2)) {
    auto g = g0;
    g.selection_bias = {-1e30f, -1e30f, 1e30f, 1e30f};
    auto const s = select(logits, 4, g);
    INFO(describe(g));
    CHECK(s.ids(0, 0) == 2);
    CHECK(s.ids(0, 1) == 3);
    CHECK(all_finite(s.weights));
    if (renormalizes(g)) {
      CHECK(s.weights(0, 0) == Approx(1.0 / (1.0 + std::exp(-1.0))).epsilon(1e-6));
      CHECK(s.weights(0, 1) == Approx(std::exp(-1.0) / (1.0 + std::exp(-1.0))).epsilon(1e-6));
    }
  }
}

TEMPLATE_TEST_CASE("MoE and dense outputs at huge, tiny and subnormal input scales", "[robustness][magnitude]", CpuScalar,
                   Simd) {
  fixture::DenseWeights<float> w(ref::random_ffn(16, 64, 11));
  auto const g = gating(CombineMode::softmax_topk_renorm, 2);
  auto const oracle = layer<CpuScalar>(w, g);
  auto const tested = layer<TestType>(w, g);
  auto const base = ref::randn(5 * 16, 12, 1.0);
  // Scales whose outputs are normal floats: the backends agree with the double oracle as usual.
  for (double scale : {1e-12, 1e-6, 1.0, 1e6, 1e12}) {
    auto const x = fixture::to_matrix<float>(base, 5, 16);
    Matrix<float> xs({5, 16}), y({5, 16}), y_ref({5, 16});
    for (std::ptrdiff_t i = 0; i < x.size(); ++i) xs[i] = static_cast<float>(x[i] * scale);
    tested.forward(xs.cview(), y.view());
    oracle.forward(xs.cview(), y_ref.view());
    INFO("scale " << scale);
    CHECK(all_finite(y));
    CHECK(ref::rel_l2(y.data(), y_ref.data(), static_cast<std::size_t>(y.size())) < 2e-5);
    Matrix<float> yd({5, 16}), yd_ref({5, 16});
    ffn::swiglu_forward(w.view(), xs.cview(), yd.view(), TestType{});
    ffn::swiglu_forward(w.view(), xs.cview(), yd_ref.view(), CpuScalar{});
    CHECK(all_finite(yd));
    CHECK(ref::rel_l2(yd.data(), yd_ref.data(), static_cast<std::size_t>(yd.size())) < 2e-5);
  }
  // Tiny and subnormal inputs: outputs (~x^2) underflow; they must stay finite and tiny, never NaN.
  for (float v : {1e-30f, 1e-38f, 1e-41f, std::numeric_limits<float>::denorm_min(), 0.0f, -0.0f}) {
    Matrix<float> xs({5, 16}), y({5, 16});
    for (std::ptrdiff_t i = 0; i < xs.size(); ++i) xs[i] = (i % 3 == 0 ? -v : v);
    tested.forward(xs.cview(), y.view());
    INFO("value " << v);
    CHECK(all_finite(y));
    for (std::ptrdiff_t i = 0; i < y.size(); ++i) CHECK(std::fabs(y[i]) <= 1e-20f);
  }
  // Subnormal weights (e.g. a pruned or badly scaled checkpoint): finite, and equal to the oracle.
  fixture::DenseWeights<float> tiny_w(ref::random_ffn(16, 64, 13));
  for (std::ptrdiff_t i = 0; i < tiny_w.down.size(); ++i) tiny_w.down[i] *= 1e-39f;
  auto const tiny_layer = layer<TestType>(tiny_w, g);
  auto const tiny_oracle = layer<CpuScalar>(tiny_w, g);
  auto const x = fixture::to_matrix<float>(base, 5, 16);
  Matrix<float> y({5, 16}), y_ref({5, 16});
  tiny_layer.forward(x.cview(), y.view());
  tiny_oracle.forward(x.cview(), y_ref.view());
  CHECK(all_finite(y));
  for (std::ptrdiff_t i = 0; i < y.size(); ++i) CHECK(std::fabs(y[i] - y_ref[i]) <= 1e-42f);
}

// ------------------------------------------------------------------------------------------------- ties ----

TEST_CASE("all-equal logits: the lowest indices win, in order, with equal weights", "[robustness][ties]") {
  for (std::ptrdiff_t k = 1; k <= 4; ++k) {
    for (auto const& g : every_gating(k)) {
      for (float v : {0.f, 1.f, -3.5f, 1e30f, -1e30f}) {
        auto const s = select({v, v, v, v}, 4, g);
        INFO(describe(g) << " K=" << k << " v=" << v);
        for (std::ptrdiff_t j = 0; j < k; ++j) {
          CHECK(s.ids(0, j) == j);
          CHECK(std::isfinite(s.weights(0, j)));
          CHECK(s.weights(0, j) == s.weights(0, 0));
        }
      }
    }
  }
  // Partial ties keep index order among equals.
  Matrix<std::int32_t> ids({1, 3});
  float const z[] = {1.f, 3.f, 0.f, 3.f, 1.f};
  moe::topk(matrix_view(z, 1, 5), 3, ids.view());
  CHECK(ids(0, 0) == 1);
  CHECK(ids(0, 1) == 3);
  CHECK(ids(0, 2) == 0);
}

TEMPLATE_TEST_CASE("a zero router ties every expert: every token goes to experts 0..K-1", "[robustness][ties]", CpuScalar,
                   Simd) {
  fixture::DenseWeights<float> w(ref::random_ffn(16, 64, 21));
  auto experts = ffn::factorize(w.view(), ffn::ExpertPartition::contiguous(64, 4));
  moe::Router<float> const zero(Matrix<float>({4, 16}), Vector<float>({4}));
  for (auto const& g : every_gating(2)) {
    moe::MoeFfn<float, TestType> const l(experts, zero, g);
    auto const x = fixture::to_matrix<float>(ref::randn(9 * 16, 22, 1.0), 9, 16);
    Matrix<float> y({9, 16});
    moe::RoutingRecord<float> rec;
    Workspace ws(l.workspace_bytes(9));
    l.forward(x.cview(), y.view(), ws, &rec);
    INFO(describe(g));
    CHECK(all_finite(y));
    for (std::ptrdiff_t t = 0; t < 9; ++t) {
      CHECK(rec.ids(t, 0) == 0);
      CHECK(rec.ids(t, 1) == 1);
    }
    CHECK(rec.load(2) == 0);
    CHECK(rec.load(3) == 0);
  }
}

// ------------------------------------------------------------------------------------------ NaN and Inf ----

TEMPLATE_TEST_CASE("NaN or Inf in one token does not poison the other tokens", "[robustness][nan]", CpuScalar, Simd) {
  fixture::DenseWeights<float> w(ref::random_ffn(16, 64, 31));
  for (auto const& g : every_gating(2)) {
    auto const l = layer<TestType>(w, g);
    auto const oracle = layer<CpuScalar>(w, g);
    // 5 tokens: every expert on the streaming path; 40 tokens: the GEMM path.
    for (std::ptrdiff_t n_tokens : {5, 40}) {
      auto const clean = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(n_tokens) * 16, 32, 1.0), n_tokens, 16);
      Matrix<float> y_clean({n_tokens, 16});
      oracle.forward(clean.cview(), y_clean.view());
      for (float bad : {kNaN, kInf, -kInf}) {
        for (bool whole_row : {false, true}) {
          auto x = clean;
          std::ptrdiff_t const t_bad = n_tokens / 2;
          for (std::ptrdiff_t c = 0; c < 16; ++c)
            if (whole_row || c == 5) x(t_bad, c) = bad;
          Matrix<float> y({n_tokens, 16});
          Workspace ws(l.workspace_bytes(n_tokens));
          l.forward(x.cview(), y.view(), ws);
          INFO(TestType::name() << " " << describe(g) << " T=" << n_tokens << " bad=" << bad << " row=" << whole_row);
          bool bad_row_finite = true;
          for (std::ptrdiff_t c = 0; c < 16; ++c) bad_row_finite &= std::isfinite(y(t_bad, c));
          CHECK_FALSE(bad_row_finite);
          bool others_finite = true;
          for (std::ptrdiff_t t = 0; t < n_tokens; ++t)
            for (std::ptrdiff_t c = 0; c < 16; ++c) others_finite &= t == t_bad || std::isfinite(y(t, c));
          CHECK(others_finite);
          // The oracle runs each slot independently: the other rows keep their bits. CpuSimd may move other tokens
          // between its streaming and GEMM paths when the bad token's routing changes: same values up to rounding.
          if (std::is_same_v<TestType, CpuScalar>) {
            for (std::ptrdiff_t t = 0; t < n_tokens; ++t)
              if (t != t_bad) CHECK(std::memcmp(y.view().row(t), y_clean.view().row(t), 16 * sizeof(float)) == 0);
          } else {
            CHECK(rel_l2_rows(y, y_clean, t_bad) < 2e-5);
          }
        }
      }
    }
  }
  // The dense FFN too.
  for (std::ptrdiff_t n_tokens : {3, 20}) {
    auto x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(n_tokens) * 16, 33, 1.0), n_tokens, 16);
    Matrix<float> y_clean({n_tokens, 16}), y({n_tokens, 16});
    ffn::swiglu_forward(w.view(), x.cview(), y_clean.view(), TestType{});
    x(1, 2) = kNaN;
    ffn::swiglu_forward(w.view(), x.cview(), y.view(), TestType{});
    for (std::ptrdiff_t t = 0; t < n_tokens; ++t) {
      INFO("dense T=" << n_tokens << " t=" << t);
      if (t == 1) {
        CHECK(std::isnan(y(1, 0)));
      } else {
        CHECK(std::memcmp(y.view().row(t), y_clean.view().row(t), 16 * sizeof(float)) == 0);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------- PAR ----

TEMPLATE_TEST_CASE("PAR loss stays finite under saturation and huge inputs", "[robustness][par]", float, double) {
  fixture::DenseWeights<TestType> w(ref::random_ffn(16, 64, 41));
  auto const experts = ffn::factorize(w.view(), ffn::ExpertPartition::contiguous(64, 4));
  // Router scales from moderate to saturating: at 1e4 the logits differ by ~1e4, so p is exactly 0 or 1 and
  // the clip (docs/math.md §3.2) is what keeps log(p) finite. Input scales up to 1e15 (teacher outputs ~1e30).
  for (double router_scale : {1.0, 1e2, 1e4, 1e8}) {
    for (double x_scale : {1e-20, 1.0, 1e15}) {
      auto const router = moe::Router<TestType>::random(16, 4, 42, router_scale);
      auto const x = fixture::to_matrix<TestType>(ref::randn(6 * 16, 43, x_scale), 6, 16);
      for (std::ptrdiff_t k : {1, 2, 4}) {
        auto const r = train::par_loss(x.cview(), w.view(), experts, router, k);
        INFO("router scale " << router_scale << " x scale " << x_scale << " K=" << k);
        CHECK(std::isfinite(r.par_loss));
        CHECK(std::isfinite(r.balance_loss));
        CHECK(std::isfinite(r.total_loss));
        CHECK(r.par_loss >= -1e-12);
        // KL of clipped distributions is at most max |log(p_hat / q_hat)| <= log(1 / clip).
        CHECK(r.par_loss <= std::log(1.0 / train::ParLossConfig{}.clip) + 1e-9);
        bool grads_finite = true;
        for (std::ptrdiff_t i = 0; i < r.grad_weight.size(); ++i) grads_finite &= std::isfinite(r.grad_weight[i]);
        for (std::ptrdiff_t i = 0; i < r.grad_bias.size(); ++i) grads_finite &= std::isfinite(r.grad_bias[i]);
        CHECK(grads_finite);
        for (std::ptrdiff_t i = 0; i < r.pseudo_label.size(); ++i) CHECK((r.pseudo_label[i] >= 0 && r.pseudo_label[i] < 4));
      }
    }
  }
}
