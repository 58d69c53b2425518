// SPDX-License-Identifier: Apache-2.0
// Tests of the shared-expert layer (moe/shared_moe.hpp): K = N with code_ref equals the dense FFN on every backend,
// K < N against shared experts + routed layer computed separately, FLOPs accounting, builders (which experts are
// shared), workspace handling, no tokens, and errors.
#include <catch2/catch.hpp>

#include <factorllm/ffn/factorize.hpp>
#include <factorllm/moe/moe_ffn.hpp>
#include <factorllm/moe/shared_moe.hpp>

#include <cstring>
#include <vector>

#include "reference/fixtures.hpp"
#include "reference/reference.hpp"

using namespace factorllm;
using ffn::ExpertPartition;
using moe::CombineMode;

TEMPLATE_TEST_CASE("SharedExpertMoe with K = N routed and code_ref equals the dense FFN", "[moe][shared][exact]", float, double) {
  // Tolerance: only the float summation order over neurons differs (as MoeFfn's K = N test): relative L2 < 1e-6 in
  // float (scalar and simd backends), < 1e-12 in double.
  double const tol = std::is_same_v<TestType, double> ? 1e-12 : 1e-6;
  int const d = 16, d_ff = 96, n_tokens = 21;
  fixture::DenseWeights<TestType> w(ref::random_ffn(d, d_ff, 300));
  auto const x = fixture::to_matrix<TestType>(ref::randn(static_cast<std::size_t>(n_tokens * d), 301, 1.0), n_tokens, d);
  Matrix<TestType> yd({n_tokens, d}), ym({n_tokens, d});
  ffn::swiglu_forward(w.view(), x.cview(), yd.view());
  for (int n_all : {2, 3, 4, 6, 8}) {
    for (int s = 1; s < n_all; ++s) {
      for (auto const& part : fixture::every_partition_builder(d_ff, n_all)) {
        INFO("experts " << n_all << " shared " << s);
        moe::Gating g;
        g.mode = moe::CombineMode::code_ref;
        g.top_k = n_all - s;
        auto const layer = moe::make_shared_moe<CpuScalar>(w.view(), part, s, moe::Router<TestType>::random(d, n_all - s, 5), g);
        CHECK(layer.ffn_flops_fraction() == 1.0);
        layer.forward(x.cview(), ym.view());
        REQUIRE(ref::rel_l2(ym.data(), yd.data(), static_cast<std::size_t>(ym.size())) < tol);
        if constexpr (std::is_same_v<TestType, float>) {
          auto const simd = moe::make_shared_moe<CpuSimd<>>(w.view(), part, s, moe::Router<float>::random(d, n_all - s, 5), g);
          simd.forward(x.cview(), ym.view());
          REQUIRE(ref::rel_l2(ym.data(), yd.data(), static_cast<std::size_t>(ym.size())) < tol);
        }
      }
    }
  }
}

