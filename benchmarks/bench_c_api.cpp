// SPDX-License-Identifier: Apache-2.0
// Overhead of the C API (include/factorllm/c/factorllm.h) over the C++ call it wraps: fllm_moe_forward against
// moe::MoeFfn<float>::forward on the same weights, the same workspace discipline (reserved once, reused) and the same
// thread count, at T = 1 (decode: the fixed cost of a call) and T = 512 (prefill: the relative cost). Also the bf16
// activation path (widen, forward, round back) and the routing record copy-out. Weights stay in cache (one layer),
// so the figures are the call's own cost, not DRAM's.
// Shape: d_model 512, d_ff 2048, 8 experts, top-2, f32 weights (12 MiB). The C++ side is compiled with
// FACTORLLM_ISA_FLAGS and the shim with FACTORLLM_C_ISA_FLAGS (the same by default): compare them only then.
// Run: ./build/benchmarks/bench_c_api (or --benchmark_filter=...); quote the ratio of the two rows of one run.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <stdexcept>
#include <vector>

#include "factorllm/c/factorllm.h"
#include "factorllm/factorllm.hpp"

namespace {

namespace fl = factorllm;

constexpr std::int64_t kDModel = 512, kDFf = 2048, kExperts = 8, kTopK = 2, kMaxTokens = 512;

void check(fllm_status s) {
  if (s != FLLM_OK) throw std::runtime_error(fllm_last_error());
}

/// The dense FFN, router and tokens both sides use, and the two layers built from them.
struct Fixture {
  std::vector<float> gate, up, down, router_w, router_b, x;
  fl::moe::MoeFfn<float> cxx;
  fllm_moe* c = nullptr;

  static Fixture& get() {
    static Fixture f;
    return f;
  }

 private:
  Fixture()
      : gate(kDFf * kDModel), up(kDFf * kDModel), down(kDModel * kDFf), router_w(kExperts * kDModel),
        router_b(kExperts), x(kMaxTokens * kDModel), cxx(build_cxx()) {
    fllm_dense_ffn d{FLLM_F32, kDModel, kDFf, gate.data(), kDModel, up.data(), kDModel, down.data(), kDFf};
    fllm_gating const g = fllm_gating_default(kTopK);
    check(fllm_moe_create_from_dense(&d, nullptr, kExperts, router_w.data(), kDModel, router_b.data(), &g, FLLM_F32, &c));
  }

