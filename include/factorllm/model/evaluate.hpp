// SPDX-License-Identifier: Apache-2.0
// Held-out fidelity of a converted model against its dense original (docs/model.md §5): next-token accuracy and its
// retention, top-1 agreement, perplexity and KL(dense || model), over every next-token position of a set of
// sequences.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "factorllm/core/error.hpp"
#include "factorllm/model/calibration.hpp"
#include "factorllm/model/llama_engine.hpp"

namespace factorllm {
namespace model {

/// Held-out metrics of one model (against the dense one for agreement and KL).
struct Metrics {
  double top1_agreement = 0;  // argmax equals the dense model's argmax
  double next_token_acc = 0;  // argmax equals the sequence's next token
  double ppl = 0;             // exp(mean NLL of the next token)
  double kl_to_dense = 0;     // mean KL(dense || model) of the next-token distributions
  std::int64_t positions = 0;
};

/// The dense model's next-token distributions on the held-out set, computed once.
struct DenseReference {
  std::vector<std::vector<float>> log_probs;  // per sequence: [T - 1, vocab] log-softmax rows
  std::vector<std::vector<int>> argmax;       // per sequence: [T - 1]
  Metrics metrics;                            // the dense model's own numbers (agreement 1, KL 0)
};

/// Writes log-softmax of `logits` [vocab] into `out` (double internally: the max is subtracted first).
inline void log_softmax(float const* logits, std::ptrdiff_t vocab, float* out) {
  float const mx = *std::max_element(logits, logits + vocab);
  double sum = 0;
  for (std::ptrdiff_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i] - mx));
  double const lse = static_cast<double>(mx) + std::log(sum);
  for (std::ptrdiff_t i = 0; i < vocab; ++i) out[i] = static_cast<float>(static_cast<double>(logits[i]) - lse);
}

/// Runs the engine on every sequence; compares with `ref` when given, else fills `fill` (the dense pass).
/// Row t of a sequence's logits predicts token t + 1. When `argmax` is given, the model's most likely next token at
/// every position (sequence by sequence) is appended to it.
/// \throws value_error for an empty set, a sequence shorter than 2 tokens, a missing reference, or a reference
///         of other sequences or another vocabulary.
inline Metrics evaluate(LlamaEngine& engine, std::vector<TokenSequence> const& eval, DenseReference* fill,
                        DenseReference const* ref, std::vector<int>* argmax = nullptr) {
  if (eval.empty()) throw value_error("evaluate: no sequences");
  if ((fill == nullptr) == (ref == nullptr)) throw value_error("evaluate: give exactly one of fill and ref");
  if (ref != nullptr && ref->log_probs.size() != eval.size())
    throw value_error(factorllm::detail::concat("evaluate: the reference has ", ref->log_probs.size(), " sequences, the set ",
                                     eval.size()));
  std::ptrdiff_t const vocab = engine.vocab_size();
  std::vector<float> lp(static_cast<std::size_t>(vocab));
  std::int64_t agree = 0, correct = 0, positions = 0;
  double nll = 0, kl = 0;
  for (std::size_t i = 0; i < eval.size(); ++i) {
    auto const& seq = eval[i];
    std::ptrdiff_t const n_pred = static_cast<std::ptrdiff_t>(seq.size()) - 1;
    if (n_pred < 1) throw value_error(factorllm::detail::concat("evaluate: sequence ", i, " has fewer than 2 tokens"));
    if (ref != nullptr && ref->log_probs[i].size() != static_cast<std::size_t>(n_pred * vocab))
      throw value_error(factorllm::detail::concat("evaluate: the reference of sequence ", i, " does not match it"));
    auto const logits = engine.forward_sequence(seq);
    if (fill != nullptr) {
      fill->log_probs.emplace_back(static_cast<std::size_t>(n_pred * vocab));
      fill->argmax.emplace_back(static_cast<std::size_t>(n_pred));
    }
    for (std::ptrdiff_t t = 0; t < n_pred; ++t) {
      float const* row = logits.row(t);
      int const top = Sampler::argmax(row, vocab);
      if (argmax != nullptr) argmax->push_back(top);
      int const target = seq[static_cast<std::size_t>(t) + 1];
      float* out = fill != nullptr ? fill->log_probs.back().data() + t * vocab : lp.data();
      log_softmax(row, vocab, out);
      nll -= out[target];
      correct += top == target;
      if (fill != nullptr) {
        fill->argmax.back()[static_cast<std::size_t>(t)] = top;
        agree += 1;
      } else {
        float const* dense_lp = ref->log_probs[i].data() + t * vocab;
        agree += top == ref->argmax[i][static_cast<std::size_t>(t)];
        double k = 0;
        for (std::ptrdiff_t v = 0; v < vocab; ++v)
          k += std::exp(static_cast<double>(dense_lp[v])) * (static_cast<double>(dense_lp[v]) - out[v]);
        kl += k;
      }
      ++positions;
    }
  }
  Metrics m;
  m.positions = positions;
  m.top1_agreement = static_cast<double>(agree) / static_cast<double>(positions);
  m.next_token_acc = static_cast<double>(correct) / static_cast<double>(positions);
  m.ppl = std::exp(nll / static_cast<double>(positions));
  m.kl_to_dense = kl / static_cast<double>(positions);
  if (fill != nullptr) fill->metrics = m;
  return m;
}

}  // namespace model
}  // namespace factorllm