TEST_CASE("SharedExpertMoe = shared experts' sum + the routed MoeFfn, FLOPs (S + K) / (S + N)", "[moe][shared]") {
  int const d = 12, d_ff = 60, n_tokens = 13, n_all = 5, s = 2;  // 3 routed experts, K = 1 or 2
  fixture::DenseWeights<double> w(ref::random_ffn(d, d_ff, 310));
  auto const part = ExpertPartition::random(d_ff, n_all, 311);
  auto const all = ffn::factorize(w.view(), part);
  auto const x = fixture::to_matrix<double>(ref::randn(static_cast<std::size_t>(n_tokens * d), 312, 1.0), n_tokens, d);
  auto const router = moe::Router<double>::random(d, n_all - s, 313, 0.7);
  for (int k : {1, 2}) {
    moe::Gating g;
    g.mode = CombineMode::softmax_topk_renorm;
    g.top_k = k;
    auto const layer = moe::make_shared_moe<CpuScalar>(w.view(), part, s, router, g);
    CHECK(layer.n_shared() == s);
    CHECK(layer.n_routed() == n_all - s);
    CHECK(layer.top_k() == k);
    CHECK(layer.ffn_flops_fraction() == Approx(static_cast<double>(s + k) / n_all));
    // The FIRST s experts of the partition are the shared ones.
    for (int e = 0; e < s; ++e)
      CHECK(std::memcmp(layer.shared().gate(e).data(), all.gate(e).data(), sizeof(double) * static_cast<std::size_t>(d * d_ff / n_all)) == 0);
    for (int e = 0; e < n_all - s; ++e)
      CHECK(std::memcmp(layer.routed().experts().down(e).data(), all.down(s + e).data(),
                        sizeof(double) * static_cast<std::size_t>(d * d_ff / n_all)) == 0);
    Matrix<double> y({n_tokens, d}), want({n_tokens, d}), tmp({n_tokens, d});
    moe::RoutingRecord<double> rec;
    Workspace ws(layer.workspace_bytes(n_tokens));
    layer.forward(x.cview(), y.view(), ws, &rec);
    layer.routed().forward(x.cview(), want.view());
    for (int e = 0; e < s; ++e) {
      ffn::swiglu_forward(all.expert(e), x.cview(), tmp.view());
      for (std::ptrdiff_t i = 0; i < want.size(); ++i) want[i] += tmp[i];
    }
    CHECK(ref::rel_l2(y.data(), want.data(), static_cast<std::size_t>(y.size())) < 1e-14);
    CHECK(rec.ids.extent(1) == k);
    // The same workspace serves a smaller call; a strided output works.
    Matrix<double> wide({n_tokens, d + 3});
    layer.forward(x.cview().slice_rows(0, 5), matrix_view(wide.data(), 5, d, d + 3), ws);
    for (int t = 0; t < 5; ++t)
      for (int o = 0; o < d; ++o) REQUIRE(wide(t, o) == y(t, o));
  }
}

TEST_CASE("SharedExpertMoe: no tokens, workspace too small, builder errors", "[moe][shared][errors]") {
  int const d = 8, d_ff = 24;
  fixture::DenseWeights<float> w(ref::random_ffn(d, d_ff, 320));
  auto const part = ExpertPartition::contiguous(d_ff, 4);
  moe::Gating g;
  g.mode = moe::CombineMode::code_ref;
  auto const layer = moe::make_shared_moe<CpuScalar>(w.view(), part, 1, moe::Router<float>::random(d, 3, 1), g);
  Matrix<float> x({0, d}), y({0, d});
  Workspace ws0(layer.workspace_bytes(0));
  layer.forward(x.cview(), y.view(), ws0);  // no tokens: nothing to do, no error
  auto const x4 = fixture::to_matrix<float>(ref::randn(static_cast<std::size_t>(4 * d), 321, 1.0), 4, d);
  Matrix<float> y4({4, d});
  Workspace small(layer.workspace_bytes(4) - 1);
  CHECK_THROWS_AS(layer.forward(x4.cview(), y4.view(), small), backend_error);
  Matrix<float> y_bad({4, d + 1});
  CHECK_THROWS_AS(layer.forward(x4.cview(), y_bad.view()), shape_error);
  CHECK_THROWS_AS(layer.workspace_bytes(-1), value_error);
  CHECK_THROWS_AS(moe::make_shared_moe<CpuScalar>(w.view(), part, 0, moe::Router<float>::random(d, 4, 1), g), value_error);
  CHECK_THROWS_AS(moe::make_shared_moe<CpuScalar>(w.view(), part, 4, moe::Router<float>::random(d, 1, 1), g), value_error);
  CHECK_THROWS_AS(moe::make_shared_moe<CpuScalar>(w.view(), part, 1, moe::Router<float>::random(d, 4, 1), g), shape_error);
  moe::Gating big;
  big.mode = moe::CombineMode::code_ref;
  big.top_k = 4;
  CHECK_THROWS_AS(moe::make_shared_moe<CpuScalar>(w.view(), part, 1, moe::Router<float>::random(d, 3, 1), big), value_error);
  CHECK_THROWS_AS(moe::make_shared_moe<CpuScalar>(w.view(), ExpertPartition::contiguous(12, 4), 1, moe::Router<float>::random(d, 3, 1), g),
                  shape_error);
  // Shared and routed experts of different sizes.
  auto const routed = ffn::factorize(w.view(), ExpertPartition::contiguous(d_ff, 3));
  auto const shared = moe::split_experts(ffn::factorize(w.view(), part), 1).first;
  CHECK_THROWS_AS((moe::SharedExpertMoe<float, CpuScalar>(shared, moe::MoeFfn<float, CpuScalar>(routed, moe::Router<float>::random(d, 3, 1), g))),
                  shape_error);
}