  fl::moe::MoeFfn<float> build_cxx() {
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> u(-0.05f, 0.05f), ux(-1.0f, 1.0f);
    for (auto* v : {&gate, &up, &down, &router_w, &router_b})
      for (auto& e : *v) e = u(rng);
    for (auto& e : x) e = ux(rng);
    fl::ffn::DenseFfnView<float> const dense{fl::matrix_view(static_cast<float const*>(gate.data()), kDFf, kDModel),
                                             fl::matrix_view(static_cast<float const*>(up.data()), kDFf, kDModel),
                                             fl::matrix_view(static_cast<float const*>(down.data()), kDModel, kDFf)};
    auto experts = fl::ffn::factorize(dense, fl::ffn::ExpertPartition::contiguous(kDFf, kExperts));
    fl::moe::Router<float> router = fl::moe::Router<float>::from_views(
        fl::matrix_view(static_cast<float const*>(router_w.data()), kExperts, kDModel),
        fl::vector_view(static_cast<float const*>(router_b.data()), kExperts));
    fl::moe::Gating g;
    g.top_k = kTopK;
    return fl::moe::MoeFfn<float>(std::move(experts), std::move(router), std::move(g));
  }
};

void BM_cxx_forward(benchmark::State& state) {
  auto& f = Fixture::get();
  std::int64_t const t = state.range(0);
  fl::Workspace ws(f.cxx.workspace_bytes(t));
  std::vector<float> y(static_cast<std::size_t>(t * kDModel));
  for (auto _ : state) {
    f.cxx.forward(fl::matrix_view(static_cast<float const*>(f.x.data()), t, kDModel), fl::matrix_view(y.data(), t, kDModel),
                  ws);
    benchmark::DoNotOptimize(y.data());
  }
  state.SetItemsProcessed(state.iterations() * t);
}

void BM_c_forward(benchmark::State& state) {
  auto& f = Fixture::get();
  std::int64_t const t = state.range(0);
  fllm_workspace* ws = nullptr;
  check(fllm_workspace_create(&ws));
  check(fllm_workspace_reserve(ws, f.c, t));
  std::vector<float> y(static_cast<std::size_t>(t * kDModel));
  for (auto _ : state) {
    check(fllm_moe_forward(f.c, ws, FLLM_F32, f.x.data(), kDModel, y.data(), kDModel, t, nullptr));
    benchmark::DoNotOptimize(y.data());
  }
  fllm_workspace_destroy(ws);
  state.SetItemsProcessed(state.iterations() * t);
}

/// The handle's internal workspace (ws = NULL): one mutex lock per call on top of BM_c_forward.
void BM_c_forward_internal_ws(benchmark::State& state) {
  auto& f = Fixture::get();
  std::int64_t const t = state.range(0);
  std::vector<float> y(static_cast<std::size_t>(t * kDModel));
  check(fllm_moe_forward(f.c, nullptr, FLLM_F32, f.x.data(), kDModel, y.data(), kDModel, t, nullptr));  // grows it
  for (auto _ : state) {
    check(fllm_moe_forward(f.c, nullptr, FLLM_F32, f.x.data(), kDModel, y.data(), kDModel, t, nullptr));
    benchmark::DoNotOptimize(y.data());
  }
  state.SetItemsProcessed(state.iterations() * t);
}

/// bf16 activations: the widening and rounding passes on top of the f32 call.
void BM_c_forward_bf16(benchmark::State& state) {
  auto& f = Fixture::get();
  std::int64_t const t = state.range(0);
  fllm_workspace* ws = nullptr;
  check(fllm_workspace_create(&ws));
  check(fllm_workspace_reserve(ws, f.c, t));
  std::vector<std::uint16_t> xb(static_cast<std::size_t>(t * kDModel)), yb(xb.size());
  for (std::size_t i = 0; i < xb.size(); ++i) xb[i] = fl::bf16(f.x[i]).bits;
  for (auto _ : state) {
    check(fllm_moe_forward(f.c, ws, FLLM_BF16, xb.data(), kDModel, yb.data(), kDModel, t, nullptr));
    benchmark::DoNotOptimize(yb.data());
  }
  fllm_workspace_destroy(ws);
  state.SetItemsProcessed(state.iterations() * t);
}

/// With the routing record copied out (ids, weights, logits).
void BM_c_forward_routing(benchmark::State& state) {
  auto& f = Fixture::get();
  std::int64_t const t = state.range(0);
  fllm_workspace* ws = nullptr;
  check(fllm_workspace_create(&ws));
  check(fllm_workspace_reserve(ws, f.c, t));
  std::vector<float> y(static_cast<std::size_t>(t * kDModel)), weights(static_cast<std::size_t>(t * kTopK)),
      logits(static_cast<std::size_t>(t * kExperts));
  std::vector<std::int32_t> ids(weights.size());
  fllm_routing const r{ids.data(), weights.data(), logits.data()};
  for (auto _ : state) {
    check(fllm_moe_forward(f.c, ws, FLLM_F32, f.x.data(), kDModel, y.data(), kDModel, t, &r));
    benchmark::DoNotOptimize(y.data());
  }
  fllm_workspace_destroy(ws);
  state.SetItemsProcessed(state.iterations() * t);
}

BENCHMARK(BM_cxx_forward)->Arg(1)->Arg(512)->UseRealTime();
BENCHMARK(BM_c_forward)->Arg(1)->Arg(512)->UseRealTime();
BENCHMARK(BM_c_forward_internal_ws)->Arg(1)->Arg(512)->UseRealTime();
BENCHMARK(BM_c_forward_bf16)->Arg(1)->Arg(512)->UseRealTime();
BENCHMARK(BM_c_forward_routing)->Arg(1)->Arg(512)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
