// SPDX-License-Identifier: Apache-2.0
// Calibration and held-out data sampled from a Llama-family model, per-layer FFN inputs, and in-order layer conversion.
//
// The data a layer-local conversion learns from are sequences the dense model itself samples (temperature 1,
// from BOS): no external corpus is needed, and the held-out sequences come from disjoint seeds, so evaluation
// never sees a calibration sequence. Layers are converted bottom-up: layer l's calibration inputs are produced by
// the engine whose layers < l are already converted, so each layer learns on the inputs it will really see.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <set>
#include <utility>
#include <vector>

#include "factorllm/core/error.hpp"
#include "factorllm/core/tensor.hpp"
#include "factorllm/model/llama_engine.hpp"

namespace factorllm {
namespace model {

/// One token sequence: BOS followed by the sampled tokens.
using TokenSequence = std::vector<int>;

/// Samples `n_sequences` sequences of BOS + `length` tokens from the engine as it currently is (dense, for
/// calibration data). Sequence i is drawn with its own generator seeded first_seed + i, so any subset can be
/// regenerated alone. Drawing BOS mid-sequence does not stop it: every sequence has the same length.
/// \throws value_error if n_sequences < 1, length < 1, length + 1 > the engine's context or temperature < 0.
inline std::vector<TokenSequence> sample_sequences(LlamaEngine& engine, int n_sequences, int length,
                                                   std::uint64_t first_seed, float temperature = 1.f) {
  if (n_sequences < 1)
    throw value_error(factorllm::detail::concat("sample_sequences: n_sequences must be >= 1, got ", n_sequences));
  if (length < 1 || length + 1 > engine.max_seq_len())
    throw value_error(factorllm::detail::concat("sample_sequences: length ", length, " must be in [1, ",
                                             engine.max_seq_len() - 1, "] (BOS + length tokens fit the context)"));
  std::vector<TokenSequence> out;
  out.reserve(static_cast<std::size_t>(n_sequences));
  for (int i = 0; i < n_sequences; ++i) {
    Sampler sampler(temperature, first_seed + static_cast<std::uint64_t>(i));
    TokenSequence seq{engine.bos_token()};
    std::vector<int> const sampled = engine.generate(seq, length, sampler, /*stop_at_bos=*/false);
    seq.insert(seq.end(), sampled.begin(), sampled.end());
    out.push_back(std::move(seq));
  }
  return out;
}

/// How the calibration and held-out sets are drawn.
struct DataSplitConfig {
  int n_calibration = 64;                      // sequences to convert layers on
  int n_evaluation = 32;                       // held-out sequences to measure on
  int length = 128;                            // sampled tokens per sequence (after BOS)
  std::uint64_t calibration_seed = 1000;       // sequence i: seed calibration_seed + i
  std::uint64_t evaluation_seed = 1000000;     // sequence i: seed evaluation_seed + i (a disjoint range)
  float temperature = 1.f;
};

/// Calibration and held-out sequences that never overlap.
struct DataSplit {
  std::vector<TokenSequence> calibration;
  std::vector<TokenSequence> evaluation;
};

/// Samples both sets with disjoint seed ranges and checks that no held-out sequence equals a calibration one.
/// \throws value_error if the seed ranges overlap, a size is invalid (see sample_sequences), or a held-out
///         sequence is identical to a calibration sequence.
inline DataSplit make_data_split(LlamaEngine& engine, DataSplitConfig const& cfg) {
  auto const overlaps = [](std::uint64_t a, int na, std::uint64_t b, int nb) {
    return a < b + static_cast<std::uint64_t>(nb) && b < a + static_cast<std::uint64_t>(na);
  };
  if (cfg.n_calibration < 1 || cfg.n_evaluation < 1)
    throw value_error(factorllm::detail::concat("make_data_split: need at least one calibration and one held-out sequence, got ",
                                             cfg.n_calibration, " and ", cfg.n_evaluation));
  if (overlaps(cfg.calibration_seed, cfg.n_calibration, cfg.evaluation_seed, cfg.n_evaluation))
    throw value_error(factorllm::detail::concat("make_data_split: calibration seeds [", cfg.calibration_seed, ", +",
                                             cfg.n_calibration, ") overlap held-out seeds [", cfg.evaluation_seed, ", +",
                                             cfg.n_evaluation, ")"));
  DataSplit split;
  split.calibration = sample_sequences(engine, cfg.n_calibration, cfg.length, cfg.calibration_seed, cfg.temperature);
  split.evaluation = sample_sequences(engine, cfg.n_evaluation, cfg.length, cfg.evaluation_seed, cfg.temperature);
  // Different seeds make a collision unlikely, not impossible (short or low-entropy sequences): check it.
  std::set<TokenSequence> const seen(split.calibration.begin(), split.calibration.end());
  for (std::size_t i = 0; i < split.evaluation.size(); ++i)
    if (seen.count(split.evaluation[i]) != 0)
      throw value_error(factorllm::detail::concat("make_data_split: held-out sequence ", i,
                                               " is identical to a calibration sequence; change the seeds"));
  return split;
}

/// Collects layer l's FFN inputs over the sequences, running the engine only as far as that layer.
/// Position 0 (BOS) gives the same row in every sequence, so it is kept once, not once per sequence.
/// \returns [n_tokens, d_model] with n_tokens = 1 + sum of (length - 1) over the sequences
/// \throws value_error for an empty set or a bad layer.
inline Matrix<float> collect_ffn_inputs(LlamaEngine& engine, std::vector<TokenSequence> const& sequences, int l) {
  if (sequences.empty()) throw value_error("collect_ffn_inputs: no sequences");
  std::ptrdiff_t const d = engine.config().d_model;
  std::ptrdiff_t rows = 1;
  for (auto const& s : sequences) rows += static_cast<std::ptrdiff_t>(s.size()) - 1;
  Matrix<float> x({rows, d});
  std::ptrdiff_t at = 0;
  for (std::size_t i = 0; i < sequences.size(); ++i) {
    auto const xin = engine.ffn_inputs(sequences[i], l);
    for (std::ptrdiff_t t = i == 0 ? 0 : 1; t < xin.rows(); ++t, ++at) std::copy(xin.row(t), xin.row(t) + d, x.data() + at * d);
  }
  return x;
}

/// Converts every layer bottom-up: for l = 0 .. n_layers-1, collects layer l's calibration inputs with layers < l
/// already converted, calls `convert(l, x_calib)` and installs the FFN it returns.
/// \param convert  callable (int layer, Matrix<float> const& x_calib) -> std::unique_ptr<FfnLayer>
template <class Convert>
void convert_layers_in_order(LlamaEngine& engine, std::vector<TokenSequence> const& calibration, Convert&& convert) {
  for (int l = 0; l < engine.n_layers(); ++l) {
    Matrix<float> const x = collect_ffn_inputs(engine, calibration, l);
    engine.set_ffn(l, convert(l, x));
  }
}

}  // namespace model
}  // namespace factorllm
