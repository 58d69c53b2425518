// SPDX-License-Identifier: Apache-2.0
// Pieces shared by the tests' independent reference forwards of exported models (tests/test_gguf_export.cpp:
// llama.cpp's semantics over a GGUF file; tests/test_mixtral_export.cpp: Hugging Face Mixtral over safetensors).
// Plain float Eigen loops, written from the frameworks' definitions, independent of the library's engine.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <utility>
#include <vector>

#include <Eigen/Core>

namespace ref {

using RowMajorF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Causal grouped-query attention of already rotated q [T, n_heads * hs] against k, v [T, n_kv * hs]: head h reads
/// kv head h / (n_heads / n_kv), scores scaled by 1 / sqrt(hs), softmax over positions <= t. Returns [T, n_heads * hs].
inline RowMajorF causal_gqa_attention(RowMajorF const& q, RowMajorF const& k, RowMajorF const& v, int n_heads, int n_kv,
                                      int hs) {
  auto const T = static_cast<int>(q.rows());
  RowMajorF att(T, n_heads * hs);
  for (int head = 0; head < n_heads; ++head) {
    int const kvh = head / (n_heads / n_kv);
    for (int t = 0; t < T; ++t) {
      std::vector<float> s(static_cast<std::size_t>(t + 1));
      float mx = -INFINITY;
      for (int u = 0; u <= t; ++u) {
        s[static_cast<std::size_t>(u)] =
            q.row(t).segment(head * hs, hs).dot(k.row(u).segment(kvh * hs, hs)) / std::sqrt(static_cast<float>(hs));
        mx = std::max(mx, s[static_cast<std::size_t>(u)]);
      }
      float sum = 0;
      for (auto& e : s) sum += e = std::exp(e - mx);
      att.block(t, head * hs, 1, hs).setZero();
      for (int u = 0; u <= t; ++u) att.block(t, head * hs, 1, hs) += s[static_cast<std::size_t>(u)] / sum * v.block(u, kvh * hs, 1, hs);
    }
  }
  return att;
}

/// Mixtral / llama.cpp (build_moe_ffn) routing of one token: softmax over all experts' logits, the top_k largest
/// probabilities (stable: the lower index first on ties), their weights renormalized to sum to 1.
/// Returns (expert, weight) pairs, best first.
template <class Row>
std::vector<std::pair<int, double>> softmax_topk_renorm(Row const& logits, int top_k) {
  auto const n = static_cast<int>(logits.size());
  std::vector<double> pr(static_cast<std::size_t>(n));
  double const mx = logits.maxCoeff();
  double sum = 0;
  for (int e = 0; e < n; ++e) sum += pr[static_cast<std::size_t>(e)] = std::exp(static_cast<double>(logits(e)) - mx);
  for (auto& e : pr) e /= sum;
  std::vector<int> order(static_cast<std::size_t>(n));
  for (int e = 0; e < n; ++e) order[static_cast<std::size_t>(e)] = e;
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return pr[static_cast<std::size_t>(a)] > pr[static_cast<std::size_t>(b)]; });
  double top = 0;
  for (int j = 0; j < top_k; ++j) top += pr[static_cast<std::size_t>(order[static_cast<std::size_t>(j)])];
  std::vector<std::pair<int, double>> chosen;
  for (int j = 0; j < top_k; ++j) {
    int const e = order[static_cast<std::size_t>(j)];
    chosen.emplace_back(e, pr[static_cast<std::size_t>(e)] / top);
  }
  return chosen;
}

}  // namespace ref
