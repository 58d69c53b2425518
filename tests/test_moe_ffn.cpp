// SPDX-License-Identifier: Apache-2.0
// Tests of the MoE layer: against an independent double reference for every mode and weight type, K = N
// exactness for every partition builder (random weights and the real model), edge cases and errors.
#include <catch2/catch.hpp>

#include <factorllm/io/llama2c.hpp>
#include <factorllm/moe/moe_ffn.hpp>

#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"
#include "reference/shared_data.hpp"

using namespace factorllm;
using ffn::ExpertPartition;
using moe::CombineMode;

namespace {


template <class R>
moe::Router<R> router_from(ref::Vec const& w, ref::Vec const& b, std::ptrdiff_t n, std::ptrdiff_t d) {
  Matrix<R> wm({n, d});
  Vector<R> bv({n});
  for (std::ptrdiff_t i = 0; i < wm.size(); ++i) wm[i] = static_cast<R>(w[static_cast<std::size_t>(i)]);
  for (std::ptrdiff_t i = 0; i < n; ++i) bv[i] = static_cast<R>(b[static_cast<std::size_t>(i)]);
  return moe::Router<R>(std::move(wm), std::move(bv));
}

/// Reference MoE output of one token (double).
ref::Vec reference_moe(ref::Ffn const& f, std::vector<std::int32_t> const& perm, int n, int k, std::string const& mode,
                       ref::Vec const& w, ref::Vec const& b, double const* x, double scale) {
  auto const z = ref::logits(w, b, x, n, f.d_model);
  auto const sel = ref::topk(z, k);
  auto const cw = ref::combine_weights(mode, z, sel);
  ref::Vec y(static_cast<std::size_t>(f.d_model), 0.0);
  for (std::size_t j = 0; j < sel.size(); ++j) {
    auto const e = ref::expert(f, perm, n, sel[j], x);
    for (int o = 0; o < f.d_model; ++o) y[static_cast<std::size_t>(o)] += scale * cw[j] * e[static_cast<std::size_t>(o)];
  }
  return y;
}

}  // namespace

TEMPLATE_TEST_CASE("MoE forward matches the double reference for every mode, K and partition", "[moe][forward]", float,
                   double, bf16) {
  using A = activation_t<TestType>;
  int const d = 12, d_ff = 32, n_tokens = 11;
  fixture::DenseWeights<TestType> w(ref::random_ffn(d, d_ff, 5));
  ref::Ffn const f = w.rounded();
  auto xv = ref::randn(static_cast<std::size_t>(n_tokens * d), 8, 1.0);
  for (auto& v : xv) v = static_cast<double>(static_cast<A>(v));
  auto const x = fixture::to_matrix<A>(xv, n_tokens, d);
  // Tolerance (written down): expert outputs accumulate in double and are rounded once to A, so the
  // float result is within a few float ulps of the reference relative to the output norm.
  double const tol = std::is_same_v<A, double> ? 1e-12 : 1e-6;
  for (int n : {1, 2, 4, 8}) {
    // Router weights large enough that logits are well separated (no float-induced reordering).
    auto const rw = ref::randn(static_cast<std::size_t>(n * d), 31 + static_cast<std::uint64_t>(n), 1.0);
    auto const rb = ref::randn(static_cast<std::size_t>(n), 41, 0.5);
    ref::Vec rwq(rw), rbq(rb);
    for (auto& v : rwq) v = static_cast<double>(static_cast<A>(v));
    for (auto& v : rbq) v = static_cast<double>(static_cast<A>(v));
    for (auto const& part : fixture::every_partition_builder(d_ff, n)) {
      auto const experts = ffn::factorize(w.view(), part);
      for (int k = 1; k <= n; ++k) {
        for (std::string mode : {"code_ref", "softmax_topk", "softmax_topk_renorm", "topk_softmax", "sigmoid_topk"}) {
          moe::Gating g;
          g.mode = moe::combine_mode_from_string(mode);
          g.top_k = k;
          g.output_scale = 0.75f;
          moe::MoeFfn<TestType, CpuScalar> layer(experts, router_from<A>(rw, rb, n, d), g);
          Matrix<A> y({n_tokens, d});
          Workspace ws(layer.workspace_bytes(n_tokens));
          moe::RoutingRecord<A> rec;
          layer.forward(x.cview(), y.view(), ws, &rec);
          ref::Vec expect;
          for (int t = 0; t < n_tokens; ++t) {
            auto const r = reference_moe(f, part.permutation(), n, k, mode, rwq, rbq, xv.data() + t * d, 0.75);
            expect.insert(expect.end(), r.begin(), r.end());
          }
          INFO("n=" << n << " k=" << k << " mode=" << mode);
          REQUIRE(ref::rel_l2(y.data(), expect, expect.size()) < tol);
          // The record's groups cover every slot exactly once.
          REQUIRE(rec.offsets[n] == n_tokens * k);
          std::int64_t load = 0;
          for (int e = 0; e < n; ++e) load += rec.load(e);
          REQUIRE(load == n_tokens * k);
        }
      }
    }
  }
}

