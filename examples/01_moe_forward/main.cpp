// SPDX-License-Identifier: Apache-2.0
// The README's usage example: factorize a dense SwiGLU FFN into 4 experts, run the MoE layer, train-signal the router.
#include <factorllm/factorllm.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

using namespace factorllm;

int main() {
  std::ptrdiff_t const d_model = 64, d_ff = 256, n_experts = 4, n_tokens = 8, max_tokens = 16;
  // The host engine's dense weights (random here), row-major: W_gate/W_up [d_ff, d_model], W_down [d_model, d_ff].
  std::mt19937 rng(2023);
  std::normal_distribution<float> normal(0.f, 0.2f);
  auto random_floats = [&](std::ptrdiff_t n) {
    std::vector<float> v(static_cast<std::size_t>(n));
    for (float& e : v) e = normal(rng);
    return v;
  };
  std::vector<float> w_gate = random_floats(d_ff * d_model), w_up = random_floats(d_ff * d_model),
                     w_down = random_floats(d_model * d_ff), x = random_floats(n_tokens * d_model);
  std::vector<float> y(x.size()), y_all(x.size()), y_dense(x.size());

  // Views of the dense weights (no copy), split into 4 experts by one shared permutation of the d_ff neurons.
  ffn::DenseFfnView<float> dense{matrix_view<float const>(w_gate.data(), d_ff, d_model),
                                 matrix_view<float const>(w_up.data(), d_ff, d_model),
                                 matrix_view<float const>(w_down.data(), d_model, d_ff)};
  auto experts = ffn::factorize(dense, ffn::ExpertPartition::contiguous(d_ff, n_experts));

  moe::Gating gating;
  gating.mode = moe::CombineMode::softmax_topk_renorm;
  gating.top_k = 2;
  moe::MoeFfn<float, DefaultCpu> layer(std::move(experts), moe::Router<float>::random(d_model, n_experts, /*seed=*/1), gating);

  Workspace ws(layer.workspace_bytes(max_tokens));                // once
  auto const xv = matrix_view<float const>(x.data(), n_tokens, d_model);
  layer.forward(xv, matrix_view(y.data(), n_tokens, d_model), ws);  // per call: no allocation
  std::printf("MoE (2 of 4, softmax_topk_renorm) y[0][0..3]: %.6f %.6f %.6f %.6f\n", y[0], y[1], y[2], y[3]);

  // All experts, unweighted (code_ref with top_k = n_experts: scale floor(N/N) = 1) is exactly the dense FFN.
  moe::Gating all;
  all.mode = moe::CombineMode::code_ref;
  all.top_k = n_experts;
  moe::MoeFfn<float, DefaultCpu> full(layer.experts(), layer.router(), all);
  Workspace ws_all(full.workspace_bytes(max_tokens));
  full.forward(xv, matrix_view(y_all.data(), n_tokens, d_model), ws_all);
  ffn::swiglu_forward(dense, xv, matrix_view(y_dense.data(), n_tokens, d_model), DefaultCpu{});
  float max_diff = 0;
  for (std::size_t i = 0; i < y.size(); ++i) max_diff = std::max(max_diff, std::fabs(y_all[i] - y_dense[i]));
  std::printf("top_k = n_experts vs dense FFN: max |difference| = %.3g\n", max_diff);

  // Router training signal (docs/math.md §3.2): PAR + balance losses and their gradients w.r.t. W_r, b_r.
  auto r = train::par_loss(xv, dense, layer.experts(), layer.router(), gating.top_k);
  std::printf("PAR total loss %.6f, router label accuracy %.3f\n", r.total_loss, r.label_accuracy);
  return max_diff < 1e-4f ? 0 : 1;
}
