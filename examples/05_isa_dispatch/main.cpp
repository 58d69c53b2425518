// SPDX-License-Identifier: Apache-2.0
// Runtime CPU dispatch: one baseline x86-64 binary that runs the MoE FFN with AVX-512 or AVX2 code.
//
// This program is compiled for plain x86-64 (no -march=native). It asks the CPU what it supports, dlopens
// the best per-ISA module lib factorllm_moe_variant_<isa>.so (moe_variant.cpp, built once per ISA by
// factorllm_add_isa_variants), runs a factorized FFN on generated weights at T = 1 (decode) and T = 64
// (prefill), and compares with the CpuScalar oracle computed here, in the baseline code.
//
//   factorllm_isa_dispatch [--isa avx512|avx2|generic] [--dir <module folder>]
//   FLLM_ISA=avx2 factorllm_isa_dispatch            (same as --isa avx2)
//
// Exit status 0 when every relative L2 error is below 2e-5 (the cpu_simd tolerance of README.md).
#include <factorllm/backend/isa_variants.hpp>
#include <factorllm/factorllm.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "moe_variant_api.h"
#include "moe_variant_desc.hpp"

using namespace factorllm;

namespace {

constexpr double kTolerance = 2e-5;

double rel_l2(float const* a, float const* b, std::size_t n) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < n; ++i) {
    double const d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

Matrix<float> randn(std::ptrdiff_t rows, std::ptrdiff_t cols, std::uint64_t seed, double scale) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> dist(0.0, scale);
  Matrix<float> m({rows, cols});
  for (std::ptrdiff_t i = 0; i < m.size(); ++i) m[i] = static_cast<float>(dist(rng));
  return m;
}

}  // namespace

int main(int argc, char** argv) {
  IsaModule::Options options;
  std::string dir;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--isa") == 0 && i + 1 < argc) {
      options.force = argv[++i];
    } else if (std::strcmp(argv[i], "--dir") == 0 && i + 1 < argc) {
      dir = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--isa avx512|avx2|generic] [--dir <module folder>]\n", argv[0]);
      return 2;
    }
  }
  try {
    if (dir.empty()) dir = executable_directory();
    // >>>> Load the best module (or the forced one) and take its function table.
    IsaModule module("factorllm_moe_variant", dir, {"avx512", "avx2", "generic"}, options);
    FllmMoeVariantApi const* api = module.symbol<FllmMoeVariantApiFn>(FLLM_MOE_VARIANT_API_SYMBOL)();
    if (api->abi_version != FLLM_MOE_VARIANT_ABI_VERSION) {
      std::fprintf(stderr, "%s: ABI version %u, expected %u\n", module.path().c_str(), api->abi_version,
                   FLLM_MOE_VARIANT_ABI_VERSION);
      return 1;
    }
    std::printf("CPU supports:");
    for (auto const& isa : known_isas())
      if (cpu_supports_isa(isa)) std::printf(" %s", isa.c_str());
    std::printf("\nloaded %s (isa %s, xsimd arch %s)%s%s\n", module.path().c_str(), api->isa, api->xsimd_arch,
                module.log().empty() ? "" : "; skipped: ", module.log().c_str());
    // <<<<

    // A factorized FFN on generated weights: d_model 256, d_ff 1024 -> 8 experts of 128, top-2, Mixtral gating.
    std::ptrdiff_t const d_model = 256, d_ff = 1024, n_experts = 8, top_k = 2;
    auto const gate = randn(d_ff, d_model, 1, 1.0 / std::sqrt(d_model));
    auto const up = randn(d_ff, d_model, 2, 1.0 / std::sqrt(d_model));
    auto const down = randn(d_model, d_ff, 3, 1.0 / std::sqrt(d_ff));
    ffn::DenseFfnView<float> dense{gate.cview(), up.cview(), down.cview()};
    auto experts = ffn::factorize(dense, ffn::ExpertPartition::random(d_ff, n_experts, 4));
    auto const router = moe::Router<float>::random(d_model, n_experts, 5, 1.0);
    moe::Gating gating;
    gating.mode = moe::CombineMode::softmax_topk_renorm;
    gating.top_k = top_k;

    // The module copies the weights; the oracle below runs in this (baseline) program.
    FllmMoeDesc const desc = factorllm_examples::moe_variant_desc(experts, router, gating);
    char err[512] = {};
    void* layer = api->create(&desc, err, sizeof err);
    if (!layer) {
      std::fprintf(stderr, "create failed: %s\n", err);
      return 1;
    }
    moe::MoeFfn<float, CpuScalar> oracle(std::move(experts), router, gating);

    bool ok = true;
    for (std::ptrdiff_t t : {1, 64}) {
      auto const x = randn(t, d_model, 10 + static_cast<std::uint64_t>(t), 1.0);
      Matrix<float> y({t, d_model}), y_ref({t, d_model});
      if (api->forward(layer, x.data(), y.data(), t, err, sizeof err) != 0) {
        std::fprintf(stderr, "forward failed: %s\n", err);
        ok = false;
        break;
      }
      oracle.forward(x.cview(), y_ref.view());
      double const e = rel_l2(y.data(), y_ref.data(), static_cast<std::size_t>(y.size()));
      std::printf("T=%-3td %s vs cpu_scalar oracle: relative L2 error %.3g (tolerance %.0e) %s\n", t, api->isa, e,
                  kTolerance, e < kTolerance ? "ok" : "FAIL");
      ok = ok && e < kTolerance;
    }
    api->destroy(layer);
    return ok ? 0 : 1;
  } catch (factorllm::error const& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