TEMPLATE_TEST_CASE("K = N with code_ref equals the dense FFN for every partition builder", "[moe][exact]", float,
                   double) {
  // Tolerance: the only difference is the order of the float summation over neurons, rounded once:
  // relative L2 error < 1e-6 in float, < 1e-12 in double.
  double const tol = std::is_same_v<TestType, double> ? 1e-12 : 1e-6;
  int const d = 24, d_ff = 96, n_tokens = 16;
  fixture::DenseWeights<TestType> w(ref::random_ffn(d, d_ff, 77));
  auto const x = fixture::to_matrix<TestType>(ref::randn(static_cast<std::size_t>(n_tokens * d), 3, 1.0), n_tokens, d);
  Matrix<TestType> yd({n_tokens, d}), ym({n_tokens, d});
  ffn::swiglu_forward(w.view(), x.cview(), yd.view());
  for (int n : {1, 2, 3, 4, 8, 12}) {
    for (auto const& part : fixture::every_partition_builder(d_ff, n)) {
      moe::Gating g;
      g.mode = moe::CombineMode::code_ref;
      g.top_k = n;
      moe::MoeFfn<TestType, CpuScalar> layer(ffn::factorize(w.view(), part), moe::Router<TestType>::random(d, n, 5), g);
      layer.forward(x.cview(), ym.view());
      INFO("n=" << n);
      REQUIRE(ref::rel_l2(ym.data(), yd.data(), static_cast<std::size_t>(ym.size())) < tol);
    }
  }
}

TEST_CASE("K = N with code_ref equals dense on every layer of the real model", "[moe][exact][real]") {
  std::string const path = fixture::shared_path("models/stories260K.bin");
  if (!fixture::have_shared_data({path})) return;
  auto const ckpt = io::Llama2cCheckpoint::load(path);
  auto const& cfg = ckpt.config();
  std::ptrdiff_t const d = cfg.dim, n_tokens = 32;
  // FFN inputs: token embeddings RMS-normed with the layer's rms_ffn weight (eps 1e-5).
  for (std::ptrdiff_t l = 0; l < cfg.n_layers; ++l) {
    Matrix<float> x({n_tokens, d}), yd({n_tokens, d}), ym({n_tokens, d});
    for (std::ptrdiff_t t = 0; t < n_tokens; ++t) {
      auto const* e = ckpt.token_embedding().row(t * 13 + 3);
      double ss = 0;
      for (std::ptrdiff_t k = 0; k < d; ++k) ss += static_cast<double>(e[k]) * e[k];
      double const inv = 1.0 / std::sqrt(ss / static_cast<double>(d) + 1e-5);
      for (std::ptrdiff_t k = 0; k < d; ++k) x(t, k) = static_cast<float>(e[k] * inv * ckpt.rms_ffn(l)(k));
    }
    ffn::swiglu_forward(ckpt.ffn(l), x.cview(), yd.view());
    for (int n : {1, 2, 4}) {  // 172 = 4 * 43
      for (auto const& part : fixture::every_partition_builder(cfg.hidden_dim, n)) {
        moe::Gating g;
        g.mode = moe::CombineMode::code_ref;
        g.top_k = n;
        moe::MoeFfn<float, CpuScalar> layer(ffn::factorize(ckpt.ffn(l), part), moe::Router<float>::random(d, n, 1), g);
        layer.forward(x.cview(), ym.view());
        INFO("layer " << l << " n=" << n);
        REQUIRE(ref::rel_l2(ym.data(), yd.data(), static_cast<std::size_t>(ym.size())) < 1e-6);
      }
    }
  }
}

