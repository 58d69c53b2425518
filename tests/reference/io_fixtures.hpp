// SPDX-License-Identifier: Apache-2.0
// Fixtures shared by the io tests (checkpoints and exports): gating settings, temporary paths, the skip check for
// the shared model files, and stories260K's FFNs factorized into MoE layers.
#pragma once

#include <catch2/catch.hpp>

#include <factorllm/ffn/factorize.hpp>
#include <factorllm/ffn/permutation.hpp>
#include <factorllm/io/llama2c.hpp>
#include <factorllm/moe/gating.hpp>
#include <factorllm/moe/moe_ffn.hpp>
#include <factorllm/moe/router.hpp>

#include "shared_data.hpp"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

namespace fixture {

/// A gating with the given combine mode and top-k, every other field at its default.
inline factorllm::moe::Gating gating(factorllm::moe::CombineMode mode, std::ptrdiff_t k) {
  factorllm::moe::Gating g;
  g.mode = mode;
  g.top_k = k;
  return g;
}

/// A path in the system's temporary folder, prefixed so that the io tests' files are recognisable.
inline std::string temp_path(std::string const& name) {
  return (std::filesystem::temp_directory_path() / ("factorllm_test_st_" + name)).string();
}

/// stories260K's FFNs factorized into N experts (random partition, seed partition_seed + layer) with random
/// bias-free routers of stddev 1 (seed router_seed + layer): strong enough that routing differs per token, so any
/// mistake in an export's router or expert layout shows.
inline std::vector<factorllm::moe::MoeFfn<float, factorllm::CpuScalar>> stories_moe(
    factorllm::io::Llama2cCheckpoint const& ck, std::ptrdiff_t n, factorllm::moe::Gating const& g,
    std::uint64_t partition_seed, std::uint64_t router_seed) {
  namespace fl = factorllm;
  std::vector<fl::moe::MoeFfn<float, fl::CpuScalar>> layers;
  for (int l = 0; l < ck.config().n_layers; ++l) {
    auto ex = fl::ffn::factorize(ck.ffn(l),
                                 fl::ffn::ExpertPartition::random(ck.config().hidden_dim, n, partition_seed + l));
    layers.emplace_back(std::move(ex), fl::moe::Router<float>::random(ck.config().dim, n, router_seed + l, 1.0), g);
  }
  return layers;
}

}  // namespace fixture
