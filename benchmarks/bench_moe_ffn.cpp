// SPDX-License-Identifier: Apache-2.0
// Benchmark of the scalar-reference MoE forward (moe::MoeFfn on CpuScalar) against the dense SwiGLU it factorizes.
//
// This is the baseline harness: both sides run the CpuScalar oracle (plain loops, double accumulation, one
// thread), so the ratio shows the work saved by running K of N experts, not kernel quality. Shapes: the real
// test model stories260K (d_model 64, d_ff 172) and one mid shape (d_model 512, d_ff 1408).
// Counters: `flops` = 2 x multiply-adds actually executed (active experts + router for MoE), shown as a rate;
// items = tokens.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <utility>

#include "factorllm/core/tensor.hpp"
#include "factorllm/core/workspace.hpp"
#include "factorllm/detail/random.hpp"
#include "factorllm/ffn/factorize.hpp"
#include "factorllm/ffn/permutation.hpp"
#include "factorllm/ffn/swiglu.hpp"
#include "factorllm/moe/gating.hpp"
#include "factorllm/moe/moe_ffn.hpp"
#include "factorllm/moe/router.hpp"

namespace {

namespace fl = factorllm;
// Both sides are pinned to the scalar oracle (not left to the API's default backend): this is the baseline.
using ScalarMoe = fl::moe::MoeFfn<float, fl::CpuScalar>;

constexpr std::uint64_t kSeed = 2026;
// Short runs: the scalar baseline only needs to be stable to a few percent, and CI machines are shared.
constexpr double kMinTimeSeconds = 0.05;

/// Fills a tensor with N(0, stddev^2) draws from a seeded generator.
template <int Rank>
void fill_normal(fl::Tensor<float, Rank>& t, double stddev, std::mt19937_64& rng) {
  for (std::ptrdiff_t i = 0; i < t.size(); ++i) t[i] = static_cast<float>(stddev * fl::detail::standard_normal(rng));
}

/// Returns a dense SwiGLU FFN with weights ~ N(0, 1/d_model), the scale of the trained stories260K weights.
fl::ffn::DenseFfn<float> random_dense(std::ptrdiff_t d_model, std::ptrdiff_t d_ff, std::uint64_t seed) {
  fl::ffn::DenseFfn<float> dense{fl::Matrix<float>({d_ff, d_model}), fl::Matrix<float>({d_ff, d_model}),
                                 fl::Matrix<float>({d_model, d_ff})};
  std::mt19937_64 rng(seed);
  double const stddev = 1.0 / std::sqrt(static_cast<double>(d_model));
  fill_normal(dense.gate, stddev, rng);
  fill_normal(dense.up, stddev, rng);
  fill_normal(dense.down, stddev, rng);
  return dense;
}

/// Returns n_tokens hidden states ~ N(0, 1): the scale of an RMS-normalized input.
fl::Matrix<float> random_tokens(std::ptrdiff_t n_tokens, std::ptrdiff_t d_model, std::uint64_t seed) {
  fl::Matrix<float> x({n_tokens, d_model});
  std::mt19937_64 rng(seed);
  fill_normal(x, 1.0, rng);
  return x;
}

/// Dense SwiGLU forward, scalar reference. Args: d_model, d_ff, n_tokens.
void BM_dense_swiglu(benchmark::State& state) {
  std::ptrdiff_t const d_model = state.range(0), d_ff = state.range(1), n_tokens = state.range(2);
  auto const dense = random_dense(d_model, d_ff, kSeed);
  auto const x = random_tokens(n_tokens, d_model, kSeed + 1);
  fl::Matrix<float> y({n_tokens, d_model});
  fl::Workspace ws(fl::ffn::swiglu_workspace_bytes<fl::CpuScalar>(n_tokens, d_model, d_ff));
  for (auto _ : state) {
    fl::ffn::swiglu_forward<fl::CpuScalar>(dense.view(), x.cview(), y.view(), ws);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  // gate, up and down: 3 * d_model * d_ff multiply-adds per token.
  double const flops = 2.0 * static_cast<double>(n_tokens) * 3.0 * static_cast<double>(d_model * d_ff);
  state.counters["flops"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  state.SetItemsProcessed(state.iterations() * n_tokens);
  state.SetLabel(fl::CpuScalar::name());
}

/// K-of-N MoE forward (code_ref gating, random router), scalar reference.
/// Args: d_model, d_ff, n_experts, top_k, n_tokens.
void BM_moe_ffn(benchmark::State& state) {
  std::ptrdiff_t const d_model = state.range(0), d_ff = state.range(1), n_experts = state.range(2),
                       top_k = state.range(3), n_tokens = state.range(4);
  auto const dense = random_dense(d_model, d_ff, kSeed);
  auto const x = random_tokens(n_tokens, d_model, kSeed + 1);
  fl::moe::Gating gating;
  gating.mode = fl::moe::CombineMode::code_ref;
  gating.top_k = top_k;
  auto experts = fl::ffn::factorize(dense.view(), fl::ffn::ExpertPartition::contiguous(d_ff, n_experts));
  ScalarMoe const layer(std::move(experts), fl::moe::Router<float>::random(d_model, n_experts, kSeed + 2),
                                     std::move(gating));
  fl::Matrix<float> y({n_tokens, d_model});
  fl::Workspace ws(layer.workspace_bytes(n_tokens));
  for (auto _ : state) {
    layer.forward(x.cview(), y.view(), ws);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  // Per token: top_k experts of 3 * d_model * d_expert multiply-adds, plus the router's n_experts * d_model.
  double const macs_per_token = static_cast<double>(top_k * 3 * d_model * layer.d_expert() + n_experts * d_model);
  double const flops = 2.0 * static_cast<double>(n_tokens) * macs_per_token;
  state.counters["flops"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  state.SetItemsProcessed(state.iterations() * n_tokens);
  state.SetLabel(fl::CpuScalar::name());
}

}  // namespace

// stories260K shape (d_model 64, d_ff 172 -> 4 experts of 43).
BENCHMARK(BM_dense_swiglu)
    ->ArgNames({"d_model", "d_ff", "n_tokens"})
    ->ArgsProduct({{64}, {172}, {1, 8, 32}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(kMinTimeSeconds);
BENCHMARK(BM_moe_ffn)
    ->ArgNames({"d_model", "d_ff", "n_experts", "top_k", "n_tokens"})
    ->ArgsProduct({{64}, {172}, {4}, {1, 2}, {1, 8, 32}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(kMinTimeSeconds);

// Mid shape (d_model 512, d_ff 1408 -> 4 experts of 352): a quarter of TinyLlama's FFN per side.
BENCHMARK(BM_dense_swiglu)
    ->ArgNames({"d_model", "d_ff", "n_tokens"})
    ->ArgsProduct({{512}, {1408}, {1, 8}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(kMinTimeSeconds);
BENCHMARK(BM_moe_ffn)
    ->ArgNames({"d_model", "d_ff", "n_experts", "top_k", "n_tokens"})
    ->ArgsProduct({{512}, {1408}, {4}, {1}, {1, 8}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(kMinTimeSeconds);