TEST_CASE("MoeFfn names empty experts in its error", "[moe][errors]") {
  moe::Gating g;
  g.mode = moe::CombineMode::code_ref;
  CHECK_THROWS_WITH((moe::MoeFfn<float, CpuScalar>(ffn::ExpertWeights<float>(), moe::Router<float>::random(4, 2, 1), g)),
                    Catch::Contains("argument 'experts' is empty"));
}

TEST_CASE("MoE edge cases: no tokens, idle experts, one expert for all", "[moe][forward]") {
  int const d = 8, d_ff = 16;
  fixture::DenseWeights<float> w(ref::random_ffn(d, d_ff, 9));
  auto const experts = ffn::factorize(w.view(), ExpertPartition::contiguous(d_ff, 4));
  moe::Gating g;
  g.mode = moe::CombineMode::code_ref;
  g.top_k = 1;
  // Router that always picks expert 2: zero weights, bias favouring 2.
  Matrix<float> rw({4, d});
  Vector<float> rb({4});
  rb[2] = 1.0f;
  moe::MoeFfn<float, CpuScalar> layer(experts, moe::Router<float>(rw, rb), g);
  Matrix<float> x0({0, d}), y0({0, d});
  Workspace ws(layer.workspace_bytes(0));
  CHECK_NOTHROW(layer.forward(x0.cview(), y0.view(), ws));
  auto const x = fixture::to_matrix<float>(ref::randn(5 * d, 1, 1.0), 5, d);
  Matrix<float> y({5, d}), ye({5, d});
  moe::RoutingRecord<float> rec;
  Workspace ws5(layer.workspace_bytes(5));
  layer.forward(x.cview(), y.view(), ws5, &rec);
  CHECK(rec.load(2) == 5);
  CHECK(rec.load(0) == 0);
  ffn::swiglu_forward(experts.expert(2), x.cview(), ye.view());
  for (std::ptrdiff_t i = 0; i < y.size(); ++i) REQUIRE(y[i] == Approx(4.0f * ye[i]).margin(1e-6));  // code_ref scale 4
  // N = 1, K = 1: a single expert is the dense FFN.
  moe::MoeFfn<float, CpuScalar> single(ffn::factorize(w.view(), ExpertPartition::contiguous(d_ff, 1)), moe::Router<float>::random(d, 1, 2), g);
  Matrix<float> yd({5, d});
  single.forward(x.cview(), y.view());
  ffn::swiglu_forward(w.view(), x.cview(), yd.view());
  CHECK(ref::rel_l2(y.data(), yd.data(), static_cast<std::size_t>(y.size())) < 1e-6);
}

TEST_CASE("a NaN in one token does not poison the others", "[moe][nan]") {
  int const d = 8, d_ff = 16;
  fixture::DenseWeights<float> w(ref::random_ffn(d, d_ff, 9));
  moe::Gating g;
  g.mode = CombineMode::softmax_topk_renorm;
  g.top_k = 2;
  moe::MoeFfn<float, CpuScalar> layer(ffn::factorize(w.view(), ExpertPartition::random(d_ff, 4, 3)), moe::Router<float>::random(d, 4, 4, 1.0), g);
  auto x = fixture::to_matrix<float>(ref::randn(4 * d, 1, 1.0), 4, d);
  Matrix<float> y_clean({4, d}), y({4, d});
  layer.forward(x.cview(), y_clean.view());
  x(1, 3) = std::nanf("");
  x(2, 0) = INFINITY;
  layer.forward(x.cview(), y.view());
  for (std::ptrdiff_t k = 0; k < d; ++k) {
    CHECK(std::isnan(y(1, k)));
    CHECK(y(0, k) == y_clean(0, k));
    CHECK(y(3, k) == y_clean(3, k));
  }
}

TEST_CASE("MoeFfn validates its arguments", "[moe][errors]") {
  int const d = 8, d_ff = 16;
  fixture::DenseWeights<float> w(ref::random_ffn(d, d_ff, 9));
  auto const experts = ffn::factorize(w.view(), ExpertPartition::contiguous(d_ff, 4));
  moe::Gating g;
  g.mode = moe::CombineMode::code_ref;
  g.top_k = 2;
  CHECK_THROWS_AS((moe::MoeFfn<float, CpuScalar>(experts, moe::Router<float>::random(d, 3, 1), g)), shape_error);
  CHECK_THROWS_AS((moe::MoeFfn<float, CpuScalar>(experts, moe::Router<float>::random(d + 1, 4, 1), g)), shape_error);
  g.top_k = 5;
  CHECK_THROWS_AS((moe::MoeFfn<float, CpuScalar>(experts, moe::Router<float>::random(d, 4, 1), g)), value_error);
  g.top_k = 2;
  moe::MoeFfn<float, CpuScalar> layer(experts, moe::Router<float>::random(d, 4, 1), g);
  Matrix<float> x({3, d}), y({3, d}), bad({3, d + 1});
  CHECK_THROWS_AS(layer.forward(bad.cview(), y.view()), shape_error);
  CHECK_THROWS_AS(layer.forward(x.cview(), bad.view()), shape_error);
  CHECK_THROWS_WITH(layer.forward(bad.cview(), y.view()), Catch::Contains("argument 'x'"));
  Workspace small(layer.workspace_bytes(2));
  CHECK_THROWS_AS(layer.forward(x.cview(), y.view(), small), backend_error);
  CHECK_THROWS_AS(moe::Router<float>::random(0, 4, 1), value_error);
  CHECK_THROWS_AS(moe::Router<float>(Matrix<float>({4, d}), Vector<float>({3})), shape_error);
}

TEST_CASE("Router::random draws N(0, 0.02^2) reproducibly with zero bias", "[moe][router]") {
  auto const a = moe::Router<double>::random(256, 8, 123), b = moe::Router<double>::random(256, 8, 123);
  double mean = 0, var = 0;
  auto const n = static_cast<double>(a.weight().size());
  for (std::ptrdiff_t e = 0; e < 8; ++e) {
    REQUIRE(a.bias()(e) == 0.0);
    for (std::ptrdiff_t k = 0; k < 256; ++k) {
      REQUIRE(a.weight()(e, k) == b.weight()(e, k));
      mean += a.weight()(e, k) / n;
    }
  }
  for (std::ptrdiff_t e = 0; e < 8; ++e)
    for (std::ptrdiff_t k = 0; k < 256; ++k) var += std::pow(a.weight()(e, k) - mean, 2) / n;
  CHECK(std::fabs(mean) < 0.002);                  // 4 standard errors of the mean (0.02 / sqrt(2048))
  CHECK(std::sqrt(var) == Approx(0.02).epsilon(0.05));
}

TEST_CASE("set_router replaces a layer's router without rebuilding it; a mis-shaped one is refused", "[moe][router]") {
  int const d = 16, d_ff = 64, n = 4, n_tokens = 5;
  fixture::DenseWeights<float> w(ref::random_ffn(d, d_ff, 81));
  moe::Gating g;
  g.top_k = 2;
  auto const experts = ffn::factorize(w.view(), ExpertPartition::random(d_ff, n, 82));
  moe::MoeFfn<float, CpuScalar> layer(experts, moe::Router<float>::random(d, n, 83, 1.0), g);
  auto const trained = moe::Router<float>::random(d, n, 84, 1.0);
  float const* gate_before = layer.experts().gate_tensor().data();
  layer.set_router(trained);
  CHECK(layer.experts().gate_tensor().data() == gate_before);  // the experts were not touched
  moe::MoeFfn<float, CpuScalar> rebuilt(experts, trained, g);
  auto const x = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(n_tokens * d), 85, 1.0), n_tokens, d);
  Matrix<float> y({n_tokens, d}), y_rebuilt({n_tokens, d});
  layer.forward(x.cview(), y.view());
  rebuilt.forward(x.cview(), y_rebuilt.view());
  for (std::ptrdiff_t i = 0; i < y.size(); ++i) REQUIRE(y[i] == y_rebuilt[i]);
  CHECK_THROWS_AS(layer.set_router(moe::Router<float>::random(d, n + 1, 1, 1.0)), shape_error);
  CHECK_THROWS_AS(layer.set_router(moe::Router<float>::random(d + 1, n, 1, 1.0)), shape_error);
  layer.forward(x.cview(), y.view());  // unchanged after a refusal
  for (std::ptrdiff_t i = 0; i < y.size(); ++i) REQUIRE(y[i] == y_rebuilt[i]);
}
